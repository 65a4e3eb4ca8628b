"""Server-sent events: the framing, and the end-of-stream rules shared by chat and completions.

Backpressure: a response send waits while the client's socket is full (uvicorn pauses writing), so a
client that stops reading stops this stream's reading of engine outputs; the engine keeps producing
them into the run's queue (bounded: generation.py MAX_BUFFERED_OUTPUTS). If one send waits longer
than the stall timeout (`llmaas serve --stream-stall-timeout`, default 30 s), the request is aborted
as if the client had disconnected: the engine frees its sequences and the tokens produced so far are
billed; the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from llmaas.errors import LlmaasError
from llmaas.server.errors import error_body
from llmaas.server.generation import ClientDisconnected, EngineRun
from llmaas.server.responses import dumps

log = logging.getLogger("llmaas.server")

DONE = "data: [DONE]\n\n"
DEFAULT_STREAM_STALL_TIMEOUT_S = 30.0


class _SendStalled(Exception):
    pass


class SSEResponse(StreamingResponse):
    """An event stream that gives up on a client that reads nothing for `stall_timeout_s`."""

    def __init__(self, body: AsyncIterator[str], run: EngineRun, stall_timeout_s: float):
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.run, self.stall_timeout_s = run, stall_timeout_s

    async def stream_response(self, send) -> None:
        async def timed_send(message) -> None:
            try:
                async with asyncio.timeout(self.stall_timeout_s):
                    await send(message)
            except TimeoutError:
                raise _SendStalled() from None

        try:
            await super().stream_response(timed_send)
        except _SendStalled:
            log.warning(
                "%s: the client read nothing for %.0fs; aborted",
                self.run.request_ids[0],
                self.stall_timeout_s,
            )
            self.run.abort()  # billed for the tokens so far, like a disconnect
            await self.body_iterator.aclose()
            # Returning with the response unfinished makes the HTTP server close the connection.


def event(obj: object) -> str:
    return f"data: {dumps(obj)}\n\n"


async def guarded(
    run: EngineRun, watcher: asyncio.Task | None, events: AsyncIterator[str], done: str | None = DONE
) -> AsyncIterator[str]:
    """Yield `events`, settle usage (if `events` did not: its final usage chunk needs the cost), then
    `done` ([DONE], as chat and completions end; None: nothing, as /v1/responses ends).

    An engine failure mid-stream becomes an error event (the status line has gone already);
    a client that left, or a cancelled response, aborts the engine requests.
    """
    try:
        async for text in events:
            yield text
        await run.finish()
        if done:
            yield done
    except ClientDisconnected:
        return
    except LlmaasError as exc:
        yield event(error_body(exc.message, exc.error_type, exc.param, exc.code))
    except Exception:
        log.exception("stream failed")
        yield event(error_body("The server had an error while processing your request.", "server_error"))
    finally:
        if watcher is not None:
            watcher.cancel()
        run.abort()  # no-op when finished; otherwise stops generation and reports the tokens so far
