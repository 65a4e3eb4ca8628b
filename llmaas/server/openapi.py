"""/openapi.json as this server really answers: the error statuses each operation can return.

FastAPI documents what a route declares (and a 422 this server never sends: errors.py answers 400).
The statuses that middleware and billing add on the way are listed here, once, by where they apply.
"""

from __future__ import annotations

from typing import Any

GENERATION = ("/v1/chat/completions", "/v1/completions")
MODEL_RUNS = (*GENERATION, "/v1/embeddings")  # routes that run a model, billed
# Routes that read their query by hand (admin.py _report_args): no declared parameters, yet a 400.
HAND_PARSED_QUERY = (
    "/v1/organization/usage/completions",
    "/v1/organization/usage/embeddings",
    "/v1/organization/costs",
)
UNGATED = ("/health", "/metrics")  # the drain middleware lets them through (draining.py)
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def _statuses(path: str, operation: dict[str, Any], billing: bool, auth: bool) -> dict[int, str]:
    out: dict[int, str] = {413: "request body over the server's size limit (--max-body-bytes)"}
    api = path not in UNGATED
    if api:
        out[503] = "the server is draining (shutting down) or overloaded; see Retry-After"
    if operation.get("parameters") or operation.get("requestBody") or path in HAND_PARSED_QUERY:
        out[400] = "invalid request (names the param)"
    privileged = path.startswith(("/admin/", "/v1/organization/"))
    if billing and (privileged or (auth and path.startswith("/v1/"))):
        out[401] = "missing, unknown, revoked or expired API key (the admin key for /admin)"
    if privileged:
        out[404] = "unknown account, key or model; or this server runs without billing"
    if path in MODEL_RUNS or path.startswith("/v1/models/"):
        out[404] = "model not found"
    if path in MODEL_RUNS:
        if billing:
            out[403] = "this API key may not use the model"
            out[429] = "rate limit reached, or not enough credit (insufficient_quota)"
        out[500] = "the engine failed while running the request (engine_error)"
    if path in GENERATION:
        out[499] = "the client closed the connection before the response (nothing is sent)"
    if path == "/health":
        out[503] = "models still loading, or the server is draining"
    return out


def document_statuses(schema: dict[str, Any], *, billing: bool, auth: bool) -> dict[str, Any]:
    """Add each operation's real error statuses to `schema` (in place) and drop FastAPI's 422."""
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status, description in _statuses(path, operation, billing, auth).items():
                responses.setdefault(str(status), {"description": description, "content": _ERROR})
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema
