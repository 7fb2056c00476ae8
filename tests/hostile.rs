//! Hostile clients all at once: random bytes, invalid UTF-8, a 100 MiB line without a newline, 10,000
//! connections opened and left idle, a client that never reads its answers. Meanwhile a well-behaved client
//! keeps getting its acks, every bad case gets its documented error, and the agent's memory stays bounded.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::kit::agent::Agent;
use crate::kit::client::{metric, Client};
use crate::kit::serial::alone;
use crate::kit::util::{proc_status_kib, raise_fd_limit};

/// The agent's resident memory, from /proc (0 when unreadable).
fn rss_mib(pid: i32) -> f64 {
    proc_status_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0
}

#[test]
fn hostile_clients_do_not_stop_a_well_behaved_one_and_memory_stays_bounded() {
    // 10,000 of this process's file descriptors, and a burst on both cores: alone.
    let _alone = alone();
    let limit = raise_fd_limit();
    // The agent inherits the raised limit; leave room for its own files and the other clients.
    let idle_count = 10_000.min(limit.saturating_sub(200) as usize);
    let mut agent = Agent::configure("");
    agent.restart();
    let pid = agent.pid();
    let mut good = agent.connect();
    let good_seq = |good: &mut Client, i: u32| {
        let answer = good.request(&metric("good", "m", f64::from(i)));
        assert_eq!(answer["ok"], true, "the well-behaved client was refused: {answer}");
    };
    good_seq(&mut good, 0);
    let baseline = rss_mib(pid);

    // 10,000 connections, opened and left idle.
    let started = Instant::now();
    let idle: Vec<UnixStream> = (0..idle_count).map(|_| UnixStream::connect(&agent.socket).unwrap()).collect();
    good_seq(&mut good, 1);
    eprintln!("{idle_count} idle connections opened in {:.1} s", started.elapsed().as_secs_f64());

    // Random bytes and invalid UTF-8, each line answered with its error; the connection keeps working.
    let mut noisy = agent.connect();
    for i in 0..200 {
        let mut line: Vec<u8> =
            (0..fastrand::usize(1..300)).map(|_| fastrand::u8(..)).filter(|b| *b != b'\n').collect();
        if i % 2 == 0 {
            line.extend_from_slice(b"\xff\xfe{\"kind\":");
        }
        line.push(b'\n');
        noisy.send_raw(&line);
        let answer = noisy.answer().expect("an answer to a garbage line");
        assert_eq!(answer["ok"], false, "{answer}");
        let code = answer["code"].as_str().unwrap_or_default();
        assert!(matches!(code, "invalid_json" | "invalid_event"), "{answer}");
    }
    assert_eq!(noisy.request(&metric("noisy", "m", 1.0))["ok"], true);
    good_seq(&mut good, 2);

    // A 100 MiB line without a newline: answered line_too_long once the limit is passed, then closed.
    let huge = std::thread::spawn({
        let socket = agent.socket.clone();
        move || {
            let mut stream = UnixStream::connect(socket).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let chunk = vec![b'x'; 1 << 20];
            let mut sent = 0usize;
            for _ in 0..100 {
                match stream.write_all(&chunk) {
                    Ok(()) => sent += chunk.len(),
                    Err(_) => break, // The agent closed it.
                }
            }
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer);
            (sent, answer)
        }
    });

    // A client that writes and never reads its answers.
    let mut deaf = UnixStream::connect(&agent.socket).unwrap();
    deaf.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let deaf_line = format!("{}\n", metric("deaf", "m", 1.0));
    let mut deaf_sent = 0;
    while deaf_sent < 200_000 && deaf.write_all(deaf_line.as_bytes()).is_ok() {
        deaf_sent += 1;
    }
    assert!(deaf_sent < 200_000, "the agent kept reading a client that never reads its answers");

    for i in 3..50 {
        good_seq(&mut good, i);
    }
    let (huge_sent, huge_answer) = huge.join().unwrap();
    assert!(huge_answer.contains("line_too_long"), "{huge_answer:?} after {huge_sent} bytes");

    let peak = rss_mib(pid);
    eprintln!(
        "agent RSS: {baseline:.1} MiB before, {peak:.1} MiB with {idle_count} idle connections and the rest \
         ({:.1} KiB per idle connection at most)",
        (peak - baseline) * 1024.0 / idle_count as f64
    );
    // Bounded: 64 MiB of in-flight event bytes plus a few KiB per connection, nowhere near 100 MiB of line.
    assert!(peak < 256.0, "agent RSS reached {peak:.1} MiB");
    drop(idle);
    drop(deaf);
    good_seq(&mut good, 50);
    assert!(agent.stop().success(), "{}", agent.log());
}
