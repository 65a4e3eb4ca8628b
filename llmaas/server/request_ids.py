"""Request ids on every response: `x-request-id`, and the client's own `X-Client-Request-Id` echoed.

Every HTTP response carries `x-request-id` (the openai SDK exposes it as `response._request_id`). For
a generation request it is the completion's id (`chatcmpl-...`, `cmpl-...`): the `id` of the body, the
ledger's usage record (`usage_records.request_id`) and the hold, so a response, an error and a ledger
row name one another. Any other response gets a generated `req_...` id.

A client may name its request itself with `X-Client-Request-Id` (OpenAI's header; vLLM's body field
`request_id` and SGLang's `rid` mean the same and count when the header is absent): at most 512
visible ASCII characters, else 400 before anything else runs. It is echoed in `x-client-request-id`
and recorded with the request's hold and usage record (`client_request_id`).
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated

from pydantic import Field, Strict

from llmaas.errors import InvalidRequestError
from llmaas.server.errors import error_response
from llmaas.server.responses import new_id

REQUEST_ID = "llmaas.request_id"  # ASGI scope keys
CLIENT_REQUEST_ID = "llmaas.client_request_id"
CLIENT_REQUEST_ID_HEADER = "X-Client-Request-Id"
MAX_CLIENT_REQUEST_ID = 512  # characters, as OpenAI's limit for the header
_CLIENT_ID_PATTERN = r"^[\x21-\x7e]+$"  # visible ASCII: no spaces, no controls, nothing a log could mangle
_CLIENT_ID = re.compile(_CLIENT_ID_PATTERN)

# The same rule for the body fields (vLLM's request_id, SGLang's rid).
ClientRequestId = Annotated[
    str, Strict(), Field(min_length=1, max_length=MAX_CLIENT_REQUEST_ID, pattern=_CLIENT_ID_PATTERN)
]

# Generation paths whose request id is the completion's id (the prefix of its `id`).
_ID_PREFIXES = {"/v1/chat/completions": "chatcmpl", "/v1/completions": "cmpl"}


def check_client_request_id(value: str) -> str:
    if not 1 <= len(value) <= MAX_CLIENT_REQUEST_ID or not _CLIENT_ID.match(value):
        raise InvalidRequestError(
            f"'{CLIENT_REQUEST_ID_HEADER}' must be 1 to {MAX_CLIENT_REQUEST_ID} visible ASCII characters "
            f"(no spaces), got {len(value)} characters",
            param=CLIENT_REQUEST_ID_HEADER,
        )
    return value


def request_id_of(scope: dict, prefix: str) -> str:
    """The id this request's response is sent under (a generation's id starts with `prefix`)."""
    current = scope.get(REQUEST_ID)
    if current is None or not current.startswith(prefix + "-"):
        current = scope[REQUEST_ID] = new_id(prefix)
    return current


def adopt_body_request_id(scope: dict, *body_ids: str | None) -> None:
    """vLLM's `request_id` / SGLang's `rid` name the request when no header did."""
    if scope.get(CLIENT_REQUEST_ID) is None:
        scope[CLIENT_REQUEST_ID] = next((i for i in body_ids if i), None)


class RequestIdMiddleware:
    """Pure ASGI, outermost: every response (401, 413, a 503 while draining included) gets the headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        prefix = _ID_PREFIXES.get(scope["path"].rstrip("/"))
        scope[REQUEST_ID] = new_id(prefix) if prefix else "req_" + secrets.token_hex(12)
        scope[CLIENT_REQUEST_ID] = None

        async def send_with_ids(message):
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in (b"x-request-id", b"x-client-request-id")
                ]
                headers.append((b"x-request-id", scope[REQUEST_ID].encode("latin-1")))
                if scope.get(CLIENT_REQUEST_ID):
                    headers.append((b"x-client-request-id", scope[CLIENT_REQUEST_ID].encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        client_id = _header(scope, b"x-client-request-id")
        if client_id is not None:
            try:
                scope[CLIENT_REQUEST_ID] = check_client_request_id(client_id)
            except InvalidRequestError as exc:
                await error_response(exc)(scope, receive, send_with_ids)
                return
        await self.app(scope, receive, send_with_ids)


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
