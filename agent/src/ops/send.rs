//! `telemetry-agent send`: NDJSON lines from stdin to the ingest socket, each answer matched to its line.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Pipelines stdin's lines to the agent and matches each answer to its line number.
pub async fn send_stdin(socket: &Path) -> anyhow::Result<ExitCode> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to the agent at {} (is it running?)", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let (numbers_tx, mut numbers_rx) = tokio::sync::mpsc::channel::<usize>(64 * 1024);
    let sender = tokio::spawn(async move {
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        let mut number = 0;
        while let Some(line) = stdin.next_line().await.context("cannot read stdin")? {
            number += 1;
            if line.trim().is_empty() {
                continue;
            }
            write.write_all(line.as_bytes()).await.context("cannot write to the agent")?;
            write.write_all(b"\n").await.context("cannot write to the agent")?;
            if numbers_tx.send(number).await.is_err() {
                break;
            }
        }
        write.shutdown().await.context("cannot finish writing to the agent")?;
        anyhow::Ok(())
    });

    let mut answers = BufReader::new(read).lines();
    let (mut acked, mut failed) = (0u64, 0u64);
    let mut stderr = std::io::stderr().lock();
    while let Some(number) = numbers_rx.recv().await {
        let Some(answer) = answers.next_line().await.context("cannot read the agent's answer")? else {
            failed += 1;
            writeln!(stderr, "line {number}: no answer: the agent closed the connection")?;
            while let Some(number) = numbers_rx.recv().await {
                failed += 1;
                writeln!(stderr, "line {number}: no answer: the agent closed the connection")?;
            }
            break;
        };
        let parsed: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
        if parsed["ok"] == true {
            acked += 1;
        } else {
            failed += 1;
            let code = parsed["code"].as_str().unwrap_or("?");
            let error = parsed["error"].as_str().unwrap_or(&answer);
            writeln!(stderr, "line {number}: {code}: {error}")?;
        }
    }
    if let Ok(Err(e)) = sender.await {
        writeln!(stderr, "{e:#}")?;
        failed += 1;
    }
    println!("{acked} acked, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
