"""Validating an event and building its protocol line: the agent's rules (agent/src/event.rs), applied in the
caller so that a bad field raises at once, naming the field, instead of failing later in the background."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Mapping, Optional, Union

Number = Union[int, float, Decimal]
DecimalInput = Union[Decimal, str, int, float]
TimeInput = Union[datetime, int]

MAX_PROFILE_ID = 64
MAX_EVENT_ID = 64
MAX_NAME = 128
MAX_SYMBOL = 32
DECIMAL_INT_DIGITS = 16
DECIMAL_FRAC_DIGITS = 8
# MariaDB's JSON columns refuse documents nested 32 levels deep.
MAX_JSON_DEPTH = 31
# DATETIME(6) holds years up to 9999; the agent refuses times before 1970.
MAX_TIME_MS = 253_402_300_799_999
DEFAULT_MAX_LINE_BYTES = 65536
DEFAULT_MAX_FUTURE_SECS = 86400

_ID = re.compile(r"[A-Za-z0-9_.:\-]+\Z")
_SYMBOL = re.compile(r"[A-Za-z0-9_.:/\-]+\Z")
# Rust's char::is_control: the Unicode category Cc.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_DECIMAL = re.compile(r"-?([0-9]+)(?:\.([0-9]+))?\Z")
_ESCAPE_FREE = re.compile(r'[^"\\\x00-\x1f\x7f-\x9f\ud800-\udfff]*\Z')

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _check_id(value: object, field: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"`{field}` must be a str, not {type(value).__name__}")
    if not 0 < len(value) <= max_len:
        raise ValueError(f"`{field}` must be 1 to {max_len} characters, got {len(value)}")
    if not _ID.match(value):
        bad = next(c for c in value if not _ID.match(c))
        raise ValueError(f"`{field}` contains {bad!r}; allowed are A-Z a-z 0-9 _ . : -")
    return value


def check_event_id(value: object) -> str:
    """A user-supplied id: the client alphabet only (never the agent's `~` ids)."""
    return _check_id(value, "event_id", MAX_EVENT_ID)


# Names and profile ids repeat: remember the checked ones (bounded; cleared when full).
_checked_profiles: dict[str, bool] = {}
_encoded_names: dict[str, str] = {}
_CACHE_MAX = 4096


def _profile_id(value: object) -> str:
    if type(value) is str and value in _checked_profiles:
        return value
    checked = _check_id(value, "profile_id", MAX_PROFILE_ID)
    if len(_checked_profiles) >= _CACHE_MAX:
        _checked_profiles.clear()
    _checked_profiles[checked] = True
    return checked


def _json_text(value: str, field: str) -> str:
    """A JSON string literal of `value`; refuses what UTF-8 cannot carry (lone surrogates)."""
    if _ESCAPE_FREE.match(value):
        return f'"{value}"'
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"`{field}` is not valid Unicode text (a lone surrogate)") from None
    return json.dumps(value, ensure_ascii=False)


def _name(value: object) -> str:
    if type(value) is str:
        encoded = _encoded_names.get(value)
        if encoded is not None:
            return encoded
    if not isinstance(value, str):
        raise TypeError(f"`name` must be a str, not {type(value).__name__}")
    if not 0 < len(value) <= MAX_NAME:
        raise ValueError(f"`name` must be 1 to {MAX_NAME} characters, got {len(value)}")
    if _CONTROL.search(value):
        raise ValueError("`name` must not contain control characters")
    encoded = _json_text(value, "name")
    if len(_encoded_names) >= _CACHE_MAX:
        _encoded_names.clear()
    _encoded_names[value] = encoded
    return encoded


def _value(value: object) -> str:
    """A metric value as a JSON number (the agent stores a double)."""
    kind = type(value)
    if kind is float:
        if math.isfinite(value):  # type: ignore[arg-type]
            return repr(value)
    elif kind is int:
        try:
            float(value)  # type: ignore[arg-type]
        except OverflowError:
            raise ValueError(f"`value` must be a finite number; {value} is beyond a double") from None
        return str(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise TypeError(f"`value` must be an int, float or Decimal, not {kind.__name__}")
    else:
        # Subclasses of int/float, and Decimal: the metric column is a double anyway.
        try:
            as_float = float(value)
        except OverflowError:
            as_float = math.inf
        if math.isfinite(as_float):
            return repr(as_float)
    raise ValueError(f"`value` must be a finite number, not {value!r}")


def _decimal(value: object, field: str) -> str:
    """A decimal as a JSON string that keeps the caller's digits; must fit DECIMAL(24,8)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"`{field}` must be a finite decimal, not {value}")
        text = format(value, "f")
    elif isinstance(value, bool):
        raise TypeError(f"`{field}` must be a Decimal, str, int or float, not bool")
    elif isinstance(value, int):
        text = str(int(value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"`{field}` must be a finite decimal, not {value}")
        # The shortest repr is the number the caller wrote; spelled out without an exponent.
        text = format(Decimal(repr(value)), "f")
    else:
        raise TypeError(f"`{field}` must be a Decimal, str, int or float, not {type(value).__name__}")
    match = _DECIMAL.match(text)
    if match is None:
        raise ValueError(f'`{field}` must be a decimal number like "43000.10" (no exponent), not {text[:40]!r}')
    int_digits, frac_digits = match.group(1), match.group(2) or ""
    if len(int_digits.lstrip("0")) > DECIMAL_INT_DIGITS or len(frac_digits) > DECIMAL_FRAC_DIGITS:
        raise ValueError(
            f"`{field}` {text} does not fit DECIMAL(24,8): at most {DECIMAL_INT_DIGITS} digits before the point "
            f"and {DECIMAL_FRAC_DIGITS} after"
        )
    return f'"{text}"'


class _UtcSeconds(threading.local):
    """The `YYYY-MM-DDTHH:MM:SS` of the last second formatted by this thread."""

    second = -1
    prefix = ""


_utc_seconds = _UtcSeconds()


def rfc3339_us(unix_us: int) -> str:
    """`2026-11-27T10:00:00.123456Z`: UTC, always six fractional digits (as the agent renders times)."""
    second, micro = divmod(unix_us, 1_000_000)
    cache = _utc_seconds
    if cache.second != second:
        cache.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        cache.second = second
    return f"{cache.prefix}.{micro:06d}Z"


def _time(value: object, field: str, now_us: int, max_future_secs: Optional[int]) -> str:
    """A time as a JSON value: RFC 3339 (UTC, microseconds) for a datetime, the integer for epoch ms."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"`{field}` is a naive datetime; pass an aware one (datetime.now(timezone.utc)) or epoch milliseconds"
            )
        delta = value - _EPOCH
        unix_us = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
        text = f'"{rfc3339_us(unix_us)}"' if unix_us >= 0 else ""
    elif isinstance(value, int) and not isinstance(value, bool):
        unix_us = value * 1000
        text = str(int(value))
    else:
        raise TypeError(f"`{field}` must be an aware datetime or int epoch milliseconds, not {type(value).__name__}")
    if not 0 <= unix_us <= MAX_TIME_MS * 1000 + 999:
        raise ValueError(f"`{field}` is outside 1970-01-01 to 9999-12-31: {value!r}")
    if max_future_secs is not None and unix_us > now_us + max_future_secs * 1_000_000:
        raise ValueError(f"`{field}` {value!r} is more than {max_future_secs} s ahead of this host's clock")
    return text


def _json_depth(text: str) -> int:
    """Nesting depth of a JSON text: brackets outside strings (as the agent counts)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "}]":
            depth -= 1
    return deepest


def _object(value: object, field: str) -> str:
    """A JSON object (tags, meta) as compact JSON text."""
    if not isinstance(value, Mapping):
        raise TypeError(f"`{field}` must be a dict (a JSON object), not {type(value).__name__}")
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")
    except RecursionError:
        raise ValueError(f"`{field}` is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except UnicodeEncodeError:
        raise ValueError(f"`{field}` holds text that is not valid Unicode (a lone surrogate)") from None
    except ValueError as e:
        raise ValueError(f"`{field}` cannot be JSON: {e}") from None
    except TypeError as e:
        raise TypeError(f"`{field}` cannot be JSON: {e}") from None
    # Counting brackets is cheap; only a text with many of them needs the exact scan.
    if text.count("{") + text.count("[") > MAX_JSON_DEPTH and _json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"`{field}` is nested deeper than {MAX_JSON_DEPTH} levels, which MariaDB JSON columns refuse")
    return text


class EventIds:
    """Client event ids: `{unix_ms:012x}-{instance:016x}-{counter:x}`, time-ordered (a UNIQUE index likes
    that), in the client alphabet (disjoint from the agent's `~` ids), unique per instance."""

    __slots__ = ("instance", "_counter", "_prefix")

    def __init__(self) -> None:
        self.instance = int.from_bytes(os.urandom(8), "big")
        # next() on itertools.count is atomic under the GIL: no lock needed for unique numbers.
        self._counter = itertools.count(1)
        self._prefix = f"-{self.instance:016x}-"

    def next(self, unix_us: int) -> str:
        return f"{unix_us // 1000:012x}{self._prefix}{next(self._counter):x}"


def metric_line(
    profile_id: object,
    name: object,
    value: object,
    ts: object,
    tags: object,
    event_id: str,
    now_us: int,
    max_line_bytes: int,
    max_future_secs: Optional[int],
) -> bytes:
    """The protocol line (with its newline) of a metric, or ValueError/TypeError naming the field."""
    text = _value(value)
    ts_text = f'"{rfc3339_us(now_us)}"' if ts is None else _time(ts, "ts", now_us, max_future_secs)
    line = (
        f'{{"kind":"metric","profile_id":"{_profile_id(profile_id)}","name":{_name(name)},"value":{text},'
        f'"ts":{ts_text},"event_id":"{event_id}"'
    )
    if tags is not None:
        line = f'{line},"tags":{_object(tags, "tags")}'
    return _finish(line, max_line_bytes)


_SIDES = {"buy": "buy", "sell": "sell"}


def trade_line(
    profile_id: object,
    symbol: object,
    side: object,
    quantity: object,
    price: object,
    pnl: object,
    fees: object,
    opened_at: object,
    closed_at: object,
    meta: object,
    event_id: str,
    now_us: int,
    max_line_bytes: int,
    max_future_secs: Optional[int],
) -> bytes:
    """The protocol line (with its newline) of a trade, or ValueError/TypeError naming the field."""
    profile = _profile_id(profile_id)
    if not isinstance(symbol, str):
        raise TypeError(f"`symbol` must be a str, not {type(symbol).__name__}")
    if not 0 < len(symbol) <= MAX_SYMBOL:
        raise ValueError(f"`symbol` must be 1 to {MAX_SYMBOL} characters, got {len(symbol)}")
    if not _SYMBOL.match(symbol):
        bad = next(c for c in symbol if not _SYMBOL.match(c))
        raise ValueError(f"`symbol` contains {bad!r}; allowed are A-Z a-z 0-9 _ . : - /")
    if not isinstance(side, str):
        raise TypeError(f"`side` must be a str, not {type(side).__name__}")
    side_text = _SIDES.get(side.lower())
    if side_text is None:
        raise ValueError(f'`side` must be "buy" or "sell", not {side[:40]!r}')
    parts = [
        f'{{"kind":"trade","profile_id":"{profile}","symbol":"{symbol}","side":"{side_text}",'
        f'"quantity":{_decimal(quantity, "quantity")},"price":{_decimal(price, "price")}'
    ]
    if pnl is not None:
        parts.append(f',"pnl":{_decimal(pnl, "pnl")}')
    if fees is not None:
        parts.append(f',"fees":{_decimal(fees, "fees")}')
    if opened_at is not None:
        parts.append(f',"opened_at":{_time(opened_at, "opened_at", now_us, None)}')
    closed = f'"{rfc3339_us(now_us)}"' if closed_at is None else _time(closed_at, "closed_at", now_us, max_future_secs)
    parts.append(f',"closed_at":{closed},"event_id":"{event_id}"')
    if meta is not None:
        parts.append(f',"meta":{_object(meta, "meta")}')
    return _finish("".join(parts), max_line_bytes)


def _finish(line: str, max_line_bytes: int) -> bytes:
    encoded = f"{line}}}\n".encode()
    if len(encoded) - 1 > max_line_bytes:
        raise ValueError(f"the event is {len(encoded) - 1} bytes as JSON, over max_line_bytes ({max_line_bytes})")
    return encoded
