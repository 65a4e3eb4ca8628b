"""Percentiles, the cost model's exact money, `prices set --from-cost`, and `llmaas roofline`."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from llmaas.bench.cost import level_cost, parse_margin
from llmaas.bench.roofline import model_figures, safetensors_param_count
from llmaas.bench.stats import distribution, percentile
from llmaas.billing.db import open_database
from llmaas.billing.prices import list_prices
from llmaas.cli import main
from llmaas.errors import InvalidRequestError
from tests.model_factory import make_tiny_checkpoint


def test_percentile_interpolates_like_numpy():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert percentile(list(range(1, 101)), 90) == pytest.approx(90.1)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.5], 99) == 7.5
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1], 101)
    assert distribution([1, 2, 3, 4]) == {
        "mean": 2.5,
        "p50": 2.5,
        "p90": 3.7,
        "p99": pytest.approx(3.97),
        "count": 4,
    }


def level(**overrides):
    base = {
        "concurrency": 4,
        "request_rate": None,
        "output_tok_per_s": 300.0,
        "ttft_s": {"p99": 0.5},
        "errors": 0,
        "completed": 10,
        "duration_s": 10.0,
        "input_tokens": 1000,
        "output_tokens": 3000,
        "ttft_sum_s": 1.0,
        "e2e_sum_s": 4.0,
    }
    return {**base, **overrides}


def test_cost_split_by_time_is_exact():
    # $0.36/hour for 10 s = 1,000 micro-USD; a quarter of request-time precedes the first token.
    c = level_cost(level(), usd_per_hour_micros=360_000, margin=Fraction(1, 2))
    assert c.machine_micros == 1000 and c.input_share == Fraction(1, 4)
    assert (c.break_even_input_micros, c.break_even_output_micros) == (250_000, 250_000)  # $0.25 / 1M each
    assert (c.price_input_micros, c.price_output_micros) == (500_000, 500_000)  # 50% margin doubles
    assert c.price_cached_input_micros == 50_000  # 0.1 of input


def test_cost_by_output_weight_rounds_up_once():
    # 1,000 micro-USD over 1,000 + 4 x 3,000 = 13,000 input-token equivalents.
    c = level_cost(level(), 360_000, Fraction(0), output_weight=Fraction(4))
    assert c.input_cost_per_m == Fraction(1_000_000, 13)
    assert c.break_even_input_micros == 76_924  # 76,923.08 rounded up: a price never undercuts its cost
    assert c.break_even_output_micros == 307_693  # 307,692.31 up
    assert c.price_input_micros == c.break_even_input_micros  # margin 0
    # What the prices recover covers the machine: 1,000 x 76,924 + 3,000 x 307,693 >= 1,000 x 1e6.
    assert 1000 * c.price_input_micros + 3000 * c.price_output_micros >= 1000 * 1_000_000


def test_cost_takes_seconds_to_the_microsecond():
    c = level_cost(level(duration_s=1.0000004), 3_600_000_000, Fraction(0))  # $3,600/hour = 1e6 micros/s
    assert c.machine_micros == 1_000_000


def test_margin_and_price_validation():
    assert parse_margin("0.25") == Fraction(1, 4)
    for bad in ("1", "-0.1", "abc", "nan"):
        with pytest.raises(InvalidRequestError) as exc:
            parse_margin(bad)
        assert exc.value.param == "margin"
    with pytest.raises(InvalidRequestError):
        level_cost(level(output_tokens=0), 360_000, Fraction(0))


@pytest.fixture
def bench_file(tmp_path):
    path = tmp_path / "bench.json"
    levels = [level(concurrency=1, duration_s=40.0), level(), level(concurrency=16, errors=2)]
    path.write_text(json.dumps({"model": "m", "url": "http://x", "levels": levels}))
    return path


def test_cost_command_prints_exact_prices(bench_file, capsys):
    assert main(["cost", str(bench_file), "--usd-per-hour", "0.36", "--margin", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| 4 | 300.0 | 25.0% | $0.250000 | $0.250000 | $0.500000 | $0.050000 | $0.500000 | 0 |" in out
    # The cheapest error-free level is chosen (concurrency 16 had errors).
    assert "At concurrency 4: break-even $0.250000 input / $0.250000 output" in out
    # Per tier at its default percentage: flex and batch at 50% of a 50%-margin price are at break-even.
    assert "priority 200%: input $1.000000, cached input $0.100000, output $1.000000" in out
    assert "flex      50%: input $0.250000, cached input $0.025000, output $0.250000\n" in out
    assert main(["cost", str(bench_file), "--usd-per-hour", "0.36", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["chosen_concurrency"] == 4 and data["levels"][0]["break_even_input_usd_per_1m"] == "1.000000"


def test_cost_bad_inputs(bench_file, tmp_path, capsys):
    assert main(["cost", str(bench_file), "--usd-per-hour", "0.1234567"]) == 2
    assert "usd_per_hour" in capsys.readouterr().err
    assert main(["cost", str(bench_file), "--usd-per-hour", "0.1", "--margin", "1.5"]) == 2
    assert main(["cost", str(tmp_path / "missing.json"), "--usd-per-hour", "0.1"]) == 2
    assert main(["cost", str(bench_file), "--usd-per-hour", "0.1", "--concurrency", "3"]) == 2
    assert "no level at concurrency 3" in capsys.readouterr().err


def test_prices_from_cost_and_write_prices(bench_file, tmp_path):
    url = f"sqlite:///{tmp_path / 'billing.sqlite3'}"
    args = [
        "--from-cost",
        str(bench_file),
        "--usd-per-hour",
        "0.36",
        "--margin",
        "0.5",
        "--database-url",
        url,
    ]
    assert main(["prices", "set", "smollm2-135m", *args]) == 0
    assert main(["prices", "set", "smollm2-135m", *args, "--input", "1"]) == 2  # one or the other
    assert main(["prices", "set", "smollm2-135m", "--from-cost", str(bench_file), "--database-url", url]) == 2
    assert main(["prices", "set", "x", "--input", "1", "--cached-input", "0.5", "--database-url", url]) == 2
    cost_args = ["--usd-per-hour", "0.36", "--margin", "0", "--concurrency", "1", "--database-url", url]
    assert main(["cost", str(bench_file), *cost_args, "--write-prices", "--model", "other"]) == 0
    db = open_database(url)
    try:
        [p] = list_prices(db, "smollm2-135m")
        assert (p.input_micros_per_m, p.cached_input_micros_per_m, p.output_micros_per_m) == (
            500_000,
            50_000,
            500_000,
        )
        [q] = list_prices(db, "other")  # concurrency 1 ran 40 s: four times the cost
        assert (q.input_micros_per_m, q.output_micros_per_m) == (1_000_000, 1_000_000)
    finally:
        db.close()


def test_roofline_prints_ceilings(tmp_path, capsys):
    model_dir = make_tiny_checkpoint("llama", tmp_path)
    figures = model_figures(str(model_dir), "bfloat16")
    total, _ = safetensors_param_count(model_dir)
    assert figures.total_params == total == figures.active_params_per_token
    assert figures.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2  # layers x (k, v) x kv heads x head_dim x bf16
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"url": "u", "levels": [
        {"concurrency": 1, "completed": 3, "tpot_s": {"p50": 0.02}, "total_tok_per_s": 90.0},
        {"concurrency": 8, "completed": 3, "tpot_s": {"p50": 0.05}, "total_tok_per_s": 400.0},
    ]}))  # fmt: skip
    assert main(["roofline", "--model", str(model_dir), "--bench", str(bench), "--bandwidth-mb", "64"]) == 0
    out = capsys.readouterr().out
    assert "GB/s" in out and "GFLOP/s" in out
    assert "| batch-1 decode (memory bandwidth) |" in out and "| 50.0 |" in out  # 1 / 0.02 s
    assert "| full batch (compute) |" in out and "| 400.0 |" in out
    assert main(["roofline", "--model", str(tmp_path / "nope"), "--no-engine"]) == 2


def test_roofline_counts_quantized_weight_bytes(tmp_path):
    model_dir = make_tiny_checkpoint("llama", tmp_path)
    plain = model_figures(str(model_dir), "bfloat16")
    int8 = model_figures(str(model_dir), "bfloat16", "int8")
    int4 = model_figures(str(model_dir), "bfloat16", "int4")
    assert int8.weight_bytes_per_step() * 2 == plain.weight_bytes_per_step()
    head, body = int4.head_params, int4.streamed_params - int4.head_params
    assert head == 320 * 64  # vocab x hidden of the tiny model
    assert int4.weight_bytes_per_step() == int(body * (0.5 + 4 / 32) + head * (1 + 4 / 32))
    assert int4.weight_format == "int4 weights, bfloat16 compute"


def test_cost_reads_llmaas_levels_from_a_peers_json(tmp_path, capsys):
    path = tmp_path / "peers.json"
    path.write_text(
        json.dumps({"model": "m", "peers": {"llmaas": {"levels": [level()]}, "other": {"levels": []}}})
    )
    assert main(["cost", str(path), "--usd-per-hour", "0.36", "--margin", "0"]) == 0
    assert "At concurrency 4: break-even $0.250000 input / $0.250000 output" in capsys.readouterr().out
