//! The wall clock, in the two units the agent uses: microseconds (seqs of a new WAL, event times) and
//! milliseconds (the WAL's append times, lag, status).

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    u64::try_from(now_us() / 1000).unwrap_or(0)
}
