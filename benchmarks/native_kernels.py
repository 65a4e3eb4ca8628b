"""Batch-1 decode with the native CPU kernels on and off, for plain and int4 weights, in one process.

SmolLM2-135M, one short prompt, 128 greedy tokens (ignore_eos), the engine's auto dtype. For each
weight format two engines, one loaded and run with `cpu_ops.ENABLED` off (what a machine without a
compiler runs: oneDNN, torch's int4 kernel and torch ops) and one with it on, run in turns after a
warm-up, so machine load hits both alike; the table shows the median of the reps and the speed-up. Timings are
never asserted. Check `uptime` first: on a busy 2-core machine prefer `--threads 1`.

    .venv/bin/python benchmarks/native_kernels.py --threads 2 --reps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from llmaas import LLM, SamplingParams
from llmaas.cpu_info import cpu_model
from llmaas.kernels import cpu_ops

PROMPT = "The history of the Roman Empire is"


def decode_rate(llm: LLM, params: SamplingParams) -> float:
    start = time.perf_counter()
    out = llm.generate([PROMPT], params)[0]
    return out.completion_tokens / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--weights", default="none,int4", help="comma-separated: none, int8, int4")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_ops.available():
        print("native kernels unavailable here (no compiler, or LLMAAS_CPU_KERNELS=0)", file=sys.stderr)
        return 1
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_model()}, {os.cpu_count()} cores; "
        f"{args.threads} torch threads; load average at start {load}"
    )
    print(f"- command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`\n")
    print("| weights | kernels off (tok/s) | kernels on (tok/s) | speed-up |")
    print("|---|---:|---:|---:|")
    for weights in args.weights.split(","):
        engines = {}
        for enabled in (False, True):  # each built as it runs: the layers pick their layouts at load
            cpu_ops.ENABLED = enabled
            engines[enabled] = LLM(
                model=args.model, dtype=args.dtype, quantization=None if weights == "none" else weights
            )
        rates: dict[bool, list[float]] = {False: [], True: []}
        for enabled in (False, True):  # warm-up, both paths
            cpu_ops.ENABLED = enabled
            decode_rate(engines[enabled], params)
        for _ in range(args.reps):
            for enabled in (False, True):
                cpu_ops.ENABLED = enabled
                rates[enabled].append(decode_rate(engines[enabled], params))
        off, on = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"| {weights} | {off:.1f} | {on:.1f} | {on / off:.2f}x |", flush=True)
        del engines
    cpu_ops.ENABLED = True
    print(f"\nload average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
