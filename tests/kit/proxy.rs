//! A TCP proxy that injects faults between the agent and a server: it cuts every connection, refuses new
//! ones, or stalls them, and counts them. It runs on a runtime of its own, so that sync tests and async
//! benches alike can use it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct FaultProxy {
    pub port: u16,
    state: Arc<ProxyState>,
    /// `None` only while dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

#[derive(Default)]
struct ProxyState {
    /// Bumped by `cut`: connections of an older generation close.
    generation: AtomicU64,
    /// While set, new connections are closed at once.
    down: AtomicBool,
    /// While set, no bytes are forwarded (connections hang).
    stalled: AtomicBool,
    accepted: AtomicU64,
    open: AtomicU64,
    max_open: AtomicU64,
}

impl FaultProxy {
    pub fn start(target: SocketAddr) -> FaultProxy {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let state = Arc::new(ProxyState::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept_state = state.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                accept_state.accepted.fetch_add(1, Ordering::Relaxed);
                if accept_state.down.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                tokio::spawn(forward(client, target, accept_state.clone()));
            }
        });
        FaultProxy { port, state, runtime: Some(runtime) }
    }

    /// Closes every open connection (mid-transaction, as a network cut would).
    pub fn cut(&self) {
        self.state.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Down: new connections are closed at once, and open ones are cut.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::Relaxed);
        if down {
            self.cut();
        }
    }

    pub fn set_stalled(&self, stalled: bool) {
        self.state.stalled.store(stalled, Ordering::Relaxed);
    }

    /// The most connections that were open through the proxy at once.
    pub fn max_open(&self) -> u64 {
        self.state.max_open.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Without waiting: a bench drops its proxy inside its own runtime, where blocking is not allowed.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// One connection through the proxy, until either side closes it or a cut.
async fn forward(client: tokio::net::TcpStream, target: SocketAddr, state: Arc<ProxyState>) {
    let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
    // Without this, Nagle and delayed ACKs add 40 ms to every statement.
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let generation = state.generation.load(Ordering::Relaxed);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let open = state.open.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_open.fetch_max(open, Ordering::SeqCst);
    let up = tokio::spawn(pump(client_read, server_write, state.clone(), generation));
    let down = tokio::spawn(pump(server_read, client_write, state.clone(), generation));
    let _ = tokio::join!(up, down);
    state.open.fetch_sub(1, Ordering::SeqCst);
}

/// Forwards one direction of a connection of `generation`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<ProxyState>,
    generation: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let alive = |state: &ProxyState| state.generation.load(Ordering::Relaxed) == generation;
    let mut buf = vec![0u8; 16 * 1024];
    // Bytes read but held back while stalled, forwarded in order once the stall ends.
    let mut held: Vec<u8> = Vec::new();
    loop {
        let read = tokio::time::timeout(Duration::from_millis(20), from.read(&mut buf)).await;
        if !alive(&state) {
            return;
        }
        match read {
            Err(_) => {}
            // The sender closed: the pair goes (so that the open count follows the agent's own connections,
            // also while stalled).
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => held.extend_from_slice(&buf[..n]),
        }
        if held.is_empty() || state.stalled.load(Ordering::Relaxed) {
            if std::env::var_os("PROXY_LINGER").is_some() {
                // The old behaviour: a stalled pair does not notice the sender leaving.
                while state.stalled.load(Ordering::Relaxed) && alive(&state) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            continue;
        }
        if to.write_all(&held).await.is_err() {
            return;
        }
        held.clear();
    }
}
