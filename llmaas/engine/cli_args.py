"""The engine's command-line flags (`llmaas generate`, `llmaas serve`), with their defaults read from
EngineConfig: a default is stated once, in the config, and the help text shows it."""

from __future__ import annotations

import argparse

from llmaas.engine.config import EngineConfig

_DEFAULTS = EngineConfig()
_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1.5G', '1000000' -> bytes."""
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if s and s[-1] in _UNITS:
            return int(float(s[:-1]) * _UNITS[s[-1]])
        return int(float(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB or 2GiB)") from None


def _mib(n: int) -> str:
    return f"{n / 2**30:g}GiB" if n >= 2**30 and n % 2**30 == 0 else f"{n / 2**20:g}MiB"


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=_DEFAULTS.model,
        help="catalog name (see `llmaas models`), an HF-format directory or a .gguf file "
        f"(default {_DEFAULTS.model})",
    )
    g.add_argument(
        "--dtype",
        default=_DEFAULTS.dtype,
        choices=["auto", "bfloat16", "float32", "float16"],
        help="weights and KV cache (default auto: bfloat16 on CUDA and on CPUs with native bf16, "
        "AVX512_BF16 or AMX; float32 elsewhere, where bf16 matmuls are emulated and slow)",
    )
    g.add_argument("--device", default=_DEFAULTS.device, help="cpu or cuda (default: cuda when present)")
    g.add_argument(
        "--kv-cache-memory",
        type=parse_bytes,
        default=_DEFAULTS.kv_cache_memory,
        help="bytes for the paged KV cache, allocated once at start, e.g. 512MiB or 2GiB "
        f"(default {_mib(_DEFAULTS.kv_cache_memory)})",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=_DEFAULTS.block_size,
        help="tokens per KV block (default %(default)s)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=_DEFAULTS.max_num_seqs,
        help="cap on running sequences (default %(default)s)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=_DEFAULTS.max_num_batched_tokens,
        help="per-step token budget shared by prefill chunks and decodes (default %(default)s)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=_DEFAULTS.max_model_len,
        help="context window (default: the model's)",
    )
    g.add_argument(
        "--no-prefix-caching",
        action="store_false",
        dest="enable_prefix_caching",
        help="turn off reusing cached KV blocks of shared prompt prefixes",
    )
    g.add_argument(
        "--quantization",
        choices=["int8", "int4"],
        default=_DEFAULTS.quantization,
        help="weight-only int8 (per channel) or int4 (groups of 32, like Q4_1): faster small-batch "
        "decode on CPU; int4's kernel needs bf16 (fp32 and CUDA use the dequantized weights)",
    )
    g.add_argument(
        "--batch-invariant",
        action="store_true",
        help="int4 too: a request's logits bit-identical whatever shares its steps (bf16 on CPU is by "
        "default); slower int4 prefills; refused where it cannot be kept (CUDA, fp32, int8, MoE); "
        "docs/batch_invariance.md",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        quantization=args.quantization,
        batch_invariant=args.batch_invariant,
    )
