//! A FUSE filesystem for power-loss tests, after LazyFS (Jepsen). File data lives in memory twice:
//! `current` (what reads see) and `synced` (what the last fsync or fdatasync of that inode saw).
//! [`Disk::cut_power`] makes every later request fail with EIO; [`Disk::after_power_cut`] builds a fresh
//! disk from the synced data alone. Namespace changes (create, mkdir, unlink, rmdir, rename) take effect at
//! once and survive a cut, as in LazyFS, which caches only file data.
//!
//! Mounted without libfuse (fuser's pure-Rust mount, as root), without writeback cache, and mounted anew
//! after every cut, so that no kernel page cache can carry unsynced data across it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

/// How long the kernel may cache attributes and names: only this process's mount changes them.
const TTL: Duration = Duration::from_secs(1);
/// Unsynced writes are tracked in pages of this size, so that an fsync copies only what changed.
const PAGE: usize = 4096;
/// Refuse (EFBIG) writes beyond this rather than allocate without bound on a bogus offset.
const MAX_FILE_BYTES: usize = 1 << 30;
const ROOT: u64 = INodeNo::ROOT.0;

/// What the test reads about one file (by its label: path, with sled's snapshots and blobs grouped).
#[derive(Debug, Default, Clone)]
pub struct FileCounts {
    pub writes: u64,
    pub bytes_written: u64,
    /// fsync (fsyncdir for a directory, whose label ends in `/`).
    pub fsyncs: u64,
    pub fdatasyncs: u64,
    /// Pages with unsynced writes that power cuts dropped.
    pub pages_dropped: u64,
}

/// One generation of the disk: what one mount serves. Cheap to clone; clones share it.
#[derive(Clone)]
pub struct Disk {
    state: Arc<Mutex<State>>,
    /// Shared by every generation, so counts add up over a run.
    counts: Arc<Mutex<BTreeMap<String, FileCounts>>>,
}

struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    powered: bool,
    /// Open file and directory handles; unmounting waits for the killed writer's to be released.
    open_handles: u64,
}

struct Inode {
    node: Node,
    perm: u16,
    label: String,
    /// False once unlinked (or replaced by a rename): open handles still work, a cut forgets it.
    linked: bool,
}

enum Node {
    File(FileData),
    Dir(BTreeMap<OsString, u64>),
}

#[derive(Clone, Default)]
struct FileData {
    synced: Vec<u8>,
    current: Vec<u8>,
    dirty_pages: BTreeSet<usize>,
}

impl FileData {
    fn mark_dirty(&mut self, from: usize, to: usize) {
        if to > from {
            self.dirty_pages.extend(from / PAGE..=(to - 1) / PAGE);
        }
    }

    fn resize(&mut self, len: usize) {
        let old = self.current.len();
        self.current.resize(len, 0);
        self.mark_dirty(old.min(len), old.max(len));
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), Errno> {
        let end = offset.checked_add(data.len()).filter(|&end| end <= MAX_FILE_BYTES).ok_or(Errno::EFBIG)?;
        if end > self.current.len() {
            self.resize(end);
        }
        self.current[offset..end].copy_from_slice(data);
        self.mark_dirty(offset, end);
        Ok(())
    }

    /// fsync and fdatasync alike: what the file holds now is what a power cut leaves.
    fn sync(&mut self) {
        let len = self.current.len();
        self.synced.resize(len, 0);
        for page in std::mem::take(&mut self.dirty_pages) {
            let (from, to) = (page * PAGE, ((page + 1) * PAGE).min(len));
            if from < to {
                self.synced[from..to].copy_from_slice(&self.current[from..to]);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// sled names snapshots `snap.<lsn>` and blobs by number: count each kind as one file.
fn child_label(parent: &str, name: &OsStr) -> String {
    let name = name.to_string_lossy();
    let name = if name.starts_with("snap.") {
        "snap.*"
    } else if parent.ends_with("blobs") {
        "*"
    } else {
        &name
    };
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

impl Disk {
    /// An empty disk: just the root directory.
    pub fn new() -> Disk {
        let root = Inode { node: Node::Dir(BTreeMap::new()), perm: 0o755, label: String::new(), linked: true };
        let state = State { inodes: HashMap::from([(ROOT, root)]), next_ino: ROOT + 1, powered: true, open_handles: 0 };
        Disk { state: Arc::new(Mutex::new(state)), counts: Arc::default() }
    }

    /// The moment of the power cut: from now on nothing reaches this disk.
    pub fn cut_power(&self) {
        lock(&self.state).powered = false;
    }

    /// The disk as a reboot finds it: every file's synced data, nothing else. Also says what was dropped.
    pub fn after_power_cut(&self) -> (Disk, Vec<String>) {
        let state = lock(&self.state);
        assert!(!state.powered, "after_power_cut before cut_power");
        let mut counts = lock(&self.counts);
        let mut dropped = Vec::new();
        let mut inodes = HashMap::new();
        for (&ino, inode) in state.inodes.iter().filter(|(_, inode)| inode.linked) {
            let node = match &inode.node {
                Node::Dir(entries) => Node::Dir(entries.clone()),
                Node::File(file) => {
                    if !file.dirty_pages.is_empty() {
                        counts.entry(inode.label.clone()).or_default().pages_dropped += file.dirty_pages.len() as u64;
                        dropped.push(format!(
                            "{}: kept {} synced bytes, dropped {} ({} unsynced pages, first at offset {})",
                            inode.label,
                            file.synced.len(),
                            if file.current.len() >= file.synced.len() { "writes" } else { "a truncation" },
                            file.dirty_pages.len(),
                            file.dirty_pages.first().map_or(0, |page| page * PAGE),
                        ));
                    }
                    let synced = file.synced.clone();
                    Node::File(FileData { current: synced.clone(), synced, dirty_pages: BTreeSet::new() })
                }
            };
            inodes.insert(ino, Inode { node, label: inode.label.clone(), ..*inode });
        }
        let state = State { inodes, next_ino: state.next_ino, powered: true, open_handles: 0 };
        (Disk { state: Arc::new(Mutex::new(state)), counts: self.counts.clone() }, dropped)
    }

    pub fn open_handles(&self) -> u64 {
        lock(&self.state).open_handles
    }

    pub fn counts(&self) -> BTreeMap<String, FileCounts> {
        lock(&self.counts).clone()
    }

    /// Also after a cut: the killed writer's handles must go before the old mount can be unmounted.
    fn release_handle(&self) {
        let mut state = lock(&self.state);
        state.open_handles = state.open_handles.saturating_sub(1);
    }

    fn count(&self, label: &str, update: impl FnOnce(&mut FileCounts)) {
        update(lock(&self.counts).entry(label.to_string()).or_default());
    }

    /// The state, unless the power is off.
    fn powered(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let state = lock(&self.state);
        if state.powered {
            Ok(state)
        } else {
            Err(Errno::EIO)
        }
    }
}

impl Inode {
    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, size, nlink) = match &self.node {
            Node::File(file) => (FileType::RegularFile, file.current.len() as u64, 1),
            Node::Dir(_) => (FileType::Directory, 0, 2),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm: self.perm,
            nlink,
            uid: 0, // the test runs as root
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        }
    }
}

impl State {
    fn inode(&mut self, ino: u64) -> Result<&mut Inode, Errno> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn file(&mut self, ino: u64) -> Result<&mut FileData, Errno> {
        match &mut self.inode(ino)?.node {
            Node::File(file) => Ok(file),
            Node::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn entries(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.inode(ino)?.node {
            Node::Dir(entries) => Ok(entries),
            Node::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn child(&mut self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(parent)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    fn add(&mut self, parent: u64, name: &OsStr, node: Node, mode: u32) -> Result<FileAttr, Errno> {
        let label = child_label(&self.inode(parent)?.label, name);
        let ino = self.next_ino;
        let entries = self.entries(parent)?;
        if entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        entries.insert(name.to_os_string(), ino);
        self.next_ino += 1;
        let inode = Inode { node, perm: (mode & 0o7777) as u16, label, linked: true };
        let attr = inode.attr(ino);
        self.inodes.insert(ino, inode);
        Ok(attr)
    }

    /// Takes `name` out of `parent`; `want_dir` says whether rmdir (true) or unlink (false) asked.
    fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        let ino = self.child(parent, name)?;
        match (&self.inode(ino)?.node, want_dir) {
            (Node::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Node::Dir(_), false) => return Err(Errno::EISDIR),
            (Node::File(_), true) => return Err(Errno::ENOTDIR),
            _ => {}
        }
        self.entries(parent)?.remove(name);
        self.inode(ino)?.linked = false;
        Ok(())
    }

    fn rename(&mut self, from: (u64, &OsStr), to: (u64, &OsStr), flags: RenameFlags) -> Result<(), Errno> {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let ino = self.child(from.0, from.1)?;
        if let Ok(target) = self.child(to.0, to.1) {
            if target == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            let moving_dir = matches!(self.inode(ino)?.node, Node::Dir(_));
            self.remove(to.0, to.1, moving_dir)?;
        }
        self.entries(from.0)?.remove(from.1);
        self.entries(to.0)?.insert(to.1.to_os_string(), ino);
        let label = child_label(&self.inode(to.0)?.label, to.1);
        self.inode(ino)?.label = label;
        Ok(())
    }
}

/// The filesystem one mount serves.
struct LazyFs {
    disk: Disk,
}

/// Answers `reply` with the result's value, or with its errno.
macro_rules! answer {
    ($reply:expr, $result:expr, |$value:ident| $ok:expr) => {
        match $result {
            Ok($value) => $ok,
            Err(errno) => $reply.error(errno),
        }
    };
}

fn offset(value: u64) -> Result<usize, Errno> {
    usize::try_from(value).ok().filter(|&v| v <= MAX_FILE_BYTES).ok_or(Errno::EFBIG)
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self.disk.powered().and_then(|mut state| {
            let ino = state.child(parent.0, name)?;
            Ok(state.inode(ino)?.attr(ino))
        });
        answer!(reply, result, |attr| reply.entry(&TTL, &attr, Generation(0)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let result = self.disk.powered().and_then(|mut state| Ok(state.inode(ino.0)?.attr(ino.0)));
        answer!(reply, result, |attr| reply.attr(&TTL, &attr));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.disk.powered().and_then(|mut state| {
            if let Some(size) = size {
                let size = offset(size)?;
                state.file(ino.0)?.resize(size);
            }
            let inode = state.inode(ino.0)?;
            if let Some(mode) = mode {
                inode.perm = (mode & 0o7777) as u16;
            }
            Ok(inode.attr(ino.0))
        });
        answer!(reply, result, |attr| reply.attr(&TTL, &attr));
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let result = self
            .disk
            .powered()
            .and_then(|mut state| state.add(parent.0, name, Node::Dir(BTreeMap::new()), mode & !umask));
        answer!(reply, result, |attr| reply.entry(&TTL, &attr, Generation(0)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer!(reply, self.disk.powered().and_then(|mut state| state.remove(parent.0, name, false)), |_ok| reply.ok());
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer!(reply, self.disk.powered().and_then(|mut state| state.remove(parent.0, name, true)), |_ok| reply.ok());
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result =
            self.disk.powered().and_then(|mut state| state.rename((parent.0, name), (newparent.0, newname), flags));
        answer!(reply, result, |_ok| reply.ok());
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self.disk.powered().and_then(|mut state| {
            state.file(ino.0)?;
            state.open_handles += 1;
            Ok(())
        });
        answer!(reply, result, |_ok| reply.opened(FileHandle(0), FopenFlags::empty()));
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.disk.powered().and_then(|mut state| {
            let attr = state.add(parent.0, name, Node::File(FileData::default()), mode & !umask)?;
            state.open_handles += 1;
            Ok(attr)
        });
        answer!(reply, result, |attr| reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::empty()));
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = self.disk.powered().and_then(|mut state| {
            let data = &state.file(ino.0)?.current;
            let from = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
            let to = from.saturating_add(size as usize).min(data.len());
            Ok(data[from..to].to_vec())
        });
        answer!(reply, result, |data| reply.data(&data));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.disk.powered().and_then(|mut state| {
            let at = self::offset(offset)?;
            state.file(ino.0)?.write(at, data)?;
            Ok(state.inode(ino.0)?.label.clone())
        });
        answer!(reply, result, |label| {
            self.disk.count(&label, |counts| {
                counts.writes += 1;
                counts.bytes_written += data.len() as u64;
            });
            reply.written(data.len() as u32)
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        answer!(reply, self.disk.powered(), |_state| reply.ok());
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.disk.release_handle();
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let result = self.disk.powered().and_then(|mut state| {
            state.file(ino.0)?.sync();
            Ok(state.inode(ino.0)?.label.clone())
        });
        answer!(reply, result, |label| {
            self.disk.count(&label, |counts| if datasync { counts.fdatasyncs += 1 } else { counts.fsyncs += 1 });
            reply.ok()
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self.disk.powered().and_then(|mut state| {
            state.entries(ino.0)?;
            state.open_handles += 1;
            Ok(())
        });
        answer!(reply, result, |_ok| reply.opened(FileHandle(0), FopenFlags::empty()));
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let result = self.disk.powered().and_then(|mut state| {
            // No "." and "..": the kernel does not need them.
            let entries = state.entries(ino.0)?.clone();
            let kind = |child| state.inodes.get(&child).map_or(FileType::RegularFile, |inode| inode.attr(child).kind);
            Ok(entries.into_iter().map(|(name, child)| (child, kind(child), name)).collect::<Vec<_>>())
        });
        answer!(reply, result, |listing| {
            for (i, (child, kind, name)) in listing.into_iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                    break;
                }
            }
            reply.ok()
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.disk.release_handle();
        reply.ok();
    }

    /// Names are durable at once here, so there is nothing to do but count.
    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let result = self.disk.powered().and_then(|mut state| Ok(format!("{}/", state.inode(ino.0)?.label)));
        answer!(reply, result, |label| {
            self.disk.count(&label, |counts| counts.fsyncs += 1);
            reply.ok()
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 64 GiB, all free: the WAL's own cap is what the test is about.
        let (blocks, files, block_size) = (1 << 24, 1 << 20, PAGE as u32);
        answer!(reply, self.disk.powered(), |_state| {
            reply.statfs(blocks, blocks, blocks, files, files, block_size, 255, block_size)
        });
    }
}

/// A mounted [`Disk`]. Dropping it unmounts (also when a test panics), so no stale mount stays behind.
pub struct Mount {
    session: Option<BackgroundSession>,
    disk: Disk,
    mountpoint: PathBuf,
}

impl Mount {
    pub fn new(disk: Disk, mountpoint: &Path) -> std::io::Result<Mount> {
        let mut config = fuser::Config::default();
        config.mount_options = vec![MountOption::FSName("lazyfs".into()), MountOption::NoAtime];
        let session = fuser::spawn_mount(LazyFs { disk: disk.clone() }, mountpoint, &config)?;
        Ok(Mount { session: Some(session), disk, mountpoint: mountpoint.to_path_buf() })
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Unmounts once the handles of the (killed) writers are released.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.unmount_now()
    }

    fn unmount_now(&mut self) -> std::io::Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        // Handles of a killed process are released asynchronously; umount(2) says EBUSY until they are.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.disk.open_handles() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let result = session.umount_and_join();
        if result.is_err() {
            // Still busy: detach it lazily rather than leave it mounted.
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
        result
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_now() {
            eprintln!("unmounting {}: {e}", self.mountpoint.display());
        }
    }
}
