"""Roofline: this machine's memory bandwidth and matmul FLOP/s against a model's size.

Two ceilings for a decoder:
- batch-1 decode is bound by memory bandwidth: every step streams the weights a token uses once (plus
  its KV cache), so tok/s <= bandwidth / bytes per step;
- a full batch is bound by compute: each token (prompt or output) costs ~2 FLOPs per weight it uses plus
  attention over its context, so tok/s <= matmul FLOP/s / FLOPs per token.

Weights a token uses: the active parameters (MoE: the chosen experts only), less the input embedding
table when the output matrix is a separate one (a lookup reads one row, no matmul). Model figures come
from config.json and the safetensors headers (no weights are loaded); they are the same quantities as
`llmaas.models.report` computes from the modules (total, active per token, KV bytes per token).

The engine's side is read from a bench result (`--bench`: 1 / TPOT p50 at concurrency 1, and the best
total tok/s, which counts the prompt tokens the compute ceiling also covers) or measured briefly in
this process (`LLM.generate`): a short greedy batch-1 decode and one batch of 32 prompts.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmaas.errors import LlmaasError, ModelLoadError

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "int8": 1}
# Bytes a quantized weight streams per parameter (`--quantization`, llmaas/models/quantize.py): int8 per
# output channel (its scale is negligible); int4 in groups of 32 with a 2-byte scale and zero each, the
# output head then int8 in groups of 32 with a 4-byte scale each.
INT4_BYTES, INT8_GROUP_BYTES = 0.5 + 4 / 32, 1 + 4 / 32


# ------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class ModelFigures:
    name: str
    total_params: int
    active_params_per_token: int
    embedding_params: int  # input table, when separate from the output matrix (else 0)
    kv_bytes_per_token: int
    kv_dtype: str
    num_layers: int
    attention_width: int  # num_heads * head_dim: query-key and value widths per layer
    weight_dtype: str
    head_params: int = 0  # the output head (vocab x hidden)
    quantization: str | None = None  # None, "int8" or "int4": what the weights stream as

    @property
    def streamed_params(self) -> int:
        """Parameters a decode step reads and multiplies: active ones less a separate embedding table."""
        return self.active_params_per_token - self.embedding_params

    def weight_bytes_per_step(self) -> int:
        if self.quantization == "int8":
            return self.streamed_params * DTYPE_BYTES["int8"]
        if self.quantization == "int4":
            body = self.streamed_params - self.head_params
            return int(body * INT4_BYTES + self.head_params * INT8_GROUP_BYTES)
        return self.streamed_params * DTYPE_BYTES[self.weight_dtype]

    @property
    def weight_format(self) -> str:
        return (
            f"{self.quantization} weights, {self.weight_dtype} compute"
            if self.quantization
            else self.weight_dtype
        )

    def flops_per_token(self, context: int) -> int:
        """2 per streamed parameter, plus QK^T and PV over `context` positions (2 FLOPs each)."""
        return 2 * self.streamed_params + 4 * self.num_layers * self.attention_width * context


def safetensors_param_count(model_dir: Path) -> tuple[int, dict[str, int]]:
    """Total elements over every *.safetensors file, from the headers alone; and per tensor name."""
    per_tensor: dict[str, int] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights", param="model")
    for path in files:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in info["shape"]:
                n *= dim
            per_tensor[name] = n
    return sum(per_tensor.values()), per_tensor


def model_figures(model: str, dtype: str = "bfloat16", quantization: str | None = None) -> ModelFigures:
    from llmaas.models.catalog import resolve_model_dir

    model_dir = resolve_model_dir(model, progress=False)
    cfg = json.loads((model_dir / "config.json").read_text())
    total, per_tensor = safetensors_param_count(model_dir)
    hidden = cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    tied = bool(cfg.get("tie_word_embeddings")) or "lm_head.weight" not in per_tensor
    embedding = 0 if tied else cfg["vocab_size"] * hidden

    # MoE: a token skips the experts it is not routed to.
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    inactive = 0
    if experts:
        top_k = cfg["num_experts_per_tok"]
        expert_size = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        moe_layers = sum(
            1 for name in per_tensor if name.endswith(("experts.0.down_proj.weight", "experts.0.w2.weight"))
        )
        moe_layers = moe_layers or sum(1 for name in per_tensor if name.endswith("experts.down_proj"))
        inactive = moe_layers * (experts - top_k) * 3 * hidden * expert_size

    kv_dtype_bytes = DTYPE_BYTES[dtype]
    if cfg.get("kv_lora_rank"):  # MLA caches the compressed latent plus the rotary key part
        per_layer = cfg["kv_lora_rank"] + cfg.get("qk_rope_head_dim", 0)
    else:
        per_layer = 2 * kv_heads * head_dim
    return ModelFigures(
        name=model,
        total_params=total,
        active_params_per_token=total - inactive,
        embedding_params=embedding,
        kv_bytes_per_token=layers * per_layer * kv_dtype_bytes,
        kv_dtype=dtype,
        num_layers=layers,
        attention_width=heads * head_dim,
        weight_dtype=dtype,
        head_params=cfg["vocab_size"] * hidden,
        quantization=quantization,
    )


# ------------------------------------------------------------------------------------ the machine
def measure_bandwidth(megabytes: int = 512, reps: int = 5) -> float:
    """Bytes/s of reading a buffer far larger than the caches (a float32 sum), best of `reps`."""
    import torch

    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    deadline = time.perf_counter() + 3.0
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return x.numel() * 4 / best


def measure_matmul(
    dtype: str = "bfloat16", m: int = 256, k: int = 1024, n: int = 1024, reps: int = 5, budget_s: float = 3.0
) -> float:
    """FLOP/s of `F.linear` ([m, k] x [n, k]^T, as the model's layers call it) in `dtype`, best of up to
    `reps` within `budget_s` seconds (m=256: a large batch)."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    a = torch.randn(m, k).to(dt)
    w = torch.randn(n, k).to(dt)
    F.linear(a, w)
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    for _ in range(reps):
        t0 = time.perf_counter()
        F.linear(a, w)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return 2 * m * k * n / best


# ------------------------------------------------------------------------------------ the engine
def engine_from_bench(path: str) -> dict:
    """Batch-1 decode tok/s (1 / TPOT p50 at concurrency 1) and the best total tok/s of a bench (or of
    llmaas in a peers.json)."""
    data = json.loads(Path(path).read_text())
    if "peers" in data:  # benchmarks/peers.py's output: take llmaas's levels
        data = {"url": "llmaas serve (benchmarks/peers.py)", **data["peers"].get("llmaas", {})}
    levels = [lv for lv in data.get("levels", []) if lv.get("completed")]
    if not levels:
        raise LlmaasError(f"{path} has no completed level", param="bench")
    one = next((lv for lv in levels if lv["concurrency"] == 1), None)
    tpot = one["tpot_s"]["p50"] if one else None
    best = max(levels, key=lambda lv: lv["total_tok_per_s"])
    return {
        "source": f"{path} ({data.get('url')})",
        "decode_batch1_tok_s": 1 / tpot if tpot else None,
        "full_batch_tok_s": best["total_tok_per_s"],
        "full_batch_note": f"concurrency {best['concurrency']}, prompt + output tokens",
    }


def engine_measured(
    model: str,
    dtype: str,
    batch: int = 32,
    prompt_len: int = 128,
    new_tokens: int = 32,
    quantization: str | None = None,
) -> dict:
    """A brief in-process measurement with `LLM.generate` (greedy, ignore_eos)."""
    from llmaas.engine.sampling_params import SamplingParams
    from llmaas.llm import LLM

    llm = LLM(model, dtype=dtype, quantization=quantization)
    base = list(range(1000, 1000 + prompt_len))

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    llm.generate([[7, 8, 9, 10]], params(4))  # warm-up
    steps = 48
    t0 = time.perf_counter()
    llm.generate([[11, 12, 13, 14]], params(1))
    t1 = time.perf_counter()
    llm.generate([[15, 16, 17, 18]], params(1 + steps))
    t2 = time.perf_counter()
    decode = steps / max((t2 - t1) - (t1 - t0), 1e-9)
    prompts = [[100 + i] + base[: prompt_len - 1] for i in range(batch)]
    t3 = time.perf_counter()
    llm.generate(prompts, params(new_tokens))
    full = batch * (prompt_len + new_tokens) / (time.perf_counter() - t3)
    return {
        "source": f"measured in-process (LLM.generate, {dtype}"
        + (f", {quantization} weights)" if quantization else ")"),
        "decode_batch1_tok_s": decode,
        "full_batch_tok_s": full,
        "full_batch_note": f"{batch} prompts of {prompt_len} + {new_tokens} new tokens, both counted",
    }


# ------------------------------------------------------------------------------------ report
def roofline(figures: ModelFigures, bandwidth: float, flops: float, context: int) -> dict:
    step_bytes = figures.weight_bytes_per_step() + figures.kv_bytes_per_token * context
    return {
        "decode_batch1_ceiling_tok_s": bandwidth / step_bytes,
        "full_batch_ceiling_tok_s": flops / figures.flops_per_token(context),
        "bytes_per_decode_step": step_bytes,
        "flops_per_token": figures.flops_per_token(context),
    }


def _pct(value: float | None, ceiling: float) -> str:
    return "-" if value is None else f"{100 * value / ceiling:.0f}%"


def format_report(
    figures: ModelFigures, bandwidth: float, flops: float, context: int, ceilings: dict, engine: dict | None
) -> str:
    f = figures
    lines = [
        f"model {f.name}: {f.total_params:,} parameters, {f.active_params_per_token:,} active per token, "
        f"{f.kv_bytes_per_token:,} KV-cache bytes per token ({f.kv_dtype})",
        f"  a decode step streams {f.streamed_params:,} parameters ({f.weight_format}): "
        f"{f.weight_bytes_per_step() / 1e6:.1f} MB of weights + KV of {context} positions",
        f"machine: memory read {bandwidth / 1e9:.1f} GB/s, "
        f"matmul {flops / 1e9:.0f} GFLOP/s ({f.weight_dtype}, m=256)",
        "",
        "| bound | ceiling tok/s | engine tok/s | engine / ceiling |",
        "|---|---|---|---|",
    ]
    dec = engine.get("decode_batch1_tok_s") if engine else None
    full = engine.get("full_batch_tok_s") if engine else None
    c1, cf = ceilings["decode_batch1_ceiling_tok_s"], ceilings["full_batch_ceiling_tok_s"]
    lines.append(
        f"| batch-1 decode (memory bandwidth) | {c1:.0f} | {'-' if dec is None else f'{dec:.1f}'} "
        f"| {_pct(dec, c1)} |"
    )
    lines.append(
        f"| full batch (compute) | {cf:.0f} | {'-' if full is None else f'{full:.1f}'} | {_pct(full, cf)} |"
    )
    if engine:
        lines += ["", f"engine: {engine['source']}; full batch: {engine['full_batch_note']}"]
    return "\n".join(lines)


def cmd_roofline(args: argparse.Namespace) -> int:
    import os

    from llmaas.engine.dtype_choice import resolve_dtype_name

    args.dtype = resolve_dtype_name(args.dtype)
    try:
        figures = model_figures(args.model, args.dtype, args.quantization)
        bandwidth = measure_bandwidth(args.bandwidth_mb)
        flops = measure_matmul(args.dtype)
        ceilings = roofline(figures, bandwidth, flops, args.context)
        if args.bench:
            engine = engine_from_bench(args.bench)
        elif args.no_engine:
            engine = None
        else:
            engine = engine_measured(args.model, args.dtype, quantization=args.quantization)
    except (LlmaasError, OSError, ValueError, KeyError) as exc:
        message = exc.message if isinstance(exc, LlmaasError) else f"{type(exc).__name__}: {exc}"
        print(f"llmaas: error: {message}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "model": figures.__dict__,
                    "bandwidth_bytes_s": bandwidth,
                    "matmul_flops": flops,
                    "context": args.context,
                    **ceilings,
                    "engine": engine,
                    "load_avg": list(os.getloadavg()),
                },
                indent=2,
            )
        )
    else:
        print(format_report(figures, bandwidth, flops, args.context, ceilings, engine))
        print(f"load average {os.getloadavg()[0]:.2f} (1 min): on a busy machine every figure here is low")
    return 0


def add_roofline_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "roofline",
        help="bandwidth and compute ceilings for a model on this machine",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", default="smollm2-135m", help="catalog name, HF-format directory or .gguf")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="weight and KV dtype (default auto: what the engine picks here, see `llmaas serve --help`)",
    )
    p.add_argument(
        "--quantization",
        choices=["int8", "int4"],
        default=None,
        help="weight-only quantization the engine runs with (as `llmaas serve --quantization`): the batch-1 "
        "ceiling counts its bytes",
    )
    p.add_argument(
        "--context", type=int, default=256, help="positions of KV read per decode step (default 256)"
    )
    p.add_argument("--bench", default=None, help="read the engine's figures from this bench.json instead")
    p.add_argument("--no-engine", action="store_true", help="ceilings only, do not measure the engine")
    p.add_argument("--bandwidth-mb", type=int, default=512, help="buffer size for the bandwidth test")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_roofline)
