"""A hybrid Gated DeltaNet model against a dense model of about the same size. Same run, same machine.

- hybrid: qwen3_5_text-style, 3 linear-attention layers to 1 gated full-attention layer;
- dense:  qwen3-style, every layer full attention; same hidden size, heads, MLP and layer count.

Random weights (no checkpoint: the costs measured do not depend on the values). For contexts of 1k,
4k and 16k tokens: memory per sequence (KV cache, plus the hybrid's constant state), how many
sequences one KV budget holds, and the time of a decode step at batch 1 and 16. A decode step is one
forward as the engine runs it (weights packed where oneDNN packs them, paged KV cache, state slots)
for `batch` sequences that each have `context` tokens cached; the caches are allocated at full size
and left at zeros, since a step's cost does not depend on what they hold (the prefill itself is not
timed). Times are medians over interleaved rounds (hybrid, dense, hybrid, ...), so machine load hits
both alike. Then the prefix-cache hit rate through the engine (a tiny random checkpoint) for prompts
that share a 300-token prefix, hybrid vs dense. Never asserts timings.

    .venv/bin/python benchmarks/linear_attention.py
    .venv/bin/python benchmarks/linear_attention.py --contexts 1024 4096 --batch 1 --rounds 2   # quicker
    .venv/bin/python benchmarks/linear_attention.py --threads 1   # on a machine shared with other work
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch

from llmaas.models.attention import SequenceChunk, build_forward_batch
from llmaas.models.config import ModelConfig
from llmaas.models.dense import DenseDecoder
from llmaas.models.gated_deltanet import StateBatch
from llmaas.models.hybrid import HybridDecoder
from llmaas.models.hybrid_config import HybridConfig, LinearAttentionConfig
from llmaas.models.packed_linear import pack_linears
from llmaas.models.report import describe_model

BLOCK_SIZE = 16


def make_configs(args) -> dict[str, ModelConfig]:
    common = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 256),
        head_dim=64, rms_norm_eps=1e-6, max_position_embeddings=max(args.contexts) + 64, qk_norm=True,
    )  # fmt: skip
    heads = args.hidden // 64
    hybrid = HybridConfig(
        family="qwen3_5_text",
        **common,
        linear=LinearAttentionConfig(max(1, heads // 2), heads, 64, 64, 4),
        layer_types=["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(args.layers)],
        partial_rotary_factor=0.25,
    )
    return {"hybrid": hybrid, "dense": ModelConfig(family="qwen3", **common)}


def build(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = (HybridDecoder if isinstance(cfg, HybridConfig) else DenseDecoder)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("A_log"):
                p.uniform_(0.0, 2.0)
            else:
                p.normal_(0.0, 0.02)
    return model.to(dtype).eval().requires_grad_(False)


class DecodeAt:
    """`batch` sequences with `context` tokens in the cache (zeros), decoding one token each step."""

    def __init__(self, model, batch: int, context: int, dtype: torch.dtype):
        self.model, self.batch, self.context = model, batch, context
        blocks = -(-(context + 64) // BLOCK_SIZE)
        for attn in model.attention_layers():
            attn.allocate_cache(batch * blocks, BLOCK_SIZE, dtype, "cpu")
        linear = model.linear_layers() if hasattr(model, "linear_layers") else []
        for layer in linear:
            layer.allocate_state(batch, dtype, "cpu")
        self.linear = bool(linear)
        self.tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
        self.ids = torch.randint(0, model.config.vocab_size, (batch,))
        self.done = 0

    @torch.inference_mode()
    def step(self) -> float:
        t0 = time.perf_counter()
        cached = self.context + self.done
        chunks = [SequenceChunk(1, cached, table) for table in self.tables]
        batch = build_forward_batch(chunks, BLOCK_SIZE)
        if self.linear:
            # slots 0..B-1, as the engine's packed slots give a pure decode batch: updated in place
            batch.linear = StateBatch([], torch.arange(self.batch), BLOCK_SIZE, [], decode_first_slot=0)
        self.ids = self.model.compute_logits(self.model(self.ids, batch)).argmax(-1)
        self.done += 1
        return time.perf_counter() - t0

    def free(self) -> None:
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = torch.empty(0)


def decode_table(args, models, dtype) -> None:
    print("\n## Decode step time (ms) and tokens/s\n")
    print(
        "| context | batch | hybrid ms/step | dense ms/step | hybrid tok/s | dense tok/s | dense / hybrid |"
    )
    print("|---|---|---|---|---|---|---|")
    for context in args.contexts:
        for batch in args.batch:
            runs = {name: DecodeAt(m, batch, context, dtype) for name, m in models.items()}
            for run in runs.values():
                run.step()  # warm-up
            steps = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    steps[name] += [run.step() for _ in range(args.steps)]
            ms = {name: statistics.median(s) * 1e3 for name, s in steps.items()}
            print(
                f"| {context} | {batch} | {ms['hybrid']:.1f} | {ms['dense']:.1f} | "
                f"{batch * 1e3 / ms['hybrid']:.0f} | {batch * 1e3 / ms['dense']:.0f} | "
                f"{ms['dense'] / ms['hybrid']:.2f}x |",
                flush=True,
            )
            for run in runs.values():
                run.free()


def memory_table(args, reports) -> None:
    budget = int(args.budget_gib * 2**30)
    print(f"\n## Memory per sequence and sequences per {args.budget_gib} GiB budget\n")
    print("| context | hybrid MiB/seq | dense MiB/seq | hybrid seqs | dense seqs | ratio |")
    print("|---|---|---|---|---|---|")
    for context in args.contexts:
        per = {
            name: r.kv_bytes_per_token * context + r.state_bytes_per_sequence for name, r in reports.items()
        }
        fit = {name: budget // b for name, b in per.items()}
        print(
            f"| {context} | {per['hybrid'] / 2**20:.1f} | {per['dense'] / 2**20:.1f} | {fit['hybrid']} | "
            f"{fit['dense']} | {fit['hybrid'] / fit['dense']:.2f}x |"
        )


def prefix_hit_rates(args) -> None:
    from llmaas import SamplingParams
    from llmaas.engine.llm_engine import EngineConfig
    from llmaas.llm import LLM
    from tests.model_factory import make_tiny_checkpoint

    print(f"\n## Prefix cache: {args.prefix_requests} prompts sharing a 300-token prefix (+ 40 own tokens)\n")
    print("| model | hit rate | cached tokens per later request |")
    print("|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 320, (300,), generator=gen).tolist()
    prompts = [
        shared + torch.randint(3, 320, (40,), generator=gen).tolist() for _ in range(args.prefix_requests)
    ]
    small = dict(num_hidden_layers=4, max_position_embeddings=512)
    with tempfile.TemporaryDirectory() as tmp:
        for name, family, extra in (
            ("hybrid (qwen3_5_text)", "qwen3_5_text", dict(linear_num_key_heads=2, linear_num_value_heads=4)),
            ("dense (qwen3)", "qwen3", {}),
        ):
            model_dir = make_tiny_checkpoint(family, tmp, **small, **extra)
            llm = LLM(config=EngineConfig(model=str(model_dir), dtype="float32", block_size=BLOCK_SIZE))
            cached = [
                llm.generate([p], SamplingParams(max_tokens=1, temperature=0.0))[0].cached_tokens
                for p in prompts
            ]
            rate = llm.engine.block_manager.prefix_hit_rate
            print(f"| {name} | {rate:.1%} | {statistics.mean(cached[1:]):.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", type=int, default=4, help="decode steps per model per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget-gib", type=float, default=4.0)
    p.add_argument("--prefix-requests", type=int, default=8)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# Linear attention (hybrid) vs dense, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores, torch {torch.__version__}")
    configs = make_configs(args)
    models = {name: build(cfg, dtype, seed) for seed, (name, cfg) in enumerate(configs.items())}
    reports = {name: describe_model(m, dtype) for name, m in models.items()}
    for name, m in models.items():
        pack_linears(m)
        print(f"{name}: {reports[name].summary()}")
    print(f"{args.dtype}, random weights; torch threads {torch.get_num_threads()}; load {os.getloadavg()}")
    memory_table(args, reports)
    decode_table(args, models, dtype)
    prefix_hit_rates(args)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
