"""A bench result as JSON, a markdown table and a PNG plot of throughput against latency."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(result: dict, path: Path) -> None:
    """Written to a temporary file then renamed, so a crash never leaves half a JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _ms(dist: dict, q: str) -> str:
    value = dist.get(q)
    return "-" if value is None else f"{value * 1000:.0f}"


def _three(dist: dict) -> str:
    return " / ".join(_ms(dist, q) for q in ("p50", "p90", "p99"))


def markdown_table(levels: list[dict]) -> str:
    """One row per level; latencies in ms as p50 / p90 / p99."""
    head = (
        "| concurrency | rate (req/s) | requests ok / sent | req/s | output tok/s | total tok/s "
        "| TTFT ms p50 / p90 / p99 | TPOT ms | ITL ms | E2E ms | errors | load avg (1 min) |"
    )
    rows = [head, "|" + "---|" * 12]
    for lv in levels:
        rate = "all at once" if lv.get("request_rate") is None else f"{lv['request_rate']:g}"
        rows.append(
            f"| {lv['concurrency']} | {rate} | {lv['completed']} / {lv['num_requests']} "
            f"| {lv['requests_per_s']:.2f} | {lv['output_tok_per_s']:.1f} | {lv['total_tok_per_s']:.1f} "
            f"| {_three(lv['ttft_s'])} | {_three(lv['tpot_s'])} | {_three(lv['itl_s'])} "
            f"| {_three(lv['e2e_s'])} "
            f"| {lv['errors']} | {lv['load_avg'][0]:.2f} |"
        )
    return "\n".join(rows)


def markdown_report(result: dict) -> str:
    lines = [
        f"# Load benchmark: {result['model']} at {result['url']}",
        "",
        f"- date: {result['date']}; machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"load average at start {result['load_avg_start'][0]:.2f}",
        f"- command: `{result['command']}`",
        f"- prompts: {result['prompts']['source']}, {result['prompts']['description']}; "
        f"output {result['output_len']} tokens each (ignore_eos={result['ignore_eos']}), greedy",
        f"- token counts: {', '.join(sorted({lv['token_counts'] for lv in result['levels']})) or '-'}",
        "",
        markdown_table(result["levels"]),
    ]
    if result.get("error"):
        lines += ["", f"**Stopped early:** {result['error']}"]
    failed = [lv for lv in result["levels"] if lv["errors"]]
    for lv in failed:
        for message, count in lv["error_samples"].items():
            lines.append(f"- concurrency {lv['concurrency']}: {count} x {message}")
    return "\n".join(lines) + "\n"


def plot_throughput_latency(series: dict[str, list[dict]], path: Path, title: str) -> None:
    """Output tok/s (x) against TTFT p50/p99 and TPOT p50 (y), one line per series, points labelled by
    concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = [
        (axes[0], [("ttft_s", "p50", "-o"), ("ttft_s", "p99", "--^")], "time to first token (s)"),
        (axes[1], [("tpot_s", "p50", "-o"), ("e2e_s", "p99", "--^")], "TPOT p50 / end-to-end p99 (s)"),
    ]
    for ax, metrics, ylabel in panels:
        for name, levels in series.items():
            levels = [lv for lv in levels if lv["completed"]]
            if not levels:
                continue
            x = [lv["output_tok_per_s"] for lv in levels]
            for metric, q, style in metrics:
                y = [lv[metric][q] for lv in levels]
                label = f"{name} {metric.removesuffix('_s').upper()} {q}"
                ax.plot(x, y, style, label=label)
                if q == "p50":
                    for xi, yi, lv in zip(x, y, levels):
                        ax.annotate(
                            f"c={lv['concurrency']}",
                            (xi, yi),
                            fontsize=7,
                            xytext=(3, 3),
                            textcoords="offset points",
                        )
        ax.set_xlabel("output tokens/s (aggregate)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
