"""Scenario 7's producer and worker, over qbridge instead of LPUSH/BLPOP.

    python3 prodcons.py produce --count 10     # what the web endpoint did
    python3 prodcons.py work                    # the worker loop

A worker that dies mid-job loses nothing: its unacked job goes back to the
queue and another worker gets it (attempt 2).
"""

import argparse
import json
import os
import sys

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "..", "..", "gen", "python")]

from qbridge_client import Client  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["produce", "work"])
    ap.add_argument("--addr", default=os.environ.get("QBRIDGE_ADDR", "127.0.0.1:7070"))
    ap.add_argument("--queue", default="prodcons")
    ap.add_argument("--count", type=int, default=10, help="jobs to produce, or to handle before exiting (0: forever)")
    a = ap.parse_args()
    with Client(a.addr) as qb:
        if a.mode == "produce":
            for i in range(a.count):
                job_id = qb.enqueue(a.queue, json.dumps({"job": i}), headers={"source": "python"})
                print(f"enqueued {job_id} job {i}", flush=True)
            return 0
        done = 0
        with qb.consume(a.queue, max_in_flight=4) as jobs:
            for d in jobs:
                job = json.loads(d.payload)
                print(f"handled {d.id} job {job['job']} attempt {d.attempt}", flush=True)
                d.ack()
                done += 1
                if a.count and done >= a.count:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
