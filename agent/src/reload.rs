//! Config reload, on SIGHUP and when the file changes. Batch sizes, linger, retry limits, the write timeout,
//! Redis `publish_updates` and the log level apply at once; any other change is named in the log as
//! needing a restart. A file that does not load is rejected whole and the running config stays.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, RedisConfig};
use crate::sink::mysql::ForwardSettings;

/// The keys a reload applies to the running agent.
pub const LIVE_KEYS: &[&str] = &[
    "agent.log_level",
    "mysql.max_batch_rows",
    "mysql.max_batch_bytes",
    "mysql.max_linger_ms",
    "mysql.retry_initial_ms",
    "mysql.retry_max_ms",
    "mysql.write_timeout_ms",
    "redis.publish_updates",
    "redis.retry_max_ms",
];

/// Changes the log filter.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where live changes go.
pub struct Live {
    pub forward: Option<watch::Sender<ForwardSettings>>,
    pub redis: Option<watch::Sender<RedisConfig>>,
    /// Sets the log filter; `None` when `RUST_LOG` decides it.
    pub log_level: Option<LogLevelSetter>,
}

/// Reloads `path` on SIGHUP and on changes to it until `shutdown`.
pub async fn run(path: PathBuf, mut running: Config, live: Live, mut shutdown: watch::Receiver<bool>) {
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    // Editors replace the file by rename, which silences a watch on the file itself: watch its directory.
    let _watcher = watch_file(&path, changed_tx)
        .map_err(|e| tracing::warn!(error = %e, path = %path.display(), "config changes are not watched; SIGHUP still reloads"))
        .ok();
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP");
            None
        }
    };
    loop {
        let hup = async {
            match &mut hangup {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        let trigger = tokio::select! {
            _ = hup => "SIGHUP",
            Some(()) = changed.recv() => "file change",
            _ = shutdown.changed() => return,
        };
        reload(&path, &mut running, &live, trigger);
    }
}

fn watch_file(path: &Path, changed: mpsc::Sender<()>) -> notify::Result<impl Drop> {
    let name = path.file_name().map(|n| n.to_os_string());
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut debouncer = new_debouncer(Duration::from_millis(300), None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        // Not access events: reading the file for a reload would trigger the next one.
        let ours = events
            .iter()
            .any(|e| !e.kind.is_access() && e.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == name));
        if ours {
            // Full: a reload is pending already and will read the newest file.
            let _ = changed.try_send(());
        }
    })?;
    debouncer.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(debouncer)
}

fn reload(path: &Path, running: &mut Config, live: &Live, trigger: &str) {
    let new = match Config::load(Some(path)) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(trigger, error = format!("{e:#}"), "config file rejected; the running config stays");
            return;
        }
    };
    let changed = changed_keys(running, &new);
    if changed.is_empty() {
        tracing::info!(trigger, "config reloaded: nothing changed");
        return;
    }
    let (applied, need_restart): (Vec<String>, Vec<String>) =
        changed.into_iter().partition(|key| LIVE_KEYS.contains(&key.as_str()));
    running.agent.log_level = new.agent.log_level.clone();
    if let (Some(now), Some(new)) = (&mut running.mysql, &new.mysql) {
        now.max_batch_rows = new.max_batch_rows;
        now.max_batch_bytes = new.max_batch_bytes;
        now.max_linger_ms = new.max_linger_ms;
        now.retry_initial_ms = new.retry_initial_ms;
        now.retry_max_ms = new.retry_max_ms;
        now.write_timeout_ms = new.write_timeout_ms;
    }
    if let (Some(now), Some(new)) = (&mut running.redis, &new.redis) {
        now.publish_updates = new.publish_updates;
        now.retry_max_ms = new.retry_max_ms;
    }
    if let (Some(tx), Some(mysql)) = (&live.forward, &running.mysql) {
        tx.send_replace(ForwardSettings::from(mysql));
    }
    if let (Some(tx), Some(redis)) = (&live.redis, &running.redis) {
        tx.send_replace(redis.clone());
    }
    if applied.iter().any(|k| k == "agent.log_level") {
        match &live.log_level {
            Some(set) => {
                if let Err(e) = set(&running.agent.log_level) {
                    tracing::error!(error = e, "cannot apply the new log_level");
                }
            }
            None => tracing::warn!("log_level changed but RUST_LOG is set, which decides"),
        }
    }
    if !applied.is_empty() {
        tracing::info!(trigger, ?applied, "config reloaded");
    }
    if !need_restart.is_empty() {
        tracing::warn!(trigger, keys = ?need_restart, "config changes that apply only after a restart (systemctl restart telemetry-agent)");
    }
}

/// `section.key` for every key whose value differs (a whole section added or removed: `section`).
fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let table = |c: &Config| match toml::Value::try_from(c) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    let (old, new) = (table(old), table(new));
    let mut sections: Vec<&String> = old.keys().chain(new.keys()).collect();
    sections.sort();
    sections.dedup();
    let mut out = Vec::new();
    for section in sections {
        match (old.get(section), new.get(section)) {
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                keys.sort();
                keys.dedup();
                out.extend(keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(|k| format!("{section}.{k}")));
            }
            (a, b) if a != b => out.push(section.clone()),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_named_by_section_and_key() {
        let old: Config = toml::from_str("[mysql]\nurl = \"mysql://a/b\"\nmax_batch_rows = 10\n").unwrap();
        let new: Config =
            toml::from_str("[mysql]\nurl = \"mysql://a/c\"\nmax_batch_rows = 5\n[redis]\nurl = \"redis://x\"\n")
                .unwrap();
        assert_eq!(changed_keys(&old, &new), vec!["mysql.max_batch_rows", "mysql.url", "redis"]);
        assert!(changed_keys(&old, &old).is_empty());
    }
}
