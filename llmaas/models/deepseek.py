"""DeepSeek-V2 / V3: multi-head latent attention and DeepSeekMoE.

Each layer: RMSNorm -> MLA (llmaas/models/mla.py) -> RMSNorm -> MLP. The MLP is dense for the first
`first_k_dense_replace` layers (and off the `moe_layer_freq` beat), else DeepSeekMoE: a router
(llmaas/models/deepseek_routing.py) picks k routed experts, run by the grouped executor
`moe.Experts`, and the always-on shared experts (one wide MLP) are added for every token.

`adapt_checkpoint` turns what transformers' save_pretrained writes into what these modules hold:
per-expert keys are stacked by the generic loader; here q_a_proj (or q_proj) and kv_a_proj_with_mqa
become one projection, the shared experts' gate and up another, v3's multi-token-prediction layers
are dropped, and the interleaved rotary rows are reordered (see `_deinterleave`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from llmaas.errors import ModelLoadError
from llmaas.models.deepseek_config import DeepseekConfig
from llmaas.models.deepseek_routing import v2_route, v3_route
from llmaas.models.dense import MLP, DenseDecoder, PreNormLayer, RMSNorm
from llmaas.models.mla import MLAttention
from llmaas.models.moe import Experts


class DeepseekRouter(nn.Module):
    """Router weight [E, H] (and v3's selection bias [E]); logits and weights in fp32, as DeepSeek."""

    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.moe.num_experts, cfg.hidden_size))
        self.is_v3 = cfg.family == "deepseek_v3"
        if self.is_v3:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.moe.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, moe = self.cfg, self.cfg.moe
        logits = torch.nn.functional.linear(x.float(), self.weight.float())
        if self.is_v3:
            return v3_route(
                logits, self.e_score_correction_bias, moe.top_k, cfg.n_group, cfg.topk_group,
                moe.renormalize, cfg.routed_scaling_factor,
            )  # fmt: skip
        return v2_route(
            logits, moe.top_k, cfg.topk_method, cfg.n_group, cfg.topk_group,
            moe.renormalize, cfg.routed_scaling_factor,
        )  # fmt: skip


class DeepseekMoE(nn.Module):
    def __init__(self, cfg: DeepseekConfig):
        super().__init__()
        moe = cfg.moe
        self.gate = DeepseekRouter(cfg)
        self.experts = Experts(
            moe.num_experts, cfg.hidden_size, moe.expert_intermediate_size, top_k=moe.top_k
        )
        self.shared_experts = None
        if moe.shared_expert_intermediate_size:
            self.shared_experts = MLP(cfg.hidden_size, moe.shared_expert_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekLayer(PreNormLayer):
    def __init__(self, cfg: DeepseekConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (
            DeepseekMoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        )


class DeepseekDecoder(DenseDecoder):
    """The dense decoder's stack with DeepSeek layers; rotary on the qk_rope_head_dim part only."""

    layer_class = DeepseekLayer
    # Kept in fp32 whatever the model dtype: expert selection is a discontinuous function of them.
    fp32_parameter_suffixes = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")

    @staticmethod
    def rope_dim(cfg: DeepseekConfig) -> int:
        return cfg.qk_rope_head_dim


_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def _deinterleave(rows: torch.Tensor) -> torch.Tensor:
    """Rotary rows stored as pairs (x0, x1), (x2, x3), ... -> (x0, x2, ..., x1, x3, ...).

    DeepSeek rotates each adjacent pair; our rope rotates dim i with dim i + d/2. Reordering the
    projection rows once at load makes the two the same (q and k get the same order, so q.k is
    unchanged) and keeps the rotary code shared with the dense families.
    """
    return torch.cat([rows[0::2], rows[1::2]])


def _reorder_rotary_rows(cfg: DeepseekConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    nope, rope_dim, latent = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    if name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
        per_head = tensor.view(cfg.num_heads, nope + rope_dim, -1)
        rot = torch.stack([_deinterleave(head[nope:]) for head in per_head])
        return torch.cat([per_head[:, :nope], rot], dim=1).reshape(tensor.shape)
    if name.endswith(("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.bias")):
        return torch.cat([tensor[:latent], _deinterleave(tensor[latent:])])
    return tensor


# HF projection -> (our fused projection, part). Parts are concatenated along the output rows.
_FUSED = {
    "self_attn.q_a_proj": ("self_attn.q_kv_a_proj", 0),
    "self_attn.q_proj": ("self_attn.q_kv_a_proj", 0),
    "self_attn.kv_a_proj_with_mqa": ("self_attn.q_kv_a_proj", 1),
    "mlp.shared_experts.gate_proj": ("mlp.shared_experts.gate_up_proj", 0),
    "mlp.shared_experts.up_proj": ("mlp.shared_experts.gate_up_proj", 1),
}
_PROJECTION = re.compile(r"^(model\.layers\.\d+)\.(.+)\.(weight|bias)$")


def _fuse(cfg: DeepseekConfig, name: str, parts: dict[int, torch.Tensor], origin: Path) -> torch.Tensor:
    if 0 not in parts and name.endswith("q_kv_a_proj.bias") and not cfg.q_lora_rank:
        # attention_bias puts a bias on kv_a_proj_with_mqa but never on q_proj
        parts[0] = parts[1].new_zeros(cfg.num_heads * cfg.head_dim)
    if sorted(parts) != [0, 1]:
        raise ModelLoadError(f"{origin}: incomplete projection tensors for {name}")
    return torch.cat([parts[0], parts[1]])


def adapt_checkpoint(cfg: DeepseekConfig, tensors: dict[str, torch.Tensor], origin: Path) -> dict:
    """HF DeepSeek tensors -> names and layouts the generic loader maps onto DeepseekDecoder."""
    out: dict[str, torch.Tensor] = {}
    fused_parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        m = _LAYER_INDEX.match(name)
        if m and int(m.group(1)) >= cfg.num_layers and cfg.num_nextn_predict_layers:
            continue  # a multi-token-prediction layer (speculative decoding): not served
        if cfg.rope_interleave:
            tensor = _reorder_rotary_rows(cfg, name, tensor)
        m = _PROJECTION.match(name)
        if m and m.group(2) in _FUSED:
            prefix, module, kind = m.groups()
            fused, part = _FUSED[module]
            fused_parts.setdefault(f"{prefix}.{fused}.{kind}", {})[part] = tensor
        else:
            out[name] = tensor
    for name, parts in fused_parts.items():
        out[name] = _fuse(cfg, name, parts, origin)
    return out
