"""Our native matmuls (llmaas/kernels/decode_matmul.cpp) against torch's, on SmolLM2-135M's layer shapes.

For each number of rows M (tokens in a step), the 30 layers' four projections (qkv 960 x 576, o 576 x 576,
gate_up 3072 x 576, down 576 x 1536), each layer with its own random weights so that they stream from
memory as in a real step, run through:
- int4 weights (groups of 32, as `--quantization int4`): our kernel, and torch's CPU int4 kernel
  (`_weight_int4pack_mm_for_cpu`, which Int4Linear used before; its fp32 path is not timed);
- bf16 weights: our kernel, oneDNN's GEMM on pre-packed weights (`mkldnn._linear_pointwise`, what the
  engine used before) and plain `F.linear`;
then the output head under int4 (int8 in groups of 32, 49,152 x 576) at 1-4 rows: our int8 kernel, the
int8 GEMV it replaced, and our bf16 kernel on the dequantized weights.
Contenders run in turns, rep by rep, after a warm-up; the table shows the median time per pass over all
120 matmuls and each contender's time over ours. Timings are never asserted. Needs a CPU with AVX-512
BF16 and a C++ compiler; check `uptime` first (a busy machine measures its neighbours).

    .venv/bin/python benchmarks/decode_matmul.py
    .venv/bin/python benchmarks/decode_matmul.py --rows 1,4,16,64,512 --threads 1 --reps 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from llmaas.cpu_info import cpu_model
from llmaas.kernels import cpu_ops
from llmaas.models.packed_linear import pack_weight, packed_linear
from llmaas.models.quantize import dequantize_int4_groups, int4_kernel_available, quantize_int4_groups

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per SmolLM2 layer
LAYERS = 30


class Layer:
    """One projection's weight in every layout the contenders read."""

    def __init__(self, n: int, k: int, generator: torch.Generator):
        weight = (torch.randn(n, k, generator=generator) * 0.05).to(torch.bfloat16)
        q, scale, zero = quantize_int4_groups(weight)
        self.n, self.k = n, k
        self.bf16 = dequantize_int4_groups(q, scale, zero).to(torch.bfloat16)
        self.native_int4 = cpu_ops.pack_int4_for_matmul(q, scale, zero)
        self.native_bf16 = cpu_ops.pack_bf16_for_matmul(self.bf16)
        self.onednn = pack_weight(self.bf16)
        self.torch_int4 = None
        if int4_kernel_available():
            self.torch_int4 = (
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                torch.stack([scale.t(), zero.t()], dim=-1).contiguous(),
            )


def contenders(
    layers: list[Layer], rows: int, threads: int
) -> dict[str, Callable[[torch.Tensor, Layer], object]]:
    """Each contender's call for this many rows; the int4 kernels only for decode-sized steps."""
    out: dict[str, Callable] = {}
    if rows <= cpu_ops.MAX_TOKENS:
        out["int4 ours"] = lambda x, w: cpu_ops.int4_matmul(x, w.native_int4, threads)
        if layers[0].torch_int4 is not None:
            out["int4 torch"] = lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, w.torch_int4[0], 32, w.torch_int4[1]
            )
    out["bf16 ours"] = lambda x, w: cpu_ops.bf16_matmul(x, w.native_bf16, threads)
    if layers[0].onednn is not None:
        out["bf16 oneDNN packed"] = lambda x, w: packed_linear(x, w.onednn, None)
    out["bf16 F.linear"] = lambda x, w: F.linear(x, w.bf16)
    return out


def print_head_table(threads: int, reps: int, generator: torch.Generator) -> None:
    """The output head under int4 (int8 in groups of 32): 49,152 x 576 as SmolLM2's, 1 to 4 rows."""
    from llmaas.models.quantize import Int8GroupLinear

    linear = torch.nn.Linear(576, 49152, bias=False).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(49152, 576, generator=generator) * 0.05)
    head = Int8GroupLinear(linear)
    native_bf16 = cpu_ops.pack_bf16_for_matmul(head.dequantized_weight())
    print("\nOutput head, int8 in groups of 32 (49,152 x 576): ms per call\n")
    print("| rows | int8 ours | int8 GEMV (before) | bf16 ours |")
    print("|---:|---:|---:|---:|")
    for rows in range(1, cpu_ops.MAX_INT8_MATMUL_ROWS + 1):
        x = torch.randn(rows, 576, generator=generator).to(torch.bfloat16)
        runs = [
            lambda x=x: cpu_ops.int8_matmul(x, head.native_int8, threads),
            lambda x=x: cpu_ops.int8_group_gemv(x, head.qweight, head.group_scales, threads),
            lambda x=x: cpu_ops.bf16_matmul(x, native_bf16, threads),
        ]
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(reps + 1):  # the first round warms up
            for i, fn in enumerate(runs):
                start = time.perf_counter()
                for _ in range(10):
                    fn()
                times[i].append((time.perf_counter() - start) / 10)
        cells = " | ".join(f"{statistics.median(t[1:]) * 1e3:.2f}" for t in times)
        print(f"| {rows} | {cells} |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,24,32,64,512,2048", help="comma-separated rows (tokens)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if not cpu_ops.decode_matmul_available():
        print("the native matmuls need a CPU with AVX-512 BF16 and a C++ compiler", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    layers = [Layer(n, k, generator) for _ in range(LAYERS) for n, k in LAYER_SHAPES]
    macs_per_row = sum(layer.n * layer.k for layer in layers)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_model()}, {os.cpu_count()} cores; "
        f"{args.threads} threads; torch {torch.__version__}; load average at start {load}"
    )
    print(f"- command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`")
    print(f"- ms per pass over {len(layers)} matmuls; time / ours: the contender's over ours, same weights\n")
    print("| rows | contender | ms | GFLOP/s | time / ours |")
    print("|---:|---|---:|---:|---:|")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {k: torch.randn(rows, k, generator=generator).to(torch.bfloat16) for k in (576, 1536)}
        runs = contenders(layers, rows, args.threads)

        def one_pass(fn: Callable, inputs: dict[int, torch.Tensor] = inputs) -> float:
            start = time.perf_counter()
            for layer in layers:
                fn(inputs[layer.k], layer)
            return time.perf_counter() - start

        times: dict[str, list[float]] = {name: [] for name in runs}
        for fn in runs.values():  # warm-up
            one_pass(fn)
        for _ in range(args.reps):
            for name, fn in runs.items():
                times[name].append(one_pass(fn))
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, seconds in medians.items():
            ours = medians["int4 ours" if name.startswith("int4") and "int4 ours" in medians else "bf16 ours"]
            gflops = 2 * rows * macs_per_row / seconds / 1e9
            print(
                f"| {rows} | {name} | {seconds * 1e3:.2f} | {gflops:.0f} | {seconds / ours:.2f}x |",
                flush=True,
            )
    print_head_table(args.threads, args.reps, generator)
    print(f"\nload average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
