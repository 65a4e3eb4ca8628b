"""Does a sparse MoE model decode at the cost of its active size? Same run, same machine:

- moe:          E experts of intermediate size I per layer, top-k routing (a qwen3_moe-style model);
- dense-active: the same model with one dense MLP of intermediate k*I (the MoE's active parameters);
- dense-total:  one dense MLP of intermediate E*I (the MoE's total parameters).

Models are built from a ModelConfig with random weights (no checkpoint) and run as the engine runs
them: weights packed for oneDNN where it applies (`pack_linears`, `pack_experts`), paged KV cache,
one forward per decode step over `batch` sequences of a `context`-token prompt. The time per decode
step is the median over interleaved rounds (moe, dense-active, dense-total, moe, ...) so that load
on the machine hits all three alike. Random router weights spread tokens over the experts roughly
evenly, as trained routers aim to. Prints the table, the ratios and the load average; never asserts
timings. bf16 weights pack only on CPUs with AVX-512 (or AVX-NE-CONVERT); elsewhere use float32.

    .venv/bin/python benchmarks/moe_cost.py                       # batch 1 and 8, fp32
    .venv/bin/python benchmarks/moe_cost.py --threads 1 --dtype bfloat16
    .venv/bin/python benchmarks/moe_cost.py --batch 1 --steps 16  # quicker
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from llmaas.models.attention import SequenceChunk, build_forward_batch
from llmaas.models.config import ModelConfig, MoEConfig
from llmaas.models.dense import DenseDecoder
from llmaas.models.moe import expert_token_counts, pack_experts
from llmaas.models.packed_linear import pack_linears
from llmaas.models.quantize import quantize_model
from llmaas.models.report import describe_model

BLOCK_SIZE = 16


def make_config(args, moe: bool, intermediate: int) -> ModelConfig:
    routing = None
    if moe:
        routing = MoEConfig(
            num_experts=args.experts,
            top_k=args.top_k,
            expert_intermediate_size=args.expert_intermediate,
            renormalize=True,
            sparse_layers=tuple(range(args.layers)),
        )
    return ModelConfig(
        family="qwen3_moe" if moe else "qwen3",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=intermediate,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 256),
        head_dim=64,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        qk_norm=True,
        moe=routing,
    )


def build(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> DenseDecoder:
    torch.manual_seed(seed)
    model = DenseDecoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02 if "gate.weight" not in name else 1.0)  # routers: spread choices
    return model.to(dtype).eval().requires_grad_(False)


class DecodeRun:
    """`batch` sequences prefilled with `context` tokens, then decode steps through the paged cache."""

    def __init__(self, model: DenseDecoder, batch: int, context: int, steps: int, dtype: torch.dtype):
        self.model = model
        blocks_per_seq = -(-(context + steps + 4) // BLOCK_SIZE)
        for attn in model.attention_layers():
            attn.allocate_cache(batch * blocks_per_seq, BLOCK_SIZE, dtype, "cpu")
        self.tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
        self.lengths = [0] * batch
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen)
        self.next_ids = self._forward([(i, prompts[i].tolist()) for i in range(batch)])

    @torch.inference_mode()
    def _forward(self, work: list[tuple[int, list[int]]]) -> list[int]:
        chunks = [SequenceChunk(len(ids), self.lengths[i], self.tables[i]) for i, ids in work]
        batch = build_forward_batch(chunks, BLOCK_SIZE)
        flat = torch.tensor([t for _, ids in work for t in ids])
        hidden = self.model(flat, batch)
        last = torch.tensor([sum(len(ids) for _, ids in work[: n + 1]) - 1 for n in range(len(work))])
        for i, ids in work:
            self.lengths[i] += len(ids)
        return self.model.compute_logits(hidden[last]).argmax(-1).tolist()

    def step(self) -> float:
        t0 = time.perf_counter()
        self.next_ids = self._forward([(i, [t]) for i, t in enumerate(self.next_ids)])
        return time.perf_counter() - t0


def measure(args, batch: int, dtype: torch.dtype) -> dict[str, dict]:
    inter = args.expert_intermediate
    configs = {
        "moe": make_config(args, True, inter),
        "dense-active": make_config(args, False, args.top_k * inter),
        "dense-total": make_config(args, False, args.experts * inter),
    }
    models, runs, times = {}, {}, {}
    for seed, (name, cfg) in enumerate(configs.items()):
        models[name] = build(cfg, dtype, seed)
        report = describe_model(models[name], dtype)
        if args.quantization:
            quantize_model(models[name], args.quantization)  # experts included
        packed = 0
        if not args.no_pack:
            packed = pack_linears(models[name]) + pack_experts(models[name])
        runs[name] = DecodeRun(models[name], batch, args.context, args.steps * args.rounds + 2, dtype)
        runs[name].step()  # warm-up
        times[name] = {"report": report, "steps": [], "packed": packed}
    busy = []  # experts that got at least one token, per MoE layer and decode step
    for _ in range(args.rounds):
        for name, run in runs.items():
            for _ in range(args.steps):
                before = expert_token_counts(models[name])
                times[name]["steps"].append(run.step())
                after = expert_token_counts(models[name])
                busy += [sum(a > b for a, b in zip(after[i], before[i])) for i in after]
    times["moe"]["experts_used"] = statistics.mean(busy)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--expert-intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=8, help="decode steps per contender per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32")
    p.add_argument("--no-pack", action="store_true", help="plain F.linear weights (no oneDNN packing)")
    p.add_argument("--quantization", choices=["int8", "int4"], default=None, help="weight-only, as engine")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# MoE decode cost, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, "
        f"{args.experts} experts x {args.expert_intermediate} (top-{args.top_k}), vocab {args.vocab}; "
        f"{args.dtype}, context {args.context} tokens, weights {'plain' if args.no_pack else 'packed'}"
        f"{', ' + args.quantization if args.quantization else ''}"
    )
    print(f"torch threads: {torch.get_num_threads()}; load average before: {os.getloadavg()}")
    for batch in args.batch:
        times = measure(args, batch, dtype)
        print(f"\n## batch {batch}\n")
        print("| model | total params | active/token | packed modules | ms per decode step | ms per token |")
        print("|---|---|---|---|---|---|")
        med = {}
        for name, t in times.items():
            med[name] = statistics.median(t["steps"]) * 1e3
            r = t["report"]
            print(
                f"| {name} | {r.total_params / 1e6:.1f}M | {r.active_params_per_token / 1e6:.1f}M "
                f"| {t['packed']} | {med[name]:.2f} | {med[name] / batch:.3f} |"
            )
        print(
            f"\nmoe / dense-active: {med['moe'] / med['dense-active']:.2f}x; "
            f"moe / dense-total: {med['moe'] / med['dense-total']:.2f}x; "
            f"experts used per layer and step: {times['moe']['experts_used']:.1f} "
            f"of {args.experts}; load average {os.getloadavg()}"
        )


if __name__ == "__main__":
    main()
