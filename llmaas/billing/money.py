"""Exact money: integer micro-USD everywhere, Decimal only at the edges (parsing and display).

Prices are quoted in USD per 1M tokens and stored as integer micro-USD per 1M tokens, so
$0.05 / 1M is stored as 50_000. The cost of n tokens is then n * price / 1_000_000 micro-USD,
an exact rational number.

Rounding rule: the exact cost of one request (all its line items together) is rounded once,
half up, to the micro-USD. That rounded number is what the request's usage record, its ledger
charge and every report carry, so reports and balances are sums of the same integers and agree to
the micro-USD. Nothing is ever a float.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from llmaas.errors import InvalidRequestError

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per 1M tokens


def usd_to_micros(amount: str | int | Decimal, param: str = "amount", allow_negative: bool = False) -> int:
    """'10.00' -> 10_000_000. Refuses floats, non-numbers and more precision than a micro-USD."""
    if isinstance(amount, float) or isinstance(amount, bool):
        raise InvalidRequestError(f"'{param}' must be a decimal string or Decimal, not a float", param=param)
    try:
        value = Decimal(str(amount).strip())
    except InvalidOperation:
        raise InvalidRequestError(f"'{param}' is not a number: {amount!r}", param=param) from None
    if not value.is_finite():
        raise InvalidRequestError(f"'{param}' must be finite", param=param)
    micros = value * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise InvalidRequestError(f"'{param}' has more precision than 0.000001 USD: {amount}", param=param)
    if micros < 0 and not allow_negative:
        raise InvalidRequestError(f"'{param}' must not be negative", param=param)
    return int(micros)


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
