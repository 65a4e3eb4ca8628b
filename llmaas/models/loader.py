"""HF-format directory (config.json + *.safetensors) -> our torch module, weights in place.

HF keeps q/k/v and gate/up as separate tensors; our modules fuse them, so the loader concatenates.
MoE experts are stacked ([E, 2*I, H] gate+up, [E, H, I] down): transformers 5 keeps them fused in
memory but `save_pretrained` writes per-expert keys for mixtral (w1/w3/w2) and the qwen MoE families
(gate_proj/up_proj/down_proj); both forms load. A family whose tensors need more than renaming first
goes through its entry in CHECKPOINT_ADAPTERS (DeepSeek: see `deepseek.adapt_checkpoint`); routers
that a model lists in `fp32_parameter_suffixes` stay fp32 whatever the dtype. Unknown or missing
tensors are an error: a checkpoint that does not match its config must not load.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from llmaas.errors import ModelLoadError
from llmaas.models.config import DENSE_FAMILIES, MOE_FAMILIES, ModelConfig, load_config
from llmaas.models.deepseek import DeepseekDecoder, adapt_checkpoint
from llmaas.models.deepseek_config import DEEPSEEK_FAMILIES
from llmaas.models.dense import DenseDecoder
from llmaas.models.hybrid import HybridDecoder
from llmaas.models.hybrid import adapt_checkpoint as adapt_hybrid_checkpoint
from llmaas.models.hybrid_config import HYBRID_FAMILIES

# model_type -> the module class built from its ModelConfig.
MODEL_CLASSES: dict[str, type[torch.nn.Module]] = {f: DenseDecoder for f in DENSE_FAMILIES + MOE_FAMILIES}
MODEL_CLASSES.update({f: DeepseekDecoder for f in DEEPSEEK_FAMILIES})
MODEL_CLASSES.update({f: HybridDecoder for f in HYBRID_FAMILIES})
# model_type -> a rewrite of the checkpoint's tensors (names, layouts) before the generic mapping.
CHECKPOINT_ADAPTERS = {f: adapt_checkpoint for f in DEEPSEEK_FAMILIES}
CHECKPOINT_ADAPTERS.update({f: adapt_hybrid_checkpoint for f in HYBRID_FAMILIES})

_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "mlp.shared_expert.gate_proj": ("mlp.shared_expert.gate_up_proj", 0),
    "mlp.shared_expert.up_proj": ("mlp.shared_expert.gate_up_proj", 1),
}
_FUSED_SIZES = {"qkv_proj": 3, "gate_up_proj": 2}
# One expert's projection -> (our stacked tensor, part within the expert's slice).
_EXPERT_PARTS = {
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
    "w1": ("gate_up", 0),  # mixtral's names
    "w3": ("gate_up", 1),
    "w2": ("down", 0),
}
_EXPERT_PARTS_PER_TENSOR = {"gate_up": 2, "down": 1}
_STACKED_EXPERTS = {"gate_up_proj": "gate_up", "down_proj": "down"}  # already fused, [E, ...]
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")
_STACKED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights found")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own types for corrupt headers
            raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors


def _our_name(hf_name: str) -> tuple[str, int | tuple[int, int] | None]:
    """HF tensor name -> (our parameter name, where the tensor goes in it).

    The place is None for a whole tensor, the index of the part in a fused projection, or
    (expert, part) for one expert's slice of a stacked expert tensor.
    """
    hf_name = hf_name.replace(".block_sparse_moe.", ".mlp.")  # mixtral's name for the MoE block
    m = _EXPERT.match(hf_name)
    if m:
        layer, expert, proj = m.groups()
        if proj in _EXPERT_PARTS:
            stacked, part = _EXPERT_PARTS[proj]
            return f"layers.{layer}.mlp.experts.{stacked}", (int(expert), part)
    m = _STACKED.match(hf_name)
    if m:
        layer, proj = m.groups()
        return f"layers.{layer}.mlp.experts.{_STACKED_EXPERTS[proj]}", None
    m = _LAYER.match(hf_name)
    if m:
        layer, module, kind = m.groups()
        if module in _FUSED:
            fused, part = _FUSED[module]
            return f"layers.{layer}.{fused}.{kind}", part
        return f"layers.{layer}.{module}.{kind}", None
    if hf_name.startswith("model."):
        return hf_name[len("model.") :], None
    return hf_name, None


def _stack_experts(name: str, pieces: dict, num_experts: int, origin: Path) -> torch.Tensor:
    """{(expert, part): [rows, cols]} -> [E, parts * rows, cols], every expert and part present."""
    per_expert = _EXPERT_PARTS_PER_TENSOR[name.rsplit(".", 1)[1]]
    missing = [(e, p) for e in range(num_experts) for p in range(per_expert) if (e, p) not in pieces]
    extra = [key for key in pieces if key[0] >= num_experts]
    if missing or extra:
        raise ModelLoadError(
            f"{origin}: expert tensors for {name} do not match {num_experts} experts "
            f"(missing expert/part: {missing[:5]}, beyond the config: {extra[:5]})"
        )
    experts = [torch.cat([pieces[(e, p)] for p in range(per_expert)]) for e in range(num_experts)]
    return torch.stack(experts)


def build_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor], origin: Path) -> dict:
    parts: dict[str, dict] = {}
    state: dict[str, torch.Tensor] = {}
    for hf_name, tensor in tensors.items():
        if _IGNORED.match(hf_name):
            continue
        name, part = _our_name(hf_name)
        if part is None:
            state[name] = tensor
        else:
            parts.setdefault(name, {})[part] = tensor
    for name, pieces in parts.items():
        if ".experts." in name:
            num_experts = cfg.moe.num_experts if cfg.moe is not None else 0
            state[name] = _stack_experts(name, pieces, num_experts, origin)
            continue
        expected = _FUSED_SIZES[name.split(".")[-2]]
        if len(pieces) != expected:
            raise ModelLoadError(f"{origin}: incomplete projection tensors for {name}")
        state[name] = torch.cat([pieces[i] for i in range(expected)], dim=0)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_model(
    model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    tensors = read_safetensors(model_dir)
    if cfg.family in CHECKPOINT_ADAPTERS:
        tensors = CHECKPOINT_ADAPTERS[cfg.family](cfg, tensors, model_dir)
    state = build_state_dict(cfg, tensors, model_dir)
    with torch.device("meta"):
        model = MODEL_CLASSES[cfg.family](cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelLoadError(
            f"{model_dir}: weights do not match a {cfg.family} model of this config "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})"
        )
    for name, tensor in state.items():
        want = model.get_parameter(name).shape
        if tuple(tensor.shape) != tuple(want):
            raise ModelLoadError(
                f"{model_dir}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(want)}"
            )
    fp32 = getattr(model, "fp32_parameter_suffixes", ())  # e.g. MoE routers: selection is discontinuous
    state = {
        k: v.to(device=device, dtype=torch.float32 if k.endswith(fp32) else dtype) for k, v in state.items()
    }
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.to(device)
    model.eval().requires_grad_(False)
    return model
