//! The Redis mirror: the newest value of every metric and the newest trade of every profile, in Redis,
//! never going back in time.
//!
//! Two stages, so that Redis never holds the WAL back:
//! - the *fold* tails the WAL from cursor `redis` and keeps the newest entry per key (profile and metric,
//!   or profile for trades) in the table `redis_latest` of the WAL's own database. It needs no network, so
//!   the WAL truncates behind it whatever Redis does, and the table is all the mirror needs afterwards;
//! - the *sync* pushes changed entries from that table to Redis over one multiplexed connection: one Lua
//!   script call per profile, one pipeline per round. The script compares timestamps inside Redis, so a late
//!   or replayed value never overwrites a newer one. Every (re)connect pushes the whole table once, which
//!   also repairs a Redis that restarted empty.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ErrorKind, IntoConnectionInfo, RedisError, Script, ServerErrorKind};
use serde::{Deserialize, Serialize};
use telemetry_wal::{Record, Table, Wal, MAX_RECORD_BYTES};
use tokio::sync::{watch, Notify};

use crate::config::{mask_url, read_secret_file, RedisConfig};
use crate::event::{decode_versioned, encode_versioned, rfc3339_us, Event, Trade};
use crate::identity::Identity;
use crate::metrics::METRICS;

pub const SINK: &str = "redis";
const TABLE: &str = "redis_latest";
/// Records folded per step...
const FOLD_BATCH: usize = 10_000;
/// ...and at most this many payload bytes read per step (records can be 112 KiB each).
const FOLD_BATCH_BYTES: usize = 8 << 20;
/// Table entries pushed per pipeline...
const SYNC_BATCH: usize = 10_000;
/// ...and roughly the most bytes per pipeline (trades carry their `meta`).
const SYNC_BATCH_BYTES: usize = 4 << 20;
const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// How often an idle connection is checked.
const IDLE_PING: Duration = Duration::from_secs(5);

/// Writes one profile's newest metrics and trade, each only if it is newer than what Redis holds.
/// KEYS: metrics hash, metrics_ts hash, profiles set, last_trade string, order hash.
/// ARGV: updates channel ('' for none), profile id, metric count n, n x (name, value, ts in epoch ms,
/// order), then optionally the trade's JSON, its order and its `closed_at` (RFC 3339). An empty value
/// removes the metric (`mirror forget`) if what the mirror wrote for it is at most that order.
/// An order is the event's timestamp in µs and its WAL seq as 38 fixed-width digits: the order hash keeps
/// the order of what the mirror wrote, so that events in the same millisecond compare exactly; equal orders
/// (the same event again) change nothing. Values written by someone else have no order: they are compared
/// by `metrics_ts` (the newer millisecond wins, ours on a tie) and by the stored trade's `closed_at`.
/// Returns how many values changed.
pub const UPDATE_SCRIPT: &str = r#"
local n = tonumber(ARGV[3])
local changed = {}
for i = 0, n - 1 do
  local name, value, ts, ord = ARGV[4 + 4 * i], ARGV[5 + 4 * i], ARGV[6 + 4 * i], ARGV[7 + 4 * i]
  local stored = tonumber(redis.call('HGET', KEYS[2], name))
  local t = tonumber(ts)
  if value == '' then
    -- Only what the mirror wrote up to the forgotten value goes; a newer value stays.
    local stored_ord = redis.call('HGET', KEYS[5], 'm:' .. name)
    if stored_ord and stored_ord <= ord then
      redis.call('HDEL', KEYS[1], name)
      redis.call('HDEL', KEYS[2], name)
      redis.call('HDEL', KEYS[5], 'm:' .. name)
      changed[#changed + 1] = cjson.encode(name)
    end
  else
    local newer = not stored or t > stored
    if stored and t == stored then
      local stored_ord = redis.call('HGET', KEYS[5], 'm:' .. name)
      newer = not stored_ord or ord > stored_ord
    end
    if newer then
      local old = redis.call('HGET', KEYS[1], name)
      redis.call('HSET', KEYS[1], name, value)
      redis.call('HSET', KEYS[2], name, ts)
      redis.call('HSET', KEYS[5], 'm:' .. name, ord)
      if old ~= value or stored ~= t then
        changed[#changed + 1] = cjson.encode(name)
      end
    end
  end
end
local trade_changed = false
local json = ARGV[4 + 4 * n]
if json then
  local ord, closed_at = ARGV[5 + 4 * n], ARGV[6 + 4 * n]
  local old = redis.call('GET', KEYS[4])
  local stored_ord = redis.call('HGET', KEYS[5], 'trade')
  local newer = not old
  if old and stored_ord then
    newer = ord > stored_ord
  elseif old then
    local ok, decoded = pcall(cjson.decode, old)
    newer = not (ok and type(decoded) == 'table' and type(decoded.closed_at) == 'string') or closed_at >= decoded.closed_at
  end
  if newer then
    redis.call('SET', KEYS[4], json)
    redis.call('HSET', KEYS[5], 'trade', ord)
    trade_changed = old ~= json
  end
end
redis.call('SADD', KEYS[3], ARGV[2])
if ARGV[1] ~= '' and (#changed > 0 or trade_changed) then
  redis.call('PUBLISH', ARGV[1], '{"profile_id":' .. cjson.encode(ARGV[2]) .. ',"metrics":[' ..
    table.concat(changed, ',') .. '],"last_trade":' .. tostring(trade_changed) .. '}')
end
return #changed + (trade_changed and 1 or 0)
"#;

/// The script's order of an event: µs timestamp and seq, fixed width, so that text order is event order.
fn order(ts_us: i64, seq: u64) -> String {
    format!("{:018}{seq:020}", ts_us.max(0))
}

/// A key of the `redis_latest` table: a kind byte, the profile id's length and the profile id, then the
/// metric name (metrics only). Profile ids are at most 64 characters of `[A-Za-z0-9_.:-]`.
fn metric_key(profile: &str, name: &str) -> Vec<u8> {
    [&[b'm', profile.len() as u8], profile.as_bytes(), name.as_bytes()].concat()
}

fn trade_key(profile: &str) -> Vec<u8> {
    [&[b't', profile.len() as u8], profile.as_bytes()].concat()
}

/// The newest event of one key, as kept in the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Latest {
    Metric {
        name: String,
        profile_id: String,
        value: f64,
        ts_us: i64,
        seq: u64,
    },
    Trade {
        trade: Trade,
        event_id: String,
        seq: u64,
    },
    /// `mirror forget`: the metric whose newest value had this ts and seq is forgotten, so that the next
    /// value is taken whatever its ts; Redis drops the forgotten value (or anything older the mirror wrote).
    /// (Added last: entries written before keep their encoding.)
    Forgotten {
        name: String,
        profile_id: String,
        ts_us: i64,
        seq: u64,
    },
}

const LATEST_FORMAT_V1: u8 = 1;

impl Latest {
    fn from_record(record: &Record, identity: &Identity) -> Result<(Vec<u8>, Latest), String> {
        Ok(match Event::decode(&record.payload)? {
            Event::Metric(m) => (
                metric_key(&m.profile_id, &m.name),
                Latest::Metric {
                    name: m.name,
                    profile_id: m.profile_id,
                    value: m.value,
                    ts_us: m.ts_us,
                    seq: record.seq,
                },
            ),
            Event::Trade(t) => {
                let event_id = identity.event_id(t.event_id.as_deref(), record.seq);
                (trade_key(&t.profile_id), Latest::Trade { trade: t, event_id, seq: record.seq })
            }
        })
    }

    /// Newer is a later timestamp; for equal timestamps, the later record.
    fn order(&self) -> (i64, u64) {
        match self {
            Latest::Metric { ts_us, seq, .. } => (*ts_us, *seq),
            Latest::Trade { trade, seq, .. } => (trade.closed_at_us, *seq),
            // Older than any value.
            Latest::Forgotten { .. } => (i64::MIN, 0),
        }
    }

    fn profile_id(&self) -> &str {
        match self {
            Latest::Metric { profile_id, .. } | Latest::Forgotten { profile_id, .. } => profile_id,
            Latest::Trade { trade, .. } => &trade.profile_id,
        }
    }

    fn encode(&self) -> Vec<u8> {
        encode_versioned(LATEST_FORMAT_V1, self)
    }

    fn decode(bytes: &[u8]) -> Result<Latest, String> {
        decode_versioned(bytes, LATEST_FORMAT_V1, "table entry")
    }
}

/// Table keys changed since Redis last took them, each with the generation of its last change, so that a
/// key changed again while its push was in flight stays dirty. Taken oldest first, so that under constant
/// change every key gets its turn.
#[derive(Default)]
struct Dirty {
    keys: HashMap<Vec<u8>, u64>,
    /// Dirty keys not being pushed, oldest first.
    queue: VecDeque<Vec<u8>>,
    generation: u64,
    /// Keys Redis refused because of what it holds (a key of another type under the prefix): retried now
    /// and then rather than every round, so that they do not hold up the others.
    parked: Vec<Vec<u8>>,
    parked_since: Option<Instant>,
}

impl Dirty {
    fn mark(&mut self, keys: impl IntoIterator<Item = Vec<u8>>) {
        self.generation += 1;
        for key in keys {
            if self.keys.insert(key.clone(), self.generation).is_none() {
                self.queue.push_back(key);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Up to `max` keys to push; give them back with [`Dirty::finish`].
    fn take(&mut self, max: usize) -> Vec<(Vec<u8>, u64)> {
        let n = max.min(self.queue.len());
        let keys = &self.keys;
        self.queue
            .drain(..n)
            .map(|key| {
                let generation = keys.get(&key).copied().unwrap_or_default();
                (key, generation)
            })
            .collect()
    }

    /// After a push: what Redis took is clean unless it changed meanwhile; what it refused because of its
    /// keys is parked; the rest (not sent, or a failure) stays dirty.
    fn finish(&mut self, taken: Vec<(Vec<u8>, u64)>, outcome: impl Fn(&[u8]) -> Outcome) {
        for (key, generation) in taken {
            match outcome(&key) {
                Outcome::Written if self.keys.get(&key) == Some(&generation) => {
                    self.keys.remove(&key);
                }
                Outcome::Parked if self.keys.get(&key) == Some(&generation) => {
                    self.keys.remove(&key);
                    self.parked_since.get_or_insert_with(Instant::now);
                    self.parked.push(key);
                }
                _ => self.queue.push_back(key),
            }
        }
    }

    /// Parked keys become dirty again once they have waited `after`.
    fn unpark(&mut self, after: Duration) {
        if self.parked_since.is_some_and(|since| since.elapsed() >= after) {
            self.parked_since = None;
            let parked = std::mem::take(&mut self.parked);
            self.mark(parked);
        }
    }
}

/// What became of one key in a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Written,
    /// Redis refused it for what it holds under the key.
    Parked,
    /// Not sent, or Redis could not take it now.
    Retry,
}

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

/// Asks a running mirror to push its whole table again (Redis keeps whichever value is newer), or to push
/// one key now (`mirror forget`).
#[derive(Clone)]
pub struct Resync {
    asked: Arc<std::sync::atomic::AtomicBool>,
    wake: Arc<Notify>,
    dirty: Arc<Mutex<Dirty>>,
}

impl Resync {
    pub fn request(&self) {
        self.asked.store(true, std::sync::atomic::Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Pushes the table entry of (profile, metric) to Redis; true once Redis took it, false if it did not
    /// within `timeout` (the push goes on: the key stays dirty until Redis takes it).
    pub async fn push_metric(&self, profile: &str, name: &str, timeout: Duration) -> bool {
        let key = metric_key(profile, name);
        let pending = |dirty: &Dirty| dirty.keys.contains_key(&key) || dirty.parked.contains(&key);
        self.dirty.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).mark([key.clone()]);
        self.wake.notify_one();
        let deadline = Instant::now() + timeout;
        while pending(&self.dirty.lock().unwrap_or_else(|poisoned| poisoned.into_inner())) {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// What `mirror forget` found in the mirror's table.
#[derive(Debug, Clone, PartialEq)]
pub enum Forgot {
    /// The newest value, now forgotten.
    Value {
        value: f64,
        ts_us: i64,
    },
    AlreadyForgotten,
    /// The mirror never saw this metric.
    Unknown,
}

/// Replaces the table entry of (profile, metric) with a tombstone, so that the fold takes the next value
/// whatever its ts and the sync removes the forgotten value from Redis. (The WAL's table API has no
/// removal; the tombstone also keeps the forget for a Redis that is away now.) Written with the WAL's next
/// flush.
pub fn forget_metric(wal: &Wal, profile: &str, name: &str) -> anyhow::Result<Forgot> {
    let table = wal.table(TABLE).context("cannot open the mirror's table in the WAL")?;
    let key = metric_key(profile, name);
    let Some(bytes) = table.get(&key)? else { return Ok(Forgot::Unknown) };
    let (value, ts_us, seq) = match Latest::decode(&bytes) {
        Ok(Latest::Metric { value, ts_us, seq, .. }) => (value, ts_us, seq),
        Ok(Latest::Forgotten { .. }) => return Ok(Forgot::AlreadyForgotten),
        Ok(Latest::Trade { .. }) => return Ok(Forgot::Unknown),
        // A damaged entry: forget it, with an order that removes nothing the mirror wrote later.
        Err(e) => {
            tracing::warn!(profile_id = profile, metric = name, error = %e, "forgetting a damaged entry of the mirror's table");
            (f64::NAN, i64::MIN, 0)
        }
    };
    let tombstone =
        Latest::Forgotten { name: name.to_string(), profile_id: profile.to_string(), ts_us: ts_us.max(0), seq };
    table.insert_all([(key, tombstone.encode())])?;
    tracing::warn!(profile_id = profile, metric = name, value, ts_us, "metric forgotten by the mirror");
    Ok(Forgot::Value { value, ts_us })
}

pub struct Mirror {
    wal: Wal,
    table: Table,
    identity: Arc<Identity>,
    client: Client,
    /// Live: a config reload changes `publish_updates` and `retry_max_ms`.
    config: watch::Receiver<RedisConfig>,
    script: Script,
    dirty: Arc<Mutex<Dirty>>,
    changed: Arc<Notify>,
    /// `wal replay --sink redis`: push the whole table again.
    resync: Arc<std::sync::atomic::AtomicBool>,
    shutdown: watch::Receiver<bool>,
}

/// The mirror was told to stop.
struct Stopped;

impl Mirror {
    pub fn new(
        wal: Wal,
        identity: Arc<Identity>,
        config: watch::Receiver<RedisConfig>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let config_now = config.borrow().clone();
        let mut info = config_now
            .url
            .as_str()
            .into_connection_info()
            .with_context(|| format!("[redis] url {} is invalid", mask_url(&config_now.url)))?;
        if let Some(path) = &config_now.password_file {
            let password = read_secret_file(path, "[redis] password_file")?;
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = Client::open(info).context("[redis] url")?;
        let table = wal.table(TABLE).context("cannot open the mirror's table in the WAL")?;
        Ok(Mirror {
            wal,
            table,
            identity,
            client,
            config,
            script: Script::new(UPDATE_SCRIPT),
            dirty: Arc::default(),
            changed: Arc::new(Notify::new()),
            resync: Arc::default(),
            shutdown,
        })
    }

    /// Folds and syncs until shutdown. Redis being down is a state to wait out, not an error.
    pub async fn run(self) {
        let mirror = Arc::new(self);
        let fold = tokio::spawn({
            let mirror = mirror.clone();
            async move {
                let _ = mirror.fold().await;
            }
        });
        let _ = mirror.sync().await;
        let _ = fold.await;
        tracing::info!("Redis mirror stopped");
    }

    /// A way to ask the running mirror to push every newest value again.
    pub fn resync_handle(&self) -> Resync {
        Resync { asked: self.resync.clone(), wake: self.changed.clone(), dirty: self.dirty.clone() }
    }

    fn config(&self) -> RedisConfig {
        self.config.borrow().clone()
    }

    fn lock_dirty(&self) -> std::sync::MutexGuard<'_, Dirty> {
        self.dirty.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn fold(&self) -> Result<(), Stopped> {
        let mut shutdown = self.shutdown.clone();
        let mut durable = self.wal.subscribe();
        let mut after = match self.wal.cursor(SINK) {
            Ok(seq) => seq,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the redis cursor; the mirror is off until a restart");
                return Err(Stopped);
            }
        };
        loop {
            // A long backlog (the mirror newly enabled on a full WAL) must not hold up a stop.
            if *shutdown.borrow() {
                return Err(Stopped);
            }
            durable.borrow_and_update();
            let step = {
                let (wal, table, identity) = (self.wal.clone(), self.table.clone(), self.identity.clone());
                tokio::task::spawn_blocking(move || fold_step(&wal, &table, &identity, after)).await
            };
            match step {
                Ok(Ok(Some(Folded { last_seq, changed }))) => {
                    after = last_seq;
                    if !changed.is_empty() {
                        let mut dirty = self.lock_dirty();
                        dirty.mark(changed);
                        METRICS.redis_pending_keys.set((dirty.keys.len() + dirty.parked.len()) as i64);
                        drop(dirty);
                        self.changed.notify_one();
                    }
                    continue;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    // A damaged WAL or a failing disk: stop here rather than skip records. The operator sees it.
                    tracing::error!(error = %e, after_seq = after, "the Redis mirror cannot fold the WAL; retrying in 10 s");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(10)) => continue,
                        _ = shutdown.changed() => return Err(Stopped),
                    }
                }
                Err(e) => tracing::error!(error = %e, "the mirror's fold task failed"),
            }
            tokio::select! {
                _ = durable.changed() => {}
                _ = shutdown.changed() => return Err(Stopped),
            }
        }
    }

    async fn sync(&self) -> Result<(), Stopped> {
        let mut shutdown = self.shutdown.clone();
        let mut conn: Option<MultiplexedConnection> = None;
        let mut outage: Option<(Instant, String)> = None;
        let mut backoff = RETRY_INITIAL;
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
                    METRICS.sink_ok(SINK);
                    if let Some((since, _)) = outage.take() {
                        tracing::warn!(
                            outage_secs = since.elapsed().as_secs_f64(),
                            "Redis reachable again; catching up"
                        );
                    }
                    backoff = RETRY_INITIAL;
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
            METRICS.sink_failed(SINK, &error);
            match &outage {
                None => {
                    tracing::warn!(error, url = %mask_url(&self.config().url), "Redis mirror waiting; retrying (the newest values are kept meanwhile)");
                    outage = Some((Instant::now(), error));
                }
                Some((_, last)) if *last != error => tracing::debug!(error, "Redis mirror still waiting"),
                Some(_) => {}
            }
            let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
            backoff = (backoff * 2).min(retry_max);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return Err(Stopped),
            }
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
        match tokio::task::spawn_blocking(move || table.keys()).await {
            Ok(Ok(keys)) => {
                self.lock_dirty().mark(keys);
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("the table read task failed: {e}")),
        }
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
            match tokio::task::spawn_blocking(move || read_profiles(&table, keys)).await {
                Ok(Ok(profiles)) => profiles,
                Ok(Err(e)) => return Err(SyncError::Local(e.to_string())),
                Err(e) => return Err(SyncError::Local(format!("the table read task failed: {e}"))),
            }
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

/// What one fold step did.
struct Folded {
    last_seq: u64,
    /// Table keys whose entry changed.
    changed: Vec<Vec<u8>>,
}

/// Folds the records after `after` into the table and moves the cursor past them; `None` when there was
/// nothing to read.
fn fold_step(
    wal: &Wal,
    table: &Table,
    identity: &Identity,
    after: u64,
) -> Result<Option<Folded>, telemetry_wal::WalError> {
    let mut newest: HashMap<Vec<u8>, Latest> = HashMap::new();
    let (mut last_seq, mut records, mut bytes) = (None, 0, 0);
    // Read in pieces that fit in what is left of the byte budget even if every record is as large as it may be.
    loop {
        let room = (FOLD_BATCH_BYTES.saturating_sub(bytes) / MAX_RECORD_BYTES).min(FOLD_BATCH - records);
        if room == 0 {
            break;
        }
        let batch = wal.read_after(last_seq.unwrap_or(after), room)?;
        let Some(last) = batch.last().map(|r| r.seq) else { break };
        last_seq = Some(last);
        records += batch.len();
        for record in &batch {
            bytes += record.payload.len();
            match Latest::from_record(record, identity) {
                Ok((key, latest)) => match newest.get(&key) {
                    Some(kept) if kept.order() >= latest.order() => {}
                    _ => {
                        newest.insert(key, latest);
                    }
                },
                // The MySQL forwarder dead-letters such a record; the mirror has nothing to show for it.
                Err(e) => {
                    tracing::error!(seq = record.seq, error = %e, "the Redis mirror skips an undecodable record")
                }
            }
        }
        if batch.len() < room {
            break; // Caught up.
        }
    }
    let Some(last_seq) = last_seq else { return Ok(None) };
    let mut writes = Vec::with_capacity(newest.len());
    for (key, latest) in newest {
        let stored = table.get(&key)?.and_then(|bytes| Latest::decode(&bytes).ok());
        if stored.is_some_and(|stored| stored.order() >= latest.order()) {
            continue;
        }
        writes.push((key, latest.encode()));
    }
    let changed: Vec<Vec<u8>> = writes.iter().map(|(k, _)| k.clone()).collect();
    table.insert_all(writes)?;
    // After the table write: a crash between the two refolds these records, which changes nothing.
    wal.set_cursor(SINK, last_seq)?;
    Ok(Some(Folded { last_seq, changed }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_entries_round_trip_and_order_by_time_then_seq() {
        let a = Latest::Metric { name: "n".into(), profile_id: "p".into(), value: 1.5, ts_us: 10, seq: 7 };
        assert_eq!(Latest::decode(&a.encode()).unwrap(), a);
        let b = Latest::Metric { name: "n".into(), profile_id: "p".into(), value: 2.0, ts_us: 10, seq: 8 };
        assert!(b.order() > a.order());
        assert!(Latest::decode(&[9, 1, 2]).unwrap_err().contains("format version 9"));
        assert_ne!(metric_key("ab", "c"), metric_key("a", "bc"));
    }

    #[test]
    fn a_key_changed_during_its_push_stays_dirty_and_waits_its_turn() {
        let (a, b, c) = (b"a".to_vec(), b"b".to_vec(), b"c".to_vec());
        let mut dirty = Dirty::default();
        dirty.mark([a.clone(), b.clone()]);
        let taken = dirty.take(10);
        dirty.mark([a.clone(), c.clone()]);
        dirty.finish(taken, |_| Outcome::Written);
        assert_eq!(dirty.keys.len(), 2);
        assert_eq!(dirty.take(1)[0].0, c, "c became dirty before a's second change was seen");
        let taken = dirty.take(1);
        assert_eq!(taken[0].0, a);
        dirty.finish(taken, |_| Outcome::Retry);
        assert_eq!(dirty.take(5).len(), 1, "a failed push keeps its keys dirty");
    }

    #[test]
    fn parked_keys_come_back_after_a_while() {
        let mut dirty = Dirty::default();
        dirty.mark([b"a".to_vec(), b"b".to_vec()]);
        let taken = dirty.take(10);
        dirty.finish(taken, |key| if key == b"a" { Outcome::Parked } else { Outcome::Written });
        assert!(dirty.is_empty());
        dirty.unpark(Duration::from_secs(60));
        assert!(dirty.is_empty(), "too early");
        dirty.unpark(Duration::ZERO);
        assert_eq!(dirty.take(10), vec![(b"a".to_vec(), 2)]);
    }

    #[test]
    fn a_fold_step_reads_a_bounded_number_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), telemetry_wal::WalOptions::default()).unwrap();
        let table = wal.table(TABLE).unwrap();
        let appender = wal.appender();
        let pending: Vec<_> = (0..200).map(|_| appender.blocking_append(vec![b'x'; 100_000]).unwrap()).collect();
        let seqs: Vec<u64> = pending.into_iter().map(|p| p.blocking_durable().unwrap()).collect();
        let folded = fold_step(&wal, &table, &Identity::new("a".into(), Vec::new()), 0).unwrap().unwrap();
        let count = seqs.iter().filter(|&&seq| seq <= folded.last_seq).count();
        assert!(count * 100_000 <= FOLD_BATCH_BYTES, "{count} records of 100 kB folded in one step");
        // The next steps take the rest.
        let mut after = folded.last_seq;
        while let Some(folded) = fold_step(&wal, &table, &Identity::new("a".into(), Vec::new()), after).unwrap() {
            after = folded.last_seq;
        }
        assert_eq!(Some(&after), seqs.last());
    }

    #[test]
    fn orders_sort_as_time_then_seq() {
        assert!(order(1_000_001, 1) > order(1_000_000, 99));
        assert!(order(5, 10) > order(5, 9));
        assert_eq!(order(1, 2).len(), 38);
        assert_eq!(order(253_402_300_799_999_999, u64::MAX).len(), 38);
    }
}
