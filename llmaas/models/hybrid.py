"""Hybrid decoders: Gated DeltaNet layers interleaved with gated full attention (qwen3_5_text, qwen3_next).

Each layer: RMSNorm -> token mixer -> RMSNorm -> MLP (dense, or qwen3_next's sparse MoE with a gated
shared expert, our `SparseMoeBlock`). The mixer of a linear layer is `GatedDeltaNet`
(gated_deltanet.py, a constant-size state per sequence); that of a full layer is `GatedAttention`:
our paged attention with q/k norms, rotary on the first part of each head only, and the output
multiplied by sigmoid of a per-head gate that the q projection produces beside q.

`adapt_checkpoint` maps transformers' tensors onto these modules: the families' RMSNorms scale by
(1 + weight), so the weight is stored plus one and our RMSNorm is used (the gated norm inside the
linear layer scales by its weight as is); the linear layer's projections become one matrix;
qwen3_next's per-key-head interleaved [q k v z] and [b a] rows are put in qwen3_5's order first.
The multi-token-prediction weights that released checkpoints carry (`mtp.*`) are dropped, as
transformers drops them: we decode one token per step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmaas.errors import ModelLoadError
from llmaas.models.attention import ForwardBatch, attend_cached, write_kv_cache
from llmaas.models.dense import Attention, DenseDecoder, PreNormLayer, RMSNorm, build_mlp
from llmaas.models.gated_deltanet import GatedDeltaNet
from llmaas.models.hybrid_config import HybridConfig
from llmaas.models.rope import apply_rotary

_ONE_CENTRED_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
)


class GatedAttention(Attention):
    """q_proj gives [q | gate] per head; out = o_proj(attention * sigmoid(gate))."""

    def __init__(self, cfg: HybridConfig):
        super().__init__(cfg)
        self.qkv_proj = nn.Linear(cfg.hidden_size, 2 * cfg.q_size + 2 * cfg.kv_size, bias=False)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        h, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_gate, k, v = self.qkv_proj(x).split([2 * self.q_size, self.kv_size, self.kv_size], dim=-1)
        q_gate = q_gate.view(-1, h, 2 * d)
        q, gate = q_gate[..., :d].contiguous(), q_gate[..., d:].reshape(-1, self.q_size)
        q, k = self.q_norm(q), self.k_norm(k.reshape(-1, hk, d))
        v = v.reshape(-1, hk, d)
        rot = rope[0].shape[-1]  # partial rotary: only the first `rot` dimensions turn
        q_rot, k_rot = apply_rotary(q[..., :rot], k[..., :rot], rope)
        q = torch.cat([q_rot, q[..., rot:]], dim=-1)
        k = torch.cat([k_rot, k[..., rot:]], dim=-1)
        write_kv_cache(k, v, self.k_cache, self.v_cache, batch.slot_mapping)
        o = attend_cached(q, k, v, self.k_cache, self.v_cache, batch, self.scale)
        return self.o_proj(o.reshape(-1, self.q_size) * torch.sigmoid(gate))


class HybridLayer(PreNormLayer):
    """`self_attn` is the token mixer: GatedDeltaNet on linear layers (transformers' `linear_attn`)."""

    def __init__(self, cfg: HybridConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GatedDeltaNet(cfg, layer) if cfg.is_linear_layer(layer) else GatedAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = build_mlp(cfg, layer)


class HybridDecoder(DenseDecoder):
    layer_class = HybridLayer

    @staticmethod
    def rope_dim(cfg: HybridConfig) -> int:
        return int(cfg.head_dim * cfg.partial_rotary_factor)

    def attention_layers(self) -> list[nn.Module]:
        """The full-attention layers: only they use the paged KV cache."""
        return [layer.self_attn for layer in self.layers if isinstance(layer.self_attn, GatedAttention)]

    def linear_layers(self) -> list[GatedDeltaNet]:
        """The layers with a constant-size state per sequence."""
        return [layer.self_attn for layer in self.layers if isinstance(layer.self_attn, GatedDeltaNet)]


def _next_to_qwen3_5(cfg: HybridConfig, qkvz: torch.Tensor, ba: torch.Tensor) -> list[torch.Tensor]:
    """qwen3_next's rows, grouped per key head as [q k v z] and [b a], -> [q; k; v], z, b, a."""
    lin = cfg.linear
    per = lin.num_value_heads // lin.num_key_heads
    hidden = qkvz.shape[-1]
    grouped = qkvz.view(lin.num_key_heads, -1, hidden)
    sizes = [lin.key_head_dim, lin.key_head_dim, per * lin.value_head_dim, per * lin.value_head_dim]
    q, k, v, z = (part.reshape(-1, hidden) for part in grouped.split(sizes, dim=1))
    b, a = (
        part.reshape(-1, hidden) for part in ba.view(lin.num_key_heads, 2 * per, hidden).split(per, dim=1)
    )
    return [torch.cat([q, k, v]), z, b, a]


def adapt_checkpoint(cfg: HybridConfig, tensors: dict[str, torch.Tensor], origin: Path) -> dict:
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("mtp."):
            continue
        name = name.replace(".linear_attn.", ".self_attn.")  # our layers call either mixer self_attn
        if name.endswith(_ONE_CENTRED_NORMS) or name == "model.norm.weight":
            out[name] = tensor.float() + 1.0
        elif ".self_attn.in_proj_" in name:
            prefix, proj = name.split(".in_proj_")
            parts.setdefault(prefix, {})[proj.removesuffix(".weight")] = tensor
        elif name.endswith(".self_attn.conv1d.weight"):
            out[name.replace("conv1d.weight", "conv_weight")] = tensor.squeeze(1)
        else:
            out[name] = tensor
    for prefix, got in parts.items():
        if set(got) == {"qkvz", "ba"}:
            pieces = _next_to_qwen3_5(cfg, got["qkvz"], got["ba"])
        elif set(got) == {"qkv", "z", "b", "a"}:
            pieces = [got["qkv"], got["z"], got["b"], got["a"]]
        else:
            raise ModelLoadError(f"{origin}: incomplete input projections for {prefix}: {sorted(got)}")
        out[f"{prefix}.in_proj.weight"] = torch.cat(pieces)
    return out
