"""Project errors. Every layer raises these; the server maps them to OpenAI's error object.

They live at the bottom of the house so models/, engine/, billing/ and server/ can all use them.
"""

from __future__ import annotations


class LlmaasError(Exception):
    """Base class. `param` names the offending parameter when there is one."""

    status_code = 500
    error_type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(LlmaasError):
    """The caller sent something we will not run: raised before any work starts."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(LlmaasError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class ModelLoadError(LlmaasError):
    """Weights or config that exist but cannot be read or are in a form we do not support."""

    status_code = 500
    error_type = "model_load_error"


class EngineOverloadedError(LlmaasError):
    status_code = 503
    error_type = "server_error"
    code = "engine_overloaded"


class NotFoundError(LlmaasError):
    """A stored object (a response, ...) that does not exist or belongs to another account."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"
