"""Multi-head latent attention (DeepSeek-V2 / V3) over a paged cache of latents.

Per token, kv_a_proj_with_mqa makes a latent c (kv_lora_rank, RMS-normalised) and one rotary key
k_pe (qk_rope_head_dim) shared by all heads; kv_b_proj expands c into each head's key part k_nope
and value v. The cache keeps only [c, k_pe] per token and layer: kv_lora_rank + qk_rope_head_dim
elements instead of 2 x heads x head_dim.

Decode never expands cached latents. With W_uk, W_uv the key and value halves of kv_b_proj:

    score_h = q_nope_h . (W_uk_h c) + q_pe_h . k_pe = (W_uk_h^T q_nope_h) . c + q_pe_h . k_pe
    out_h   = sum_s p_hs W_uv_h c_s = W_uv_h (sum_s p_hs c_s)

so each query head is mapped into latent space once, attends over the cached [c, k_pe] rows as one
shared key/value "head" (the latent doubles as the value), and the result is mapped back per head.
Prefill chunks expand the latents of their context instead: for many queries that is fewer FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmaas.models.attention import DecodeBatch, ForwardBatch, allocate_kv_cache, gather_blocks
from llmaas.models.deepseek_config import DeepseekConfig
from llmaas.models.dense import RMSNorm
from llmaas.models.rope import apply_rotary

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm and kv_a_layernorm use the default eps, not rms_norm_eps


def latent_decode_attention(
    q: torch.Tensor, entries: torch.Tensor, latent: int, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, H, R + rope] against cached entries [B, S, R + rope], whose first R dims are the value.

    Two batched matmuls with all heads of a sequence as the rows. On CPU they run in fp32: torch's
    bf16 batched matmul at these shapes measured 5-10x slower than fp32 (and the fused SDPA kernel
    slower still), while the upcast copy is one pass over the gathered rows.
    """
    dtype = q.dtype
    if entries.device.type == "cpu":
        q, entries = q.float(), entries.float()
    scores = torch.matmul(q * scale, entries.transpose(1, 2))  # [B, H, S]
    scores.masked_fill_(~mask.view(mask.shape[0], 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(entries.dtype)
    return torch.matmul(probs, entries[..., :latent]).to(dtype)  # [B, H, R]


class LatentUpProjection(nn.Module):
    """kv_b_proj: latent [R] -> per-head k_nope [nope] and v [dv].

    A bare weight rather than nn.Linear: decode reads it as per-head matrices, and the passes that
    swap nn.Linear layers (weight packing, int8) must leave it whole.
    """

    def __init__(self, latent: int, heads: int, nope: int, v: int):
        super().__init__()
        self.heads, self.nope, self.v = heads, nope, v
        self.weight = nn.Parameter(torch.empty(heads * (nope + v), latent))

    def _per_head(self) -> torch.Tensor:
        return self.weight.view(self.heads, self.nope + self.v, -1)  # [H, nope + dv, R]

    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [S, R] -> k_nope [S, H, nope], v [S, H, dv]."""
        kv = F.linear(latent, self.weight).view(latent.shape[0], self.heads, self.nope + self.v)
        return kv.split([self.nope, self.v], dim=-1)

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [B, H, nope] -> the same query in latent space, [B, H, R]."""
        w_uk = self._per_head()[:, : self.nope]  # [H, nope, R]
        return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)

    def project_output(self, out_latent: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space [B, H, R] -> per-head values [B, H, dv]."""
        w_uv = self._per_head()[:, self.nope :]  # [H, dv, R]
        return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


class MLAttention(nn.Module):
    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.latent = cfg.kv_lora_rank
        qk_size = cfg.num_heads * cfg.head_dim
        self.q_lora = bool(cfg.q_lora_rank)
        # One matmul reads x for both the query (its low-rank part, or all of it) and the latent:
        # the loader concatenates q_a_proj (or q_proj) with kv_a_proj_with_mqa.
        self.q_size = cfg.q_lora_rank if self.q_lora else qk_size
        self.q_kv_a_proj = nn.Linear(
            cfg.hidden_size, self.q_size + cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias
        )
        if self.q_lora:
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, qk_size, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = LatentUpProjection(cfg.kv_lora_rank, cfg.num_heads, self.nope, self.v_dim)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale
        self.cache = torch.empty(0)  # [1, num_blocks, block_size, R + rope]: one shared "head"

    def cache_elements_per_token(self) -> int:
        return self.latent + self.rope_dim

    def allocate_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> None:
        self.cache = allocate_kv_cache(
            1, self.cache_elements_per_token(), num_blocks, block_size, dtype, device
        )

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        q, latent, k_pe = self.q_kv_a_proj(x).split([self.q_size, self.latent, self.rope_dim], dim=-1)
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_pe = q.view(-1, self.num_heads, self.nope + self.rope_dim).split(
            [self.nope, self.rope_dim], -1
        )
        q_pe, k_pe = apply_rotary(q_pe, k_pe.unsqueeze(1), rope)
        entries = torch.cat([self.kv_a_layernorm(latent), k_pe.squeeze(1)], dim=-1)  # [T, R + rope]
        flat_cache = self.cache.view(-1, entries.shape[-1])  # [slots, R + rope]
        flat_cache.index_copy_(0, batch.slot_mapping, entries.to(flat_cache.dtype))

        out = x.new_empty(x.shape[0], self.num_heads, self.v_dim)
        for seg in batch.prefills:
            sl = slice(seg.start, seg.start + seg.length)
            context = entries[sl] if seg.key_slots is None else flat_cache.index_select(0, seg.key_slots)
            out[sl] = self._expanded_attention(q_nope[sl], q_pe[sl], context.to(x.dtype), seg.mask)
        if batch.decode is not None:
            d = batch.decode
            out[d.start :] = self._latent_attention(q_nope[d.start :], q_pe[d.start :], d)
        return self.o_proj(out.view(x.shape[0], -1))

    def _expanded_attention(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Prefill: expand the context latents [S, R + rope] into per-head keys and values."""
        k_nope, v = self.kv_b_proj.expand(context[:, : self.latent])
        k_pe = context[:, self.latent :].unsqueeze(1).expand(-1, self.num_heads, -1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        # The fused SDPA kernels want one head size for q, k and v; with v_head_dim != qk_head_dim
        # torch falls back to its unfused kernel (measured ~5x slower at 1,000 tokens). Zero padding
        # changes neither the scores (the scale is explicit) nor the leading v dims of the output.
        width = max(q.shape[-1], v.shape[-1])
        q, k, v = (t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, tokens, width]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return o.squeeze(0).transpose(0, 1)[..., : self.v_dim]  # [L, H, dv]

    def _latent_attention(self, q_nope: torch.Tensor, q_pe: torch.Tensor, d: DecodeBatch) -> torch.Tensor:
        """Decode: one query per sequence attends over cached latents without expanding them."""
        q = torch.cat([self.kv_b_proj.absorb_query(q_nope), q_pe], dim=-1)  # [B, H, R + rope]
        entries = gather_blocks(self.cache, d.block_tables)[0]  # [B, S, R + rope]
        out_latent = latent_decode_attention(q, entries, self.latent, d.mask, self.scale)
        return self.kv_b_proj.project_output(out_latent)  # [B, H, dv]
