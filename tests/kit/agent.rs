//! The real agent binary as a child process, in a directory of its own.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use telemetry_agent::event::Event;
use telemetry_wal::{Wal, WalOptions};

use super::client::Client;
use super::serial::{share, Share};

/// The agent binary under test (cargo builds it for the package's tests and benches).
pub const BIN: &str = env!("CARGO_BIN_EXE_telemetry-agent");

/// The tests' agents log at this level (`RUST_LOG`): what the tests look for in `agent.log`. The one place
/// that names the agent's modules as log targets.
pub const RUST_LOG: &str = "warn,telemetry_wal=info,telemetry_agent::sink=info,telemetry_agent::cli=info,\
                            telemetry_agent::daemon=info,telemetry_agent::reload=info";

/// How an agent is set up; [`Launch::test`] for the tests, the benches make their own.
pub struct Launch {
    /// `[agent] id`
    pub agent_id: String,
    /// The agent's directory is made in this one.
    pub parent_dir: PathBuf,
    /// `[wal] retain_secs`, when set.
    pub retain_secs: Option<u64>,
    pub rust_log: String,
    /// The agent's stderr goes to `agent.log` in its directory (else to this process's stderr).
    pub log_to_file: bool,
}

impl Launch {
    /// `test-agent`, in the system's temp dir, its WAL truncated at once, logging to `agent.log`.
    pub fn test() -> Launch {
        Launch {
            agent_id: "test-agent".into(),
            parent_dir: std::env::temp_dir(),
            retain_secs: Some(0),
            rust_log: RUST_LOG.into(),
            log_to_file: true,
        }
    }
}

pub struct Agent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub wal_dir: PathBuf,
    pub config_path: PathBuf,
    /// Extra environment for the agent process.
    pub env: Vec<(String, String)>,
    rust_log: String,
    log_to_file: bool,
    child: Option<Child>,
    _share: Share,
}

impl Agent {
    /// Starts an agent in a fresh directory; `extra` is TOML appended to the config.
    pub fn start(extra: &str) -> Agent {
        let mut agent = Agent::configure(extra);
        agent.restart();
        agent
    }

    /// Like [`Agent::start`] without starting it (set `env` first).
    pub fn configure(extra: &str) -> Agent {
        Agent::configure_with(&Launch::test(), extra)
    }

    /// The config is `launch`'s, then `extra`: a section named again is merged (a key set again replaces the
    /// first), and keys before `extra`'s first section header land in the last section of the base (`[wal]`).
    pub fn configure_with(launch: &Launch, extra: &str) -> Agent {
        let dir = tempfile::tempdir_in(&launch.parent_dir).unwrap();
        let socket = dir.path().join("agent.sock");
        let wal_dir = dir.path().join("wal");
        let config_path = dir.path().join("agent.toml");
        let config = format!(
            "[agent]\nid = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[control]\nsocket = {:?}\n[spool]\ndir = {:?}\n\
             [ingest]\nsocket = {:?}\n[wal]\ndir = {:?}\n{}{extra}",
            launch.agent_id,
            dir.path().join("control.sock").display().to_string(),
            dir.path().join("spool").display().to_string(),
            socket.display().to_string(),
            wal_dir.display().to_string(),
            launch.retain_secs.map(|secs| format!("retain_secs = {secs}\n")).unwrap_or_default(),
        );
        std::fs::write(&config_path, merge_sections(&config)).unwrap();
        Agent {
            dir,
            socket,
            wal_dir,
            config_path,
            env: Vec::new(),
            rust_log: launch.rust_log.clone(),
            log_to_file: launch.log_to_file,
            child: None,
            _share: share(),
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", &self.rust_log)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            // A file, not a pipe: nobody drains a pipe, and a chatty agent would block on it.
            .stderr(if self.log_to_file { Stdio::from(self.log_file()) } else { Stdio::inherit() })
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Ready as systemd is told: the ingest socket is bound first, the control socket last.
        let control = self.dir.path().join("control.sock");
        while UnixStream::connect(&self.socket).is_err() || UnixStream::connect(&control).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited at start with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "agent did not listen on both sockets within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait()
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("agent did not exit within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("agent.log")).unwrap()
    }

    /// Everything the agent logged, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Waits until the log holds `needle`; panics with the log after `secs`.
    pub fn wait_for_log(&self, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "the log has no {needle:?} after {secs} s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address of the agent's HTTP endpoint (from its log).
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.wait_for_log("telemetry-agent ready", 20);
        let log = self.log();
        let start = log.rfind("http=\"").expect("the ready line names the HTTP address") + 6;
        let end = start + log[start..].find('"').unwrap();
        log[start..end].parse().unwrap()
    }

    /// Runs `telemetry-agent ARGS --config <this agent's config>`, with `stdin` as standard input.
    pub fn command(&self, args: &[&str], stdin: &str) -> std::process::Output {
        output_with_stdin(Command::new(BIN).args(args).arg("--config").arg(&self.config_path), stdin)
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.socket)
    }

    /// Every event in the WAL with its seq (the agent must be stopped).
    pub fn wal_events(&self) -> Vec<(u64, Event)> {
        assert!(self.child.is_none(), "stop the agent before reading its WAL");
        let wal = Wal::open(&self.wal_dir, WalOptions::default()).unwrap();
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let batch = wal.read_after(after, 10_000).unwrap();
            let Some(last) = batch.last() else { break };
            after = last.seq;
            out.extend(batch.into_iter().map(|r| (r.seq, Event::decode(&r.payload).unwrap())));
        }
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `command` with `stdin` as its standard input, and its output.
pub fn output_with_stdin(command: &mut Command, stdin: &str) -> std::process::Output {
    let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_string();
    let writer = std::thread::spawn(move || input.write_all(stdin.as_bytes()));
    let output = child.wait_with_output().unwrap();
    let _ = writer.join();
    output
}

/// Appends `extra`'s sections to the base config, merging repeated section headers; a key set again in
/// `extra` replaces the base's.
fn merge_sections(config: &str) -> String {
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    let mut current = String::new();
    for line in config.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            current = line.to_string();
            if !sections.iter().any(|(name, _)| *name == current) {
                sections.push((current.clone(), Vec::new()));
            }
        } else if !line.is_empty() {
            let lines = &mut sections.iter_mut().find(|(name, _)| *name == current).unwrap().1;
            let key = |l: &str| l.split('=').next().unwrap_or_default().trim().to_string();
            lines.retain(|l| key(l) != key(line));
            lines.push(line.to_string());
        }
    }
    sections.into_iter().map(|(name, lines)| format!("{name}\n{}\n", lines.join("\n"))).collect()
}
