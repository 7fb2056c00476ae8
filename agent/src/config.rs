//! The agent's TOML configuration: every key has a documented default, unknown keys are errors.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::sink::Sink;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    pub ingest: IngestConfig,
    pub wal: WalConfig,
    pub http: HttpConfig,
    pub control: ControlConfig,
    /// Absent: the MySQL forwarder is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mysql: Option<MysqlConfig>,
    /// Absent: the Redis mirror is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    pub spool: SpoolConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name in MySQL (`agent_id` columns); fixed once the WAL exists. Default: the hostname.
    pub id: Option<String>,
    /// `error`, `warn`, `info`, `debug`, `trace` or a tracing filter; `RUST_LOG` overrides it.
    pub log_level: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    pub socket: PathBuf,
    /// Octal permission bits of the socket file.
    pub socket_mode: String,
    /// Group owning the socket file (scripts' users join it); default: the agent's group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    pub max_line_bytes: usize,
    pub max_connections: usize,
    /// Close a connection that sent nothing for this long; 0 keeps idle connections open.
    pub idle_timeout_secs: u64,
    /// Lines a client may have in flight (read, not yet answered) before the agent stops reading it.
    pub max_pending_per_connection: usize,
    /// How long a line may wait for room in the WAL queue before it is answered `overloaded`.
    pub overload_timeout_ms: u64,
    /// Bytes of events read but not yet durable, and of lines not yet complete, across all connections
    /// (bounds memory).
    pub max_inflight_bytes: usize,
    /// A client that reads none of its waiting answers for this long is closed (its slots and memory freed).
    pub answer_timeout_secs: u64,
    /// A metric's `ts` or a trade's `closed_at` further ahead of the agent's clock is refused
    /// (`invalid_event`): the Redis mirror never goes back in time, so it would pin the value until then.
    pub max_future_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    Fsync,
    Interval,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalConfig {
    pub dir: PathBuf,
    pub durability: DurabilityMode,
    /// With `durability = "interval"`: how often the WAL is flushed.
    pub flush_interval_ms: u64,
    /// With `durability = "fsync"`: how long a small group commit waits for more events before its sync.
    pub commit_delay_us: u64,
    /// Disk the WAL directory may use; beyond it clients get `wal_full`.
    pub max_bytes: u64,
    /// sled's cache.
    pub cache_bytes: u64,
    /// Keep records this long after every sink has taken them, for `wal dump` and `wal replay` (dropped
    /// earlier when records fill 1/8 of max_bytes or the directory 80% of it: `telemetry_wal::PRESSURE_*`).
    pub retain_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve `/metrics`, `/healthz` and `/readyz`.
    pub enabled: bool,
    /// `host:port`; keep it on 127.0.0.1 unless a firewall guards it.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { enabled: true, listen: "127.0.0.1:9464".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// The socket `status` and `wal ...` use to reach the running agent.
    pub socket: PathBuf,
    /// A group whose members may use it too (mode 0660); without one, only the agent's user (0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig { socket: PathBuf::from("./data/control.sock"), group: None }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MysqlConfig {
    /// `mysql://user[:password]@host:3306/database`
    pub url: String,
    /// Instead of `url`: the nodes of a Galera cluster. The agent writes through one at a time and moves to
    /// the next usable one when its node fails.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Galera: also move away from a node that is a state-transfer donor or desynced (it may stall writes).
    pub avoid_desynced: bool,
    /// A file holding the password (first line), readable only by the agent; overrides the URL's password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// The most connections the agent opens to MySQL, whatever the number of scripts.
    pub pool_size: usize,
    /// Batches written at once, each in its own transaction on its own connection (at most pool_size).
    pub parallel_batches: usize,
    /// A batch is sent as soon as it holds this many events...
    pub max_batch_rows: usize,
    /// ...or this many bytes of events (keeps statements under `max_allowed_packet`)...
    pub max_batch_bytes: usize,
    /// ...or when the WAL has nothing more and its oldest event has waited this long.
    pub max_linger_ms: u64,
    /// Retries after a connection error, deadlock or lock wait back off from this...
    pub retry_initial_ms: u64,
    /// ...doubling, with jitter, up to this.
    pub retry_max_ms: u64,
    /// A batch transaction that takes longer is abandoned (rolled back) and retried.
    pub write_timeout_ms: u64,
    /// Connect with TLS (certificates checked against the system's web roots, or `tls_ca_file`).
    pub tls: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// How batches are sent: LOAD DATA LOCAL INFILE while the server takes it (`auto`), INSERT only, or
    /// LOAD DATA only.
    pub bulk: crate::sink::mysql::Bulk,
}

impl MysqlConfig {
    /// The servers to write to, in the order they are tried: `url`, or `urls`.
    pub fn node_urls(&self) -> Vec<&str> {
        if self.urls.is_empty() {
            vec![self.url.as_str()]
        } else {
            self.urls.iter().map(String::as_str).collect()
        }
    }
}

impl Default for MysqlConfig {
    fn default() -> Self {
        MysqlConfig {
            url: String::new(),
            urls: Vec::new(),
            avoid_desynced: true,
            password_file: None,
            pool_size: 4,
            parallel_batches: 3,
            max_batch_rows: 10_000,
            max_batch_bytes: 4 << 20,
            max_linger_ms: 100,
            retry_initial_ms: 100,
            retry_max_ms: 10_000,
            write_timeout_ms: 30_000,
            tls: false,
            tls_ca_file: None,
            bulk: crate::sink::mysql::Bulk::Auto,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:6379[/db]`
    pub url: String,
    /// A file holding the password (first line), readable only by the agent; overrides the URL's password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Every key the mirror writes starts with `{key_prefix}:`.
    pub key_prefix: String,
    /// `PUBLISH {key_prefix}:updates` a message naming what changed, for live dashboards.
    pub publish_updates: bool,
    pub connect_timeout_ms: u64,
    /// A command that takes longer counts as a failure: the connection is replaced and the write retried.
    pub response_timeout_ms: u64,
    /// Reconnects back off, doubling with jitter, up to this.
    pub retry_max_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            password_file: None,
            key_prefix: "telemetry".into(),
            publish_updates: false,
            connect_timeout_ms: 1000,
            response_timeout_ms: 2000,
            retry_max_ms: 5000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Where scripts write spool files while they cannot reach the agent (docs/spool.md).
    pub dir: PathBuf,
    /// A larger spool file is refused (renamed `*.refused`, an ERROR in the log), not read.
    pub max_file_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig { dir: PathBuf::from("./data/spool"), max_file_bytes: 1 << 30 }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig { id: None, log_level: "info".into() }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            socket: PathBuf::from("./data/agent.sock"),
            socket_mode: "0660".into(),
            socket_group: None,
            max_line_bytes: 64 * 1024,
            max_connections: 16384,
            idle_timeout_secs: 0,
            max_pending_per_connection: 128,
            overload_timeout_ms: 2000,
            max_inflight_bytes: 64 << 20,
            answer_timeout_secs: 30,
            max_future_secs: 86_400,
        }
    }
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            dir: PathBuf::from("./data/wal"),
            durability: DurabilityMode::Fsync,
            flush_interval_ms: 10,
            commit_delay_us: 2000,
            max_bytes: 4 << 30,
            cache_bytes: 16 << 20,
            retain_secs: 3600,
        }
    }
}

/// Where the Debian package puts the config; used when `--config` is not given.
pub const INSTALLED_CONFIG: &str = "/etc/telemetry-agent/agent.toml";

/// The largest line the protocol takes: an encoded event must fit one WAL record.
pub const MAX_LINE_BYTES_LIMIT: usize = 96 * 1024;
const MAX_AGENT_ID_CHARS: usize = 40;
/// Clocks of scripts on one host differ by less than a minute; a larger limit than 10 years means none.
const MIN_FUTURE_SECS: u64 = 60;
const MAX_FUTURE_SECS: u64 = 10 * 366 * 86_400;

impl Config {
    /// Reads and validates `path`; `None` reads the installed config ([`INSTALLED_CONFIG`]) if there is one,
    /// else gives the defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let resolved = Config::resolve_path(path);
        let path = resolved.as_deref();
        let config: Config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                // toml's own message quotes the offending line, which may hold a password.
                toml::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("invalid config file {}: {}", path.display(), describe_toml_error(&text, &e))
                })?
            }
            None => Config::default(),
        };
        config.validate().with_context(|| match path {
            Some(path) => format!("invalid config file {}", path.display()),
            None => "invalid default config".to_string(),
        })?;
        Ok(config)
    }

    /// The file [`Config::load`] reads for `path`: itself, else the installed config if there is one.
    pub fn resolve_path(path: Option<&Path>) -> Option<PathBuf> {
        let installed = Path::new(INSTALLED_CONFIG);
        path.map(Path::to_path_buf).or_else(|| installed.exists().then(|| installed.to_path_buf()))
    }

    fn validate(&self) -> anyhow::Result<()> {
        if let Some(id) = &self.agent.id {
            validate_agent_id(id).context("[agent] id")?;
        }
        self.socket_mode().context("[ingest] socket_mode")?;
        let ingest = &self.ingest;
        if !(1024..=MAX_LINE_BYTES_LIMIT).contains(&ingest.max_line_bytes) {
            bail!(
                "[ingest] max_line_bytes must be between 1024 and {MAX_LINE_BYTES_LIMIT}, not {}",
                ingest.max_line_bytes
            );
        }
        for (key, value) in [
            ("[ingest] max_connections", ingest.max_connections),
            ("[ingest] max_pending_per_connection", ingest.max_pending_per_connection),
            ("[ingest] answer_timeout_secs", usize::try_from(ingest.answer_timeout_secs).unwrap_or(usize::MAX)),
        ] {
            if value == 0 {
                bail!("{key} must be at least 1");
            }
        }
        if ingest.max_inflight_bytes < MAX_LINE_BYTES_LIMIT {
            bail!(
                "[ingest] max_inflight_bytes must be at least {MAX_LINE_BYTES_LIMIT}, not {}",
                ingest.max_inflight_bytes
            );
        }
        if !(MIN_FUTURE_SECS..=MAX_FUTURE_SECS).contains(&ingest.max_future_secs) {
            bail!(
                "[ingest] max_future_secs must be between {MIN_FUTURE_SECS} and {MAX_FUTURE_SECS} (10 years), not {}",
                ingest.max_future_secs
            );
        }
        if self.http.enabled && self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            bail!("[http] listen must be an address like \"127.0.0.1:9464\", not {:?}", self.http.listen);
        }
        if self.control.socket == self.ingest.socket {
            bail!("[control] socket and [ingest] socket must differ");
        }
        if self.wal.max_bytes < 16 << 20 {
            bail!("[wal] max_bytes must be at least 16 MiB (16777216), not {}", self.wal.max_bytes);
        }
        if self.wal.durability == DurabilityMode::Interval && self.wal.flush_interval_ms == 0 {
            bail!("[wal] flush_interval_ms must be at least 1 with durability = \"interval\"");
        }
        if self.spool.dir.as_os_str().is_empty() {
            bail!("[spool] dir must not be empty");
        }
        if self.spool.max_file_bytes < 1 << 20 {
            bail!("[spool] max_file_bytes must be at least 1 MiB (1048576), not {}", self.spool.max_file_bytes);
        }
        if let Some(mysql) = &self.mysql {
            match (mysql.url.is_empty(), mysql.urls.is_empty()) {
                (true, true) => {
                    bail!("[mysql] url (or urls, for a cluster) is required when the [mysql] section is present")
                }
                (false, false) => bail!("[mysql] takes url or urls, not both"),
                _ => {}
            }
            for node in mysql.node_urls() {
                let url = url::Url::parse(node)
                    .map_err(|e| anyhow::anyhow!("[mysql] url `{}` is not a URL: {e}", mask_url(node)))?;
                if url.scheme() != "mysql" {
                    bail!("[mysql] url `{}` must start with mysql://", mask_url(node));
                }
            }
            if !(1..=64).contains(&mysql.pool_size) {
                bail!("[mysql] pool_size must be between 1 and 64, not {}", mysql.pool_size);
            }
            if !(1..=mysql.pool_size).contains(&mysql.parallel_batches) {
                bail!(
                    "[mysql] parallel_batches must be between 1 and pool_size ({}), not {}",
                    mysql.pool_size,
                    mysql.parallel_batches
                );
            }
            if !(1..=10_000).contains(&mysql.max_batch_rows) {
                bail!("[mysql] max_batch_rows must be between 1 and 10000, not {}", mysql.max_batch_rows);
            }
            if !(64 * 1024..=64 << 20).contains(&mysql.max_batch_bytes) {
                bail!("[mysql] max_batch_bytes must be between 65536 and 67108864, not {}", mysql.max_batch_bytes);
            }
            if mysql.retry_initial_ms == 0 || mysql.retry_max_ms < mysql.retry_initial_ms {
                bail!("[mysql] retry_initial_ms must be at least 1 and at most retry_max_ms");
            }
            if mysql.write_timeout_ms < 100 {
                bail!("[mysql] write_timeout_ms must be at least 100");
            }
        }
        if let Some(redis) = &self.redis {
            if redis.url.is_empty() {
                bail!("[redis] url is required when the [redis] section is present");
            }
            let url = url::Url::parse(&redis.url)
                .map_err(|e| anyhow::anyhow!("[redis] url `{}` is not a URL: {e}", mask_url(&redis.url)))?;
            if !matches!(url.scheme(), "redis" | "redis+unix" | "unix") {
                bail!("[redis] url must start with redis:// (or redis+unix:// for a local socket)");
            }
            if redis.key_prefix.is_empty() || redis.key_prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bail!("[redis] key_prefix must be non-empty, without spaces or control characters");
            }
            if redis.connect_timeout_ms < 10 || redis.response_timeout_ms < 10 {
                bail!("[redis] connect_timeout_ms and response_timeout_ms must be at least 10");
            }
            if redis.retry_max_ms < 100 {
                bail!("[redis] retry_max_ms must be at least 100");
            }
        }
        Ok(())
    }

    pub fn socket_mode(&self) -> anyhow::Result<u32> {
        let mode = u32::from_str_radix(self.ingest.socket_mode.trim_start_matches("0o"), 8)
            .with_context(|| format!("`{}` is not an octal mode like \"0660\"", self.ingest.socket_mode))?;
        if mode > 0o777 {
            bail!("`{}` has bits beyond 0777", self.ingest.socket_mode);
        }
        Ok(mode)
    }

    /// The configured agent id, or the hostname.
    pub fn agent_id(&self) -> anyhow::Result<String> {
        if let Some(id) = &self.agent.id {
            return Ok(id.clone());
        }
        let host = nix::unistd::gethostname().context("cannot read the hostname for the default [agent] id")?;
        let host = host.to_string_lossy().into_owned();
        validate_agent_id(&host)
            .with_context(|| format!("the hostname `{host}` cannot be the agent id; set [agent] id"))?;
        Ok(host)
    }

    /// The sinks that are configured.
    pub fn enabled_sinks(&self) -> Vec<Sink> {
        [self.mysql.as_ref().map(|_| Sink::Mysql), self.redis.as_ref().map(|_| Sink::Redis)]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The effective configuration as TOML, with passwords masked.
    pub fn to_masked_toml(&self) -> anyhow::Result<String> {
        let mut shown = self.clone();
        if let Some(mysql) = &mut shown.mysql {
            mysql.url = mask_url(&mysql.url);
            mysql.urls = mysql.urls.iter().map(|url| mask_url(url)).collect();
        }
        if let Some(redis) = &mut shown.redis {
            redis.url = mask_url(&redis.url);
        }
        if shown.agent.id.is_none() {
            shown.agent.id = self.agent_id().ok();
        }
        toml::to_string_pretty(&shown).context("cannot render the config")
    }
}

fn validate_agent_id(id: &str) -> anyhow::Result<()> {
    if id.is_empty() || id.chars().count() > MAX_AGENT_ID_CHARS {
        bail!("must be 1 to {MAX_AGENT_ID_CHARS} characters, got {}", id.chars().count());
    }
    if let Some(c) = id.chars().find(|c| !is_id_char(*c)) {
        bail!("`{id}` contains `{c}`; allowed are A-Z a-z 0-9 _ . : -");
    }
    Ok(())
}

/// The characters allowed in agent, profile and event ids.
pub fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
}

/// The first line of a secret file, which only its owner may read.
pub fn read_secret_file(path: &Path, key: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("{key} {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{key} {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {key} {}", path.display()))?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// Where a TOML error is and what it is, without the source line toml would quote (it may hold a password):
/// line, column, `section.key` when the line has one, and the message with quoted values hidden.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    // Serde's messages quote the value they reject (`invalid type: string "..."`).
    let message: String = error
        .message()
        .trim()
        .split('"')
        .enumerate()
        .map(|(i, part)| if i % 2 == 1 { "…" } else { part })
        .collect::<Vec<_>>()
        .join("\"");
    let Some(span) = error.span() else { return message };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let mut section = None;
    for header in text.lines().take(line) {
        let header = header.trim();
        if let Some(name) = header.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            section = Some(name.trim());
        }
    }
    let key = text
        .lines()
        .nth(line - 1)
        .and_then(|l| l.split_once('='))
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    let place = match (section, key) {
        (Some(section), Some(key)) => format!(" (`{section}.{key}`)"),
        (None, Some(key)) => format!(" (`{key}`)"),
        (Some(section), None) => format!(" (in [{section}])"),
        (None, None) => String::new(),
    };
    format!("line {line}, column {column}{place}: {message}")
}

/// Query parameters that carry a password (redis-rs reads `pass` and `password`).
fn is_secret_parameter(name: &str) -> bool {
    name.eq_ignore_ascii_case("pass") || name.eq_ignore_ascii_case("password")
}

/// `scheme://user:secret@host?password=secret` → `scheme://user:****@host?password=****`; anything
/// unparsable is hidden whole.
pub fn mask_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("****"));
            }
            if url.query_pairs().any(|(name, _)| is_secret_parameter(&name)) {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(name, value)| {
                        let value = if is_secret_parameter(&name) { "****".into() } else { value.into_owned() };
                        (name.into_owned(), value)
                    })
                    .collect();
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => "****".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_rejected_with_the_key_named() {
        let err = toml::from_str::<Config>("[ingest]\nsockett = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("sockett"), "{err}");
        let bad: Config = toml::from_str("[ingest]\nsocket_mode = \"0999\"\n").unwrap();
        assert!(format!("{:#}", bad.validate().unwrap_err()).contains("socket_mode"));
        let bad: Config = toml::from_str("[agent]\nid = \"a b\"\n").unwrap();
        assert!(format!("{:#}", bad.validate().unwrap_err()).contains("[agent] id"));
        let bad: Config = toml::from_str("[ingest]\nmax_future_secs = 0\n").unwrap();
        assert!(format!("{:#}", bad.validate().unwrap_err()).contains("[ingest] max_future_secs"));
    }

    #[test]
    fn mysql_takes_one_url_or_a_list_of_nodes() {
        let error = |toml: &str| format!("{:#}", toml::from_str::<Config>(toml).unwrap().validate().unwrap_err());
        assert!(error("[mysql]\npool_size = 2\n").contains("url (or urls, for a cluster) is required"));
        assert!(error("[mysql]\nurl = \"mysql://a/t\"\nurls = [\"mysql://b/t\"]\n").contains("url or urls, not both"));
        assert!(error("[mysql]\nurls = [\"mysql://a/t\", \"redis://b\"]\n")
            .contains("`redis://b` must start with mysql://"));
        let cluster: Config = toml::from_str("[mysql]\nurls = [\"mysql://a:1/t\", \"mysql://b:2/t\"]\n").unwrap();
        cluster.validate().unwrap();
        assert_eq!(cluster.mysql.unwrap().node_urls(), vec!["mysql://a:1/t", "mysql://b:2/t"]);
    }

    #[test]
    fn the_packaged_example_is_valid_and_shows_the_defaults() {
        let example: Config = toml::from_str(include_str!("../../packaging/agent.toml")).unwrap();
        example.validate().unwrap();
        let defaults = Config::default();
        assert_eq!(example.ingest.max_line_bytes, defaults.ingest.max_line_bytes);
        assert_eq!(example.ingest.max_pending_per_connection, defaults.ingest.max_pending_per_connection);
        assert_eq!(example.wal.max_bytes, defaults.wal.max_bytes);
        assert_eq!(example.wal.cache_bytes, defaults.wal.cache_bytes);
        assert_eq!(example.wal.durability, defaults.wal.durability);
        assert_eq!(example.wal.retain_secs, defaults.wal.retain_secs);
        assert_eq!(example.ingest.max_connections, defaults.ingest.max_connections);
        assert_eq!(example.ingest.max_future_secs, defaults.ingest.max_future_secs);
    }

    #[test]
    fn the_commented_settings_of_the_example_are_the_defaults() {
        let is_setting = |line: &str| {
            (line.starts_with('[') && line.ends_with(']'))
                || line
                    .split_once(" = ")
                    .is_some_and(|(key, _)| key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        };
        let uncommented: Vec<&str> = include_str!("../../packaging/agent.toml")
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(setting) if is_setting(setting) => setting,
                _ => line,
            })
            .collect();
        let example: Config = toml::from_str(&uncommented.join("\n")).unwrap();
        example.validate().unwrap();
        let mysql = example.mysql.unwrap();
        let expected = MysqlConfig {
            url: mysql.url.clone(),
            password_file: mysql.password_file.clone(),
            tls_ca_file: mysql.tls_ca_file.clone(),
            ..MysqlConfig::default()
        };
        assert_eq!(format!("{mysql:?}"), format!("{expected:?}"));
        let redis = example.redis.unwrap();
        let expected = RedisConfig {
            url: redis.url.clone(),
            password_file: redis.password_file.clone(),
            ..RedisConfig::default()
        };
        assert_eq!(format!("{redis:?}"), format!("{expected:?}"));
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(mask_url("mysql://u:hunter2@db:3306/t"), "mysql://u:****@db:3306/t");
        assert_eq!(mask_url("redis://:pw@127.0.0.1:6379"), "redis://:****@127.0.0.1:6379");
        let config: Config = toml::from_str("[mysql]\nurl = \"mysql://u:hunter2@db/t\"\n").unwrap();
        let shown = config.to_masked_toml().unwrap();
        assert!(!shown.contains("hunter2") && shown.contains("****"), "{shown}");
    }

    #[test]
    fn passwords_in_query_strings_are_masked() {
        let shown = mask_url("redis://:hunter2@127.0.0.1:6379/0?password=hunter2&protocol=resp3&pass=hunter3");
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(shown.contains("protocol=resp3") && shown.contains("password=****"), "{shown}");
        let shown = mask_url("redis://127.0.0.1:6379?PASS=hunter2");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(mask_url("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
    }

    #[test]
    fn a_toml_error_names_the_place_without_echoing_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "[agent]\nlog_level = \"info\"\n[mysql]\nurl = mysql://u:hunter2@db/t\n").unwrap();
        let error = format!("{:#}", Config::load(Some(&path)).unwrap_err());
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error.contains("line 4") && error.contains("column 7"), "{error}");
        // A type error names the key, not the value.
        std::fs::write(&path, "[redis]\nurl = [\"redis://:hunter2@h\"]\n").unwrap();
        let error = format!("{:#}", Config::load(Some(&path)).unwrap_err());
        assert!(!error.contains("hunter2") && error.contains("url") && error.contains("line 2"), "{error}");
    }
}
