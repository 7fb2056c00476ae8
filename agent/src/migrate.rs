//! Versioned schema migrations: the SQL files in `migrations/`, compiled in, applied in order under a
//! named lock, each recorded with its checksum.

use anyhow::{bail, Context};
use mysql_async::prelude::Queryable;
use sha2::{Digest, Sha256};

pub struct Migration {
    pub version: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. A new file in `migrations/` must be added here (a test checks it).
pub const MIGRATIONS: &[Migration] =
    &[Migration { version: "0001_init", sql: include_str!("../../migrations/0001_init.sql") }];

const LOCK_NAME: &str = "telemetry_agent_migrate";
const LOCK_WAIT_SECS: u32 = 60;

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

/// The applied migrations, checked against this binary's: an applied file that was edited afterwards, or a
/// version this binary does not know, is an error.
async fn applied(conn: &mut mysql_async::Conn) -> anyhow::Result<Vec<String>> {
    let rows: Vec<(String, String)> = conn
        .query("SELECT version, checksum FROM schema_migrations ORDER BY version")
        .await
        .context("cannot read schema_migrations")?;
    for (version, stored) in &rows {
        match MIGRATIONS.iter().find(|m| m.version == version) {
            Some(m) if checksum(m.sql) != *stored => bail!(
                "migration {version} was edited after it was applied (checksum in schema_migrations {stored}, \
                 file {}); restore the original file and put changes in a new migration",
                checksum(m.sql)
            ),
            Some(_) => {}
            None => bail!("the database has migration {version}, which this telemetry-agent does not know; upgrade it"),
        }
    }
    Ok(rows.into_iter().map(|(version, _)| version).collect())
}

/// Where the schema stands. A missing `schema_migrations` table means nothing was applied.
pub async fn state(conn: &mut mysql_async::Conn) -> anyhow::Result<SchemaState> {
    let exists: Option<u8> = conn
        .query_first(
            "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'schema_migrations'",
        )
        .await
        .context("cannot inspect the schema")?;
    let applied = if exists.is_some() { applied(conn).await? } else { Vec::new() };
    let missing: Vec<_> = MIGRATIONS.iter().map(|m| m.version).filter(|v| !applied.iter().any(|a| a == v)).collect();
    Ok(if missing.is_empty() { SchemaState::Current } else { SchemaState::Behind(missing) })
}

/// Applies the pending migrations in order and returns their versions. Safe to run twice and from several
/// hosts at once: a named lock serialises runs.
pub async fn migrate(conn: &mut mysql_async::Conn) -> anyhow::Result<Vec<&'static str>> {
    let locked: Option<Option<i64>> = conn
        .exec_first("SELECT GET_LOCK(?, ?)", (LOCK_NAME, LOCK_WAIT_SECS))
        .await
        .context("cannot take the migration lock")?;
    if locked.flatten() != Some(1) {
        bail!("another migration has held the lock `{LOCK_NAME}` for {LOCK_WAIT_SECS} s; try again later");
    }
    let result = apply_pending(conn).await;
    let released: Result<Option<Option<i64>>, _> = conn.exec_first("SELECT RELEASE_LOCK(?)", (LOCK_NAME,)).await;
    if let Err(e) = released {
        tracing::warn!(error = %e, "cannot release the migration lock; it goes with the connection");
    }
    result
}

async fn apply_pending(conn: &mut mysql_async::Conn) -> anyhow::Result<Vec<&'static str>> {
    conn.query_drop(CREATE_SCHEMA_MIGRATIONS).await.context("cannot create schema_migrations")?;
    let applied = applied(conn).await?;
    let mut done = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| !applied.iter().any(|a| a == m.version)) {
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
