//! Events: parsing and validating a protocol line, and the versioned encoding stored in the WAL.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::is_id_char;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    Metric(Metric),
    Trade(Trade),
}

/// Times are microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub profile_id: String,
    pub name: String,
    pub value: f64,
    pub ts_us: i64,
    /// A JSON object, as the client sent it.
    pub tags: Option<String>,
    pub event_id: Option<String>,
    pub received_us: i64,
}

/// Decimal fields keep the client's digits exactly, as validated decimal strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trade {
    pub profile_id: String,
    pub symbol: String,
    pub side: Side,
    pub quantity: String,
    pub price: String,
    pub pnl: Option<String>,
    pub fees: Option<String>,
    pub opened_at_us: Option<i64>,
    pub closed_at_us: i64,
    /// A JSON object, as the client sent it.
    pub meta: Option<String>,
    pub event_id: Option<String>,
    pub received_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    Buy,
    Sell,
}

/// Why a line was refused: the protocol's error code and a reason naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub error: String,
}

impl Rejection {
    fn event(error: impl Into<String>) -> Rejection {
        Rejection { code: "invalid_event", error: error.into() }
    }
}

/// The wire form: every field raw, so that each conversion error can name its field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire<'a> {
    #[serde(borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    profile_id: Option<&'a RawValue>,
    #[serde(borrow)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
    #[serde(borrow)]
    tags: Option<&'a RawValue>,
    #[serde(borrow)]
    symbol: Option<&'a RawValue>,
    #[serde(borrow)]
    side: Option<&'a RawValue>,
    #[serde(borrow)]
    quantity: Option<&'a RawValue>,
    #[serde(borrow)]
    price: Option<&'a RawValue>,
    #[serde(borrow)]
    pnl: Option<&'a RawValue>,
    #[serde(borrow)]
    fees: Option<&'a RawValue>,
    #[serde(borrow)]
    opened_at: Option<&'a RawValue>,
    #[serde(borrow)]
    closed_at: Option<&'a RawValue>,
    #[serde(borrow)]
    meta: Option<&'a RawValue>,
}

const MAX_PROFILE_ID: usize = 64;
const MAX_EVENT_ID: usize = 64;
const MAX_NAME: usize = 128;
const MAX_SYMBOL: usize = 32;
/// DECIMAL(24,8): 16 digits before the point, 8 after.
const DECIMAL_INT_DIGITS: usize = 16;
const DECIMAL_FRAC_DIGITS: usize = 8;
/// DATETIME(6) holds years up to 9999; before 1970 is surely a mistake.
const MAX_TIME_US: i64 = 253_402_300_799_999_999;

/// Parses one protocol line (without its newline). `received_us` fills defaulted timestamps and is the
/// clock that `ts` and `closed_at` may run ahead of by at most `max_future_secs` (`[ingest] max_future_secs`).
pub fn parse_line(line: &[u8], received_us: i64, max_future_secs: u64) -> Result<Event, Rejection> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(Rejection { code: "invalid_json", error: "empty line; expected one JSON object".into() });
    }
    let syntax = |e: serde_json::Error| Rejection { code: "invalid_json", error: format!("not valid JSON: {e}") };
    if line.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        // serde would take an array for a struct; only objects are events.
        serde_json::from_slice::<serde::de::IgnoredAny>(line).map_err(syntax)?;
        return Err(Rejection::event("a line must be a JSON object"));
    }
    let wire: Wire = serde_json::from_slice(line).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Rejection::event(e.to_string()),
        _ => syntax(e),
    })?;
    let kind: String = required(wire.kind, "kind")?;
    match kind.as_str() {
        "metric" => parse_metric(wire, received_us, max_future_secs).map(Event::Metric),
        "trade" => parse_trade(wire, received_us, max_future_secs).map(Event::Trade),
        other => Err(Rejection::event(format!("`kind` must be \"metric\" or \"trade\", not {other:?}"))),
    }
}

fn parse_metric(wire: Wire, received_us: i64, max_future_secs: u64) -> Result<Metric, Rejection> {
    let foreign = [
        ("symbol", wire.symbol.is_some()),
        ("side", wire.side.is_some()),
        ("quantity", wire.quantity.is_some()),
        ("price", wire.price.is_some()),
        ("pnl", wire.pnl.is_some()),
        ("fees", wire.fees.is_some()),
        ("opened_at", wire.opened_at.is_some()),
        ("closed_at", wire.closed_at.is_some()),
        ("meta", wire.meta.is_some()),
    ];
    reject_foreign(&foreign, "metric")?;
    let name: String = required(wire.name, "name")?;
    check_len(&name, "name", MAX_NAME)?;
    if name.chars().any(char::is_control) {
        return Err(Rejection::event("`name` must not contain control characters"));
    }
    let value_raw = wire.value.ok_or_else(|| Rejection::event("`value` is required"))?;
    let value: f64 = serde_json::from_str(value_raw.get())
        .map_err(|_| Rejection::event(format!("`value` must be a finite number, not {}", value_raw.get())))?;
    if !value.is_finite() {
        return Err(Rejection::event(format!("`value` must be a finite number, not {}", value_raw.get())));
    }
    Ok(Metric {
        profile_id: profile_id(wire.profile_id)?,
        name,
        value,
        ts_us: not_future(optional_time(wire.ts, "ts")?, "ts", received_us, max_future_secs)?.unwrap_or(received_us),
        tags: optional_object(wire.tags, "tags")?,
        event_id: event_id(wire.event_id)?,
        received_us,
    })
}

fn parse_trade(wire: Wire, received_us: i64, max_future_secs: u64) -> Result<Trade, Rejection> {
    let foreign = [
        ("name", wire.name.is_some()),
        ("value", wire.value.is_some()),
        ("ts", wire.ts.is_some()),
        ("tags", wire.tags.is_some()),
    ];
    reject_foreign(&foreign, "trade")?;
    let symbol: String = required(wire.symbol, "symbol")?;
    check_len(&symbol, "symbol", MAX_SYMBOL)?;
    if let Some(c) = symbol.chars().find(|c| !(is_id_char(*c) || *c == '/')) {
        return Err(Rejection::event(format!("`symbol` contains `{c}`; allowed are A-Z a-z 0-9 _ . : - /")));
    }
    let side: String = required(wire.side, "side")?;
    let side = match side.to_ascii_lowercase().as_str() {
        "buy" => Side::Buy,
        "sell" => Side::Sell,
        _ => return Err(Rejection::event(format!("`side` must be \"buy\" or \"sell\", not {side:?}"))),
    };
    let quantity = decimal(wire.quantity, "quantity")?.ok_or_else(|| Rejection::event("`quantity` is required"))?;
    let price = decimal(wire.price, "price")?.ok_or_else(|| Rejection::event("`price` is required"))?;
    Ok(Trade {
        profile_id: profile_id(wire.profile_id)?,
        symbol,
        side,
        quantity,
        price,
        pnl: decimal(wire.pnl, "pnl")?,
        fees: decimal(wire.fees, "fees")?,
        opened_at_us: optional_time(wire.opened_at, "opened_at")?,
        closed_at_us: not_future(
            optional_time(wire.closed_at, "closed_at")?,
            "closed_at",
            received_us,
            max_future_secs,
        )?
        .unwrap_or(received_us),
        meta: optional_object(wire.meta, "meta")?,
        event_id: event_id(wire.event_id)?,
        received_us,
    })
}

fn reject_foreign(fields: &[(&str, bool)], kind: &str) -> Result<(), Rejection> {
    match fields.iter().find(|(_, present)| *present) {
        Some((field, _)) => Err(Rejection::event(format!("field `{field}` does not belong to a {kind}"))),
        None => Ok(()),
    }
}

/// A present, non-null field; JSON `null` counts as absent.
fn present(raw: Option<&RawValue>) -> Option<&RawValue> {
    raw.filter(|r| r.get() != "null")
}

fn required(raw: Option<&RawValue>, field: &str) -> Result<String, Rejection> {
    let raw = present(raw).ok_or_else(|| Rejection::event(format!("`{field}` is required")))?;
    serde_json::from_str(raw.get())
        .map_err(|_| Rejection::event(format!("`{field}` must be a string, not {}", abbreviate(raw.get()))))
}

fn check_len(value: &str, field: &str, max: usize) -> Result<(), Rejection> {
    let chars = value.chars().count();
    if chars == 0 || chars > max {
        return Err(Rejection::event(format!("`{field}` must be 1 to {max} characters, got {chars}")));
    }
    Ok(())
}

fn id_field(raw: Option<&RawValue>, field: &str, max: usize) -> Result<Option<String>, Rejection> {
    if present(raw).is_none() {
        return Ok(None);
    }
    let value = required(raw, field)?;
    check_len(&value, field, max)?;
    if let Some(c) = value.chars().find(|c| !is_id_char(*c)) {
        return Err(Rejection::event(format!("`{field}` contains `{c}`; allowed are A-Z a-z 0-9 _ . : -")));
    }
    Ok(Some(value))
}

fn profile_id(raw: Option<&RawValue>) -> Result<String, Rejection> {
    id_field(raw, "profile_id", MAX_PROFILE_ID)?.ok_or_else(|| Rejection::event("`profile_id` is required"))
}

fn event_id(raw: Option<&RawValue>) -> Result<Option<String>, Rejection> {
    // A generated id (`~{run}-{seq}`, outside the client alphabet) passes here: a dump of a WAL sent again
    // carries them. Whether this client may send one is the ingest's call (see `ingest`).
    if let Some(raw) = present(raw).filter(|raw| raw.get().starts_with("\"~")) {
        let value = required(Some(raw), "event_id")?;
        if crate::identity::is_generated_id(&value) {
            return Ok(Some(value));
        }
    }
    id_field(raw, "event_id", MAX_EVENT_ID)
}

/// MariaDB's JSON columns refuse documents nested 32 levels deep (MySQL's limit is 100).
const MAX_JSON_DEPTH: usize = 31;

/// Nesting depth of a valid JSON text: brackets outside strings.
fn json_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'{' | b'[') => {
                depth += 1;
                max = max.max(depth);
            }
            (false, _, b'}' | b']') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn optional_object(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, Rejection> {
    match present(raw) {
        None => Ok(None),
        Some(raw) if raw.get().starts_with('{') && json_depth(raw.get()) > MAX_JSON_DEPTH => Err(Rejection::event(
            format!("`{field}` is nested deeper than {MAX_JSON_DEPTH} levels, which MySQL/MariaDB JSON columns refuse"),
        )),
        Some(raw) if raw.get().starts_with('{') => Ok(Some(raw.get().to_string())),
        Some(raw) => Err(Rejection::event(format!("`{field}` must be a JSON object, not {}", abbreviate(raw.get())))),
    }
}

/// An RFC 3339 string or integer milliseconds since the epoch, as microseconds since the epoch.
fn optional_time(raw: Option<&RawValue>, field: &str) -> Result<Option<i64>, Rejection> {
    let Some(raw) = present(raw) else { return Ok(None) };
    let text = raw.get();
    let us = if text.starts_with('"') {
        let s: String = serde_json::from_str(text)
            .map_err(|_| Rejection::event(format!("`{field}` is not a valid JSON string")))?;
        let t = OffsetDateTime::parse(&s, &Rfc3339).map_err(|e| {
            Rejection::event(format!(
                "`{field}` is not an RFC 3339 time like \"2026-11-27T10:00:00.123Z\": {s:?} ({e})"
            ))
        })?;
        i64::try_from(t.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
    } else {
        let ms: i64 = text.parse().map_err(|_| {
            Rejection::event(format!(
                "`{field}` must be an RFC 3339 string or integer milliseconds since the epoch, not {}",
                abbreviate(text)
            ))
        })?;
        ms.saturating_mul(1000)
    };
    if !(0..=MAX_TIME_US).contains(&us) {
        return Err(Rejection::event(format!("`{field}` is outside 1970-01-01 to 9999-12-31: {}", abbreviate(text))));
    }
    Ok(Some(us))
}

/// Refuses a time more than `max_future_secs` after `received_us`: the Redis mirror never moves back in time,
/// so such a `ts` (or a trade's `closed_at`) would hide every correct value that follows it until that time.
fn not_future(us: Option<i64>, field: &str, received_us: i64, max_future_secs: u64) -> Result<Option<i64>, Rejection> {
    let ahead_us = i64::try_from(max_future_secs.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
    match us {
        Some(us) if us > received_us.saturating_add(ahead_us) => Err(Rejection::event(format!(
            "`{field}` {} is more than {max_future_secs} s ([ingest] max_future_secs) ahead of the agent's clock ({})",
            rfc3339_us(us),
            rfc3339_us(received_us)
        ))),
        _ => Ok(us),
    }
}

/// A JSON number or a decimal string that fits DECIMAL(24,8), kept digit for digit.
fn decimal(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, Rejection> {
    let Some(raw) = present(raw) else { return Ok(None) };
    let text = raw.get();
    let digits = if text.starts_with('"') {
        serde_json::from_str::<String>(text)
            .map_err(|_| Rejection::event(format!("`{field}` is not a valid JSON string")))?
    } else {
        text.to_string()
    };
    let unsigned = digits.strip_prefix('-').unwrap_or(&digits);
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let well_formed = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !(unsigned.contains('.') && frac.is_empty());
    if !well_formed {
        return Err(Rejection::event(format!(
            "`{field}` must be a decimal number like \"43000.10\" (no exponent), not {}",
            abbreviate(text)
        )));
    }
    let int_digits = int.trim_start_matches('0').len();
    if int_digits > DECIMAL_INT_DIGITS || frac.len() > DECIMAL_FRAC_DIGITS {
        return Err(Rejection::event(format!(
            "`{field}` {digits} does not fit DECIMAL(24,8): at most {DECIMAL_INT_DIGITS} digits before the point \
             and {DECIMAL_FRAC_DIGITS} after"
        )));
    }
    Ok(Some(digits))
}

fn abbreviate(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// The WAL payload: a format byte, then bincode. A later release adds a version and keeps reading this one.
const EVENT_FORMAT_V1: u8 = 1;

/// `format` then bincode: what the agent stores (events in the WAL, the mirror's table entries).
pub(crate) fn encode_versioned(format: u8, value: &impl Serialize) -> Vec<u8> {
    let mut out = vec![format];
    // Serializing owned strings and numbers into a Vec cannot fail.
    if let Err(e) = bincode::serialize_into(&mut out, value) {
        unreachable!("bincode failed to serialize into memory: {e}");
    }
    out
}

/// Reads what [`encode_versioned`] wrote with `format`; `what` names it in errors.
pub(crate) fn decode_versioned<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    format: u8,
    what: &str,
) -> Result<T, String> {
    match bytes.split_first() {
        Some((&version, body)) if version == format => {
            use bincode::Options;
            bincode::DefaultOptions::new()
                .with_fixint_encoding()
                .with_limit(body.len() as u64)
                .deserialize(body)
                .map_err(|e| format!("undecodable {what}: {e}"))
        }
        Some((version, _)) => Err(format!("unknown {what} format version {version}")),
        None => Err(format!("empty {what}")),
    }
}

impl Event {
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(EVENT_FORMAT_V1, self)
    }

    pub fn decode(payload: &[u8]) -> Result<Event, String> {
        decode_versioned(payload, EVENT_FORMAT_V1, "event")
    }

    pub fn profile_id(&self) -> &str {
        match self {
            Event::Metric(m) => &m.profile_id,
            Event::Trade(t) => &t.profile_id,
        }
    }

    pub fn client_event_id(&self) -> Option<&str> {
        match self {
            Event::Metric(m) => m.event_id.as_deref(),
            Event::Trade(t) => t.event_id.as_deref(),
        }
    }
}

/// The protocol's shape of a metric.
#[derive(Serialize)]
struct MetricLine<'a> {
    kind: &'static str,
    profile_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    name: &'a str,
    value: f64,
    ts: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<&'a RawValue>,
}

impl Event {
    /// One JSON object in the protocol's shape, with `event_id` if given: what a script would send.
    pub fn to_json(&self, event_id: Option<&str>) -> String {
        match self {
            Event::Trade(trade) => trade.to_json(event_id),
            Event::Metric(m) => serde_json::to_string(&MetricLine {
                kind: "metric",
                profile_id: &m.profile_id,
                event_id,
                name: &m.name,
                value: m.value,
                ts: rfc3339_us(m.ts_us),
                // Stored only after it parsed as a JSON object.
                tags: m.tags.as_deref().and_then(|t| serde_json::from_str(t).ok()),
            })
            .unwrap_or_default(),
        }
    }
}

/// The protocol's shape of a trade (decimals as strings, times as RFC 3339 with microseconds), as a script
/// would send it.
#[derive(Serialize)]
struct TradeLine<'a> {
    kind: &'static str,
    profile_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    symbol: &'a str,
    side: &'static str,
    quantity: &'a str,
    price: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pnl: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fees: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    opened_at: Option<String>,
    closed_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a RawValue>,
}

impl Trade {
    /// One JSON object in the protocol's shape, with `event_id` if given.
    pub fn to_json(&self, event_id: Option<&str>) -> String {
        let line = TradeLine {
            kind: "trade",
            profile_id: &self.profile_id,
            event_id,
            symbol: &self.symbol,
            side: match self.side {
                Side::Buy => "buy",
                Side::Sell => "sell",
            },
            quantity: &self.quantity,
            price: &self.price,
            pnl: self.pnl.as_deref(),
            fees: self.fees.as_deref(),
            opened_at: self.opened_at_us.map(rfc3339_us),
            closed_at: rfc3339_us(self.closed_at_us),
            // Stored only after it parsed as a JSON object.
            meta: self.meta.as_deref().and_then(|m| serde_json::from_str(m).ok()),
        };
        serde_json::to_string(&line).unwrap_or_default()
    }
}

/// `2026-11-27T10:00:00.123456Z`: always six fractional digits, so that such strings sort as times do.
pub fn rfc3339_us(us: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reject(line: &str) -> Rejection {
        parse_line(line.as_bytes(), 0, u64::MAX).unwrap_err()
    }

    #[test]
    fn a_metric_round_trips_through_the_wal_encoding() {
        let line = r#"{"kind":"metric","profile_id":"p-001","name":"equity","value":10234.5,
            "ts":"2026-11-27T10:00:00.123456Z","tags":{"script":"risk"},"event_id":"e-1"}"#
            .replace('\n', "");
        let event = parse_line(line.as_bytes(), 5, u64::MAX).unwrap();
        let Event::Metric(m) = &event else { panic!("not a metric") };
        assert_eq!(m.ts_us, 1_795_773_600_123_456);
        assert_eq!(m.tags.as_deref(), Some(r#"{"script":"risk"}"#));
        assert_eq!(Event::decode(&event.encode()).unwrap(), event);
    }

    #[test]
    fn a_trade_renders_in_the_protocol_shape_and_parses_back() {
        let line = r#"{"kind":"trade","profile_id":"p","symbol":"BTC/USDT","side":"sell","quantity":"0.5",
            "price":43000.1,"fees":"0.01","opened_at":1795860000000,"closed_at":"2026-11-28T10:00:00.000001Z",
            "meta":{"why":["tp"]}}"#
            .replace('\n', "");
        let Event::Trade(trade) = parse_line(line.as_bytes(), 0, u64::MAX).unwrap() else { panic!("not a trade") };
        let json = trade.to_json(Some("e-9"));
        assert!(json.contains(r#""closed_at":"2026-11-28T10:00:00.000001Z""#), "{json}");
        assert!(json.contains(r#""opened_at":"2026-11-28T10:00:00.000000Z""#), "{json}");
        assert!(json.contains(r#""meta":{"why":["tp"]}"#) && !json.contains("pnl"), "{json}");
        let Event::Trade(back) = parse_line(json.as_bytes(), 0, u64::MAX).unwrap() else { panic!("not a trade") };
        assert_eq!(back, Trade { event_id: Some("e-9".into()), ..trade });
    }

    #[test]
    fn a_metric_renders_in_the_protocol_shape_and_parses_back() {
        let line =
            r#"{"kind":"metric","profile_id":"p","name":"equity","value":-0.125,"ts":1795860000123,"tags":{"a":1}}"#;
        let event = parse_line(line.as_bytes(), 0, u64::MAX).unwrap();
        let json = event.to_json(Some("x-1"));
        assert!(json.contains(r#""ts":"2026-11-28T10:00:00.123000Z""#), "{json}");
        let Event::Metric(back) = parse_line(json.as_bytes(), 7, u64::MAX).unwrap() else { panic!("not a metric") };
        let Event::Metric(m) = event else { panic!("not a metric") };
        assert_eq!(back, Metric { event_id: Some("x-1".into()), received_us: 7, ..m });
    }

    #[test]
    fn a_value_keeps_its_exact_double_through_a_dump_and_resend() {
        // Found by the protocol_line fuzz target: without serde_json's float_roundtrip, this literal and
        // the shortest rendering of what it parsed to parse to different doubles.
        let digits = format!("{}10234.05", "9".repeat(120));
        let line = format!(r#"{{"kind":"metric","profile_id":"p","name":"n","value":{digits}}}"#);
        let event = parse_line(line.as_bytes(), 0, u64::MAX).unwrap();
        let again = parse_line(event.to_json(None).as_bytes(), 0, u64::MAX).unwrap();
        assert_eq!(again, event);
    }

    #[test]
    fn json_nesting_is_bounded() {
        assert_eq!(json_depth(r#"{"a":{"b":[1,"]]]{{"]}}"#), 3);
        let deep = |n: usize| format!("{}1{}", r#"{"a":"#.repeat(n), "}".repeat(n));
        let line =
            |n: usize| format!(r#"{{"kind":"metric","profile_id":"p","name":"n","value":1,"tags":{}}}"#, deep(n));
        assert!(parse_line(line(MAX_JSON_DEPTH).as_bytes(), 0, u64::MAX).is_ok());
        let r = parse_line(line(MAX_JSON_DEPTH + 1).as_bytes(), 0, u64::MAX).unwrap_err();
        assert!(r.error.contains("`tags` is nested deeper"), "{}", r.error);
    }

    #[test]
    fn a_time_beyond_the_future_limit_is_refused_and_the_limit_itself_is_taken() {
        let now = 1_795_000_000_000_000;
        let metric = |ts_ms: i64| format!(r#"{{"kind":"metric","profile_id":"p","name":"n","value":1,"ts":{ts_ms}}}"#);
        let at_limit = now / 1000 + 86_400_000;
        assert!(parse_line(metric(at_limit).as_bytes(), now, 86_400).is_ok());
        let r = parse_line(metric(at_limit + 1).as_bytes(), now, 86_400).unwrap_err();
        assert_eq!(r.code, "invalid_event");
        assert!(r.error.contains("`ts`") && r.error.contains("86400 s ([ingest] max_future_secs)"), "{}", r.error);
        let trade = format!(
            r#"{{"kind":"trade","profile_id":"p","symbol":"X","side":"buy","quantity":1,"price":1,"closed_at":{}}}"#,
            at_limit + 1
        );
        assert!(parse_line(trade.as_bytes(), now, 86_400).unwrap_err().error.contains("`closed_at`"));
        // Year 9999 with no limit to speak of: the arithmetic saturates.
        assert!(parse_line(metric(253_402_300_799_999).as_bytes(), now, u64::MAX).is_ok());
    }

    #[test]
    fn decimals_keep_their_digits() {
        let line = r#"{"kind":"trade","profile_id":"p","symbol":"BTCUSDT","side":"buy","quantity":0.10000001,
            "price":"43000.10","pnl":-12.5,"fees":"0.00000001","closed_at":1795860000123}"#
            .replace('\n', "");
        let Event::Trade(t) = parse_line(line.as_bytes(), 0, u64::MAX).unwrap() else { panic!("not a trade") };
        assert_eq!((t.quantity.as_str(), t.price.as_str()), ("0.10000001", "43000.10"));
        assert_eq!((t.pnl.as_deref(), t.fees.as_deref()), (Some("-12.5"), Some("0.00000001")));
        assert_eq!(t.closed_at_us, 1_795_860_000_123_000);
    }

    #[test]
    fn every_bad_field_is_named() {
        let trade = r#""kind":"trade","profile_id":"p","symbol":"X","side":"buy""#;
        for (line, code, needle) in [
            ("{", "invalid_json", "EOF"),
            ("", "invalid_json", "empty line"),
            ("[1]", "invalid_event", "must be a JSON object"),
            ("[1", "invalid_json", "EOF"),
            ("\u{ff}{}", "invalid_json", "expected value"),
            (r#"{"kind":"metric","profile_id":"p","name":"n","value":1,"x":1}"#, "invalid_event", "unknown field `x`"),
            (r#"{"kind":"metrik"}"#, "invalid_event", "`kind`"),
            (r#"{"kind":"metric","name":"n","value":1}"#, "invalid_event", "`profile_id` is required"),
            (r#"{"kind":"metric","profile_id":"p q","name":"n","value":1}"#, "invalid_event", "`profile_id` contains"),
            (r#"{"kind":"metric","profile_id":"p","name":"n","value":"1"}"#, "invalid_event", "`value` must be"),
            (r#"{"kind":"metric","profile_id":"p","name":"n","value":1e999}"#, "invalid_event", "`value`"),
            (r#"{"kind":"metric","profile_id":"p","name":"n","value":1,"ts":"yesterday"}"#, "invalid_event", "`ts`"),
            (r#"{"kind":"metric","profile_id":"p","name":"n","value":1,"tags":[1]}"#, "invalid_event", "`tags`"),
            (
                r#"{"kind":"metric","profile_id":"p","name":"n","value":1,"price":1}"#,
                "invalid_event",
                "`price` does not",
            ),
            (r#"{"kind":"metric","profile_id":"p","name":"n","value":1,"event_id":""}"#, "invalid_event", "`event_id`"),
        ] {
            let r = reject(line);
            assert_eq!(r.code, code, "{line}: {}", r.error);
            assert!(r.error.contains(needle), "{line}: {}", r.error);
        }
        for (rest, needle) in [
            (r#","quantity":"1e5","price":1"#, "`quantity` must be a decimal"),
            (r#","quantity":"12345678901234567","price":1"#, "`quantity` 12345678901234567 does not fit"),
            (r#","quantity":"1.123456789","price":1"#, "does not fit DECIMAL(24,8)"),
            (r#","quantity":1"#, "`price` is required"),
            (r#","quantity":1,"price":1,"closed_at":-5"#, "`closed_at` is outside"),
        ] {
            let r = reject(&format!("{{{trade}{rest}}}"));
            assert!(r.error.contains(needle), "{rest}: {}", r.error);
        }
    }
}
