//! What the bench binaries share: the release agent binary as a child process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Agent {
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Child,
}

impl Agent {
    /// Starts an agent in a fresh directory under BENCH_DIR (default: the system temp dir). `extra` is TOML
    /// appended to the config, then BENCH_AGENT_CONFIG (`;` between lines) for experiments: its keys land in
    /// the last section (`[wal]` for the ingest bench, `[mysql]` for the MySQL bench).
    pub fn start(extra: &str) -> Agent {
        let base = std::env::var_os("BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::tempdir_in(base).expect("temp dir");
        let socket = dir.path().join("agent.sock");
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\nid = \"bench\"\n[http]\nlisten = \"127.0.0.1:0\"\n[control]\nsocket = {:?}\n\
                 [ingest]\nsocket = {:?}\n[wal]\ndir = {:?}\n{extra}\n{}\n",
                dir.path().join("control.sock").display().to_string(),
                socket.display().to_string(),
                dir.path().join("wal").display().to_string(),
                std::env::var("BENCH_AGENT_CONFIG").unwrap_or_default().replace(';', "\n"),
            ),
        )
        .expect("config");
        let child = Command::new(env!("CARGO_BIN_EXE_telemetry-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn agent");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Agent { _dir: dir, socket, child }
    }

    #[allow(dead_code)] // Used by one bench binary only.
    pub fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.child.id())
    }

    #[allow(dead_code)] // Used by one bench binary only.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process, in seconds.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
