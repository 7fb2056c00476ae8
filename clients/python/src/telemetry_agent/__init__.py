"""A client of the local telemetry-agent: durable, acknowledged telemetry from trading scripts.

from telemetry_agent import Client
telemetry = Client()
telemetry.metric("p-001", "equity", 10234.5)
"""

from .aio import AsyncClient, AsyncPending
from .client import Client
from .core import Ack, Pending
from .errors import ClientClosed, Dropped, ForkedAway, QueueFull, Refused, TelemetryError, WaitTimeout

__all__ = [
    "Ack",
    "AsyncClient",
    "AsyncPending",
    "Client",
    "ClientClosed",
    "Dropped",
    "ForkedAway",
    "Pending",
    "QueueFull",
    "Refused",
    "TelemetryError",
    "WaitTimeout",
]
__version__ = "0.1.0"
