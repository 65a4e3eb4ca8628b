"""Weight-only int8 / int4 against the unquantized model: quality on held-out text, batch-1 decode speed,
and where the int4 kernel stops beating the packed bf16 matmul. SmolLM2-135M-Instruct by default.

1. quality: NLL per token (nats), perplexity and top-1 agreement with the unquantized model (the
   engine's dtype, bf16 on AVX512_BF16 hosts) on held-out Shakespeare (`shakespeare:heldout`, chunks of
   ~512 tokens). An fp32 row shows how much of the gap is plain bf16 rounding. The scoring pass runs
   whole chunks, i.e. the dequantized weights; the kernel path uses the same weights up to rounding.
2. decode: batch-1 greedy decode tok/s in our engine (128 tokens, ignore_eos), the variants in turns
   (round-robin, median of --rounds), with the load average before and after.
3. threshold: the int4 and int8 kernels against packed bf16 over all the model's linear shapes, with
   distinct weights per layer so that they stream from memory as in decode, M = 1..8 rows.

    .venv/bin/python benchmarks/quantization.py --threads 1 [--parts quality,decode,threshold]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import nn

MODEL = "smollm2-135m"
VARIANTS = ("none", "int8", "int4")


def load(quantization: str, dtype: torch.dtype) -> nn.Module:
    from llmaas.models.catalog import resolve_model_dir
    from llmaas.models.loader import load_model
    from llmaas.models.quantize import quantize_model

    model = load_model(resolve_model_dir(MODEL), dtype=dtype, device="cpu")
    return model if quantization == "none" else quantize_model(model, quantization)


@torch.inference_mode()
def quality(max_tokens: int, seq_len: int) -> None:
    from llmaas.distill.evaluate import heldout_chunks
    from llmaas.distill.modeling import sequence_logits
    from llmaas.engine.dtype_choice import auto_dtype
    from llmaas.models.catalog import resolve_model_dir
    from llmaas.models.tokenizer import Tokenizer

    dtype = auto_dtype(torch.device("cpu"))
    tok = Tokenizer.from_dir(resolve_model_dir(MODEL))
    chunks = heldout_chunks(["shakespeare:heldout"], max_tokens * 4, seq_len * 4)
    rows = [("fp32", torch.float32, "none")] + [
        (f"{str(dtype).removeprefix('torch.')} {q}", dtype, q) for q in VARIANTS
    ]
    models = {name: load(q, dt) for name, dt, q in rows}
    reference = rows[1][0]  # unquantized, the engine's dtype
    stats = {name: dict(nll=0.0, tokens=0, agree=0) for name, _, _ in rows}
    for chunk in chunks:
        ids = torch.tensor([[tok.bos_token_id] + tok.encode(chunk)])
        targets = ids[0, 1:]
        logps = {}
        for name, model in models.items():
            logps[name] = F.log_softmax(sequence_logits(model, ids)[0, :-1].float(), dim=-1)
            stats[name]["nll"] -= float(logps[name].gather(1, targets[:, None]).sum())
            stats[name]["tokens"] += int(targets.numel())
        for name in models:
            stats[name]["agree"] += int((logps[name].argmax(-1) == logps[reference].argmax(-1)).sum())
    print(f"\nquality: {len(chunks)} chunks, {stats[reference]['tokens']} tokens of shakespeare:heldout")
    print(f"| weights | NLL (nats/token) | perplexity | top-1 agreement with {reference} |")
    print("|---|---|---|---|")
    for name, s in stats.items():
        nll = s["nll"] / s["tokens"]
        print(f"| {name} | {nll:.4f} | {math.exp(nll):.2f} | {100 * s['agree'] / s['tokens']:.1f}% |")


def decode(rounds: int, tokens: int) -> None:
    from llmaas.engine.sampling_params import SamplingParams
    from llmaas.llm import LLM

    llms = {
        q: LLM(MODEL, kv_cache_memory=64 * 2**20, quantization=None if q == "none" else q) for q in VARIANTS
    }
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompt = "The quick brown fox jumps over the lazy dog. Once upon a time"
    samples: dict[str, list[float]] = {q: [] for q in VARIANTS}
    texts = {}
    print(f"\ndecode: load average before {os.getloadavg()}")
    for rnd in range(rounds + 1):  # round 0 warms up
        for q, llm in llms.items():
            engine = llm.engine
            engine.add_request(f"r{rnd}-{q}", prompt, params)
            first = last = None
            produced = 0
            while engine.has_unfinished_requests():
                for out in engine.step():
                    produced = len(out.outputs[0].token_ids)
                    texts[q] = out.outputs[0].text
                    now = time.perf_counter()
                    first, last = first or now, now
            if rnd > 0:
                samples[q].append((produced - 1) / (last - first))
    print(f"decode: load average after {os.getloadavg()}")
    print("| weights | batch-1 decode tok/s (median) | rounds |")
    print("|---|---|---|")
    for q, s in samples.items():
        print(f"| {q} | {statistics.median(s):.1f} | {', '.join(f'{v:.1f}' for v in s)} |")
    for q, text in texts.items():
        print(f"{q}: {text[:160]!r}")


@torch.inference_mode()
def threshold(layers: int) -> None:
    from llmaas.models.packed_linear import pack_weight, packed_linear
    from llmaas.models.quantize import Int4Linear, Int8Linear

    per_layer = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
    shapes = per_layer * layers + [(49152, 576)]  # + lm_head
    mods = []
    for n, k in shapes:
        lin = nn.Linear(k, n, bias=False).to(torch.bfloat16).requires_grad_(False)
        mods.append((Int4Linear(lin), Int8Linear(lin), pack_weight(lin.weight)))

    def best_ms(fn, reps=5):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t0) / reps)
        return 1e3 * min(times)

    print(f"\nthreshold: {layers} layers of SmolLM2-135M shapes + lm_head, load {os.getloadavg()}")
    print("| rows M | int4 kernel ms | int8 kernel ms | packed bf16 ms | int4 / packed |")
    print("|---|---|---|---|---|")
    for m in range(1, 9):
        xs = [torch.randn(m, k, dtype=torch.bfloat16) for _, k in shapes]
        int4 = best_ms(
            lambda xs=xs: [
                torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4.int4_weight, 32, q4.scales_and_zeros)
                for (q4, _, _), x in zip(mods, xs)
            ]
        )
        int8 = best_ms(
            lambda xs=xs: [
                torch._weight_int8pack_mm(x, q8.qweight, q8.scales) for (_, q8, _), x in zip(mods, xs)
            ]
        )
        packed = best_ms(lambda xs=xs: [packed_linear(x, p, None) for (_, _, p), x in zip(mods, xs)])
        print(f"| {m} | {int4:.1f} | {int8:.1f} | {packed:.1f} | {int4 / packed:.2f} |", flush=True)
    print(f"threshold: load after {os.getloadavg()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="quality,decode,threshold")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens to score")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load {os.getloadavg()}"
    )
    parts = args.parts.split(",")
    if "threshold" in parts:
        threshold(args.layers)
    if "decode" in parts:
        decode(args.rounds, args.decode_tokens)
    if "quality" in parts:
        quality(args.max_tokens, args.seq_len)


if __name__ == "__main__":
    main()
