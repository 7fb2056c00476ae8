//! Versioned schema migrations: the SQL files in `migrations/`, compiled in, applied in order under a lock,
//! each recorded with its checksum.
//!
//! The lock is a row in `schema_migrations_lock`, not `GET_LOCK`: a named lock is local to one server, and
//! on a Galera cluster two hosts migrating through different nodes would both hold it. A row is replicated
//! and certified like any write, so of two hosts inserting it at once through different nodes one fails
//! (duplicate key, or a certification conflict reported as a deadlock) and waits.

use anyhow::{bail, Context};
use mysql_async::prelude::Queryable;
use sha2::{Digest, Sha256};

pub struct Migration {
    pub version: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. A new file in `migrations/` must be added here (a test checks it).
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: "0001_init", sql: include_str!("../../migrations/0001_init.sql") },
    Migration { version: "0002_run_offsets", sql: include_str!("../../migrations/0002_run_offsets.sql") },
];

const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// A lock older than this is taken over: its holder died (a migration's DDL takes far less).
const LOCK_EXPIRES_MINUTES: u32 = 30;

const CREATE_LOCK_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations_lock (
    name       VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    holder     VARCHAR(255) NOT NULL,
    expires_at DATETIME(6) NOT NULL
) ENGINE=InnoDB";

const CREATE_SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    checksum   CHAR(64) CHARACTER SET ascii NOT NULL,
    applied_at DATETIME(6) NOT NULL
) ENGINE=InnoDB";

/// Where the database's schema stands against this binary's migrations.
#[derive(Debug, PartialEq, Eq)]
pub enum SchemaState {
    Current,
    /// Migrations this binary has that the database lacks.
    Behind(Vec<&'static str>),
    /// Migrations the database has that this binary does not know (a newer agent migrated it).
    Ahead(Vec<String>),
}

/// Why the schema's state could not be read.
#[derive(Debug)]
pub enum StateError {
    Connection(mysql_async::Error),
    /// An applied migration was edited, or the bookkeeping is unreadable: the operator must act.
    Schema(anyhow::Error),
}

pub fn checksum(sql: &str) -> String {
    Sha256::digest(sql.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The statements of a migration file: split at `;` ending a line, comment lines dropped.
fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        if line.trim_start().starts_with("--") {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if line.trim_end().ends_with(';') {
            let statement = current.trim().trim_end_matches(';').trim().to_string();
            if !statement.is_empty() {
                out.push(statement);
            }
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

/// Where the schema stands. A missing `schema_migrations` table means nothing was applied.
pub async fn state(conn: &mut mysql_async::Conn) -> Result<SchemaState, StateError> {
    let exists: Option<u8> = conn
        .query_first(
            "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'schema_migrations'",
        )
        .await
        .map_err(StateError::Connection)?;
    let rows: Vec<(String, String)> = if exists.is_some() {
        conn.query("SELECT version, checksum FROM schema_migrations ORDER BY version")
            .await
            .map_err(StateError::Connection)?
    } else {
        Vec::new()
    };
    let mut unknown = Vec::new();
    for (version, stored) in &rows {
        match MIGRATIONS.iter().find(|m| m.version == version) {
            Some(m) if checksum(m.sql) != *stored => {
                return Err(StateError::Schema(anyhow::anyhow!(
                    "migration {version} was edited after it was applied; restore the original file"
                )))
            }
            Some(_) => {}
            None => unknown.push(version.clone()),
        }
    }
    let missing: Vec<_> = MIGRATIONS.iter().map(|m| m.version).filter(|v| !rows.iter().any(|(a, _)| a == v)).collect();
    Ok(if !missing.is_empty() {
        SchemaState::Behind(missing)
    } else if !unknown.is_empty() {
        SchemaState::Ahead(unknown)
    } else {
        SchemaState::Current
    })
}

/// Applies the pending migrations in order and returns their versions. Safe to run twice and from several
/// hosts at once, through one server or different nodes of a cluster: the lock row serialises runs.
pub async fn migrate(conn: &mut mysql_async::Conn) -> anyhow::Result<Vec<&'static str>> {
    let holder = format!("{}:{}:{:016x}", hostname(), std::process::id(), fastrand::u64(..));
    take_lock(conn, &holder).await?;
    let result = apply_pending(conn).await;
    let released =
        conn.exec_drop("DELETE FROM schema_migrations_lock WHERE name = 'migrate' AND holder = ?", (&holder,)).await;
    if let Err(e) = released {
        tracing::warn!(error = %e, holder, "cannot release the migration lock; it expires in {LOCK_EXPIRES_MINUTES} minutes");
    }
    result
}

async fn take_lock(conn: &mut mysql_async::Conn, holder: &str) -> anyhow::Result<()> {
    conn.query_drop(CREATE_LOCK_TABLE).await.context("cannot create schema_migrations_lock")?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        conn.query_drop("DELETE FROM schema_migrations_lock WHERE name = 'migrate' AND expires_at < UTC_TIMESTAMP(6)")
            .await
            .context("cannot clear an expired migration lock")?;
        let taken = conn
            .exec_drop(
                "INSERT INTO schema_migrations_lock (name, holder, expires_at) \
                 VALUES ('migrate', ?, UTC_TIMESTAMP(6) + INTERVAL ? MINUTE)",
                (holder, LOCK_EXPIRES_MINUTES),
            )
            .await;
        match taken {
            Ok(()) => return Ok(()),
            // Held by another run (duplicate key), or taken at the same moment through another node.
            Err(mysql_async::Error::Server(e)) if matches!(e.code, 1062 | 1213 | 1205) => {}
            Err(e) => return Err(e).context("cannot take the migration lock"),
        }
        if std::time::Instant::now() >= deadline {
            let held: Option<String> = conn
                .query_first("SELECT holder FROM schema_migrations_lock WHERE name = 'migrate'")
                .await
                .unwrap_or(None);
            bail!(
                "another migration ({}) has held the lock for {} s; try again later, or, if that run died, \
                 DELETE FROM schema_migrations_lock WHERE name = 'migrate'",
                held.as_deref().unwrap_or("unknown"),
                LOCK_WAIT.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250 + fastrand::u64(..250))).await;
    }
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|name| name.into_string().ok()).unwrap_or_else(|| "?".into())
}

async fn apply_pending(conn: &mut mysql_async::Conn) -> anyhow::Result<Vec<&'static str>> {
    conn.query_drop(CREATE_SCHEMA_MIGRATIONS).await.context("cannot create schema_migrations")?;
    let missing = match state(conn).await {
        Ok(SchemaState::Behind(missing)) => missing,
        Ok(SchemaState::Current) => Vec::new(),
        Ok(SchemaState::Ahead(unknown)) => {
            tracing::warn!(?unknown, "the database has migrations this telemetry-agent does not know");
            Vec::new()
        }
        Err(StateError::Connection(e)) => return Err(e).context("cannot read schema_migrations"),
        Err(StateError::Schema(e)) => return Err(e),
    };
    let mut done = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| missing.contains(&m.version)) {
        tracing::info!(version = migration.version, "applying migration");
        for statement in statements(migration.sql) {
            conn.query_drop(&statement).await.with_context(|| format!("migration {} failed", migration.version))?;
        }
        conn.exec_drop(
            "INSERT INTO schema_migrations (version, checksum, applied_at) VALUES (?, ?, UTC_TIMESTAMP(6))",
            (migration.version, checksum(migration.sql)),
        )
        .await
        .with_context(|| format!("cannot record migration {}", migration.version))?;
        done.push(migration.version);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_migrations_is_compiled_in_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| name.strip_suffix(".sql").map(str::to_string))
            .collect();
        files.sort();
        assert_eq!(files, MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>());
    }

    #[test]
    fn statements_split_at_line_ending_semicolons() {
        let sql = "-- c\nCREATE TABLE a (x INT);\n\nCREATE TABLE b (\n  y INT\n);\n";
        assert_eq!(statements(sql), vec!["CREATE TABLE a (x INT)", "CREATE TABLE b (\n  y INT\n)"]);
        assert_eq!(statements(MIGRATIONS[0].sql).len(), 3);
    }
}
