"""DeepseekConfig: what deepseek_v2 / deepseek_v3 config.json files say, checked field by field.

Multi-head latent attention (MLA) sizes, the DeepSeekMoE layout (shared experts, dense first layers,
moe_layer_freq) and the router (v2: softmax with greedy or group-limited top-k; v3: sigmoid scores,
a correction bias that only steers selection, group top-k "noaux_tc"). A routing method, scoring
function or rope scaling we do not implement is refused naming the field, and so is a missing
num_experts_per_tok (transformers' DeepSeek-V2 would quietly run such a model dense).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmaas.errors import ModelLoadError
from llmaas.models.config import ModelConfig, MoEConfig, _eos_ids, _require, _rope_params
from llmaas.models.rope import _yarn_mscale

DEEPSEEK_FAMILIES = ("deepseek_v2", "deepseek_v3")
TOPK_METHODS = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}
SCORING_FUNCS = {"deepseek_v2": ("softmax",), "deepseek_v3": ("sigmoid",)}


@dataclass
class DeepseekConfig(ModelConfig):
    """ModelConfig plus MLA sizes and DeepSeek routing. head_dim is the q/k head size (nope + rope)."""

    q_lora_rank: int | None = None  # None: queries come straight from q_proj
    kv_lora_rank: int = 0  # the cached latent
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0  # the cached rotary key, shared by all heads
    v_head_dim: int = 0
    softmax_scale: float = 1.0  # qk_head_dim ** -0.5, times yarn's mscale squared
    rope_interleave: bool = True  # checkpoints store rotary dims as (x0, x1), (x2, x3), ... pairs
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    num_nextn_predict_layers: int = 0  # v3's multi-token-prediction layers: stored, not served

    @property
    def latent_cache_size(self) -> int:
        """Cache elements per token and layer: the latent and the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def _int(cfg: dict[str, Any], key: str, path: Path, minimum: int = 1) -> int:
    value = _require(cfg, key, path)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelLoadError(f"{path}: config field '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _optional_int(cfg: dict[str, Any], key: str, path: Path, default: int | None) -> int | None:
    return default if cfg.get(key) is None else _int(cfg, key, path, minimum=0)


def _choice(
    cfg: dict[str, Any], key: str, family: str, allowed: dict[str, tuple[str, ...]], path: Path
) -> str:
    value = cfg.get(key) or allowed[family][0]
    if value not in allowed[family]:
        raise ModelLoadError(
            f"{path}: {key} '{value}' is not supported for {family} (supported: {', '.join(allowed[family])})"
        )
    return value


def _softmax_scale(qk_head_dim: int, scaling: dict[str, Any] | None, max_pos: int) -> float:
    """As DeepSeek: with a scaled rope and mscale_all_dim, the scores grow by yarn's mscale squared."""
    scale = qk_head_dim**-0.5
    if scaling and scaling.get("mscale_all_dim"):
        factor = scaling.get("factor")
        if factor is None:  # yarn without a factor: the context was stretched from the original
            factor = max_pos / scaling["original_max_position_embeddings"]
        mscale = _yarn_mscale(float(factor), float(scaling["mscale_all_dim"]))
        scale *= mscale * mscale
    return scale


def _moe(cfg: dict[str, Any], family: str, num_layers: int, path: Path) -> tuple[MoEConfig, dict[str, Any]]:
    """The expert layout (as MoEConfig) and the DeepSeek routing fields."""
    num_experts = _int(cfg, "n_routed_experts", path)
    if cfg.get("num_experts_per_tok") is None:
        raise ModelLoadError(
            f"{path}: config field 'num_experts_per_tok' is missing: the routed experts of a "
            f"{family} model cannot run without it"
        )
    top_k = _int(cfg, "num_experts_per_tok", path)
    if top_k > num_experts:
        raise ModelLoadError(
            f"{path}: num_experts_per_tok ({top_k}) is larger than n_routed_experts ({num_experts})"
        )
    topk_method = _choice(cfg, "topk_method", family, TOPK_METHODS, path)
    scoring_func = _choice(cfg, "scoring_func", family, SCORING_FUNCS, path)
    n_group = topk_group = 1
    if topk_method != "greedy":
        n_group, topk_group = _int(cfg, "n_group", path), _int(cfg, "topk_group", path)
        if num_experts % n_group:
            raise ModelLoadError(
                f"{path}: n_routed_experts ({num_experts}) is not a multiple of n_group ({n_group})"
            )
        if topk_group > n_group:
            raise ModelLoadError(f"{path}: topk_group ({topk_group}) is larger than n_group ({n_group})")
        per_group = num_experts // n_group
        if top_k > topk_group * per_group:
            raise ModelLoadError(
                f"{path}: num_experts_per_tok ({top_k}) exceeds the experts in topk_group groups "
                f"({topk_group} x {per_group})"
            )
        if topk_method == "noaux_tc" and per_group < 2:  # groups are scored by their two best experts
            raise ModelLoadError(f"{path}: n_group ({n_group}) leaves fewer than 2 experts per group")
    first_dense = _optional_int(cfg, "first_k_dense_replace", path, 0)
    freq = _int(cfg, "moe_layer_freq", path) if cfg.get("moe_layer_freq") is not None else 1
    shared = _optional_int(cfg, "n_shared_experts", path, 0)
    expert_size = _int(cfg, "moe_intermediate_size", path)
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_intermediate_size=expert_size,
        renormalize=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=expert_size * shared,
        sparse_layers=tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0),
    )
    routing = dict(
        topk_method=topk_method,
        scoring_func=scoring_func,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
        num_shared_experts=shared,
    )
    return moe, routing


def deepseek_config_from_dict(cfg: dict[str, Any], path: Path = Path("config.json")) -> DeepseekConfig:
    family = cfg.get("model_type")
    if family not in DEEPSEEK_FAMILIES:
        raise ModelLoadError(f"{path}: model_type '{family}' is not a DeepSeek family")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelLoadError(f"{path}: hidden_act '{act}' is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise ModelLoadError(f"{path}: mlp_bias=true is not supported")
    if cfg.get("quantization_config"):  # e.g. DeepSeek-V3's FP8 blocks with weight_scale_inv tensors
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ModelLoadError(
            f"{path}: quantization_config ({method}) is not supported: load bf16/fp32 weights"
        )
    num_layers = _int(cfg, "num_hidden_layers", path)
    heads = _int(cfg, "num_attention_heads", path)
    nope, rope_dim = _int(cfg, "qk_nope_head_dim", path), _int(cfg, "qk_rope_head_dim", path)
    if rope_dim % 2:
        raise ModelLoadError(f"{path}: qk_rope_head_dim ({rope_dim}) must be even")
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    theta, scaling = _rope_params(cfg, path)
    moe, routing = _moe(cfg, family, num_layers, path)
    return DeepseekConfig(
        family=family,
        vocab_size=_int(cfg, "vocab_size", path),
        hidden_size=_int(cfg, "hidden_size", path),
        intermediate_size=_int(cfg, "intermediate_size", path),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=heads,  # every head reads the same latent; no grouping to speak of
        head_dim=nope + rope_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        moe=moe,
        raw=cfg,
        q_lora_rank=_optional_int(cfg, "q_lora_rank", path, None) or None,
        kv_lora_rank=_int(cfg, "kv_lora_rank", path),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=_int(cfg, "v_head_dim", path),
        softmax_scale=_softmax_scale(nope + rope_dim, scaling, max_pos),
        # DeepSeek-V2 checkpoints are always interleaved; V3's say so in rope_interleave.
        rope_interleave=family == "deepseek_v2" or bool(cfg.get("rope_interleave", True)),
        num_nextn_predict_layers=_optional_int(cfg, "num_nextn_predict_layers", path, 0),
        **routing,
    )
