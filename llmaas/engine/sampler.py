"""Sampler: logits of the sequences that sample this step -> one token each (plus logprobs).

Vectorised over the batch where parameters vary per row (temperature, top-k, top-p, min-p); per row
only for what is inherently per request (penalties over its own tokens, logit_bias, its own seed).
Seeded rows draw from their own generator, so a seed gives the same text whatever else is batched.
Logprobs are those of the model's raw distribution (before penalties and temperature).
Constrained rows (grammar.py) have every token their grammar forbids set to -inf first, before
penalties, logit bias, temperature and top-k/p, greedy rows too; their logprobs stay the raw ones.

Failure isolation: `sample` runs the whole batch at once (the common case, no per-row Python beyond
what is inherently per request). If it raises, the runner calls `sample_each`, which samples row by
row so that the fault is pinned on the request(s) whose rows raise; every other row still gets its
token. (In such a step an unseeded row draws from the shared generator twice and a seeded row may
advance its own generator twice: a seed is reproducible only in steps where nothing failed.)
"""

from __future__ import annotations

import torch

from llmaas.engine.grammar import TokenMasks
from llmaas.engine.sequence import Sequence, TokenLogprob


def _apply_penalties_and_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    vocab = logits.shape[-1]
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias.keys()), device=logits.device)
            logits[row, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.all_token_ids, device=logits.device).unique()
            values = logits[row, seen]
            logits[row, seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            out = torch.tensor(seq.output_token_ids, device=logits.device)
            counts = torch.bincount(out, minlength=vocab).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p as -inf masks, all rows at once."""
    device = logits.device
    temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=device)
    logits = logits / temps.unsqueeze(1)
    top_ks = [s.params.top_k for s in seqs]
    if any(top_ks):
        k_max = min(max(top_ks), logits.shape[-1])
        kth = torch.topk(logits, k_max, dim=-1).values
        # clamped in Python: a k beyond the vocabulary must never reach a tensor constructor (int64)
        ks = torch.tensor([min(k or k_max, k_max) - 1 for k in top_ks], device=device)
        threshold = kth.gather(1, ks.unsqueeze(1))
        no_k = torch.tensor([k == 0 for k in top_ks], device=device).unsqueeze(1)
        logits = logits.masked_fill((logits < threshold) & ~no_k, float("-inf"))
    top_ps = torch.tensor([s.params.top_p for s in seqs], device=device)
    if bool((top_ps < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_ps.unsqueeze(1)  # keep the token crossing p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    min_ps = torch.tensor([s.params.min_p for s in seqs], device=device)
    if bool((min_ps > 0).any()):
        probs = logits.softmax(-1)
        limit = probs.max(-1, keepdim=True).values * min_ps.unsqueeze(1)
        logits = logits.masked_fill(probs < limit, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    generator: torch.Generator | None = None,
    masks: TokenMasks | None = None,
) -> list[tuple[int, TokenLogprob | None]]:
    """logits: [B, V] for seqs (one row each); `masks`: the tokens each constrained row may take.
    Returns (token id, logprob info or None) per row."""
    logits = logits.float()
    want_logprobs = any(s.params.logprobs is not None for s in seqs)
    raw_logprobs = logits.log_softmax(-1) if want_logprobs else None
    if masks is not None:
        logits = masks.apply(logits)  # a copy: the raw logits may be sampled again row by row
    needs_processing = any(
        s.params.logit_bias
        or s.params.repetition_penalty != 1.0
        or s.params.presence_penalty
        or s.params.frequency_penalty
        for s in seqs
    )
    if needs_processing:
        logits = logits.clone()
        _apply_penalties_and_bias(logits, seqs)
    tokens = logits.argmax(-1)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        sub_seqs = [seqs[i] for i in random_rows]
        probs = _filter(logits[random_rows], sub_seqs).softmax(-1)
        noise = torch.empty_like(probs)
        for j, seq in enumerate(sub_seqs):
            noise[j].exponential_(generator=seq.generator or generator)
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race), one op for all rows
        tokens[random_rows] = (probs / noise).argmax(-1)
    token_list = tokens.tolist()
    results: list[tuple[int, TokenLogprob | None]] = []
    for row, seq in enumerate(seqs):
        info = None
        k = seq.params.logprobs
        if k is not None and raw_logprobs is not None:
            lp = raw_logprobs[row]
            top = []
            if k > 0:
                values, ids = lp.topk(k)
                top = list(zip(ids.tolist(), values.tolist()))
            info = TokenLogprob(token_list[row], float(lp[token_list[row]]), top)
        results.append((token_list[row], info))
    return results


def sample_each(
    logits: torch.Tensor,
    seqs: list[Sequence],
    generator: torch.Generator | None = None,
    masks: TokenMasks | None = None,
) -> tuple[list[tuple[int, TokenLogprob | None] | None], dict[int, Exception]]:
    """The fallback after a batched `sample` raised: one row at a time. Returns the result per row
    (None where that row failed) and the exception of each failed row."""
    results: list[tuple[int, TokenLogprob | None] | None] = []
    failures: dict[int, Exception] = {}
    for row, seq in enumerate(seqs):
        try:
            row_mask = masks.for_row(row) if masks is not None else None
            results.append(sample(logits[row : row + 1], [seq], generator, row_mask)[0])
        except Exception as exc:  # this row's request fails alone
            results.append(None)
            failures[row] = exc
    return results, failures
