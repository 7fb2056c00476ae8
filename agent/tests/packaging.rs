//! How the agent runs as a service: the systemd unit, and the agent's side of systemd's notify protocol.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::Agent;

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    if std::process::Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd); .ci/run installs it");
        return;
    }
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/telemetry-agent.service"))
        .unwrap()
        .replace("/usr/bin/telemetry-agent", env!("CARGO_BIN_EXE_telemetry-agent"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("telemetry-agent.service");
    std::fs::write(&path, unit).unwrap();
    let output = std::process::Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Unknown keys are only warnings: any output is a finding.
    assert!(output.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

#[test]
fn the_agent_tells_systemd_it_is_ready_pings_the_watchdog_and_says_when_it_stops() {
    let mut agent = Agent::configure("");
    let notify_path = agent.dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    agent.env =
        vec![("NOTIFY_SOCKET".into(), notify_path.display().to_string()), ("WATCHDOG_USEC".into(), "2000000".into())];
    agent.restart();
    let mut received = Vec::new();
    let next = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = next();
    assert!(first.contains("READY=1"), "{first}");
    // Ready means serving: the socket takes events now.
    assert_eq!(agent.connect().request(&common::metric("p", "m", 1.0))["ok"], true);
    let started = Instant::now();
    while received.iter().filter(|m: &&String| m.contains("WATCHDOG=1")).count() < 2 {
        received.push(next());
        assert!(started.elapsed() < Duration::from_secs(10), "{received:?}");
    }
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    loop {
        let message = next();
        if message.contains("STOPPING=1") {
            break;
        }
        assert!(message.contains("WATCHDOG=1"), "{message}");
    }
    assert!(agent.wait().success());
}
