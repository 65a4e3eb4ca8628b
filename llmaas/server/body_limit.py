"""A cap on request bodies, applied before anything reads, parses or buffers them.

A declared Content-Length over the cap is answered 413 at once, without reading a byte of the body.
A chunked body (no Content-Length) is counted as it arrives; the moment it passes the cap the client
gets 413 and the handler reading it is stopped, so at most one receive message beyond the cap is
ever held. The connection is closed after a 413 (the rest of the body is never read).

Why a default of 8 MiB (`llmaas serve --max-body-bytes`): every body this API accepts is bounded by a
context window. A 128k-token window of text is ~0.5 MB of UTF-8 (about 4 bytes per token), ~3 MB in
the worst JSON spelling (every character as \\uXXXX); the same window as token ids in a completions
prompt is ~0.9 MB ("123456," per token). 8 MiB admits all of that with room for several prompts,
while a body that could only ever be refused as too long for the context costs no parsing at all.
"""

from __future__ import annotations

from llmaas.server.errors import error_body
from llmaas.server.responses import dumps

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


class _BodyTooLarge(Exception):
    """Raised into the handler that was reading the body; the 413 has been sent already."""


def _too_large(limit: int) -> tuple[dict, dict]:
    body = error_body(
        f"The request body is larger than this server's limit of {limit} bytes.",
        "invalid_request_error",
        None,
        "request_too_large",
    )
    payload = dumps(body).encode()
    start = {
        "type": "http.response.start",
        "status": 413,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ],
    }
    return start, {"type": "http.response.body", "body": payload}


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses a malformed length before the app sees it
    return None


class BodyLimitMiddleware:
    """Pure ASGI; `max_bytes` is the largest body accepted (413 `request_too_large` above it).
    `per_path`: other caps for some paths (an upload to /v1/files is bounded by the file size limit)."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY_BYTES, per_path: dict[str, int] | None = None):
        if max_bytes < 1 or any(v < 1 for v in (per_path or {}).values()):
            raise ValueError("max_bytes must be positive")
        self.app, self.max_bytes, self.per_path = app, max_bytes, per_path or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.per_path.get(scope["path"].rstrip("/"), self.max_bytes)
        start, body = _too_large(limit)
        declared = _declared_length(scope["headers"])
        if declared is not None and declared > limit:
            await send(start)
            await send(body)
            return
        received = 0
        refused = False
        responded = False

        async def counting_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit and not refused:
                    refused = True
                    if not responded:
                        await send(start)
                        await send(body)
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal responded
            if refused:
                return  # the app's own answer to the interrupted read (the 413 went out instead)
            responded = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not refused:
                raise
