"""Server-sent events: the framing, and the end-of-stream rules shared by chat and completions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from llmaas.errors import LlmaasError
from llmaas.server.errors import error_body
from llmaas.server.generation import ClientDisconnected, EngineRun
from llmaas.server.responses import dumps

log = logging.getLogger("llmaas.server")

DONE = "data: [DONE]\n\n"


def event(obj: object) -> str:
    return f"data: {dumps(obj)}\n\n"


def sse_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def guarded(
    run: EngineRun, watcher: asyncio.Task, events: AsyncIterator[str], final: Callable[[], str | None]
) -> AsyncIterator[str]:
    """Yield `events`, settle usage, then the optional usage event and [DONE].

    An engine failure mid-stream becomes an error event (the status line has gone already);
    a client that left, or a cancelled response, aborts the engine requests.
    """
    try:
        async for text in events:
            yield text
        await run.finish()
        tail = final()
        if tail:
            yield tail
        yield DONE
    except ClientDisconnected:
        return
    except LlmaasError as exc:
        yield event(error_body(exc.message, exc.error_type, exc.param, exc.code))
    except Exception:
        log.exception("stream failed")
        yield event(error_body("The server had an error while processing your request.", "server_error"))
    finally:
        watcher.cancel()
        run.abort()  # no-op when finished; otherwise stops generation and reports the tokens so far
