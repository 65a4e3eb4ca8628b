"""Time billing adds per request: auth + rate limit + hold + settle (+ ledger write), p50 / p99.

Runs the server's own billing path (llmaas.server.billing.ServerBilling: authenticate, admit, finish)
at a paced 100 requests/s, with no model and no HTTP, so what is timed is billing alone. Baselines in the
same run: --no-auth (hold + settle only, no key, no limiter). SQLite always; PostgreSQL when reachable.

    .venv/bin/python benchmarks/billing_overhead.py [--requests 1000] [--rate 100] [--postgres URL]
"""

from __future__ import annotations

import argparse
import platform
import secrets
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from llmaas.billing import FreeGrant, create_account, create_key, open_database, set_price
from llmaas.server.billing import ServerBilling
from llmaas.server.usage import RequestUsage


def run(url: str, auth: bool, requests: int, rate: float) -> list[float]:
    db = open_database(url)
    name = "bench-" + secrets.token_hex(4)
    create_account(db, name, plan="plus", free_grant=FreeGrant(10**12, None))
    key = create_key(db, name, requests_per_minute=10**6, tokens_per_minute=10**9).secret
    if not auth:
        try:
            create_account(db, "default", plan="plus", free_grant=FreeGrant(10**12, None))
        except Exception:
            pass
    set_price(db, "bench-model", input_usd="0.05", cached_input_usd="0.025", output_usd="0.20")
    billing = ServerBilling(db, auth=auth)
    times = []
    start = time.perf_counter()
    for i in range(requests):
        target = start + i / rate
        while (now := time.perf_counter()) < target:
            time.sleep(min(target - now, 0.001))
        t0 = time.perf_counter()
        principal = billing.authenticate(key)
        rid = f"bench-{secrets.token_hex(8)}"
        admission = billing.admit(principal, "bench-model", rid, 100, 200)
        usage = RequestUsage(rid, "bench-model", "chat.completions", 100, 20, 150, "finished", ("stop",))
        billing.finish(admission, usage)
        times.append((time.perf_counter() - t0) * 1000)
    db.close()
    return times


def describe(label: str, times: list[float]) -> str:
    q = statistics.quantiles(times, n=100)
    return f"{label:32s} p50 {statistics.median(times):7.3f} ms   p99 {q[98]:7.3f} ms   (n={len(times)})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d} {machine}, {args.rate}/s")
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = f"sqlite:///{Path(tmp) / 'billing.sqlite3'}"
        print(describe("sqlite, --no-auth (hold+settle)", run(sqlite, False, args.requests, args.rate)))
        print(describe("sqlite, auth+limit+hold+settle", run(sqlite, True, args.requests, args.rate)))
    try:
        print(describe("postgres, --no-auth", run(args.postgres, False, args.requests, args.rate)))
        full = run(args.postgres, True, args.requests, args.rate)
        print(describe("postgres, auth+limit+hold+settle", full))
    except Exception as exc:  # not reachable here
        print(f"postgres skipped: {str(exc).splitlines()[0]}")


if __name__ == "__main__":
    main()
