//! The Unix-socket ingest server: a [`Listener`] accepts, a [`Handler`] per connection reads NDJSON lines,
//! appends each event to the WAL and answers every line, in order, once its event is durable.
//!
//! Shutdown follows tokio's mini-redis: a broadcast tells handlers to stop reading; each holds a clone of
//! an mpsc sender, so the listener knows every handler finished when the channel closes. A line whose event
//! was appended is always answered (within the grace period): shutdown stops reading, never answering.

use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::{Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use serde::Serialize;
use telemetry_wal::{Appender, Pending, WalError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::clock::now_us;
use crate::event::{parse_line, Event, Rejection};
use crate::identity::Identity;
use crate::ops::metrics::{Kind, METRICS};

/// What every handler needs, shared.
pub struct IngestContext {
    pub appender: Appender,
    /// Names the events that come without an `event_id`.
    pub identity: Arc<Identity>,
    pub max_line_bytes: usize,
    pub max_pending: usize,
    /// Bytes of events read but not yet durable, and of lines not yet complete, across all connections:
    /// bounds memory whatever clients do.
    pub inflight_bytes: Arc<Semaphore>,
    pub overload_timeout: Duration,
    /// `None`: idle connections stay open.
    pub idle_timeout: Option<Duration>,
    /// A connection whose answers wait this long without the client reading any is closed.
    pub answer_timeout: Duration,
    /// `[ingest] max_future_secs`
    pub max_future_secs: u64,
}

/// How long, after SIGTERM, answers may take to reach clients that do not read them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// After `line_too_long` the rest of the line is read and dropped, so that a client still writing it gets
/// no EPIPE and can read the answer; at most this many bytes...
const DISCARD_MAX_BYTES: usize = 16 << 20;
/// ...and for at most this long.
const DISCARD_MAX_TIME: Duration = Duration::from_secs(5);

/// Bytes read from a socket at once: a line's bytes are counted in `inflight_bytes` at this granularity.
const READ_CHUNK: usize = 8 * 1024;

/// Written bytes at the front of the answer buffer are dropped beyond this.
const COMPACT_BYTES: usize = 64 * 1024;

/// Splits a connection's bytes into lines, which end with `\n`. The bytes of a line not yet complete count
/// in `inflight_bytes`: thousands of clients each midway through a long line must not grow memory unbounded.
struct LineReader {
    read: OwnedReadHalf,
    buf: BytesMut,
    /// `buf[..scanned]` holds no newline.
    scanned: usize,
    max_line_bytes: usize,
    budget: Arc<Semaphore>,
    /// Permits for the bytes held in `buf`.
    held: Option<OwnedSemaphorePermit>,
    /// A too-long line was cut off before its newline; its rest is still to come.
    in_long_line: bool,
}

enum Read {
    Line(Bytes),
    TooLong,
    /// The buffered bytes of an incomplete line found no room in `inflight_bytes` in time.
    Overloaded,
    /// End of stream. Bytes left without a newline are a line cut off by a dropped connection: discarded.
    End,
}

impl LineReader {
    fn new(read: OwnedReadHalf, context: &IngestContext) -> LineReader {
        LineReader {
            read,
            buf: BytesMut::new(),
            scanned: 0,
            max_line_bytes: context.max_line_bytes,
            budget: context.inflight_bytes.clone(),
            held: None,
            in_long_line: false,
        }
    }

    /// The next line. Cancel-safe: whatever was read stays buffered.
    async fn next(&mut self, overload_timeout: Duration) -> io::Result<Read> {
        loop {
            if let Some(at) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + at;
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                self.scanned = 0;
                self.release_beyond(self.buf.len());
                if line.len() > self.max_line_bytes {
                    return Ok(Read::TooLong);
                }
                return Ok(Read::Line(line.freeze()));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max_line_bytes {
                self.in_long_line = true;
                self.clear();
                return Ok(Read::TooLong);
            }
            if !self.charge(self.buf.len(), overload_timeout).await {
                self.clear();
                return Ok(Read::Overloaded);
            }
            self.buf.reserve(READ_CHUNK);
            if (&mut self.read).take(READ_CHUNK as u64).read_buf(&mut self.buf).await? == 0 {
                if !self.buf.is_empty() {
                    tracing::debug!(bytes = self.buf.len(), "discarding an incomplete last line");
                }
                self.clear();
                return Ok(Read::End);
            }
        }
    }

    /// After [`Read::TooLong`]: reads and drops the rest of that line, within [`DISCARD_MAX_BYTES`] and
    /// [`DISCARD_MAX_TIME`]. True if its newline came.
    async fn discard_rest(&mut self) -> bool {
        if !self.in_long_line {
            return true;
        }
        let discard = async {
            let mut discarded = 0;
            while discarded < DISCARD_MAX_BYTES {
                self.buf.clear();
                self.buf.reserve(READ_CHUNK);
                match (&mut self.read).take(READ_CHUNK as u64).read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(_) if self.buf.contains(&b'\n') => return true,
                    Ok(n) => discarded += n,
                }
            }
            false
        };
        let ended = tokio::time::timeout(DISCARD_MAX_TIME, discard).await.unwrap_or(false);
        self.in_long_line = false;
        self.clear();
        ended
    }

    /// Complete lines buffered and not yet handed out.
    fn complete_lines(&self) -> usize {
        self.buf.iter().filter(|&&b| b == b'\n').count()
    }

    /// Holds permits for `bytes` buffered; false if they cannot be had within `timeout`.
    async fn charge(&mut self, bytes: usize, timeout: Duration) -> bool {
        let held = self.held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        if bytes <= held {
            return true;
        }
        // At most a line plus one read: always fits.
        let more = u32::try_from(bytes - held).unwrap_or(u32::MAX);
        match tokio::time::timeout(timeout, self.budget.clone().acquire_many_owned(more)).await {
            Ok(Ok(permit)) => {
                match &mut self.held {
                    Some(held) => held.merge(permit),
                    None => self.held = Some(permit),
                }
                true
            }
            _ => false,
        }
    }

    fn release_beyond(&mut self, bytes: usize) {
        if let Some(held) = &mut self.held {
            let extra = held.num_permits().saturating_sub(bytes);
            if extra > 0 {
                drop(held.split(extra));
            }
        }
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.scanned = 0;
        self.release_beyond(0);
    }
}

/// Binds the socket: replaces a stale socket file only if nothing answers on it, then sets its group and mode.
pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket; refusing to replace it", path.display());
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!("another agent is already listening on {}; stop it first", path.display()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "removing stale socket file");
                std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            }
            Err(e) => bail!("cannot tell whether {} is in use: {e}", path.display()),
        }
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // Created 0600, then widened to `mode`: nobody connects in between with permissions not meant for them.
    let umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(umask);
    let listener = bound.with_context(|| format!("cannot bind {}", path.display()))?;
    // The group first: widened to 0660 while the old group still owned it, its members could connect.
    if let Some(group) = group {
        let gid = nix::unistd::Group::from_name(group)
            .with_context(|| format!("cannot look up group {group}"))?
            .with_context(|| format!("no group named {group}"))?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {group}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set mode {mode:o} on {}", path.display()))?;
    Ok(listener)
}

pub struct Listener {
    listener: UnixListener,
    context: Arc<IngestContext>,
    limit: Arc<Semaphore>,
    notify_shutdown: broadcast::Sender<()>,
    shutdown_complete_tx: mpsc::Sender<()>,
    shutdown_complete_rx: mpsc::Receiver<()>,
}

impl Listener {
    pub fn new(listener: UnixListener, context: Arc<IngestContext>, max_connections: usize) -> Listener {
        let (notify_shutdown, _) = broadcast::channel(1);
        let (shutdown_complete_tx, shutdown_complete_rx) = mpsc::channel(1);
        Listener {
            listener,
            context,
            limit: Arc::new(Semaphore::new(max_connections)),
            notify_shutdown,
            shutdown_complete_tx,
            shutdown_complete_rx,
        }
    }

    /// Serves until `shutdown` resolves, then waits until every connection has been answered and closed.
    pub async fn serve(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::select! {
            () = self.accept_loop() => {}
            () = shutdown => tracing::info!("shutting down: no new connections, answering what was read"),
        }
        let Listener { notify_shutdown, shutdown_complete_tx, mut shutdown_complete_rx, .. } = self;
        drop(notify_shutdown);
        drop(shutdown_complete_tx);
        let _ = shutdown_complete_rx.recv().await;
    }

    async fn accept_loop(&mut self) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                tracing::warn!(limit = self.limit.available_permits(), "connection refused: connection limit reached");
                tokio::spawn(refuse(stream));
                continue;
            };
            // Kernel-verified: only the agent's own user and root (operators) may send generated ids.
            let operator =
                stream.peer_cred().is_ok_and(|peer| peer.uid() == 0 || peer.uid() == nix::unistd::geteuid().as_raw());
            let handler = Handler {
                operator,
                context: self.context.clone(),
                shutdown: self.notify_shutdown.subscribe(),
                _shutdown_complete: self.shutdown_complete_tx.clone(),
            };
            tokio::spawn(async move {
                handler.run(stream).await;
                drop(permit);
            });
        }
    }
}

async fn refuse(mut stream: UnixStream) {
    let line = error_line("overloaded", "connection limit reached ([ingest] max_connections); retry later");
    let _ = stream.write_all(&line).await;
    let _ = stream.shutdown().await;
}

struct Handler {
    /// The peer runs as root or as the agent's user, so it may send events under generated ids (a dump
    /// sent again); scripts may not, or they could take another event's id.
    operator: bool,
    context: Arc<IngestContext>,
    shutdown: broadcast::Receiver<()>,
    _shutdown_complete: mpsc::Sender<()>,
}

/// An answer in the making, queued in line order.
enum Reply {
    Ready(Vec<u8>),
    Durable { pending: Pending, event_id: Option<String>, profile_id: String, inflight: OwnedSemaphorePermit },
}

/// A reply with the slot of its line (see `Handler::run`); `shutting_down` answers take none.
type Queued = (Reply, Option<OwnedSemaphorePermit>);

impl Handler {
    async fn run(mut self, stream: UnixStream) {
        let _connected = ConnectionCount::new();
        let (read, write) = stream.into_split();
        let mut lines = LineReader::new(read, &self.context);
        // A slot per line read and not yet answered: a client that does not read its answers stops being read.
        let slots = Arc::new(Semaphore::new(self.context.max_pending));
        // Unbounded because the slots bound it: queuing an answer never waits, so it is never given up.
        let (replies_tx, replies_rx) = mpsc::unbounded_channel::<Queued>();
        let mut writer = tokio::spawn(write_replies(write, replies_rx, self.context.clone()));
        let mut stopping = false;

        // Shutdown comes first in each `select!` (`biased`): once it has begun, no further line is read.
        // Only reading races it; an appended event's answer is queued unconditionally below.
        loop {
            let slot = tokio::select! {
                biased;
                _ = self.shutdown.recv() => {
                    stopping = true;
                    break;
                }
                // The writer gave up on this client.
                () = replies_tx.closed() => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let idle = async {
                match self.context.idle_timeout {
                    Some(timeout) => tokio::time::sleep(timeout).await,
                    None => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                biased;
                _ = self.shutdown.recv() => {
                    stopping = true;
                    break;
                }
                () = replies_tx.closed() => break,
                read = lines.next(self.context.overload_timeout) => read,
                () = idle => {
                    tracing::debug!("closing idle connection");
                    break;
                }
            };
            let reply = match read {
                Ok(Read::Line(line)) => self.handle_line(line).await,
                Ok(Read::TooLong) => {
                    let max = self.context.max_line_bytes;
                    tracing::warn!(
                        code = "line_too_long",
                        max_line_bytes = max,
                        "line too long; closing the connection"
                    );
                    let error = format!("line exceeds {max} bytes; closing the connection");
                    let _ = replies_tx.send((Reply::Ready(error_line("line_too_long", &error)), Some(slot)));
                    // Closing while the client still writes that line would fail its write before it reads the
                    // answer: take the rest of the line first (bounded).
                    tokio::select! {
                        biased;
                        _ = self.shutdown.recv() => {}
                        _ = lines.discard_rest() => {}
                    }
                    break;
                }
                Ok(Read::Overloaded) => {
                    tracing::warn!(
                        code = "overloaded",
                        "an incomplete line found no room in max_inflight_bytes; closing the connection"
                    );
                    let error = "the agent cannot keep up ([ingest] max_inflight_bytes); retry later";
                    let _ = replies_tx.send((Reply::Ready(error_line("overloaded", error)), Some(slot)));
                    break;
                }
                Ok(Read::End) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "read failed");
                    break;
                }
            };
            if matches!(reply, Reply::Durable { .. }) {
                if let Some(ms) = after_store_hold() {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
            if replies_tx.send((reply, Some(slot))).is_err() {
                break; // The client is gone.
            }
        }
        if stopping {
            // Complete lines already read into our buffer are answered, not stored. (Polling the socket for more
            // would let a client that never stops writing hold up the shutdown.)
            for _ in 0..lines.complete_lines() {
                let line = error_line("shutting_down", "the agent is shutting down; resend to the restarted agent");
                if replies_tx.send((Reply::Ready(line), None)).is_err() {
                    break;
                }
            }
        }
        drop(replies_tx);
        // Answers for events already appended go out, within a grace period once shutdown has begun.
        tokio::select! {
            _ = &mut writer => {}
            _ = async {
                let _ = self.shutdown.recv().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!("a client did not read its answers during shutdown; closing it");
                writer.abort();
            }
        }
    }

    async fn handle_line(&self, line: Bytes) -> Reply {
        let event = match parse_line(&line, now_us(), self.context.max_future_secs) {
            Ok(event) => event,
            Err(Rejection { code, error }) => {
                tracing::warn!(code, error = %error, "rejected a line");
                return Reply::Ready(error_line(code, &error));
            }
        };
        drop(line);
        if !self.operator && event.client_event_id().is_some_and(crate::identity::is_generated_id) {
            let error = "`event_id` values starting with `~` are reserved for ids the agent generates";
            tracing::warn!(code = "invalid_event", profile_id = event.profile_id(), error, "rejected a line");
            return Reply::Ready(error_line("invalid_event", error));
        }
        let kind = match event {
            Event::Metric(_) => "metric",
            Event::Trade(_) => "trade",
        };
        METRICS.events_received.get_or_create(&Kind { kind }).inc();
        let payload = event.encode();
        let admitted = async {
            // Lines are at most 96 KiB, so a permit count always fits.
            let bytes = u32::try_from(payload.len()).unwrap_or(u32::MAX);
            let permit = self.context.inflight_bytes.clone().acquire_many_owned(bytes).await.ok()?;
            let pending = self.context.appender.append(payload).await;
            Some((permit, pending))
        };
        match tokio::time::timeout(self.context.overload_timeout, admitted).await {
            Ok(Some((permit, Ok(pending)))) => Reply::Durable {
                pending,
                event_id: event.client_event_id().map(str::to_string),
                profile_id: event.profile_id().to_string(),
                inflight: permit,
            },
            Ok(Some((_, Err(e)))) => Reply::Ready(wal_error_line(&e, event.profile_id())),
            Ok(None) => Reply::Ready(error_line("shutting_down", "the agent is shutting down")),
            Err(_) => {
                tracing::warn!(
                    code = "overloaded",
                    profile_id = event.profile_id(),
                    "ingest queue full; answered overloaded"
                );
                Reply::Ready(error_line("overloaded", "the agent cannot keep up; retry later"))
            }
        }
    }
}

/// Test hook: `FAILPOINTS=ingest::after_store=return(MS)` holds a stored event's answer back for MS ms, so
/// that a test can start the shutdown exactly there.
fn after_store_hold() -> Option<u64> {
    fail::fail_point!("ingest::after_store", |ms: Option<String>| ms.and_then(|ms| ms.parse().ok()));
    None
}

/// Waits until a reply's event is durable and gives its answer line. The event's bytes leave
/// `inflight_bytes` here, as soon as it is durable, whether or not the client reads its answers.
async fn resolve(reply: Reply, identity: &Identity) -> Vec<u8> {
    match reply {
        Reply::Ready(line) => line,
        Reply::Durable { pending, event_id, profile_id, inflight } => {
            let durable = pending.durable().await;
            drop(inflight);
            match durable {
                Ok(seq) => {
                    METRICS.acks.inc();
                    let event_id = identity.event_id(event_id.as_deref(), seq);
                    json_line(&Ack { ok: true, seq, event_id: &event_id })
                }
                Err(e) => wal_error_line(&e, &profile_id),
            }
        }
    }
}

/// Answers replies in line order. Events are waited on while earlier answers are being written, so a client
/// that does not read holds only its answers (and its slots), never in-flight event bytes. Everything ready
/// goes out in one write; a client that takes none of it for `answer_timeout` is closed.
async fn write_replies(
    mut write: OwnedWriteHalf,
    mut replies: mpsc::UnboundedReceiver<Queued>,
    context: Arc<IngestContext>,
) {
    let mut resolving = FuturesOrdered::new();
    // Answers not yet written are `out[written..]`; each line's slot is released once it is written.
    let mut out: Vec<u8> = Vec::new();
    let mut written = 0;
    let mut slots: VecDeque<(usize, Option<OwnedSemaphorePermit>)> = VecDeque::new();
    let mut progress = Instant::now();
    let mut open = true;
    loop {
        if !open && resolving.is_empty() && written == out.len() {
            break;
        }
        tokio::select! {
            biased;
            reply = replies.recv(), if open => match reply {
                Some((reply, slot)) => {
                    let context = context.clone();
                    resolving.push_back(async move { (resolve(reply, &context.identity).await, slot) });
                }
                None => open = false,
            },
            Some((line, slot)) = resolving.next(), if !resolving.is_empty() => {
                if written == out.len() {
                    progress = Instant::now();
                }
                out.extend_from_slice(&line);
                slots.push_back((out.len(), slot));
            }
            result = write.write(&out[written..]), if written < out.len() => match result {
                Ok(0) | Err(_) => return, // The client is gone.
                Ok(n) => {
                    written += n;
                    progress = Instant::now();
                    while slots.front().is_some_and(|(end, _)| *end <= written) {
                        slots.pop_front();
                    }
                    if written == out.len() || written >= COMPACT_BYTES {
                        out.drain(..written);
                        slots.iter_mut().for_each(|(end, _)| *end -= written);
                        written = 0;
                    }
                }
            },
            () = tokio::time::sleep_until(progress + context.answer_timeout), if written < out.len() => {
                tracing::warn!(
                    timeout_secs = context.answer_timeout.as_secs(),
                    unwritten_bytes = out.len() - written,
                    "a client did not read its answers; closing it"
                );
                return;
            }
        }
    }
    let _ = write.shutdown().await;
}

fn wal_error_line(e: &WalError, profile_id: &str) -> Vec<u8> {
    let code = match e {
        WalError::Full { .. } => "wal_full",
        WalError::Closed => "shutting_down",
        // The agent stops itself after a WAL failure; a restarted agent takes the event.
        WalError::TooLarge { .. } => "invalid_event",
        _ => "internal",
    };
    tracing::warn!(code, profile_id, error = %e, "event not stored");
    error_line(code, &e.to_string())
}

#[derive(Serialize)]
struct Ack<'a> {
    ok: bool,
    seq: u64,
    event_id: &'a str,
}

#[derive(Serialize)]
struct Failure<'a> {
    ok: bool,
    code: &'a str,
    error: &'a str,
}

/// Every error answer goes through here, so the count by code is complete.
fn error_line(code: &'static str, error: &str) -> Vec<u8> {
    METRICS.error(code);
    json_line(&Failure { ok: false, code, error })
}

fn json_line(value: &impl Serialize) -> Vec<u8> {
    // Structs of strings and integers always serialize.
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Counts a connection in `clients_connected` for as long as it lives.
struct ConnectionCount;

impl ConnectionCount {
    fn new() -> ConnectionCount {
        METRICS.clients_connected.inc();
        ConnectionCount
    }
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        METRICS.clients_connected.dec();
    }
}
