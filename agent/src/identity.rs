//! Whose a record is, and so the event id of an event that came without one.
//!
//! Every start of the agent opens a new *run* of its WAL: a random 64-bit run id, recorded in the WAL (with
//! the first seq it names) before anything is appended. An event without a client `event_id` is named
//! `~{run}-{seq}` after the run that appended it. So generated ids
//! - never collide across hosts, even two with the same `[agent] id` or a WAL copied to a second host (each
//!   start draws its own run id; records copied with the WAL keep the run they were appended in, so both
//!   hosts forward them under the same ids, and the sinks keep them once);
//! - never collide with a client's id: `~` is outside the client id alphabet, so a client cannot send one;
//! - never change for a record: the run that appended it is in the WAL with it. Records appended before this
//!   scheme existed (a WAL older than its first run) keep their old ids, `{agent_id}-{seq}`, so an upgrade
//!   sends nothing that MySQL would take as new.
//!
//! The MySQL offsets are kept per run too (`telemetry_run_offsets`): only this process writes its row, and
//! a restart may skip what an earlier run of the same WAL committed, but only below its own first seq. Below
//! it, every copy of this WAL holds the same records, so whichever copy committed them, they are in MySQL.

use anyhow::Context as _;
use telemetry_wal::Wal;

/// The WAL table that maps a run's first seq (big-endian) to its run id.
const RUNS_TABLE: &str = "runs";
/// Marks generated event ids; not in the alphabet of client ids (`A-Za-z0-9_.:-`).
pub const GENERATED_ID_PREFIX: char = '~';

/// Whether `id` has the form of a generated id, `~{16 hex digits}-{seq}`.
pub fn is_generated_id(id: &str) -> bool {
    let Some((run, seq)) = id.strip_prefix(GENERATED_ID_PREFIX).and_then(|rest| rest.split_once('-')) else {
        return false;
    };
    run.len() == 16
        && run.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && (1..=20).contains(&seq.len())
        && seq.bytes().all(|b| b.is_ascii_digit())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    agent_id: String,
    /// (first seq, run id), oldest first.
    runs: Vec<(u64, String)>,
}

impl Identity {
    pub fn new(agent_id: String, runs: Vec<(u64, String)>) -> Identity {
        let mut runs = runs;
        runs.sort();
        Identity { agent_id, runs }
    }

    /// The runs recorded in `wal`, for tools that read it (dump, replay) without appending.
    pub fn load(wal: &Wal, agent_id: String) -> anyhow::Result<Identity> {
        let table = wal.table(RUNS_TABLE)?;
        let mut runs = Vec::new();
        for key in table.keys()? {
            let first_seq = <[u8; 8]>::try_from(key.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| anyhow::anyhow!("the WAL's run table holds a key of {} bytes", key.len()))?;
            let run = table.get(&key)?.unwrap_or_default();
            let run = String::from_utf8(run).context("the WAL's run table holds a run id that is not UTF-8")?;
            runs.push((first_seq, run));
        }
        Ok(Identity::new(agent_id, runs))
    }

    /// Opens a new run: every record appended from now on is this run's. Durable before it returns, so no
    /// record of the run is acknowledged without it.
    pub fn start_run(wal: &Wal, agent_id: String) -> anyhow::Result<Identity> {
        let mut identity = Identity::load(wal, agent_id)?;
        let first_seq = wal.stats()?.last_seq + 1;
        let run = format!("{:016x}", fastrand::u64(..));
        wal.table(RUNS_TABLE)?.insert_all([(first_seq.to_be_bytes().to_vec(), run.clone().into_bytes())])?;
        wal.flush().context("cannot make the new run durable")?;
        tracing::info!(run, first_seq, "WAL run started");
        identity.runs.retain(|(first, _)| *first < first_seq);
        identity.runs.push((first_seq, run));
        Ok(identity)
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The newest run: this process's own when it started one. Empty for a WAL from before runs.
    pub fn run_id(&self) -> &str {
        self.runs.last().map_or("", |(_, run)| run)
    }

    /// The first seq of the newest run.
    pub fn run_first_seq(&self) -> Option<u64> {
        self.runs.last().map(|(first, _)| *first)
    }

    /// The runs before the newest, newest first.
    pub fn earlier_runs(&self) -> impl Iterator<Item = &str> {
        self.runs.iter().rev().skip(1).map(|(_, run)| run.as_str())
    }

    /// The id the sinks deduplicate on: the client's, or the generated one of the record at `seq`.
    pub fn event_id(&self, client: Option<&str>, seq: u64) -> String {
        if let Some(id) = client {
            return id.to_string();
        }
        // One run per start of the agent, so possibly many after a crash loop: a binary search.
        match self.runs.partition_point(|(first, _)| *first <= seq).checked_sub(1) {
            Some(i) => format!("{GENERATED_ID_PREFIX}{}-{seq}", self.runs[i].1),
            None => format!("{}-{seq}", self.agent_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_named_after_the_run_that_appended_it() {
        let identity = Identity::new("host".into(), vec![(200, "bb".into()), (100, "aa".into())]);
        assert_eq!(identity.event_id(None, 99), "host-99", "before the first run: the old form");
        assert_eq!(identity.event_id(None, 100), "~aa-100");
        assert_eq!(identity.event_id(None, 199), "~aa-199");
        assert_eq!(identity.event_id(None, 200), "~bb-200");
        assert_eq!(identity.event_id(Some("mine"), 200), "mine");
        assert_eq!(identity.run_id(), "bb");
    }

    #[test]
    fn generated_ids_are_outside_the_client_alphabet_and_fit_the_column() {
        assert!(!crate::config::is_id_char(GENERATED_ID_PREFIX));
        let identity = Identity::new("h".into(), vec![(1, format!("{:016x}", u64::MAX))]);
        let longest = identity.event_id(None, u64::MAX);
        assert!(longest.len() <= 64);
        assert!(is_generated_id(&longest));
        assert!(is_generated_id("~0123456789abcdef-1"));
        for not in ["h-1", "~0123456789abcdef-", "~0123456789ABCDEF-1", "~0123456789abcde-1", "~0123456789abcdef-1x"] {
            assert!(!is_generated_id(not), "{not}");
        }
    }

    #[test]
    fn every_start_is_a_new_run_and_the_runs_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), telemetry_wal::WalOptions::default()).unwrap();
        let first = Identity::start_run(&wal, "h".into()).unwrap();
        let seq = wal.appender().blocking_append(b"x".to_vec()).unwrap().blocking_durable().unwrap();
        let second = Identity::start_run(&wal, "h".into()).unwrap();
        assert_ne!(first.run_id(), second.run_id());
        let loaded = Identity::load(&wal, "h".into()).unwrap();
        assert_eq!(loaded, second);
        assert_eq!(loaded.event_id(None, seq), first.event_id(None, seq));
        assert_eq!(loaded.event_id(None, seq + 1), format!("~{}-{}", second.run_id(), seq + 1));
        wal.close().unwrap();
    }
}
