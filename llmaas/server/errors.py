"""Every failure leaves as OpenAI's error object: {"error": {"message", "type", "param", "code"}}.

Client mistakes are 4xx naming the parameter; FastAPI's 422 body never leaks (it becomes a 400).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmaas.errors import LlmaasError

log = logging.getLogger("llmaas.server")

RETRY_AFTER_SECONDS = 1


class ModelLoadingError(LlmaasError):
    status_code = 503
    error_type = "server_error"
    code = "model_loading"


def printable(text: str) -> str:
    """`text` with any lone surrogate escaped: a response body must encode as UTF-8 whatever a client sent."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    param = printable(param) if param is not None else None
    return {"error": {"message": printable(message), "type": type_, "param": param, "code": code}}


def _shown(value: Any) -> str:
    """A short JSON excerpt of a rejected value (never the whole of a multi-megabyte string or list)."""
    if isinstance(value, str):
        value = value[:80]
    elif isinstance(value, (list, tuple)):
        value = list(value[:10])
    elif isinstance(value, dict):
        value = dict(list(value.items())[:10])
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return repr(value)[:80]


def error_response(exc: LlmaasError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status_code == 503 else {}
    headers.update(getattr(exc, "headers", None) or {})  # billing: Retry-After, x-ratelimit-*, x-should-retry
    body = error_body(exc.message, exc.error_type, exc.param, exc.code)
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def rename_param(exc: LlmaasError, names: dict[str, str]) -> LlmaasError:
    """Engine params named in the caller's vocabulary (e.g. prompt -> messages for chat)."""
    if exc.param in names:
        exc.param = names[exc.param]
    return exc


# Elements pydantic adds to a location for union members and wrapped validators, not field names.
def _is_union_tag(part: str) -> bool:
    return (
        part in {"str", "int", "float", "bool", "list", "dict"}
        or not part.isidentifier()
        or part[0].isupper()
    )


def param_path(loc: tuple[Any, ...]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; ("query", "limit") -> "limit"."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not _is_union_tag(part):
            out += f".{part}" if out else part
    return out or None


def validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    # A union (a string or a list of parts) reports one error per member, the string member's first;
    # a lone surrogate found by another member under the same field is what was really wrong
    # (messages[0].content[0].text, not "messages[0].content is not a string").
    field = param_path(tuple(first["loc"])) or ""
    unicode = [
        e
        for e in errors
        if e["type"] == "invalid_unicode" and (param_path(tuple(e["loc"])) or "").startswith(field)
    ]
    first = unicode[0] if unicode else first
    if first["type"] == "json_invalid":
        message = (
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload "
            f"({first.get('ctx', {}).get('error', 'invalid JSON')})."
        )
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)
    param = param_path(tuple(first["loc"]))
    if first["type"] == "unsupported_parameter":
        return JSONResponse(
            error_body(first["msg"], "invalid_request_error", param, "unsupported_parameter"), status_code=400
        )
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
        return JSONResponse(
            error_body(message, "invalid_request_error", param, "unknown_parameter"), status_code=400
        )
    if first["type"] == "invalid_unicode":
        message = f"Invalid value for '{param}': {first['msg']}. Send text as valid UTF-8."
        return JSONResponse(
            error_body(message, "invalid_request_error", param, "invalid_unicode"), status_code=400
        )
    if first["type"] == "missing":
        message = f"Missing required parameter: '{param}'." if param else "The request body is missing."
    elif param is None:
        message = f"The request body must be a JSON object: {first['msg']}."
    else:
        message = f"Invalid value for '{param}': {first['msg']} (got {_shown(first.get('input'))})."
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc)

    @app.exception_handler(LlmaasError)
    async def _llmaas(request: Request, exc: LlmaasError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.message)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(message, type_), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body("The server had an error while processing your request.", "server_error"),
            status_code=500,
        )
