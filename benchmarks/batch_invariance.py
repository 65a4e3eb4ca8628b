"""What batch invariance costs (docs/batch_invariance.md), in one process, both sides in turns.

1. int4 with and without `batch_invariant`: two engines on SmolLM2-135M-Instruct (bf16 activations),
   each given c requests at once (c = 1, 16, 32 concurrent clients; prompts of --input-len random tokens,
   --output-len greedy tokens, ignore_eos), run in turns rep by rep after a warm-up, so that machine load
   hits both alike. Output tok/s (wall) and output tokens per CPU-second of this process (less
   sensitive to other work on the machine), median over the reps, and the ratios on / off.
2. bf16 by default: what changed is that norms and SiLU x up run in our kernels on prefills too (rows
   split over the threads) instead of torch's ops: both timed on SmolLM2's widths at 128-2,048 rows.
Timings are never asserted. Check `uptime` first; on a busy 2-core machine try `--threads 1`.

    .venv/bin/python benchmarks/batch_invariance.py
    .venv/bin/python benchmarks/batch_invariance.py --concurrency 1,16,32 --reps 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from llmaas import LLM, SamplingParams
from llmaas.cpu_info import cpu_model
from llmaas.kernels import cpu_ops


def run_level(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float]:
    """(output tok/s by the wall clock, output tokens per CPU-second of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    tokens = sum(o.completion_tokens for o in outs)
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def engine_table(args: argparse.Namespace) -> None:
    engines = {
        flag: LLM(args.model, quantization="int4", batch_invariant=flag, kv_cache_memory=256 * 2**20)
        for flag in (False, True)
    }
    vocab = engines[False].engine.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    print("| clients | tok/s off | tok/s on | on / off | tok per CPU-s off | on | on / off |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c in (int(x) for x in args.concurrency.split(",")):
        results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for rep in range(args.reps + 1):  # rep 0 warms up
            # fresh prompts each rep (the prefix cache never serves one), the same for both engines
            prompts = [[rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(c)]
            for flag in (False, True) if rep % 2 else (True, False):
                measured = run_level(engines[flag], prompts, params)
                if rep:
                    results[flag].append(measured)
        off = [statistics.median(r[i] for r in results[False]) for i in (0, 1)]
        on = [statistics.median(r[i] for r in results[True]) for i in (0, 1)]
        print(
            f"| {c} | {off[0]:.1f} | {on[0]:.1f} | {on[0] / off[0]:.2f}x "
            f"| {off[1]:.1f} | {on[1]:.1f} | {on[1] / off[1]:.2f}x |",
            flush=True,
        )


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def small_ops_table(reps: int) -> None:
    """Our norm and activation against torch's on prefill-sized steps (SmolLM2: 576 wide, 1,536 inner)."""
    print("\n| rows | RMSNorm torch (ms) | ours | SiLU x up torch (ms) | ours |")
    print("|---:|---:|---:|---:|---:|")
    weight = torch.randn(576).to(torch.bfloat16)
    for rows in (128, 512, 2048):
        x = torch.randn(rows, 576).to(torch.bfloat16)
        gate_up = torch.randn(rows, 2 * 1536).to(torch.bfloat16)
        gate, up = gate_up.chunk(2, dim=-1)
        cells = [
            best_of(lambda x=x: F.rms_norm(x, (576,), weight, 1e-5), reps),
            best_of(lambda x=x: cpu_ops.rms_norm(x, weight, 1e-5), reps),
            best_of(lambda g=gate, u=up: F.silu(g) * u, reps),
            best_of(lambda gu=gate_up: cpu_ops.silu_mul(gu), reps),
        ]
        print(f"| {rows} | " + " | ".join(f"{t * 1e3:.3f}" for t in cells) + " |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", default="1,16,32")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    if not cpu_ops.decode_matmul_available():
        print("batch invariance needs our kernels on a CPU with AVX-512 BF16", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_model()}, {os.cpu_count()} cores; "
        f"{args.threads} torch threads; torch {torch.__version__}; load average at start {load}"
    )
    print(f"- command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`\n")
    engine_table(args)
    small_ops_table(args.reps * 5)
    print(f"\nload average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
