"""The sans-IO core shared by the sync and asyncio clients: the queue, the window of unanswered lines, matching
answers to events, retry and spool decisions, and the counters. The drivers (`client.py`, `aio.py`) only do I/O:
they ask `plan()` what to do next and report what happened."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional

from .errors import ClientClosed, Dropped, ForkedAway, QueueFull, Refused, WaitTimeout
from .events import EventIds

log = logging.getLogger("telemetry_agent")

# A Pending's state.
QUEUED, ACKED, SPOOLED, REFUSED, DROPPED = range(5)

RETRIED_CODES = frozenset({"wal_full", "overloaded", "internal"})
REFUSED_CODES = frozenset({"invalid_json", "invalid_event", "line_too_long"})
ON_FULL_POLICIES = ("block", "raise", "drop")

_OK_PREFIX = b'{"ok":true,"seq":'
_OK_PREFIX_LEN = len(_OK_PREFIX)
# Answers handled per lock hold: keeps the driver's CPU bursts (and so metric()'s waits) short.
ANSWER_CHUNK = 256
# Bytes handed to one send: a few hundred lines.
SEND_CHUNK_BYTES = 128 * 1024
SPOOL_GROUP_BYTES = 1 << 20


class Ack:
    """An event's good outcome: `status` is "acked" (durable in the agent's WAL; `seq` set) or "spooled"
    (durable in this client's spool file, which the agent drains; `seq` is None)."""

    __slots__ = ("status", "event_id", "seq")

    def __init__(self, status: str, event_id: str, seq: Optional[int]) -> None:
        self.status = status
        self.event_id = event_id
        self.seq = seq

    def __repr__(self) -> str:
        return f"Ack(status={self.status!r}, event_id={self.event_id!r}, seq={self.seq!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ack) and (self.status, self.event_id, self.seq) == (
            other.status,
            other.event_id,
            other.seq,
        )

    def __hash__(self) -> int:
        return hash((self.status, self.event_id, self.seq))


class PendingBase:
    """One event on its way. `event_id` is known at once; the outcome once the agent answered or the event
    was spooled."""

    __slots__ = ("_core", "_fork_gen", "event_id", "line", "state", "seq", "code", "error", "enqueued_at", "sent_at")

    def __init__(self, core: Core, event_id: str, line: bytes, now: float) -> None:
        self._core = core
        self._fork_gen = core.fork_gen
        self.event_id = event_id
        self.line = line
        self.state = QUEUED
        self.seq: Optional[int] = None
        self.code: Optional[str] = None
        self.error: Optional[str] = None
        self.enqueued_at = now
        self.sent_at = 0.0

    def done(self) -> bool:
        """Whether the outcome is known (acked, spooled, refused or dropped)."""
        return self.state != QUEUED or self._fork_gen != self._core.fork_gen

    @property
    def status(self) -> str:
        """ "queued", "acked", "spooled", "refused" or "dropped"."""
        return ("queued", "acked", "spooled", "refused", "dropped")[self.state]

    def result(self) -> Ack:
        """The Ack if the event is acked or spooled; raises Refused/Dropped, or WaitTimeout if still on its way."""
        state = self.state
        if state == ACKED:
            return Ack("acked", self.event_id, self.seq)
        if state == SPOOLED:
            return Ack("spooled", self.event_id, None)
        if state == REFUSED:
            raise Refused(self.code or "", self.error or "", self.event_id)
        if state == DROPPED:
            raise Dropped(self.error or "dropped", self.event_id)
        if self._fork_gen != self._core.fork_gen:
            raise ForkedAway(f"event {self.event_id} was queued by the parent process before fork()")
        raise WaitTimeout(f"event {self.event_id} is not acked or spooled yet")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.event_id} {self.status}>"


class Pending(PendingBase):
    """Returned by `Client.metric()`/`trade()`."""

    __slots__ = ()

    def wait(self, timeout: Optional[float] = 30.0) -> Ack:
        """Blocks until the event is acked or spooled (returns the Ack) or fails (raises Refused or Dropped);
        raises WaitTimeout after `timeout` seconds (None: no limit)."""
        if self.state == QUEUED and self._fork_gen == self._core.fork_gen:
            self._core.wait_for([self], timeout)
        return self.result()


class Plan:
    """What a driver does next: `kind` is one of the constants below."""

    STOP, CONNECT, DISCONNECT, SPOOL, IO, WAIT = range(6)
    __slots__ = ("kind", "data", "batch", "timeout", "unreachable")

    def __init__(
        self,
        kind: int,
        data: bytes = b"",
        batch: Optional[List[PendingBase]] = None,
        timeout: Optional[float] = None,
        unreachable: bool = False,
    ) -> None:
        self.kind = kind
        self.data = data
        self.batch = batch or []
        self.timeout = timeout
        self.unreachable = unreachable


class RateLimitedLog:
    """At most one record per `interval` seconds per key; the count of the ones held back goes with the next."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: Dict[str, float] = {}
        self._held: Dict[str, int] = {}

    def warning(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            message += " (%d similar messages held back)"
            args = (*args, held)
        log.warning(message, *args)


class Options:
    """The client's settings (see Client's docstring)."""

    __slots__ = (
        "window",
        "max_queued",
        "on_full",
        "block_timeout",
        "spool_after",
        "connect_timeout",
        "reconnect_max",
        "retry_max",
        "max_spool_bytes",
    )

    def __init__(
        self,
        window: int,
        max_queued: int,
        on_full: str,
        block_timeout: float,
        spool_after: float,
        connect_timeout: float,
        reconnect_max: float,
        retry_max: float,
        max_spool_bytes: int,
    ) -> None:
        if on_full not in ON_FULL_POLICIES:
            raise ValueError(f"on_full must be one of {ON_FULL_POLICIES}, not {on_full!r}")
        if window < 1 or max_queued < 1:
            raise ValueError("window and max_queued must be at least 1")
        self.window = window
        self.max_queued = max_queued
        self.on_full = on_full
        self.block_timeout = block_timeout
        self.spool_after = spool_after
        self.connect_timeout = connect_timeout
        self.reconnect_max = reconnect_max
        self.retry_max = retry_max
        self.max_spool_bytes = max_spool_bytes


class Core:
    """Everything a driver decides, guarded by `lock` (the drivers hold it only for short steps)."""

    RTT_SAMPLES = 4096

    def __init__(self, options: Options) -> None:
        self.options = options
        self.fork_gen = 0
        self.on_resolved: Optional[Callable[[], None]] = None
        self.drops_log = RateLimitedLog()
        self._reset()

    def _reset(self) -> None:
        """A fresh state: at construction and in a forked child (which must not touch its parent's events)."""
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.ids = EventIds()
        self.queue: Deque[PendingBase] = deque()  # not yet sent; oldest first
        self.inflight: Deque[PendingBase] = deque()  # sent on this connection, unanswered, in order
        self.retry: Deque[PendingBase] = deque()  # answered wal_full/overloaded/internal: sent again after a pause
        self.in_hand: List[PendingBase] = []  # being written to the spool
        self.unresolved = 0
        self.rx = bytearray()
        self.connected = False
        self.unreachable = False  # the last connect failed or the agent is stopping: spool what is queued
        self.next_connect_at = 0.0
        self.connect_backoff = 0.0
        self.paused_until = 0.0
        self.retry_backoff = 0.0
        self.spool_blocked_until = 0.0  # the spool is full or failing: keep events in memory until then
        # A spool file holds events: keep trying to connect even when idle, as connecting hands the file over.
        self.spool_open = False
        self.driver_sleeping = False
        self.closing = False
        self.closed = False
        self.flush_until = 0.0  # when closing: from then on, spool everything not acked
        self.final_spool_failed = False
        self.counters: Dict[str, int] = dict.fromkeys(
            (
                "enqueued",
                "sent",
                "acked",
                "spooled",
                "resent",
                "retried",
                "dropped",
                "connects",
                "connect_failures",
            ),
            0,
        )
        self.refused: Dict[str, int] = {}
        self.rtts: Deque[float] = deque(maxlen=self.RTT_SAMPLES)

    def after_fork_in_child(self) -> None:
        """In a forked child: new locks, a new instance id, nothing queued, counters at zero. The parent's
        Pendings then report ForkedAway instead of waiting forever. No logging here (its locks may be held)."""
        self.fork_gen += 1
        closed = self.closed
        self._reset()
        self.closed = closed

    # --- the caller's side -------------------------------------------------------------------------------------

    def enqueue(self, pending: PendingBase, may_block: bool) -> bool:
        """Adds an event (called with the lock held); applies `on_full` when `max_queued` events are held.
        Returns whether the driver sleeps and must be woken. Raises QueueFull or ClientClosed."""
        if self.closing:
            raise ClientClosed("the client is closed")
        options = self.options
        if self.unresolved >= options.max_queued:
            policy = options.on_full
            if policy == "block" and may_block:
                deadline = time.monotonic() + options.block_timeout
                while self.unresolved >= options.max_queued and not self.closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise QueueFull(
                            f"{self.unresolved} events wait (max_queued) and none left within "
                            f"block_timeout ({options.block_timeout} s): the agent and the spool are both unavailable"
                        )
                    self.cond.wait(remaining)
                if self.closing:
                    raise ClientClosed("the client is closed")
            elif policy == "drop":
                self.counters["dropped"] += 1
                pending.state = DROPPED
                pending.error = f"dropped: the queue was full ({options.max_queued} events, on_full='drop')"
                return False
            else:
                raise QueueFull(f"{self.unresolved} events wait (max_queued): the agent and the spool are unavailable")
        self.queue.append(pending)
        self.unresolved += 1
        self.counters["enqueued"] += 1
        if self.driver_sleeping:
            self.driver_sleeping = False
            return True
        return False

    def wait_for(self, pendings: List[PendingBase], timeout: Optional[float]) -> None:
        """Blocks (threads) until every one of `pendings` is resolved; WaitTimeout after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            for pending in pendings:
                while pending.state == QUEUED and pending._fork_gen == self.fork_gen:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise WaitTimeout(f"event {pending.event_id} is not acked or spooled yet")
                    self.cond.wait(remaining)

    def unresolved_snapshot(self) -> List[PendingBase]:
        """Every event not yet resolved (called with the lock held): what flush() waits for."""
        return [*self.in_hand, *self.inflight, *self.retry, *self.queue]

    def stats(self) -> Dict[str, Any]:
        with self.lock:
            result: Dict[str, Any] = dict(self.counters)
            result["queued"] = self.unresolved
            result["in_flight"] = len(self.inflight)
            result["refused"] = dict(self.refused)
            rtts = sorted(self.rtts)
            result["connected"] = self.connected
        if rtts:
            result["ack_rtt_p50_ms"] = rtts[len(rtts) // 2] * 1000
            result["ack_rtt_p99_ms"] = rtts[min(len(rtts) - 1, (len(rtts) * 99) // 100)] * 1000
        else:
            result["ack_rtt_p50_ms"] = result["ack_rtt_p99_ms"] = None
        return result

    # --- the driver's side (every method below: called with the lock held) -----------------------------------

    def _resolved(self, count: int) -> None:
        self.unresolved -= count
        self.cond.notify_all()
        if self.on_resolved is not None:
            self.on_resolved()

    def _oldest_wait_start(self) -> Optional[float]:
        oldest = None
        for part in (self.inflight, self.retry, self.queue):
            if part:
                at = part[0].enqueued_at
                oldest = at if oldest is None or at < oldest else oldest
        return oldest

    def plan(self, now: float) -> Plan:
        """The next step. Moves the events of a SPOOL plan into `in_hand`, and those of an IO plan into
        `inflight`."""
        self.driver_sleeping = False
        options = self.options
        if self.closing:
            if self.unresolved == 0:
                return Plan(Plan.STOP)
            if now >= self.flush_until:
                if self.final_spool_failed:
                    return Plan(Plan.STOP)
                if self.connected:
                    return Plan(Plan.DISCONNECT, unreachable=True)
                return self._spool_plan(now, final=True) or Plan(Plan.STOP)
        has_work = bool(self.queue or self.retry or self.inflight)
        if not self.connected:
            if (has_work or self.spool_open) and now >= self.next_connect_at:
                return Plan(Plan.CONNECT)
            if self.unreachable or (self.closing and now >= self.flush_until):
                spool = self._spool_plan(now, final=False)
                if spool is not None:
                    return spool
            if not has_work:
                self.driver_sleeping = True
                idle = max(0.0, self.next_connect_at - now) if self.spool_open else None
                return Plan(Plan.WAIT, timeout=self._closing_timeout(now, idle))
            timeout = max(0.0, self.next_connect_at - now)
            if self.spool_blocked_until > now and self.unreachable:
                timeout = min(timeout, self.spool_blocked_until - now)
            return Plan(Plan.WAIT, timeout=self._closing_timeout(now, timeout))
        # Connected: an event that waited too long means the agent is stuck for us; the spool is faster.
        oldest = self._oldest_wait_start()
        if oldest is not None and now - oldest > options.spool_after and self.spool_blocked_until <= now:
            return Plan(Plan.DISCONNECT, unreachable=True)
        data = self._take_to_send(now)
        if not data and not self.queue and not self.retry:
            self.driver_sleeping = True
        timeouts = []
        if oldest is not None:
            timeouts.append(max(0.0, oldest + options.spool_after - now) + 0.001)
        if self.retry and self.paused_until > now:
            timeouts.append(self.paused_until - now)
        timeout = min(timeouts) if timeouts else None
        return Plan(Plan.IO, data=data, timeout=self._closing_timeout(now, timeout))

    def _closing_timeout(self, now: float, timeout: Optional[float]) -> Optional[float]:
        if not self.closing:
            return timeout
        until_flush_end = max(0.0, self.flush_until - now)
        return until_flush_end if timeout is None else min(timeout, until_flush_end)

    def _take_to_send(self, now: float) -> bytes:
        room = self.options.window - len(self.inflight)
        if room <= 0:
            return b""
        lines: List[bytes] = []
        size = 0
        inflight = self.inflight
        sources = (self.retry, self.queue) if self.paused_until <= now else (self.queue,) if not self.retry else ()
        for source in sources:
            while source and room > 0 and size < SEND_CHUNK_BYTES:
                pending = source.popleft()
                pending.sent_at = now
                inflight.append(pending)
                lines.append(pending.line)
                size += len(pending.line)
                room -= 1
        self.counters["sent"] += len(lines)
        return b"".join(lines)

    def _spool_plan(self, now: float, final: bool) -> Optional[Plan]:
        """A group of events to write to the spool, or None. `final` (closing): everything, whatever the cap."""
        if not final and self.spool_blocked_until > now:
            return None
        batch: List[PendingBase] = []
        size = 0
        for source in (self.inflight, self.retry, self.queue):
            while source and size < SPOOL_GROUP_BYTES:
                pending = source.popleft()
                batch.append(pending)
                size += len(pending.line)
        if not batch:
            return None
        self.in_hand = batch
        return Plan(Plan.SPOOL, batch=batch)

    def on_spooled(self, batch: List[PendingBase], error: Optional[str], now: float) -> None:
        """A SPOOL plan's outcome: `error` None means the group is synced (the events are safe)."""
        self.in_hand = []
        if error is None:
            self.spool_open = True
            for pending in batch:
                pending.state = SPOOLED
            self.counters["spooled"] += len(batch)
            self._resolved(len(batch))
            return
        # Full or failing: keep them in memory (the oldest first) and try again later.
        self.queue.extendleft(reversed(batch))
        self.spool_blocked_until = now + 1.0
        if self.closing and now >= self.flush_until:
            self.final_spool_failed = True

    def on_connected(self, now: float) -> None:
        """Connected; the driver has handed its spool file over just before."""
        self.connected = True
        self.spool_open = False
        self.unreachable = False
        self.connect_backoff = 0.0
        self.spool_blocked_until = 0.0
        self.rx.clear()
        self.counters["connects"] += 1

    def on_connect_failed(self, now: float) -> None:
        """The agent is unreachable: from now on what is queued goes to the spool, and connects back off."""
        self.unreachable = True
        self.counters["connect_failures"] += 1
        self.connect_backoff = min(self.options.reconnect_max, max(0.05, self.connect_backoff * 2))
        self.next_connect_at = now + self.connect_backoff

    def on_disconnected(self, now: float, unreachable: bool) -> None:
        """The connection is gone (broken, closed by the agent, or closed by us): every unanswered line goes
        back to the front of the queue, to be resent with its id (or spooled)."""
        if not self.connected:
            return
        self.connected = False
        self.rx.clear()
        resend = list(self.inflight)
        self.inflight.clear()
        if resend:
            self.counters["resent"] += len(resend)
            self.queue.extendleft(reversed(resend))
        if unreachable:
            self.unreachable = True
            self.connect_backoff = min(self.options.reconnect_max, max(0.05, self.connect_backoff * 2))
            self.next_connect_at = now + self.connect_backoff
        else:
            self.next_connect_at = now

    def on_answers(self, data: bytes, now: float) -> Optional[str]:
        """Matches answer lines to the unanswered events, in order. Returns why the connection must be closed
        ("shutting_down", "line_too_long", a protocol error), or None."""
        rx = self.rx
        rx += data
        end = rx.rfind(b"\n")
        if end < 0:
            return None
        lines = bytes(rx[:end]).split(b"\n")
        del rx[: end + 1]
        inflight = self.inflight
        if len(lines) > len(inflight):
            return f"protocol error: {len(lines)} answers for {len(inflight)} unanswered lines"
        resolved = 0
        acked = 0
        rtts = self.rtts
        close_reason = None
        for line in lines:
            pending = inflight[0]
            if line.startswith(_OK_PREFIX):
                comma = line.find(b",", _OK_PREFIX_LEN)
                # The agent echoes the event id: a mismatch means the answers are out of step.
                if line[comma:] != b',"event_id":"' + pending.event_id.encode() + b'"}':
                    return f"protocol error: answer {line[:200]!r} does not match event {pending.event_id}"
                inflight.popleft()
                pending.seq = int(line[_OK_PREFIX_LEN:comma])
                pending.state = ACKED
                rtts.append(now - pending.sent_at)
                acked += 1
                continue
            try:
                answer = json.loads(line)
                code = str(answer["code"])
                error = str(answer.get("error", ""))
            except (ValueError, KeyError, TypeError):
                return f"protocol error: unreadable answer {line[:200]!r}"
            inflight.popleft()
            if code in RETRIED_CODES:
                self.retry.append(pending)
                self.counters["retried"] += 1
                self.retry_backoff = min(self.options.retry_max, max(0.02, self.retry_backoff * 2))
                self.paused_until = now + self.retry_backoff
            elif code == "shutting_down":
                # Not stored: back to the front with every later line; the agent closes the connection.
                inflight.appendleft(pending)
                close_reason = code
                break
            else:
                # invalid_json, invalid_event, line_too_long, or a code this client does not know: sending
                # the same line again cannot help.
                pending.state = REFUSED
                pending.code = code
                pending.error = error
                self.refused[code] = self.refused.get(code, 0) + 1
                resolved += 1
                if code == "line_too_long":
                    close_reason = code
        if acked:
            self.counters["acked"] += acked
            self.retry_backoff = 0.0
        if acked or resolved:
            self._resolved(acked + resolved)
        return close_reason

    def finish_close(self, reason: str) -> None:
        """At the end of close(): whatever could not be acked or spooled is dropped, and said so."""
        left = self.unresolved_snapshot()
        self.in_hand = []
        self.inflight.clear()
        self.retry.clear()
        self.queue.clear()
        for pending in left:
            if pending.state == QUEUED:
                pending.state = DROPPED
                pending.error = reason
        self.counters["dropped"] += len(left)
        self.closed = True
        self._resolved(len(left))
