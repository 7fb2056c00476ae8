"""The writer's side of the spool contract (docs/spool.md): one file per writer and per life, created
exclusively, mode 0640, held with an exclusive flock while it may be written, each group of lines written with
one write() and then fdatasync'ed; closing the file hands it over to the agent, which drains and deletes it."""

from __future__ import annotations

import errno
import fcntl
import os
from typing import List, Optional, Tuple

# A file holding this much is handed over and the next group starts a new one (keep the agent's
# `[spool] max_file_bytes` above it: it refuses larger files).
FILE_ROLL_BYTES = 8 << 20


class SpoolWriter:
    """Appends groups of protocol lines to this client's current spool file. Not thread-safe: only the
    client's driver uses it (and close(), once the driver stopped)."""

    def __init__(self, directory: str, instance: int, max_bytes: int) -> None:
        self.directory = directory
        self.instance = instance
        self.max_bytes = max_bytes
        self.fd: Optional[int] = None
        self.path = ""
        self.size = 0
        self.files_made = 0
        # Files handed over that the agent may not have drained yet: (path, size).
        self.handed_over: List[Tuple[str, int]] = []

    def bytes_in_use(self, refresh: bool) -> int:
        """What this client has on disk: the current file and the handed-over ones the agent has not deleted
        yet (checked with stat only when `refresh`, i.e. when the cap seems reached)."""
        if refresh and self.handed_over:
            self.handed_over = [(path, size) for path, size in self.handed_over if os.path.lexists(path)]
        return self.size + sum(size for _, size in self.handed_over)

    def append(self, lines: List[bytes], beyond_cap: bool = False) -> Optional[str]:
        """Writes one group and syncs it. Returns None once the lines are durable, else why not (the caller
        keeps the events). `beyond_cap`: at close, the cap gives way to not losing events."""
        data = b"".join(lines)
        if not beyond_cap and self.bytes_in_use(False) + len(data) > self.max_bytes:
            if self.bytes_in_use(True) + len(data) > self.max_bytes:
                held = self.bytes_in_use(False)
                return f"the spool holds {held} bytes of this client (max_spool_bytes {self.max_bytes})"
        try:
            if self.fd is not None and self.size and self.size + len(data) > FILE_ROLL_BYTES:
                # Files stay small enough for the agent's [spool] max_file_bytes; a closed one is the agent's.
                self.hand_over()
            if self.fd is None:
                self._open()
            assert self.fd is not None
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.size += written
            os.fdatasync(self.fd)
        except OSError as e:
            # Whatever reached the file is complete lines or a torn last line (which the agent ignores): hand
            # the file over as it is, and start a new one next time, so no later line is glued to a torn one.
            self.hand_over()
            return f"cannot write the spool file in {self.directory}: {e}"
        return None

    def _open(self) -> None:
        for _ in range(10):
            self.files_made += 1
            name = f"{os.getpid()}-{self.instance:016x}-{self.files_made}.spool"
            path = os.path.join(self.directory, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
            try:
                # Readable by the agent (through the directory's group) whatever this script's umask.
                os.fchmod(fd, 0o640)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    # The agent holds it a moment (it drains and deletes the empty file): start over, new name.
                    os.close(fd)
                    continue
                held = os.fstat(fd)
                try:
                    named = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    named = None
                if named is not None and (named.st_ino, named.st_dev) == (held.st_ino, held.st_dev):
                    self.fd, self.path, self.size = fd, path, 0
                    self._sync_directory()
                    return
            except BaseException:
                os.close(fd)
                raise
            # The agent drained and deleted the empty file before we locked it: start over, new name.
            os.close(fd)
        raise OSError(errno.EAGAIN, "the spool file kept disappearing before it could be locked")

    def _sync_directory(self) -> None:
        """Makes the new name durable where we may (the packaged directory, mode 3730, cannot be opened by
        scripts; there the file's own fdatasync is what we have)."""
        try:
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    def hand_over(self) -> None:
        """Closes the current file (releasing the flock): the agent drains it. The next group starts a new one."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        if self.size:
            self.handed_over.append((self.path, self.size))
        elif os.path.lexists(self.path):
            # Nothing was written: remove it rather than leave the agent an empty file (we still hold the lock).
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.size = 0
        os.close(fd)

    def after_fork_in_child(self, instance: int) -> None:
        """Closes the child's copy of the file descriptor only: the flock belongs to the open file, which the
        parent still holds, so the parent goes on writing its file. The child starts its own file when it must."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = None
        self.path = ""
        self.size = 0
        self.files_made = 0
        self.handed_over = []
        self.instance = instance
