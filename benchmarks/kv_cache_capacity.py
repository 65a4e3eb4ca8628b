"""How many sequences fit in one KV budget: dense MHA, GQA and MLA models of comparable size.

Three random-weight checkpoints of one shape (a DeepSeek-V2-Lite layer scaled down 4x in width:
hidden 512, 16 query heads), written with transformers' save_pretrained and served by our engine:

- mha: llama, 16 kv heads of 32 dims        -> caches 2 x 16 x 32 = 1024 elements per token and layer;
- gqa: llama, 4 kv heads (4 query heads each) -> 256;
- mla: deepseek_v2 latent attention, kv_lora_rank 128 + qk_rope_head_dim 16 -> 144 (dense MLPs in
  every layer, first_k_dense_replace = layers, so only the attention differs).

For each, under the same `--kv-cache-memory`: the engine's KV bytes per token, its block count, the
most sequences of 1,000 tokens it can hold (whole blocks per sequence), and the aggregate decode tok/s
with that many sequences running: distinct random prompts of 1,000 - `--decode-tokens` tokens (no
prefix sharing, prefix caching off) are prefilled first; then the decode steps that take every
sequence to 1,000 tokens are timed, the engines stepped in turn so that load on the machine hits
all alike. Preemptions are counted (there should be none). Prints the table, the ratios against
mha and the load average; never asserts timings.

    .venv/bin/python benchmarks/kv_cache_capacity.py                  # fp32, 64 MiB of KV cache
    .venv/bin/python benchmarks/kv_cache_capacity.py --kv-cache-memory 16 --decode-tokens 8 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from llmaas import SamplingParams
from llmaas.engine.llm_engine import EngineConfig, LLMEngine

SEQ_TOKENS = 1000
COMMON = dict(
    vocab_size=4096, hidden_size=512, intermediate_size=1408, num_attention_heads=16,
    max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    tie_word_embeddings=False,
)  # fmt: skip
VARIANTS = {
    "mha": ("llama", dict(num_key_value_heads=16, head_dim=32)),
    "gqa": ("llama", dict(num_key_value_heads=4, head_dim=32)),
    "mla": (
        "deepseek_v2",
        dict(
            num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=128, qk_nope_head_dim=32,
            qk_rope_head_dim=16, head_dim=16, v_head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=64, n_shared_experts=1,
        ),
    ),
}  # fmt: skip


def write_checkpoint(root: Path, name: str, layers: int) -> Path:
    """Random weights (std 0.02) via transformers, plus a word-level tokenizer covering the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM

    family, fields = VARIANTS[name]
    extra = {"first_k_dense_replace": layers} if family.startswith("deepseek") else {}
    config = AutoConfig.for_model(family, num_hidden_layers=layers, **COMMON, **fields, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model_dir = root / name
    model.save_pretrained(model_dir)
    vocab = {f"t{i}": i for i in range(COMMON["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(model_dir / "tokenizer.json"))
    return model_dir


class Contender:
    """One model in its engine, filled to capacity with distinct 1,000-token sequences."""

    def __init__(self, model_dir: Path, args):
        self.engine = LLMEngine(
            EngineConfig(
                model=str(model_dir), dtype=args.dtype, kv_cache_memory=args.kv_cache_memory * 2**20,
                block_size=args.block_size, max_num_seqs=4096, max_num_batched_tokens=args.prefill_budget,
                enable_prefix_caching=False,
            )
        )  # fmt: skip
        self.capacity = self.engine.runner.num_blocks // math.ceil(SEQ_TOKENS / args.block_size)
        gen = torch.Generator().manual_seed(1)
        params = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)
        for i in range(self.capacity):
            ids = torch.randint(2, COMMON["vocab_size"], (SEQ_TOKENS - args.decode_tokens,), generator=gen)
            self.engine.add_request(str(i), ids.tolist(), params)
        self.decode_s = 0.0
        self.decoded = 0

    def prefill(self) -> float:
        """Steps until every sequence has its first token; returns the seconds taken."""
        t0 = time.perf_counter()
        started: set[str] = set()
        while len(started) < self.capacity:
            started.update(out.request_id for out in self.engine.step())
        return time.perf_counter() - t0

    def decode_step(self) -> None:
        t0 = time.perf_counter()
        outputs = self.engine.step()
        self.decode_s += time.perf_counter() - t0
        self.decoded += len(outputs)  # one new token per running sequence

    def result(self, prefill_s: float) -> dict:
        runner = self.engine.runner
        return dict(
            kv_bytes_per_token=runner.kv_bytes_per_token,
            blocks=runner.num_blocks,
            capacity=self.capacity,
            total_params=self.engine.model_report.total_params,
            prefill_s=prefill_s,
            decoded_tokens=self.decoded,
            decode_tok_s=self.decoded / self.decode_s if self.decode_s else float("nan"),
            preemptions=self.engine.scheduler.num_preemptions,
        )


def run(args, root: Path) -> dict:
    """Prefill each contender, then decode them interleaved step by step, so load hits all alike."""
    contenders = {name: Contender(write_checkpoint(root, name, args.layers), args) for name in args.only}
    prefill_s = {}
    for name, c in contenders.items():
        prefill_s[name] = c.prefill()
        print(
            f"  {name}: prefilled {c.capacity} sequences, load average {os.getloadavg()[0]:.1f}", flush=True
        )
    while any(c.engine.has_unfinished_requests() for c in contenders.values()):
        for c in contenders.values():
            if c.engine.has_unfinished_requests():
                c.decode_step()
    return {name: c.result(prefill_s[name]) for name, c in contenders.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kv-cache-memory", type=int, default=64, help="MiB of KV cache for every model")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--dtype", default="float32", help="float32: bf16 matmuls are slower on AVX2-only CPUs"
    )
    parser.add_argument("--threads", type=int, help="torch threads (1 is steadier on a loaded machine)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--decode-tokens", type=int, default=32, help="new tokens per sequence (timed but one)"
    )
    parser.add_argument("--prefill-budget", type=int, default=2048, help="max_num_batched_tokens")
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"# KV cache capacity, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}"
    )
    print(
        f"# {args.layers} layers, hidden 512, 16 heads, {args.dtype}, KV budget {args.kv_cache_memory} MiB, "
        f"block {args.block_size}, sequences of {SEQ_TOKENS} tokens ({args.decode_tokens} decoded), "
        f"{torch.get_num_threads()} torch threads"
    )
    with tempfile.TemporaryDirectory(prefix="kv-capacity-") as tmp:
        results = run(args, Path(tmp))
    base = results.get("mha")
    print()
    print(
        "| model | params | KV bytes/token | blocks | sequences of 1,000 tokens | decode tok/s | preempted |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio = f" ({r['capacity'] / base['capacity']:.1f}x)" if base and base["capacity"] else ""
        tps = f" ({r['decode_tok_s'] / base['decode_tok_s']:.1f}x)" if base else ""
        print(
            f"| {name} | {r['total_params'] / 1e6:.1f}M | {r['kv_bytes_per_token']:,} | {r['blocks']} | "
            f"{r['capacity']}{ratio} | {r['decode_tok_s']:.0f}{tps} | {r['preemptions']} |"
        )
    print(f"\nload average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}))


if __name__ == "__main__":
    main()
