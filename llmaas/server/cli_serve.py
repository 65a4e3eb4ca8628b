"""`llmaas serve`: one process serving one or more models over the OpenAI API.

The server listens at once and loads the models in the background (/health is 503 until they are
ready). SIGTERM or Ctrl-C: drain (/health 503 "draining", new requests 503 + Retry-After) while
in-flight requests finish within --shutdown-grace seconds (what is left is then cancelled and aborted
in the engine), stop accepting, exit 0 (server/draining.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
from collections.abc import Callable


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from llmaas.engine.cli_args import add_engine_args

    # "resolve": the --model below (repeatable: several models, each its own engine) replaces the
    # engine group's single --model.
    p = subparsers.add_parser(
        "serve", help="serve models over an OpenAI-compatible HTTP API", conflict_handler="resolve"
    )
    add_engine_args(p)
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="model to serve (repeatable): catalog name, HF-format directory or .gguf file "
        "(default: smollm2-135m)",
    )
    p.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        help="name clients use for the matching --model (repeatable; default: the --model text)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="bound on queued requests per model; beyond it clients get 503 + Retry-After",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM",
    )
    p.add_argument(
        "--database-url",
        default=None,
        help="billing database (default: a SQLite file under LLMAAS_HOME; postgresql+psycopg://... for "
        "production)",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        help="share rate limits and in-flight counts between replicas (default: in process)",
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="no API keys: every request is billed to the 'default' account, without rate limits",
    )
    p.add_argument(
        "--instance-id",
        type=_instance_id,
        default=None,
        help="owner of this replica's holds and its lease; its open holds from a previous run are closed at "
        "start (default: HOST:PORT)",
    )
    _add_hold_args(p)
    p.add_argument(
        "--max-body-bytes",
        type=_bounded(int, 1, 2**40),
        default=None,
        help="largest request body accepted; larger ones get 413 before they are read (default: 8 MiB, "
        "room for a 128k-token context in any JSON spelling)",
    )
    p.add_argument(
        "--stream-stall-timeout",
        type=_bounded(float, 0.001, 86400),
        default=None,
        help="seconds a streaming client may read nothing before its request is aborted and billed for "
        "the tokens so far, like a disconnect (default: 30)",
    )
    p.add_argument(
        "--response-retention-days",
        type=_bounded(float, 0.001, 3650),
        default=None,
        help="days a stored /v1/responses response (store: true) is kept for retrieval and "
        "previous_response_id (default: 30)",
    )
    g = p.add_argument_group("the console's margin page (docs/console.md)")
    g.add_argument("--usd-per-hour", default=None, help="what this machine costs per hour, USD (e.g. 0.10)")
    g.add_argument(
        "--cost-bench",
        action="append",
        default=None,
        metavar="[MODEL=]BENCH_JSON",
        help="a `llmaas bench` result for a served model (repeatable): with --usd-per-hour, its tokens' "
        "machine cost, as `llmaas cost` computes it",
    )
    p.add_argument(
        "--files-dir",
        default=None,
        help="where /v1/files keeps uploads and batch results (default: $LLMAAS_HOME/files; replicas "
        "that share a database must share this directory too)",
    )
    p.add_argument(
        "--max-file-bytes",
        type=_bounded(int, 1, 2**40),
        default=None,
        help="the largest file /v1/files accepts (default: 64 MiB)",
    )
    p.add_argument(
        "--batch-concurrency",
        type=_bounded(int, 1, 4096),
        default=None,
        help="batch lines in the engine at once, at the lowest priority (default: 16)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    return p


def _instance_id(text: str) -> str:
    """The holds' owner and the lease row's key (128 characters in the ledger): visible ASCII."""
    if not 1 <= len(text) <= 128 or not text.isascii() or not text.isprintable() or " " in text:
        raise argparse.ArgumentTypeError(f"must be 1-128 visible ASCII characters: {text[:40]!r}")
    return text


def _bounded(kind: type, low: float, high: float) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}: {text!r}")
        return value

    return parse


def _add_hold_args(p: argparse.ArgumentParser) -> None:
    from llmaas.billing.credits import DEFAULT_HOLD_TTL_S, MAX_HOLD_TTL_S
    from llmaas.billing.holds import DEFAULT_LEASE_S, MAX_LEASE_S
    from llmaas.server.progress import MAX_PROGRESS_INTERVAL_S, MAX_PROGRESS_INTERVAL_TOKENS, ProgressPolicy

    g = p.add_argument_group("holds (docs/billing.md, 'Holds expire')")
    g.add_argument(
        "--hold-lease-seconds",
        type=_bounded(float, 1, MAX_LEASE_S),
        default=DEFAULT_LEASE_S,
        help="this instance's lease, renewed every third of it; when it lapses (the instance died) any "
        f"replica closes the instance's open holds (default {DEFAULT_LEASE_S:g})",
    )
    g.add_argument(
        "--hold-ttl-seconds",
        type=_bounded(float, 1, MAX_HOLD_TTL_S),
        default=DEFAULT_HOLD_TTL_S,
        help="a hold's deadline after admission or its last progress checkpoint, even while its owner "
        f"lives (default {DEFAULT_HOLD_TTL_S:g})",
    )
    g.add_argument(
        "--progress-interval-seconds",
        type=_bounded(float, 0.05, MAX_PROGRESS_INTERVAL_S),
        default=ProgressPolicy.every_s,
        help="checkpoint a running request's tokens on its hold this often, or --progress-interval-tokens, "
        f"whichever comes first (default {ProgressPolicy.every_s:g}); a crash bills up to the last one",
    )
    g.add_argument(
        "--progress-interval-tokens",
        type=_bounded(int, 1, MAX_PROGRESS_INTERVAL_TOKENS),
        default=ProgressPolicy.every_tokens,
        help=f"see --progress-interval-seconds (default {ProgressPolicy.every_tokens})",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from llmaas.engine.async_embedding_engine import AsyncEmbeddingEngine
    from llmaas.engine.async_engine import AsyncEngine
    from llmaas.engine.cli_args import engine_config_from_args
    from llmaas.errors import InvalidRequestError
    from llmaas.models.catalog import is_embedding_model
    from llmaas.server.app import create_app
    from llmaas.server.console import MachineCosts
    from llmaas.server.draining import DrainingServer

    models = args.model or ["smollm2-135m"]
    names = args.served_model_name or []
    if len(names) > len(models):
        raise InvalidRequestError("more --served-model-name than --model", param="served-model-name")
    names = names + models[len(names) :]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"served model names must be distinct: {names}", param="served-model-name")
    args.model = models[0]
    base = engine_config_from_args(args)
    configs = {name: dataclasses.replace(base, model=model) for name, model in zip(names, models)}

    embedding_models = [name for name in names if is_embedding_model(configs[name].model)]

    def load(name: str) -> AsyncEngine | AsyncEmbeddingEngine:
        kind = AsyncEmbeddingEngine if name in embedding_models else AsyncEngine
        return kind.from_config(configs[name], max_waiting=args.max_waiting)

    logging.getLogger("llmaas").setLevel(getattr(logging, args.log_level.upper()))
    machine_costs = MachineCosts.load(args.usd_per_hour, args.cost_bench)  # bad input fails before any work
    billing, lease = _billing(args, names, embedding_models)
    limits = {}
    if args.max_body_bytes is not None:
        limits["max_body_bytes"] = args.max_body_bytes
    if args.stream_stall_timeout is not None:
        limits["stream_stall_timeout_s"] = args.stream_stall_timeout
    if args.response_retention_days is not None:
        limits["response_retention_s"] = args.response_retention_days * 86_400
    if args.files_dir is not None:
        limits["files_dir"] = args.files_dir
    if args.max_file_bytes is not None:
        limits["max_file_bytes"] = args.max_file_bytes
    if args.batch_concurrency is not None:
        limits["batch_concurrency"] = args.batch_concurrency
    app = create_app(load=load, model_names=names, billing=billing, **limits)
    app.state.console_machine_costs = machine_costs
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_grace,
        access_log=False,
    )
    # After a second signal uvicorn re-raises it to the handler it found; a no-op one here makes that
    # shutdown exit 0 too instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        DrainingServer(config, app.state.llmaas.drain, args.shutdown_grace).run()
    finally:
        lease.stop()  # a clean exit ends the lease: what is still open expires at the next sweep
    return 0


def _billing(args: argparse.Namespace, served: list[str], embedding_models: list[str]):
    """The billing database, bootstrap, limiter, ServerBilling, and this instance's started HoldLease."""
    from llmaas.billing import open_database
    from llmaas.server.billing import ServerBilling
    from llmaas.server.bootstrap import bootstrap
    from llmaas.server.leases import HoldLease
    from llmaas.server.progress import ProgressPolicy

    db = open_database(args.database_url)
    bootstrap(db, served, embedding_models=embedding_models, say=lambda line: print(line, flush=True))
    limiter = in_flight = None
    if args.redis_url:
        from llmaas.billing.inflight_redis import RedisInFlight
        from llmaas.billing.ratelimit_redis import RedisRateLimiter

        limiter = RedisRateLimiter.from_url(args.redis_url)
        in_flight = RedisInFlight.from_url(args.redis_url)  # plan concurrency caps shared by replicas
    billing = ServerBilling(
        db,
        limiter,
        auth=not args.no_auth,
        owner=args.instance_id or f"{args.host}:{args.port}",
        hold_ttl_s=args.hold_ttl_seconds,
        progress=ProgressPolicy(args.progress_interval_seconds, args.progress_interval_tokens),
        in_flight=in_flight,
    )
    billing.release_previous_holds()
    lease = HoldLease(db, billing.owner, args.hold_lease_seconds)
    lease.start()  # the lease before the first request; then a heartbeat and a sweep every third of it
    return billing, lease
