"""The asyncio client: the same core and spool as the thread-based one, driven by a task on the event loop
(asyncio.open_unix_connection), for bots that run in asyncio."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any, List, Optional

from .client import BaseClient, _unregister
from .core import DROPPED, QUEUED, PendingBase, Plan, log
from .errors import WaitTimeout

RECV_BYTES = 16384


class _Signal:
    """Wakes every coroutine waiting for an outcome; fired by the driver (on the loop) after answers."""

    def __init__(self) -> None:
        self.event: Optional[asyncio.Event] = None

    def fire(self) -> None:
        event, self.event = self.event, None
        if event is not None:
            event.set()

    async def wait(self, timeout: Optional[float]) -> None:
        if self.event is None:
            self.event = asyncio.Event()
        if timeout is None:
            await self.event.wait()
        else:
            await asyncio.wait_for(self.event.wait(), timeout)


class AsyncPending(PendingBase):
    """Returned by `AsyncClient.metric()`/`trade()`."""

    __slots__ = ()

    async def wait(self, timeout: Optional[float] = 30.0) -> Any:
        """Awaits the Ack (acked or spooled); raises Refused or Dropped, or WaitTimeout after `timeout`."""
        core = self._core
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == QUEUED and self._fork_gen == core.fork_gen:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(f"event {self.event_id} is not acked or spooled yet")
            try:
                await core.signal.wait(remaining)
            except asyncio.TimeoutError:
                pass
        return self.result()


class AsyncClient(BaseClient):
    """The asyncio twin of `Client` (same arguments and methods; `await pending.wait()`, `await flush()`,
    `await close()`, `async with`). Use it from one event loop. `metric()`/`trade()` are plain calls that
    never block the loop, so `on_full` is "raise" (default) or "drop": "block" would stall the loop itself."""

    def __init__(self, socket_path: Optional[str] = None, spool_dir: Optional[str] = None, **options: Any) -> None:
        options.setdefault("on_full", "raise")
        if options["on_full"] == "block":
            raise ValueError('AsyncClient cannot block the event loop: use on_full="raise" or "drop"')
        super().__init__(socket_path, spool_dir, **options)
        self._core.signal = _Signal()  # type: ignore[attr-defined]
        self._core.on_resolved = self._on_resolved
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread = 0
        self._task: Optional[asyncio.Task] = None
        self._reader_task: Optional[asyncio.Task] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._wake: Optional[asyncio.Event] = None
        self._lost: Optional[str] = None  # set by the reader: why the connection is gone

    def _on_resolved(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self._core.signal.fire()  # type: ignore[attr-defined]

    def _enqueue(self, event_id: str, line: bytes) -> AsyncPending:
        core = self._core
        pending = AsyncPending(core, event_id, line, time.monotonic())
        with core.lock:
            wake = core.enqueue(pending, may_block=False)
        if self._task is None:
            self._start()
        if wake:
            self._wake_driver()
        elif pending.state == DROPPED:
            self._dropped(pending)
        return pending

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._drive())

    def _wake_driver(self) -> None:
        if self._wake is None or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def flush(self, timeout: Optional[float] = 30.0) -> None:
        """Waits until every event queued before this call is acked, spooled or failed (WaitTimeout after
        `timeout` seconds)."""
        core = self._core
        with core.lock:
            pendings: List[PendingBase] = core.unresolved_snapshot()
        deadline = None if timeout is None else time.monotonic() + timeout
        for pending in pendings:
            while pending.state == QUEUED and pending._fork_gen == core.fork_gen:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WaitTimeout(f"event {pending.event_id} is not acked or spooled yet")
                try:
                    await core.signal.wait(remaining)  # type: ignore[attr-defined]
                except asyncio.TimeoutError:
                    pass

    async def close(self, timeout: float = 5.0) -> None:
        """Flushes, then spools whatever is not acked, hands the spool file over and stops, within `timeout`."""
        core = self._core
        deadline = time.monotonic() + timeout
        with core.lock:
            already = core.closing
            core.closing = True
            core.flush_until = deadline - min(1.0, timeout * 0.2)
        task = self._task
        if task is not None and not task.done():
            if not already:
                self._wake_driver()
            try:
                await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return
        with core.lock:
            closed = core.closed
        if not closed:
            # The driver never ran (or died): the spool takes the rest, off the loop.
            await asyncio.get_running_loop().run_in_executor(None, self._spool_all_now)
        _unregister(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the driver task ---------------------------------------------------------------------------------------

    async def _drive(self) -> None:
        core = self._core
        try:
            while True:
                try:
                    if self._lost is not None:
                        await self._disconnect(unreachable=self._lost == "shutting_down")
                    with core.lock:
                        plan = core.plan(time.monotonic())
                    kind = plan.kind
                    if kind == Plan.STOP:
                        self._spool.hand_over()
                        break
                    if kind == Plan.CONNECT:
                        await self._connect()
                    elif kind == Plan.DISCONNECT:
                        await self._disconnect(plan.unreachable)
                    elif kind == Plan.SPOOL:
                        await asyncio.get_running_loop().run_in_executor(None, self._write_spool, plan.batch)
                        self._core.signal.fire()  # type: ignore[attr-defined]
                    else:
                        if kind == Plan.IO and plan.data and self._writer is not None:
                            self._writer.write(plan.data)
                        await self._sleep(plan.timeout)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a bug must not stop delivery
                    self._errors_log.warning("driver", "telemetry-agent client: unexpected error: %r", e)
                    await self._disconnect(unreachable=False)
                    await asyncio.sleep(0.1)
        finally:
            await self._disconnect(unreachable=False)
            with core.lock:
                if core.closing and not core.closed:
                    core.finish_close("dropped: the client closed before the event could be acked or spooled")

    async def _sleep(self, timeout: Optional[float]) -> None:
        wake = self._wake
        assert wake is not None
        try:
            if timeout is None:
                await wake.wait()
            else:
                await asyncio.wait_for(wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        wake.clear()

    async def _connect(self) -> None:
        core = self._core
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path), core.options.connect_timeout
            )
        except (OSError, asyncio.TimeoutError) as e:
            with core.lock:
                core.on_connect_failed(time.monotonic())
            self._errors_log.warning(
                "connect",
                "telemetry-agent client: cannot reach %s (%r); spooling to %s",
                self.socket_path,
                e,
                self.spool_dir,
            )
            return
        self._writer = writer
        self._lost = None
        self._spool.hand_over()
        with core.lock:
            core.on_connected(time.monotonic())
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        core = self._core
        while True:
            try:
                data = await reader.read(RECV_BYTES)
            except (OSError, ConnectionError):
                data = b""
            if not data:
                self._lost = "closed"
            else:
                with core.lock:
                    self._lost = core.on_answers(data, time.monotonic())
                if self._lost is not None and self._lost not in ("shutting_down", "line_too_long"):
                    self._errors_log.warning("protocol", "telemetry-agent client: %s", self._lost)
            assert self._wake is not None
            self._wake.set()
            if self._lost is not None:
                return

    async def _disconnect(self, unreachable: bool) -> None:
        self._lost = None
        reader_task, self._reader_task = self._reader_task, None
        if reader_task is not None and reader_task is not asyncio.current_task():
            reader_task.cancel()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        with self._core.lock:
            self._core.on_disconnected(time.monotonic(), unreachable)

    # --- fork and exit -----------------------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        core = self._core
        core.after_fork_in_child()
        writer, self._writer = self._writer, None
        if writer is not None:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                try:
                    os.close(sock.fileno())  # the child's copy only; the loop is the parent's
                except OSError:
                    pass
        self._task = self._reader_task = None
        self._loop = None
        self._wake = None
        self._lost = None
        core.signal = _Signal()  # type: ignore[attr-defined]
        self._spool.after_fork_in_child(core.ids.instance)

    def _close_at_exit(self, deadline: float) -> None:
        # By now the event loop is gone (asyncio.run returned): no network, straight to the spool.
        try:
            self._spool_all_now()
        except Exception as e:
            log.warning("telemetry-agent client: spooling at exit failed: %r", e)
