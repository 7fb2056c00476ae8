"""One process of the stress test: THREADS threads stream metrics and trades for SECONDS; at the end the client
closes (what is not acked goes to the spool) and every event's outcome is written to OUT as JSON lines."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from decimal import Decimal

from telemetry_agent import Client

socket_path, spool_dir, out_path, threads, seconds, tag = sys.argv[1:7]
client = Client(socket_path, spool_dir, spool_after=3.0)
pendings_by_thread = [[] for _ in range(int(threads))]
stop_at = time.monotonic() + float(seconds)


failures: list = []


def stream(index: int) -> None:
    try:
        produce(index)
    except BaseException as e:
        failures.append(repr(e))
        raise


def produce(index: int) -> None:
    rng = random.Random(f"{tag}-{index}")
    own = pendings_by_thread[index]
    profile = f"{tag}-t{index}"
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        if n % 4 == 0:
            quantity = Decimal(rng.randrange(1, 10**12)).scaleb(-8)
            own.append(
                client.trade(
                    profile,
                    "BTC/USDT",
                    rng.choice(("buy", "sell")),
                    quantity,
                    f"{rng.uniform(1, 1e5):.4f}",
                    pnl=round(rng.uniform(-1e3, 1e3), 2),
                )
            )
        else:
            own.append(client.metric(profile, f"m{n % 7}", rng.uniform(-1e9, 1e9), tags={"n": n}))
        if n % 10 == 0:
            time.sleep(0.004)


workers = [threading.Thread(target=stream, args=(i,)) for i in range(int(threads))]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
client.close(timeout=30)
if failures:
    sys.exit(f"a thread failed: {failures}")
with open(out_path, "w") as out:
    for own in pendings_by_thread:
        for pending in own:
            out.write(json.dumps({"status": pending.status, "line": pending.line.decode()}) + "\n")
print(json.dumps(client.stats()))
