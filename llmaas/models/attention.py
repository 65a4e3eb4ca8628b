"""Attention over a paged KV cache.

A step's tokens arrive flattened: prefill chunks first (each a run of tokens of one sequence),
then decode tokens (one per sequence). `ForwardBatch` says where each token's keys and values go
(`slot_mapping`: flat slot = block * block_size + offset) and which cached slots each query may read.
It is built once per step and shared by all layers; the layers only index with it.

The cache layout is per layer and owned by the attention module (`allocate_cache`,
`cache_elements_per_token`): dense attention keeps K and V head-major, [H, blocks, block_size, D];
latent attention (MLA) can keep one compressed vector per token instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmaas.kernels import cpu_ops

FUSED_DECODE_MAX_BATCH = 2  # measured on CPU: SDPA wins below this, two batched matmuls above


@dataclass
class PrefillSegment:
    start: int  # first token of the chunk in the flat batch
    length: int  # tokens in this chunk
    context_len: int  # keys visible to the chunk's last token (cached prefix + chunk)
    key_slots: torch.Tensor | None  # [context_len] cache slots; None: the chunk is all the context
    mask: torch.Tensor | None  # [length, context_len] True = may attend; None: plain causal
    block_table: torch.Tensor  # [blocks] cache blocks holding the context (for the native kernel)
    sliding_window: int | None = None

    @functools.cached_property
    def key_counts(self) -> torch.Tensor:
        """[length] keys each query sees (causal after the cached prefix): for the native kernel,
        built on first use, once per step for all layers."""
        first = self.context_len - self.length
        return torch.arange(first + 1, self.context_len + 1, device=self.block_table.device)


@dataclass
class DecodeBatch:
    start: int  # first decode token in the flat batch; decode tokens run to the end
    block_tables: torch.Tensor  # [B, num_blocks] cache blocks of each sequence, padded with block 0
    seq_lens: torch.Tensor  # [B] keys each query sees
    block_size: int
    sliding_window: int | None

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[B, 1, 1, num_blocks * block_size] True = may attend: for the torch paths only (the native
        kernel reads seq_lens), so built on first use, once per step."""
        lens = self.seq_lens
        k_pos = torch.arange(self.block_tables.shape[1] * self.block_size, device=lens.device)
        mask = k_pos.unsqueeze(0) < lens.unsqueeze(1)
        if self.sliding_window is not None:
            mask &= k_pos.unsqueeze(0) > (lens - 1 - self.sliding_window).unsqueeze(1)
        return mask[:, None, None, :]


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [T] absolute position of each token
    slot_mapping: torch.Tensor  # [T] where each token's K/V is written
    prefills: list[PrefillSegment]
    decode: DecodeBatch | None
    linear: object = None  # hybrids: the state slots of linear-attention layers (gated_deltanet.StateBatch)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


@dataclass
class SequenceChunk:
    """What the engine tells the model about one sequence in a step."""

    num_new_tokens: int  # tokens fed this step (1 for decode)
    num_cached_tokens: int  # tokens already in the cache before this step
    block_table: list[int]


def is_decode(num_new_tokens: int, num_cached_tokens: int) -> bool:
    """One new token after cached ones: batched with the other decodes, after every prefill."""
    return num_new_tokens == 1 and num_cached_tokens > 0


def _slots(block_table: list[int], block_size: int, begin: int, end: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(begin, end)]


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    if window is not None:
        mask &= k_pos.unsqueeze(0) > q_pos.unsqueeze(1) - window
    return mask


def build_forward_batch(
    chunks: list[SequenceChunk],
    block_size: int,
    device: torch.device | str = "cpu",
    sliding_window: int | None = None,
) -> ForwardBatch:
    """Chunks with num_new_tokens > 1 or a fresh prompt are prefills and must come before decodes."""
    positions: list[int] = []
    slot_mapping: list[int] = []
    prefills: list[PrefillSegment] = []
    decode_chunks: list[SequenceChunk] = []
    decode_start = None
    for chunk in chunks:
        begin, end = chunk.num_cached_tokens, chunk.num_cached_tokens + chunk.num_new_tokens
        if is_decode(chunk.num_new_tokens, chunk.num_cached_tokens):
            decode_start = len(positions) if decode_start is None else decode_start
            decode_chunks.append(chunk)
        elif decode_start is not None:
            raise ValueError("prefill chunks must come before decode tokens")
        else:
            start = len(positions)
            fresh = begin == 0 and sliding_window is None
            key_slots = mask = None
            if not fresh:
                key_slots = torch.tensor(_slots(chunk.block_table, block_size, 0, end), device=device)
                q_pos = torch.arange(begin, end, device=device)
                mask = _window_mask(q_pos, torch.arange(end, device=device), sliding_window)
            table = torch.tensor(chunk.block_table[: -(-end // block_size)], device=device)
            prefills.append(
                PrefillSegment(start, chunk.num_new_tokens, end, key_slots, mask, table, sliding_window)
            )
        positions.extend(range(begin, end))
        slot_mapping.extend(_slots(chunk.block_table, block_size, begin, end))
    decode = None
    if decode_chunks:
        decode = _decode_batch(decode_chunks, decode_start, block_size, device, sliding_window)
    return ForwardBatch(
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        prefills=prefills,
        decode=decode,
    )


def _decode_batch(
    chunks: list[SequenceChunk], start: int, block_size: int, device, sliding_window: int | None
) -> DecodeBatch:
    """Block tables and key counts of the decoding sequences (hot path; the mask is built on use)."""
    lens = torch.tensor([c.num_cached_tokens + 1 for c in chunks])
    num_blocks = -(-int(lens.max()) // block_size)
    tables = torch.zeros(len(chunks), num_blocks, dtype=torch.long)
    for i, c in enumerate(chunks):
        row = c.block_table[:num_blocks]
        tables[i, : len(row)] = torch.tensor(row)
    return DecodeBatch(start, tables.to(device), lens.to(device), block_size, sliding_window)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Head-major cache [H, num_blocks, block_size, D] -> [H, B, S, D] for each row of block ids.

    Copies whole blocks (kilobytes each), several times faster than gathering token by token, and
    the result is already in the layout the attention matmuls want (no transposing copy).
    """
    b, n = block_tables.shape
    h, _, block_size, d = cache.shape
    return cache.index_select(1, block_tables.reshape(-1)).view(h, b, n * block_size, d)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per sequence. q: [B, Hq, D]; k, v: [Hk, B, S, D]; mask: [B, 1, 1, S] -> [B, Hq, D].

    For more than a couple of rows: two batched matmuls with the query heads of a kv head grouped,
    several times faster on CPU than the fused SDPA kernel, which is built for long queries.
    """
    b, hq, d = q.shape
    hk = k.shape[0]
    if b <= FUSED_DECODE_MAX_BATCH:  # a handful of rows: the fused kernel's fixed cost is lower
        out = _sdpa(q.unsqueeze(2), k.transpose(0, 1), v.transpose(0, 1), mask, False, scale)
        return out.squeeze(2)
    qg = (q * scale).view(b, hk, hq // hk, d).transpose(0, 1)  # [Hk, B, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2))  # [Hk, B, G, S]
    scores.masked_fill_(~mask.view(1, b, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs, v)  # [Hk, B, G, Dv]
    return out.transpose(0, 1).reshape(b, hq, v.shape[-1])


def allocate_kv_cache(
    num_heads: int, head_dim: int, num_blocks: int, block_size: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """One layer's K (or V) cache, head-major: [H, num_blocks, block_size, D]."""
    return torch.zeros(num_heads, num_blocks, block_size, head_dim, dtype=dtype, device=device)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, causal: bool, scale: float):
    """q: [B, Hq, L, D]; k, v: [B, Hk, S, D]. GQA inside the kernel (repeating kv heads costs ~10x)."""
    gqa = k.shape[1] != q.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """k, v: [T, Hk, D] into caches [Hk, num_blocks, block_size, D] at flat slots [T]."""
    k_flat = k_cache.view(k_cache.shape[0], -1, k_cache.shape[-1])  # [Hk, slots, D]
    v_flat = v_cache.view(v_cache.shape[0], -1, v_cache.shape[-1])
    k_flat.index_copy_(1, slots, k.transpose(0, 1).to(k_flat.dtype))
    v_flat.index_copy_(1, slots, v.transpose(0, 1).to(v_flat.dtype))


def attend_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hk, D], already written to the caches [Hk, num_blocks, block_size, D]
    (write_kv_cache). Returns [T, Hq, D]."""
    if not batch.prefills and batch.decode is not None:  # the common pure-decode step: no scatter
        return _decode(q, k_cache, v_cache, batch.decode, scale)
    out = torch.empty_like(q)
    k_flat = k_cache.view(k_cache.shape[0], -1, k_cache.shape[-1])
    v_flat = v_cache.view(v_cache.shape[0], -1, v_cache.shape[-1])
    for seg in batch.prefills:
        sl = slice(seg.start, seg.start + seg.length)
        if cpu_ops.prefill_fits(q[sl], k_cache):
            out[sl] = _native_prefill(q[sl], k_cache, v_cache, seg, scale)
            continue
        qs = q[sl].transpose(0, 1).unsqueeze(0)
        if seg.key_slots is None:
            ks, vs = k[sl].transpose(0, 1), v[sl].transpose(0, 1)
        else:
            ks, vs = k_flat.index_select(1, seg.key_slots), v_flat.index_select(1, seg.key_slots)
        o = _sdpa(qs, ks.unsqueeze(0), vs.unsqueeze(0), seg.mask, seg.mask is None, scale)
        out[sl] = o.squeeze(0).transpose(0, 1)
    if batch.decode is not None:
        out[batch.decode.start :] = _decode(q[batch.decode.start :], k_cache, v_cache, batch.decode, scale)
    return out


def _native_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seg: PrefillSegment, scale: float
) -> torch.Tensor:
    """The chunk's queries as decode queries over the paged cache (its keys are already written):
    query i sees the first context_len - length + i + 1 keys. On bf16 caches about twice as fast as
    torch's flash attention at 1,000 tokens (docs/performance.md)."""
    tables = seg.block_table.expand(seg.length, -1)  # one table, read with a row stride of 0
    return cpu_ops.paged_decode_attention(
        q, k_cache, v_cache, tables, seg.key_counts, seg.sliding_window, scale
    )


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: DecodeBatch, scale: float):
    """Decode queries [B, Hq, D]: the native kernel reads the cache in place; else gather, then attend."""
    if cpu_ops.decode_fits(q, k_cache):
        return cpu_ops.paged_decode_attention(
            q, k_cache, v_cache, d.block_tables, d.seq_lens, d.sliding_window, scale
        )
    return decode_attention(q, *_gathered(k_cache, v_cache, d), d.mask, scale)


def _gathered(
    k_cache: torch.Tensor, v_cache: torch.Tensor, d: DecodeBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    return gather_blocks(k_cache, d.block_tables), gather_blocks(v_cache, d.block_tables)
