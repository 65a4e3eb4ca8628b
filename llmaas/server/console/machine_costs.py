"""What a model's tokens cost the machine: a bench result and a price per hour, as `llmaas cost` says.

`llmaas serve --usd-per-hour 0.10 --cost-bench bench.json` (one bench per model: `[MODEL=]PATH`, the
model defaulting to the one the bench names) gives the operator's margin page its machine cost. The
arithmetic is llmaas.bench.cost's: the cheapest error-free level's cost per 1M input and output tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from llmaas.bench.cost import LevelCost, bench_costs, choose_level, load_bench, parse_cost_args
from llmaas.errors import InvalidRequestError


@dataclass(frozen=True)
class MachineCosts:
    usd_per_hour: str | None = None  # the default; the margin page may ask "what if" with another
    benches: dict[str, tuple[str, dict]] = field(default_factory=dict)  # model -> (path, bench result)
    cached_input_ratio: Fraction = Fraction(1, 10)

    @classmethod
    def load(cls, usd_per_hour: str | None, bench_args: list[str] | None) -> MachineCosts:
        benches: dict[str, tuple[str, dict]] = {}
        for arg in bench_args or []:
            model, _, path = arg.partition("=") if "=" in arg else ("", "", arg)
            bench = load_bench(path)
            model = model or bench.get("model")
            if not model:
                raise InvalidRequestError(
                    f"{path} names no model: pass --cost-bench MODEL={path}", "cost_bench"
                )
            benches[model] = (path, bench)
        if usd_per_hour is not None:
            parse_cost_args(usd_per_hour, "0", None, "0.1")  # checked at start, not at the first page view
        return cls(usd_per_hour, benches)

    def levels(self, usd_per_hour: str | None) -> dict[str, tuple[str, LevelCost]]:
        """model -> (bench path, the level priced from) at `usd_per_hour` (or the configured one)."""
        per_hour = usd_per_hour or self.usd_per_hour
        if per_hour is None or not self.benches:
            return {}
        args = parse_cost_args(per_hour, "0", None, str(float(self.cached_input_ratio)))
        return {
            model: (path, choose_level(bench_costs(bench, args)))
            for model, (path, bench) in self.benches.items()
        }
