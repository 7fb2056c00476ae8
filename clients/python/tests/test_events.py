"""Validation in the caller: the agent's rules (agent/src/event.rs), each bad field named; and the agent itself
refuses the same lines (so the two sets of rules agree) and takes the widest valid ones."""

from __future__ import annotations

import json
import re
import socket
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from conftest import wait_until
from telemetry_agent import Client
from telemetry_agent.events import EventIds, metric_line, rfc3339_us, trade_line

NOW_US = 1_795_773_600_123_456


def metric(**fields):
    args = dict(profile_id="p-1", name="equity", value=1.5, ts=None, tags=None)
    args.update(fields)
    return metric_line(
        args["profile_id"], args["name"], args["value"], args["ts"], args["tags"], "e-1", NOW_US, 65536, 86400
    )


def trade(**fields):
    args = dict(
        profile_id="p-1",
        symbol="BTCUSDT",
        side="buy",
        quantity="0.5",
        price="43000.10",
        pnl=None,
        fees=None,
        opened_at=None,
        closed_at=None,
        meta=None,
    )
    args.update(fields)
    return trade_line(*args.values(), "e-1", NOW_US, 65536, 86400)


def nested(depth: int) -> dict:
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value  # type: ignore[return-value]


UTC = timezone.utc

BAD_METRICS = [
    (dict(profile_id=""), ValueError, "`profile_id` must be 1 to 64"),
    (dict(profile_id="p" * 65), ValueError, "`profile_id` must be 1 to 64"),
    (dict(profile_id="p q"), ValueError, "`profile_id` contains ' '"),
    (dict(profile_id="~run-1"), ValueError, "`profile_id` contains '~'"),
    (dict(profile_id=7), TypeError, "`profile_id` must be a str"),
    (dict(profile_id=["unhashable"]), TypeError, "`profile_id` must be a str"),
    (dict(name=""), ValueError, "`name` must be 1 to 128"),
    (dict(name="n" * 129), ValueError, "`name` must be 1 to 128"),
    (dict(name="a\nb"), ValueError, "`name` must not contain control"),
    (dict(name="a\x85b"), ValueError, "`name` must not contain control"),
    (dict(name="a\ud800"), ValueError, "`name` is not valid Unicode"),
    (dict(name=None), TypeError, "`name` must be a str"),
    (dict(value=float("nan")), ValueError, "`value` must be a finite"),
    (dict(value=float("inf")), ValueError, "`value` must be a finite"),
    (dict(value=10**400), ValueError, "`value` must be a finite"),
    (dict(value=Decimal("1e999")), ValueError, "`value` must be a finite"),
    (dict(value="1"), TypeError, "`value` must be an int, float or Decimal"),
    (dict(value=True), TypeError, "`value` must be an int, float or Decimal"),
    (dict(ts=datetime(2026, 1, 1)), ValueError, "`ts` is a naive datetime"),
    (dict(ts=datetime(1969, 12, 31, 23, 59, tzinfo=UTC)), ValueError, "`ts` is outside 1970-01-01"),
    (dict(ts=-1), ValueError, "`ts` is outside"),
    (dict(ts=253_402_300_800_000), ValueError, "`ts` is outside"),
    (dict(ts=NOW_US // 1000 + 86_400_001), ValueError, "`ts` 1795860000124 is more than 86400 s ahead"),
    (dict(ts=1.5), TypeError, "`ts` must be an aware datetime or int epoch milliseconds"),
    (dict(ts="2026-01-01T00:00:00Z"), TypeError, "`ts` must be an aware datetime"),
    (dict(tags=[1]), TypeError, "`tags` must be a dict"),
    (dict(tags={"a": float("nan")}), ValueError, "`tags` cannot be JSON"),
    (dict(tags={"a": object()}), TypeError, "`tags` cannot be JSON"),
    (dict(tags={"a\ud800": 1}), ValueError, "`tags` holds text that is not valid Unicode"),
    (dict(tags=nested(32)), ValueError, "`tags` is nested deeper than 31"),
    (dict(tags={"big": "x" * 70000}), ValueError, "over max_line_bytes (65536)"),
]

BAD_TRADES = [
    (dict(symbol=""), ValueError, "`symbol` must be 1 to 32"),
    (dict(symbol="S" * 33), ValueError, "`symbol` must be 1 to 32"),
    (dict(symbol="BTC USDT"), ValueError, "`symbol` contains ' '"),
    (dict(symbol=None), TypeError, "`symbol` must be a str"),
    (dict(side="long"), ValueError, '`side` must be "buy" or "sell"'),
    (dict(side=1), TypeError, "`side` must be a str"),
    (dict(quantity="1e5"), ValueError, "`quantity` must be a decimal number"),
    (dict(quantity="+1"), ValueError, "`quantity` must be a decimal number"),
    (dict(quantity=".5"), ValueError, "`quantity` must be a decimal number"),
    (dict(quantity="1."), ValueError, "`quantity` must be a decimal number"),
    (dict(quantity=" 1"), ValueError, "`quantity` must be a decimal number"),
    (dict(quantity="١"), ValueError, "`quantity` must be a decimal number"),
    (dict(quantity="12345678901234567"), ValueError, "`quantity` 12345678901234567 does not fit DECIMAL(24,8)"),
    (dict(price="1.123456789"), ValueError, "`price` 1.123456789 does not fit DECIMAL(24,8)"),
    (dict(price=Decimal("NaN")), ValueError, "`price` must be a finite decimal"),
    (dict(price=float("inf")), ValueError, "`price` must be a finite decimal"),
    (dict(price=None), TypeError, "`price` must be a Decimal, str, int or float"),
    (dict(pnl=True), TypeError, "`pnl` must be a Decimal, str, int or float, not bool"),
    (dict(fees=1e-9), ValueError, "`fees` 0.000000001 does not fit"),
    (dict(fees=Decimal("1E+16")), ValueError, "`fees` 10000000000000000 does not fit"),
    (dict(opened_at=datetime(2026, 1, 1)), ValueError, "`opened_at` is a naive datetime"),
    (dict(closed_at=-5), ValueError, "`closed_at` is outside"),
    (dict(closed_at=NOW_US // 1000 + 86_400_001), ValueError, "`closed_at` 1795860000124 is more than 86400 s"),
    (dict(meta="{}"), TypeError, "`meta` must be a dict"),
    (dict(meta=nested(32)), ValueError, "`meta` is nested deeper than 31"),
    (dict(profile_id="a/b"), ValueError, "`profile_id` contains '/'"),
]


@pytest.mark.parametrize("fields,error,needle", BAD_METRICS)
def test_a_bad_metric_field_is_named(fields, error, needle):
    with pytest.raises(error) as raised:
        metric(**fields)
    assert needle in str(raised.value)


@pytest.mark.parametrize("fields,error,needle", BAD_TRADES)
def test_a_bad_trade_field_is_named(fields, error, needle):
    with pytest.raises(error) as raised:
        trade(**fields)
    assert needle in str(raised.value)


def test_lines_have_the_protocol_shape():
    line = metric(ts=datetime(2026, 11, 27, 11, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1))), tags={"s": "é"})
    assert (
        line
        == (
            '{"kind":"metric","profile_id":"p-1","name":"equity","value":1.5,"ts":"2026-11-27T10:00:00.123456Z",'
            '"event_id":"e-1","tags":{"s":"é"}}\n'
        ).encode()
    )
    assert json.loads(metric(value=10**20))["value"] == 10**20
    assert json.loads(metric(ts=None))["ts"] == "2026-11-27T10:00:00.123456Z"  # the call time
    assert json.loads(metric(ts=1795773600123))["ts"] == 1795773600123
    assert json.loads(metric(name='q"\\é'))["name"] == 'q"\\é'
    event = json.loads(trade(side="SELL", quantity=0.1, price=Decimal("1E+2"), pnl=-3, fees=1e-8, meta={"k": [1]}))
    assert event == {
        "kind": "trade",
        "profile_id": "p-1",
        "symbol": "BTCUSDT",
        "side": "sell",
        "quantity": "0.1",
        "price": "100",
        "pnl": "-3",
        "fees": "0.00000001",
        "closed_at": "2026-11-27T10:00:00.123456Z",
        "event_id": "e-1",
        "meta": {"k": [1]},
    }
    # Digits are kept as given: trailing zeros too.
    assert json.loads(trade(price=Decimal("43000.10000000")))["price"] == "43000.10000000"
    assert json.loads(trade(quantity="-0000000000000000001.5"))["quantity"] == "-0000000000000000001.5"
    # The limits themselves are taken.
    trade(symbol="S" * 32, quantity="9999999999999999.99999999")
    metric(profile_id="p" * 64, name="n" * 128, tags=nested(31))


def test_times_render_like_the_agent():
    assert rfc3339_us(0) == "1970-01-01T00:00:00.000000Z"
    assert rfc3339_us(253_402_300_799_999_999) == "9999-12-31T23:59:59.999999Z"
    assert rfc3339_us(NOW_US) == "2026-11-27T10:00:00.123456Z"


def test_event_ids_are_time_ordered_in_the_client_alphabet_and_unique_per_instance():
    ids = EventIds()
    first, second = ids.next(NOW_US), ids.next(NOW_US + 1000)
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]{16}-[0-9a-f]+", first) and len(first) <= 64
    assert first < second and first.split("-")[1] == second.split("-")[1]
    assert EventIds().instance != ids.instance


def test_a_user_event_id_must_be_in_the_client_alphabet(tmp_path):
    client = Client(str(tmp_path / "none.sock"), str(tmp_path))
    try:
        for bad in ("~abc-1", "", "x" * 65, "a b"):
            with pytest.raises(ValueError, match="`event_id`"):
                client.metric("p", "n", 1, event_id=bad)
        assert client.stats()["enqueued"] == 0
    finally:
        client.close(0.1)


def _agent_answers(agent, lines):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(agent.socket)
    sock.sendall(b"".join(lines))
    data = b""
    while data.count(b"\n") < len(lines):
        chunk = sock.recv(65536)
        assert chunk, "the agent closed the connection"
        data += chunk
    sock.close()
    return [json.loads(answer) for answer in data.splitlines()]


def test_the_agent_agrees_with_the_client_rules(agent_factory, db):
    """The widest valid values pass the client and the agent (and reach MySQL exactly); lines just past each
    limit, which the client refuses, the agent refuses too."""
    from conftest import agent_sections

    agent = agent_factory(agent_sections(db)).start()
    far = datetime(2026, 11, 27, tzinfo=timezone.utc)
    valid = [
        trade(
            profile_id="p" * 64,
            symbol="S/_.:-" + "s" * 26,
            quantity="9999999999999999.99999999",
            price="-9999999999999999.99999999",
            pnl="0.00000001",
            fees="-0.00000001",
            opened_at=0,
            closed_at=far,
            meta=nested(31),
        ).replace(b'"e-1"', b'"v-1"'),
        metric(name="é" * 128, value=-1.7976931348623157e308, tags=nested(31)).replace(b'"e-1"', b'"v-2"'),
    ]
    assert [a["ok"] for a in _agent_answers(agent, valid)] == [True, True]
    # The client refuses each of these; raw, the agent does too.
    raw_invalid = [
        b'{"kind":"metric","profile_id":"' + b"p" * 65 + b'","name":"n","value":1}\n',
        b'{"kind":"metric","profile_id":"p","name":"' + b"n" * 129 + b'","value":1}\n',
        b'{"kind":"trade","profile_id":"p","symbol":"' + b"S" * 33 + b'","side":"buy","quantity":1,"price":1}\n',
        b'{"kind":"trade","profile_id":"p","symbol":"S","side":"buy","quantity":"1.123456789","price":1}\n',
        b'{"kind":"trade","profile_id":"p","symbol":"S","side":"buy","quantity":"12345678901234567","price":1}\n',
        b'{"kind":"metric","profile_id":"p","name":"n","value":1,"tags":' + json.dumps(nested(32)).encode() + b"}\n",
        b'{"kind":"metric","profile_id":"p","name":"n","value":1,"ts":-1}\n',
        b'{"kind":"metric","profile_id":"p","name":"n","value":1,"event_id":"~abc-1"}\n',
    ]
    answers = _agent_answers(agent, raw_invalid)
    assert [a.get("code") for a in answers] == ["invalid_event"] * len(raw_invalid), answers
    wait_until("both rows in MySQL", 30, lambda: db.count("dd_trade_performance") == 1 and db.count("dd_metrics") == 1)
    row = db.execute("SELECT quantity, price, pnl, fees, opened_at FROM dd_trade_performance")[0]
    assert row == (
        Decimal("9999999999999999.99999999"),
        Decimal("-9999999999999999.99999999"),
        Decimal("0.00000001"),
        Decimal("-0.00000001"),
        datetime(1970, 1, 1),
    )
    assert db.execute("SELECT name, value FROM dd_metrics")[0] == ("é" * 128, -1.7976931348623157e308)
