//! Where the WAL's events go: MySQL, every event exactly once (`mysql`), and Redis, the newest value of
//! every metric and trade (`redis`, the mirror).
//!
//! What the sinks share is here: their names, stopping, WAL work off the async threads, and waiting out an
//! outage (the backoff and the log lines an operator greps for). Each sink keeps its own judgement of what a
//! failure means (an outage, bad data, a schema to migrate).

pub mod mysql;
pub mod redis;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use telemetry_wal::WalError;
use tokio::sync::watch;

use crate::ops::metrics::METRICS;

/// A sink: the name of its WAL cursor, its metrics label and the `--sink` of `wal replay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sink {
    Mysql,
    Redis,
}

impl Sink {
    pub fn name(self) -> &'static str {
        match self {
            Sink::Mysql => "mysql",
            Sink::Redis => "redis",
        }
    }

    /// The destination as the logs name it.
    fn destination(self) -> &'static str {
        match self {
            Sink::Mysql => "MySQL",
            Sink::Redis => "Redis",
        }
    }
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Sink {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mysql" => Ok(Sink::Mysql),
            "redis" => Ok(Sink::Redis),
            other => Err(format!("unknown sink {other:?}; use mysql or redis")),
        }
    }
}

/// The sink was told to stop. Not an error: whatever it had not finished is still in the WAL.
pub(crate) struct Stopped;

/// Waits `delay`, or less if the agent stops meanwhile.
pub(crate) async fn pause(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> Result<(), Stopped> {
    if *shutdown.borrow() {
        return Err(Stopped);
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => Ok(()),
        _ = shutdown.changed() => Err(Stopped),
    }
}

/// Runs WAL (sled) work on the blocking pool, so that a slow disk does not stall the async threads. A task
/// that panicked is an error like the others.
pub(crate) async fn blocking<T, E>(work: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, String>
where
    T: Send + 'static,
    E: fmt::Display + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the blocking task failed: {e}")),
    }
}

/// Reads the WAL after `after_seq` off the async threads, until a read succeeds or the agent stops. A read
/// that fails (a damaged WAL, a failing disk) is retried every 10 s, never skipped: the sink stops at that
/// record and the operator sees why.
pub(crate) async fn read_wal<T: Send + 'static>(
    sink: Sink,
    after_seq: u64,
    read: impl Fn() -> Result<T, WalError> + Clone + Send + 'static,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<T, Stopped> {
    loop {
        match blocking(read.clone()).await {
            Ok(value) => return Ok(value),
            Err(error) => {
                tracing::error!(%sink, error, after_seq, "cannot read the WAL; this sink is stuck here, retrying in 10 s");
                pause(Duration::from_secs(10), shutdown).await?;
            }
        }
    }
}

/// A sink's destination being away: the first failure is a WARN, later ones DEBUG, the end an INFO with how
/// long it lasted; between tries, a backoff that doubles per failure.
pub(crate) struct Outage {
    sink: Sink,
    current: Option<Current>,
}

struct Current {
    since: Instant,
    retries: u32,
}

impl Outage {
    pub(crate) fn new(sink: Sink) -> Self {
        Outage { sink, current: None }
    }

    /// A try failed. `records_held`: what waits in the WAL for this sink, where the operator needs to know
    /// (asked only when it is logged).
    pub(crate) fn failed(&mut self, error: &str, records_held: impl FnOnce() -> Option<u64>) {
        let sink = self.sink;
        METRICS.sink_failed(sink, error);
        match &mut self.current {
            Some(current) => {
                current.retries += 1;
                tracing::debug!(%sink, error, retries = current.retries, "{} still unavailable", sink.destination());
            }
            None => {
                let kept = match sink {
                    Sink::Mysql => "events stay in the WAL and are forwarded when it answers",
                    Sink::Redis => "the newest values are kept and pushed when it answers",
                };
                let records_held = records_held();
                tracing::warn!(%sink, error, records_held, "{} unavailable; {kept}", sink.destination());
                self.current = Some(Current { since: Instant::now(), retries: 0 });
            }
        }
    }

    /// A try went through: ends the outage, if there is one.
    pub(crate) fn ended(&mut self, records_held: impl FnOnce() -> Option<u64>) {
        let sink = self.sink;
        METRICS.sink_ok(sink);
        if let Some(outage) = self.current.take() {
            tracing::info!(
                %sink,
                outage_secs = format!("{:.1}", outage.since.elapsed().as_secs_f64()),
                retries = outage.retries,
                records_held = records_held(),
                "{} available again",
                sink.destination()
            );
        }
    }

    /// How long to wait before the next try: `initial`, doubled per failure, at most `max`, and of that a
    /// random half to all, so that agents that failed together do not retry together.
    pub(crate) fn backoff(&self, initial: Duration, max: Duration) -> Duration {
        backoff_delay(self.current.as_ref().map_or(0, |c| c.retries), initial, max)
    }
}

/// `initial` doubled `retries` times, at most `max`, and of that a random half to all.
pub(crate) fn backoff_delay(retries: u32, initial: Duration, max: Duration) -> Duration {
    initial.saturating_mul(1 << retries.min(16)).min(max).mul_f64(0.5 + fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_names_round_trip() {
        for sink in [Sink::Mysql, Sink::Redis] {
            assert_eq!(sink.name().parse::<Sink>(), Ok(sink));
        }
        assert!("spool".parse::<Sink>().unwrap_err().contains("use mysql or redis"));
    }

    #[test]
    fn the_backoff_doubles_per_failure_up_to_its_ceiling() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut outage = Outage::new(Sink::Redis);
        let between = |d: Duration, lo: u64, hi: u64| d >= Duration::from_millis(lo) && d <= Duration::from_millis(hi);
        assert!(between(outage.backoff(initial, max), 50, 100));
        outage.failed("down", || None);
        assert!(between(outage.backoff(initial, max), 50, 100), "the first failure waits `initial`");
        outage.failed("down", || None);
        assert!(between(outage.backoff(initial, max), 100, 200));
        for _ in 0..40 {
            outage.failed("down", || None);
        }
        assert!(between(outage.backoff(initial, max), 500, 1000));
        outage.ended(|| None);
        assert!(between(outage.backoff(initial, max), 50, 100), "a new outage starts over");
    }
}
