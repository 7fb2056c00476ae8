"""Many processes x 3 threads stream through the client while the agent is kill -9'ed and restarted: every event
a client counted as acked or spooled is in MySQL exactly once with exactly its values.

Default: 16 processes, 12 s, 3 kills (about a minute on 2 cores). TELEMETRY_PY_STRESS=full: the issue's
100 processes x 3 threads, 40 s, 8 kills."""

from __future__ import annotations

import json
import os
import random
import time

from conftest import (
    agent_sections,
    assert_in_mysql_exactly_once,
    load_records,
    sent_event,
    spool_files,
    start_script,
    wait_until,
)

FULL = os.environ.get("TELEMETRY_PY_STRESS") == "full"
PROCESSES = 100 if FULL else 16
THREADS = 3
SECONDS = 40.0 if FULL else 12.0
KILLS = 8 if FULL else 3


def test_kill9_while_processes_stream(agent_factory, db, spool_dir, tmp_path):
    agent = agent_factory(agent_sections(db, spool_dir)).start()
    outs = [tmp_path / f"stream-{i}.jsonl" for i in range(PROCESSES)]
    scripts = [
        start_script("stream.py", agent.socket, str(spool_dir), str(out), str(THREADS), str(SECONDS), f"s{i}")
        for i, out in enumerate(outs)
    ]
    rng = random.Random(15)
    started = time.monotonic()
    for kill in range(KILLS):
        # Spread the kills over the run; each time the agent stays down a little (clients spool meanwhile).
        time.sleep(max(0.0, started + (kill + 1) * SECONDS / (KILLS + 1) - time.monotonic()))
        agent.kill9()
        time.sleep(rng.uniform(0.1, 1.0))
        agent.start()
    stats = []
    for script in scripts:
        stdout, stderr = script.communicate(timeout=SECONDS + 120)
        assert script.returncode == 0, stderr
        stats.append(json.loads(stdout.strip().splitlines()[-1]))
    records = load_records(outs)
    statuses = [r["status"] for r in records]
    counted = [sent_event(r["line"].encode()) for r in records if r["status"] in ("acked", "spooled")]
    assert len(counted) == len(records), f"events neither acked nor spooled: {set(statuses)}"
    assert len(counted) > PROCESSES * THREADS * 100, f"too few events to show anything: {len(counted)}"
    total = {key: sum(s[key] for s in stats) for key in ("acked", "spooled", "resent", "retried", "connect_failures")}
    assert total["resent"] + total["spooled"] > 0, f"the kills never hit an unanswered event: {total}"
    wait_until("every spool file drained", 90, lambda: not spool_files(spool_dir), 0.2)
    assert_in_mysql_exactly_once(db, counted, timeout=120)
    generated = {e["event_id"] for e in counted}
    stray = db.execute("SELECT event_id FROM dd_metrics UNION ALL SELECT event_id FROM dd_trade_performance")
    assert {row[0] for row in stray} <= generated, "rows of events no client sent"
    print(
        f"\nstress: {len(counted)} events from {PROCESSES} processes x {THREADS} threads in {SECONDS:.0f} s, "
        f"{KILLS} kill -9; client counts: {total}; 0 lost, 0 duplicated, 0 wrong values"
    )
