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
//!
//! `table` is what the WAL's table holds, `fold` fills it, `sync` empties it into Redis, `dirty` is the
//! set of keys Redis has yet to take, shared by the two.

mod dirty;
mod fold;
mod sync;
mod table;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::{Client, IntoConnectionInfo, Script};
use telemetry_wal::{Table, Wal};
use tokio::sync::{watch, Notify};

use crate::config::{mask_url, read_secret_file, RedisConfig};
use crate::identity::Identity;
use crate::sink::Sink;
use dirty::Dirty;
use table::{metric_key, Latest, TABLE};

pub const SINK: Sink = Sink::Redis;

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
pub const UPDATE_SCRIPT: &str = include_str!("update.lua");

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
}
