//! The protocol line parser: never panics, and whatever it accepts survives the WAL encoding and renders
//! back (as `wal dump` does) to a line that parses to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use telemetry_agent::event::{parse_line, Event};

fuzz_target!(|data: &[u8]| {
    let Ok(event) = parse_line(data, 1_795_000_000_000_000, u64::MAX) else { return };
    let decoded = Event::decode(&event.encode()).expect("an accepted event decodes from its own encoding");
    assert_eq!(decoded, event);
    let rendered = event.to_json(None);
    let again = parse_line(rendered.as_bytes(), 1_795_000_000_000_000, u64::MAX).expect("a rendered event parses");
    assert_eq!(again.to_json(None), rendered);
});
