"""The spool (docs/spool.md): the client's side of the contract, scripts that run and exit while the agent is
down, a drain interrupted by kill -9, and the agent's handling of torn, invalid and hostile files."""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
from pathlib import Path

import pytest

from conftest import (
    agent_sections,
    assert_in_mysql_exactly_once,
    load_records,
    sent_event,
    spool_files,
    start_script,
    wait_until,
)
from telemetry_agent import Client


def test_the_client_follows_the_writer_contract(tmp_path, spool_dir):
    """Its own file: `{pid}-{instance}-{n}.spool`, mode 0640 whatever the umask, flock held while the client
    may write, complete NDJSON lines with client ids; closing releases the lock (the hand-over)."""
    old_umask = os.umask(0o077)
    try:
        client = Client(str(tmp_path / "absent.sock"), str(spool_dir))
        pendings = [client.metric("p-contract", "n", i) for i in range(50)]
        assert {p.wait(5).status for p in pendings} == {"spooled"}
    finally:
        os.umask(old_umask)
    (name,) = spool_files(spool_dir)
    assert re.fullmatch(rf"{os.getpid()}-[0-9a-f]{{16}}-1\.spool", name), name
    path = spool_dir / name
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    with open(path, "rb") as probe:
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(line)["event_id"] for line in lines[:-1]] == [p.event_id for p in pendings]
    client.close(1)
    with open(path, "rb") as probe:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # handed over


def test_an_idle_client_hands_its_spool_over_when_the_agent_comes_back(agent_factory, db, spool_dir):
    """A long-running script that spooled a burst while the agent was away, then went quiet: its client keeps
    trying to connect, and connecting hands the file over, so the events arrive without another event."""
    agent = agent_factory(agent_sections(db, spool_dir))
    client = Client(agent.socket, str(spool_dir))
    try:
        pendings = [client.metric("p-idle", "m", i) for i in range(20)]
        assert {p.wait(5).status for p in pendings} == {"spooled"}
        assert len(spool_files(spool_dir)) == 1
        agent.start()
        wait_until("the idle client's spool drained", 30, lambda: not spool_files(spool_dir), 0.1)
        wait_until("its events in MySQL", 30, lambda: db.count("dd_metrics") == 20, 0.1)
        assert client.stats()["enqueued"] == 20, "nothing more was sent to make it happen"
    finally:
        client.close(5)


def test_the_client_starts_a_new_file_past_its_roll_size(tmp_path, spool_dir, monkeypatch):
    """Files stay below the agent's max_file_bytes: past the roll size the file is handed over."""
    from telemetry_agent import spool as spool_module

    monkeypatch.setattr(spool_module, "FILE_ROLL_BYTES", 4096)
    client = Client(str(tmp_path / "absent.sock"), str(spool_dir))
    try:
        for _batch in range(5):
            pendings = [client.metric("p-roll", "m", i, tags={"pad": "x" * 200}) for i in range(10)]
            assert {p.wait(5).status for p in pendings} == {"spooled"}
    finally:
        client.close(1)
    files = spool_files(spool_dir)
    assert len(files) >= 2, files
    assert all((spool_dir / name).stat().st_size <= 4096 + (1 << 20) for name in files)


def _run_short_scripts(socket_path: str, spool_dir: Path, out_dir: Path, count: int, events: int) -> list:
    scripts = [
        start_script(
            "short.py",
            socket_path,
            str(spool_dir),
            str(out_dir / f"short-{i}.jsonl"),
            str(events),
            "close" if i % 2 else "atexit",
            f"p-short{i}",
        )
        for i in range(count)
    ]
    for script in scripts:
        _, stderr = script.communicate(timeout=120)
        assert script.returncode == 0, stderr
    records = load_records(sorted(out_dir.glob("short-*.jsonl")))
    assert len(records) == count * events
    # With close(), every outcome is known before the script ends: spooled, since the agent is down.
    closed = [r for r in records if r["status"] != "queued"]
    assert closed and {r["status"] for r in closed} == {"spooled"}
    return [sent_event(r["line"].encode()) for r in records]


def test_scripts_that_run_while_the_agent_is_down_lose_nothing(agent_factory, db, spool_dir, tmp_path):
    agent = agent_factory(agent_sections(db, spool_dir))
    events = _run_short_scripts(agent.socket, spool_dir, tmp_path, 20, 60)
    assert len(spool_files(spool_dir)) >= 20
    agent.start()
    wait_until("the spool directory is empty", 30, lambda: not spool_files(spool_dir))
    assert_in_mysql_exactly_once(db, events)
    assert db.count("dd_metrics") + db.count("dd_trade_performance") == len(events)
    assert os.listdir(spool_dir) == []


def test_a_drain_killed_midway_is_completed_by_the_next_start(agent_factory, db, spool_dir, tmp_path):
    agent = agent_factory(agent_sections(db, spool_dir))
    events = _run_short_scripts(agent.socket, spool_dir, tmp_path, 20, 3000)
    files = len(spool_files(spool_dir))
    agent.start(wait=False)
    wait_until("the drain started", 30, lambda: len(spool_files(spool_dir)) < files, 0.002)
    agent.kill9()
    left = len(spool_files(spool_dir))
    assert 0 < left < files, f"the kill came too late to interrupt the drain ({left} of {files} files left)"
    agent.start()
    wait_until("the spool directory is empty", 60, lambda: not spool_files(spool_dir))
    assert_in_mysql_exactly_once(db, events)
    assert db.count("dd_metrics") + db.count("dd_trade_performance") == len(events)


def test_torn_invalid_and_hostile_spool_files_are_contained(agent_factory, db, spool_dir, tmp_path):
    # Two files written by the client while the agent was down; one then gets a torn line (a writer that died
    # mid-write), the other an invalid line in the middle.
    files = []
    for tag in ("torn", "mixed"):
        client = Client(str(tmp_path / "absent.sock"), str(spool_dir))
        pendings = [client.metric(f"p-{tag}", "n", i) for i in range(20)]
        client.close(2)
        assert {p.status for p in pendings} == {"spooled"}
        (path,) = [spool_dir / f for f in spool_files(spool_dir) if spool_dir / f not in [p for p, _ in files]]
        files.append((path, pendings))
    (torn_path, torn_events), (mixed_path, mixed_events) = files
    with open(torn_path, "ab") as f:
        f.write(b'{"kind":"metric","profile_id":"p-torn","name":"n","value":99,"event_id":"torn-1"')
    content = mixed_path.read_bytes().split(b"\n")
    content.insert(5, b'{"kind":"metric","profile_id":"p-mixed","name":"n","value":"x","event_id":"bad-1"}')
    mixed_path.write_bytes(b"\n".join(content))
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.ndjson"
    secret_line = b'{"kind":"metric","profile_id":"p-secret","name":"n","value":1,"event_id":"secret-1"}\n'
    secret.write_bytes(secret_line)
    os.symlink(secret, spool_dir / "link.spool")
    os.link(secret, spool_dir / "hard.spool")
    os.mkfifo(spool_dir / "fifo.spool", 0o600)
    big_line = b'{"kind":"metric","profile_id":"p-big","name":"n","value":1,"event_id":"big-%d"}\n'
    (spool_dir / "big.spool").write_bytes(b"".join(big_line % i for i in range(25_000)))  # > 1 MiB
    (spool_dir / "notes.txt").write_bytes(secret_line)

    agent = agent_factory(agent_sections(db, spool_dir) + "max_file_bytes = 1048576\n").start()
    wait_until("the client files are drained", 30, lambda: not torn_path.exists() and not mixed_path.exists())
    for name in ("link.spool", "hard.spool", "fifo.spool", "big.spool"):
        wait_until(f"{name} refused", 30, lambda name=name: os.path.lexists(spool_dir / f"{name}.refused"))
    assert_in_mysql_exactly_once(db, [sent_event(p.line) for p in torn_events + mixed_events])
    profiles = {row[0] for row in db.execute("SELECT DISTINCT profile_id FROM dd_metrics")}
    assert profiles == {"p-torn", "p-mixed"}, "a torn, invalid, refused or outside line was ingested"
    assert db.count("dd_metrics") == 40
    assert secret.read_bytes() == secret_line and (spool_dir / "notes.txt").exists()
    log = agent.log()
    for reason in ("a symbolic link", "hard-linked", "not a regular file", "over [spool] max_file_bytes"):
        assert reason in log, f"the log does not say why a file was refused ({reason}):\n{log}"
    dead = agent.command("wal", "dead-letters", "list", "--sink", "spool")
    assert f"{mixed_path.name}:6:" in dead.stdout, dead.stdout + dead.stderr
    assert torn_path.name not in dead.stdout, "the torn last line is ignored, not a dead letter"
    status = json.loads(agent.command("status", "--json").stdout)
    assert status["spool"]["lines_refused"] == 1 and status["spool"]["files_refused"] == 4, status["spool"]
    assert status["spool"]["events_ingested"] == 40, status["spool"]
    # The agent goes on serving scripts.
    with Client(agent.socket, str(spool_dir)) as client:
        assert client.metric("p-after", "n", 1).wait(10).status == "acked"
