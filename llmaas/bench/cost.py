"""Cost model: a bench result and the machine's price per hour -> cost and prices per 1M tokens, exactly.

A level that ran for T seconds on a machine that costs P USD/hour cost M = P * T / 3600 USD. M is split
between the level's input (prompt) tokens I and output tokens O in one of two stated ways:

- by time (default): the input tokens carry the share of request-time spent before the first token
  (prefill, and queueing for it), sum(TTFT) / sum(end-to-end latency) over the level's requests; the
  output tokens carry the rest. Cost per 1M input = M * share / I * 1e6; per 1M output = M * (1 - share)
  / O * 1e6.
- by a ratio R (`--output-weight R`): one output token costs R input tokens, as providers' price lists
  usually assume (R of 3 to 5). Cost per 1M input = M / (I + R * O) * 1e6; per 1M output = R times that.

The break-even price is that cost; the price at a margin m (a share of the price, 0 <= m < 1) is
cost / (1 - m), so `--margin 0.5` doubles the cost. All money is exact: the price per hour is parsed by
billing's `usd_to_micros`, measured seconds are taken to the microsecond, the arithmetic is done in
fractions, and each price is rounded once, up, to the micro-USD (a price never falls below its cost).
Cached input is priced as a stated fraction of input (`--cached-input-ratio`, default 0.1), since a
cached prompt token skips the prefill that the input price pays for.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from llmaas.billing.money import TOKENS_PER_PRICE_UNIT, format_usd, usd_to_micros
from llmaas.billing.prices import TIERS
from llmaas.errors import InvalidRequestError, LlmaasError

SECONDS_PER_HOUR = 3600
MICROS_PER_SECOND = 1_000_000


def _ceil(value: Fraction) -> int:
    return -(-value.numerator // value.denominator)


def _decimal_fraction(text: str | Decimal, param: str) -> Fraction:
    if isinstance(text, float):
        raise InvalidRequestError(f"'{param}' must be a decimal string, not a float", param)
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise InvalidRequestError(f"'{param}' is not a number: {text!r}", param) from None
    if not value.is_finite():
        raise InvalidRequestError(f"'{param}' must be finite", param)
    return Fraction(value)


def parse_margin(text: str | Decimal) -> Fraction:
    margin = _decimal_fraction(text, "margin")
    if not 0 <= margin < 1:
        raise InvalidRequestError(f"'margin' is a share of the price, 0 <= margin < 1; got {text}", "margin")
    return margin


def _micro_seconds(seconds: float) -> int:
    """A measured duration to the whole microsecond: the one place a float turns into an exact number."""
    return round(seconds * MICROS_PER_SECOND)


@dataclass(frozen=True)
class LevelCost:
    """Micro-USD per 1M tokens at one concurrency level (prices rounded up)."""

    concurrency: int
    request_rate: float | None
    output_tok_per_s: float
    ttft_p99_s: float | None
    errors: int
    machine_micros: Fraction  # what the level's wall time cost, exact
    input_share: Fraction  # of the machine cost carried by input tokens
    input_cost_per_m: Fraction
    output_cost_per_m: Fraction
    break_even_input_micros: int
    break_even_output_micros: int
    price_input_micros: int
    price_cached_input_micros: int
    price_output_micros: int


def level_cost(
    level: dict,
    usd_per_hour_micros: int,
    margin: Fraction,
    output_weight: Fraction | None = None,
    cached_input_ratio: Fraction = Fraction(1, 10),
) -> LevelCost:
    """The cost of one bench level's tokens (see the module docstring for the split)."""
    inputs, outputs = int(level["input_tokens"]), int(level["output_tokens"])
    if inputs <= 0 or outputs <= 0:
        raise InvalidRequestError(
            f"level at concurrency {level['concurrency']} has no completed tokens to price", "bench"
        )
    seconds = _micro_seconds(level["duration_s"])
    machine = Fraction(usd_per_hour_micros * seconds, SECONDS_PER_HOUR * MICROS_PER_SECOND)
    if output_weight is None:
        ttft, e2e = _micro_seconds(level["ttft_sum_s"]), _micro_seconds(level["e2e_sum_s"])
        share = Fraction(min(ttft, e2e), e2e) if e2e > 0 else Fraction(0)
        input_cost = machine * share * TOKENS_PER_PRICE_UNIT / inputs
        output_cost = machine * (1 - share) * TOKENS_PER_PRICE_UNIT / outputs
    else:
        unit = machine / (inputs + output_weight * outputs)
        input_cost = unit * TOKENS_PER_PRICE_UNIT
        output_cost = unit * output_weight * TOKENS_PER_PRICE_UNIT
        share = input_cost * inputs / TOKENS_PER_PRICE_UNIT / machine if machine else Fraction(0)
    price_in = _ceil(input_cost / (1 - margin))
    return LevelCost(
        concurrency=level["concurrency"],
        request_rate=level.get("request_rate"),
        output_tok_per_s=level["output_tok_per_s"],
        ttft_p99_s=level["ttft_s"].get("p99"),
        errors=level["errors"],
        machine_micros=machine,
        input_share=share,
        input_cost_per_m=input_cost,
        output_cost_per_m=output_cost,
        break_even_input_micros=_ceil(input_cost),
        break_even_output_micros=_ceil(output_cost),
        price_input_micros=price_in,
        price_cached_input_micros=_ceil(price_in * cached_input_ratio),
        price_output_micros=_ceil(output_cost / (1 - margin)),
    )


def machine_cost(
    level: LevelCost,
    input_tokens: int,
    cached_tokens: int,
    output_tokens: int,
    cached_input_ratio: Fraction = Fraction(1, 10),
) -> Fraction:
    """What serving these tokens cost the machine, micro-USD, exact: each token at the level's cost per
    1M (its break-even price), a cached prompt token at `cached_input_ratio` of an input one (it skips
    the prefill, as `--cached-input-ratio` prices it)."""
    uncached = input_tokens - cached_tokens
    input_cost = level.input_cost_per_m * (uncached + cached_input_ratio * cached_tokens)
    return (input_cost + level.output_cost_per_m * output_tokens) / TOKENS_PER_PRICE_UNIT


def load_bench(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidRequestError(f"cannot read bench result {path}: {exc.strerror}", "bench") from None
    except ValueError:
        raise InvalidRequestError(
            f"{path} is not JSON (expected the bench.json of `llmaas bench`)", "bench"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("peers"), dict):  # benchmarks/peers.py: llmaas's levels
        data = {"model": data.get("model"), **data["peers"].get("llmaas", {})}
    if not isinstance(data, dict) or not isinstance(data.get("levels"), list):
        raise InvalidRequestError(f"{path} is not a bench result (no 'levels')", "bench")
    if not any(lv.get("completed") for lv in data["levels"]):
        raise InvalidRequestError(f"{path} has no level with completed requests", "bench")
    return data


@dataclass(frozen=True)
class CostArgs:
    usd_per_hour_micros: int
    margin: Fraction
    output_weight: Fraction | None
    cached_input_ratio: Fraction


def parse_cost_args(
    usd_per_hour: str, margin: str, output_weight: str | None, cached_input_ratio: str
) -> CostArgs:
    if usd_per_hour is None:
        raise InvalidRequestError("the machine's price is needed: --usd-per-hour, e.g. 0.10", "usd_per_hour")
    per_hour = usd_to_micros(usd_per_hour, "usd_per_hour")
    if per_hour <= 0:
        raise InvalidRequestError("'usd_per_hour' must be positive", "usd_per_hour")
    weight = None
    if output_weight is not None:
        weight = _decimal_fraction(output_weight, "output_weight")
        if weight <= 0:
            raise InvalidRequestError("'output_weight' must be positive", "output_weight")
    ratio = _decimal_fraction(cached_input_ratio, "cached_input_ratio")
    if not 0 <= ratio <= 1:
        raise InvalidRequestError("'cached_input_ratio' must be within 0..1", "cached_input_ratio")
    return CostArgs(per_hour, parse_margin(margin), weight, ratio)


def bench_costs(bench: dict, cost_args: CostArgs) -> list[LevelCost]:
    return [
        level_cost(
            lv,
            cost_args.usd_per_hour_micros,
            cost_args.margin,
            cost_args.output_weight,
            cost_args.cached_input_ratio,
        )
        for lv in bench["levels"]
        if lv.get("completed") and lv.get("input_tokens") and lv.get("output_tokens")
    ]


def choose_level(
    costs: list[LevelCost], concurrency: int | None = None, max_ttft_p99_s: float | None = None
) -> LevelCost:
    """The level to price from: the one asked for, else the cheapest output among error-free levels whose
    p99 time to first token is within `max_ttft_p99_s` (when given)."""
    if concurrency is not None:
        for c in costs:
            if c.concurrency == concurrency:
                return c
        raise InvalidRequestError(
            f"no level at concurrency {concurrency}; the bench has "
            + ", ".join(str(c.concurrency) for c in costs),
            "concurrency",
        )
    fit = [
        c for c in costs if not c.errors and (max_ttft_p99_s is None or (c.ttft_p99_s or 0) <= max_ttft_p99_s)
    ]
    if not fit:
        raise InvalidRequestError(
            "no error-free level meets the latency bound (--max-ttft-p99)", "max_ttft_p99"
        )
    return min(fit, key=lambda c: (c.break_even_output_micros, c.break_even_input_micros))


def _usd(micros: int | Fraction) -> str:
    return format_usd(_ceil(Fraction(micros)))


def cost_table(costs: list[LevelCost], margin: Fraction) -> str:
    pct = f"{float(margin) * 100:g}%"
    head = (
        f"| concurrency | output tok/s | input share of time | cost / 1M input | cost / 1M output "
        f"| price at {pct} margin: input | cached input | output | errors |"
    )
    rows = [head, "|" + "---|" * 9]
    for c in costs:
        rows.append(
            f"| {c.concurrency} | {c.output_tok_per_s:.1f} | {float(c.input_share) * 100:.1f}% "
            f"| ${_usd(c.break_even_input_micros)} | ${_usd(c.break_even_output_micros)} "
            f"| ${_usd(c.price_input_micros)} | ${_usd(c.price_cached_input_micros)} "
            f"| ${_usd(c.price_output_micros)} | {c.errors} |"
        )
    return "\n".join(rows)


def _record(c: LevelCost) -> dict:
    out = asdict(c)
    out["machine_usd"] = str(
        Decimal(c.machine_micros.numerator) / Decimal(c.machine_micros.denominator) / 1_000_000
    )
    out["input_share"] = f"{float(c.input_share):.6f}"
    for key in ("input_cost_per_m", "output_cost_per_m", "machine_micros"):
        out.pop(key)
    for key in list(out):
        if key.endswith("_micros"):
            out[key.removesuffix("_micros") + "_usd_per_1m"] = format_usd(out.pop(key))
    return out


def price_strings(c: LevelCost) -> tuple[str, str, str]:
    """Input, cached input and output prices as exact USD strings per 1M tokens."""
    return (
        format_usd(c.price_input_micros),
        format_usd(c.price_cached_input_micros),
        format_usd(c.price_output_micros),
    )


def tier_prices(c: LevelCost) -> list[tuple[str, int, tuple[str, str, str], bool]]:
    """Per service tier at its default percentage of the price (billing.prices.TIERS): (tier, percent,
    (input, cached input, output) USD per 1M, rounded up; whether that is below the break-even cost)."""
    rows = [("default", 100)] + [(tier, percent) for tier, percent in TIERS.items()]
    out = []
    for tier, percent in rows:
        scaled = [
            _ceil(Fraction(m * percent, 100))
            for m in (c.price_input_micros, c.price_cached_input_micros, c.price_output_micros)
        ]
        below = scaled[0] < c.break_even_input_micros or scaled[2] < c.break_even_output_micros
        out.append((tier, percent, tuple(format_usd(m) for m in scaled), below))
    return out


# ---------------------------------------------------------------- CLI
def _add_cost_options(p: argparse.ArgumentParser, usd_required: bool) -> None:
    p.add_argument(
        "--usd-per-hour",
        required=usd_required,
        default=None,
        help="what the machine costs per hour, USD, exact (e.g. 0.10)",
    )
    p.add_argument(
        "--margin", default="0.5", help="share of the price kept as margin, 0 <= m < 1 (default 0.5)"
    )
    p.add_argument(
        "--output-weight",
        default=None,
        help="split the machine's time as if one output token cost this many input tokens "
        "(default: split by measured time before / after the first token)",
    )
    p.add_argument(
        "--cached-input-ratio",
        default="0.1",
        help="cached input price as a share of the input price (default 0.1)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="price from this level (default: the cheapest error-free level)",
    )
    p.add_argument(
        "--max-ttft-p99",
        type=float,
        default=None,
        help="when choosing the level, only those with p99 time to first token within this many seconds",
    )


def cmd_cost(args: argparse.Namespace) -> int:
    try:
        bench = load_bench(args.bench)
        cost_args = parse_cost_args(
            args.usd_per_hour, args.margin, args.output_weight, args.cached_input_ratio
        )
        costs = bench_costs(bench, cost_args)
        chosen = choose_level(costs, args.concurrency, args.max_ttft_p99)
        model = args.model or bench.get("model")
        if args.json:
            print(
                json.dumps(
                    {
                        "bench": str(args.bench),
                        "model": model,
                        "usd_per_hour": args.usd_per_hour,
                        "margin": args.margin,
                        "split": "time"
                        if cost_args.output_weight is None
                        else f"output weight {args.output_weight}",
                        "levels": [_record(c) for c in costs],
                        "chosen_concurrency": chosen.concurrency,
                    },
                    indent=2,
                )
            )
        else:
            split = (
                "by measured time before/after the first token"
                if cost_args.output_weight is None
                else f"one output token = {args.output_weight} input tokens"
            )
            print(f"{model}: machine at ${args.usd_per_hour}/hour, time split {split}; USD per 1M tokens")
            print()
            print(cost_table(costs, cost_args.margin))
            print()
            inp, cached, out = price_strings(chosen)
            print(
                f"At concurrency {chosen.concurrency}: "
                f"break-even ${format_usd(chosen.break_even_input_micros)} "
                f"input / ${format_usd(chosen.break_even_output_micros)} output; at {args.margin} margin: "
                f"input ${inp}, cached input ${cached}, output ${out} per 1M tokens"
            )
            print(
                "Per service tier (their default percentages of that price; `llmaas prices set --*-percent`):"
            )
            for tier, percent, (t_in, t_cached, t_out), below in tier_prices(chosen):
                note = "  (below break-even)" if below else ""
                print(
                    f"  {tier:8s} {percent:3d}%: input ${t_in}, cached input ${t_cached}, "
                    f"output ${t_out}{note}"
                )
        if args.write_prices:
            from llmaas.billing.db import default_database_url, open_database
            from llmaas.billing.prices import set_price

            db = open_database(args.database_url or default_database_url())
            try:
                inp, cached, out = price_strings(chosen)
                price = set_price(db, model, input_usd=inp, cached_input_usd=cached, output_usd=out)
            finally:
                db.close()
            print(
                f"Wrote price {price.id} for {model}: input {inp}, cached input {cached}, output {out} "
                "USD per 1M tokens",
                file=sys.stderr,
            )
    except LlmaasError as exc:
        where = f" (parameter: {exc.param})" if exc.param else ""
        print(f"llmaas: error: {exc.message}{where}", file=sys.stderr)
        return 2
    return 0


def add_cost_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cost", help="cost and prices per 1M tokens from a bench result", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("bench", help="bench.json written by `llmaas bench`")
    _add_cost_options(p, usd_required=True)
    p.add_argument("--model", default=None, help="model to price (default: the bench's)")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--write-prices",
        action="store_true",
        help="add the prices at the margin to the price book (billing database)",
    )
    p.add_argument(
        "--database-url", default=None, help="billing database (default: the SQLite file under LLMAAS_HOME)"
    )
    p.set_defaults(func=cmd_cost)


# ---------------------------------------------------------------- `llmaas prices set --from-cost`
def add_from_cost_args(p: argparse.ArgumentParser) -> None:
    """The options `llmaas prices set` takes to compute its prices from a bench result."""
    g = p.add_argument_group("from a bench result (instead of --input/--cached-input/--output)")
    g.add_argument("--from-cost", default=None, metavar="BENCH_JSON", help="bench.json of `llmaas bench`")
    g.add_argument(
        "--usd-per-hour", default=None, help="the machine's price per hour, USD (needed with --from-cost)"
    )
    g.add_argument("--margin", default="0.5", help="share of the price kept as margin (default 0.5)")
    g.add_argument("--output-weight", default=None, help="see `llmaas cost --help`")
    g.add_argument("--cached-input-ratio", default="0.1", help="cached input / input price (default 0.1)")
    g.add_argument("--concurrency", type=int, default=None, help="price from this level (default: cheapest)")
    g.add_argument("--max-ttft-p99", type=float, default=None, help="latency bound when choosing the level")
    p.set_defaults(fill_prices=resolve_price_args)


def resolve_price_args(args: argparse.Namespace) -> None:
    """Fill args.input / cached_input / output from --from-cost (billing checks they are all set)."""
    if getattr(args, "from_cost", None) is None:
        return
    given = [n for n in ("input", "cached_input", "output") if getattr(args, n) is not None]
    if given:
        raise InvalidRequestError(
            f"--from-cost computes every price; drop --{given[0].replace('_', '-')}", given[0]
        )
    cost_args = parse_cost_args(args.usd_per_hour, args.margin, args.output_weight, args.cached_input_ratio)
    chosen = choose_level(
        bench_costs(load_bench(args.from_cost), cost_args), args.concurrency, args.max_ttft_p99
    )
    args.input, args.cached_input, args.output = price_strings(chosen)
