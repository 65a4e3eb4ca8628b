"""Exact money: integer micro-USD everywhere, Decimal only at the edges (parsing and display).

Prices are quoted in USD per 1M tokens and stored as integer micro-USD per 1M tokens, so
$0.05 / 1M is stored as 50_000. The cost of n tokens is then n * price / 1_000_000 micro-USD,
an exact rational number.

Rounding rule: the exact cost of one request (all its line items together) is rounded once,
half up, to the micro-USD. That rounded number is what the request's usage record, its ledger
charge and every report carry, so reports and balances are sums of the same integers and agree to
the micro-USD. Nothing is ever a float.

Bounds: every money column is a signed 64-bit integer of micro-USD (max ~9.2e18, i.e. ~$9.2e12), and
the balance, hold and report queries SUM those columns. So one amount is at most MAX_AMOUNT_MICROS
($1e9), an account's unexpired credit at most MAX_ACCOUNT_CREDIT_MICROS ($1e10) and a price at most
MAX_PRICE_MICROS_PER_M ($100,000 per 1M tokens). An account's balance sums (credit, holds) thus stay
900 times below the column's limit, and 9,000 maximal amounts still fit in any sum. Text is parsed
by `usd_to_micros` alone: plain decimals only, no exponent, sign, underscore, NaN or infinity.
"""

from __future__ import annotations

import re
from decimal import Decimal

from llmaas.errors import InvalidRequestError

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per 1M tokens

MAX_AMOUNT_MICROS = 1_000_000_000 * MICROS_PER_USD  # one grant or top-up: $1,000,000,000
MAX_ACCOUNT_CREDIT_MICROS = 10 * MAX_AMOUNT_MICROS  # an account's unexpired credit: $10,000,000,000
MAX_PRICE_MICROS_PER_M = 100_000 * MICROS_PER_USD  # $100,000 per 1M tokens
INT64_MAX = 2**63 - 1  # what every money column (BIGINT) holds

# Digits, optionally a point and up to 6 more digits (checked after the match, for a clear message).
_PLAIN_DECIMAL = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?")
_MAX_TEXT = 40  # characters: longer than any amount within the bounds can be written


def shown(value: object, limit: int = 40) -> str:
    """repr(value) cut to `limit` characters, for error messages that echo what a caller sent."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..." + f" ({len(text)} characters)"


def usd_to_micros(
    amount: str | int | Decimal,
    param: str = "amount",
    allow_negative: bool = False,
    maximum: int = MAX_AMOUNT_MICROS,
) -> int:
    """'10.00' -> 10_000_000, the one parser of USD amounts.

    Takes a plain decimal string (`123`, `0.05`, `10.000001`), an int (whole USD) or a finite Decimal.
    Refuses floats, exponents (`1e3`), underscores (`1_000`), signs other than a leading '-' where
    negatives are allowed, NaN, infinity, more precision than one micro-USD, and magnitudes over
    `maximum` micro-USD.
    """
    if isinstance(amount, bool) or not isinstance(amount, str | int | Decimal):
        raise InvalidRequestError(
            f"'{param}' must be a decimal string such as \"10.50\", not {type(amount).__name__}", param=param
        )
    if isinstance(amount, Decimal):
        if not amount.is_finite():
            raise InvalidRequestError(f"'{param}' must be a finite number", param=param)
        if abs(amount) > Decimal(maximum) / MICROS_PER_USD:  # before formatting: 1E+999999 is short
            raise _too_large(param, maximum)
        text = format(amount, "f")
    else:
        text = str(amount).strip() if isinstance(amount, str) else str(amount)
    match = _PLAIN_DECIMAL.fullmatch(text) if len(text) <= _MAX_TEXT else None
    if match is None:
        if len(text) > _MAX_TEXT and re.fullmatch(r"-?[0-9]+(\.[0-9]*)?", text):
            raise _too_large(param, maximum)
        raise InvalidRequestError(
            f"'{param}' must be a plain decimal USD amount such as 10.50 (digits and one '.', no exponent, "
            f"sign or '_'), got {shown(amount)}",
            param=param,
        )
    sign, whole, fraction = match.groups()
    fraction = (fraction or "").rstrip("0")
    if len(fraction) > 6:
        raise InvalidRequestError(
            f"'{param}' has more precision than 0.000001 USD: {shown(amount)}", param=param
        )
    micros = int(whole) * MICROS_PER_USD + int(fraction.ljust(6, "0"))
    if sign and micros:
        if not allow_negative:
            raise InvalidRequestError(f"'{param}' must not be negative", param=param)
        micros = -micros
    check_micros(micros, param, maximum)
    return micros


def credit_to_micros(amount: str | int | Decimal, param: str = "amount_usd") -> int:
    """A grant or top-up: a positive amount of at most MAX_AMOUNT_MICROS (the /admin API and the CLI)."""
    micros = usd_to_micros(amount, param)
    if micros <= 0:
        raise InvalidRequestError(f"'{param}' must be positive, got {shown(amount)}", param=param)
    return micros


def _too_large(param: str, maximum: int) -> InvalidRequestError:
    return InvalidRequestError(f"'{param}' may be at most {format_usd(maximum)} USD", param=param)


def check_micros(micros: int, param: str, maximum: int = MAX_AMOUNT_MICROS) -> int:
    """An integer amount of micro-USD whose magnitude is at most `maximum`, else InvalidRequestError."""
    if not isinstance(micros, int) or isinstance(micros, bool):
        raise InvalidRequestError(f"'{param}' must be an integer number of micro-USD", param=param)
    if abs(micros) > maximum:
        raise _too_large(param, maximum)
    return micros


def check_credit_fits(unexpired_credit_micros: int, amount_micros: int, param: str = "amount_usd") -> None:
    """Refuses a credit that would take an account's unexpired credit over MAX_ACCOUNT_CREDIT_MICROS.

    Called inside the transaction that adds the credit (credits._add_credit), after the account lock.
    """
    check_micros(amount_micros, param)
    if unexpired_credit_micros + amount_micros > MAX_ACCOUNT_CREDIT_MICROS:
        raise InvalidRequestError(
            "this credit would take the account's unexpired credit over "
            f"{format_usd(MAX_ACCOUNT_CREDIT_MICROS)} USD, the most one account may hold "
            f"(it has {format_usd(unexpired_credit_micros)})",
            param=param,
        )


def micros_to_usd(micros: int) -> Decimal:
    """10_000_000 -> Decimal('10.000000'): exact, six places, for display and JSON."""
    return (Decimal(micros) / MICROS_PER_USD).quantize(Decimal("0.000001"))


def format_usd(micros: int) -> str:
    return f"{micros_to_usd(micros)}"


def round_half_up_div(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up (away from zero for halves), in integers only."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    sign = -1 if numerator < 0 else 1
    quotient, remainder = divmod(abs(numerator), denominator)
    if 2 * remainder >= denominator:
        quotient += 1
    return sign * quotient
