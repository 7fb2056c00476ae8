//! Dead letters: records a sink could not deliver, kept with the reason until an operator retries or drops
//! them. On disk: the `dead_letters` tree, apart from the records so that truncation never drops them, keyed
//! by `sink \0 seq` (so they list by sink, then seq); each value is `[format version][bincode]`, versioned
//! apart from chunks. Every change is flushed before it returns.

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::{Wal, WalError};

const FORMAT_V1: u8 = 1;

fn options() -> impl Options {
    bincode::DefaultOptions::new()
}

/// A record a sink could not deliver, kept with the reason until an operator retries or drops it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub sink: String,
    pub seq: u64,
    pub error: String,
    /// Milliseconds since the Unix epoch when it was dead-lettered.
    pub at_ms: u64,
    pub payload: Vec<u8>,
}

impl Wal {
    /// Keeps a record a sink could not deliver, durably, before returning. Adding the same (sink, seq) again
    /// replaces the earlier entry.
    pub fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), WalError> {
        let value = encode_dead_letter(letter);
        self.inner
            .dead_letters
            .insert(dead_letter_key(&letter.sink, letter.seq), value)
            .map_err(|e| self.sled_err("write a dead letter", e))?;
        self.flush()
    }

    /// Every dead letter, by sink then seq.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, WalError> {
        let mut out = Vec::new();
        for entry in self.inner.dead_letters.iter() {
            let (key, value) = entry.map_err(|e| self.sled_err("read dead letters", e))?;
            let letter = decode_dead_letter(&key, &value).map_err(|reason| WalError::Corrupt {
                dir: self.inner.dir.clone(),
                detail: format!("dead letter: {reason}"),
            })?;
            out.push(letter);
        }
        Ok(out)
    }

    /// Removes a dead letter (after it was retried or dropped); true if it existed.
    pub fn remove_dead_letter(&self, sink: &str, seq: u64) -> Result<bool, WalError> {
        let old = self
            .inner
            .dead_letters
            .remove(dead_letter_key(sink, seq))
            .map_err(|e| self.sled_err("remove a dead letter", e))?;
        self.flush()?;
        Ok(old.is_some())
    }
}

fn dead_letter_key(sink: &str, seq: u64) -> Vec<u8> {
    [sink.as_bytes(), &[0], &seq.to_be_bytes()].concat()
}

#[derive(Serialize, Deserialize)]
struct DeadLetterV1 {
    error: String,
    at_ms: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

/// A dead letter: `[format version][bincode]`, keyed by `sink \0 seq`.
fn encode_dead_letter(letter: &DeadLetter) -> Vec<u8> {
    let body = DeadLetterV1 { error: letter.error.clone(), at_ms: letter.at_ms, payload: letter.payload.clone() };
    let mut out = vec![FORMAT_V1];
    if let Err(e) = options().serialize_into(&mut out, &body) {
        unreachable!("bincode failed to serialize a dead letter into memory: {e}");
    }
    out
}

pub(crate) fn decode_dead_letter(key: &[u8], value: &[u8]) -> Result<DeadLetter, String> {
    let split = key.len().checked_sub(9).filter(|&at| key[at] == 0).ok_or("malformed key")?;
    let sink = String::from_utf8_lossy(&key[..split]).into_owned();
    let seq = u64::from_be_bytes(key[split + 1..].try_into().map_err(|_| "malformed key")?);
    let body = match value.split_first() {
        Some((&FORMAT_V1, body)) => body,
        _ => return Err(format!("dead letter {sink}/{seq}: unknown format")),
    };
    let body: DeadLetterV1 = options()
        .with_limit(body.len() as u64)
        .deserialize(body)
        .map_err(|e| format!("dead letter {sink}/{seq}: {e}"))?;
    Ok(DeadLetter { sink, seq, error: body.error, at_ms: body.at_ms, payload: body.payload })
}
