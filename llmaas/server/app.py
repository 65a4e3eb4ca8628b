"""The FastAPI app: routes, error mapping, model loading in the background, metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse

from llmaas.billing.files import DEFAULT_MAX_FILE_BYTES, FileStore
from llmaas.engine.async_engine import AsyncEngine
from llmaas.paths import llmaas_home
from llmaas.server import admin, chat, completions, embeddings, files_api
from llmaas.server.batches import routes as batches_api
from llmaas.server.batches.runner import DEFAULT_CONCURRENCY, BatchRunner
from llmaas.server.billing import BillingMiddleware, ServerBilling
from llmaas.server.body_limit import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from llmaas.server.console import install_console
from llmaas.server.draining import DrainMiddleware
from llmaas.server.errors import error_body, install_error_handlers
from llmaas.server.generation import ClientDisconnected
from llmaas.server.metrics import HttpMetricsMiddleware, engine_stats
from llmaas.server.openapi import document_statuses
from llmaas.server.protocol import ERROR_RESPONSES, ModelCard, ModelList
from llmaas.server.registry import ModelRegistry, ServedModel
from llmaas.server.reply import client_left
from llmaas.server.request_ids import RequestIdMiddleware
from llmaas.server.responses_api import routes as responses_api
from llmaas.server.responses_api.store import DEFAULT_RETENTION_S, ResponseStore
from llmaas.server.state import ServerState
from llmaas.server.streaming import DEFAULT_STREAM_STALL_TIMEOUT_S
from llmaas.server.usage import BillingHook

log = logging.getLogger("llmaas.server")


async def _in_short_lived_thread(fn: Callable, *args):
    """Run fn in a thread that exits afterwards.

    `llmaas serve` loads with `AsyncEngine.from_config`, which runs torch on the engine's own thread
    only; a `load` that builds the LLMEngine itself runs torch here. Why not asyncio.to_thread then:
    torch's OpenMP keeps a worker pool per thread that ran torch; an executor thread that loaded the
    model stays alive, and with more OpenMP workers than cores every op of the engine thread pays a
    wake-up (measured: batch-1 decode step 25 -> 31-41 ms).
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="llmaas-model-loader", daemon=True).start()
    return await future


def create_app(
    engines: Mapping[str, AsyncEngine] | None = None,
    *,
    load: Callable[[str], AsyncEngine] | None = None,
    model_names: list[str] | tuple[str, ...] = (),
    billing_hook: BillingHook | None = None,
    billing: ServerBilling | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    stream_stall_timeout_s: float = DEFAULT_STREAM_STALL_TIMEOUT_S,
    response_retention_s: float = DEFAULT_RETENTION_S,
    files_dir: str | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    batch_concurrency: int = DEFAULT_CONCURRENCY,
) -> FastAPI:
    """An OpenAI-compatible app over `engines` (served name -> AsyncEngine, already loaded).

    With `load`, the models in `model_names` are loaded in the background at start-up (`load(name)`
    runs in a thread), /health answering 503 until all are ready; the app then owns those engines and
    shuts them down on exit. Engines passed in are the caller's to shut down.

    With `billing`, every /v1 request is authenticated, rate limited, held and settled
    (server/billing.py); without it nothing is billed (`billing_hook` still sees every request).

    A body over `max_body_bytes` is refused 413 before it is read (body_limit.py); a stream whose
    client reads nothing for `stream_stall_timeout_s` is aborted and billed like a disconnect
    (streaming.py). Stored /v1/responses are kept `response_retention_s` (in the billing database;
    in memory without billing).

    With billing, /v1/files (kept in `files_dir`, default $LLMAAS_HOME/files, up to `max_file_bytes`
    each) and /v1/batches, whose lines run in the background, `batch_concurrency` at a time.
    """
    registry = ModelRegistry([*model_names, *(engines or {})])
    for name, engine in (engines or {}).items():
        registry.add(name, engine)
    state = ServerState(registry, billing_hook, billing, stream_stall_timeout_s=stream_stall_timeout_s)
    state.responses = ResponseStore(billing.db if billing is not None else None, response_retention_s)
    if billing is not None:
        state.files = FileStore(billing.db, files_dir or llmaas_home() / "files", max_file_bytes)

    async def load_all() -> None:
        for name in model_names:
            try:
                registry.add(name, await _in_short_lived_thread(load, name))
                log.info("model %s is ready", name)
            except Exception as exc:
                log.exception("loading model %s failed", name)
                registry.models[name].error = str(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(load_all()) if load is not None else None
        if billing is not None:
            state.batches = BatchRunner(state, state.files, batch_concurrency)
            batches = asyncio.create_task(state.batches.run())
        try:
            yield
        finally:
            if billing is not None:
                batches.cancel()
            if loading is not None:
                loading.cancel()
                owned = [m.engine for n, m in registry.models.items() if n in model_names and m.engine]
                for engine in owned:
                    await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="llmaas", version="0.1.0", summary="OpenAI-compatible LLM API", lifespan=lifespan)
    app.state.llmaas = state
    install_error_handlers(app)
    app.add_exception_handler(ClientDisconnected, client_left)  # 499: nothing to answer
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(responses_api.router)
    app.include_router(embeddings.router)
    if billing is not None:  # an account owns files and batches
        app.include_router(files_api.router)
        app.include_router(batches_api.router)
    app.include_router(admin.admin)
    app.include_router(admin.organization)
    if billing is not None:
        app.add_middleware(BillingMiddleware, billing=billing)
    install_console(app)  # its pages, and its sessions' keys for the API (outside billing's middleware)
    app.add_middleware(DrainMiddleware, drain=state.drain)  # outside billing: a refused request is not billed
    upload_limit = {"/v1/files": max_file_bytes + 64 * 1024}  # the file and its multipart framing
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=max_body_bytes, per_path=upload_limit
    )  # before anything reads the body
    app.add_middleware(HttpMetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response gets x-request-id

    def card(model: ServedModel) -> dict:
        body = {"id": model.name, "object": "model", "created": model.created, "owned_by": "llmaas"}
        if model.engine is not None:  # what the model costs to run (extra fields; OpenAI clients keep them)
            body["metadata"] = model.engine.describe()
        return body

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [card(m) for m in registry.models.values()]})

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model_id: str) -> JSONResponse:
        model = registry.models.get(model_id)
        if model is None:
            registry.get(model_id)  # raises model_not_found
        return JSONResponse(card(model))

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.drain.draining:
            body = error_body("shutting down", "server_error", None, "server_shutting_down")
            return JSONResponse({**body, "status": "draining"}, status_code=503, headers={"Retry-After": "1"})
        if registry.ready:
            return JSONResponse({"status": "ok"})
        loading = {
            n: ("failed: " + m.error if m.error else "loading")
            for n, m in registry.models.items()
            if m.engine is None
        }
        body = error_body(f"not ready: {loading}", "server_error", None, "model_loading")
        return JSONResponse(
            {**body, "status": "loading", "models": loading}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        stats = await engine_stats(registry.models)
        return PlainTextResponse(state.metrics.render(stats), media_type="text/plain; version=0.0.4")

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            app.openapi_schema = document_statuses(
                schema, billing=billing is not None, auth=billing is not None and billing.auth
            )
        return app.openapi_schema

    app.openapi = openapi
    return app
