//! The on-disk form of a chunk: `[format version: u8][crc32 of the body: u32 LE][body: bincode]`.
//! A new format gets a new version byte; readers keep decoding the old ones.

use bincode::Options;
use serde::{Deserialize, Serialize};

const FORMAT_V1: u8 = 1;
const HEADER_LEN: usize = 5;

#[derive(Serialize, Deserialize)]
struct BodyV1<'a> {
    appended_at_ms: u64,
    #[serde(borrow)]
    payloads: Vec<&'a serde_bytes::Bytes>,
}

/// A decoded chunk, borrowing its payloads from the sled value.
pub(crate) struct Chunk<'a> {
    pub first_seq: u64,
    pub appended_at_ms: u64,
    payloads: Vec<&'a serde_bytes::Bytes>,
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
}

impl<'a> Chunk<'a> {
    pub fn encode(appended_at_ms: u64, payloads: &[&[u8]]) -> Vec<u8> {
        let body = BodyV1 { appended_at_ms, payloads: payloads.iter().map(|p| serde_bytes::Bytes::new(p)).collect() };
        let mut out = vec![FORMAT_V1, 0, 0, 0, 0];
        // Serializing plain structs of integers and byte slices into a Vec cannot fail.
        if let Err(e) = options().serialize_into(&mut out, &body) {
            unreachable!("bincode failed to serialize a chunk into memory: {e}");
        }
        let crc = crc32fast::hash(&out[HEADER_LEN..]);
        out[1..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(key: &[u8], value: &'a [u8]) -> Result<Chunk<'a>, String> {
        let first_seq: [u8; 8] = key.try_into().map_err(|_| format!("key of {} bytes, expected 8", key.len()))?;
        if value.len() < HEADER_LEN {
            return Err(format!("value of {} bytes is shorter than the header", value.len()));
        }
        if value[0] != FORMAT_V1 {
            return Err(format!("unknown format version {}", value[0]));
        }
        let stored = u32::from_le_bytes([value[1], value[2], value[3], value[4]]);
        let body = &value[HEADER_LEN..];
        if crc32fast::hash(body) != stored {
            return Err("checksum mismatch".into());
        }
        let body: BodyV1<'a> =
            options().with_limit(body.len() as u64).deserialize(body).map_err(|e| format!("undecodable body: {e}"))?;
        if body.payloads.is_empty() {
            return Err("chunk holds no records".into());
        }
        Ok(Chunk {
            first_seq: u64::from_be_bytes(first_seq),
            appended_at_ms: body.appended_at_ms,
            payloads: body.payloads,
        })
    }

    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.payloads.len() as u64 - 1
    }

    pub fn records(&self) -> impl Iterator<Item = (u64, &'a [u8])> + '_ {
        self.payloads.iter().enumerate().map(|(i, p)| (self.first_seq + i as u64, &p[..]))
    }
}

/// A seq from a key or value: every seq is stored big-endian (chunk keys, cursors, `meta`).
pub(crate) fn be_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let value = Chunk::encode(7, &[b"a", b"bc"]);
        let key = 10u64.to_be_bytes();
        let chunk = Chunk::decode(&key, &value).unwrap();
        assert_eq!(chunk.records().collect::<Vec<_>>(), vec![(10, &b"a"[..]), (11, &b"bc"[..])]);
        assert_eq!(chunk.last_seq(), 11);
        for i in 0..value.len() {
            let mut bad = value.clone();
            bad[i] ^= 0x40;
            assert!(Chunk::decode(&key, &bad).is_err(), "flipped byte {i} went unnoticed");
        }
        assert!(Chunk::decode(&key, &value[..value.len() - 1]).is_err());
    }
}
