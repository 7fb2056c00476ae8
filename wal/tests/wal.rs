//! The WAL against a real sled directory: ordering, persistence, cursors, truncation, the cap, and
//! crashes of a child process that is killed with SIGKILL while it appends.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use telemetry_wal::{
    DeadLetter, Durability, Wal, WalError, WalOptions, MAX_RECORD_BYTES, PRESSURE_DISK_PERCENT,
    PRESSURE_RECORDS_DIVISOR,
};

fn open(dir: &std::path::Path, options: WalOptions) -> Wal {
    Wal::open(dir, options).expect("open WAL")
}

fn append_all(wal: &Wal, payloads: impl IntoIterator<Item = Vec<u8>>) -> Vec<u64> {
    let appender = wal.appender();
    let pending: Vec<_> = payloads.into_iter().map(|p| appender.blocking_append(p).expect("queue")).collect();
    pending.into_iter().map(|p| p.blocking_durable().expect("durable")).collect()
}

fn read_all(wal: &Wal) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let batch = wal.read_after(after, 1000).expect("read");
        let Some(last) = batch.last() else { return out };
        after = last.seq;
        out.extend(batch.into_iter().map(|r| (r.seq, r.payload)));
    }
}

#[test]
fn records_keep_their_order_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = (0..5000).map(|i| format!("record-{i}").into_bytes()).collect();
    let seqs = {
        let wal = open(dir.path(), WalOptions::default());
        let seqs = append_all(&wal, payloads.clone());
        wal.close().unwrap();
        seqs
    };
    assert_eq!(seqs, (1..=5000).collect::<Vec<_>>(), "seqs are dense and start at first_seq");
    let wal = open(dir.path(), WalOptions::default());
    let stored = read_all(&wal);
    assert_eq!(stored.len(), 5000);
    for ((seq, payload), (want_seq, want)) in stored.iter().zip(seqs.iter().zip(&payloads)) {
        assert_eq!((seq, payload), (want_seq, want));
    }
    // Reading from the middle of a chunk starts exactly after the given seq.
    let mid = wal.read_after(2500, 3).unwrap();
    assert_eq!(mid.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2501, 2502, 2503]);
    assert_eq!(mid[0].payload, b"record-2500");
    // New appends continue the sequence.
    assert_eq!(append_all(&wal, [b"next".to_vec()]), vec![5001]);
}

#[test]
fn first_seq_applies_to_a_new_wal_only() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions { first_seq: 1_000_000, ..WalOptions::default() };
    {
        let wal = open(dir.path(), options.clone());
        assert_eq!(append_all(&wal, [b"a".to_vec()]), vec![1_000_000]);
        wal.close().unwrap();
    }
    let wal = open(dir.path(), WalOptions { first_seq: 5, ..options });
    assert_eq!(append_all(&wal, [b"b".to_vec()]), vec![1_000_001]);
}

#[test]
fn cursors_and_labels_persist() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = open(dir.path(), WalOptions::default());
        append_all(&wal, (0..10).map(|i| vec![i]));
        assert_eq!(wal.cursor("mysql").unwrap(), 0);
        wal.set_cursor("mysql", 7).unwrap();
        wal.set_cursor("redis", 3).unwrap();
        wal.set_label("agent_id", "host-a").unwrap();
        wal.close().unwrap();
    }
    let wal = open(dir.path(), WalOptions::default());
    assert_eq!(wal.cursor("mysql").unwrap(), 7);
    assert_eq!(wal.cursor("redis").unwrap(), 3);
    assert_eq!(wal.label("agent_id").unwrap().as_deref(), Some("host-a"));
    assert_eq!(wal.label("other").unwrap(), None);
}

#[test]
fn tables_persist_and_outlive_the_records_they_derive_from() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions { gating_cursors: vec!["redis".into()], ..WalOptions::default() };
    {
        let wal = open(dir.path(), options.clone());
        let seqs = append_all(&wal, (0..100u8).map(|i| vec![i]));
        let table = wal.table("latest").unwrap();
        assert!(table.is_empty());
        table.insert_all([(b"b".to_vec(), b"2".to_vec()), (b"a".to_vec(), b"1".to_vec())]).unwrap();
        table.insert_all([(b"a".to_vec(), b"3".to_vec())]).unwrap();
        wal.set_cursor("redis", *seqs.last().unwrap()).unwrap();
        assert_eq!(wal.truncate().unwrap(), 100);
    }
    let wal = open(dir.path(), options);
    assert!(read_all(&wal).is_empty());
    let table = wal.table("latest").unwrap();
    assert_eq!(table.keys().unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(table.get(b"a").unwrap(), Some(b"3".to_vec()));
    assert_eq!(table.len(), 2);
    assert!(wal.table("other").unwrap().is_empty());
}

#[test]
fn retention_keeps_passed_records_for_a_while_unless_space_runs_short() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        gating_cursors: vec!["mysql".into()],
        retain: Duration::from_millis(400),
        ..WalOptions::default()
    };
    let wal = open(dir.path(), options.clone());
    let seqs = append_all(&wal, std::iter::repeat_n(vec![7u8; 100], 1000));
    wal.set_cursor("mysql", *seqs.last().unwrap()).unwrap();
    assert_eq!(wal.truncate().unwrap(), 0, "records younger than the retention are kept");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(wal.truncate().unwrap(), 1000);
    wal.close().unwrap();
    drop(wal);

    // Records filling 1/PRESSURE_RECORDS_DIVISOR of the cap are dropped whatever their age.
    let live = {
        let wal = open(dir.path(), options.clone());
        let seqs = append_all(&wal, std::iter::repeat_n(vec![7u8; 100], 1000));
        wal.set_cursor("mysql", *seqs.last().unwrap()).unwrap();
        let live = wal.stats().unwrap().live_bytes;
        wal.close().unwrap();
        live
    };
    let tight = WalOptions { max_bytes: live * PRESSURE_RECORDS_DIVISOR, retain: Duration::from_secs(3600), ..options };
    let wal = open(dir.path(), tight);
    assert_eq!(wal.truncate().unwrap(), 1000);
}

#[test]
fn retention_never_makes_appends_fail_when_the_sinks_keep_up() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        gating_cursors: vec!["mysql".into()],
        retain: Duration::from_secs(3600),
        max_bytes: 16 << 20,
        ..WalOptions::default()
    };
    let wal = open(dir.path(), options);
    let appender = wal.appender();
    // Three times the cap, in rounds; the sink passes everything after each round.
    for round in 0..48 {
        let pending: Vec<_> = (0..1000).map(|_| appender.blocking_append(vec![9u8; 1000]).unwrap()).collect();
        let mut last = 0;
        for p in pending {
            match p.blocking_durable() {
                Ok(seq) => last = seq,
                Err(e) => panic!("round {round}: {e}; stats {:?}", wal.stats().unwrap()),
            }
        }
        wal.set_cursor("mysql", last).unwrap();
        wal.truncate().unwrap();
    }
}

#[test]
fn truncation_waits_for_every_gating_cursor_frees_space_and_keeps_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions { gating_cursors: vec!["mysql".into(), "redis".into()], ..WalOptions::default() };
    let record = vec![0x5a; 1000];
    let wal = open(dir.path(), options.clone());
    let seqs = append_all(&wal, std::iter::repeat_n(record.clone(), 20_000));
    let last = *seqs.last().unwrap();
    let full = wal.stats().unwrap().disk_bytes;

    wal.set_cursor("mysql", last).unwrap();
    assert_eq!(wal.truncate().unwrap(), 0, "redis has not passed anything yet");
    wal.set_cursor("redis", 10_000).unwrap();
    let removed = wal.truncate().unwrap();
    assert!(removed > 9000 && removed <= 10_000, "removed {removed}");
    assert_eq!(read_all(&wal).first().map(|r| r.0).unwrap(), last - (20_000 - removed) + 1);

    wal.set_cursor("redis", last).unwrap();
    assert_eq!(wal.truncate().unwrap(), 20_000 - removed);
    assert_eq!(wal.stats().unwrap().first_seq, None);
    // Space is reused: eight more rounds of the same volume (without reuse: ~9x the first round's disk use)
    // leave the directory within a small multiple of one round.
    for _ in 0..8 {
        let seqs = append_all(&wal, std::iter::repeat_n(record.clone(), 20_000));
        wal.set_cursor("mysql", *seqs.last().unwrap()).unwrap();
        wal.set_cursor("redis", *seqs.last().unwrap()).unwrap();
        wal.truncate().unwrap();
    }
    let after = wal.stats().unwrap().disk_bytes;
    assert!(after < full * 4, "disk use grew from {full} to {after} bytes although everything was truncated");
    wal.close().unwrap();
    drop(wal);

    // The high-water mark survives an empty WAL: seqs are never reused.
    let wal = open(dir.path(), options);
    assert_eq!(append_all(&wal, [b"x".to_vec()]), vec![last + 8 * 20_000 + 1]);
}

#[test]
fn dead_letters_persist_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let letter = DeadLetter {
        sink: "mysql".into(),
        seq: 42,
        error: "Data too long for column 'name'".into(),
        at_ms: 1,
        payload: b"payload".to_vec(),
    };
    {
        let wal = open(dir.path(), WalOptions::default());
        wal.add_dead_letter(&letter).unwrap();
        wal.add_dead_letter(&DeadLetter { sink: "redis".into(), ..letter.clone() }).unwrap();
        wal.close().unwrap();
    }
    let wal = open(dir.path(), WalOptions::default());
    let letters = wal.dead_letters().unwrap();
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0], letter);
    assert!(wal.remove_dead_letter("mysql", 42).unwrap());
    assert!(!wal.remove_dead_letter("mysql", 42).unwrap());
    assert_eq!(wal.dead_letters().unwrap().len(), 1);
}

#[test]
fn without_gating_cursors_nothing_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    append_all(&wal, (0..100).map(|i| vec![i]));
    wal.set_cursor("mysql", 100).unwrap();
    assert_eq!(wal.truncate().unwrap(), 0);
    assert_eq!(read_all(&wal).len(), 100);
}

#[test]
fn the_cap_refuses_appends_and_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let max_bytes = 24 << 20;
    let wal = open(dir.path(), WalOptions { max_bytes, gating_cursors: vec!["mysql".into()], ..WalOptions::default() });
    let appender = wal.appender();
    let mut acked = Vec::new();
    let full = loop {
        let pending: Vec<_> = (0..500).map(|_| appender.blocking_append(vec![7; 2000]).unwrap()).collect();
        let results: Vec<_> = pending.into_iter().map(|p| p.blocking_durable()).collect();
        let mut full = None;
        for result in results {
            match result {
                Ok(seq) => acked.push(seq),
                Err(e @ WalError::Full { .. }) => full = Some(e),
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        if let Some(e) = full {
            break e;
        }
        assert!(acked.len() < 1_000_000, "the cap never triggered");
    };
    assert!(full.to_string().contains("WAL is full"), "{full}");
    let stats = wal.stats().unwrap();
    assert!(stats.disk_bytes <= max_bytes + (16 << 20), "disk {} far beyond the cap", stats.disk_bytes);
    let stored: Vec<u64> = read_all(&wal).into_iter().map(|r| r.0).collect();
    assert_eq!(stored, acked, "every acked record is stored, nothing else");
    // Once the sink has passed everything, truncation makes room again.
    wal.set_cursor("mysql", *acked.last().unwrap()).unwrap();
    wal.truncate().unwrap();
    assert_eq!(wal.stats().unwrap().live_bytes, 0);
    let more = append_all(&wal, std::iter::repeat_n(vec![1; 2000], 1000));
    assert_eq!(more.len(), 1000, "room again after truncation");
}

#[test]
fn oversized_records_are_refused_and_max_size_records_stay_out_of_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    let appender = wal.appender();
    match appender.blocking_append(vec![0; MAX_RECORD_BYTES + 1]) {
        Err(WalError::TooLarge { len, max }) => assert_eq!((len, max), (MAX_RECORD_BYTES + 1, MAX_RECORD_BYTES)),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("an oversized record was accepted"),
    }
    // sled stores big pages as blob files that it never fsyncs; our sizing must keep every page inline.
    append_all(&wal, (0..200u8).map(|i| vec![i; MAX_RECORD_BYTES]));
    let blobs = dir.path().join("sled").join("blobs");
    let count = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    assert_eq!(count, 0, "sled wrote {count} blob files");
    assert_eq!(read_all(&wal).len(), 200);
}

#[test]
fn fsync_mode_syncs_the_data_file_once_per_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), WalOptions::default());
    let before = wal.stats().unwrap();
    append_all(&wal, (0..1000).map(|i: u32| i.to_be_bytes().to_vec()));
    let after = wal.stats().unwrap();
    let commits = after.group_commits - before.group_commits;
    assert!(commits >= 1);
    assert!(commits < 1000, "1000 queued appends took {commits} group commits: no grouping");
    assert_eq!(after.data_syncs - before.data_syncs, commits, "one fdatasync per group commit");
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _wal = open(dir.path(), WalOptions::default());
    match Wal::open(dir.path(), WalOptions::default()) {
        Err(e @ WalError::Locked { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&std::process::id().to_string()) && msg.contains("in use"), "{msg}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("two handles on one WAL"),
    }
}

#[test]
fn interval_mode_records_become_readable_once_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions { durability: Durability::Interval { interval_ms: 20 }, ..WalOptions::default() };
    let last = {
        let wal = open(dir.path(), options.clone());
        let seqs = append_all(&wal, (0..100u8).map(|i| vec![i]));
        // Readers see records once the flusher made them durable.
        let deadline = Instant::now() + Duration::from_secs(5);
        while read_all(&wal).len() < 100 {
            assert!(Instant::now() < deadline, "interval flusher never made the records durable");
            std::thread::sleep(Duration::from_millis(5));
        }
        wal.close().unwrap();
        *seqs.last().unwrap()
    };
    let wal = open(dir.path(), options);
    assert_eq!(read_all(&wal).len(), 100);
    let next = append_all(&wal, [vec![0]])[0];
    assert!(next > last, "seq {next} reused after {last}");
}

#[test]
fn a_damaged_chunk_anywhere_makes_open_refuse() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = open(dir.path(), WalOptions::default());
        // Several group commits, so the damaged chunk is not the last one.
        for round in 0..5u8 {
            append_all(&wal, (0..200u8).map(|i| vec![round ^ i; 100]));
        }
        wal.close().unwrap();
    }
    // Damage the first chunk through sled itself, as a bad sector under sled's own checksum would not.
    {
        let db = sled::Config::new().path(dir.path().join("sled")).segment_size(8 << 20).open().unwrap();
        let records = db.open_tree("records").unwrap();
        assert!(records.len() > 2, "expected several chunks");
        let (key, value) = records.first().unwrap().unwrap();
        let mut bad = value.to_vec();
        let at = bad.len() - 3;
        bad[at] ^= 0xff;
        records.insert(key, bad).unwrap();
        db.flush().unwrap();
    }
    match Wal::open(dir.path(), WalOptions::default()) {
        Err(e @ WalError::Corrupt { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("checksum") && msg.contains(&dir.path().display().to_string()), "{msg}");
            assert!(msg.contains("chunk at seq 1:"), "names the first chunk: {msg}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a damaged WAL opened silently"),
    }
    // Salvage drops that chunk alone; every other record stays, and nothing garbled is ever read.
    let salvage = Wal::salvage(dir.path(), &WalOptions::default()).unwrap();
    assert_eq!(salvage.damaged_chunks.len(), 1);
    assert_eq!(salvage.damaged_chunks[0].0, 1);
    assert_eq!(salvage.lost, None);
    let wal = open(dir.path(), WalOptions::default());
    let stored = read_all(&wal);
    assert_eq!(stored.len() as u64, salvage.kept_records);
    assert!(stored.len() < 1000 && stored.last().unwrap().0 == 1000, "{} records kept", stored.len());
}

/// The child side of the crash tests: appends from 4 threads and prints `seq payload` for every ack.
#[test]
#[ignore = "run by the crash tests as a child process"]
fn crash_child() {
    let Ok(dir) = std::env::var("WAL_CRASH_DIR") else { return };
    let durability = match std::env::var("WAL_CRASH_INTERVAL_MS") {
        Ok(ms) => Durability::Interval { interval_ms: ms.parse().unwrap() },
        Err(_) => Durability::Fsync,
    };
    let truncating = std::env::var_os("WAL_CRASH_TRUNCATE").is_some();
    let gating_cursors = if truncating { vec!["sink".to_string()] } else { Vec::new() };
    let wal = open(dir.as_ref(), WalOptions { durability, gating_cursors, ..WalOptions::default() });
    if truncating {
        // A sink that keeps up, as the forwarder does: read, move the cursor, derive a table row, truncate.
        let wal = wal.clone();
        std::thread::spawn(move || {
            let table = wal.table("latest").unwrap();
            loop {
                let after = wal.cursor("sink").unwrap();
                let batch = wal.read_after(after, 500).unwrap();
                if let Some(last) = batch.last() {
                    table.insert_all([(b"last".to_vec(), last.payload.clone())]).unwrap();
                    wal.set_cursor("sink", last.seq).unwrap();
                    wal.truncate().unwrap();
                } else {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
    }
    let stdout = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    // WAL_CRASH_HEAVY: more producers and larger records, so that sled fills, cleans and reuses segments.
    let heavy = std::env::var_os("WAL_CRASH_HEAVY").is_some();
    let (producers, max_pad) = if heavy { (16, 3000) } else { (4, 300) };
    let threads: Vec<_> = (0..producers)
        .map(|t| {
            let (appender, stdout) = (wal.appender(), stdout.clone());
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let payload = format!("t{t}-{i}-{}", "x".repeat((i % max_pad) as usize));
                    let seq =
                        appender.blocking_append(payload.clone().into_bytes()).unwrap().blocking_durable().unwrap();
                    // One write per line, tagged, so that the test harness's own output and a line cut short
                    // by the kill are never taken for an ack.
                    let line = format!("ack {seq} {payload}\n");
                    let mut out = stdout.lock().unwrap();
                    out.write_all(line.as_bytes()).unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Runs the crash child for `run_for`, SIGKILLs it and returns what it acked.
fn run_crash_child(dir: &std::path::Path, interval_ms: Option<u64>, run_for: Duration) -> Vec<(u64, String)> {
    run_crash_child_with(dir, interval_ms, false, run_for)
}

fn run_crash_child_with(
    dir: &std::path::Path,
    interval_ms: Option<u64>,
    truncate: bool,
    run_for: Duration,
) -> Vec<(u64, String)> {
    let mut command = Command::new(std::env::current_exe().unwrap());
    if truncate {
        command.env("WAL_CRASH_TRUNCATE", "1");
    }
    command
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("WAL_CRASH_DIR", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(ms) = interval_ms {
        command.env("WAL_CRASH_INTERVAL_MS", ms.to_string());
    }
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            let text = String::from_utf8_lossy(&line);
            // Without its newline, the line was cut short by the kill.
            if let Some(ack) = text.strip_suffix('\n').and_then(|l| l.split_once("ack ").map(|(_, a)| a)) {
                if let Some((seq, payload)) = ack.split_once(' ') {
                    lines.push((seq.parse::<u64>().expect("an ack's seq"), payload.to_string()));
                }
            }
            line.clear();
        }
        lines
    });
    std::thread::sleep(run_for);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap()
}

#[test]
fn interval_mode_never_reuses_a_seq_acked_before_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    // Flushes are rare, so most acks are lost with the process; their seqs must still never come back.
    let acked = run_crash_child(dir.path(), Some(60_000), Duration::from_millis(400));
    let max_acked = acked.iter().map(|(seq, _)| *seq).max().expect("the child acked nothing");
    let wal =
        open(dir.path(), WalOptions { durability: Durability::Interval { interval_ms: 10 }, ..WalOptions::default() });
    let next = append_all(&wal, [b"after".to_vec()])[0];
    assert!(next > max_acked, "seq {next} handed out again (acked before the crash up to {max_acked})");
}

#[test]
fn crash_test_every_acked_record_survives_kill_9() {
    let rounds: u32 = std::env::var("WAL_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut rng = 0x9e3779b97f4a7c15u64;
    for _ in 0..rounds {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let lines = run_crash_child(dir.path(), None, Duration::from_millis(150 + rng % 400));
        for (seq, payload) in lines {
            assert!(acked.insert(seq, payload).is_none(), "seq {seq} acked twice");
        }
    }
    // A kill may land while a slow (loaded) machine still starts the child, which is a crash point worth
    // having; but some round must have appended, or the test checked nothing.
    assert!(!acked.is_empty(), "no child acked anything before it was killed, in {rounds} rounds");
    let wal = open(dir.path(), WalOptions::default());
    let stored: BTreeMap<u64, String> =
        read_all(&wal).into_iter().map(|(seq, p)| (seq, String::from_utf8(p).unwrap())).collect();
    for (seq, payload) in &acked {
        assert_eq!(stored.get(seq), Some(payload), "acked record {seq} lost or changed");
    }
    eprintln!("crash test: {rounds} kills, {} acked records, all present", acked.len());
}

#[test]
fn crash_test_truncation_never_loses_an_acked_record_nor_reuses_a_seq() {
    let rounds: u32 = std::env::var("WAL_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut rng = 0x2545f4914f6cdd1du64;
    let options = || WalOptions { gating_cursors: vec!["sink".into()], ..WalOptions::default() };
    for round in 0..rounds {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let run_ms = if std::env::var_os("WAL_CRASH_HEAVY").is_some() { 500 + rng % 4000 } else { 150 + rng % 400 };
        let lines = run_crash_child_with(dir.path(), None, true, Duration::from_millis(run_ms));
        for (seq, payload) in lines {
            assert!(acked.insert(seq, payload).is_none(), "seq {seq} acked twice");
        }
        // What the sink had not passed must be there, and no acked seq may be handed out again.
        let wal = open(dir.path(), options());
        let cursor = wal.cursor("sink").unwrap();
        let stats = wal.stats().unwrap();
        let stored: BTreeMap<u64, String> =
            read_all(&wal).into_iter().map(|(seq, p)| (seq, String::from_utf8(p).unwrap())).collect();
        let max_acked = acked.keys().next_back().copied().unwrap_or(0);
        assert!(
            stats.last_seq >= max_acked,
            "round {round}: the WAL reopened at seq {} but seq {max_acked} was acked (cursor {cursor})",
            stats.last_seq
        );
        for (seq, payload) in acked.range(cursor + 1..) {
            assert_eq!(stored.get(seq), Some(payload), "round {round}: acked record {seq} lost (cursor {cursor})");
        }
        wal.close().unwrap();
    }
    assert!(!acked.is_empty(), "no child acked anything before it was killed, in {rounds} rounds");
    eprintln!("truncating crash test: {rounds} kills, {} acked records, none lost", acked.len());
}

/// Readers tailing the WAL while appends and truncation run must see every seq, in order, with no gap.
#[test]
fn readers_see_every_record_while_appends_and_truncation_run() {
    let secs: u64 = std::env::var("WAL_READER_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let wal =
        open(dir.path(), WalOptions { gating_cursors: vec!["slow".into(), "fast".into()], ..WalOptions::default() });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producers: Vec<_> = (0..8)
        .map(|t| {
            let (appender, stop) = (wal.appender(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let pending: Vec<_> = (0..32)
                        .map(|j| {
                            appender
                                .blocking_append(
                                    format!("t{t}-{i}-{j}-{}", "y".repeat((i % 200) as usize)).into_bytes(),
                                )
                                .unwrap()
                        })
                        .collect();
                    for p in pending {
                        p.blocking_durable().unwrap();
                    }
                    i += 1;
                }
            })
        })
        .collect();
    // Two tailing readers of different speeds move their cursors; truncation follows the slower one.
    let readers: Vec<_> = [("fast", 0u64, 1000usize), ("slow", 2, 5000)]
        .into_iter()
        .map(|(name, pause_ms, max)| {
            let (wal, stop) = (wal.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut after = 0u64;
                let mut read = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let batch = wal.read_after(after, max).unwrap();
                    for record in &batch {
                        assert!(
                            after == 0 || record.seq == after + 1,
                            "reader {name}: after seq {after} came {} (a gap of {})",
                            record.seq,
                            record.seq - after - 1
                        );
                        after = record.seq;
                    }
                    read += batch.len() as u64;
                    if !batch.is_empty() {
                        wal.set_cursor(name, after).unwrap();
                    }
                    std::thread::sleep(Duration::from_millis(pause_ms));
                }
                read
            })
        })
        .collect();
    let truncator = {
        let (wal, stop) = (wal.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                wal.truncate().unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for p in producers {
        p.join().unwrap();
    }
    truncator.join().unwrap();
    let read: Vec<u64> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    eprintln!("concurrent readers: {read:?} records read, no gap");
}

/// Damage to sled's data file (cut short, bytes flipped, a block zeroed): sled's recovery silently drops
/// everything after the damage, so open must notice the loss (the acknowledged mark) and refuse; salvage keeps
/// exactly the intact records and never lets a lost seq be handed out again.
#[test]
fn a_damaged_data_file_is_refused_then_salvaged_without_garbage_or_reused_seqs() {
    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, Damage); 4] = [
        ("cut to half", |b| b.truncate(b.len() / 2)),
        ("last 100 bytes cut", |b| b.truncate(b.len() - 100)),
        ("64 bytes flipped early", |b| {
            let at = b.len() / 10;
            b[at..at + 64].iter_mut().for_each(|x| *x ^= 0x5a)
        }),
        ("a 4 KiB block zeroed", |b| {
            let at = b.len() / 3;
            b[at..at + 4096].iter_mut().for_each(|x| *x = 0)
        }),
    ];
    for (name, damage) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut written = BTreeMap::new();
        {
            let wal = open(dir.path(), WalOptions::default());
            for round in 0..20u32 {
                let payloads: Vec<Vec<u8>> =
                    (0..500u32).map(|i| format!("r{round}-{i}-{}", "z".repeat(100)).into_bytes()).collect();
                let seqs = append_all(&wal, payloads.clone());
                written.extend(seqs.into_iter().zip(payloads));
            }
            wal.close().unwrap();
        }
        let max_acked = *written.keys().next_back().unwrap();
        let data = dir.path().join("sled").join("db");
        let mut bytes = std::fs::read(&data).unwrap();
        damage(&mut bytes);
        std::fs::write(&data, &bytes).unwrap();

        match Wal::open(dir.path(), WalOptions::default()) {
            Err(e @ WalError::Corrupt { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("seqs up to {max_acked} were acknowledged")), "{name}: {msg}");
            }
            Err(e) => panic!("{name}: unexpected error {e}"),
            Ok(_) => panic!("{name}: a WAL that lost acknowledged records opened silently"),
        }
        let salvage = Wal::salvage(dir.path(), &WalOptions::default()).unwrap();
        let lost = salvage.lost.expect("the loss is reported");
        assert_eq!(lost.last, max_acked, "{name}");
        assert_eq!(salvage.next_seq_after, max_acked, "{name}");

        let wal = open(dir.path(), WalOptions::default());
        let stored = read_all(&wal);
        assert_eq!(stored.len() as u64, salvage.kept_records, "{name}");
        for (seq, payload) in &stored {
            assert_eq!(written.get(seq), Some(payload), "{name}: seq {seq} is not what was written");
        }
        assert!(stored.iter().all(|(seq, _)| *seq < lost.first), "{name}: kept records lie before the loss");
        let next = append_all(&wal, [b"after salvage".to_vec()])[0];
        assert!(next > max_acked, "{name}: seq {next} handed out again (acknowledged up to {max_acked})");
        eprintln!(
            "{name}: kept {} of {} records, lost seqs {}..={}",
            stored.len(),
            written.len(),
            lost.first,
            lost.last
        );
    }
}

#[test]
fn the_acknowledged_mark_never_makes_a_healthy_wal_look_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let options = || WalOptions { first_seq: 1_000_000, gating_cursors: vec!["sink".into()], ..WalOptions::default() };
    // Opened and closed without a single record.
    open(dir.path(), options()).close().unwrap();
    let wal = open(dir.path(), options());
    // Every record truncated: the high-water mark still covers the acknowledged seqs.
    let seqs = append_all(&wal, (0..100u8).map(|i| vec![i; 10]));
    wal.set_cursor("sink", *seqs.last().unwrap()).unwrap();
    assert_eq!(wal.truncate().unwrap(), 100);
    wal.close().unwrap();
    drop(wal);
    let wal = open(dir.path(), options());
    assert!(append_all(&wal, [b"x".to_vec()])[0] > *seqs.last().unwrap());
}

/// A power cut can damage the last chunk while the acknowledged mark lags (it is synced about once a second):
/// salvage then cannot know how far the damaged chunk reached. Seqs already handed out from it must not come
/// back (they are in generated event ids MySQL may hold): the next seq is at least the current time in
/// microseconds, as for a new WAL.
#[test]
fn salvage_of_a_damaged_last_chunk_never_reuses_its_seqs() {
    let now_us = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
    let options = || WalOptions { first_seq: now_us(), ..WalOptions::default() };
    // The records group into chunks as the writer happens to pick them up, and on a loaded machine the last
    // chunk may hold a single record, which would not test what follows: set up again until it holds several
    // (nearly always the first time).
    let (dir, max_acked) = (0..10)
        .find_map(|_| {
            let dir = tempfile::tempdir().unwrap();
            let (first_mark, max_acked) = {
                let wal = open(dir.path(), options());
                let first = append_all(&wal, (0..10u8).map(|i| vec![i; 100]));
                // One group of several chunks, after the mark was last synced.
                let seqs = append_all(&wal, (0..200u8).map(|i| vec![i; 100]));
                wal.close().unwrap();
                (*first.last().unwrap(), *seqs.last().unwrap())
            };
            // The mark as a power cut may leave it: behind, at the first group.
            let mut mark = first_mark.to_be_bytes().to_vec();
            mark.extend_from_slice(&crc32fast::hash(&mark).to_be_bytes());
            std::fs::write(dir.path().join("acked-seq"), mark).unwrap();
            // The last chunk damaged (under sled's own checksum, as a torn write sled replayed would be).
            let damaged_first = {
                let db = sled::Config::new().path(dir.path().join("sled")).segment_size(8 << 20).open().unwrap();
                let records = db.open_tree("records").unwrap();
                assert!(records.len() > 2, "expected several chunks");
                let (key, value) = records.last().unwrap().unwrap();
                let mut bad = value.to_vec();
                let at = bad.len() - 3;
                bad[at] ^= 0xff;
                records.insert(&key, bad).unwrap();
                db.flush().unwrap();
                u64::from_be_bytes(key.as_ref().try_into().unwrap())
            };
            (damaged_first < max_acked).then_some((dir, max_acked))
        })
        .expect("in 10 tries, the last chunk never held several records");

    let salvage = Wal::salvage(dir.path(), &options()).unwrap();
    assert_eq!(salvage.damaged_chunks.len(), 1);
    assert!(
        salvage.next_seq_after >= max_acked,
        "salvage restarts at {} (acked up to {max_acked})",
        salvage.next_seq_after
    );
    let wal = open(dir.path(), options());
    let next = append_all(&wal, [b"after salvage".to_vec()])[0];
    assert!(next > max_acked, "seq {next} handed out again (acknowledged up to {max_acked})");
}

/// docs/operations.md ("Repair after an outage") and the config reference, packaging/agent.toml.
#[test]
fn the_docs_state_the_early_truncation_thresholds_of_the_code() {
    let read = |path: &str| std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let operations = read("docs/operations.md");
    let stated = format!("1/{PRESSURE_RECORDS_DIVISOR} of `max_bytes` or the directory {PRESSURE_DISK_PERCENT}% of it");
    let mentions: Vec<&str> =
        operations.lines().filter(|l| l.contains("drops them earlier when records reach")).collect();
    assert!(
        !mentions.is_empty() && mentions.iter().all(|l| l.contains(&stated)),
        "docs/operations.md: {mentions:?}, not {stated:?}"
    );
    let config = read("packaging/agent.toml");
    let config_line = config.lines().find(|l| l.starts_with("# Dropped earlier when records fill")).unwrap();
    assert!(config_line.contains(&stated.replace('`', "")), "{config_line}");
}
