//! Decoding what is stored in the WAL (chunks, and the events inside them) from arbitrary bytes: errors,
//! never panics, never allocates beyond the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    telemetry_wal::fuzzing::decode_chunk(data);
    let _ = telemetry_agent::event::Event::decode(data);
});
