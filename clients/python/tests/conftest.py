"""Test support: the real agent binary in a temp dir, a fresh MySQL database and Redis key prefix per test, and
checks of what the clients counted against the rows in MySQL."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional
from urllib.parse import urlparse

import pytest

CLIENT_DIR = Path(__file__).resolve().parent.parent
REPO = CLIENT_DIR.parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
AGENT_BIN = os.environ.get("TELEMETRY_AGENT_BIN", str(REPO / "target" / "release" / "telemetry-agent"))
MYSQL_URL = os.environ.get("TELEMETRY_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306")
REDIS_URL = os.environ.get("TELEMETRY_TEST_REDIS_URL", "redis://127.0.0.1:6379")

# The tests, and the scripts they start, import the client from this tree, installed or not.
sys.path.insert(0, str(CLIENT_DIR / "src"))
SCRIPT_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CLIENT_DIR / "src"), os.environ.get("PYTHONPATH", "")]))


def wait_until(what: str, timeout: float, done: Callable[[], Any], interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = done()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout} s: {what}")
        time.sleep(interval)


class Agent:
    """The release binary as a child process, configured in `dir`."""

    def __init__(self, dir: Path, extra: str = "", ingest: str = "") -> None:
        if not os.access(AGENT_BIN, os.X_OK):
            pytest.fail(
                f"no agent binary at {AGENT_BIN}: cargo build --release -p telemetry-agent (or set TELEMETRY_AGENT_BIN)"
            )
        self.dir = dir
        self.socket = str(dir / "agent.sock")
        self.config = dir / "agent.toml"
        self.log_path = dir / "agent.log"
        self.config.write_text(
            f'[agent]\nid = "tpy-{secrets.token_hex(3)}"\n'
            f'[ingest]\nsocket = "{self.socket}"\n{ingest}'
            f'[wal]\ndir = "{dir / "wal"}"\nretain_secs = 0\n'
            f"[http]\nenabled = false\n"
            f'[control]\nsocket = "{dir / "control.sock"}"\n'
            # Without a [spool] of the test's, the agent's default (./data/spool) would be in the checkout.
            + ("" if "[spool]" in extra else f'[spool]\ndir = "{dir / "agent-spool"}"\n')
            + extra
        )
        self.process: Optional[subprocess.Popen] = None

    def start(self, wait: bool = True) -> Agent:
        assert self.process is None, "already running"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [AGENT_BIN, "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=dict(os.environ, RUST_LOG="warn,telemetry_agent::spool=info"),
            )
        if wait:
            self.wait_listening()
        return self

    def wait_listening(self) -> None:
        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited with {self.process.returncode}:\n{self.log()}")
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(self.socket)
                return True
            except OSError:
                return False
            finally:
                probe.close()

        wait_until("the agent listens", 20, listening, 0.02)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        self.process = None
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def command(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [AGENT_BIN, *args, "--config", str(self.config)], capture_output=True, text=True, timeout=60
        )


class Database:
    """A fresh MySQL database, migrated by the agent binary."""

    def __init__(self) -> None:
        import mysql.connector

        parsed = urlparse(MYSQL_URL)
        self.params = dict(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 3306,
            user=parsed.username or "root",
            password=parsed.password or "",
        )
        self.name = f"tpy_{os.getpid()}_{secrets.token_hex(4)}"
        self.url = f"{MYSQL_URL.rstrip('/')}/{self.name}"
        self._connector = mysql.connector
        self.execute(f"CREATE DATABASE {self.name}", database=None)

    def connect(self, database: Optional[str] = "") -> Any:
        db = self.name if database == "" else database
        kwargs = dict(self.params, autocommit=True)
        if db:
            kwargs["database"] = db
        return self._connector.connect(**kwargs)

    def execute(self, sql: str, params: Iterable[Any] = (), database: Optional[str] = "") -> List[tuple]:
        conn = self.connect(database)
        try:
            cursor = conn.cursor()
            cursor.execute(sql, tuple(params))
            rows = cursor.fetchall() if cursor.with_rows else []
            cursor.close()
            return rows
        finally:
            conn.close()

    def migrate(self, dir: Path) -> None:
        config = dir / "migrate.toml"
        config.write_text(f'[mysql]\nurl = "{self.url}"\n')
        done = subprocess.run([AGENT_BIN, "migrate", "--config", str(config)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    def drop(self) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {self.name}", database=None)

    def count(self, table: str) -> int:
        return int(self.execute(f"SELECT COUNT(*) FROM {table}")[0][0])


@pytest.fixture
def db(tmp_path: Path):
    try:
        database = Database()
    except Exception as e:  # pragma: no cover - setup problem, not a test result
        pytest.fail(f"MySQL at {MYSQL_URL} is not reachable ({e}); source scripts/services.sh")
    database.migrate(tmp_path)
    yield database
    database.drop()


@pytest.fixture
def redis_prefix():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"tpy_{secrets.token_hex(4)}"
    yield client, prefix
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def agent_sections(db: Optional[Database] = None, spool_dir: Optional[Path] = None, redis_prefix: str = "") -> str:
    text = ""
    if db is not None:
        text += f'[mysql]\nurl = "{db.url}"\nmax_linger_ms = 20\n'
    if redis_prefix:
        text += f'[redis]\nurl = "{REDIS_URL}"\nkey_prefix = "{redis_prefix}"\n'
    if spool_dir is not None:
        text += f'[spool]\ndir = "{spool_dir}"\n'
    return text


@pytest.fixture
def agent_factory(tmp_path: Path):
    agents: List[Agent] = []

    def make(extra: str = "", ingest: str = "") -> Agent:
        agent = Agent(tmp_path, extra, ingest)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        if agent.process is not None:
            agent.kill9()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


def run_script(name: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout, env=SCRIPT_ENV
    )
    if check:
        assert done.returncode == 0, f"{name} {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def start_script(name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / name), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=SCRIPT_ENV,
    )


# --- what the clients counted, against MySQL ------------------------------------------------------------------------


def sent_event(line: bytes) -> Dict[str, Any]:
    """The event as the client sent it (its protocol line)."""
    return json.loads(line)


def _utc(text_or_ms: Any) -> datetime:
    if isinstance(text_or_ms, int):
        return datetime.fromtimestamp(text_or_ms / 1000, timezone.utc).replace(tzinfo=None)
    return datetime.strptime(text_or_ms, "%Y-%m-%dT%H:%M:%S.%fZ")


def _decimal_field(event: Dict[str, Any], key: str) -> Optional[Decimal]:
    return None if event.get(key) is None else Decimal(event[key])


def load_records(paths: Iterable[Path]) -> List[Dict[str, Any]]:
    """Records written by the test scripts: {"status": ..., "line": <the protocol line>}."""
    records = []
    for path in paths:
        with open(path) as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return records


def assert_in_mysql_exactly_once(db: Database, events: List[Dict[str, Any]], timeout: float = 90) -> None:
    """Every one of `events` (protocol lines as dicts, with event_id) is in MySQL once with exactly its values;
    waits for the forwarder. Rows of other events (generated but not counted) may exist; rows nobody sent may not."""
    metrics = {e["event_id"]: e for e in events if e["kind"] == "metric"}
    trades = {e["event_id"]: e for e in events if e["kind"] == "trade"}

    def arrived() -> bool:
        return db.count("dd_metrics") >= len(metrics) and db.count("dd_trade_performance") >= len(trades)

    try:
        wait_until("every counted event reached MySQL", timeout, arrived, 0.25)
    except AssertionError:
        pass  # the comparison below says which are missing
    rows = db.execute("SELECT event_id, profile_id, name, value, ts, tags FROM dd_metrics")
    by_id: Dict[str, tuple] = {}
    duplicated = []
    for row in rows:
        if row[0] in by_id:
            duplicated.append(row[0])
        by_id[row[0]] = row
    missing = [i for i in metrics if i not in by_id]
    wrong = []
    for event_id, event in metrics.items():
        row = by_id.get(event_id)
        if row is None:
            continue
        expected = (event["profile_id"], event["name"], float(event["value"]), _utc(event["ts"]))
        if (row[1], row[2], row[3], row[4]) != expected:
            wrong.append((event_id, row[1:5], expected))
        if "tags" in event and json.loads(row[5]) != event["tags"]:
            wrong.append((event_id, row[5], event["tags"]))
    trade_rows = db.execute(
        "SELECT event_id, profile_id, symbol, side, quantity, price, pnl, fees, opened_at, closed_at "
        "FROM dd_trade_performance"
    )
    trade_by_id: Dict[str, tuple] = {}
    for row in trade_rows:
        if row[0] in trade_by_id:
            duplicated.append(row[0])
        trade_by_id[row[0]] = row
    missing += [i for i in trades if i not in trade_by_id]
    for event_id, event in trades.items():
        row = trade_by_id.get(event_id)
        if row is None:
            continue

        expected_trade = (
            event["profile_id"],
            event["symbol"],
            event["side"],
            _decimal_field(event, "quantity"),
            _decimal_field(event, "price"),
            _decimal_field(event, "pnl"),
            _decimal_field(event, "fees"),
            None if event.get("opened_at") is None else _utc(event["opened_at"]),
            _utc(event["closed_at"]),
        )
        if tuple(row[1:]) != expected_trade:
            wrong.append((event_id, row[1:], expected_trade))
    assert not duplicated, f"{len(duplicated)} duplicated rows, e.g. {duplicated[:5]}"
    assert not missing, f"{len(missing)} of {len(metrics) + len(trades)} counted events missing, e.g. {missing[:5]}"
    assert not wrong, f"{len(wrong)} rows with wrong values, e.g. {wrong[:3]}"


def spool_files(spool_dir: Path) -> List[str]:
    return sorted(p.name for p in spool_dir.iterdir() if p.name.endswith(".spool"))
