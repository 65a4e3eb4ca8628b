"""Time billing adds per request: auth + rate limit + hold + settle (+ ledger write), p50 / p99.

Runs the server's own billing path (llmaas.server.billing.ServerBilling) the way the server calls it:
on an asyncio event loop, the key from the in-process cache (a database read on a miss), admission
(limiter + hold) and settlement (usage record + ledger charge, committed) each in a worker thread. No
model and no HTTP, so what is timed is billing alone. Open loop at --rate requests/s per configuration.

Configurations, taking turns in rounds so that all of them see the same machine load:

    sqlite --no-auth            hold + settle only (no key, no limiter): the local-use baseline
    sqlite                      auth + limits + hold + settle: the figure the aim is about (< 1 ms p50)
    sqlite synchronous=full     the same, fsyncing every commit (survives a power cut)
    postgres --no-auth / postgres / postgres hold_commit=sync   (when PostgreSQL is reachable)

    .venv/bin/python benchmarks/billing_overhead.py [--requests 1000] [--rate 100] [--rounds 5]
                                                    [--postgres URL | --no-postgres]

Prints the load average before and after (a loaded machine spoils the figures: rerun on a quiet one)
and whether the aim is met.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import sqlite3
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from llmaas.billing import FreeGrant, create_account, create_key, open_database, set_price
from llmaas.server.billing import ServerBilling
from llmaas.server.usage import RequestUsage

AIM_MS = 1.0
MODEL = "bench-model"


@dataclass
class Setup:
    label: str
    billing: ServerBilling
    key: str | None
    times: list[float] = field(default_factory=list)


def prepare(label: str, url: str, auth: bool) -> Setup:
    db = open_database(url)
    name = "bench-" + secrets.token_hex(4)
    create_account(db, name, plan="plus", free_grant=FreeGrant(10**12, None))
    key = create_key(db, name, requests_per_minute=10**6, tokens_per_minute=10**9).secret
    try:  # --no-auth bills the `default` account
        create_account(db, "default", plan="plus", free_grant=FreeGrant(10**12, None))
    except Exception:
        pass
    set_price(db, MODEL, input_usd="0.05", cached_input_usd="0.025", output_usd="0.20")
    return Setup(label, ServerBilling(db, auth=auth), key if auth else None)


async def one_request(s: Setup) -> float:
    """What the server does around one request (middleware auth, admission, settle), timed in ms."""
    billing = s.billing
    t0 = time.perf_counter()
    principal = billing.cached_principal(s.key)
    if principal is None and billing.auth:
        principal = await asyncio.to_thread(billing.authenticate, s.key)
    rid = f"bench-{secrets.token_hex(8)}"
    admission = await asyncio.to_thread(billing.admit, principal, MODEL, rid, 100, 200)
    usage = RequestUsage(rid, MODEL, "chat.completions", 100, 20, 150, "finished", ("stop",))
    await asyncio.to_thread(billing.finish, admission, usage)
    return (time.perf_counter() - t0) * 1000


async def run_all(setups: list[Setup], requests: int, rate: float, rounds: int) -> None:
    """Open loop: each request starts at its time (i / rate) whether or not the previous one ended, so
    a slow configuration still sees `rate` requests/s. The configurations take turns, `rounds` times,
    so that a change in the machine's load falls on all of them."""
    for s in setups:  # warm up: connections, statement caches, the key cache
        for _ in range(20):
            await one_request(s)
    per_round = -(-requests // rounds)
    for _ in range(rounds):
        for s in setups:
            start = time.perf_counter()
            tasks = []
            for i in range(min(per_round, requests - len(s.times) - len(tasks))):
                if (delay := start + i / rate - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one_request(s)))
            s.times.extend(await asyncio.gather(*tasks))


def p(times: list[float], q: int) -> float:
    return statistics.quantiles(times, n=100)[q - 1]


def postgres_database(admin_url: str) -> tuple[str, object] | None:
    """A scratch database `llmaas_bench_<random>` (dropped at the end), or None if unreachable."""
    try:
        import psycopg

        admin = psycopg.connect(admin_url.replace("+psycopg", ""), autocommit=True, connect_timeout=3)
    except Exception as exc:
        print(f"postgres skipped: {str(exc).strip().splitlines()[0]}")
        return None
    name = f"llmaas_bench_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}", (admin, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s per configuration")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rounds", type=int, default=5, help="turns each configuration takes")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    machine = platform.processor() or platform.machine()
    print(
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}; "
        f"{args.requests} requests at {args.rate:g}/s (open loop) per configuration, in {args.rounds} rounds"
    )
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = f"sqlite:///{Path(tmp) / 'billing.sqlite3'}"
        setups = [
            prepare("sqlite, --no-auth (hold+settle)", sqlite, False),
            prepare("sqlite, auth+limit+hold+settle", sqlite, True),
            prepare(
                "sqlite synchronous=full, auth+...",
                f"sqlite:///{Path(tmp) / 'full.sqlite3'}?synchronous=full",
                True,
            ),
        ]
        scratch = None if args.no_postgres else postgres_database(args.postgres)
        if scratch is not None:
            url, _ = scratch
            setups += [
                prepare("postgres, --no-auth (hold+settle)", url, False),
                prepare("postgres, auth+limit+hold+settle", url, True),
                prepare("postgres hold_commit=sync, auth+...", url + "?hold_commit=sync", True),
            ]
        try:
            asyncio.run(run_all(setups, args.requests, args.rate, args.rounds))
        finally:
            for s in setups:
                s.billing.db.close()
            if scratch is not None:
                admin, name = scratch[1]
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                admin.close()
    print("load average after:  {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    for s in setups:
        t = s.times
        print(f"{s.label:36s} p50 {statistics.median(t):7.3f} ms   p99 {p(t, 99):7.3f} ms   (n={len(t)})")
    full = statistics.median(setups[1].times)
    baseline = statistics.median(setups[0].times)
    verdict = "met" if full < AIM_MS else "NOT met"
    print(
        f"aim: p50 < {AIM_MS:g} ms on SQLite for auth + limits + hold + settle + ledger write: {verdict} "
        f"(p50 {full:.3f} ms; --no-auth in the same run {baseline:.3f} ms)"
    )


if __name__ == "__main__":
    main()
