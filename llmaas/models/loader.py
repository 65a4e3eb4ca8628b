"""HF-format directory (config.json + *.safetensors) -> our torch module, weights in place.

HF keeps q/k/v and gate/up as separate tensors; our modules fuse them, so the loader concatenates.
Unknown or missing tensors are an error: a checkpoint that does not match its config must not load.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from llmaas.errors import ModelLoadError
from llmaas.models.config import ModelConfig, load_config
from llmaas.models.dense import DenseDecoder

_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


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


def _our_name(hf_name: str) -> tuple[str, int | None]:
    """HF tensor name -> (our parameter name, index of the part in a fused tensor or None)."""
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


def build_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor], origin: Path) -> dict:
    parts: dict[str, dict[int, torch.Tensor]] = {}
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
        expected = 3 if "qkv" in name else 2
        if len(pieces) != expected:
            raise ModelLoadError(f"{origin}: incomplete projection tensors for {name}")
        state[name] = torch.cat([pieces[i] for i in range(expected)], dim=0)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_model(
    model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> DenseDecoder:
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    state = build_state_dict(cfg, read_safetensors(model_dir), model_dir)
    with torch.device("meta"):
        model = DenseDecoder(cfg)
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
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.to(device)
    model.eval().requires_grad_(False)
    return model
