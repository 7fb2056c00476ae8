"""The exceptions the client raises. Invalid input raises the built-in ValueError/TypeError instead."""

from __future__ import annotations


class TelemetryError(Exception):
    """Base class of every error the client raises about an event's fate."""


class Refused(TelemetryError):
    """The agent refused the event for its content (`invalid_json`, `invalid_event`, `line_too_long`).

    Sending it again would be refused again, so it is not retried.
    """

    def __init__(self, code: str, error: str, event_id: str) -> None:
        super().__init__(f"{code}: {error} (event_id {event_id})")
        self.code = code
        self.error = error
        self.event_id = event_id


class Dropped(TelemetryError):
    """The event was dropped: the client's queue was full with `on_full="drop"`, or the client was closed
    (or its deadline passed) before the event could be acked or spooled."""

    def __init__(self, reason: str, event_id: str) -> None:
        super().__init__(f"{reason} (event_id {event_id})")
        self.reason = reason
        self.event_id = event_id


class QueueFull(TelemetryError):
    """`metric()`/`trade()` found the queue full (`on_full="raise"`, or `"block"` after `block_timeout`)."""


class WaitTimeout(TelemetryError, TimeoutError):
    """`Pending.wait()` or `flush()` reached its deadline; the event is still on its way."""


class ClientClosed(TelemetryError):
    """The client is closed; it takes no more events."""


class ForkedAway(TelemetryError):
    """The event belongs to the parent process: this `Pending` was created before `fork()`, and the child
    does not send its parent's events (the parent still does)."""
