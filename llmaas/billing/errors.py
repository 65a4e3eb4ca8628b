"""Billing errors, each already carrying the HTTP status and OpenAI error type/code the server sends.

Messages never contain an API key: at most the key's display prefix.
"""

from __future__ import annotations

from llmaas.errors import InvalidRequestError, LlmaasError


class AuthenticationError(LlmaasError):
    """Missing, unknown, revoked or expired key -> 401."""

    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotAllowedError(LlmaasError):
    """The key's model allow-list does not include the requested model -> 403."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "model_not_allowed"


class ServiceTierNotAllowedError(LlmaasError):
    """The key's plan does not offer the requested service tier -> 403."""

    status_code = 403
    error_type = "invalid_request_error"
    code = "service_tier_not_allowed"


class InsufficientQuotaError(LlmaasError):
    """The account's available balance cannot cover the request's worst-case cost -> 429, no retry."""

    status_code = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"
    headers = {"x-should-retry": "false"}


class RateLimitExceededError(LlmaasError):
    """Requests or tokens per minute exhausted -> 429 with Retry-After and x-ratelimit-* headers."""

    status_code = 429
    error_type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, headers: dict[str, str], retry_after_s: float | None):
        super().__init__(message)
        self.headers = headers
        self.retry_after_s = retry_after_s


class NotFoundError(LlmaasError):
    """An account, key, price or hold that does not exist (admin operations) -> 404."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class PriceNotSetError(LlmaasError):
    """No price in force for a model: the operator must set one before it can be billed."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "price_not_set"


class HoldStateError(LlmaasError):
    """Settling or releasing a hold that is already closed with a different outcome."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "hold_closed"


__all__ = [
    "AuthenticationError",
    "HoldStateError",
    "InsufficientQuotaError",
    "InvalidRequestError",
    "ModelNotAllowedError",
    "NotFoundError",
    "PriceNotSetError",
    "RateLimitExceededError",
]
