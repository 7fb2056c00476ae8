//! Test support: the real agent binary as a child process, and a blocking NDJSON client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use telemetry_agent::event::Event;
use telemetry_wal::{Wal, WalOptions};

pub struct Agent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub wal_dir: PathBuf,
    pub config_path: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Starts an agent in a fresh directory; `extra` is TOML appended to the config.
    pub fn start(extra: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let wal_dir = dir.path().join("wal");
        let config_path = dir.path().join("agent.toml");
        let config = format!(
            "[agent]\nid = \"test-agent\"\n[ingest]\nsocket = {:?}\n[wal]\ndir = {:?}\n{extra}",
            socket.display().to_string(),
            wal_dir.display().to_string()
        );
        let config = merge_sections(&config);
        std::fs::write(&config_path, config).unwrap();
        let mut agent = Agent { dir, socket, wal_dir, config_path, child: None };
        agent.restart();
        agent
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let child = Command::new(env!("CARGO_BIN_EXE_telemetry-agent"))
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited at start with {status}: {}", self.stderr());
            }
            assert!(Instant::now() < deadline, "agent did not listen within 20 s");
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

    fn stderr(&mut self) -> String {
        let mut out = String::new();
        if let Some(stderr) = self.child.as_mut().and_then(|c| c.stderr.as_mut()) {
            let _ = std::io::Read::read_to_string(stderr, &mut out);
        }
        out
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

/// Appends `extra`'s sections to the base config, merging repeated section headers.
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
            sections.iter_mut().find(|(name, _)| *name == current).unwrap().1.push(line.to_string());
        }
    }
    sections.into_iter().map(|(name, lines)| format!("{name}\n{}\n", lines.join("\n"))).collect()
}

pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(socket: &Path) -> Client {
        let stream = UnixStream::connect(socket).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    /// The next answer, or `None` at end of stream.
    pub fn answer(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?} is not JSON: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading an answer failed: {e}"),
        }
    }

    /// A request that may meet a closed connection: `None` then.
    pub fn try_request(&mut self, line: &str) -> Option<serde_json::Value> {
        self.stream.write_all(format!("{line}\n").as_bytes()).ok()?;
        self.answer()
    }

    pub fn request(&mut self, line: &str) -> serde_json::Value {
        self.send(line);
        self.answer().expect("the agent closed the connection")
    }
}

pub fn metric(profile: &str, name: &str, value: f64) -> String {
    format!(r#"{{"kind":"metric","profile_id":"{profile}","name":"{name}","value":{value}}}"#)
}
