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

/// `(key, copy)` for a key of an optional section: copied when both configs have the section.
macro_rules! live {
    ($section:ident . $key:ident) => {
        (concat!(stringify!($section), ".", stringify!($key)), |now: &mut Config, new: &Config| {
            if let (Some(now), Some(new)) = (now.$section.as_mut(), new.$section.as_ref()) {
                now.$key = new.$key.clone();
            }
        })
    };
}

/// Copies one live setting from the new config into the running one.
type CopyLive = fn(&mut Config, &Config);

/// The settings a reload applies to the running agent, each with how it is copied into the running config
/// (the sinks then take theirs from there). Every other key needs a restart.
const LIVE: &[(&str, CopyLive)] = &[
    ("agent.log_level", |now, new| now.agent.log_level = new.agent.log_level.clone()),
    live!(mysql.max_batch_rows),
    live!(mysql.max_batch_bytes),
    live!(mysql.max_linger_ms),
    live!(mysql.retry_initial_ms),
    live!(mysql.retry_max_ms),
    live!(mysql.write_timeout_ms),
    live!(redis.publish_updates),
    live!(redis.retry_max_ms),
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

/// Reloads `path` on SIGHUP and on changes to it until `shutdown`. The signal handler and the watch are in
/// place when this returns, so a SIGHUP right after "ready" reloads (without a handler it would kill the
/// agent).
pub fn spawn(path: PathBuf, running: Config, live: Live, shutdown: watch::Receiver<bool>) {
    let (changed_tx, changed) = mpsc::channel::<()>(1);
    // Editors replace the file by rename, which silences a watch on the file itself: watch its directory.
    let watcher = watch_file(&path, changed_tx)
        .map_err(|e| tracing::warn!(error = %e, path = %path.display(), "config changes are not watched; SIGHUP still reloads"))
        .ok();
    let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP");
            None
        }
    };
    tokio::spawn(async move {
        let _watcher = watcher;
        run(path, running, live, hangup, changed, shutdown).await
    });
}

async fn run(
    path: PathBuf,
    mut running: Config,
    live: Live,
    mut hangup: Option<tokio::signal::unix::Signal>,
    mut changed: mpsc::Receiver<()>,
    mut shutdown: watch::Receiver<bool>,
) {
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
    reload_config(running, new, live, trigger);
}

/// Applies what changed from `running` to `new` that can change while the agent runs, and names the rest.
fn reload_config(running: &mut Config, new: Config, live: &Live, trigger: &str) {
    let changed = changed_keys(running, &new);
    if changed.is_empty() {
        tracing::info!(trigger, "config reloaded: nothing changed");
        return;
    }
    let mut applied = Vec::new();
    let mut need_restart = Vec::new();
    for key in changed {
        match LIVE.iter().find(|(live, _)| *live == key) {
            Some((_, copy)) => {
                copy(running, &new);
                applied.push(key);
            }
            None => need_restart.push(key),
        }
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

    #[test]
    fn live_keys_apply_and_the_rest_wait_for_a_restart() {
        let mut running: Config =
            toml::from_str("[mysql]\nurl = \"mysql://a/b\"\nmax_batch_rows = 10\n[redis]\nurl = \"redis://x\"\n")
                .unwrap();
        let new: Config = toml::from_str(
            "[agent]\nlog_level = \"debug\"\n[mysql]\nurl = \"mysql://a/c\"\nmax_batch_rows = 5\n[redis]\nurl = \"redis://x\"\npublish_updates = true\n",
        )
        .unwrap();
        let live = Live { forward: None, redis: None, log_level: None };
        reload_config(&mut running, new, &live, "test");
        assert_eq!(running.agent.log_level, "debug");
        assert_eq!(running.mysql.as_ref().unwrap().max_batch_rows, 5);
        assert!(running.redis.as_ref().unwrap().publish_updates);
        assert_eq!(running.mysql.as_ref().unwrap().url, "mysql://a/b", "the URL needs a restart");
        let keys: Vec<&str> = LIVE.iter().map(|(key, _)| *key).collect();
        for key in keys {
            let section = key.split('.').next().unwrap();
            assert!(["agent", "mysql", "redis"].contains(&section), "{key}");
        }
    }

    #[test]
    fn a_sighup_right_after_spawn_reloads_instead_of_ending_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "[agent]\nlog_level = \"debug\"\n").unwrap();
        let mut running = Config::load(Some(&path)).unwrap();
        running.agent.log_level = "info".into();
        let (set_tx, mut set_rx) = mpsc::unbounded_channel::<String>();
        let log_level: LogLevelSetter = Box::new(move |level: &str| {
            let _ = set_tx.send(level.to_string());
            Ok(())
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (stop_tx, stop_rx) = watch::channel(false);
            spawn(path.clone(), running, Live { forward: None, redis: None, log_level: Some(log_level) }, stop_rx);
            // On a current-thread runtime the spawned task has not run yet: only a handler that `spawn` itself
            // installed stands between this signal and its default action, which ends the process.
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
            let applied = tokio::time::timeout(Duration::from_secs(10), set_rx.recv()).await;
            assert_eq!(applied.ok().flatten().as_deref(), Some("debug"), "the SIGHUP did not reload");
            stop_tx.send(true).unwrap();
        });
    }
}
