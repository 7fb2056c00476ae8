//! The socket protocol against the real agent binary: answers, error codes, pipelining, concurrency,
//! backpressure, restarts and shutdown. What is stored is checked by reading the WAL after the agent stops.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::kit::agent::{output_with_stdin, Agent, BIN};
use crate::kit::client::{metric, Client};
use crate::kit::serial::alone;
use crate::kit::util::{proc_status_kib, raise_fd_limit};
use serde_json::Value;
use telemetry_agent::event::Event;

fn assert_error(answer: &Value, code: &str, needle: &str) {
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["code"], code, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains(needle), "error {error:?} does not mention {needle:?}");
}

#[test]
fn an_event_is_acked_with_its_seq_and_event_id_and_stored_exactly() {
    let mut agent = Agent::start("");
    let mut client = agent.connect();
    let generated = client.request(&metric("p-001", "equity", 10234.5));
    assert_eq!(generated["ok"], true, "{generated}");
    let seq = generated["seq"].as_u64().unwrap();
    // `~{run}-{seq}`: named after this start of the agent, in a form no client may send.
    let generated_id = generated["event_id"].as_str().unwrap();
    assert!(telemetry_agent::identity::is_generated_id(generated_id), "{generated}");
    assert!(generated_id.ends_with(&format!("-{seq}")), "{generated}");

    let trade = r#"{"kind":"trade","profile_id":"p-001","symbol":"BTCUSDT","side":"buy","quantity":"0.5",
        "price":43000.10,"pnl":"12.5","fees":"0.02","opened_at":"2026-11-27T09:59:00Z","closed_at":1795773600123,
        "meta":{"strategy":"grid"},"event_id":"trade-42"}"#
        .replace('\n', "");
    let own = client.request(&trade);
    assert_eq!(own["event_id"], "trade-42", "{own}");
    assert!(own["seq"].as_u64().unwrap() > seq);
    drop(client);
    assert!(agent.stop().success());

    let events = agent.wal_events();
    assert_eq!(events.len(), 2);
    let Event::Trade(t) = &events[1].1 else { panic!("second event is not a trade") };
    assert_eq!((t.quantity.as_str(), t.price.as_str(), t.pnl.as_deref()), ("0.5", "43000.10", Some("12.5")));
    assert_eq!(t.closed_at_us, 1_795_773_600_123_000);
    assert_eq!(t.opened_at_us, Some(1_795_773_540_000_000));
    assert_eq!(t.meta.as_deref(), Some(r#"{"strategy":"grid"}"#));
    assert_eq!(t.event_id.as_deref(), Some("trade-42"));
}

#[test]
fn bad_lines_get_specific_errors_change_nothing_and_the_connection_keeps_working() {
    let mut agent = Agent::start("");
    let mut client = agent.connect();
    assert_error(&client.request("{\"kind\":"), "invalid_json", "not valid JSON");
    client.send_raw(b"\xff\xfe{}\n");
    assert_error(&client.answer().unwrap(), "invalid_json", "not valid JSON");
    assert_error(&client.request(r#"{"kind":"metric","profile_id":"p","value":1}"#), "invalid_event", "`name`");
    assert_error(
        &client.request(r#"{"kind":"metric","profile_id":"p","name":"n","value":1,"colour":"red"}"#),
        "invalid_event",
        "colour",
    );
    let bad_decimal =
        r#"{"kind":"trade","profile_id":"p","symbol":"X","side":"buy","quantity":"1.000000001","price":1}"#;
    assert_error(&client.request(bad_decimal), "invalid_event", "`quantity`");
    assert_eq!(client.request(&metric("p", "ok", 1.0))["ok"], true, "the connection still works");
    drop(client);
    assert!(agent.stop().success());
    assert_eq!(agent.wal_events().len(), 1, "only the valid line was stored");
}

#[test]
fn a_time_more_than_max_future_secs_ahead_is_refused_and_an_hour_ahead_is_taken() {
    let agent = Agent::start("");
    let mut client = agent.connect();
    let now_ms = telemetry_agent::clock::now_us() / 1000;
    let (hour, two_days) = (now_ms + 3_600_000, now_ms + 2 * 86_400_000);
    let metric_at = |ts: i64| format!(r#"{{"kind":"metric","profile_id":"p","name":"n","value":1,"ts":{ts}}}"#);
    assert_eq!(client.request(&metric_at(hour))["ok"], true, "an hour ahead is a clock skew, not an error");
    let refused = client.request(&metric_at(two_days));
    assert_error(&refused, "invalid_event", "`ts`");
    assert_error(&refused, "invalid_event", "86400");
    // A trade's `closed_at` orders trades in Redis the same way.
    let trade_at = |closed_at: i64| {
        format!(
            r#"{{"kind":"trade","profile_id":"p","symbol":"X","side":"buy","quantity":1,"price":1,"closed_at":{closed_at}}}"#
        )
    };
    assert_eq!(client.request(&trade_at(hour))["ok"], true);
    assert_error(&client.request(&trade_at(two_days)), "invalid_event", "`closed_at`");
    // The limit is the operator's.
    drop(client);
    let agent = Agent::start("[ingest]\nmax_future_secs = 259200");
    assert_eq!(agent.connect().request(&metric_at(two_days))["ok"], true, "3 days allowed");
}

#[test]
fn a_line_too_long_is_answered_then_the_connection_closes() {
    let agent = Agent::start("[ingest]\nmax_line_bytes = 2048");
    let mut client = agent.connect();
    client.send(&format!(r#"{{"kind":"metric","profile_id":"p","name":"{}","value":1}}"#, "x".repeat(4000)));
    assert_error(&client.answer().unwrap(), "line_too_long", "2048 bytes");
    assert!(client.answer().is_none(), "the connection stays open after line_too_long");
    // Others are unaffected.
    assert_eq!(agent.connect().request(&metric("p", "n", 1.0))["ok"], true);
}

/// The agent's resident memory in KiB (`VmRSS` of /proc/<pid>/status).
fn rss_kib(pid: i32) -> u64 {
    proc_status_kib(pid, "VmRSS:").expect("VmRSS in /proc/<pid>/status")
}

#[test]
fn a_huge_line_without_newline_does_not_grow_memory_and_gets_line_too_long() {
    let agent = Agent::start("");
    // Warm: the first event allocates what every event needs (WAL writer, buffers).
    assert_eq!(agent.connect().request(&metric("p", "warm", 1.0))["ok"], true);
    let (pid, baseline) = (agent.pid(), rss_kib(agent.pid()));
    let done = std::sync::atomic::AtomicBool::new(false);
    let (peak, sent) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak.max(rss_kib(pid))
        });
        let mut client = agent.connect();
        let chunk = vec![b'a'; 1 << 20];
        // 100 MiB, never a newline: the agent must answer long before we finish.
        let mut sent = 0usize;
        while sent < 100 << 20 {
            if client.stream.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        assert_error(&client.answer().unwrap(), "line_too_long", "65536 bytes");
        assert!(sent < 100 << 20 || client.answer().is_none());
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (sampler.join().unwrap(), sent)
    });
    // The agent holds at most max_line_bytes of the line (plus socket buffers), not what was sent.
    let grown_kib = peak.saturating_sub(baseline);
    assert!(grown_kib < 8 << 10, "RSS grew by {grown_kib} KiB (from {baseline} KiB) while {sent} bytes were sent");
}

#[test]
fn wal_full_is_answered_and_nothing_is_dropped() {
    let mut agent = Agent::start("[wal]\nmax_bytes = 16777216\n[ingest]\nmax_line_bytes = 98304");
    let mut client = agent.connect();
    let meta = format!(r#"{{"pad":"{}"}}"#, "m".repeat(60_000));
    let mut acked = 0;
    let full = loop {
        let line = format!(
            r#"{{"kind":"trade","profile_id":"p","symbol":"X","side":"sell","quantity":1,"price":2,"meta":{meta}}}"#
        );
        let answer = client.request(&line);
        if answer["ok"] == true {
            acked += 1;
            assert!(acked < 5000, "the cap never triggered");
        } else {
            break answer;
        }
    };
    assert_error(&full, "wal_full", "WAL is full");
    // A full WAL refuses, it does not close the connection.
    assert_error(&client.request(&metric("p", "n", 1.0)), "wal_full", "cap");
    drop(client);
    assert!(agent.stop().success());
    assert_eq!(agent.wal_events().len(), acked, "exactly the acked events are stored");
}

#[test]
fn connections_beyond_the_limit_get_overloaded() {
    let agent = Agent::start("[ingest]\nmax_connections = 2");
    // The start-up probe's connection may still hold a slot for a moment.
    let connect_ok = || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut client = agent.connect();
            if client.try_request(&metric("p", "a", 1.0)).is_some_and(|a| a["ok"] == true) {
                return client;
            }
            assert!(Instant::now() < deadline, "no free connection slot");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let first = connect_ok();
    let _second = connect_ok();
    let mut third = agent.connect();
    assert_error(&third.answer().unwrap(), "overloaded", "max_connections");
    assert!(third.answer().is_none());
    drop(first);
    // The slot comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = agent.connect().try_request(&metric("p", "c", 1.0));
        if answer.as_ref().is_some_and(|a| a["ok"] == true) {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back: {answer:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ten_thousand_pipelined_lines_are_answered_in_order() {
    let agent = Agent::start("");
    let mut client = agent.connect();
    let writer_stream = client.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut out = std::io::BufWriter::new(writer_stream);
        for i in 0..10_000 {
            let line =
                format!(r#"{{"kind":"metric","profile_id":"p-{}","name":"m","value":{i},"event_id":"e-{i}"}}"#, i % 7);
            writeln!(out, "{line}").unwrap();
        }
        out.flush().unwrap();
    });
    let mut last_seq = 0;
    for i in 0..10_000 {
        let answer = client.answer().unwrap();
        assert_eq!(answer["event_id"], format!("e-{i}"), "answer {i} out of order");
        let seq = answer["seq"].as_u64().unwrap();
        assert!(seq > last_seq);
        last_seq = seq;
    }
    sender.join().unwrap();
}

#[test]
fn five_hundred_concurrent_connections_are_all_answered() {
    // A thousand descriptors, in the table this process shares with other tests.
    raise_fd_limit();
    let mut agent = Agent::start("");
    let socket = agent.socket.clone();
    let clients: Vec<_> = (0..500)
        .map(|c| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(&socket);
                for i in 0..20 {
                    client.send(&format!(
                        r#"{{"kind":"metric","profile_id":"p-{c}","name":"m","value":{i},"event_id":"c{c}-{i}"}}"#
                    ));
                }
                (0..20).map(|_| client.answer().unwrap()["event_id"].as_str().unwrap().to_string()).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked = HashSet::new();
    for (c, handle) in clients.into_iter().enumerate() {
        let ids = handle.join().unwrap();
        assert_eq!(ids, (0..20).map(|i| format!("c{c}-{i}")).collect::<Vec<_>>());
        acked.extend(ids);
    }
    assert!(agent.stop().success());
    let stored: HashSet<String> =
        agent.wal_events().into_iter().map(|(_, e)| e.client_event_id().unwrap().to_string()).collect();
    assert_eq!(stored, acked);
}

#[test]
fn a_client_that_never_reads_does_not_stall_others() {
    let agent = Agent::start("[ingest]\nmax_pending_per_connection = 64");
    let mut hog = agent.connect();
    hog.stream.set_nonblocking(true).unwrap();
    // Push until the agent stops reading from it (its answers pile up unread in the socket buffers).
    let line = format!("{}\n", metric("hog", "m", 1.0));
    let mut written = 0usize;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stalled_since = Instant::now();
    while Instant::now() < deadline && stalled_since.elapsed() < Duration::from_millis(500) {
        match hog.stream.write(line.as_bytes()) {
            Ok(n) => {
                written += n;
                stalled_since = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(stalled_since.elapsed() >= Duration::from_millis(500), "the agent kept reading an unread client forever");
    assert!(written > 0);
    let mut other = agent.connect();
    let started = Instant::now();
    for i in 0..100 {
        assert_eq!(other.request(&metric("other", "m", i as f64))["ok"], true);
    }
    // Generous: this only catches a stall, it is not a performance check.
    assert!(started.elapsed() < Duration::from_secs(20), "a well-behaved client was stalled");
}

#[test]
fn acked_events_survive_kill_9_and_a_cut_line_is_not_stored() {
    let mut agent = Agent::start("");
    let mut client = agent.connect();
    let mut acked = Vec::new();
    for i in 0..200 {
        let answer = client
            .request(&format!(r#"{{"kind":"metric","profile_id":"p","name":"m","value":{i},"event_id":"k{i}"}}"#));
        acked.push(answer["event_id"].as_str().unwrap().to_string());
    }
    // A whole event but no newline, then the connection drops: a cut line, not stored.
    let mut cut = agent.connect();
    cut.send_raw(metric("p", "cut", 1.0).as_bytes());
    drop(cut);
    // The same with a half-close: no answer comes, and nothing is stored.
    let mut half = agent.connect();
    half.send_raw(metric("p", "half", 1.0).as_bytes());
    half.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(half.answer().is_none(), "a line without its newline was answered");
    std::thread::sleep(Duration::from_millis(200));
    agent.kill9();
    agent.restart();
    // Still serving after the restart, and seqs keep growing.
    let after = agent.connect().request(&metric("p", "after", 1.0));
    assert_eq!(after["ok"], true);
    assert!(agent.stop().success());
    let events = agent.wal_events();
    let ids: Vec<String> = events.iter().filter_map(|(_, e)| e.client_event_id().map(str::to_string)).collect();
    assert_eq!(ids, acked);
    assert_eq!(events.len(), 201, "the cut line was stored");
    assert_eq!(events.last().unwrap().0, after["seq"].as_u64().unwrap());
}

#[test]
fn sigterm_answers_what_was_read_and_exits_cleanly() {
    let mut agent = Agent::start("");
    let mut client = agent.connect();
    let writer_stream = client.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut out = std::io::BufWriter::new(writer_stream);
        for i in 0..200_000 {
            let line = format!(r#"{{"kind":"metric","profile_id":"p","name":"m","value":{i},"event_id":"s{i}"}}"#);
            if writeln!(out, "{line}").is_err() {
                break;
            }
        }
        let _ = out.flush();
    });
    let mut acked = HashSet::new();
    let (mut answers, mut refused) = (0, 0);
    while let Some(answer) = client.answer() {
        answers += 1;
        if answers == 1000 {
            agent.signal(nix::sys::signal::Signal::SIGTERM);
        }
        if answer["ok"] == true {
            assert_eq!(refused, 0, "an ok after shutting_down: answers out of order");
            acked.insert(answer["event_id"].as_str().unwrap().to_string());
        } else {
            assert_error(&answer, "shutting_down", "shutting down");
            refused += 1;
        }
    }
    eprintln!("{} acked, {refused} answered shutting_down", acked.len());
    assert!(agent.wait().success(), "the agent did not exit 0 on SIGTERM");
    drop(sender);
    assert!(!agent.socket.exists(), "the socket file was left behind");
    let stored: HashSet<String> =
        agent.wal_events().into_iter().map(|(_, e)| e.client_event_id().unwrap().to_string()).collect();
    assert!(acked.is_subset(&stored), "{} acked events missing", acked.difference(&stored).count());
    assert!(acked.len() >= 999);
}

#[test]
fn the_socket_is_0660_a_stale_one_is_replaced_and_a_second_agent_is_refused() {
    let mut agent = Agent::start("");
    let mode = std::fs::metadata(&agent.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    // A second agent on the same socket and WAL is refused, naming the problem.
    let second = Command::new(BIN).args(["run", "--config"]).arg(&agent.config_path).output().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");

    // kill -9 leaves the socket file behind; the next start replaces it.
    agent.kill9();
    assert!(agent.socket.exists());
    agent.restart();
    assert_eq!(agent.connect().request(&metric("p", "n", 1.0))["ok"], true);
}

#[test]
fn a_second_agent_on_a_live_socket_is_refused() {
    let agent = Agent::start("");
    let config = std::fs::read_to_string(&agent.config_path).unwrap().replace(
        &format!("{:?}", agent.wal_dir.display().to_string()),
        &format!("{:?}", agent.dir.path().join("other-wal").display().to_string()),
    );
    let other = agent.dir.path().join("other.toml");
    std::fs::write(&other, config).unwrap();
    let second = Command::new(BIN).args(["run", "--config"]).arg(&other).output().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already listening"), "{stderr}");
    assert_eq!(agent.connect().request(&metric("p", "n", 1.0))["ok"], true, "the first agent is unharmed");
}

#[test]
fn send_reports_acks_and_errors_by_line_number() {
    let agent = Agent::start("");
    let input = format!("{}\nnot json\n\n{}\n", metric("p", "a", 1.0), metric("p", "b", 2.0));
    let output = output_with_stdin(Command::new(BIN).args(["send", "--socket"]).arg(&agent.socket), &input);
    assert!(!output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "2 acked, 1 failed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 2: invalid_json"), "{stderr}");
}

#[test]
fn check_config_masks_secrets_and_rejects_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "[mysql]\nurl = \"mysql://telemetry:s3cret@127.0.0.1:3306/telemetry\"\n").unwrap();
    let output = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(output.status.success());
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(shown.contains("telemetry:****@") && !shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("max_line_bytes = 65536"), "defaults are shown: {shown}");

    std::fs::write(&path, "[wal]\nmax_byte = 1\n").unwrap();
    let output = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_byte") && stderr.contains("agent.toml"), "{stderr}");
}

#[test]
fn raw_socket_bytes_of_an_ack_match_the_documented_shape() {
    let agent = Agent::start("");
    let mut stream = UnixStream::connect(&agent.socket).unwrap();
    stream.write_all(br#"{"kind":"metric","profile_id":"p","name":"n","value":1,"event_id":"abc"}"#).unwrap();
    stream.write_all(b"\n").unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf).unwrap();
    let text = std::str::from_utf8(&buf[..n]).unwrap();
    let seq: u64 = text.trim_start_matches(r#"{"ok":true,"seq":"#).split(',').next().unwrap().parse().unwrap();
    assert_eq!(text, format!("{{\"ok\":true,\"seq\":{seq},\"event_id\":\"abc\"}}\n"));
}

#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let agent = Agent::start("[ingest]\nidle_timeout_secs = 1");
    let mut idle = agent.connect();
    assert_eq!(idle.request(&metric("p", "n", 1.0))["ok"], true);
    let started = Instant::now();
    assert!(idle.answer().is_none(), "an idle connection got an answer");
    let waited = started.elapsed();
    // The timer started when the line was read, before its ack's fsync: a loose lower bound.
    assert!(waited >= Duration::from_millis(500) && waited < Duration::from_secs(20), "closed after {waited:?}");
}

#[test]
fn the_socket_group_is_applied() {
    let gid = nix::unistd::getgid();
    let group = nix::unistd::Group::from_gid(gid).unwrap().unwrap().name;
    let agent = Agent::start(&format!("[ingest]\nsocket_group = {group:?}\nsocket_mode = \"0600\""));
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid.as_raw());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_wal_keeps_its_agent_id() {
    let mut agent = Agent::start("");
    assert!(agent.stop().success());
    let config = std::fs::read_to_string(&agent.config_path).unwrap().replace("test-agent", "renamed");
    std::fs::write(&agent.config_path, config).unwrap();
    let output = Command::new(BIN).args(["run", "--config"]).arg(&agent.config_path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("belongs to agent `test-agent`") && stderr.contains("renamed"), "{stderr}");
}

#[test]
fn sigterm_does_not_wait_for_a_client_that_never_reads() {
    let mut agent = Agent::start("[ingest]\nmax_pending_per_connection = 16");
    let mut hog = agent.connect();
    hog.stream.set_nonblocking(true).unwrap();
    let line = format!("{}\n", metric("hog", "m", 1.0));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stalled_since = Instant::now();
    while Instant::now() < deadline && stalled_since.elapsed() < Duration::from_millis(300) {
        match hog.stream.write(line.as_bytes()) {
            Ok(_) => stalled_since = Instant::now(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    }
    let started = Instant::now();
    assert!(agent.stop().success(), "the agent did not exit 0");
    assert!(started.elapsed() < Duration::from_secs(20), "shutdown waited {:?} on a client", started.elapsed());
    drop(hog);
}

/// Writes `line` over and over, without reading answers, until the agent stops reading this client.
fn write_until_the_agent_stops_reading(client: &mut Client, line: &str) {
    client.stream.set_nonblocking(true).unwrap();
    let bytes = format!("{line}\n").into_bytes();
    let mut offset = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stalled_since = Instant::now();
    while stalled_since.elapsed() < Duration::from_millis(500) {
        assert!(Instant::now() < deadline, "the agent kept reading a client that never reads its answers");
        match client.stream.write(&bytes[offset..]) {
            Ok(n) => {
                offset = (offset + n) % bytes.len();
                stalled_since = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    }
    client.stream.set_nonblocking(false).unwrap();
}

fn trade_with_meta(pad: usize) -> String {
    format!(
        r#"{{"kind":"trade","profile_id":"p","symbol":"X","side":"buy","quantity":1,"price":2,"meta":{{"pad":"{}"}}}}"#,
        "m".repeat(pad)
    )
}

#[test]
fn sigterm_answers_an_event_stored_just_before_it() {
    let mut agent = Agent::configure("");
    // Each handler holds its answer for 1.5 s right after storing the event: SIGTERM lands there.
    agent.env.push(("FAILPOINTS".into(), "ingest::after_store=return(1500)".into()));
    agent.restart();
    let mut clients: Vec<Client> = (0..20).map(|_| agent.connect()).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client.send(&metric("p", "held", i as f64));
    }
    std::thread::sleep(Duration::from_millis(500));
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let mut acked = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        let answer = client.answer();
        let seq = answer.as_ref().filter(|a| a["ok"] == true).and_then(|a| a["seq"].as_u64());
        acked.push(seq.unwrap_or_else(|| panic!("client {i}: its stored event got {answer:?}, not its ack")));
    }
    assert!(agent.wait().success(), "{}", agent.log());
    acked.sort_unstable();
    let stored: Vec<u64> = agent.wal_events().into_iter().map(|(seq, _)| seq).collect();
    assert_eq!(stored, acked, "stored events and acks differ");
}

#[test]
fn repeated_sigterm_with_resends_of_unanswered_lines_stores_no_duplicates() {
    const CLIENTS: usize = 16;
    const EVENTS: usize = 150;
    let mut agent = Agent::configure("");
    // Widens the window between storing an event and queuing its answer, where SIGTERM used to drop answers.
    agent.env.push(("FAILPOINTS".into(), "ingest::after_store=10%return(50)".into()));
    agent.restart();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let socket = agent.socket.clone();
            std::thread::spawn(move || {
                // Id-less events, each line resent only when it got no answer or `shutting_down`.
                let (mut next, mut resends) = (0, 0);
                while next < EVENTS {
                    let Ok(mut client) = Client::try_connect(&socket) else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    while next < EVENTS {
                        match client.try_request(&metric(&format!("c{c}"), "m", next as f64)) {
                            Some(answer) if answer["ok"] == true => next += 1,
                            Some(answer) => {
                                assert_error(&answer, "shutting_down", "shutting down");
                                resends += 1;
                                break;
                            }
                            None => {
                                resends += 1;
                                break;
                            }
                        }
                    }
                }
                resends
            })
        })
        .collect();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(400));
        assert!(agent.stop().success(), "{}", agent.log());
        agent.restart();
    }
    let resends: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(agent.stop().success());
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    for (_, event) in agent.wal_events() {
        let Event::Metric(m) = event else { panic!("not a metric") };
        if !seen.insert((m.profile_id.clone(), m.value.to_bits())) {
            duplicates += 1;
        }
    }
    eprintln!("{resends} resends, {duplicates} duplicates");
    assert_eq!(duplicates, 0, "events stored twice: their first answer was dropped");
    assert_eq!(seen.len(), CLIENTS * EVENTS);
}

#[test]
fn clients_that_never_read_do_not_take_the_inflight_budget() {
    // The good client's requests may wait only 500 ms for the budget: another test's fsyncs (a spool drain,
    // a MySQL bulk load) on the same disk can take that long, so this one runs alone.
    let _alone = alone();
    let agent = Agent::start("[ingest]\nmax_inflight_bytes = 98304\noverload_timeout_ms = 500");
    let line = trade_with_meta(2000);
    let _deaf: Vec<Client> = (0..3)
        .map(|_| {
            let mut deaf = agent.connect();
            write_until_the_agent_stops_reading(&mut deaf, &line);
            deaf
        })
        .collect();
    let mut good = agent.connect();
    for i in 0..20 {
        let answer = good.request(&line);
        assert_eq!(answer["ok"], true, "request {i} of a client that reads its answers: {answer}");
    }
}

#[test]
fn a_client_that_does_not_read_its_answers_is_closed_after_the_answer_timeout() {
    let agent = Agent::start("[ingest]\nanswer_timeout_secs = 1");
    let mut deaf = agent.connect();
    write_until_the_agent_stops_reading(&mut deaf, &metric("deaf", "m", 1.0));
    std::thread::sleep(Duration::from_secs(3));
    deaf.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answers = Vec::new();
    match deaf.stream.read_to_end(&mut answers) {
        Ok(_) => {}
        // Closed with lines of ours unread.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the connection is still open ({e}) after {} bytes of answers", answers.len()),
    }
    assert!(agent.log().contains("did not read its answers"), "{}", agent.log());
    assert_eq!(agent.connect().request(&metric("p", "n", 1.0))["ok"], true);
}

#[test]
fn partial_lines_count_in_the_memory_bound() {
    let agent = Agent::start("[ingest]\nmax_line_bytes = 98304\nmax_inflight_bytes = 98304\noverload_timeout_ms = 500");
    let line = trade_with_meta(75_000);
    let mut first = agent.connect();
    first.send_raw(line.as_bytes());
    std::thread::sleep(Duration::from_millis(300));
    // Two partial lines of 75 kB do not fit in 96 KiB: the second waits, then is refused.
    let mut second = agent.connect();
    second.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    second.send_raw(line.as_bytes());
    assert_error(&second.answer().expect("an answer"), "overloaded", "retry later");
    assert!(second.answer().is_none(), "the connection stays open after a partial line was refused");
    // The first line, completed, is taken.
    first.send_raw(b"\n");
    assert_eq!(first.answer().unwrap()["ok"], true);
    assert_eq!(agent.connect().request(&line)["ok"], true);
}

#[test]
fn a_line_too_long_sent_in_full_is_answered_without_a_broken_pipe() {
    let agent = Agent::start("[ingest]\nmax_line_bytes = 2048");
    let mut client = agent.connect();
    assert_eq!(client.request(&metric("p", "before", 1.0))["ok"], true);
    let mut line = vec![b'x'; 4 << 20];
    line.push(b'\n');
    let written = client.stream.write_all(&line);
    assert!(written.is_ok(), "writing the long line failed: {written:?}");
    assert_error(&client.answer().expect("an answer"), "line_too_long", "2048 bytes");
    assert!(client.answer().is_none(), "the connection stays open after line_too_long");
}
