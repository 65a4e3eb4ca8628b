"""What the route handlers share: the served models, metrics and the billing hook."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from llmaas.billing.plans import tier_priority
from llmaas.engine.sampling_params import SamplingParams
from llmaas.server.billing import RATE_HEADERS, Admission, ServerBilling, SettlementError
from llmaas.server.caller import Caller
from llmaas.server.draining import Drain
from llmaas.server.generation import EngineRun, abort_when_gone, spawn
from llmaas.server.metrics import Metrics
from llmaas.server.registry import ModelRegistry, ServedModel
from llmaas.server.streaming import DEFAULT_STREAM_STALL_TIMEOUT_S
from llmaas.server.usage import BillingHook, RequestUsage

log = logging.getLogger("llmaas.server")
T = TypeVar("T")

# A request's prompts (texts or token ids), or a function that makes them (chat renders its template):
# called in a worker thread, after the rate-limit slot, never on the event loop (a chat template over
# megabytes of messages, or tokenizing them, takes long enough to stall every other connection).
PromptSource = Sequence[str | list[int]] | Callable[[], Sequence[str | list[int]]]


async def admit_in_thread(
    admit: Callable[[], tuple[Admission | None, T]], undo: Callable[[Admission | None], Awaitable[None]]
) -> tuple[Admission | None, T]:
    """Run `admit` (rate limit, CPU work, hold) in a worker thread. If the caller is cancelled meanwhile
    (the client left), the admission still completes in its thread: `undo` then releases what it took
    (its hold, its tokens, its in-flight count), so nothing stays held."""
    admitting = asyncio.ensure_future(asyncio.to_thread(admit))
    try:
        return await asyncio.shield(admitting)
    except asyncio.CancelledError:
        spawn(_undo_when_admitted(admitting, undo))
        raise


async def _undo_when_admitted(
    admitting: asyncio.Future, undo: Callable[[Admission | None], Awaitable[None]]
) -> None:
    try:
        admission, _ = await admitting
    except Exception:  # refused: nothing was held
        return
    await undo(admission)


class ServerState:
    def __init__(
        self,
        registry: ModelRegistry,
        billing_hook: BillingHook | None = None,
        billing: ServerBilling | None = None,
        *,
        stream_stall_timeout_s: float = DEFAULT_STREAM_STALL_TIMEOUT_S,
    ):
        self.registry = registry
        self.stream_stall_timeout_s = stream_stall_timeout_s  # streaming.py: a client that reads nothing
        self.metrics = Metrics()
        self.drain = Drain()  # set to draining on SIGTERM (`llmaas serve`)
        self.billing_hook = billing_hook
        self.billing = billing
        self.responses = None  # stored /v1/responses (a ResponseStore, set by create_app)
        self.files = None  # /v1/files (a FileStore, set by create_app with billing)
        self.batches = None  # the batch runner (server/batches/runner.py), with billing

    async def start_run(
        self,
        caller: Caller,
        model: ServedModel,
        prompts: PromptSource,
        params: SamplingParams,
        request_id: str,
        endpoint: str,
        user: str | None,
        every_step: bool = True,
    ) -> tuple[EngineRun, asyncio.Task | None]:
        """Submit the engine requests and watch for the caller leaving; returns once every prompt has
        its first output (validation errors raise before that). Returns (run, watcher task or None:
        a caller that never leaves)."""
        admission, token_ids = await self._admit(caller, model, prompts, params, request_id)
        # The tokens so far, checkpointed on the hold while the request runs (a crash bills them).
        progress = None
        if admission is not None and caller.billed_in_part:
            progress = self.billing.progress_checkpoint(request_id)

        async def on_end(run: EngineRun, status: str) -> None:
            if progress is not None:
                progress.close()
            self._observe(run, model.name, endpoint, status)
            if self.billing_hook is None and admission is None:
                return
            record = RequestUsage(
                request_id=request_id,
                model=model.name,
                endpoint=endpoint,
                prompt_tokens=run.prompt_tokens,
                cached_tokens=run.cached_tokens,
                completion_tokens=run.completion_tokens,
                # A batch line's run cut short delivered nothing: released, not billed (caller.py).
                status=status if caller.billed_in_part or status == "finished" else "rejected",
                finish_reasons=run.finish_reasons,
                user=user,
                api_key=caller.api_key,
                client_request_id=caller.client_request_id,
                service_tier=caller.service_tier,
            )
            run.cost_micros = await self.settle(admission, record)

        priority = admission.priority if admission is not None else tier_priority(0, caller.service_tier)
        run = EngineRun(
            model.engine,
            token_ids,  # tokenized once, for the hold; the engine reuses them
            params,
            request_id,
            on_end,
            priority=priority,
            every_step=every_step,
            on_progress=progress,
        )
        watcher = spawn(abort_when_gone(caller.gone, run)) if caller.gone is not None else None
        try:
            await run.start()
        except BaseException:
            if watcher is not None:
                watcher.cancel()
            raise
        return run, watcher

    async def settle(self, admission: Admission | None, record: RequestUsage) -> int | None:
        """Settle the request's hold (release it for status "rejected"), then tell the billing hook.
        Returns the cost in micro-USD, None when nothing was billed. A finished request that cannot be
        settled raises SettlementError: no response completes without its ledger record."""
        cost = None
        if admission is not None:
            try:
                settled = await asyncio.to_thread(self.billing.finish, admission, record)
                cost = settled.cost_micros if settled is not None else None
            except Exception as exc:
                log.exception("settling %s failed", record.request_id)
                if record.status == "finished":
                    raise SettlementError() from exc
        if self.billing_hook is not None:
            try:
                result = self.billing_hook(record)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("billing hook failed for %s", record.request_id)
        return cost

    async def _admit(
        self,
        caller: Caller,
        model: ServedModel,
        prompts: PromptSource,
        params: SamplingParams,
        request_id: str,
    ) -> tuple[Admission | None, list[list[int]]]:
        """In one worker thread, in this order: one request from the rate limit (ServerBilling.begin),
        the prompts' CPU work (template, tokenizer, context window: AsyncEngine.tokenize), then their
        tokens from the rate limit and the hold of the worst-case cost (ServerBilling.admit_prompts).
        Without billing, only the prompts' work. Returns (admission or None, token ids of each prompt)."""
        billing, engine = self.billing, model.engine

        def tokenize() -> list[list[int]]:
            return engine.tokenize(prompts() if callable(prompts) else prompts, params)

        def admit() -> tuple[Admission | None, list[list[int]]]:
            if billing is None:
                return None, tokenize()
            admission = billing.begin(
                caller.principal,
                model.name,
                request_id,
                caller.client_request_id,
                service_tier=caller.service_tier,
                rate_limited=caller.rate_limited,
            )
            caller.scope[RATE_HEADERS] = admission.headers  # a refusal from here on still shows them
            billing.check_request_size(admission, 1 if callable(prompts) else len(prompts), params.n)
            token_ids = tokenize()
            billing.admit_prompts(admission, engine, model.name, token_ids, params)
            caller.scope[RATE_HEADERS] = admission.headers
            return admission, token_ids

        async def undo(admission: Admission | None) -> None:
            if admission is None:
                return
            usage = RequestUsage(admission.request_id, model.name, "", 0, 0, 0, "rejected", ())
            try:
                await asyncio.to_thread(self.billing.finish, admission, usage)
            except Exception:
                log.exception("releasing the admission of %s failed", admission.request_id)

        return await admit_in_thread(admit, undo)

    def _observe(self, run: EngineRun, model: str, endpoint: str, status: str) -> None:
        m = self.metrics
        m.requests.inc(model=model, endpoint=endpoint, status=status)
        m.prompt_tokens.inc(run.prompt_tokens, model=model)
        m.cached_tokens.inc(run.cached_tokens, model=model)
        m.completion_tokens.inc(run.completion_tokens, model=model)
        end = run.end_time or run.start_time
        m.e2e.observe(end - run.start_time, model=model)
        if run.first_token_time is not None:
            m.ttft.observe(run.first_token_time - run.start_time, model=model)
            longest = max((len(c.token_ids) for o in run.latest if o for c in o.outputs), default=0)
            if longest > 1:
                m.tpot.observe((end - run.first_token_time) / (longest - 1), model=model)
