"""The thread-based client: metric()/trade() validate and enqueue in the caller; one background thread
pipelines the lines over one connection, matches the answers, and spools what the agent cannot take."""

from __future__ import annotations

import atexit
import os
import select
import socket
import threading
import time
import weakref
from typing import Any, Dict, List, Optional

from .core import DROPPED, Core, Options, Pending, PendingBase, Plan, RateLimitedLog, log
from .errors import ClientClosed
from .events import (
    DEFAULT_MAX_FUTURE_SECS,
    DEFAULT_MAX_LINE_BYTES,
    check_event_id,
    metric_line,
    trade_line,
)
from .spool import SpoolWriter

DEFAULT_SOCKET = "/run/telemetry-agent/agent.sock"
DEFAULT_SPOOL = "/var/spool/telemetry-agent"
RECV_BYTES = 16384  # ~230 answers: one recv, then one short parse under the lock

_time_ns = time.time_ns
_monotonic = time.monotonic


class BaseClient:
    """What the sync and asyncio clients share: settings, validation and enqueueing, fork and exit handling."""

    _pending_type: type = Pending

    def __init__(
        self,
        socket_path: Optional[str] = None,
        spool_dir: Optional[str] = None,
        *,
        window: int = 1000,
        max_queued: int = 100_000,
        on_full: str = "block",
        block_timeout: float = 5.0,
        spool_after: float = 5.0,
        max_spool_bytes: int = 64 << 20,
        connect_timeout: float = 1.0,
        reconnect_max: float = 1.0,
        retry_max: float = 1.0,
        atexit_timeout: float = 5.0,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_future_secs: Optional[int] = DEFAULT_MAX_FUTURE_SECS,
    ) -> None:
        self.socket_path = socket_path or os.environ.get("TELEMETRY_AGENT_SOCKET") or DEFAULT_SOCKET
        self.spool_dir = spool_dir or os.environ.get("TELEMETRY_AGENT_SPOOL") or DEFAULT_SPOOL
        self.atexit_timeout = atexit_timeout
        self.max_line_bytes = max_line_bytes
        self.max_future_secs = max_future_secs
        self._core = Core(
            Options(
                window=window,
                max_queued=max_queued,
                on_full=on_full,
                block_timeout=block_timeout,
                spool_after=spool_after,
                connect_timeout=connect_timeout,
                reconnect_max=reconnect_max,
                retry_max=retry_max,
                max_spool_bytes=max_spool_bytes,
            )
        )
        self._spool = SpoolWriter(self.spool_dir, self._core.ids.instance, max_spool_bytes)
        self._errors_log = RateLimitedLog()
        _live_clients.add(self)

    # --- the caller's side: validate, build the line, enqueue -----------------------------------------------

    def metric(
        self,
        profile_id: str,
        name: str,
        value: Any,
        ts: Any = None,
        tags: Optional[Dict[str, Any]] = None,
        *,
        event_id: Optional[str] = None,
    ) -> Any:
        """Queues a metric and returns its Pending at once. `value`: int, float or Decimal (finite); `ts`: an
        aware datetime or int epoch milliseconds (default: now); `tags`: a dict. Raises ValueError/TypeError
        naming the field for invalid input, QueueFull per `on_full`, ClientClosed after close()."""
        now_us = _time_ns() // 1000
        core = self._core
        eid = core.ids.next(now_us) if event_id is None else check_event_id(event_id)
        line = metric_line(profile_id, name, value, ts, tags, eid, now_us, self.max_line_bytes, self.max_future_secs)
        return self._enqueue(eid, line)

    def trade(
        self,
        profile_id: str,
        symbol: str,
        side: str,
        quantity: Any,
        price: Any,
        pnl: Any = None,
        fees: Any = None,
        opened_at: Any = None,
        closed_at: Any = None,
        meta: Optional[Dict[str, Any]] = None,
        *,
        event_id: Optional[str] = None,
    ) -> Any:
        """Queues a trade and returns its Pending at once. Decimals (`quantity`, `price`, `pnl`, `fees`):
        Decimal or str keep their digits exactly, int and float are accepted; all must fit DECIMAL(24,8).
        Times: aware datetime or int epoch milliseconds; `closed_at` defaults to now."""
        now_us = _time_ns() // 1000
        core = self._core
        eid = core.ids.next(now_us) if event_id is None else check_event_id(event_id)
        line = trade_line(
            profile_id,
            symbol,
            side,
            quantity,
            price,
            pnl,
            fees,
            opened_at,
            closed_at,
            meta,
            eid,
            now_us,
            self.max_line_bytes,
            self.max_future_secs,
        )
        return self._enqueue(eid, line)

    def _enqueue(self, event_id: str, line: bytes) -> Any:
        raise NotImplementedError

    def _dropped(self, pending: PendingBase) -> None:
        self._core.drops_log.warning(
            "drop", "telemetry-agent client: event dropped, the queue is full (on_full='drop'); see stats()['dropped']"
        )

    def stats(self) -> Dict[str, Any]:
        """Counters since this client started (or since fork, in a child): enqueued, sent (lines written,
        resends included), acked, spooled, resent, retried (wal_full/overloaded/internal answers), refused (by
        code), dropped, queued (held in memory now), in_flight, connects, connect_failures, spool_files (made),
        spool_bytes (of this client not yet drained), ack_rtt_p50_ms, ack_rtt_p99_ms (of the last 4096 acks)."""
        result = self._core.stats()
        result["spool_files"] = self._spool.files_made
        result["spool_bytes"] = self._spool.bytes_in_use(False)
        return result

    def _write_spool(self, batch: List[PendingBase]) -> None:
        core = self._core
        final = core.closing and _monotonic() >= core.flush_until
        error = self._spool.append([pending.line for pending in batch], beyond_cap=final)
        with core.lock:
            core.on_spooled(batch, error, _monotonic())
        if error is not None:
            self._errors_log.warning("spool", "telemetry-agent client: %s; events stay in memory", error)

    def _spool_all_now(self) -> None:
        """In the calling thread, with no driver running: everything not acked goes to the spool, the file is
        handed over, and the client is closed. For close() of a client whose driver never ran or is gone, and
        for the asyncio client at exit (its loop is gone by then)."""
        core = self._core
        while True:
            with core.lock:
                core.closing = True
                core.flush_until = 0.0
                plan = core.plan(_monotonic())
                if plan.kind == Plan.DISCONNECT:
                    # The connection belongs to a driver that no longer runs: only its lines come back.
                    core.on_disconnected(_monotonic(), unreachable=True)
                    continue
            if plan.kind != Plan.SPOOL:
                break
            self._write_spool(plan.batch)
        self._spool.hand_over()
        with core.lock:
            if not core.closed:
                core.finish_close("dropped: the client closed before the event could be acked or spooled")
        _unregister(self)

    def _after_fork_in_child(self) -> None:
        raise NotImplementedError

    def _close_at_exit(self, deadline: float) -> None:
        raise NotImplementedError


class Client(BaseClient):
    """A client of the local telemetry-agent, for threads (thread-safe, fork-safe).

    `metric()`/`trade()` return a `Pending` at once; a background thread sends the events over one connection
    (at most `window` unanswered lines), resends unanswered ones with the same `event_id` after a broken
    connection, retries `wal_full`/`overloaded`/`internal` with backoff, and writes the events to the spool
    (`spool_dir`) when the agent cannot be reached or an event waited longer than `spool_after` seconds. At
    most `max_queued` events are held in memory; beyond that `on_full` decides: "block" (wait up to
    `block_timeout`, then raise QueueFull), "raise" (QueueFull at once) or "drop" (counted, logged).
    At exit, whatever is not acked goes to the spool within `atexit_timeout` seconds.
    """

    def __init__(self, socket_path: Optional[str] = None, spool_dir: Optional[str] = None, **options: Any) -> None:
        super().__init__(socket_path, spool_dir, **options)
        self._thread: Optional[threading.Thread] = None
        self._sock: Optional[socket.socket] = None
        self._out: Any = b""  # bytes of sent lines the socket has not taken yet
        self._wake_r, self._wake_w = _wake_pipe()

    def _enqueue(self, event_id: str, line: bytes) -> Pending:
        core = self._core
        pending = Pending(core, event_id, line, _monotonic())
        with core.lock:
            wake = core.enqueue(pending, may_block=True)
            if self._thread is None:
                self._start()
        if wake:
            _wake(self._wake_w)
        elif pending.state == DROPPED:
            self._dropped(pending)
        return pending

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="telemetry-agent-client", daemon=True)
        self._thread.start()

    def flush(self, timeout: Optional[float] = 30.0) -> None:
        """Waits until every event queued before this call is acked, spooled or failed (WaitTimeout after
        `timeout` seconds). Failed events raise only from their own Pending."""
        core = self._core
        with core.lock:
            pendings = core.unresolved_snapshot()
        core.wait_for(pendings, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Flushes, then spools whatever is not acked, hands the spool file over, and stops; returns within
        `timeout` seconds. Later metric()/trade() calls raise ClientClosed."""
        self._begin_close(_monotonic() + timeout)
        self._end_close(_monotonic() + timeout)

    def _begin_close(self, deadline: float) -> None:
        core = self._core
        with core.lock:
            if core.closing:
                return
            core.closing = True
            now = _monotonic()
            # Most of the time to get acks; the rest (at most a second) to write what is left to the spool.
            core.flush_until = deadline - min(1.0, max(0.0, deadline - now) * 0.2)
            core.cond.notify_all()  # producers blocked on a full queue
            started = self._thread is not None
        if started:
            _wake(self._wake_w)

    def _end_close(self, deadline: float) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - _monotonic()))
            if thread.is_alive():
                return  # still syncing the spool past our deadline; it finishes on its own (a daemon thread)
        with self._core.lock:
            if self._core.closed:
                _unregister(self)
                return
        # Never started (or it died): write what is queued to the spool right here.
        self._spool_all_now()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the driver: one thread, one connection ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._drive()
        finally:
            self._disconnect(unreachable=False)
            with self._core.lock:
                if self._core.closing and not self._core.closed:
                    self._core.finish_close("dropped: the client closed before the event could be acked or spooled")

    def _drive(self) -> None:
        core = self._core
        poller = None
        while True:
            try:
                with core.lock:
                    plan = core.plan(_monotonic())
                kind = plan.kind
                if kind == Plan.STOP:
                    self._spool.hand_over()
                    return
                if kind == Plan.CONNECT:
                    poller = self._connect()
                elif kind == Plan.DISCONNECT:
                    self._disconnect(plan.unreachable)
                    poller = None
                elif kind == Plan.SPOOL:
                    self._write_spool(plan.batch)
                elif kind == Plan.WAIT:
                    _wait_readable(self._wake_r, plan.timeout)
                elif poller is not None:
                    self._exchange(poller, plan)
                else:  # IO without a socket cannot happen; be safe
                    self._disconnect(unreachable=False)
            except Exception as e:  # a bug must not kill the only thread that delivers events
                self._errors_log.warning("driver", "telemetry-agent client: unexpected error: %r", e)
                self._disconnect(unreachable=False)
                poller = None
                time.sleep(0.1)

    def _connect(self) -> Optional[Any]:
        core = self._core
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(core.options.connect_timeout)
            sock.connect(self.socket_path)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            with core.lock:
                core.on_connect_failed(_monotonic())
            self._errors_log.warning(
                "connect",
                "telemetry-agent client: cannot reach %s (%s); spooling to %s",
                self.socket_path,
                e,
                self.spool_dir,
            )
            return None
        self._sock = sock
        # Reaching the agent hands the spool over: it drains the file we close now.
        self._spool.hand_over()
        with core.lock:
            core.on_connected(_monotonic())
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        return poller

    def _disconnect(self, unreachable: bool) -> None:
        self._out = b""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        with self._core.lock:
            self._core.on_disconnected(_monotonic(), unreachable)

    def _exchange(self, poller: Any, plan: Plan) -> None:
        """Hands the plan's lines to the socket and reads answers, waiting at most `plan.timeout` for the socket
        (then the caller plans again). Bytes the socket did not take yet stay in `_out`, sent first next time:
        the agent must get every line the core counts as sent, in order."""
        sock = self._sock
        assert sock is not None
        core = self._core
        out = memoryview(self._out + plan.data) if self._out else memoryview(plan.data)
        self._out = b""
        sock_fd = sock.fileno()
        timeout_ms = None if plan.timeout is None else max(0, int(plan.timeout * 1000) + 1)
        while True:
            if out:
                try:
                    sent = sock.send(out)
                    out = out[sent:]
                except BlockingIOError:
                    pass
                except OSError:
                    self._disconnect(unreachable=False)
                    return
            poller.modify(sock_fd, select.POLLIN | select.POLLOUT if out else select.POLLIN)
            events = poller.poll(timeout_ms)
            if not events and out:
                self._out = bytes(out)
                return
            for fd, event in events:
                if fd == self._wake_r:
                    _drain_pipe(self._wake_r)
                    continue
                if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    try:
                        data = sock.recv(RECV_BYTES)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._disconnect(unreachable=False)
                        return
                    with core.lock:
                        reason = core.on_answers(data, _monotonic())
                    if reason is not None:
                        if reason != "shutting_down" and reason != "line_too_long":
                            self._errors_log.warning("protocol", "telemetry-agent client: %s", reason)
                        self._disconnect(unreachable=reason == "shutting_down")
                        return
            if not out:
                return

    # --- fork and exit -----------------------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """Runs in the child right after fork(): no thread, no connection, nothing of the parent's queue."""
        core = self._core
        core.after_fork_in_child()
        self._thread = None
        sock, self._sock = self._sock, None
        self._out = b""
        if sock is not None:
            sock.close()  # the child's copy only; the parent's connection stays up
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r, self._wake_w = _wake_pipe()
        self._spool.after_fork_in_child(core.ids.instance)

    def _close_at_exit(self, deadline: float) -> None:
        self._begin_close(deadline)


def _wake_pipe() -> tuple:
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return read_fd, write_fd


def _wake(write_fd: int) -> None:
    try:
        os.write(write_fd, b"x")
    except (BlockingIOError, OSError):
        pass  # full: the driver is awake anyway


def _drain_pipe(read_fd: int) -> None:
    try:
        while os.read(read_fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _wait_readable(fd: int, timeout: Optional[float]) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if poller.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)):
        _drain_pipe(fd)


# --- every live client, for fork and exit ------------------------------------------------------------------------

_live_clients: weakref.WeakSet[BaseClient] = weakref.WeakSet()


def _unregister(client: BaseClient) -> None:
    _live_clients.discard(client)


def _after_fork_in_child() -> None:
    for client in list(_live_clients):
        client._after_fork_in_child()


def _close_all_at_exit() -> None:
    clients = list(_live_clients)
    if not clients:
        return
    deadline = _monotonic() + max(client.atexit_timeout for client in clients)
    starts = [(client, _monotonic() + client.atexit_timeout) for client in clients]
    for client, own_deadline in starts:
        try:
            client._close_at_exit(min(deadline, own_deadline))
        except Exception as e:
            log.warning("telemetry-agent client: closing at exit failed: %r", e)
    for client, own_deadline in starts:
        try:
            if isinstance(client, Client):
                client._end_close(min(deadline, own_deadline))
        except Exception as e:
            log.warning("telemetry-agent client: closing at exit failed: %r", e)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)

__all__ = ["Client", "ClientClosed"]
