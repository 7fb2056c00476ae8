//! Each entry point feeds arbitrary bytes to a decoder of what is on disk (chunks, dead letters); none may
//! panic, whatever a damaged or hostile file holds.

use crate::chunk::Chunk;
use crate::dead_letters::decode_dead_letter;

/// Decodes `value` as a stored chunk as it is, and again with its checksum made valid so that the body
/// decoder is reached; reads every record. Must never panic.
pub fn decode_chunk(value: &[u8]) {
    let key = 1u64.to_be_bytes();
    let mut fixed = value.to_vec();
    if fixed.len() >= 5 {
        let crc = crc32fast::hash(&fixed[5..]);
        fixed[1..5].copy_from_slice(&crc.to_le_bytes());
    }
    for bytes in [value, &fixed[..]] {
        if let Ok(chunk) = Chunk::decode(&key, bytes) {
            let _ = chunk.last_seq();
            for (_, payload) in chunk.records() {
                std::hint::black_box(payload);
            }
        }
    }
    let _ = decode_dead_letter(&[b'm', 0, 0, 0, 0, 0, 0, 0, 0, 1], value);
}
