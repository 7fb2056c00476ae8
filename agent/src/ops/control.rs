//! The control socket: `telemetry-agent status` and `telemetry-agent wal ...` reach the running agent here
//! (sled lets only one process open the WAL). One request line per connection, answered by a stream of
//! [`commands::Output`] lines.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::ops::commands::{self, Output, Request};

/// The longest request line taken.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// Operator commands at once; more wait for their turn.
const MAX_COMMANDS: usize = 8;
/// A request must arrive within this: the CLI sends it at once, so a silent connection is not an operator.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Each answer line must be taken within this.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn serve(listener: UnixListener, context: commands::Context, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_COMMANDS));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let (context, slots) = (context.clone(), slots.clone());
        tokio::spawn(handle(stream, context, slots));
    }
}

async fn handle(stream: UnixStream, context: commands::Context, slots: Arc<Semaphore>) {
    let (read, write) = stream.into_split();
    let mut line = String::new();
    let mut out = BufWriter::new(write);
    // The request is read before a command slot is taken: connections that send nothing hold no slot.
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES));
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Err(format!("no request within {} s", REQUEST_TIMEOUT.as_secs())),
        Ok(read) => read
            .map_err(|e| e.to_string())
            .and_then(|_| serde_json::from_str::<Request>(&line).map_err(|e| format!("not a control request: {e}"))),
    };
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            tracing::debug!(error, "control connection without a valid request");
            let _ = tokio::time::timeout(IO_TIMEOUT, async {
                let _ = write_output(&mut out, &Output::Error { error }).await;
                let _ = out.flush().await;
            })
            .await;
            return;
        }
    };
    let Ok(_slot) = slots.acquire_owned().await else { return };
    tracing::info!(?request, "control request");
    let (tx, mut rx) = mpsc::channel(1024);
    let task = tokio::spawn(commands::execute(request, context, tx));
    while let Some(output) = rx.recv().await {
        let written = async {
            write_output(&mut out, &output).await?;
            if rx.is_empty() {
                out.flush().await?;
            }
            std::io::Result::Ok(())
        };
        // The operator went away or stopped reading: stop the command (a dump stops at its next event).
        if !matches!(tokio::time::timeout(IO_TIMEOUT, written).await, Ok(Ok(()))) {
            break;
        }
    }
    drop(rx);
    let _ = task.await;
    let _ = out.flush().await;
}

async fn write_output(out: &mut BufWriter<tokio::net::unix::OwnedWriteHalf>, output: &Output) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(output).unwrap_or_default();
    line.push(b'\n');
    out.write_all(&line).await
}
