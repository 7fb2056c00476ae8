"""A short script: sends COUNT events and exits, with close() ("close") or without ("atexit"). Writes each
event's line (and, with close, its outcome) to OUT."""

from __future__ import annotations

import atexit
import json
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from telemetry_agent import Client

socket_path, spool_dir, out_path, count, mode, tag = sys.argv[1:7]
client = Client(socket_path, spool_dir)
base = datetime(2026, 11, 27, 10, 0, 0, tzinfo=timezone.utc)
pendings = []
for i in range(int(count)):
    if i % 3 == 0:
        pendings.append(
            client.trade(
                f"{tag}",
                "ETHUSDT",
                "sell",
                Decimal(f"{i}.12345678"),
                f"-{i}.5",
                fees=Decimal("0.00000001"),
                opened_at=base,
                closed_at=base + timedelta(microseconds=i),
            )
        )
    else:
        pendings.append(client.metric(f"{tag}", "equity", i + 0.25, ts=base + timedelta(milliseconds=i)))


def record(at_exit: bool) -> None:
    if at_exit:
        # Runs before the client's own exit handler (atexit is last in, first out): shows what was still
        # waiting when the script ended.
        with open(out_path + ".stats", "w") as out:
            json.dump(client.stats(), out)
    with open(out_path, "w") as out:
        for pending in pendings:
            out.write(json.dumps({"status": pending.status, "line": pending.line.decode()}) + "\n")


if mode == "close":
    client.close(timeout=10)
    record(False)
else:
    atexit.register(record, True)
