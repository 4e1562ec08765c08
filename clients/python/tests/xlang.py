"""Driver of the cross-language tests (internal/crosslang): one mode per run,
results on stdout, one line each."""

import os
import sys

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "..", "..", "gen", "python")]

from qbridge_client import Client, QbridgeError  # noqa: E402


def main() -> int:
    mode, addr = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    tls = {}
    if os.environ.get("XLANG_CA"):
        tls = {"ca_file": os.environ["XLANG_CA"]}
    with Client(addr, timeout=5, token=os.environ.get("XLANG_TOKEN"), **tls) as qb:
        if mode == "produce":  # produce QUEUE N
            for i in range(int(args[1])):
                print("id", qb.enqueue(args[0], f"py-{i}".encode(), headers={"lang": "python"}), flush=True)
        elif mode == "take-and-leave":  # take-and-leave QUEUE: take one, leave without acking
            with qb.consume(args[0], max_in_flight=1) as ds:
                for d in ds:
                    print("took", d.id, d.attempt, d.payload.decode(), flush=True)
                    break
        elif mode == "enqueue-one":  # enqueue-one QUEUE: prints the id, or the error
            try:
                print("id", qb.enqueue(args[0], b"over tls"), flush=True)
            except QbridgeError as e:
                print("error", type(e).__name__, flush=True)
        elif mode == "bad-queue":  # the error an invalid queue name gives
            try:
                qb.enqueue("bad queue{}", b"x")
            except QbridgeError as e:
                print("error", type(e).__name__, e.code.name, flush=True)
        elif mode == "subscribe":  # subscribe CHANNEL N
            with qb.subscribe(args[0]) as sub:
                sub.wait_subscribed()
                print("subscribed", flush=True)
                for i, (ch, payload) in enumerate(sub):
                    print("msg", ch, payload.decode(), flush=True)
                    if i + 1 >= int(args[1]):
                        break
        else:
            print("unknown mode", mode, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
