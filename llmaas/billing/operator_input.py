"""Bounds on what an operator sends: the one place the /admin API and the billing CLI verbs check
names, labels, days, dates, per-minute limits and lists before any work (money is in money.py).

Each check raises InvalidRequestError naming the parameter (the server answers 400, the CLI prints
one line and exits 2). Values echoed back in a message are cut short (money.shown), so a 1 MB name
is never sent back whole. The table of bounds is in docs/billing.md, "Limits on operator input".
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from llmaas.billing.money import shown
from llmaas.errors import InvalidRequestError

MAX_NAME_CHARS = 128  # account, model and key names: the columns are VARCHAR(128)
MAX_NOTE_CHARS = 256  # a ledger entry's note: VARCHAR(256)
MAX_PLAN_CHARS = 32
MAX_EXPIRES_IN_DAYS = 36_500  # 100 years; longer is "never expires" (leave the field out)
MAX_REQUESTS_PER_MINUTE = 1_000_000
MAX_TOKENS_PER_MINUTE = 1_000_000_000  # the columns are 32-bit INTEGER
MAX_ALLOWED_MODELS = 100  # entries in a key's model allow-list
MAX_FILTER_VALUES = 100  # project_ids / group_by values in one report query
# Every date an operator gives (a price's effective_from, report ranges) lies in this window, UTC.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST_TIME = datetime(2200, 1, 1, tzinfo=timezone.utc)
_KEY_ID = re.compile(r"key_[0-9A-Za-z]{1,36}")


def text(value: object, param: str, *, max_chars: int = MAX_NAME_CHARS, required: bool = True) -> str | None:
    """A printable string of at most `max_chars` characters: no control characters (NUL breaks
    PostgreSQL's text) and no lone surrogates (not encodable as UTF-8)."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise InvalidRequestError(f"'{param}' must be a non-empty string", param=param)
    if len(value) > max_chars:
        raise InvalidRequestError(
            f"'{param}' may be at most {max_chars} characters, got {len(value)}", param=param
        )
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise InvalidRequestError(
            f"'{param}' must not contain control characters or lone surrogates: {shown(value)}", param=param
        )
    return value


def model_name(value: object, param: str = "model") -> str:
    return text(value, param)


def model_list(value: object, param: str = "models") -> list[str] | None:
    """A key's allow-list: None (every model) or at most MAX_ALLOWED_MODELS model names."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidRequestError(f"'{param}' must be a list of model names", param=param)
    if len(value) > MAX_ALLOWED_MODELS:
        raise InvalidRequestError(
            f"'{param}' may list at most {MAX_ALLOWED_MODELS} models, got {len(value)}", param=param
        )
    return [model_name(m, f"{param}[{i}]") for i, m in enumerate(value)]


def plan_name(value: object, param: str = "plan") -> str:
    return text(value, param, max_chars=MAX_PLAN_CHARS)


def note(value: object, param: str = "note") -> str | None:
    return text(value, param, max_chars=MAX_NOTE_CHARS, required=False)


def key_id(value: object, param: str = "key_id") -> str:
    if not isinstance(value, str) or not _KEY_ID.fullmatch(value):
        raise InvalidRequestError(
            f"'{param}' must be a key id such as key_0a1b..., got {shown(value)}", param=param
        )
    return value


def whole_number_text(value: str, param: str) -> int:
    """A whole number written in ASCII digits (optionally '-'), at most 20 characters: '1e3', '1_000',
    'NaN' and a 100,000-digit number are refused here, before int() sees them."""
    stripped = value.strip() if isinstance(value, str) else ""
    digits = stripped.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()) or len(stripped) > 20:
        raise InvalidRequestError(f"'{param}' must be a whole number, got {shown(value)}", param=param)
    return int(stripped)


def whole_number(value: object, param: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequestError(
            f"'{param}' must be a whole number from {low:,} to {high:,}, got {shown(value)}", param=param
        )
    return value


def optional_number(value: object, param: str, low: int, high: int) -> int | None:
    return None if value is None else whole_number(value, param, low, high)


def expires_in_days(value: object, param: str = "expires_in_days") -> timedelta | None:
    """None (never expires) or 1..MAX_EXPIRES_IN_DAYS days."""
    days = optional_number(value, param, 1, MAX_EXPIRES_IN_DAYS)
    return None if days is None else timedelta(days=days)


def requests_per_minute(value: object, param: str = "requests_per_minute") -> int | None:
    return optional_number(value, param, 1, MAX_REQUESTS_PER_MINUTE)


def tokens_per_minute(value: object, param: str = "tokens_per_minute") -> int | None:
    return optional_number(value, param, 1, MAX_TOKENS_PER_MINUTE)


def seconds(value: object, param: str, *, default: float, low: float, high: float) -> timedelta:
    """A duration in seconds (None: `default`), a finite number between `low` and `high`."""
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidRequestError(f"'{param}' must be between {low:g} and {high:.0f} seconds", param=param)
    return timedelta(seconds=value)


def time_in_window(value: datetime, param: str) -> datetime:
    """An aware UTC datetime within [EARLIEST_TIME, LATEST_TIME); a naive one is taken as UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    if not EARLIEST_TIME <= value < LATEST_TIME:
        raise InvalidRequestError(
            f"'{param}' must lie from {EARLIEST_TIME:%Y-%m-%d} to before {LATEST_TIME:%Y-%m-%d} UTC",
            param=param,
        )
    return value.astimezone(timezone.utc)


def parse_time(value: object, param: str) -> datetime | None:
    """An ISO 8601 date or datetime (`2025-01-31`, `2025-01-31T12:00Z`); without a zone it is UTC.

    None stays None. Dates outside [EARLIEST_TIME, LATEST_TIME) are refused."""
    if value is None:
        return None
    parsed = None
    if isinstance(value, str) and len(value) <= 64:
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            parsed = None
    if parsed is None:
        raise InvalidRequestError(
            f"'{param}' is not an ISO date or datetime: {shown(value)} (try 2025-01-31 or 2025-01-31T12:00Z)",
            param=param,
        )
    try:
        return time_in_window(parsed, param)
    except OverflowError:  # a zone offset that takes year 1 or 9999 out of datetime's range
        raise InvalidRequestError(f"'{param}' is out of range: {shown(value)}", param=param) from None


def epoch_seconds(value: object, param: str) -> int:
    """Epoch seconds as text or int, within [EARLIEST_TIME, LATEST_TIME)."""
    if isinstance(value, str) and len(value) <= 20 and re.fullmatch(r"[0-9]+", value.strip()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(f"'{param}' must be epoch seconds, got {shown(value)}", param=param)
    low, high = int(EARLIEST_TIME.timestamp()), int(LATEST_TIME.timestamp())
    if not low <= value < high:
        raise InvalidRequestError(
            f"'{param}' must be epoch seconds from {low} to {high - 1} (before {LATEST_TIME:%Y-%m-%d} UTC)",
            param=param,
        )
    return value


def distinct(values: Sequence[str], param: str, limit: int = MAX_FILTER_VALUES) -> list[str]:
    """A filter list without repeats (first occurrence kept), at most `limit` values of at most
    MAX_NAME_CHARS characters each: a value named twice must not count twice."""
    if len(values) > limit:
        raise InvalidRequestError(f"'{param}' takes at most {limit} values, got {len(values)}", param=param)
    return list(dict.fromkeys(text(v, param) for v in values))
