"""`llmaas bench`, `llmaas cost` and `llmaas roofline`: argument parsing and printing only."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from llmaas.cpu_info import cpu_model
from llmaas.errors import LlmaasError


def machine_info() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}


def _concurrency_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of whole numbers: {text!r}") from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _fail(exc: LlmaasError) -> int:
    where = f" (parameter: {exc.param})" if exc.param else ""
    print(f"llmaas: error: {exc.message}{where}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------ bench
def cmd_bench(args: argparse.Namespace) -> int:
    from llmaas.bench.prompts import make_prompt_set
    from llmaas.bench.report import markdown_report, plot_throughput_latency, write_json
    from llmaas.bench.runner import BenchError, LevelSpec, Target, check_levels, run_levels

    out_dir = Path(args.out)
    json_path = out_dir / "bench.json"
    result: dict = {
        "url": args.url,
        "model": args.model,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["llmaas", *sys.argv[1:]]),
        "machine": machine_info(),
        "load_avg_start": list(os.getloadavg()),
        "output_len": args.output_len,
        "ignore_eos": not args.no_ignore_eos,
        "levels": [],
        "error": None,
    }
    try:
        check_levels(args.concurrency, args.request_rate)
        for name in ("num_prompts", "output_len"):
            if getattr(args, name) <= 0:
                raise BenchError(f"--{name.replace('_', '-')} must be positive", name)
        if args.input_len <= 0 and not args.prompts_file:
            raise BenchError("--input-len must be positive", "input_len")
        if args.shared_prefix_len < 0:
            raise BenchError("--shared-prefix-len must not be negative", "shared_prefix_len")
        levels = [LevelSpec(c, args.request_rate) for c in args.concurrency]
        n, warm = args.num_prompts, args.warmup
        total = n * len(levels) + warm
        prompt_set = make_prompt_set(
            args.model,
            total,
            args.input_len,
            args.shared_prefix_len,
            args.prompts_file,
            args.tokenizer,
            args.seed,
        )
    except LlmaasError as exc:
        result["error"] = exc.message
        write_json(result, json_path)
        return _fail(exc)
    lengths = prompt_set.token_lengths
    if prompt_set.source == "synthetic":
        described = (
            f"{args.input_len} unique tokens each"
            + (f" after a shared prefix of {args.shared_prefix_len}" if args.shared_prefix_len else "")
            + f" ({min(lengths)}-{max(lengths)} tokens by {prompt_set.tokenizer}"
            + ("" if prompt_set.exact else ", approximate")
            + ")"
        )
    else:
        distinct = len(set(prompt_set.prompts))
        described = f"{distinct} distinct, {min(lengths)}-{max(lengths)} tokens by {prompt_set.tokenizer}"
    result["prompts"] = {
        "source": prompt_set.source,
        "description": described,
        "tokenizer": prompt_set.tokenizer,
        "lengths_exact": prompt_set.exact,
        "input_len": args.input_len,
        "shared_prefix_len": args.shared_prefix_len,
        "num_prompts_per_level": n,
    }
    # Each level gets its own prompts: a later level must not find an earlier one's in a prefix cache.
    per_level = [prompt_set.prompts[warm + i * n : warm + (i + 1) * n] for i in range(len(levels))]
    per_level_lengths = [lengths[warm + i * n : warm + (i + 1) * n] for i in range(len(levels))]
    target = Target(args.url, args.model, args.api_key, args.timeout, not args.no_ignore_eos, args.extra_body)

    def on_level(summary: dict) -> None:
        result["levels"].append(summary)
        write_json(result, json_path)
        (out_dir / "bench.md").write_text(markdown_report(result), encoding="utf-8")

    status = 0
    try:
        result["error"] = asyncio.run(
            run_levels(
                target,
                per_level,
                per_level_lengths,
                levels,
                args.output_len,
                on_level,
                prompt_set.prompts[:warm],
                progress=not args.no_progress,
                seed=args.seed,
            )
        )
    except LlmaasError as exc:
        result["error"] = exc.message
        status = _fail(exc)
    except KeyboardInterrupt:
        result["error"] = "interrupted"
        status = 130
    result["load_avg_end"] = list(os.getloadavg())
    write_json(result, json_path)
    report = markdown_report(result)
    (out_dir / "bench.md").write_text(report, encoding="utf-8")
    if result["levels"]:
        plot_throughput_latency(
            {args.model: result["levels"]},
            out_dir / "bench.png",
            f"{args.model} at {args.url}, {result['date']}",
        )
    print(report)
    print(
        f"wrote {json_path}, {out_dir / 'bench.md'}"
        + (f", {out_dir / 'bench.png'}" if result["levels"] else ""),
        file=sys.stderr,
    )
    if status:
        return status
    if result["error"] or any(lv["errors"] for lv in result["levels"]):
        errors = sum(lv["errors"] for lv in result["levels"])
        print(f"llmaas: error: {result['error'] or f'{errors} request(s) failed'}", file=sys.stderr)
        return 1
    return 0


def add_bench_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench`, `cost` and `roofline` to `llmaas`'s subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="load-test an OpenAI-compatible server (throughput and latency per concurrency)",
        description="Streaming load against any OpenAI-compatible server's /v1/completions. Writes "
        "bench.json, bench.md and bench.png to --out.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="model name the server serves")
    p.add_argument(
        "--concurrency",
        type=_concurrency_list,
        default=[1, 4, 16, 32],
        help="comma-separated levels of requests in flight (default 1,4,16,32)",
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="requests/s with Poisson arrivals (capped by the concurrency); default: all at once",
    )
    p.add_argument("--num-prompts", type=int, default=64, help="requests per level (default 64)")
    p.add_argument(
        "--input-len", type=int, default=128, help="unique prompt tokens per request (default 128)"
    )
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument(
        "--shared-prefix-len",
        type=int,
        default=0,
        help="tokens of a prefix shared by every prompt, before the unique --input-len ones",
    )
    p.add_argument(
        "--prompts-file",
        default=None,
        help="prompts instead of synthetic ones: JSON lines with a 'prompt' field, or one per line",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer for exact prompt lengths: catalog name, HF directory or .gguf "
        "(default: --model when it resolves locally, else the default model's, approximate)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LLMAAS_API_KEY"),
        help="sent as Authorization: Bearer (default: $LLMAAS_API_KEY)",
    )
    p.add_argument("--warmup", type=int, default=2, help="requests sent before the levels, not counted")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send ignore_eos (for servers that refuse it; outputs may then stop early)",
    )
    p.add_argument(
        "--extra-body",
        type=_json_object,
        default=None,
        help="JSON object merged into every request body, e.g. '{\"top_k\": 1}'",
    )
    p.add_argument("--seed", type=int, default=0, help="prompt offsets and Poisson arrivals")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default="results", help="directory for bench.json, bench.md, bench.png")
    p.set_defaults(func=cmd_bench)

    from llmaas.bench.cost import add_cost_parser
    from llmaas.bench.roofline import add_roofline_parser

    add_cost_parser(subparsers)
    add_roofline_parser(subparsers)
