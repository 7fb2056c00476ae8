//! Tables and labels: small keyed state kept beside the log that must outlive the truncation of the records
//! it was derived from.
//!
//! On disk: each table is its own sled tree, `table/<name>`, written with the next flush; labels are
//! `label/<name>` keys in `meta`, flushed before `set_label` returns.

use std::path::PathBuf;

use crate::{Wal, WalError};

const LABEL_PREFIX: &[u8] = b"label/";
const TABLE_PREFIX: &[u8] = b"table/";

/// A small keyed table in the WAL's database, for state derived from records that must outlive their
/// truncation (the Redis mirror keeps the newest value per key in one). Writes are persisted with the next
/// flush; [`Wal::truncate`] flushes before it drops anything, so records passed by a cursor that moved after
/// a table write never go while that write could still be lost.
#[derive(Clone)]
pub struct Table {
    tree: sled::Tree,
    dir: PathBuf,
}

impl Table {
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, WalError> {
        let value = self.tree.get(key).map_err(|e| WalError::sled(&self.dir, "read a table", e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    /// Writes all entries or none.
    pub fn insert_all(&self, entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Result<(), WalError> {
        let mut batch = sled::Batch::default();
        for (key, value) in entries {
            batch.insert(key, value);
        }
        self.tree.apply_batch(batch).map_err(|e| WalError::sled(&self.dir, "write a table", e))
    }

    /// Every key, in order.
    pub fn keys(&self) -> Result<Vec<Vec<u8>>, WalError> {
        self.tree
            .iter()
            .keys()
            .map(|key| key.map(|k| k.to_vec()).map_err(|e| WalError::sled(&self.dir, "read a table", e)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

impl Wal {
    /// The table `name`, created empty if it does not exist.
    pub fn table(&self, name: &str) -> Result<Table, WalError> {
        let tree = self
            .inner
            .db
            .open_tree([TABLE_PREFIX, name.as_bytes()].concat())
            .map_err(|e| self.sled_err("open a table", e))?;
        Ok(Table { tree, dir: self.inner.dir.clone() })
    }

    /// A small persisted string under `name` (the agent keeps its identity here).
    pub fn label(&self, name: &str) -> Result<Option<String>, WalError> {
        let value = self.inner.meta.get(label_key(name)).map_err(|e| self.sled_err("read a label", e))?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Sets a label and makes it durable before returning.
    pub fn set_label(&self, name: &str, value: &str) -> Result<(), WalError> {
        self.inner.meta.insert(label_key(name), value.as_bytes()).map_err(|e| self.sled_err("write a label", e))?;
        self.flush()
    }
}

fn label_key(name: &str) -> Vec<u8> {
    [LABEL_PREFIX, name.as_bytes()].concat()
}
