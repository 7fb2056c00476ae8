//! The Unix-socket ingest server: a [`Listener`] accepts, a [`Handler`] per connection reads NDJSON lines,
//! appends each event to the WAL and answers every line, in order, once its event is durable.
//!
//! Shutdown follows tokio's mini-redis: a broadcast tells handlers to stop reading; each holds a clone of
//! an mpsc sender, so the listener knows every handler finished when the channel closes.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use telemetry_wal::{Appender, Pending, WalError};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Decoder, FramedRead};

use crate::event::{effective_event_id, now_us, parse_line, Event, Rejection};
use crate::metrics::{Kind, METRICS};

/// What every handler needs, shared.
pub struct IngestContext {
    pub appender: Appender,
    pub agent_id: String,
    pub max_line_bytes: usize,
    pub max_pending: usize,
    /// Bytes of events read but not yet answered, across all connections: bounds memory whatever clients do.
    pub inflight_bytes: Arc<Semaphore>,
    pub overload_timeout: Duration,
    /// `None`: idle connections stay open.
    pub idle_timeout: Option<Duration>,
}

/// How long, after SIGTERM, answers may take to reach clients that do not read them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Lines end with `\n`. Bytes left without one when the stream ends are a line cut off by a dropped
/// connection: they are discarded, never parsed (tokio's codec would hand them out as a last line).
struct LineCodec(AnyDelimiterCodec);

impl Decoder for LineCodec {
    type Item = Bytes;
    type Error = AnyDelimiterCodecError;

    fn decode(&mut self, buf: &mut bytes::BytesMut) -> Result<Option<Bytes>, Self::Error> {
        self.0.decode(buf)
    }

    fn decode_eof(&mut self, buf: &mut bytes::BytesMut) -> Result<Option<Bytes>, Self::Error> {
        let line = self.0.decode(buf)?;
        if line.is_none() && !buf.is_empty() {
            tracing::debug!(bytes = buf.len(), "discarding an incomplete last line");
            buf.clear();
        }
        Ok(line)
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
            let handler = Handler {
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
    context: Arc<IngestContext>,
    shutdown: broadcast::Receiver<()>,
    _shutdown_complete: mpsc::Sender<()>,
}

/// An answer in the making, queued in line order.
enum Reply {
    Ready(Vec<u8>),
    Durable { pending: Pending, event_id: Option<String>, profile_id: String, _inflight: OwnedSemaphorePermit },
}

impl Handler {
    async fn run(mut self, stream: UnixStream) {
        let _connected = ConnectionCount::new();
        let (read, write) = stream.into_split();
        let codec = AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), self.context.max_line_bytes);
        let mut lines = FramedRead::new(read, LineCodec(codec));
        // Bounded: a client that does not read its answers stops being read, and memory stays bounded.
        let (replies_tx, replies_rx) = mpsc::channel(self.context.max_pending);
        let writer = tokio::spawn(write_replies(write, replies_rx, self.context.clone()));

        loop {
            let idle = async {
                match self.context.idle_timeout {
                    Some(timeout) => tokio::time::sleep(timeout).await,
                    None => std::future::pending().await,
                }
            };
            let reply = tokio::select! {
                line = lines.next() => match line {
                    Some(Ok(line)) => self.handle_line(line).await,
                    Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded)) => {
                        let max = self.context.max_line_bytes;
                        tracing::warn!(max_line_bytes = max, "line too long; closing the connection");
                        let _ = replies_tx
                            .send(Reply::Ready(error_line("line_too_long", &format!("line exceeds {max} bytes; closing the connection"))))
                            .await;
                        break;
                    }
                    Some(Err(AnyDelimiterCodecError::Io(e))) => {
                        tracing::debug!(error = %e, "read failed");
                        break;
                    }
                    // End of stream. A trailing line without its newline is incomplete: it is not stored.
                    None => break,
                },
                _ = self.shutdown.recv() => {
                    // Answer the complete lines already read into our buffer, then stop reading. (Polling the
                    // socket for more would let a client that never stops writing hold up the shutdown.)
                    let already_read = lines.read_buffer().iter().filter(|&&b| b == b'\n').count();
                    for _ in 0..already_read {
                        let line = error_line("shutting_down", "the agent is shutting down; resend to the restarted agent");
                        if replies_tx.send(Reply::Ready(line)).await.is_err() {
                            break;
                        }
                    }
                    break;
                }
                () = idle => {
                    tracing::debug!("closing idle connection");
                    break;
                }
            };
            // A client that does not read its answers fills this queue; shutdown must not wait on it.
            tokio::select! {
                sent = replies_tx.send(reply) => if sent.is_err() { break }, // The client is gone.
                _ = self.shutdown.recv() => break,
            }
        }
        drop(replies_tx);
        // Answers for events already durable go out, within a grace period once shutdown has begun.
        let mut writer = writer;
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
        let event = match parse_line(&line, now_us()) {
            Ok(event) => event,
            Err(Rejection { code, error }) => {
                tracing::warn!(code, error = %error, "rejected a line");
                return Reply::Ready(error_line(code, &error));
            }
        };
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
                _inflight: permit,
            },
            Ok(Some((_, Err(e)))) => Reply::Ready(wal_error_line(&e, event.profile_id())),
            Ok(None) => Reply::Ready(error_line("shutting_down", "the agent is shutting down")),
            Err(_) => {
                tracing::warn!(profile_id = event.profile_id(), "ingest queue full; answered overloaded");
                Reply::Ready(error_line("overloaded", "the agent cannot keep up; retry later"))
            }
        }
    }
}

/// Answers replies in order, flushing whenever no further answer is ready.
async fn write_replies(write: OwnedWriteHalf, mut replies: mpsc::Receiver<Reply>, context: Arc<IngestContext>) {
    let mut out = BufWriter::new(write);
    while let Some(reply) = replies.recv().await {
        let line = match reply {
            Reply::Ready(line) => line,
            Reply::Durable { pending, event_id, profile_id, _inflight } => match pending.durable().await {
                Ok(seq) => {
                    METRICS.acks.inc();
                    let event_id = effective_event_id(event_id.as_deref(), &context.agent_id, seq);
                    json_line(&Ack { ok: true, seq, event_id: &event_id })
                }
                Err(e) => wal_error_line(&e, &profile_id),
            },
        };
        if out.write_all(&line).await.is_err() {
            return;
        }
        if replies.is_empty() && out.flush().await.is_err() {
            return;
        }
    }
    let _ = out.flush().await;
    let _ = out.shutdown().await;
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
