//! What runs a fleet: the Prometheus alert rules (`promtool check` and `promtool test rules`, a unit test per
//! alert) and the Grafana dashboard, whose every panel query must return series from a real Prometheus
//! scraping a live agent with both sinks on.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::kit::agent::Agent;
use crate::kit::client::metric;
use crate::kit::db::{mysql_section, TestDb};
use crate::kit::redis::TestRedis;
use crate::kit::util::{http_get, skip, workspace_root};

fn prometheus_dir() -> PathBuf {
    workspace_root().join("packaging/prometheus")
}

/// `tool`, or `None` (the test is skipped) when it is not installed (Debian's `prometheus` package).
fn installed(tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        skip(&format!("no {tool}: install Debian's prometheus package"));
    }
    found
}

#[test]
fn the_alert_rules_are_valid_and_each_alert_passes_its_unit_test() {
    let Some(promtool) = installed("promtool") else { return };
    let check = Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg("telemetry-agent.rules.yml")
        .current_dir(prometheus_dir())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = Command::new(&promtool)
        .args(["test", "rules", "telemetry-agent.rules.test.yml"])
        .current_dir(prometheus_dir())
        .output()
        .unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&test.stdout), String::from_utf8_lossy(&test.stderr));
    assert!(test.status.success(), "{out}");
    // Every alert of the rules file has a test.
    let rules = std::fs::read_to_string(prometheus_dir().join("telemetry-agent.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(prometheus_dir().join("telemetry-agent.rules.test.yml")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert_eq!(alerts.len(), 7);
    for alert in alerts {
        assert!(tests.contains(&format!("alertname: {alert}\n")), "alert {alert} has no unit test");
    }
}

/// Prometheus on a free loopback port, scraping `target` every second, with the alert rules loaded.
struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(binary: &Path, target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = prometheus_dir().join("telemetry-agent.rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules:?}\n\
             scrape_configs:\n  - job_name: telemetry-agent\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        Prometheus { child, addr, _dir: dir }
    }

    /// An instant query's result (an empty list when it matches nothing); `None` while Prometheus is not up.
    fn query(&self, promql: &str) -> Option<Vec<serde_json::Value>> {
        let encoded: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        std::net::TcpStream::connect(self.addr).ok()?;
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={encoded}"));
        assert_eq!(status, 200, "{promql}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        Some(answer["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn every_dashboard_panel_returns_series_from_prometheus_scraping_a_live_agent() {
    let Some(binary) = installed("prometheus") else { return };
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("packaging/grafana/telemetry-agent.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard["uid"], "telemetry-agent", "a stable uid, so that links and provisioning keep working");
    let (db, redis) = (TestDb::migrated(), TestRedis::new());
    let agent = Agent::start(&format!("{}{}", mysql_section(&db.url()), redis.section(&redis.url)));
    let mut client = agent.connect();
    let lines: Vec<String> = (0..200).map(|i| metric("p-1", "m", f64::from(i))).collect();
    client.send_all(&lines);
    // A refusal, so that refusals by code have a series.
    client.send("{not json\n");
    let refused = client.answer().unwrap();
    assert_eq!(refused["code"], "invalid_json", "{refused}");
    db.wait_for_rows("dd_metrics", 200, 30);

    let prometheus = Prometheus::start(&binary, agent.http_addr());
    let deadline = Instant::now() + Duration::from_secs(60);
    // Ten scrapes at least: rates need two samples in their window.
    loop {
        let up = prometheus.query("count_over_time(up{job=\"telemetry-agent\"}[1m])");
        if up.as_ref().and_then(|r| r.first()).and_then(|s| s["value"][1].as_str()?.parse::<u32>().ok()) >= Some(10) {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus did not scrape the agent 10 times in 60 s");
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut empty = Vec::new();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$__rate_interval", "30s").replace("$instance", ".*");
            queries += 1;
            if prometheus.query(&expr).unwrap_or_default().is_empty() {
                empty.push(format!("{}: {expr}", panel["title"]));
            }
        }
    }
    assert!(queries >= 20, "{queries} queries");
    assert!(empty.is_empty(), "panel queries without series:\n{}", empty.join("\n"));
    // The rules loaded, and none fires for a healthy agent.
    let firing = prometheus.query("ALERTS{alertstate=\"firing\"}").unwrap();
    assert!(firing.is_empty(), "{firing:?}");
    let (_, rules) = http_get(prometheus.addr, "/api/v1/rules");
    assert_eq!(rules.matches("\"type\":\"alerting\"").count(), 7, "{rules}");
}
