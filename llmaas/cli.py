"""`llmaas <verb>`: the one entry point."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from llmaas.errors import LlmaasError
from llmaas.openmp_defaults import apply_openmp_defaults


def _parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1.5G', '1000000' -> bytes."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    s = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(float(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512MiB or 2GiB)") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default="smollm2-135m",
        help="catalog name (see `llmaas models`), an HF-format directory or a .gguf file",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="weights and KV cache (default auto: bfloat16 on CUDA and on CPUs with native bf16, "
        "AVX512_BF16 or AMX; float32 elsewhere, where bf16 matmuls are emulated and slow)",
    )
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument(
        "--kv-cache-memory",
        type=_parse_bytes,
        default="512MiB",
        help="bytes for the paged KV cache, allocated once at start (default 512MiB)",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-num-seqs", type=int, default=64, help="cap on running sequences")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=1024,
        help="per-step token budget shared by prefill chunks and decodes",
    )
    g.add_argument("--max-model-len", type=int, default=None, help="context window (default: the model's)")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument(
        "--quantization",
        choices=["int8", "int4"],
        default=None,
        help="weight-only int8 (per channel) or int4 (groups of 32, like Q4_1): faster small-batch "
        "decode on CPU; int4's kernel needs bf16 (fp32 and CUDA use the dequantized weights)",
    )
    # batch invariance (docs/batch_invariance.md)
    g.add_argument(
        "--batch-invariant",
        action="store_true",
        help="int4 too: a request's logits bit-identical whatever shares its steps (bf16 on CPU is by "
        "default); slower int4 prefills; refused where it cannot be kept (CUDA, fp32, int8, MoE)",
    )


def engine_config_from_args(args: argparse.Namespace):
    from llmaas.engine.llm_engine import EngineConfig

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        kv_cache_memory=args.kv_cache_memory,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        quantization=args.quantization,
        batch_invariant=args.batch_invariant,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from llmaas.engine.sampling_params import SamplingParams
    from llmaas.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(config=engine_config_from_args(args))
    load_s = time.perf_counter() - t0
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or [],
        n=args.n,
        ignore_eos=args.ignore_eos,
    )
    prompts = args.prompt or [sys.stdin.read()]
    t1 = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    gen_s = time.perf_counter() - t1
    for out in outputs:
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt_tokens": out.prompt_tokens,
                        "cached_tokens": out.cached_tokens,
                        "completion_tokens": out.completion_tokens,
                        "choices": [
                            {"text": o.text, "finish_reason": o.finish_reason, "token_ids": o.token_ids}
                            for o in out.outputs
                        ],
                    }
                )
            )
        else:
            for o in out.outputs:
                print(o.text)
    completion = sum(o.completion_tokens for o in outputs)
    print(
        f"[load {load_s:.2f}s, {completion} tokens in {gen_s:.2f}s = {completion / gen_s:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from llmaas.models.catalog import list_catalog

    for entry in list_catalog():
        print(entry)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmaas", description="LLM as a Service at the lowest cost per token."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="verb", required=True)

    gen = sub.add_parser("generate", help="generate text from prompts with the engine (no server)")
    add_engine_args(gen)
    gen.add_argument("prompt", nargs="*", help="prompts (default: read one from stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("-n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print JSON lines with token counts")
    gen.set_defaults(func=cmd_generate)

    models = sub.add_parser("models", help="list the model catalog")
    models.set_defaults(func=cmd_models)

    from llmaas.server.cli_serve import add_serve_parser

    add_serve_parser(sub)

    from llmaas.bench.cost import add_from_cost_args
    from llmaas.billing.cli_commands import add_billing_parsers

    add_from_cost_args(add_billing_parsers(sub))  # `prices set --from-cost`: bench fills billing's prices

    from llmaas.billing.cli_holds import add_holds_parser

    add_holds_parser(sub)

    from llmaas.distill.cli import add_distill_parsers

    add_distill_parsers(sub)

    from llmaas.bench.cli import add_bench_parsers

    add_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_openmp_defaults()  # before any subcommand imports torch
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except LlmaasError as exc:
        where = f" (parameter: {exc.param})" if exc.param else ""
        print(f"llmaas: error: {exc.message}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
