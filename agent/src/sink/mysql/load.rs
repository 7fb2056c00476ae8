//! The bulk path: a batch's rows sent with `LOAD DATA LOCAL INFILE`, one statement per table, streamed from
//! memory, in the same transaction as the offsets row. The server spends about half the CPU per row it spends
//! on multi-row INSERTs.
//!
//! `LOCAL` implies `IGNORE`: a duplicate `event_id` or a value the server would convert becomes a warning and
//! a skipped or altered row, not an error. So a load is committed only when every row went in (affected rows
//! equal to the rows sent) with no warning at all; otherwise it is rolled back and the batch goes through the
//! INSERT path, which skips duplicates by `event_id` and fails on bad data (strict mode) so that the forwarder
//! can split the batch and dead-letter the record. A server that refuses LOCAL (`local_infile` OFF, MySQL 8's
//! default) switches `bulk = "auto"` to INSERT for the rest of the run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};

use bytes::Bytes;
use futures::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, TxOpts, Value};
use serde::{Deserialize, Serialize};
use telemetry_wal::Record;

use super::sql::{by_table, push_params, record_offset, Written};
use crate::event::Event;
use crate::identity::Identity;
use crate::ops::metrics::METRICS;

/// `[mysql] bulk`: how a batch's rows are sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bulk {
    /// LOAD DATA while the server takes it; INSERT from the first refusal on (logged once).
    #[default]
    Auto,
    /// Multi-row INSERTs only.
    Insert,
    /// LOAD DATA only: a refusal is an error, retried like a lost connection, until the server takes it.
    LoadData,
}

/// The path rows take now: `[mysql] bulk`, and whether the server refused LOAD DATA.
#[derive(Debug)]
pub struct WritePath {
    bulk: Bulk,
    /// Why the server refused LOAD DATA (auto: the first refusal, after which INSERT is used).
    refused: OnceLock<String>,
}

impl WritePath {
    pub fn new(bulk: Bulk) -> WritePath {
        WritePath { bulk, refused: OnceLock::new() }
    }

    fn tries_load_data(&self) -> bool {
        match self.bulk {
            Bulk::Insert => false,
            Bulk::LoadData => true,
            Bulk::Auto => self.refused.get().is_none(),
        }
    }

    /// `load_data` or `insert`.
    pub fn in_use(&self) -> &'static str {
        if self.tries_load_data() {
            "load_data"
        } else {
            "insert"
        }
    }

    /// The server refused LOAD DATA with `error`. With `auto`, INSERT from now on (said once); with
    /// `load_data`, an error that says what to change.
    fn refused(&self, error: mysql_async::Error) -> Result<(), mysql_async::Error> {
        let why = error.to_string();
        if self.bulk == Bulk::LoadData {
            return Err(mysql_async::Error::Other(
                format!(
                    "the server refuses LOAD DATA LOCAL INFILE ({why}); [mysql] bulk = \"load_data\" requires it: \
                     enable local_infile on the server, or set bulk = \"auto\""
                )
                .into(),
            ));
        }
        if self.refused.set(why.clone()).is_ok() {
            tracing::warn!(
                error = %why,
                "the server refuses LOAD DATA LOCAL INFILE (local_infile OFF?); writing rows with INSERT from now on"
            );
            METRICS.mysql_path("insert", Some(format!("LOAD DATA refused: {why}")));
        }
        Ok(())
    }
}

/// Loads `rows` and the offset in one transaction on `conn`, if `path` says so and the server takes it whole.
/// `None`: nothing was committed and the batch goes through INSERT (not tried, refused under `auto`, or rolled
/// back because the server skipped rows or warned).
pub(super) async fn load_rows(
    conn: &mut Conn,
    identity: &Identity,
    rows: &[(Record, Event)],
    path: &WritePath,
    offset: &impl Fn() -> u64,
) -> Result<Option<Written>, mysql_async::Error> {
    if !path.tries_load_data() {
        return Ok(None);
    }
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    for (table, columns, rows) in by_table(rows) {
        if rows.is_empty() {
            continue;
        }
        let file = InMemoryFile::new(tsv(&rows, identity));
        // The default field and line format: tab-separated, `\`-escaped, `\N` for NULL, a row per line.
        let sql = format!(
            "LOAD DATA LOCAL INFILE '{}' INTO TABLE {table} CHARACTER SET utf8mb4 ({})",
            file.name,
            columns.join(",")
        );
        if let Err(e) = tx.query_drop(sql).await {
            drop(file);
            if is_refusal(&e) {
                tx.rollback().await?;
                path.refused(e)?;
                return Ok(None);
            }
            return Err(e);
        }
        let (loaded, warnings) = (tx.affected_rows(), tx.get_warnings());
        if loaded != rows.len() as u64 || warnings != 0 {
            tracing::debug!(
                table,
                rows = rows.len(),
                loaded,
                warnings,
                first_seq = rows.first().map(|(r, _)| r.seq),
                "LOAD DATA skipped or changed rows (duplicates, conversions); rolling back and using INSERT for this batch"
            );
            tx.rollback().await?;
            METRICS.mysql_load_data_fallbacks.inc();
            return Ok(None);
        }
    }
    let offset = offset();
    record_offset(&mut tx, identity, offset).await?;
    tx.commit().await?;
    Ok(Some(Written { inserted: rows.len() as u64, already_present: 0, offset, loaded: true }))
}

/// The server (or a proxy before it) does not take LOCAL INFILE.
fn is_refusal(e: &mysql_async::Error) -> bool {
    match e {
        // 4166: the local infile capability is disabled (MariaDB 10.5+, local_infile OFF); 1148: the used
        // command is not allowed (older MariaDB and MySQL); 3948: loading local data is disabled (MySQL 8);
        // 2068: rejected by the client library (a proxy speaking for it).
        mysql_async::Error::Server(server) => matches!(server.code, 4166 | 1148 | 3948 | 2068),
        _ => false,
    }
}

/// The rows as LOAD DATA's default format, from the same values the INSERT path binds.
pub(super) fn tsv(rows: &[&(Record, Event)], identity: &Identity) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 160);
    let mut values = Vec::new();
    for (record, event) in rows {
        values.clear();
        push_params(&mut values, event, identity, record.seq);
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            push_field(&mut out, value);
        }
        out.push(b'\n');
    }
    out
}

fn push_field(out: &mut Vec<u8>, value: &Value) {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    let _ = match value {
        Value::NULL => out.write_all(b"\\N"),
        Value::Bytes(bytes) => {
            for &b in bytes {
                match b {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    0 => out.extend_from_slice(b"\\0"),
                    _ => out.push(b),
                }
            }
            Ok(())
        }
        Value::Int(v) => write!(out, "{v}"),
        Value::UInt(v) => write!(out, "{v}"),
        // The shortest text that reads back as the same double.
        Value::Double(v) => write!(out, "{v:?}"),
        Value::Float(v) => write!(out, "{v:?}"),
        Value::Date(year, month, day, hour, minute, second, micros) => {
            write!(out, "{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}.{micros:06}")
        }
        Value::Time(negative, days, hours, minutes, seconds, micros) => {
            let hours = u32::from(*hours) + days * 24;
            let sign = if *negative { "-" } else { "" };
            write!(out, "{sign}{hours:02}:{minutes:02}:{seconds:02}.{micros:06}")
        }
    };
}

/// The data of the LOAD DATA statements in flight, by the name each statement asks for.
static FILES: LazyLock<Mutex<HashMap<String, Bytes>>> = LazyLock::new(Mutex::default);
static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

/// A statement's data, registered under a unique name for as long as the statement runs.
struct InMemoryFile {
    name: String,
}

impl InMemoryFile {
    fn new(data: Vec<u8>) -> InMemoryFile {
        let name = format!("telemetry-agent-{}", NEXT_FILE.fetch_add(1, Ordering::Relaxed));
        lock_files().insert(name.clone(), Bytes::from(data));
        InMemoryFile { name }
    }
}

impl Drop for InMemoryFile {
    fn drop(&mut self) {
        lock_files().remove(&self.name);
    }
}

fn lock_files() -> std::sync::MutexGuard<'static, HashMap<String, Bytes>> {
    FILES.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bytes per packet of file data (each must fit the server's max_allowed_packet).
const PIECE_BYTES: usize = 64 * 1024;

/// The pool's LOCAL INFILE handler: serves only the in-memory files above, never the file system, whatever
/// name the server asks for.
pub(super) fn infile_handler(
    name: &[u8],
) -> futures::future::BoxFuture<'static, Result<mysql_async::InfileData, mysql_async::LocalInfileError>> {
    let data = std::str::from_utf8(name).ok().and_then(|name| lock_files().get(name).cloned());
    let name = String::from_utf8_lossy(name).into_owned();
    Box::pin(async move {
        let data = data.ok_or_else(|| {
            mysql_async::LocalInfileError::OtherError(format!("no such in-memory LOAD DATA file: {name}").into())
        })?;
        let pieces: Vec<std::io::Result<Bytes>> = (0..data.len())
            .step_by(PIECE_BYTES)
            .map(|at| Ok(data.slice(at..(at + PIECE_BYTES).min(data.len()))))
            .collect();
        Ok(futures::stream::iter(pieces).boxed())
    })
}
