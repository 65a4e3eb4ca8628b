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


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from llmaas.cli import add_engine_args

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
        default=None,
        help="owner of this replica's holds; its open holds from a previous run are released at start "
        "(default: HOST:PORT)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from llmaas.cli import engine_config_from_args
    from llmaas.engine.async_engine import AsyncEngine
    from llmaas.errors import InvalidRequestError
    from llmaas.server.app import create_app
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

    def load(name: str) -> AsyncEngine:
        return AsyncEngine.from_config(configs[name], max_waiting=args.max_waiting)

    logging.getLogger("llmaas").setLevel(getattr(logging, args.log_level.upper()))
    app = create_app(load=load, model_names=names, billing=_billing(args, names))
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
    DrainingServer(config, app.state.llmaas.drain, args.shutdown_grace).run()
    return 0


def _billing(args: argparse.Namespace, served: list[str]):
    from llmaas.billing import open_database
    from llmaas.server.billing import ServerBilling
    from llmaas.server.bootstrap import bootstrap

    db = open_database(args.database_url)
    bootstrap(db, served, say=lambda line: print(line, flush=True))
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
        in_flight=in_flight,
    )
    billing.release_previous_holds()
    return billing
