"""Fork: the parent streams (from two threads, one of them busy while fork() happens) and forks CHILDREN
children that stream too. Each process writes its events' outcomes and its stats to OUTDIR."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from telemetry_agent import Client, ForkedAway

socket_path, spool_dir, out_dir, children, per_process = sys.argv[1:6]
per_process = int(per_process)
client = Client(socket_path, spool_dir)


def write(name: str, pendings: list, extra: dict) -> None:
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as out:
        for pending in pendings:
            out.write(json.dumps({"status": pending.status, "line": pending.line.decode()}) + "\n")
    with open(os.path.join(out_dir, f"{name}.stats"), "w") as out:
        json.dump(dict(client.stats(), **extra), out)


parent_pendings = [client.metric("fork-parent", "before", i) for i in range(per_process)]
busy_pendings: list = []
stop = threading.Event()


def busy() -> None:
    n = 0
    while not stop.is_set():
        busy_pendings.append(client.metric("fork-busy", "n", n))
        n += 1
        if n % 50 == 0:
            time.sleep(0.001)


busy_thread = threading.Thread(target=busy)
busy_thread.start()
pids = []
for child in range(int(children)):
    pid = os.fork()
    if pid == 0:
        inherited = parent_pendings[-1]
        stats_at_start = client.stats()
        try:
            inherited.wait(1)
            inherited_outcome = "resolved"
        except ForkedAway:
            inherited_outcome = "forked_away"
        except Exception as e:
            inherited_outcome = repr(e)
        mine = [client.metric(f"fork-child{child}", "n", i) for i in range(per_process)]
        client.close(timeout=20)
        write(
            f"child{child}",
            mine,
            {"inherited_outcome": inherited_outcome, "enqueued_at_start": stats_at_start["enqueued"]},
        )
        os._exit(0)
    pids.append(pid)
    parent_pendings += [client.metric("fork-parent", "between", child * per_process + i) for i in range(per_process)]
for pid in pids:
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
stop.set()
busy_thread.join()
client.close(timeout=20)
write("parent", parent_pendings + busy_pendings, {})
