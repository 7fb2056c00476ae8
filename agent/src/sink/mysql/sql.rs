//! The rows: how events become multi-row INSERTs into `dd_metrics` and `dd_trade_performance`, and the
//! offsets in `telemetry_run_offsets`. Every path that writes rows (the forwarder, `wal replay`) writes
//! them through [`write_rows`]: rows and offset in one transaction, a re-sent event a no-op by its
//! `event_id`.

use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Pool, TxOpts, Value};
use telemetry_wal::Record;

use super::load::{load_rows, WritePath};
use super::SINK;
use crate::event::{Event, Side};
use crate::identity::Identity;

/// Statement sizes: a batch is cut into statements of these row counts, so a handful of prepared
/// statements per table serve every batch length, and a typical batch needs a few round trips.
const CHUNK_ROWS: [usize; 7] = [1000, 300, 100, 30, 10, 3, 1];

/// What one transaction did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub inserted: u64,
    pub already_present: u64,
    /// The value written to `telemetry_offsets`.
    pub offset: u64,
    /// Sent with LOAD DATA (else with INSERT).
    pub loaded: bool,
}

/// How long a statement may wait for a row lock: well within the write timeout, or the retry of an abandoned
/// transaction would queue behind the abandoned statement's locks. Set per transaction, since the write
/// timeout reloads live.
pub fn lock_wait(write_timeout: Duration) -> Duration {
    (write_timeout / 2).max(Duration::from_secs(1))
}

/// Writes rows and the offset in one transaction: with LOAD DATA when `path` says so and the server takes the
/// batch whole (see `load.rs`), else with multi-row INSERTs. Duplicates (by `event_id`) are no-ops.
/// `offset` gives the value for `telemetry_run_offsets`, asked for just before it is written.
pub async fn write_rows(
    pool: &Pool,
    identity: &Identity,
    rows: &[(Record, Event)],
    lock_wait: Duration,
    path: &WritePath,
    offset: impl Fn() -> u64,
) -> Result<Written, mysql_async::Error> {
    let mut conn = pool.get_conn().await?;
    // Whole seconds: MariaDB and MySQL both take an integer here.
    conn.query_drop(format!("SET SESSION innodb_lock_wait_timeout = {}", lock_wait.as_secs().max(1))).await?;
    match load_rows(&mut conn, identity, rows, path, &offset).await? {
        Some(written) => Ok(written),
        None => insert_rows(&mut conn, identity, rows, offset).await,
    }
}

/// A table's name, its columns in the order `push_params` gives values, and a batch's rows for it.
pub(super) type TableRows<'a> = (&'static str, &'static [&'static str], Vec<&'a (Record, Event)>);

/// A batch's rows by table: metrics, then trades.
pub(super) fn by_table(rows: &[(Record, Event)]) -> [TableRows<'_>; 2] {
    let (metrics, trades): (Vec<_>, Vec<_>) = rows.iter().partition(|(_, event)| matches!(event, Event::Metric(_)));
    [(METRICS_TABLE, METRIC_COLUMNS, metrics), (TRADES_TABLE, TRADE_COLUMNS, trades)]
}

/// The INSERT path: prepared multi-row INSERTs that skip duplicates, and the offset, in one transaction.
async fn insert_rows(
    conn: &mut Conn,
    identity: &Identity,
    rows: &[(Record, Event)],
    offset: impl Fn() -> u64,
) -> Result<Written, mysql_async::Error> {
    let mut tx = conn.start_transaction(TxOpts::default()).await?;
    let mut inserted = 0;
    for (table, columns, rows) in by_table(rows) {
        let mut table_inserted = 0;
        let mut rest = &rows[..];
        while !rest.is_empty() {
            let n = CHUNK_ROWS.into_iter().find(|&n| n <= rest.len()).unwrap_or(1);
            let (chunk, tail) = rest.split_at(n);
            let mut params = Vec::with_capacity(n * columns.len());
            for (record, event) in chunk {
                push_params(&mut params, event, identity, record.seq);
            }
            tx.exec_drop(insert_sql(table, columns, n), params).await?;
            table_inserted += tx.affected_rows();
            rest = tail;
        }
        let ids: std::collections::BTreeSet<String> =
            rows.iter().map(|(record, event)| identity.event_id(event.client_event_id(), record.seq)).collect();
        if table_inserted < ids.len() as u64 {
            // MySQL called some rows duplicates. Make sure they are there before the offset moves past them:
            // with `id = id` in the update clause MariaDB dropped rows as duplicates of rows they were not
            // (see `insert_sql`); this check is what caught it, and it stays for whatever else could.
            let sql = format!("SELECT COUNT(*) FROM {table} WHERE event_id IN ({})", vec!["?"; ids.len()].join(","));
            let present: Option<u64> = tx.exec_first(sql, ids.iter().collect::<Vec<_>>()).await?;
            let present = present.unwrap_or(0);
            if present < ids.len() as u64 {
                tracing::warn!(
                    table,
                    rows = rows.len(),
                    distinct_ids = ids.len(),
                    inserted = table_inserted,
                    present,
                    first_seq = rows.first().map(|(r, _)| r.seq),
                    last_seq = rows.last().map(|(r, _)| r.seq),
                    "MySQL reported rows as already present that are not there; rolling back and retrying the batch"
                );
                return Err(mysql_async::Error::Other(
                    format!(
                        "{} of {} rows in {table} were reported as already present but are not there; retrying",
                        ids.len() as u64 - present,
                        ids.len()
                    )
                    .into(),
                ));
            }
        }
        inserted += table_inserted;
    }
    let offset = offset();
    record_offset(&mut tx, identity, offset).await?;
    tx.commit().await?;
    let total = rows.len() as u64;
    Ok(Written { inserted, already_present: total.saturating_sub(inserted), offset, loaded: false })
}

/// Never moves an offset back: transactions may commit out of order.
const OFFSET_UPSERT: &str = "INSERT INTO telemetry_run_offsets (agent_id, run_id, sink, last_seq, updated_at) \
     VALUES (?, ?, ?, ?, UTC_TIMESTAMP(6)) \
     ON DUPLICATE KEY UPDATE last_seq = GREATEST(last_seq, ?), updated_at = UTC_TIMESTAMP(6)";

const METRICS_TABLE: &str = "dd_metrics";
const METRIC_COLUMNS: &[&str] =
    &["event_id", "agent_id", "wal_seq", "profile_id", "name", "value", "ts", "tags", "received_at"];
const TRADES_TABLE: &str = "dd_trade_performance";
const TRADE_COLUMNS: &[&str] = &[
    "event_id",
    "agent_id",
    "wal_seq",
    "profile_id",
    "symbol",
    "side",
    "quantity",
    "price",
    "pnl",
    "fees",
    "opened_at",
    "closed_at",
    "meta",
    "received_at",
];

/// `INSERT INTO t (cols) VALUES (?,..),(?,..) ON DUPLICATE KEY UPDATE event_id = event_id` for `rows` rows.
/// The update makes a re-sent row a no-op without `INSERT IGNORE`, which would hide data errors as warnings.
/// It must not assign the AUTO_INCREMENT `id` (`id = id`): MariaDB then moves the statement's next id past the
/// duplicate's, and when that row got its id from a transaction that reserved ids after this statement did
/// (a resent event in a concurrent batch), the rows after it take ids that transaction already used, hit the
/// primary key, and are dropped as "duplicates" (the test
/// `a_duplicate_holding_a_later_id_does_not_drop_the_rows_after_it` shows it).
fn insert_sql(table: &str, columns: &[&str], rows: usize) -> String {
    let row = format!("({})", vec!["?"; columns.len()].join(","));
    format!(
        "INSERT INTO {table} ({}) VALUES {} ON DUPLICATE KEY UPDATE event_id = event_id",
        columns.join(","),
        vec![row.as_str(); rows].join(",")
    )
}

/// Appends one row's values, in the order of its table's columns.
pub(super) fn push_params(params: &mut Vec<Value>, event: &Event, identity: &Identity, seq: u64) {
    match event {
        Event::Metric(m) => params.extend([
            identity.event_id(m.event_id.as_deref(), seq).into(),
            identity.agent_id().into(),
            seq.into(),
            m.profile_id.as_str().into(),
            m.name.as_str().into(),
            m.value.into(),
            datetime(m.ts_us),
            m.tags.as_deref().into(),
            datetime(m.received_us),
        ]),
        Event::Trade(t) => params.extend([
            identity.event_id(t.event_id.as_deref(), seq).into(),
            identity.agent_id().into(),
            seq.into(),
            t.profile_id.as_str().into(),
            t.symbol.as_str().into(),
            match t.side {
                Side::Buy => "buy",
                Side::Sell => "sell",
            }
            .into(),
            // Decimals travel as text: the server parses the exact digits.
            t.quantity.as_str().into(),
            t.price.as_str().into(),
            t.pnl.as_deref().into(),
            t.fees.as_deref().into(),
            t.opened_at_us.map_or(Value::NULL, datetime),
            datetime(t.closed_at_us),
            t.meta.as_deref().into(),
            datetime(t.received_us),
        ]),
    }
}

/// A UTC DATETIME(6) value with exact microseconds (no rounding by the server).
fn datetime(us: i64) -> Value {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    Value::Date(t.year() as u16, t.month() as u8, t.day(), t.hour(), t.minute(), t.second(), t.microsecond())
}

/// Records that this run committed everything up to `seq` (never moving an offset back).
pub(super) async fn record_offset(conn: &mut impl Queryable, identity: &Identity, seq: u64) -> mysql_async::Result<()> {
    conn.exec_drop(OFFSET_UPSERT, (identity.agent_id(), identity.run_id(), SINK.name(), seq, seq)).await
}

/// The highest offset the runs `runs` of this agent committed, if any.
pub(super) async fn committed_offset(
    conn: &mut impl Queryable,
    identity: &Identity,
    runs: &[&str],
) -> mysql_async::Result<Option<u64>> {
    let sql = format!(
        "SELECT MAX(last_seq) FROM telemetry_run_offsets WHERE agent_id = ? AND sink = ? AND run_id IN ({})",
        vec!["?"; runs.len()].join(",")
    );
    let params: Vec<Value> =
        [identity.agent_id(), SINK.name()].into_iter().chain(runs.iter().copied()).map(Value::from).collect();
    let committed: Option<Option<u64>> = conn.exec_first(sql, params).await?;
    Ok(committed.flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_statements_stay_under_the_placeholder_limit() {
        for columns in [METRIC_COLUMNS, TRADE_COLUMNS] {
            assert!(columns.len() * CHUNK_ROWS[0] < 65_535);
        }
        let sql = insert_sql("t", &["a", "b"], 2);
        assert_eq!(sql, "INSERT INTO t (a,b) VALUES (?,?),(?,?) ON DUPLICATE KEY UPDATE event_id = event_id");
    }

    #[test]
    fn datetimes_keep_microseconds() {
        assert_eq!(datetime(1_795_773_600_123_456), Value::Date(2026, 11, 27, 10, 0, 0, 123_456));
    }
}
