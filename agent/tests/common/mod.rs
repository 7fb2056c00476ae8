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
    /// Extra environment for the agent process.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
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
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let wal_dir = dir.path().join("wal");
        let config_path = dir.path().join("agent.toml");
        let config = format!(
            "[agent]\nid = \"test-agent\"\n[ingest]\nsocket = {:?}\n[wal]\ndir = {:?}\nretain_secs = 0\n\
             [http]\nlisten = \"127.0.0.1:0\"\n[control]\nsocket = {:?}\n[spool]\ndir = {:?}\n{extra}",
            socket.display().to_string(),
            wal_dir.display().to_string(),
            dir.path().join("control.sock").display().to_string(),
            dir.path().join("spool").display().to_string(),
        );
        std::fs::write(&config_path, merge_sections(&config)).unwrap();
        Agent { dir, socket, wal_dir, config_path, env: Vec::new(), child: None }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let child = Command::new(env!("CARGO_BIN_EXE_telemetry-agent"))
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                "warn,telemetry_wal=info,telemetry_agent::sink=info,telemetry_agent::cli=info,telemetry_agent::daemon=info,telemetry_agent::reload=info",
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            // A file, not a pipe: nobody drains a pipe, and a chatty agent would block on it.
            .stderr(self.log_file())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited at start with {status}: {}", self.log());
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_telemetry-agent"))
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        let stdin = stdin.to_string();
        let writer = std::thread::spawn(move || input.write_all(stdin.as_bytes()));
        let output = child.wait_with_output().unwrap();
        let _ = writer.join();
        output
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

pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(socket: &Path) -> Client {
        Client::try_connect(socket).unwrap()
    }

    /// [`Client::connect`] that may meet a stopped agent.
    pub fn try_connect(socket: &Path) -> std::io::Result<Client> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client { stream, reader })
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

/// `telemetry-agent migrate` against `url`.
pub fn migrate(url: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("migrate.toml");
    std::fs::write(&config, format!("[mysql]\nurl = {url:?}\n")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_telemetry-agent")).args(["migrate", "--config"]).arg(&config).output().unwrap()
}

/// `GET path` over HTTP/1.0: the status code and the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// A fresh MySQL database for one test, dropped afterwards.
pub struct TestDb {
    pub name: String,
    pub server_url: String,
    runtime: tokio::runtime::Runtime,
    pool: mysql_async::Pool,
}

impl TestDb {
    pub fn new() -> TestDb {
        use mysql_async::prelude::Queryable;
        let server_url =
            std::env::var("TELEMETRY_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".to_string());
        let name = format!("tat_{}_{}", std::process::id(), fastrand::u64(..));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let admin = mysql_async::Pool::new(mysql_async::Opts::from_url(&server_url).unwrap());
        runtime.block_on(async {
            let mut conn = admin.get_conn().await.expect("MySQL is not reachable; run scripts/test.sh");
            conn.query_drop(format!("CREATE DATABASE {name}")).await.unwrap();
            drop(conn);
            admin.disconnect().await.unwrap();
        });
        let pool = mysql_async::Pool::new(mysql_async::Opts::from_url(&format!("{server_url}/{name}")).unwrap());
        TestDb { name, server_url, runtime, pool }
    }

    /// A fresh database with the schema applied by `telemetry-agent migrate`.
    pub fn migrated() -> TestDb {
        let db = TestDb::new();
        let output = migrate(&db.url());
        assert!(output.status.success(), "migrate failed: {}", String::from_utf8_lossy(&output.stderr));
        db
    }

    /// The test server's address, for a proxy in front of it.
    pub fn server_addr() -> std::net::SocketAddr {
        let url = url::Url::parse(
            &std::env::var("TELEMETRY_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into()),
        )
        .unwrap();
        let host = url.host_str().unwrap_or("127.0.0.1");
        std::net::ToSocketAddrs::to_socket_addrs(&(host, url.port().unwrap_or(3306))).unwrap().next().unwrap()
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.server_url, self.name)
    }

    /// The URL of this database through a proxy listening on `port`.
    pub fn url_via(&self, port: u16) -> String {
        let mut url = url::Url::parse(&self.url()).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(port)).unwrap();
        url.to_string()
    }

    pub fn query<T: mysql_async::prelude::FromRow + Send + 'static>(&self, sql: &str) -> Vec<T> {
        use mysql_async::prelude::Queryable;
        self.runtime.block_on(async {
            let mut conn = self.pool.get_conn().await.unwrap();
            conn.query(sql).await.unwrap()
        })
    }

    pub fn exec(&self, sql: &str) {
        use mysql_async::prelude::Queryable;
        self.runtime.block_on(async {
            let mut conn = self.pool.get_conn().await.unwrap();
            conn.query_drop(sql).await.unwrap()
        })
    }

    pub fn count(&self, table: &str) -> u64 {
        self.query::<u64>(&format!("SELECT COUNT(*) FROM {table}"))[0]
    }

    /// Waits until `table` holds `n` rows; panics with what it holds after `secs`.
    pub fn wait_for_rows(&self, table: &str, n: u64, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let have = self.count(table);
            if have == n {
                return;
            }
            assert!(have < n, "{table} holds {have} rows, more than the {n} expected");
            assert!(Instant::now() < deadline, "{table} holds {have} of {n} rows after {secs} s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        use mysql_async::prelude::Queryable;
        let name = self.name.clone();
        let pool = self.pool.clone();
        let server_url = self.server_url.clone();
        self.runtime.block_on(async move {
            let _ = pool.disconnect().await;
            let admin = mysql_async::Pool::new(mysql_async::Opts::from_url(&server_url).unwrap());
            if let Ok(mut conn) = admin.get_conn().await {
                let _ = conn.query_drop(format!("DROP DATABASE IF EXISTS {name}")).await;
            }
            let _ = admin.disconnect().await;
        });
    }
}

/// A TCP proxy that can cut every connection or refuse new ones, to inject faults between the agent and
/// a server.
pub struct FaultProxy {
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
    _runtime: tokio::runtime::Runtime,
}

#[derive(Default)]
struct ProxyState {
    /// Bumped by `cut`: connections of an older generation close.
    generation: std::sync::atomic::AtomicU64,
    /// While set, new connections are closed at once.
    down: std::sync::atomic::AtomicBool,
    /// While set, no bytes are forwarded (connections hang).
    stalled: std::sync::atomic::AtomicBool,
    accepted: std::sync::atomic::AtomicU64,
    open: std::sync::atomic::AtomicU64,
    max_open: std::sync::atomic::AtomicU64,
}

impl FaultProxy {
    pub fn start(target: std::net::SocketAddr) -> FaultProxy {
        use std::sync::atomic::Ordering;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let state = std::sync::Arc::new(ProxyState::default());
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accept_state = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                accept_state.accepted.fetch_add(1, Ordering::Relaxed);
                if accept_state.down.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let state = accept_state.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
                    // Without this, Nagle and delayed ACKs add 40 ms to every statement.
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let generation = state.generation.load(Ordering::Relaxed);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let alive = move |state: &ProxyState| state.generation.load(Ordering::Relaxed) == generation;
                    let pump = move |mut from: tokio::net::tcp::OwnedReadHalf,
                                     mut to: tokio::net::tcp::OwnedWriteHalf,
                                     state: std::sync::Arc<ProxyState>| async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        // Bytes read but held back while stalled, forwarded in order once the stall ends.
                        let mut held: Vec<u8> = Vec::new();
                        loop {
                            let read = tokio::time::timeout(Duration::from_millis(20), from.read(&mut buf)).await;
                            if !alive(&state) {
                                return;
                            }
                            match read {
                                Err(_) => {}
                                // The sender closed: the pair goes (so that the open count follows the agent's
                                // own connections, also while stalled).
                                Ok(Ok(0)) | Ok(Err(_)) => return,
                                Ok(Ok(n)) => held.extend_from_slice(&buf[..n]),
                            }
                            if held.is_empty() || state.stalled.load(Ordering::Relaxed) {
                                if std::env::var_os("PROXY_LINGER").is_some() {
                                    // The old behaviour: a stalled pair does not notice the sender leaving.
                                    while state.stalled.load(Ordering::Relaxed) && alive(&state) {
                                        tokio::time::sleep(Duration::from_millis(20)).await;
                                    }
                                }
                                continue;
                            }
                            if to.write_all(&held).await.is_err() {
                                return;
                            }
                            held.clear();
                        }
                    };
                    let open = state.open.fetch_add(1, Ordering::SeqCst) + 1;
                    state.max_open.fetch_max(open, Ordering::SeqCst);
                    let up = tokio::spawn(pump(client_read, server_write, state.clone()));
                    let down = tokio::spawn(pump(server_read, client_write, state.clone()));
                    let _ = tokio::join!(up, down);
                    state.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        FaultProxy { port, state, _runtime: runtime }
    }

    /// Closes every open connection (mid-transaction, as a network cut would).
    pub fn cut(&self) {
        self.state.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, std::sync::atomic::Ordering::Relaxed);
        if down {
            self.cut();
        }
    }

    pub fn set_stalled(&self, stalled: bool) {
        self.state.stalled.store(stalled, std::sync::atomic::Ordering::Relaxed);
    }

    /// The most connections that were open through the proxy at once.
    pub fn max_open(&self) -> u64 {
        self.state.max_open.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A unique key prefix in the test Redis for one test; its keys are deleted afterwards.
pub struct TestRedis {
    pub url: String,
    pub prefix: String,
    conn: std::sync::Mutex<redis::Connection>,
}

impl TestRedis {
    pub fn new() -> TestRedis {
        let url = std::env::var("TELEMETRY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
        let prefix = format!("tat:{}:{}", std::process::id(), fastrand::u64(..));
        let conn = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .expect("Redis is not reachable; run scripts/test.sh");
        TestRedis { url, prefix, conn: std::sync::Mutex::new(conn) }
    }

    /// The server's address, for a proxy in front of it.
    pub fn addr(&self) -> std::net::SocketAddr {
        let url = url::Url::parse(&self.url).unwrap();
        let host = url.host_str().unwrap_or("127.0.0.1");
        std::net::ToSocketAddrs::to_socket_addrs(&(host, url.port().unwrap_or(6379))).unwrap().next().unwrap()
    }

    /// The agent's `[redis]` section for this prefix, reaching Redis at `url`.
    pub fn section(&self, url: &str) -> String {
        format!("[redis]\nurl = {url:?}\nkey_prefix = {:?}\n", self.prefix)
    }

    /// This server's URL with the port of a proxy in front of it.
    pub fn url_via(&self, port: u16) -> String {
        let mut url = url::Url::parse(&self.url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(port)).unwrap();
        url.to_string()
    }

    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut conn = self.conn.lock().unwrap();
        cmd.query(&mut *conn).unwrap()
    }

    /// `HGETALL {prefix}:{suffix}`
    pub fn hash(&self, suffix: &str) -> std::collections::BTreeMap<String, String> {
        self.query(redis::cmd("HGETALL").arg(format!("{}:{suffix}", self.prefix)))
    }

    /// `GET {prefix}:{suffix}`
    pub fn get(&self, suffix: &str) -> Option<String> {
        self.query(redis::cmd("GET").arg(format!("{}:{suffix}", self.prefix)))
    }

    pub fn keys(&self) -> Vec<String> {
        let mut conn = self.conn.lock().unwrap();
        let mut scan = redis::cmd("SCAN");
        scan.cursor_arg(0).arg("MATCH").arg(format!("{}:*", self.prefix)).arg("COUNT").arg(1000);
        scan.iter::<String>(&mut *conn).unwrap().collect::<Result<_, _>>().unwrap()
    }

    /// Names of the connected clients that call themselves `name`.
    pub fn clients_named(&self, name: &str) -> usize {
        let list: String = self.query(&redis::cmd("CLIENT").arg("LIST").clone());
        list.lines().filter(|l| l.split(' ').any(|field| field == format!("name={name}"))).count()
    }
}

impl TestRedis {
    /// Deletes every key under this test's prefix (what a Redis restarted empty looks like to the agent).
    pub fn delete_all(&self) {
        let keys = self.keys();
        if !keys.is_empty() {
            let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut *conn);
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.delete_all();
    }
}

/// A test that cannot run here says so and passes, on a developer machine; under `CI=true` it fails
/// instead, so that CI never reports a test as passed that did not run.
pub fn skip(reason: &str) {
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true, so this test must run, but: {reason}");
    eprintln!("SKIPPED: {reason}");
}

/// Raises this process's open-file limit to its hard limit (tests holding many connections need one each).
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}
