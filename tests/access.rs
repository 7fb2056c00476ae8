//! Who can reach what: secrets stay out of output, idle local clients cannot stall the control socket or pin
//! the HTTP endpoint's file descriptors, and a script's user reaches the ingest socket and nothing else.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::kit::agent::{Agent, BIN};
use crate::kit::client::metric;
use crate::kit::serial::share;
use crate::kit::util::{http_get, raise_fd_limit, skip, workspace_root};

/// Runs `command`, killing it (and failing) if it takes longer than `limit`.
fn run_within(mut command: Command, stdin: &str, limit: Duration) -> Output {
    let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes());
    }
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let output = child.wait_with_output().expect("wait");
            panic!(
                "{command:?} did not finish within {limit:?}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("wait")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn check_config_never_prints_a_password_from_a_url_or_a_malformed_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "[mysql]\nurl = \"mysql://u:hunter2@127.0.0.1:3306/t?pass=hunter2\"\n\
         [redis]\nurl = \"redis://:hunter2@127.0.0.1:6379/0?password=hunter2&protocol=resp3\"\n",
    )
    .unwrap();
    let output = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    let shown = text(&output);
    assert!(output.status.success(), "{shown}");
    assert!(!shown.contains("hunter2"), "a password is shown:\n{shown}");
    assert!(shown.contains("protocol=resp3"), "the rest of the query is kept:\n{shown}");

    // An unquoted value: toml's error would quote the line, password and all.
    std::fs::write(&path, "[agent]\nlog_level = \"info\"\n[redis]\nurl = redis://:hunter2@127.0.0.1:6379\n").unwrap();
    let output = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    let shown = text(&output);
    assert!(!output.status.success(), "{shown}");
    assert!(!shown.contains("hunter2"), "the malformed line is echoed:\n{shown}");
    assert!(shown.contains("line 4"), "the error does not say where:\n{shown}");
}

/// Request timeout of the control socket (agent/src/ops/control.rs) plus slack.
const CONTROL_IDLE_CLOSED_WITHIN: Duration = Duration::from_secs(15);

#[test]
fn idle_control_connections_do_not_take_the_command_slots() {
    let agent = Agent::start("");
    let control = agent.dir.path().join("control.sock");
    // Twice as many as there are command slots, each sending nothing.
    let idle: Vec<std::os::unix::net::UnixStream> =
        (0..16).map(|_| std::os::unix::net::UnixStream::connect(&control).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));

    let mut status = Command::new(BIN);
    status.args(["status", "--json", "--config"]).arg(&agent.config_path);
    let output = run_within(status, "", Duration::from_secs(5));
    assert!(output.status.success(), "{}", text(&output));
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["running"], true, "{answer}");

    // The idle ones are closed once the request timeout passes.
    assert_all_closed_within(idle, CONTROL_IDLE_CLOSED_WITHIN, "control");
}

/// Every one of `streams` is closed by the agent (an error answer first is fine) within `within`.
fn assert_all_closed_within<S: Read + SetReadTimeout>(streams: Vec<S>, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    for mut stream in streams {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        stream.set_read_timeout(Some(left));
        let mut buf = [0u8; 4096];
        match stream.read(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("an idle {what} connection is still open after {within:?}: {e}"),
        }
    }
}

/// Unix and TCP streams alike.
trait SetReadTimeout {
    fn set_read_timeout(&self, timeout: Option<Duration>);
}

impl SetReadTimeout for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout).unwrap();
    }
}

impl SetReadTimeout for std::net::TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) {
        std::net::TcpStream::set_read_timeout(self, timeout).unwrap();
    }
}

/// Sockets the process `pid` holds.
fn sockets(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")))
        .count()
}

#[test]
fn idle_http_connections_are_capped_and_closed_and_metrics_still_answer() {
    use telemetry_agent::ops::http::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS};
    raise_fd_limit();
    let agent = Agent::start("");
    let addr = agent.http_addr();
    let baseline = sockets(agent.pid());
    let idle_count = MAX_CONNECTIONS + MAX_CONNECTIONS / 2;
    let idle: Vec<std::net::TcpStream> = (0..idle_count).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let held = sockets(agent.pid()).saturating_sub(baseline);
    assert!(held <= MAX_CONNECTIONS, "the agent holds {held} idle HTTP connections (cap {MAX_CONNECTIONS})");

    // Answered once the idle ones ahead of it time out.
    let started = Instant::now();
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < HEADER_READ_TIMEOUT * 2, "GET /metrics took {:?}", started.elapsed());

    assert_all_closed_within(idle, HEADER_READ_TIMEOUT * 3, "HTTP");
    assert_eq!(http_get(addr, "/healthz").0, 200);
}

// ---- Two real Unix users: the service's and a script's ----

/// Users and groups created for one test, deleted when dropped.
struct Accounts {
    users: Vec<String>,
    groups: Vec<String>,
}

impl Accounts {
    fn run(args: &[&str]) {
        let output = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert!(output.status.success(), "{args:?}: {}", text(&output));
    }

    fn group(&mut self, name: &str) -> nix::unistd::Gid {
        Accounts::run(&["groupadd", "--system", name]);
        self.groups.push(name.to_string());
        nix::unistd::Group::from_name(name).unwrap().unwrap().gid
    }

    fn user(&mut self, name: &str, group: &str, supplementary: &[&str]) -> nix::unistd::User {
        let mut args = vec!["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "-g", group];
        let joined = supplementary.join(",");
        if !supplementary.is_empty() {
            args.extend(["-G", joined.as_str()]);
        }
        args.push(name);
        Accounts::run(&args);
        self.users.push(name.to_string());
        nix::unistd::User::from_name(name).unwrap().unwrap()
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for user in &self.users {
            let _ = Command::new("userdel").arg(user).output();
        }
        for group in &self.groups {
            let _ = Command::new("groupdel").arg(group).output();
        }
    }
}

/// `key=value` of the unit file, `None` when absent.
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix('=')).map(str::trim)
}

fn octal(value: &str) -> u32 {
    u32::from_str_radix(value, 8).unwrap_or_else(|e| panic!("{value:?} is not octal: {e}"))
}

/// `command` runs as `uid` with exactly these groups (the first is the primary one) and this umask.
fn as_user(command: &mut Command, uid: nix::unistd::Uid, groups: Vec<nix::unistd::Gid>, umask: u32) -> &mut Command {
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask));
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(groups[0])?;
            nix::unistd::setuid(uid)?;
            Ok(())
        })
    }
}

#[test]
fn a_scripts_user_reaches_the_ingest_socket_and_nothing_else_of_the_service() {
    if !nix::unistd::Uid::effective().is_root() || Command::new("useradd").arg("--help").output().is_err() {
        return skip("this test creates Unix users: it needs root and useradd");
    }
    // The files made here for other users need this process's usual umask: no test that runs alone (the
    // in-process daemon changes the umask for a moment) may overlap.
    let _share = share();
    let workspace = workspace_root();
    let unit = std::fs::read_to_string(workspace.join("systemd/telemetry-agent.service")).unwrap();
    let packaged: telemetry_agent::config::Config =
        toml::from_str(&std::fs::read_to_string(workspace.join("packaging/agent.toml")).unwrap()).unwrap();

    // The packaging's names, made unique to this run.
    let id = format!("{:06x}", fastrand::u32(..0xff_ffff));
    let rename = |name: &str| match name {
        "telemetry" => format!("tas{id}"),
        "telemetry-clients" => format!("tac{id}"),
        other => panic!("unexpected group {other} in the packaging"),
    };
    let mut accounts = Accounts { users: Vec::new(), groups: Vec::new() };
    let service_group = rename(unit_value(&unit, "Group").unwrap());
    let service_gid = accounts.group(&service_group);
    let supplementary: Vec<String> =
        unit_value(&unit, "SupplementaryGroups").unwrap_or_default().split_whitespace().map(rename).collect();
    let mut service_gids = vec![service_gid];
    for group in &supplementary {
        service_gids.push(accounts.group(group));
    }
    let service = accounts.user(&rename(unit_value(&unit, "User").unwrap()), &service_group, &[]);
    // Scripts' users join the socket's group: `[ingest] socket_group`, else the agent's own group.
    let client_group = packaged.ingest.socket_group.as_deref().map(rename).unwrap_or(service_group.clone());
    let script = accounts.user(&format!("tau{id}"), "nogroup", &[&client_group]);
    let script_gids = vec![script.gid, nix::unistd::Group::from_name(&client_group).unwrap().unwrap().gid];

    // The unit's layout: /etc/telemetry-agent, StateDirectory, RuntimeDirectory.
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The build's binary may sit where other users cannot reach it (a checkout under /root): a copy here.
    let bin = base.path().join("telemetry-agent");
    std::fs::copy(BIN, &bin).unwrap();
    let bin = bin.to_str().unwrap();
    let etc = base.path().join("etc");
    let state = base.path().join("state");
    let run = base.path().join("run");
    std::fs::create_dir(&etc).unwrap();
    for (dir, key) in [(&state, "StateDirectoryMode"), (&run, "RuntimeDirectoryMode")] {
        std::fs::create_dir(dir).unwrap();
        nix::unistd::chown(dir.as_path(), Some(service.uid), Some(service_gid)).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(octal(unit_value(&unit, key).unwrap()))).unwrap();
    }
    // The spool, as postinst makes it.
    let postinst = std::fs::read_to_string(workspace.join("packaging/debian/postinst")).unwrap();
    let spool_mode = postinst
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("install -d -o telemetry -g telemetry-clients -m ")?
                .strip_suffix(" /var/spool/telemetry-agent")
        })
        .expect("postinst creates /var/spool/telemetry-agent");
    let spool = base.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let client_gid = nix::unistd::Group::from_name(&rename("telemetry-clients")).unwrap().unwrap().gid;
    nix::unistd::chown(spool.as_path(), Some(service.uid), Some(client_gid)).unwrap();
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(octal(spool_mode))).unwrap();
    let socket = run.join("agent.sock");
    let control = run.join("control.sock");
    let wal = state.join("wal");
    let config = etc.join("agent.toml");
    let socket_group = packaged.ingest.socket_group.as_deref().map(rename);
    std::fs::write(
        &config,
        format!(
            "[agent]\nid = \"access-test\"\n[ingest]\nsocket = {:?}\n{}[wal]\ndir = {:?}\n[http]\nenabled = false\n\
             [control]\nsocket = {:?}\n[spool]\ndir = {:?}\n",
            socket.display().to_string(),
            socket_group.map(|g| format!("socket_group = {g:?}\n")).unwrap_or_default(),
            wal.display().to_string(),
            control.display().to_string(),
            spool.display().to_string(),
        ),
    )
    .unwrap();
    // As postinst leaves it.
    nix::unistd::chown(config.as_path(), Some(nix::unistd::Uid::from_raw(0)), Some(service_gid)).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640)).unwrap();

    let log = base.path().join("agent.log");
    let mut agent = Command::new(bin);
    agent.args(["run", "--config"]).arg(&config).env("RUST_LOG", "warn").stdin(Stdio::null()).stdout(Stdio::null());
    agent.stderr(std::fs::File::create(&log).unwrap());
    let umask = octal(unit_value(&unit, "UMask").unwrap());
    let mut agent = as_user(&mut agent, service.uid, service_gids, umask).spawn().unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let agent = Kill(&mut agent);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&control).is_err() {
        let exited = agent.0.try_wait().unwrap();
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(exited.is_none(), "the agent exited: {exited:?} {log}");
        assert!(Instant::now() < deadline, "the agent did not listen within 20 s: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let as_script = |program: &str, args: &[&PathBuf], stdin: &str| {
        let mut command = Command::new(program);
        command.args(args.iter().map(|a| a.as_os_str()));
        as_user(&mut command, script.uid, script_gids.clone(), 0o022);
        run_within(command, stdin, Duration::from_secs(20))
    };
    let send = PathBuf::from("send");
    let socket_flag = PathBuf::from("--socket");
    let lock = wal.join("wal.lock");

    // What a script is for: it sends an event and gets it acked.
    let sent = as_script(bin, &[&send, &socket_flag, &socket], &format!("{}\n", metric("p", "m", 1.0)));
    assert!(sent.status.success(), "the script's user cannot send: {}", text(&sent));
    // Nothing else: not the config (passwords), the WAL, its lock, or the control socket.
    for (what, program, path) in [
        ("read the config", "cat", &config),
        ("list the WAL", "ls", &wal),
        ("open the WAL's lock", "cat", &lock),
        ("delete the WAL's lock", "rm", &lock),
    ] {
        let output = as_script(program, &[path], "");
        assert!(!output.status.success(), "the script's user can {what} ({}): {}", path.display(), text(&output));
    }
    assert!(lock.exists(), "the script's user deleted the WAL's lock");
    let output = as_script(bin, &[&send, &socket_flag, &control], "{\"Status\":null}\n");
    assert!(!output.status.success(), "the script's user reaches the control socket: {}", text(&output));
    assert!(text(&output).contains("ermission denied"), "{}", text(&output));

    // The spool: the script's client, unable to reach the socket, spools an event (under a umask that would
    // keep the file from the agent) and hands the file over at exit; the agent, another user, drains it.
    let client = base.path().join("python");
    copy_dir(&workspace.join("clients/python/src"), &client);
    let script_source = format!(
        "import sys; sys.path.insert(0, {client:?})\n\
         from telemetry_agent import Client\n\
         c = Client(socket_path={missing:?}, spool_dir={spool:?})\n\
         print(c.metric('p-spool', 'm', 1.0).wait(10).status)\n\
         c.close(10)\n",
        client = client.display().to_string(),
        missing = base.path().join("no-agent.sock").display().to_string(),
        spool = spool.display().to_string(),
    );
    let mut python = Command::new("python3");
    python.args(["-c", &script_source]);
    as_user(&mut python, script.uid, script_gids.clone(), 0o077);
    let spooled = run_within(python, "", Duration::from_secs(30));
    assert!(spooled.status.success() && text(&spooled).contains("spooled"), "{}", text(&spooled));
    let listed = as_script("ls", &[&spool], "");
    assert!(!listed.status.success(), "a script's user can list others' spool files: {}", text(&listed));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut status = Command::new(bin);
        status.args(["status", "--json", "--config"]).arg(&config);
        let status: serde_json::Value =
            serde_json::from_slice(&run_within(status, "", Duration::from_secs(10)).stdout).unwrap_or_default();
        if status["spool"]["events_ingested"] == 1 && status["spool"]["files_refused"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not drain the script's spool file: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0, "the drained file is deleted");
    drop(agent);
    drop(accounts);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}
