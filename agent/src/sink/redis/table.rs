//! What the mirror keeps in the WAL's table `redis_latest`: the newest event of every key (profile and
//! metric, or profile for trades), and the order in which events compare.

use serde::{Deserialize, Serialize};
use telemetry_wal::Record;

use crate::event::{decode_versioned, encode_versioned, Event, Trade};
use crate::identity::Identity;

pub(super) const TABLE: &str = "redis_latest";

/// The script's order of an event: µs timestamp and seq, fixed width, so that text order is event order.
pub(super) fn order(ts_us: i64, seq: u64) -> String {
    format!("{:018}{seq:020}", ts_us.max(0))
}

/// A key of the `redis_latest` table: a kind byte, the profile id's length and the profile id, then the
/// metric name (metrics only). Profile ids are at most 64 characters of `[A-Za-z0-9_.:-]`.
pub(super) fn metric_key(profile: &str, name: &str) -> Vec<u8> {
    [&[b'm', profile.len() as u8], profile.as_bytes(), name.as_bytes()].concat()
}

fn trade_key(profile: &str) -> Vec<u8> {
    [&[b't', profile.len() as u8], profile.as_bytes()].concat()
}

/// The newest event of one key, as kept in the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) enum Latest {
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
    pub(super) fn from_record(record: &Record, identity: &Identity) -> Result<(Vec<u8>, Latest), String> {
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
    pub(super) fn order(&self) -> (i64, u64) {
        match self {
            Latest::Metric { ts_us, seq, .. } => (*ts_us, *seq),
            Latest::Trade { trade, seq, .. } => (trade.closed_at_us, *seq),
            // Older than any value.
            Latest::Forgotten { .. } => (i64::MIN, 0),
        }
    }

    pub(super) fn profile_id(&self) -> &str {
        match self {
            Latest::Metric { profile_id, .. } | Latest::Forgotten { profile_id, .. } => profile_id,
            Latest::Trade { trade, .. } => &trade.profile_id,
        }
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        encode_versioned(LATEST_FORMAT_V1, self)
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Latest, String> {
        decode_versioned(bytes, LATEST_FORMAT_V1, "table entry")
    }
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
    fn orders_sort_as_time_then_seq() {
        assert!(order(1_000_001, 1) > order(1_000_000, 99));
        assert!(order(5, 10) > order(5, 9));
        assert_eq!(order(1, 2).len(), 38);
        assert_eq!(order(253_402_300_799_999_999, u64::MAX).len(), 38);
    }
}
