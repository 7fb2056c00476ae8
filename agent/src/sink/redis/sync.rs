//! The sync: pushes changed entries of the mirror's table to Redis over one multiplexed connection, one
//! Lua script call per profile, one pipeline per round.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, ServerErrorKind};
use telemetry_wal::Table;

use super::dirty::Outcome;
use super::table::{order, Latest};
use super::{Mirror, SINK};
use crate::event::rfc3339_us;
use crate::ops::metrics::METRICS;
use crate::sink::{blocking, pause, Outage, Stopped};

/// Table entries pushed per pipeline...
const SYNC_BATCH: usize = 10_000;
/// ...and roughly the most bytes per pipeline (trades carry their `meta`).
const SYNC_BATCH_BYTES: usize = 4 << 20;
const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// How often an idle connection is checked.
const IDLE_PING: Duration = Duration::from_secs(5);

/// Why a sync step failed, and so what to do next.
enum SyncError {
    /// Connection lost, timed out, or never made: reconnect with backoff.
    Connection(anyhow::Error),
    /// Redis answered but refused the writes (out of memory, a failing snapshot, a replica): keep the
    /// connection, back off.
    Refused(String),
    /// Reading our own table failed.
    Local(String),
}

impl From<RedisError> for SyncError {
    fn from(e: RedisError) -> Self {
        SyncError::Connection(e.into())
    }
}

/// What a sync step did.
enum Step {
    Connected,
    Pushed,
    Idle,
}

impl Mirror {
    pub(super) async fn sync(&self) -> Result<(), Stopped> {
        let mut shutdown = self.shutdown.clone();
        let mut conn: Option<MultiplexedConnection> = None;
        let mut outage = Outage::new(SINK);
        loop {
            let retry_max = Duration::from_millis(self.config().retry_max_ms);
            self.lock_dirty().unpark(retry_max);
            if conn.is_some() && self.take_resync() {
                tracing::info!("replaying the whole table to Redis");
                if let Err(e) = self.mark_all_dirty().await {
                    tracing::error!(error = e, "the Redis mirror cannot read its table");
                }
            }
            let mut idle = false;
            if conn.is_some() && self.lock_dirty().is_empty() {
                tokio::select! {
                    () = self.changed.notified() => {}
                    () = tokio::time::sleep(IDLE_PING.min(retry_max)) => idle = true,
                    _ = shutdown.changed() => return Err(Stopped),
                }
            }
            let work = async {
                match conn.as_mut() {
                    // A quiet connection may have died (or Redis restarted empty): find out before data waits.
                    Some(c) if idle => {
                        redis::cmd("PING").exec_async(c).await?;
                        Ok(Step::Idle)
                    }
                    Some(c) => self.push(c).await.map(|()| Step::Pushed),
                    None => {
                        conn = Some(self.connect().await.map_err(SyncError::Connection)?);
                        // Whatever Redis missed or lost while we were away: push the whole table once.
                        self.mark_all_dirty().await.map_err(SyncError::Local)?;
                        Ok(Step::Connected)
                    }
                }
            };
            // A stop does not wait for a slow Redis: what was not pushed is in the table for the next start.
            let result = tokio::select! {
                result = work => result,
                _ = shutdown.changed() => return Err(Stopped),
            };
            let error = match result {
                // Only a write that went through ends an outage: a connection that cannot write is no better.
                Ok(Step::Connected) => continue,
                Ok(Step::Pushed | Step::Idle) => {
                    outage.ended(|| None);
                    continue;
                }
                Err(SyncError::Connection(e)) => {
                    conn = None;
                    format!("Redis unreachable: {e:#}")
                }
                Err(SyncError::Refused(e)) => format!("Redis refuses the mirror's writes: {e}"),
                Err(SyncError::Local(e)) => {
                    tracing::error!(error = e, "the Redis mirror cannot read its table; retrying");
                    e
                }
            };
            outage.failed(&error, || None);
            pause(outage.backoff(RETRY_INITIAL, retry_max), &mut shutdown).await?;
        }
    }

    /// A new connection, named for `CLIENT LIST`, with the script loaded.
    async fn connect(&self) -> anyhow::Result<MultiplexedConnection> {
        let config = self.config();
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let response_timeout = Duration::from_millis(config.response_timeout_ms);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        let connect = async {
            let mut conn = self.client.get_multiplexed_async_connection_with_config(&config).await?;
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(format!("telemetry-agent:{}", self.identity.agent_id()))
                .exec_async(&mut conn)
                .await?;
            self.script.prepare_invoke().load_async(&mut conn).await?;
            Ok::<_, RedisError>(conn)
        };
        match tokio::time::timeout(connect_timeout + response_timeout * 2, connect).await {
            Ok(result) => result.context("cannot connect to Redis"),
            Err(_) => anyhow::bail!("connecting to Redis timed out"),
        }
    }

    /// Whether a resync was asked for (and takes the request).
    fn take_resync(&self) -> bool {
        self.resync.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    async fn mark_all_dirty(&self) -> Result<(), String> {
        let table = self.table.clone();
        let keys = blocking(move || table.keys()).await?;
        self.lock_dirty().mark(keys);
        Ok(())
    }

    /// Pushes up to [`SYNC_BATCH`] dirty entries (at most [`SYNC_BATCH_BYTES`]) in one pipeline. A script
    /// missing after a Redis restart is loaded and the push retried. A profile Redis refuses for what it
    /// holds under its keys (WRONGTYPE) is logged and parked; the others go on.
    async fn push(&self, conn: &mut MultiplexedConnection) -> Result<(), SyncError> {
        let taken = self.lock_dirty().take(SYNC_BATCH);
        if taken.is_empty() {
            return Ok(());
        }
        let mut outcomes: HashMap<Vec<u8>, Outcome> = HashMap::new();
        let started = Instant::now();
        let result = self.push_entries(conn, &taken, &mut outcomes).await;
        if result.is_ok() {
            METRICS.sink_wrote(SINK, outcomes.len(), started.elapsed());
        }
        let mut dirty = self.lock_dirty();
        dirty.finish(taken, |key| outcomes.get(key).copied().unwrap_or(Outcome::Retry));
        METRICS.redis_pending_keys.set((dirty.keys.len() + dirty.parked.len()) as i64);
        result
    }

    async fn push_entries(
        &self,
        conn: &mut MultiplexedConnection,
        taken: &[(Vec<u8>, u64)],
        outcomes: &mut HashMap<Vec<u8>, Outcome>,
    ) -> Result<(), SyncError> {
        let profiles = {
            let (table, keys) = (self.table.clone(), taken.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>());
            blocking(move || read_profiles(&table, keys)).await.map_err(SyncError::Local)?
        };
        let config = self.config();
        let channel = if config.publish_updates { format!("{}:updates", config.key_prefix) } else { String::new() };
        let prefix = &config.key_prefix;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut sent: Vec<&ProfileUpdate> = Vec::new();
        let mut bytes = 0;
        for update in &profiles {
            if !sent.is_empty() && bytes + update.bytes > SYNC_BATCH_BYTES {
                break;
            }
            bytes += update.bytes;
            let profile = &update.profile_id;
            let mut call = self.script.prepare_invoke();
            call.key(format!("{prefix}:{profile}:metrics"))
                .key(format!("{prefix}:{profile}:metrics_ts"))
                .key(format!("{prefix}:profiles"))
                .key(format!("{prefix}:{profile}:last_trade"))
                .key(format!("{prefix}:{profile}:order"))
                .arg(&channel)
                .arg(profile)
                .arg(update.metrics.len());
            for metric in &update.metrics {
                // An empty value removes the metric (see the script).
                call.arg(&metric.name)
                    .arg(metric.value.map(|v| v.to_string()).unwrap_or_default())
                    .arg(metric.ts_us.div_euclid(1000))
                    .arg(&metric.order);
            }
            if let Some(trade) = &update.trade {
                call.arg(&trade.json).arg(&trade.order).arg(&trade.closed_at);
            }
            pipe.invoke_script(&call);
            sent.push(update);
        }
        let mut results: Vec<redis::RedisResult<i64>> = pipe.query_async(conn).await?;
        if results.iter().any(|r| matches!(r, Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript))) {
            tracing::warn!("Redis lost the mirror's script (restarted?); loading it again");
            self.script.prepare_invoke().load_async(conn).await?;
            results = pipe.query_async(conn).await?;
        }
        let mut refused = None;
        let mut changed = 0;
        for (update, result) in sent.iter().zip(&results) {
            let outcome = match result {
                Ok(n) => {
                    changed += n;
                    Outcome::Written
                }
                Err(e) if e.code() == Some("WRONGTYPE") => {
                    tracing::error!(
                        profile_id = %update.profile_id,
                        error = %e,
                        "Redis holds a key of another type where the mirror writes this profile; retrying it every retry_max_ms"
                    );
                    Outcome::Parked
                }
                Err(e) => {
                    refused.get_or_insert_with(|| e.to_string());
                    Outcome::Retry
                }
            };
            outcomes.extend(update.keys.iter().map(|key| (key.clone(), outcome)));
        }
        tracing::debug!(entries = outcomes.len(), profiles = sent.len(), changed, "pushed to Redis");
        match refused {
            Some(error) => Err(SyncError::Refused(error)),
            None => Ok(()),
        }
    }
}

/// One profile's share of a push.
struct ProfileUpdate {
    profile_id: String,
    metrics: Vec<MetricUpdate>,
    trade: Option<TradeUpdate>,
    /// The table keys it covers.
    keys: Vec<Vec<u8>>,
    /// Roughly what it adds to the pipeline.
    bytes: usize,
}

struct MetricUpdate {
    name: String,
    /// `None`: forgotten.
    value: Option<f64>,
    ts_us: i64,
    order: String,
}

struct TradeUpdate {
    json: String,
    order: String,
    closed_at: String,
}

fn read_profiles(table: &Table, keys: Vec<Vec<u8>>) -> Result<Vec<ProfileUpdate>, telemetry_wal::WalError> {
    let mut profiles: BTreeMap<String, ProfileUpdate> = BTreeMap::new();
    for key in keys {
        let Some(bytes) = table.get(&key)? else { continue };
        let latest = match Latest::decode(&bytes) {
            Ok(latest) => latest,
            Err(e) => {
                tracing::error!(error = %e, "skipping a damaged entry of the mirror's table");
                continue;
            }
        };
        let profile_id = latest.profile_id().to_string();
        let update = profiles.entry(profile_id.clone()).or_insert_with(|| ProfileUpdate {
            bytes: 4 * profile_id.len() + 100,
            profile_id,
            metrics: Vec::new(),
            trade: None,
            keys: Vec::new(),
        });
        update.keys.push(key);
        match latest {
            Latest::Metric { name, value, ts_us, seq, .. } => {
                update.bytes += name.len() + 90;
                update.metrics.push(MetricUpdate { name, value: Some(value), ts_us, order: order(ts_us, seq) });
            }
            Latest::Forgotten { name, ts_us, seq, .. } => {
                update.bytes += name.len() + 90;
                update.metrics.push(MetricUpdate { name, value: None, ts_us, order: order(ts_us, seq) });
            }
            Latest::Trade { trade, event_id, seq } => {
                let json = trade.to_json(Some(&event_id));
                update.bytes += json.len() + 80;
                let (order, closed_at) = (order(trade.closed_at_us, seq), rfc3339_us(trade.closed_at_us));
                update.trade = Some(TradeUpdate { json, order, closed_at });
            }
        }
    }
    Ok(profiles.into_values().collect())
}
