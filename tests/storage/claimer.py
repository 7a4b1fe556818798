"""A worker process for the concurrency and crash tests (run as ``python -m tests.storage.claimer``).

Modes:
  drain  URL OWNER BATCH           claim and complete until nothing is left; print processed ids
  drain-together URL OWNER BATCH  the same, after printing "ready" and reading a line from stdin
                                  (so several processes start draining at the same moment)
  hang   URL OWNER BATCH LEASE     claim one batch, print its ids, then sleep forever (to be SIGKILLed)
"""

from __future__ import annotations

import json
import sys
import time

from storage import db as dbmod
from storage.queue import Queue, QueuePolicy
from storage.records import Generated


def main() -> None:
    mode, url, owner, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    lease = float(sys.argv[5]) if len(sys.argv) > 5 else 60.0
    q = Queue(dbmod.connect(url), QueuePolicy(lease_seconds=lease, retry_base_seconds=0.01, retry_max_seconds=0.01))
    if mode == "hang":
        claim = q.claim(owner, batch)
        print(json.dumps(claim.ids), flush=True)
        time.sleep(3600)
        return
    if mode == "drain-together":
        q.stats()  # connected
        print("ready", flush=True)
        sys.stdin.readline()
    done: list[int] = []
    idle = 0
    while idle < 3:
        q.reclaim_expired()
        claim = q.claim(owner, batch)
        if not claim.requests:
            idle += 1
            time.sleep(0.05)
            continue
        idle = 0
        done.extend(q.complete_many(claim, [Generated(r.id, [f"{owner}/{r.id}.png"]) for r in claim.requests]))
    print(json.dumps(done), flush=True)


if __name__ == "__main__":
    main()
