"""Decoder-only transformer: llama, mistral, qwen2 (qkv bias), qwen3 (q/k norm), and their sparse
MoE variants mixtral, qwen2_moe and qwen3_moe (a layer's MLP is then a `SparseMoeBlock`).

One readable file in the spirit of gpt-fast. q/k/v and gate/up projections are fused at load time
(fewer, larger matmuls per step); the weight loader splits HF's separate tensors into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmaas.kernels import cpu_ops
from llmaas.models.activation import silu_and_mul
from llmaas.models.attention import ForwardBatch, allocate_kv_cache, attend_cached, write_kv_cache
from llmaas.models.config import ModelConfig
from llmaas.models.moe import SparseMoeBlock
from llmaas.models.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # qwen3's per-head q/k norms: a row per head
        # on the CPU: one native call, each row alone (docs/batch_invariance.md); torch's op under autograd
        if cpu_ops.fits(rows) and not cpu_ops.needs_grad(self.weight):
            return cpu_ops.rms_norm(rows, self.weight, self.eps).view(x.shape)
        # One fused op; it normalises in fp32 internally, like HF's reference implementation.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        self.k_cache = self.v_cache = torch.empty(0)

    def cache_elements_per_token(self) -> int:
        """Cache entries one token costs in this layer (the engine sizes its block pool with it)."""
        return 2 * self.num_kv_heads * self.head_dim

    def allocate_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> None:
        args = (self.num_kv_heads, self.head_dim, num_blocks, block_size, dtype, device)
        self.k_cache, self.v_cache = allocate_kv_cache(*args), allocate_kv_cache(*args)

    def _rotated_and_cached(
        self, qkv: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of this step ([T, heads, head_dim]), rotary applied, k and v written to the cache."""
        if self.q_norm is None and cpu_ops.can_write_kv(qkv, rope[0], self.k_cache):
            # Native: rotary in place and the cache write in one call.
            heads = (self.num_heads, self.num_kv_heads, self.head_dim)
            return cpu_ops.rope_write_kv(qkv, *heads, rope, batch.slot_mapping, self.k_cache, self.v_cache)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, rope)
        write_kv_cache(k, v, self.k_cache, self.v_cache, batch.slot_mapping)
        return q, k, v

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        q, k, v = self._rotated_and_cached(self.qkv_proj(x), batch, rope)
        o = attend_cached(q, k, v, self.k_cache, self.v_cache, batch, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def build_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    moe = cfg.moe
    if not cfg.is_moe_layer(layer):
        return MLP(cfg.hidden_size, cfg.intermediate_size)
    return SparseMoeBlock(
        cfg.hidden_size,
        moe.num_experts,
        moe.top_k,
        moe.expert_intermediate_size,
        moe.renormalize,
        moe.shared_expert_intermediate_size,
    )


class PreNormLayer(nn.Module):
    """x + attention(norm(x)), then + mlp(norm(x)); subclasses build the four modules."""

    input_layernorm: nn.Module
    self_attn: nn.Module
    post_attention_layernorm: nn.Module
    mlp: nn.Module

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLayer(PreNormLayer):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = build_mlp(cfg, layer)


class DenseDecoder(nn.Module):
    """Token ids [T] (flattened over the batch) -> hidden states [T, hidden]; logits on demand.

    Other families reuse it with their own `layer_class` and `rope_dim`.
    """

    layer_class: type[nn.Module] = DecoderLayer

    @staticmethod
    def rope_dim(cfg) -> int:
        return cfg.head_dim

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(
            self.rope_dim(cfg), cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        self.layers = nn.ModuleList(self.layer_class(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(batch.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, batch, rope)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
