"""The client against the real agent, MariaDB and Redis: acks, threads, asyncio, fork, exit, full queues."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from conftest import (
    agent_sections,
    assert_in_mysql_exactly_once,
    load_records,
    run_script,
    sent_event,
    spool_files,
    wait_until,
)
from telemetry_agent import AsyncClient, Client, ClientClosed, Dropped, QueueFull, Refused, WaitTimeout


def test_an_ack_means_mysql_and_redis_have_it(agent_factory, db, redis_prefix, spool_dir):
    redis, prefix = redis_prefix
    agent = agent_factory(agent_sections(db, spool_dir, prefix)).start()
    with Client(agent.socket, str(spool_dir)) as client:
        ts = datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=timezone.utc)
        metric = client.metric("p-001", "equity", 10234.5, ts=ts, tags={"script": "risk"})
        trade = client.trade("p-001", "BTCUSDT", "buy", Decimal("0.5"), "43000.10", pnl="12.5", fees=0.02)
        ack = metric.wait(10)
        assert ack.status == "acked" and ack.seq > 0 and ack.event_id == metric.event_id
        assert trade.wait(10).status == "acked"
        stats = client.stats()
        assert (stats["acked"], stats["sent"], stats["queued"], stats["spooled"]) == (2, 2, 0, 0)
        assert stats["ack_rtt_p50_ms"] is not None and stats["ack_rtt_p99_ms"] >= stats["ack_rtt_p50_ms"]
    assert_in_mysql_exactly_once(db, [sent_event(metric.line), sent_event(trade.line)])
    wait_until("Redis has the metric", 20, lambda: redis.hget(f"{prefix}:p-001:metrics", "equity") == b"10234.5")
    assert redis.hget(f"{prefix}:p-001:metrics_ts", "equity") == b"1795773600123"
    last_trade = json.loads(redis.get(f"{prefix}:p-001:last_trade"))
    assert (last_trade["event_id"], last_trade["price"], last_trade["fees"]) == (trade.event_id, "43000.10", "0.02")
    with pytest.raises(ClientClosed):
        client.metric("p-001", "equity", 1)


def test_decimals_keep_their_digits_into_mysql(agent_factory, db, spool_dir):
    """The widest DECIMAL(24,8) values, from Decimal, str, int and float, arrive exactly."""
    agent = agent_factory(agent_sections(db)).start()
    values = [
        Decimal("9999999999999999.99999999"),
        "-9999999999999999.99999999",
        Decimal("0.00000001"),
        Decimal("-1234567890123456.12345678"),
        "0000000000000000012.30000000",
        10**16 - 1,
        0.1,
        1e15 + 0.125,
        Decimal("1E+15"),
    ]
    with Client(agent.socket, str(spool_dir)) as client:
        pendings = [client.trade("p-dec", "XBT", "sell", v, v, pnl=v, fees=v) for v in values]
        client.flush(10)
    assert all(p.result().status == "acked" for p in pendings)
    assert_in_mysql_exactly_once(db, [sent_event(p.line) for p in pendings])
    rows = dict(db.execute("SELECT event_id, quantity FROM dd_trade_performance"))
    expected = [
        "9999999999999999.99999999",
        "-9999999999999999.99999999",
        "0.00000001",
        "-1234567890123456.12345678",
        "12.30000000",
        "9999999999999999.00000000",
        "0.10000000",
        "1000000000000000.10000000",  # a float is taken as Python prints it: 1000000000000000.1
        "1000000000000000.00000000",
    ]
    assert [format(rows[p.event_id], "f") for p in pendings] == expected


def test_refused_events_fail_their_pending_with_the_agents_code(agent_factory, spool_dir):
    agent = agent_factory(ingest="max_future_secs = 60\n").start()
    with Client(agent.socket, str(spool_dir), max_future_secs=None) as client:
        future = client.metric("p", "n", 1, ts=int(time.time() * 1000) + 3_600_000)
        fine = client.metric("p", "n", 2)
        with pytest.raises(Refused) as refused:
            future.wait(10)
        assert refused.value.code == "invalid_event" and "max_future_secs" in refused.value.error
        assert fine.wait(10).status == "acked"
        assert client.stats()["refused"] == {"invalid_event": 1}


def test_threads_share_one_client(agent_factory, db, spool_dir):
    agent = agent_factory(agent_sections(db)).start()
    client = Client(agent.socket, str(spool_dir))
    per_thread = {}

    def send(index: int) -> None:
        per_thread[index] = [client.metric(f"p-thr{index}", "n", i * 0.5) for i in range(2000)]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.flush(30)
    pendings = [p for own in per_thread.values() for p in own]
    assert [p.status for p in pendings].count("acked") == 16000
    assert len({p.event_id for p in pendings}) == 16000
    stats = client.stats()
    client.close()
    assert (stats["acked"], stats["resent"], stats["dropped"], stats["connects"]) == (16000, 0, 0, 1)
    assert_in_mysql_exactly_once(db, [sent_event(p.line) for p in pendings])
    assert db.count("dd_metrics") == 16000


def test_asyncio_client(agent_factory, db, spool_dir):
    agent = agent_factory(agent_sections(db)).start()

    async def main():
        async with AsyncClient(agent.socket, str(spool_dir)) as client:
            first = client.metric("p-async", "equity", 1.25)
            ack = await first.wait(10)
            assert ack.status == "acked" and ack.seq
            pendings = [client.metric("p-async", "n", i) for i in range(3000)]
            pendings.append(client.trade("p-async", "ETHUSDT", "buy", "1.5", Decimal("2000.12345678")))
            await client.flush(30)
            assert {p.status for p in pendings} == {"acked"}
            return [first, *pendings], client.stats()

    pendings, stats = asyncio.run(main())
    assert (stats["acked"], stats["sent"]) == (3002, 3002)
    assert_in_mysql_exactly_once(db, [sent_event(p.line) for p in pendings])


def test_asyncio_client_spools_while_the_agent_is_down(agent_factory, db, spool_dir):
    agent = agent_factory(agent_sections(db, spool_dir))

    async def main():
        client = AsyncClient(agent.socket, str(spool_dir))
        pendings = [client.metric("p-async-down", "n", i) for i in range(500)]
        acks = [await p.wait(10) for p in pendings]
        assert {a.status for a in acks} == {"spooled"}
        await client.close()
        return pendings

    pendings = asyncio.run(main())
    assert len(spool_files(spool_dir)) >= 1
    agent.start()
    wait_until("the spool is drained", 30, lambda: not spool_files(spool_dir))
    assert_in_mysql_exactly_once(db, [sent_event(p.line) for p in pendings])


def test_atexit_flushes_a_script_that_never_closes(agent_factory, db, spool_dir, tmp_path):
    agent = agent_factory(agent_sections(db, spool_dir)).start()
    out = tmp_path / "atexit.jsonl"
    # A stopped agent still accepts connections (the kernel's backlog) but answers nothing: every event is still
    # waiting when the script ends, whatever the machine's speed.
    agent.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        run_script("short.py", agent.socket, str(spool_dir), str(out), "3000", "atexit", "p-atexit")
        took = time.monotonic() - started
    finally:
        agent.signal(signal.SIGCONT)
    assert took < 30, f"the exit handler kept the script {took:.1f} s"
    at_exit = json.loads(Path(f"{out}.stats").read_text())
    assert at_exit["queued"] == 3000, f"events were answered by a stopped agent: {at_exit}"
    records = load_records([out])
    assert len(records) == 3000
    assert_in_mysql_exactly_once(db, [sent_event(r["line"].encode()) for r in records])


def test_fork_parent_and_children_keep_sending(agent_factory, db, spool_dir, tmp_path):
    agent = agent_factory(agent_sections(db, spool_dir)).start()
    out_dir = tmp_path / "fork"
    out_dir.mkdir()
    run_script("fork.py", agent.socket, str(spool_dir), str(out_dir), "3", "400")
    records = load_records(sorted(out_dir.glob("*.jsonl")))
    statuses = {r["status"] for r in records}
    assert statuses <= {"acked", "spooled"}, statuses
    for child in range(3):
        stats = json.loads((out_dir / f"child{child}.stats").read_text())
        # The child starts with nothing of its parent's: it never sends (or resends) a parent's event.
        assert stats["inherited_outcome"] == "forked_away", stats
        assert (stats["enqueued_at_start"], stats["enqueued"], stats["sent"] - stats["resent"]) == (0, 400, 400)
    ids = [sent_event(r["line"].encode())["event_id"] for r in records]
    assert len(ids) == len(set(ids)), "a child reused an event id of its parent"
    assert len(records) > 400 * 3 + 400 * 4
    assert_in_mysql_exactly_once(db, [sent_event(r["line"].encode()) for r in records])
    assert db.count("dd_metrics") == len(records), "rows that no process counted"


def _unreachable_client(tmp_path: Path, **options) -> Client:
    """A client whose agent is down and whose spool cannot take anything: events pile up in memory."""
    return Client(str(tmp_path / "no-agent.sock"), str(tmp_path / "no-such-spool-dir"), max_queued=10, **options)


def test_on_full_raise(tmp_path):
    client = _unreachable_client(tmp_path, on_full="raise")
    pendings = [client.metric("p", "n", i) for i in range(10)]
    with pytest.raises(QueueFull):
        client.metric("p", "n", 10)
    assert client.stats()["queued"] == 10
    client.close(0.5)
    for pending in pendings:
        with pytest.raises(Dropped):
            pending.wait(0)


def test_on_full_drop_counts_and_logs(tmp_path, caplog):
    client = _unreachable_client(tmp_path, on_full="drop")
    with caplog.at_level(logging.WARNING, logger="telemetry_agent"):
        pendings = [client.metric("p", "n", i) for i in range(25)]
    assert [p.status for p in pendings[10:]] == ["dropped"] * 15
    with pytest.raises(Dropped):
        pendings[-1].wait(0)
    assert client.stats()["dropped"] == 15
    drop_logs = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drop_logs) == 1, "drops are logged, rate-limited"
    client.close(0.2)


def test_on_full_block_waits_then_raises(tmp_path):
    client = _unreachable_client(tmp_path, on_full="block", block_timeout=0.5)
    for i in range(10):
        client.metric("p", "n", i)
    started = time.monotonic()
    with pytest.raises(QueueFull):
        client.metric("p", "n", 10)
    assert 0.45 <= time.monotonic() - started < 2
    client.close(0.2)


def test_on_full_block_resumes_when_the_agent_comes(agent_factory, db, tmp_path):
    """The spool is full (max_spool_bytes), the agent is down: metric() blocks; the agent starts and takes the
    queue, the blocked call goes through, and everything (spooled or acked) arrives once."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    agent = agent_factory(agent_sections(db, spool_dir))
    client = Client(agent.socket, str(spool_dir), max_queued=20, max_spool_bytes=4000, block_timeout=30)
    pendings = []
    starter = threading.Timer(1.5, agent.start)
    starter.start()
    started = time.monotonic()
    for i in range(100):
        pendings.append(client.metric("p-block", "n", i))
    waited = time.monotonic() - started
    starter.join()
    client.close(10)
    statuses = [p.status for p in pendings]
    assert 1.0 < waited < 25, waited
    assert statuses.count("spooled") >= 10 and statuses.count("acked") >= 20, statuses
    assert set(statuses) == {"spooled", "acked"}
    assert sum(os.path.getsize(spool_dir / f) for f in spool_files(spool_dir)) <= 4000
    wait_until("the spool is drained", 30, lambda: not spool_files(spool_dir))
    assert_in_mysql_exactly_once(db, [sent_event(p.line) for p in pendings])


def test_close_keeps_its_deadline_when_nothing_can_take_events(tmp_path):
    client = _unreachable_client(tmp_path)
    pending = client.metric("p", "n", 1)
    with pytest.raises(WaitTimeout):
        pending.wait(0.2)
    started = time.monotonic()
    client.close(1.0)
    assert time.monotonic() - started < 1.5
    with pytest.raises(Dropped):
        pending.wait(0)
