//! How the agent runs as a service: the systemd unit, and the agent's side of systemd's notify protocol.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::kit::agent::{Agent, BIN};
use crate::kit::client::metric;
use crate::kit::serial::alone;
use crate::kit::util::{skip, workspace_root};

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    if std::process::Command::new("systemd-analyze").arg("--version").output().is_err() {
        return skip("systemd-analyze is not installed (apt-get install systemd); scripts/test.sh installs it");
    }
    // verify checks that ExecStart exists: point it at the binary under test.
    let unit = std::fs::read_to_string(workspace_root().join("systemd/telemetry-agent.service"))
        .unwrap()
        .replace("/usr/bin/telemetry-agent", BIN);
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
    assert_eq!(agent.connect().request(&metric("p", "m", 1.0))["ok"], true);
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

#[test]
fn the_debian_package_holds_the_binary_unit_config_and_user_setup() {
    let has_cargo_deb = std::process::Command::new("cargo").args(["deb", "--version"]).output();
    if !has_cargo_deb.is_ok_and(|o| o.status.success()) {
        return skip("cargo-deb is not installed (cargo install cargo-deb); scripts/test.sh installs it");
    }
    // cargo deb builds the release binary: both cores, for minutes.
    let _alone = alone();
    let out = tempfile::tempdir().unwrap();
    let workspace = workspace_root();
    let built = std::process::Command::new("cargo")
        .args(["deb", "-p", "telemetry-agent", "--strip", "--output"])
        .arg(out.path())
        .current_dir(&workspace)
        .output()
        .unwrap();
    assert!(built.status.success(), "cargo deb failed: {}", String::from_utf8_lossy(&built.stderr));
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"));
    let deb = deb.expect("a .deb");
    let dpkg = |args: &[&str]| {
        let output = std::process::Command::new("dpkg-deb").args(args).arg(&deb).output().unwrap();
        assert!(output.status.success(), "dpkg-deb {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let contents = dpkg(&["-c"]);
    for path in [
        "./usr/bin/telemetry-agent",
        "./etc/telemetry-agent/agent.toml",
        "systemd/system/telemetry-agent.service",
        "./usr/share/doc/telemetry-agent/README.md",
        "./usr/share/doc/telemetry-agent/operations.md",
        "./usr/share/doc/telemetry-agent/protocol.md",
        "./usr/share/doc/telemetry-agent/dashboards.md",
        "./usr/share/telemetry-agent/grafana/telemetry-agent.json",
        "./usr/share/telemetry-agent/prometheus/telemetry-agent.rules.yml",
        "./usr/share/telemetry-agent/prometheus/scrape.yml",
        "./usr/share/doc/telemetry-agent/spool.md",
        // The scripts' client: `import telemetry_agent` after apt install.
        "./usr/lib/python3/dist-packages/telemetry_agent/__init__.py",
        "./usr/lib/python3/dist-packages/telemetry_agent/client.py",
        "./usr/lib/python3/dist-packages/telemetry_agent/py.typed",
    ] {
        assert!(contents.contains(path), "{path} missing from the package:\n{contents}");
    }
    let info = dpkg(&["-I"]);
    assert!(info.contains("Package: telemetry-agent") && info.contains("adduser"), "{info}");

    // The packaged client imports from where the package puts it.
    let root = tempfile::tempdir().unwrap();
    assert!(std::process::Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root.path()).status().unwrap().success());
    let imported = std::process::Command::new("python3")
        .args(["-c", "import telemetry_agent, sys; print(telemetry_agent.Client.__name__)"])
        .env("PYTHONPATH", root.path().join("usr/lib/python3/dist-packages"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&imported.stdout).trim(),
        "Client",
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );

    let example = std::fs::read_to_string(workspace.join("packaging/agent.toml")).unwrap();
    let control = tempfile::tempdir().unwrap();
    let extracted = std::process::Command::new("dpkg-deb").arg("-e").arg(&deb).arg(control.path()).status().unwrap();
    assert!(extracted.success());
    let read = |name: &str| std::fs::read_to_string(control.path().join(name)).unwrap_or_default();
    assert_eq!(read("conffiles").trim(), "/etc/telemetry-agent/agent.toml");
    let postinst = read("postinst");
    assert!(postinst.contains("adduser --system") && postinst.contains("addgroup --system telemetry"), "{postinst}");
    // The scripts' group the packaged config gives the socket to (tests/access.rs runs that setup).
    assert!(postinst.contains("addgroup --system telemetry-clients"), "{postinst}");
    // The spool the packaged config names (tests/access.rs drains one made this way as two real users).
    assert!(postinst.contains("-m 3730 /var/spool/telemetry-agent"), "{postinst}");
    assert!(example.contains("dir = \"/var/spool/telemetry-agent\""), "{example}");
    assert!(
        postinst.contains("deb-systemd-helper") || postinst.contains("systemctl"),
        "units not enabled:\n{postinst}"
    );
    let postrm = read("postrm");
    assert!(purge_block(&postrm).contains("/var/lib/telemetry-agent"), "{postrm}");
    assert!(purge_block(&postrm).contains("/etc/telemetry-agent"), "{postrm}");
    assert!(read("prerm").contains("telemetry-agent.service"), "the service is not stopped on removal");

    // The packaged config is the example, and it works as is with the unit's paths.
    assert!(example.contains("/run/telemetry-agent/agent.sock") && example.contains("/var/lib/telemetry-agent/wal"));
}

/// Runs one test of this file again in a child, where its tool cannot be found, with or without `CI=true`.
fn run_without_tools(test: &str, ci: bool) -> std::process::Output {
    let empty = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    // Its name in this binary: the module path without the crate's name (`packaging::{test}`).
    let name = format!("{}::{test}", module_path!().split_once("::").expect("a module of the e2e crate").1);
    child.args([name.as_str(), "--exact", "--nocapture"]).env("PATH", empty.path()).env_remove("CI");
    if ci {
        child.env("CI", "true");
    }
    child.output().unwrap()
}

#[test]
fn a_test_that_cannot_run_skips_on_a_developer_machine_and_fails_under_ci() {
    for test in [
        "the_unit_file_passes_systemd_analyze_verify",
        "the_debian_package_holds_the_binary_unit_config_and_user_setup",
    ] {
        let developer = run_without_tools(test, false);
        let stderr = String::from_utf8_lossy(&developer.stderr);
        assert!(developer.status.success() && stderr.contains("SKIPPED"), "{test} without CI: {stderr}");
        let ci = run_without_tools(test, true);
        assert!(!ci.status.success(), "{test} passed under CI=true without its tool");
    }
}

/// The part of a postrm that runs on purge.
fn purge_block(postrm: &str) -> &str {
    let start = postrm.find(r#"if [ "$1" = "purge" ]"#).unwrap_or(postrm.len());
    let end = postrm[start..].find("\nfi").map_or(postrm.len(), |end| start + end);
    &postrm[start..end]
}

/// The paths docs/operations.md ("Install as a service", **Removal:**) says `dpkg --purge` deletes.
#[test]
fn purge_removes_every_path_the_operations_guide_says_it_removes() {
    let workspace = workspace_root();
    let guide = std::fs::read_to_string(workspace.join("docs/operations.md")).unwrap();
    let postrm = std::fs::read_to_string(workspace.join("packaging/debian/postrm")).unwrap();
    let removal = guide
        .split("**Removal:**")
        .nth(1)
        .and_then(|s| {
            s.split(
                "
- ",
            )
            .next()
        })
        .expect("docs/operations.md: Removal");
    let documented: Vec<&str> =
        removal.split('`').skip(1).step_by(2).filter(|quoted| quoted.starts_with('/')).collect();
    assert!(documented.contains(&"/etc/telemetry-agent"), "{removal}");
    for path in documented {
        assert!(
            purge_block(&postrm).contains(path),
            "docs/operations.md says purge removes {path}; postrm does not:\n{postrm}"
        );
    }
}
