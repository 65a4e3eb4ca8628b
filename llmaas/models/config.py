"""ModelConfig: the fields our modules need, read from an HF-format config.json.

Refuses what we do not support (unknown architecture, unknown rope scaling, activations other than
SiLU, an MoE config without its routing fields) with a message naming the field: loading silently
into a wrong model is worse than failing. `CONFIG_PARSERS` maps each model_type to its parser.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmaas.errors import ModelLoadError

DENSE_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
EMBEDDING_FAMILIES = ("bert",)  # encoders for /v1/embeddings: models/bert.py
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ROPE_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


@dataclass
class MoEConfig:
    """Sparse MLP layers: a softmax top-k router over `num_experts` SiLU-gated experts."""

    num_experts: int
    top_k: int  # num_experts_per_tok
    expert_intermediate_size: int
    renormalize: bool  # rescale the k routing weights to sum to 1 (mixtral; norm_topk_prob)
    shared_expert_intermediate_size: int = 0  # qwen2_moe: an always-on expert with a sigmoid gate
    sparse_layers: tuple[int, ...] = ()  # layers whose MLP is the MoE; the others are dense


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: bias on q, k, v projections
    qk_norm: bool = False  # qwen3: RMSNorm on each head of q and k
    sliding_window: int | None = None  # mistral v0.1, qwen2 with use_sliding_window
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    moe: MoEConfig | None = None  # None: every layer has a dense MLP
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.sparse_layers


def _require(cfg: dict[str, Any], key: str, path: Path) -> Any:
    if key not in cfg:
        raise ModelLoadError(f"{path}: config field '{key}' is missing")
    return cfg[key]


def _rope_params(cfg: dict[str, Any], path: Path) -> tuple[float, dict[str, Any] | None]:
    """transformers 5 writes `rope_parameters`; older configs write rope_theta + rope_scaling."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or None
    if params:
        scaling = params
    if scaling is None:
        return theta, None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{path}: rope_scaling.rope_type '{rope_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    scaling["rope_type"] = rope_type
    for key in _ROPE_REQUIRED.get(rope_type, ()):
        if scaling.get(key) is None:
            raise ModelLoadError(f"{path}: rope_scaling.{key} is required for rope_type '{rope_type}'")
    if rope_type in ("llama3", "yarn"):
        # As transformers: a top-level original_max_position_embeddings wins, else max_position_embeddings.
        if cfg.get("original_max_position_embeddings"):
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        elif not scaling.get("original_max_position_embeddings"):
            scaling["original_max_position_embeddings"] = cfg.get("max_position_embeddings", 2048)
    return theta, (None if rope_type == "default" else scaling)


def _eos_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _sliding_window(cfg: dict[str, Any], family: str, path: Path) -> int | None:
    """The window every layer uses, or None. Our layers share one window (the engine's batch mask)."""
    window = cfg.get("sliding_window")
    if family == "llama" or not window:
        return None  # transformers' llama has no sliding window
    if family in ("mistral", "mixtral"):
        return int(window)
    # qwen families: only with use_sliding_window; qwen3_moe then windows every layer.
    if not cfg.get("use_sliding_window"):
        return None
    if family == "qwen3_moe":
        return int(window)
    num_layers = int(_require(cfg, "num_hidden_layers", path))
    max_window_layers = cfg.get("max_window_layers", 28)
    if family == "qwen2_moe":  # transformers' qwen2_moe: every other layer below max_window_layers
        default = [(i + 1) % 2 == 1 and i < max_window_layers for i in range(num_layers)]
    else:  # qwen2 / qwen3: layers >= max_window_layers
        default = [i >= max_window_layers for i in range(num_layers)]
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if sliding else "full_attention" for sliding in default
    ]
    if all(t == "full_attention" for t in layer_types):
        return None
    if all(t == "sliding_attention" for t in layer_types):
        return int(window)
    raise ModelLoadError(
        f"{path}: use_sliding_window with a window on only some layers (max_window_layers / layer_types) "
        "is not supported"
    )


def _positive_int(cfg: dict[str, Any], key: str, path: Path, minimum: int = 1) -> int:
    value = _require(cfg, key, path)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelLoadError(f"{path}: config field '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _moe_config(cfg: dict[str, Any], family: str, path: Path) -> MoEConfig:
    """The routing fields of mixtral / qwen2_moe / qwen3_moe, as transformers reads them.

    Counts and sizes must be present: a missing num_experts_per_tok must not become some default
    (or a dense model). Optional switches take transformers' defaults.
    """
    experts_key = "num_local_experts" if family == "mixtral" else "num_experts"
    if experts_key not in cfg:  # transformers maps num_experts <-> num_local_experts for some families
        experts_key = "num_experts" if experts_key == "num_local_experts" else "num_local_experts"
        if experts_key not in cfg:
            raise ModelLoadError(f"{path}: config field 'num_experts' (or 'num_local_experts') is missing")
    num_experts = _positive_int(cfg, experts_key, path)
    top_k = _positive_int(cfg, "num_experts_per_tok", path)
    if top_k > num_experts:
        raise ModelLoadError(
            f"{path}: num_experts_per_tok ({top_k}) is larger than {experts_key} ({num_experts})"
        )
    num_layers = int(_require(cfg, "num_hidden_layers", path))
    if family == "mixtral":  # every layer sparse; experts use intermediate_size; always renormalised
        return MoEConfig(
            num_experts, top_k, int(_require(cfg, "intermediate_size", path)), True,
            sparse_layers=tuple(range(num_layers)),
        )  # fmt: skip
    step = _positive_int(cfg, "decoder_sparse_step", path) if "decoder_sparse_step" in cfg else 1
    dense_only = cfg.get("mlp_only_layers") or []
    if not isinstance(dense_only, list) or not all(isinstance(i, int) for i in dense_only):
        raise ModelLoadError(f"{path}: config field 'mlp_only_layers' must be a list of layer indices")
    shared = 0
    if family == "qwen2_moe":
        shared = _positive_int(cfg, "shared_expert_intermediate_size", path)
    return MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_intermediate_size=_positive_int(cfg, "moe_intermediate_size", path),
        renormalize=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=shared,
        sparse_layers=tuple(i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0),
    )


def _decoder_config(cfg: dict[str, Any], path: Path) -> ModelConfig:
    """The llama-style decoder families, dense or with MoE MLPs."""
    family = cfg["model_type"]
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelLoadError(f"{path}: hidden_act '{act}' is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise ModelLoadError(f"{path}: mlp_bias=true is not supported")
    hidden = int(_require(cfg, "hidden_size", path))
    heads = int(_require(cfg, "num_attention_heads", path))
    theta, scaling = _rope_params(cfg, path)
    window = _sliding_window(cfg, family, path)
    return ModelConfig(
        family=family,
        vocab_size=int(_require(cfg, "vocab_size", path)),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", path)),
        num_layers=int(_require(cfg, "num_hidden_layers", path)),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=_attention_bias(cfg, family),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_window=window,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        moe=_moe_config(cfg, family, path) if family in MOE_FAMILIES else None,
        raw=cfg,
    )


def _attention_bias(cfg: dict[str, Any], family: str) -> bool:
    if family == "qwen2":  # transformers' qwen2 always has q/k/v biases, whatever attention_bias says
        return True
    if family == "qwen2_moe":
        return bool(cfg.get("qkv_bias", True))
    return bool(cfg.get("attention_bias", False))


# model_type -> parser of its config.json. Families with modules of their own add an entry here.
CONFIG_PARSERS: dict[str, Callable[[dict[str, Any], Path], Any]] = {
    family: _decoder_config for family in DENSE_FAMILIES + MOE_FAMILIES
}


def _deepseek_config(cfg: dict[str, Any], path: Path) -> ModelConfig:
    from llmaas.models.deepseek_config import deepseek_config_from_dict  # it builds on this module

    return deepseek_config_from_dict(cfg, path)


CONFIG_PARSERS.update(deepseek_v2=_deepseek_config, deepseek_v3=_deepseek_config)


def _hybrid_config(cfg: dict[str, Any], path: Path) -> ModelConfig:
    from llmaas.models.hybrid_config import hybrid_config_from_dict  # it builds on this module

    return hybrid_config_from_dict(cfg, path)


CONFIG_PARSERS.update(qwen3_5_text=_hybrid_config, qwen3_next=_hybrid_config)


def config_from_dict(cfg: dict[str, Any], path: Path = Path("config.json")) -> ModelConfig:
    family = cfg.get("model_type")
    parse = CONFIG_PARSERS.get(family)
    if family in EMBEDDING_FAMILIES:
        raise ModelLoadError(
            f"{path}: model_type '{family}' is an embedding encoder: it serves /v1/embeddings "
            "(llmaas.engine.embedding_engine), not text generation"
        )
    if parse is None:
        raise ModelLoadError(
            f"{path}: model_type '{family}' is not supported (supported: {', '.join(CONFIG_PARSERS)})"
        )
    return parse(cfg, path)


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """The directory's config.json as a dict (ModelLoadError when missing or not a JSON object)."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path} not found: not an HF-format model directory") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return cfg


def load_config(model_dir: str | Path) -> ModelConfig:
    return config_from_dict(read_config_json(model_dir), Path(model_dir) / "config.json")
