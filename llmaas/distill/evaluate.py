"""`llmaas eval`: how much of the teacher a student keeps, and what a token costs, as one table.

- bits per byte: the model's total negative log-likelihood of the held-out text, in bits, divided by
  the text's UTF-8 bytes. Unlike perplexity it does not depend on the tokenizer, so models with
  different vocabularies compare. The text is cut into chunks of about `seq_len` tokens at character
  boundaries (the same chunks for every model); each chunk is scored after one context token (the
  tokenizer's BOS, else its first EOS), so every byte of the chunk is predicted.
- top-1 agreement: how often the model's most likely next token equals the teacher's, over the same
  positions; KL(teacher || model) in nats per token at temperature 1. Both need the teacher's tokenizer
  ("n/a" otherwise).
- decode tok/s: batch-1 greedy decoding in our engine, timed from the first generated token to the
  last, the models measured in turns (round-robin) so a load change on the machine hits all of them.
- $/1M output tokens: the machine's price per hour times the decode time of that batch-1 request, per
  output token — computed by `llmaas.bench.cost` (the project's cost model, exact money, rounded up to
  the micro-USD). This prices one request alone on the machine, not the serving price at full batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmaas.distill.data import load_documents
from llmaas.distill.modeling import load_frozen, sequence_logits
from llmaas.engine.dtype_choice import resolve_dtype_name
from llmaas.errors import InvalidRequestError
from llmaas.models.catalog import resolve_model_dir
from llmaas.models.tokenizer import Tokenizer


@dataclass
class EvalConfig:
    models: list[str]
    teacher: str | None = None
    data: list[str] = field(default_factory=lambda: ["shakespeare:heldout"])
    max_tokens: int = 16384
    seq_len: int = 512
    decode_tokens: int = 64
    decode_rounds: int = 3
    usd_per_hour: str = "1.00"  # a decimal string: money is exact
    dtype: str = "auto"
    device: str | None = None


@dataclass
class EvalRow:
    model: str
    parameters: int
    layers: int
    bits_per_byte: float
    agreement: float | None
    kl: float | None
    decode_tok_s: float | None
    usd_per_mtok: float | None
    scored_tokens: int
    scored_bytes: int


def usd_per_million_tokens(usd_per_hour: float, tokens_per_second: float) -> float:
    """Price of 1M tokens for a machine at `usd_per_hour` producing `tokens_per_second`."""
    return usd_per_hour / (tokens_per_second * 3600.0) * 1e6


def heldout_chunks(specs: list[str], max_bytes: int, chars_per_chunk: int) -> list[str]:
    """The held-out text as chunks of about `chars_per_chunk` characters (cut at whitespace)."""
    text = "\n\n".join(d.text for spec in specs for d in load_documents(spec))
    text = text[:max_bytes]
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + chars_per_chunk)
        if end < len(text):
            space = text.rfind(" ", start + chars_per_chunk // 2, end)
            end = space if space > start else end
        chunks.append(text[start:end])
        start = end
    return [c for c in chunks if c.strip()]


def _context_token(tok: Tokenizer) -> int:
    if tok.bos_token_id is not None:
        return int(tok.bos_token_id)
    if tok.eos_token_ids:
        return min(tok.eos_token_ids)
    raise InvalidRequestError(
        f"{tok.name}: tokenizer has neither BOS nor EOS to start a chunk", param="model"
    )


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def score(cfg: EvalConfig, dirs: list[Path], teacher_index: int, device: torch.device) -> list[dict]:
    """Per model: nll in nats, bytes, tokens, agreement and KL sums against the teacher."""
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[resolve_dtype_name(cfg.dtype, device)]
    toks = [Tokenizer.from_dir(d) for d in dirs]
    vocab_of = [t.backend.get_vocab(with_added_tokens=True) for t in toks]
    same = [v == vocab_of[teacher_index] for v in vocab_of]
    # ~4 characters per token for English BPE: chunks of about seq_len tokens, max_tokens in total.
    chunks = heldout_chunks(cfg.data, cfg.max_tokens * 4, cfg.seq_len * 4)
    if not chunks:
        raise InvalidRequestError(f"no held-out text in {cfg.data}", param="data")
    models = [load_frozen(d, device, dtype) for d in dirs]
    stats = [dict(nll=0.0, bytes=0, tokens=0, agree=0, kl=0.0, positions=0) for _ in dirs]
    for chunk in chunks:
        nbytes = len(chunk.encode("utf-8"))
        per_model_ids, per_model_logp = [], []
        for m, (model, tok) in enumerate(zip(models, toks)):
            ids = [_context_token(tok)] + tok.encode(chunk)
            ids = torch.tensor([ids], device=device)
            logp = F.log_softmax(sequence_logits(model, ids)[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            stats[m]["nll"] -= float(logp.gather(1, targets[:, None]).sum())
            stats[m]["bytes"] += nbytes
            stats[m]["tokens"] += int(targets.numel())
            per_model_ids.append(ids)
            per_model_logp.append(logp)
        t_logp = per_model_logp[teacher_index]
        for m in range(len(models)):
            if not same[m]:
                continue
            logp = per_model_logp[m]
            stats[m]["agree"] += int((logp.argmax(-1) == t_logp.argmax(-1)).sum())
            stats[m]["kl"] += float((t_logp.exp() * (t_logp - logp)).sum())
            stats[m]["positions"] += int(logp.shape[0])
    for m, s in enumerate(stats):
        s["same_tokenizer"] = same[m]
        s["parameters"] = count_params(models[m])
        s["layers"] = models[m].config.num_layers
    return stats


def decode_timings(cfg: EvalConfig, dirs: list[Path]) -> list[dict]:
    """Batch-1 greedy decode per model in our engine, measured round-robin; the median round by tok/s.

    Each entry: tok_s (decode tokens after the first / their time), ttft_s, total_s, prompt_tokens,
    output_tokens.
    """
    from llmaas.engine.sampling_params import SamplingParams
    from llmaas.llm import LLM

    llms = [LLM(str(d), dtype=cfg.dtype, device=cfg.device, kv_cache_memory=64 * 2**20) for d in dirs]
    prompt = "The quick brown fox jumps over the lazy dog. Once upon a time"
    params = SamplingParams(max_tokens=cfg.decode_tokens, temperature=0.0, ignore_eos=True)
    samples: list[list[dict]] = [[] for _ in dirs]
    for rnd in range(cfg.decode_rounds + 1):  # round 0 warms up
        for m, llm in enumerate(llms):
            engine = llm.engine
            start = time.perf_counter()
            prompt_ids = engine.add_request(f"speed-{rnd}-{m}", prompt, params)
            first = last = None
            produced = 0
            while engine.has_unfinished_requests():
                for out in engine.step():
                    produced = len(out.outputs[0].token_ids)
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
            if rnd > 0 and produced > 1 and last > first:
                samples[m].append(
                    dict(
                        tok_s=(produced - 1) / (last - first),
                        ttft_s=first - start,
                        total_s=last - start,
                        prompt_tokens=len(prompt_ids),
                        output_tokens=produced,
                    )
                )
    out = []
    for runs in samples:
        runs = sorted(runs, key=lambda r: r["tok_s"])
        out.append(runs[len(runs) // 2] if runs else None)
    return out


def decode_speed(cfg: EvalConfig, dirs: list[Path]) -> list[float]:
    """Median batch-1 greedy decode tok/s per model (see decode_timings)."""
    return [t["tok_s"] if t else float("nan") for t in decode_timings(cfg, dirs)]


def output_usd_per_million(usd_per_hour: str | float, timing: dict) -> float:
    """USD per 1M output tokens of one batch-1 request on a machine at `usd_per_hour`.

    Uses the cost model of `llmaas.bench.cost` (machine time split between input and output tokens by
    time to first token, exact to the micro-USD, rounded up); where that module is absent, the same
    split done here: usd_per_hour / (decode tok/s * 3600) * 1e6.
    """
    try:
        from fractions import Fraction

        from llmaas.bench.cost import level_cost
        from llmaas.billing.money import usd_to_micros
    except ImportError:
        return usd_per_million_tokens(float(usd_per_hour), timing["tok_s"])
    level = {
        "concurrency": 1,
        "input_tokens": timing["prompt_tokens"],
        "output_tokens": timing["output_tokens"],
        "duration_s": timing["total_s"],
        "ttft_sum_s": timing["ttft_s"],
        "e2e_sum_s": timing["total_s"],
        "output_tok_per_s": timing["output_tokens"] / timing["total_s"],
        "errors": 0,
        "ttft_s": {},
    }
    cost = level_cost(level, usd_to_micros(str(usd_per_hour), "usd_per_hour"), Fraction(0))
    return cost.break_even_output_micros / 1e6


def evaluate(cfg: EvalConfig) -> list[EvalRow]:
    if not cfg.models:
        raise InvalidRequestError("give at least one --model", param="model")
    names = list(cfg.models)
    if cfg.teacher is not None and cfg.teacher not in names:
        names = [cfg.teacher] + names
    teacher_index = names.index(cfg.teacher) if cfg.teacher is not None else 0
    dirs = [resolve_model_dir(n) for n in names]
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stats = score(cfg, dirs, teacher_index, device)
    timings = decode_timings(cfg, dirs) if cfg.decode_tokens > 1 else [None] * len(dirs)
    rows = []
    for name, s, timing in zip(names, stats, timings):
        ok = s["same_tokenizer"] and s["positions"]
        rows.append(
            EvalRow(
                model=name,
                parameters=s["parameters"],
                layers=s["layers"],
                bits_per_byte=s["nll"] / math.log(2) / s["bytes"],
                agreement=s["agree"] / s["positions"] if ok else None,
                kl=s["kl"] / s["positions"] if ok else None,
                decode_tok_s=timing["tok_s"] if timing else None,
                usd_per_mtok=output_usd_per_million(cfg.usd_per_hour, timing) if timing else None,
                scored_tokens=s["tokens"],
                scored_bytes=s["bytes"],
            )
        )
    return rows


def markdown_table(rows: list[EvalRow], cfg: EvalConfig) -> str:
    def f(x, fmt):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    head = (
        "| model | params | layers | bits/byte | top-1 agree | KL(teacher‖model) | decode tok/s | "
        f"$ / 1M output tok at ${cfg.usd_per_hour}/h |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.parameters / 1e6:.1f}M | {r.layers} | {r.bits_per_byte:.4f} | "
            f"{f(r.agreement, '.1%')} | {f(r.kl, '.4f')} | {f(r.decode_tok_s, '.1f')} | "
            f"{f(r.usd_per_mtok, '.2f')} |"
        )
    dtype = resolve_dtype_name(cfg.dtype, cfg.device or "cpu")
    lines.append(
        f"\nHeld-out text: {', '.join(cfg.data)}; {rows[0].scored_bytes:,} bytes scored. Decode: batch 1, "
        f"greedy, {cfg.decode_tokens} tokens, {dtype}, median of {cfg.decode_rounds} rounds."
    )
    return "\n".join(lines)
