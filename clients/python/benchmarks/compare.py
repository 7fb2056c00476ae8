"""What a trading script pays to send its telemetry, three ways, from the script's own side.

(a) old:    the scripts' `TelemetryStorage` as it was: `metric()`/`trade()` put the event on a queue; one flusher
            thread writes each row with its own autocommit INSERT over one mysql.connector connection, plus one
            redis-py HSET per metric over one Redis connection.
(b) pool:   the review's fix: the same queue, flushed by 5 threads through a mysql.connector pool of 5, one 50-row
            INSERT per table and commit (executemany), the HSETs of a batch pipelined over a redis-py pool.
(c) client: this package's `Client` sending to a real agent (the release binary, MySQL and Redis sinks on);
            only events whose `Pending.wait()` says "acked" count.

Each phase runs 1 or N script processes (separate Python interpreters, like the scripts) for BENCH_SECS, each
sending as fast as it can: 3 metrics then 1 trade, over and over, with a bounded number of events not yet durable
(the sender waits, outside the timed calls, for older events to be written (a, b) or acked (c)). Per phase:
events/s (durable events: rows written by the flusher, or acked by the agent), the script's own CPU per event
(user+sys of the whole process, its background threads included, from os.times()), and the wall time of each
`metric()` call (perf_counter_ns around the call: what the trading loop pays). Every table starts empty
(TRUNCATE); after a client phase the agent's MySQL sink is given time to catch up before the next phase.

    target/pyvenv/bin/python clients/python/benchmarks/compare.py
    BENCH_QUICK=1 target/pyvenv/bin/python clients/python/benchmarks/compare.py   # smoke run, well under a minute

Settings (environment): BENCH_SECS per phase (default 10; quick 2), BENCH_PROCS the process counts (default
"1,30"; quick "1,4"), BENCH_WAYS (default "old,pool,client"), BENCH_WINDOW events not yet acked per process in
(c) (default 2000; (a) and (b) keep 100 and 500 unwritten, enough for their flushers), TELEMETRY_TEST_MYSQL_URL
(default mysql://root@127.0.0.1:3306), TELEMETRY_TEST_REDIS_URL (default redis://127.0.0.1:6379),
TELEMETRY_AGENT_BIN (default target/release/telemetry-agent). It creates and drops its own database
(bench_py_<random>), Redis key prefix and temp dir. With BENCH_REPORT_DIR set, it writes one JSON line per
(way, processes) to $BENCH_REPORT_DIR/python.jsonl for scripts/bench.sh's report. (b) takes a smaller pool per
process when the server's max_connections has no room for 5 per process (30 x 5 = 150 of MariaDB's default 151).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple
from urllib.parse import unquote, urlparse

HERE = Path(__file__).resolve().parent
CLIENT_SRC = HERE.parent / "src"
REPO = HERE.parent.parent.parent
MYSQL_URL = os.environ.get("TELEMETRY_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306")
REDIS_URL = os.environ.get("TELEMETRY_TEST_REDIS_URL", "redis://127.0.0.1:6379")
AGENT_BIN = os.environ.get("TELEMETRY_AGENT_BIN") or str(
    Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "telemetry-agent"
)

WAYS = ("old", "pool", "client", "acks")
# The ways that send through the client, each to its own agent: with MySQL and Redis sinks on, or with none (what
# the client and the agent's WAL alone sustain; the sinks then take the same CPU later, or on another host).
CLIENT_WAYS = ("client", "acks")
LABELS = {
    "old": "(a) old way: queue + 1 flusher, autocommit INSERT per row, HSET per metric",
    "pool": "(b) review's fix: pool of 5, 50-row INSERTs, pipelined HSETs over a redis-py pool",
    "client": "(c) telemetry_agent.Client to the agent (acked events)",
    "acks": "(d) the same to an agent without sinks (acked events: the client's and the WAL's ceiling)",
}
SHORT = {"old": "(a) old", "pool": "(b) pool", "client": "(c) client", "acks": "(d) client, no sinks"}
METRIC_NAMES = (
    "equity",
    "pnl",
    "exposure",
    "drawdown",
    "position",
    "spread",
    "latency_ms",
    "fill_rate",
    "orders",
    "cash",
)
# Events a process may have sent but not yet durable (flow control, outside the timed calls), and how many it sends
# between checks of that and of its deadline. (c): BENCH_WINDOW, default 2000 (twice the client's own window of
# 1000 unanswered lines). (a), (b): just enough to keep their flushers busy, so that the end of a phase is not a
# long drain of a deep queue.
QUEUED_WINDOWS = {"old": 100, "pool": 500}
MAX_BLOCK = 200
OLD_BATCH_SIZE, OLD_FLUSH_INTERVAL = 10, 5.0  # TelemetryStorage's settings
POOL_SIZE, POOL_BATCH, POOL_LINGER = 5, 50, 0.05
CATCH_UP_SECS = 180.0

# Targets (issue 15, "Benchmark").
TARGET_P99_US = 50.0
TARGET_CPU_RATIO = 0.2
TARGET_ONE_PROCESS_PER_S = 50_000.0


def setting(name: str, full: str, quick: str) -> str:
    value = os.environ.get(name)
    if value:
        return value
    return quick if is_quick() else full


def is_quick() -> bool:
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def progress(message: str) -> None:
    print(f"python bench: {message}", file=sys.stderr, flush=True)


def mysql_params(url: str) -> Dict[str, Any]:
    parsed = urlparse(url)
    return {
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or 3306,
        "user": unquote(parsed.username or "root"),
        "password": unquote(parsed.password or ""),
    }


# --- the three ways, as a script holds them ---------------------------------------------------------------------

METRIC_SQL = (
    "INSERT INTO dd_metrics (event_id, agent_id, wal_seq, profile_id, name, value, ts, received_at) "
    "VALUES (%s, %s, 0, %s, %s, %s, %s, UTC_TIMESTAMP(6))"
)
TRADE_SQL = (
    "INSERT INTO dd_trade_performance (event_id, agent_id, wal_seq, profile_id, symbol, side, quantity, price, pnl, "
    "fees, closed_at, received_at) VALUES (%s, %s, 0, %s, %s, %s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))"
)


class QueuedStorage:
    """What (a) and (b) share: `metric()`/`trade()` put a tuple on a queue.Queue (as TelemetryStorage did) and
    flusher threads write them; `written` counts rows committed, for the sender's flow control."""

    agent_id = "bench"

    def __init__(self, redis_url: str, redis_prefix: str) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.redis_prefix = redis_prefix
        self.redis_url = redis_url
        self.cond = threading.Condition()
        self.written = 0
        self.error: Optional[BaseException] = None
        self.threads: List[threading.Thread] = []
        self._ids = itertools.count(1)  # next() is atomic under the GIL: the flusher threads share it
        self._id_prefix = f"{self.agent_id}-{os.getpid():x}-{secrets.token_hex(4)}-"

    def metric(self, profile_id: str, name: str, value: float) -> None:
        self.queue.put((profile_id, name, value, datetime.now(timezone.utc)))

    def trade(self, profile_id: str, symbol: str, side: str, quantity: str, price: str, pnl: str, fees: str) -> None:
        self.queue.put((profile_id, symbol, side, quantity, price, pnl, fees, datetime.now(timezone.utc)))

    def start(self, threads: int) -> None:
        for i in range(threads):
            thread = threading.Thread(target=self._run, name=f"flusher-{i}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _run(self) -> None:
        try:
            self.flush_loop()
        except BaseException as e:  # the sender must hear of it, not wait forever
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def flush_loop(self) -> None:
        raise NotImplementedError

    def next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def row(self, item: tuple) -> Tuple[bool, tuple]:
        """(is_metric, INSERT parameters) of a queued item."""
        if len(item) == 4:
            profile_id, name, value, ts = item
            return True, (self.next_id(), self.agent_id, profile_id, name, value, ts.replace(tzinfo=None))
        profile_id, symbol, side, quantity, price, pnl, fees, ts = item
        return False, (
            self.next_id(),
            self.agent_id,
            profile_id,
            symbol,
            side,
            quantity,
            price,
            pnl,
            fees,
            ts.replace(tzinfo=None),
        )

    def done(self, count: int) -> None:
        with self.cond:
            self.written += count
            self.cond.notify_all()

    def wait_written(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.written < count:
                if self.error is not None:
                    raise RuntimeError(f"a flusher failed: {self.error!r}") from self.error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"{count - self.written} rows not written after {timeout} s")
                self.cond.wait(remaining)

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join(10)


class OldStorage(QueuedStorage):
    """(a) TelemetryStorage: one connection (autocommit, one INSERT per row), one HSET per metric. Its flusher
    takes up to batch_size=10 events, waiting at most flush_interval=5 s for the first (the original's
    sleep(flush_interval) between batches is left out: with it, a script could not send 2 events/s)."""

    agent_id = "bench-old"

    def __init__(self, params: Dict[str, Any], database: str, redis_url: str, redis_prefix: str) -> None:
        import mysql.connector
        import redis

        super().__init__(redis_url, redis_prefix)
        self.db = mysql.connector.connect(**params, database=database, autocommit=True)
        self.redis = redis.Redis.from_url(redis_url)
        self.start(1)

    def flush_loop(self) -> None:
        cursor = self.db.cursor()
        hset = self.redis.hset
        prefix = self.redis_prefix
        while True:
            try:
                first = self.queue.get(timeout=OLD_FLUSH_INTERVAL)
            except queue.Empty:
                continue
            if first is None:
                break
            batch = [first]
            while len(batch) < OLD_BATCH_SIZE:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)
                    break
                batch.append(item)
            for item in batch:
                is_metric, params = self.row(item)
                if is_metric:
                    cursor.execute(METRIC_SQL, params)
                    hset(f"{prefix}:{item[0]}:metrics", item[1], item[2])
                else:
                    cursor.execute(TRADE_SQL, params)
            self.done(len(batch))
        cursor.close()
        self.db.close()
        self.redis.close()


class PoolStorage(QueuedStorage):
    """(b) The review's fix: 5 flusher threads share a mysql.connector pool of 5 and a redis-py pool; each takes
    up to 50 events (waiting at most 50 ms for more), writes one multi-row INSERT per table (executemany),
    commits, and pipelines the batch's HSETs."""

    agent_id = "bench-pool"

    def __init__(
        self, params: Dict[str, Any], database: str, redis_url: str, redis_prefix: str, pool_size: int = POOL_SIZE
    ) -> None:
        import mysql.connector.pooling
        import redis

        super().__init__(redis_url, redis_prefix)
        self.pool = mysql.connector.pooling.MySQLConnectionPool(
            pool_name=f"bench{os.getpid()}", pool_size=pool_size, **params, database=database
        )
        self.redis_pool = redis.ConnectionPool.from_url(redis_url, max_connections=pool_size)
        self.redis = redis.Redis(connection_pool=self.redis_pool)
        self.start(pool_size)

    def flush_loop(self) -> None:
        prefix = self.redis_prefix
        get = self.queue.get
        while True:
            first = get()
            if first is None:
                break
            batch = [first]
            deadline = time.monotonic() + POOL_LINGER
            stop = False
            while len(batch) < POOL_BATCH:
                try:
                    item = get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            metrics, trades = [], []
            for item in batch:
                is_metric, params = self.row(item)
                (metrics if is_metric else trades).append(params)
            conn = self.pool.get_connection()
            try:
                cursor = conn.cursor()
                if metrics:
                    cursor.executemany(METRIC_SQL, metrics)
                if trades:
                    cursor.executemany(TRADE_SQL, trades)
                conn.commit()
                cursor.close()
            finally:
                conn.close()  # back to the pool
            if metrics:
                pipe = self.redis.pipeline(transaction=False)
                for item in batch:
                    if len(item) == 4:
                        pipe.hset(f"{prefix}:{item[0]}:metrics", item[1], item[2])
                pipe.execute()
            self.done(len(batch))
            if stop:
                break

    def close(self) -> None:
        super().close()
        self.redis_pool.disconnect()


# --- a worker: one script process -------------------------------------------------------------------------------


class Sender:
    """The way under test as the worker loop sees it: `metric`/`trade` (the timed calls), `settle(block)` (flow
    control: the block's events, or enough earlier ones, are durable), `finish()` counts, `close()`."""

    metric: Callable[..., Any]
    trade: Callable[..., Any]

    def settle(self, block: List[Any], sent: int) -> None:
        """`sent`: events sent since `mark()`, of which all but the newest `window` must be durable."""
        raise NotImplementedError

    def mark(self) -> None:
        """The measurement starts: count from here."""
        raise NotImplementedError

    def durable(self) -> Tuple[int, int]:
        """(durable events, events resolved otherwise) since `mark()`."""
        raise NotImplementedError

    def close(self) -> Dict[str, Any]:
        raise NotImplementedError


class StorageSender(Sender):
    def __init__(self, storage: QueuedStorage) -> None:
        self.storage = storage
        self.metric = storage.metric
        self.trade = storage.trade
        self.base = 0

    def settle(self, block: List[Any], sent: int) -> None:
        self.storage.wait_written(self.base + sent)

    def mark(self) -> None:
        with self.storage.cond:
            self.base = self.storage.written

    def durable(self) -> Tuple[int, int]:
        with self.storage.cond:
            return self.storage.written - self.base, 0

    def close(self) -> Dict[str, Any]:
        self.storage.close()
        return {}


class ClientSender(Sender):
    def __init__(self, socket_path: str, spool_dir: str) -> None:
        sys.path.insert(0, str(CLIENT_SRC))
        from telemetry_agent import Client

        self.client = Client(socket_path, spool_dir)
        self.metric = self.client.metric
        self.trade = self.client.trade
        self.acked = 0
        self.other = 0

    def settle(self, block: List[Any], sent: int) -> None:
        acked = 0
        for pending in block:
            if pending.wait(60).status == "acked":
                acked += 1
        self.acked += acked
        self.other += len(block) - acked

    def mark(self) -> None:
        self.acked = self.other = 0

    def durable(self) -> Tuple[int, int]:
        return self.acked, self.other

    def close(self) -> Dict[str, Any]:
        stats = self.client.stats()
        self.client.close(10)
        return {"client_stats": stats}


def make_sender(way: str, conf: Dict[str, Any]) -> Sender:
    if way in CLIENT_WAYS:
        return ClientSender(conf["socket"], conf["spool_dir"])
    args = (conf["mysql"], conf["database"], conf["redis_url"], conf["redis_prefix"])
    if way == "old":
        return StorageSender(OldStorage(*args))
    return StorageSender(PoolStorage(*args, pool_size=conf["pool_size"]))


def worker(conf: Dict[str, Any]) -> None:
    way, index, window = conf["way"], conf["index"], conf["window"]
    block_size = min(MAX_BLOCK, window // 2)
    profile = f"py-{way}-{index}"
    sender = make_sender(way, conf)
    metric, trade = sender.metric, sender.trade
    names = METRIC_NAMES
    prices = [f"{64000 + i}.5" for i in range(1000)]
    perf = time.perf_counter_ns

    # Warm-up (connections, pools, caches): metrics, all durable, not counted.
    warm = [metric(profile, names[i % 10], 100.0 + i) for i in range(2 * block_size)]
    sender.settle(warm, 2 * block_size)
    sender.mark()

    print("ready", flush=True)
    go = sys.stdin.readline().split()
    if not go or go[0] != "go":
        return
    start_wall = float(go[1])
    time.sleep(max(0.0, start_wall - time.time()))
    secs = conf["secs"]
    metric_ns = array("q")
    trade_ns = array("q")
    m_append, t_append = metric_ns.append, trade_ns.append
    blocks: Deque[List[Any]] = deque()
    block: List[Any] = []
    b_append = block.append
    sent = 0
    cpu0 = os.times()
    t_start = perf()
    deadline = t_start + int(secs * 1e9)
    i = 0
    now = t_start
    while now < deadline:
        for _ in range(block_size):
            if i & 3 != 3:
                t0 = perf()
                pending = metric(profile, names[i % 10], 100.0 + (i % 997) * 0.25)
                now = perf()
                m_append(now - t0)
            else:
                t0 = perf()
                pending = trade(
                    profile, "BTCUSDT", "buy" if i & 4 else "sell", "0.015", prices[i % 1000], "12.25", "0.02"
                )
                now = perf()
                t_append(now - t0)
            b_append(pending)
            i += 1
        sent += block_size
        blocks.append(block)
        block = []
        b_append = block.append
        if len(blocks) * block_size > window:
            sender.settle(blocks.popleft(), sent - window)
    while blocks:
        sender.settle(blocks.popleft(), sent)
    t_end = perf()
    cpu1 = os.times()
    events, other = sender.durable()
    extra = sender.close()
    base = Path(conf["samples"])
    with open(f"{base}.metric", "wb") as f:
        metric_ns.tofile(f)
    with open(f"{base}.trade", "wb") as f:
        trade_ns.tofile(f)
    elapsed = (t_end - t_start) / 1e9
    result = {
        "sent": sent,
        "events": events,
        "other": other,
        "secs": elapsed,
        "start": start_wall,
        "end": start_wall + elapsed,
        "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        **extra,
    }
    print(json.dumps(result), flush=True)


# --- the parent: set up, run the phases, report, tear down ------------------------------------------------------


class Agent:
    def __init__(self, dir: Path, database_url: Optional[str], redis_prefix: str) -> None:
        """`database_url` None: an agent without sinks."""
        dir.mkdir(parents=True, exist_ok=True)
        self.dir = dir
        self.socket = str(dir / "agent.sock")
        self.spool_dir = dir / "spool"
        self.spool_dir.mkdir()
        self.id = f"bench-py-{secrets.token_hex(3)}"
        self.config = dir / "agent.toml"
        self.config.write_text(
            f'[agent]\nid = "{self.id}"\n'
            f"[ingest]\nsocket = {json.dumps(self.socket)}\n"
            f"[wal]\ndir = {json.dumps(str(dir / 'wal'))}\nretain_secs = 0\n"
            "[http]\nenabled = false\n"
            f"[control]\nsocket = {json.dumps(str(dir / 'control.sock'))}\n"
            f"[spool]\ndir = {json.dumps(str(self.spool_dir))}\n"
            + (
                ""
                if database_url is None
                else f"[mysql]\nurl = {json.dumps(database_url)}\n"
                f"[redis]\nurl = {json.dumps(REDIS_URL)}\nkey_prefix = {json.dumps(redis_prefix)}\n"
            )
        )
        self.log_path = dir / "agent.log"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [AGENT_BIN, "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn")),
            )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the agent exited with {self.process.returncode}:\n{self.log_tail()}")
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(self.socket)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the agent does not listen after 30 s:\n{self.log_tail()}") from None
                time.sleep(0.05)
            finally:
                probe.close()

    def cpu_seconds(self) -> float:
        if self.process is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""


class Database:
    def __init__(self) -> None:
        import mysql.connector

        self.params = mysql_params(MYSQL_URL)
        self.name = f"bench_py_{secrets.token_hex(4)}"
        self.url = f"{MYSQL_URL.rstrip('/')}/{self.name}"
        self.conn = mysql.connector.connect(**self.params, autocommit=True)
        self.execute(f"CREATE DATABASE {self.name}")
        self.created = True

    def execute(self, sql: str, params: tuple = ()) -> List[tuple]:
        cursor = self.conn.cursor()
        cursor.execute(sql, params)
        rows = cursor.fetchall() if cursor.with_rows else []
        cursor.close()
        return rows

    def migrate(self, dir: Path) -> None:
        config = dir / "migrate.toml"
        config.write_text(f"[mysql]\nurl = {json.dumps(self.url)}\n")
        done = subprocess.run([AGENT_BIN, "migrate", "--config", str(config)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"migrate failed: {done.stderr}")

    def max_connections(self) -> int:
        return int(self.execute("SHOW VARIABLES LIKE 'max_connections'")[0][1])

    def connection_room(self) -> int:
        """Connections the server can still take, keeping 10 spare (the agent's pool, tests running beside)."""
        connected = int(self.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")[0][1])
        return self.max_connections() - connected - 10

    def truncate(self) -> None:
        for table in ("dd_metrics", "dd_trade_performance"):
            self.execute(f"TRUNCATE TABLE {self.name}.{table}")

    def rows(self) -> int:
        return sum(
            int(self.execute(f"SELECT COUNT(*) FROM {self.name}.{table}")[0][0])
            for table in ("dd_metrics", "dd_trade_performance")
        )

    def drop(self) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {self.name}")
        self.conn.close()


def percentile(sorted_values: List[int], p: float) -> float:
    if not sorted_values:
        return 0.0
    return float(sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))])


def load_samples(paths: List[Path]) -> List[int]:
    values = array("q")
    for path in paths:
        with open(path, "rb") as f:
            values.frombytes(f.read())
        path.unlink()
    return sorted(values)


def run_phase(way: str, processes: int, conf: Dict[str, Any], tmp: Path, agent: Optional[Agent]) -> Dict[str, Any]:
    children: List[subprocess.Popen] = []
    samples = []
    try:
        for index in range(processes):
            base = tmp / f"samples-{way}-{processes}-{index}"
            samples.append(base)
            child_conf = dict(conf, way=way, index=index, samples=str(base))
            children.append(
                subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(child_conf)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline().strip()
            if line != "ready":
                child.wait(30)
                raise RuntimeError(f"a {way} worker did not start (exit {child.returncode}): {line!r}")
        agent_cpu0 = agent.cpu_seconds() if agent else 0.0
        start = time.time() + 0.2
        for child in children:
            assert child.stdin is not None
            child.stdin.write(f"go {start!r}\n")
            child.stdin.flush()
        results = []
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline().strip()
            code = child.wait(120)
            if code != 0 or not line:
                raise RuntimeError(f"a {way} worker failed (exit {code}); see its stderr above")
            results.append(json.loads(line))
        agent_cpu = (agent.cpu_seconds() if agent else 0.0) - agent_cpu0
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    metric_ns = load_samples([Path(f"{s}.metric") for s in samples])
    trade_ns = load_samples([Path(f"{s}.trade") for s in samples])
    events = sum(r["events"] for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    row: Dict[str, Any] = {
        "kind": "python",
        "way": way,
        "label": LABELS[way],
        "processes": processes,
        "events": events,
        "secs": round(span, 3),
        "events_per_sec": events / span if span > 0 else 0.0,
        "cpu_us_per_event": cpu * 1e6 / events if events else None,
        "call_p50_us": percentile(metric_ns, 0.50) / 1000,
        "call_p99_us": percentile(metric_ns, 0.99) / 1000,
        "call_p999_us": percentile(metric_ns, 0.999) / 1000,
        "trade_call_p50_us": percentile(trade_ns, 0.50) / 1000,
        "trade_call_p99_us": percentile(trade_ns, 0.99) / 1000,
        "metric_calls": len(metric_ns),
        "not_acked": sum(r["other"] for r in results),
        "window": conf["window"],
    }
    if way in CLIENT_WAYS:
        row["agent_cpu_us_per_event"] = agent_cpu * 1e6 / events if events else None
        stats = [r.get("client_stats", {}) for r in results]
        row["agent_acked_total"] = sum(s.get("acked", 0) for s in stats)
        row["spooled"] = sum(s.get("spooled", 0) for s in stats)
        row["resent"] = sum(s.get("resent", 0) for s in stats)
        rtt = [s["ack_rtt_p99_ms"] for s in stats if s.get("ack_rtt_p99_ms") is not None]
        row["ack_rtt_p99_ms"] = max(rtt) if rtt else None
    return row


def wait_for_sink(db: Database, expected: int) -> Optional[float]:
    """After a client phase: let the agent's MySQL sink write what it acked before the next phase measures.
    Returns how long that took (None: not within CATCH_UP_SECS)."""
    started = time.monotonic()
    rows = db.rows()
    while rows < expected and time.monotonic() - started < CATCH_UP_SECS:
        time.sleep(0.25)
        rows = db.rows()
    took = time.monotonic() - started
    if rows < expected:
        progress(f"  the agent's MySQL sink has {rows} of {expected} rows after {took:.0f} s; going on anyway")
        return None
    progress(f"  the agent's MySQL sink caught up ({rows} rows) {took:.1f} s after the last ack")
    return took


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def print_table(rows: List[Dict[str, Any]]) -> None:
    header = (
        "| way | processes | events | secs | events/s | script CPU µs/event | metric() p50 µs | metric() p99 µs "
        "| trade() p99 µs | agent CPU µs/event | load avg |"
    )
    print()
    print(header)
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = r["cpu_us_per_event"]
        agent_cpu = r.get("agent_cpu_us_per_event")
        print(
            f"| {SHORT[r['way']]} | {r['processes']} | {fmt_int(r['events'])} | {r['secs']:.1f} | "
            f"{fmt_int(r['events_per_sec'])} | {'-' if cpu is None else f'{cpu:.1f}'} | {r['call_p50_us']:.1f} | "
            f"{r['call_p99_us']:.1f} | {r['trade_call_p99_us']:.1f} | "
            f"{'-' if agent_cpu is None else f'{agent_cpu:.1f}'} | {r['loadavg_before']:.1f} |"
        )
    print()
    for way in WAYS:
        print(f"{SHORT[way]}: {LABELS[way]}")
    for r in rows:
        if r.get("note"):
            print(f"{SHORT[r['way']]} with {r['processes']} processes: {r['note']}")
    print(
        "events/s: durable events per second (rows committed by the flusher, or acked by the agent), summed over the "
        "processes; script CPU: the script processes' own user+sys (background threads included) per event; metric() "
        "p50/p99: wall time of the call, pooled over all processes; agent CPU: the agent's user+sys per acked event "
        "(ingest, WAL, MySQL and Redis sinks); load avg: the machine's 1-minute load average before the phase."
    )


def targets(rows: List[Dict[str, Any]]) -> List[str]:
    by = {(r["way"], r["processes"]): r for r in rows}
    lines = []

    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    for (way, processes), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        if way not in CLIENT_WAYS:
            continue
        p99 = r["call_p99_us"]
        lines.append(
            f"metric() p99 < {TARGET_P99_US:.0f} µs, (c) with {processes} process(es): {p99:.1f} µs = "
            f"{p99 / TARGET_P99_US:.2f}x the target: {verdict(p99 < TARGET_P99_US)}"
        )
        old = by.get(("old", processes))
        if old and old["cpu_us_per_event"] and r["cpu_us_per_event"]:
            share = r["cpu_us_per_event"] / old["cpu_us_per_event"]
            lines.append(
                f"script CPU per event (c) ≤ 1/5 of (a)'s, {processes} process(es): {r['cpu_us_per_event']:.1f} ÷ "
                f"{old['cpu_us_per_event']:.1f} µs = {share:.2f} (target ≤ {TARGET_CPU_RATIO:.2f}): "
                f"{verdict(share <= TARGET_CPU_RATIO)}"
            )
        if processes == 1:
            rate = r["events_per_sec"]
            lines.append(
                f"one process ≥ {fmt_int(TARGET_ONE_PROCESS_PER_S)} acked events/s: {fmt_int(rate)}/s = "
                f"{rate / TARGET_ONE_PROCESS_PER_S:.2f}x the target: {verdict(rate >= TARGET_ONE_PROCESS_PER_S)}"
            )
    return lines


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return 0
    if len(sys.argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    import mysql.connector
    import redis

    secs = float(setting("BENCH_SECS", "10", "2"))
    procs = [int(p) for p in setting("BENCH_PROCS", "1,30", "1,4").split(",") if p.strip()]
    ways = [w.strip() for w in setting("BENCH_WAYS", ",".join(WAYS), ",".join(WAYS)).split(",") if w.strip()]
    window = int(setting("BENCH_WINDOW", "2000", "2000"))
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        print(f"python bench: unknown way(s) {unknown}; choose from {WAYS}", file=sys.stderr)
        return 2
    if set(ways) & set(CLIENT_WAYS) and not os.access(AGENT_BIN, os.X_OK):
        print(
            f"python bench: no agent binary at {AGENT_BIN}: cargo build --release -p telemetry-agent "
            "(or set TELEMETRY_AGENT_BIN)",
            file=sys.stderr,
        )
        return 1
    # mysql.connector falls back to its pure-Python implementation when its C extension cannot load (on Debian 12
    # it needs a newer OpenSSL than the system has): say which one the old ways ran with.
    connector = f"{mysql.connector.__version__} ({'C extension' if mysql.connector.HAVE_CEXT else 'pure Python'})"
    progress(
        f"Python {platform.python_version()}, mysql-connector-python {connector}, redis-py {redis.__version__}; "
        f"{secs:g} s per phase, processes {procs}, window (c) {window}; MySQL at {MYSQL_URL.split('@')[-1]}, Redis at "
        f"{REDIS_URL.split('@')[-1]}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-py-"))
    redis_prefix = f"bench_py_{secrets.token_hex(4)}"
    db: Optional[Database] = None
    agents: Dict[str, Agent] = {}
    rows: List[Dict[str, Any]] = []
    try:
        db = Database()
        db.migrate(tmp)
        progress(f"database {db.name}, Redis prefix {redis_prefix}:, temp dir {tmp}")
        for way in CLIENT_WAYS:
            if way in ways:
                agents[way] = Agent(tmp / f"agent-{way}", db.url if way == "client" else None, redis_prefix)
                agents[way].start()
                progress(
                    f"agent for {SHORT[way]} running ({'MySQL and Redis sinks on' if way == 'client' else 'no sinks'})"
                )
        conf = {
            "mysql": db.params,
            "database": db.name,
            "redis_url": REDIS_URL,
            "redis_prefix": redis_prefix,
            "secs": secs,
        }
        phase, phases = 0, len(procs) * len(ways)
        for processes in procs:
            for way in ways:
                phase += 1
                db.truncate()
                loadavg = os.getloadavg()[0]
                phase_conf = dict(conf, window=QUEUED_WINDOWS.get(way, window), pool_size=POOL_SIZE)
                agent = agents.get(way)
                if agent is not None:
                    phase_conf.update(socket=agent.socket, spool_dir=str(agent.spool_dir))
                note = ""
                if way == "pool":
                    # 30 scripts with a pool of 5 each need 150 connections: MariaDB's default max_connections
                    # is 151. Take what the server has room for and say so.
                    room = db.connection_room()
                    if room < POOL_SIZE * processes:
                        phase_conf["pool_size"] = max(1, min(POOL_SIZE, room // processes))
                        note = (
                            f"pool of {phase_conf['pool_size']} per process, not {POOL_SIZE}: {processes} x "
                            f"{POOL_SIZE} connections do not fit the server's max_connections "
                            f"({db.max_connections()}) beside those already open"
                        )
                        progress(f"  {note}")
                progress(f"phase {phase}/{phases}: {LABELS[way]}, {processes} process(es), {secs:g} s ...")
                row = run_phase(way, processes, phase_conf, tmp, agent)
                if way == "pool":
                    row["pool_size"] = phase_conf["pool_size"]
                if note:
                    row["note"] = note
                row["loadavg_before"] = loadavg
                row["quick"] = is_quick()
                row["python"] = platform.python_version()
                row["mysql_connector"] = connector
                row["phase_secs"] = secs
                rows.append(row)
                cpu = row["cpu_us_per_event"]
                progress(
                    f"  {fmt_int(row['events'])} events in {row['secs']:.1f} s = {fmt_int(row['events_per_sec'])}/s; "
                    f"CPU {'-' if cpu is None else f'{cpu:.1f}'} µs/event; metric() p50 {row['call_p50_us']:.1f} µs, "
                    f"p99 {row['call_p99_us']:.1f} µs"
                    + (f"; not acked {row['not_acked']}" if way in CLIENT_WAYS and row["not_acked"] else "")
                )
                if way == "client":
                    row["sink_catch_up_s"] = wait_for_sink(db, row["agent_acked_total"])
    finally:
        for agent in agents.values():
            agent.stop()
        if db is not None:
            try:
                db.drop()
            except Exception as e:
                progress(f"cannot drop database {db.name}: {e!r}")
        try:
            r = redis.Redis.from_url(REDIS_URL)
            keys = list(r.scan_iter(f"{redis_prefix}:*", count=1000))
            for start in range(0, len(keys), 1000):
                r.delete(*keys[start : start + 1000])
            r.close()
        except Exception as e:
            progress(f"cannot delete Redis keys {redis_prefix}:*: {e!r}")
        shutil.rmtree(tmp, ignore_errors=True)

    print_table(rows)
    lines = targets(rows)
    if lines:
        print()
        print("Targets (ratios within this run):")
        for line in lines:
            print(f"- {line}")
    report_dir = os.environ.get("BENCH_REPORT_DIR")
    if report_dir:
        path = Path(report_dir) / "python.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
