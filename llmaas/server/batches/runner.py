"""Runs batch lines in the engine's idle capacity, each through the same walk as an HTTP request.

One task per server (started with the app when it has billing). It claims pending lines from the
database (billing/batches.py) up to `concurrency` at a time, and runs each as its endpoint runs an HTTP
request (`start_chat` / `start_completion`: the same request model, validation, grammar, tools, hold and
settle), with a `Caller` of service tier `batch`: the lowest engine priority, so interactive work
preempts it (engine/scheduler.py), and the batch price. A line is billed under its own ledger request
id, at most once (see billing/batches.py for the order of steps that makes kill -9 safe).

A line's run that is cut short (the server stopping, an engine error) delivered nothing to anyone: its
hold is released (`Caller.billed_in_part` False), and a line cut short by a stop runs again after the
restart. Its response is recorded before it is settled; lines recorded and not settled (a crash in
between, or the database down at that moment) are settled from the recorded usage.

Lines run without the key's rate limits: the runner's concurrency is their pace, and each line's hold
bounds what the batch can spend (a line the account cannot cover fails with `insufficient_quota`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from llmaas.billing import settle
from llmaas.billing.batches import (
    LineWork,
    begin_finalizing,
    claim_lines,
    drop_unsettled_hold,
    expire_batches,
    finish_batch,
    finishable_batches,
    line_outcomes,
    reclaim_lines,
    record_failed,
    record_generated,
    record_succeeded,
    stale_finalizing,
    unsettled_lines,
)
from llmaas.billing.files import FileStore
from llmaas.billing.keys import principal_of_key
from llmaas.errors import InvalidRequestError, LlmaasError
from llmaas.server.batches.output import output_files
from llmaas.server.caller import Caller
from llmaas.server.chat import start_chat
from llmaas.server.completions import start_completion
from llmaas.server.errors import error_body, validation_error
from llmaas.server.protocol import ChatCompletionRequest, CompletionRequest
from llmaas.server.reply import Started
from llmaas.server.state import ServerState

log = logging.getLogger("llmaas.server")

DEFAULT_CONCURRENCY = 16  # lines in the engine at once (its batch, 64 sequences by default, has room)
POLL_S = 1.0  # how often the database is asked for new lines when nothing wakes the runner
HOUSEKEEPING_S = 10.0  # how often windows are checked and other replicas' dead lines taken over

Start = Callable[[ServerState, Caller, Any, str], Awaitable[Started]]
# The endpoints a batch may name: its request model, the function that starts one (as its HTTP handler
# does) and the endpoint's name in the ledger. /v1/embeddings joins here with its own pair.
ENDPOINTS: dict[str, tuple[type[BaseModel], Start, str]] = {
    "/v1/chat/completions": (ChatCompletionRequest, start_chat, "chat.completions"),
    "/v1/completions": (CompletionRequest, start_completion, "completions"),
}


class LineRefused(Exception):
    """A line's body the endpoint refuses, as its HTTP answer: (status, OpenAI error body)."""

    def __init__(self, status_code: int, body: dict[str, Any]):
        self.status_code, self.body = status_code, body


def request_body(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """The line's body as the endpoint's request model, refused as the endpoint refuses it."""
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        answer = validation_error(RequestValidationError(errors))
        raise LineRefused(answer.status_code, json.loads(answer.body)) from None
    if getattr(request, "stream", None):
        raise InvalidRequestError("'stream' is not supported in a batch", param="stream")
    return request


def _error_of(exc: LlmaasError) -> dict[str, Any]:
    return {
        "status_code": exc.status_code,
        "body": error_body(exc.message, exc.error_type, exc.param, exc.code),
    }


class BatchRunner:
    def __init__(self, state: ServerState, files: FileStore, concurrency: int = DEFAULT_CONCURRENCY):
        if not 1 <= concurrency <= 4096:
            raise InvalidRequestError("the batch concurrency must be 1 to 4096", param="batch-concurrency")
        self.state, self.files, self.concurrency = state, files, concurrency
        self.db, self.owner = state.billing.db, state.billing.owner
        self.wake = asyncio.Event()  # a batch was created or cancelled, or a line ended
        self._running: dict[int, asyncio.Task] = {}  # line id -> its task
        self._housekept = 0.0
        self._restarted = False  # this instance's lines from before its restart taken back

    async def run(self) -> None:
        """The runner's loop, until cancelled (the app's end)."""
        try:
            while True:
                try:
                    await self._step()
                except Exception:  # the database away for a moment: try again at the next step
                    log.exception("the batch runner's step failed")
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), POLL_S)
                except TimeoutError:
                    pass
        finally:
            for task in self._running.values():
                task.cancel()  # each run is aborted and released; its line runs again after a restart

    async def _step(self) -> None:
        if not self._restarted:  # before claiming anything: what a previous run of this instance left
            await asyncio.to_thread(reclaim_lines, self.db, self.owner, restarting=True)
            self._restarted = True
        if time.monotonic() - self._housekept > HOUSEKEEPING_S:
            self._housekept = time.monotonic()
            await asyncio.to_thread(self._housekeeping)
        for batch_id in await asyncio.to_thread(finishable_batches, self.db):
            await asyncio.to_thread(self._finalize, batch_id)
        if not self.state.registry.ready or self.state.drain.draining:
            return
        free = self.concurrency - len(self._running)
        for line in await asyncio.to_thread(claim_lines, self.db, self.owner, free):
            self._running[line.id] = asyncio.create_task(self._run_line(line))

    def _housekeeping(self) -> None:
        """Windows that ran out; lines of dead replicas; lines recorded but not settled."""
        expire_batches(self.db)
        reclaim_lines(self.db, self.owner, restarting=False)
        for line, response in unsettled_lines(self.db, self.owner, restarting=True):
            if line.id not in self._running:
                self._settle_recorded(line, response)
        for batch_id in stale_finalizing(self.db):
            self._finalize(batch_id)

    def _settle_recorded(self, line: LineWork, response: dict[str, Any]) -> None:
        usage = response["usage"]
        try:
            settled = settle(
                self.db,
                line.request_id,
                usage["prompt_tokens"],
                usage["prompt_tokens_details"]["cached_tokens"],
                usage["completion_tokens"],
                endpoint=ENDPOINTS[line.endpoint][2],
            )
        except LlmaasError:
            log.exception("settling batch line %s from its recorded usage failed", line.request_id)
            return
        usage["cost"] = settled.cost_micros / 1_000_000
        record_succeeded(self.db, line.id, response)

    async def _run_line(self, line: LineWork) -> None:
        generated = False
        try:
            if not await asyncio.to_thread(drop_unsettled_hold, self.db, line.request_id):
                # Billed, yet no response recorded: the order of steps here never leaves that; never twice.
                message = "This line was billed before its response was recorded; it is not run again."
                await asyncio.to_thread(
                    record_failed, self.db, line.id, {"code": "server_error", "message": message}
                )
                return
            model, start, _ = ENDPOINTS[line.endpoint]
            body = request_body(model, line.body)
            principal = (
                await asyncio.to_thread(principal_of_key, self.db, line.key_id) if line.key_id else None
            )
            caller = Caller(
                principal, line.custom_id, service_tier="batch", billed_in_part=False, rate_limited=False
            )
            started = await start(self.state, caller, body, line.request_id)
            await started.reply.generated()
            generated = await asyncio.to_thread(record_generated, self.db, line.id, started.whole())
            await started.reply.complete()  # settles
            await asyncio.to_thread(record_succeeded, self.db, line.id, started.whole())
        except LineRefused as exc:
            await asyncio.to_thread(
                record_failed, self.db, line.id, {"status_code": exc.status_code, "body": exc.body}
            )
        except LlmaasError as exc:
            if generated:  # settling failed (the database): settled from the record by housekeeping
                log.warning("batch line %s: settling failed (%s); retried later", line.request_id, exc)
            else:
                await asyncio.to_thread(record_failed, self.db, line.id, _error_of(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch line %s failed", line.request_id)
            if not generated:
                error = {
                    "code": "server_error",
                    "message": "The server had an error while running this line.",
                }
                await asyncio.to_thread(record_failed, self.db, line.id, error)
        finally:
            self._running.pop(line.id, None)
            self.wake.set()

    def _finalize(self, batch_id: str) -> None:
        batch = begin_finalizing(self.db, batch_id)
        if batch is None:
            return
        output, errors = output_files(batch_id, line_outcomes(self.db, batch_id))
        output_id = error_id = None
        if output:
            output_id = self.files.save_bytes(
                batch.account_id, "batch_output", f"{batch_id}_output.jsonl", output
            ).id
        if errors:
            error_id = self.files.save_bytes(
                batch.account_id, "batch_error", f"{batch_id}_error.jsonl", errors
            ).id
        finish_batch(self.db, batch_id, output_id, error_id)
