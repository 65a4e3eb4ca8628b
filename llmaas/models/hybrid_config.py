"""Config of the hybrid linear-attention families: qwen3_5_text (dense MLPs) and qwen3_next (MoE).

Both interleave Gated DeltaNet layers with gated full-attention layers (`layer_types`, by default
three linear then one full). Full attention has q/k norms, a sigmoid output gate and rotary on the
first `partial_rotary_factor` of each head. Fields we cannot serve are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmaas.errors import ModelLoadError
from llmaas.models.config import ModelConfig, _decoder_config, _moe_config, _positive_int

HYBRID_FAMILIES = ("qwen3_5_text", "qwen3_next")
LAYER_TYPES = ("linear_attention", "full_attention")
# rope_parameters keys that are not a scaling: the rotary fraction, and qwen3.5's multimodal sections
# (text positions are equal on all three axes, so the sections change nothing for text)
_ROPE_EXTRAS = ("partial_rotary_factor", "mrope_section", "mrope_interleaved")


@dataclass
class LinearAttentionConfig:
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int


@dataclass
class HybridConfig(ModelConfig):
    linear: LinearAttentionConfig | None = None
    layer_types: list[str] = field(default_factory=list)
    partial_rotary_factor: float = 1.0

    def is_linear_layer(self, layer: int) -> bool:
        return self.layer_types[layer] == "linear_attention"


def _layer_types(cfg: dict[str, Any], num_layers: int, path: Path) -> list[str]:
    types = cfg.get("layer_types")
    if types is None:
        interval = (
            _positive_int(cfg, "full_attention_interval", path) if "full_attention_interval" in cfg else 4
        )
        return ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise ModelLoadError(
            f"{path}: config field 'layer_types' must list {num_layers} entries of {', '.join(LAYER_TYPES)}"
        )
    return list(types)


def hybrid_config_from_dict(cfg: dict[str, Any], path: Path) -> HybridConfig:
    family = cfg["model_type"]
    if cfg.get("attention_bias"):
        raise ModelLoadError(f"{path}: attention_bias=true is not supported for {family}")
    rope = dict(cfg.get("rope_parameters") or {})
    partial = float(rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    for key in _ROPE_EXTRAS[1:]:
        rope.pop(key, None)
    if not 0 < partial <= 1:
        raise ModelLoadError(f"{path}: partial_rotary_factor must be in (0, 1], got {partial}")
    base = _decoder_config({**cfg, "rope_parameters": rope, "model_type": family}, path)
    num_layers = base.num_layers
    linear = LinearAttentionConfig(
        num_key_heads=_positive_int(cfg, "linear_num_key_heads", path),
        num_value_heads=_positive_int(cfg, "linear_num_value_heads", path),
        key_head_dim=_positive_int(cfg, "linear_key_head_dim", path),
        value_head_dim=_positive_int(cfg, "linear_value_head_dim", path),
        conv_kernel=_positive_int(cfg, "linear_conv_kernel_dim", path, minimum=2),
    )
    if linear.num_value_heads % linear.num_key_heads:
        raise ModelLoadError(
            f"{path}: linear_num_value_heads ({linear.num_value_heads}) must be a multiple of "
            f"linear_num_key_heads ({linear.num_key_heads})"
        )
    rotary_dim = int(base.head_dim * partial)
    if rotary_dim % 2 or rotary_dim == 0:
        raise ModelLoadError(f"{path}: partial_rotary_factor gives an odd or empty rotary dimension")
    moe = None
    if family == "qwen3_next" and int(cfg.get("num_experts", 0)) > 0:
        moe = _moe_config(cfg, "qwen3_moe", path)
        moe.shared_expert_intermediate_size = _positive_int(cfg, "shared_expert_intermediate_size", path)
    fields = {k: getattr(base, k) for k in base.__dataclass_fields__}
    fields.update(qk_norm=True, moe=moe, raw=cfg)
    return HybridConfig(
        **fields,
        linear=linear,
        layer_types=_layer_types(cfg, num_layers, path),
        partial_rotary_factor=partial,
    )
