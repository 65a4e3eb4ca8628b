"""Our dense model modules, run over whole sequences for training, and saved back to HF format.

The engine's forward works on a paged KV cache; training wants the plain thing: a [batch, time] block
of tokens with a causal mask. `sequence_hidden` walks the same modules (and so the same weights) the
engine serves, with `scaled_dot_product_attention` instead of paged attention. `save_hf_model` writes
the HF tensor names (q/k/v and gate/up split again) so transformers and our loader both read it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llmaas.models.dense import DenseDecoder
from llmaas.models.loader import load_model
from llmaas.models.rope import apply_rotary

# Files besides config.json and the weights that make a directory a complete model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def load_trainable(model_dir: str | Path, device: str | torch.device = "cpu") -> DenseDecoder:
    """Our module with fp32 master weights, gradients on (the loader hands out frozen eval modules)."""
    model = load_model(model_dir, dtype=torch.float32, device=device)
    model.requires_grad_(True)
    model.train()
    return model


def load_frozen(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> DenseDecoder:
    return load_model(model_dir, dtype=dtype, device=device)


def _causal_mask(t: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    if window is None or window >= t:
        return None  # plain causal: let SDPA pick its fast path
    pos = torch.arange(t, device=device)
    return (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)


def sequence_hidden(model: DenseDecoder, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] (each row starts at position 0) -> final hidden states [B, T, hidden]."""
    cfg = model.config
    b, t = input_ids.shape
    x = model.embed_tokens(input_ids)
    positions = torch.arange(t, device=input_ids.device)
    rope = model.rotary.lookup(positions, x.dtype)  # [T, 1, D], broadcasts over [B, T, H, D]
    mask = _causal_mask(t, cfg.sliding_window, input_ids.device)
    for layer in model.layers:
        attn = layer.self_attn
        qkv = attn.qkv_proj(layer.input_layernorm(x))
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = q.view(b, t, attn.num_heads, attn.head_dim)
        k = k.view(b, t, attn.num_kv_heads, attn.head_dim)
        v = v.view(b, t, attn.num_kv_heads, attn.head_dim)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary(q, k, rope)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if attn.num_kv_heads != attn.num_heads:
            rep = attn.num_heads // attn.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=attn.scale)
        x = x + attn.o_proj(o.transpose(1, 2).reshape(b, t, attn.q_size))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.norm(x)


def sequence_logits(model: DenseDecoder, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> logits [B, T, vocab]: position i predicts token i + 1."""
    return model.compute_logits(sequence_hidden(model, input_ids))


def hf_state_dict(model: DenseDecoder) -> dict[str, torch.Tensor]:
    """Our parameter names (fused qkv, gate_up) -> HF's names and separate tensors."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[name] = tensor
            continue
        if ".qkv_proj." in name:
            kind = name.rsplit(".", 1)[1]
            prefix = "model." + name.split(".self_attn.")[0] + ".self_attn."
            q, k, v = tensor.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=0)
            out.update(
                {f"{prefix}q_proj.{kind}": q, f"{prefix}k_proj.{kind}": k, f"{prefix}v_proj.{kind}": v}
            )
        elif ".gate_up_proj." in name:
            prefix = "model." + name.split(".mlp.")[0] + ".mlp."
            gate, up = tensor.chunk(2, dim=0)
            out.update({f"{prefix}gate_proj.weight": gate, f"{prefix}up_proj.weight": up})
        else:
            out["model." + name] = tensor
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_hf_model(
    model: DenseDecoder,
    out_dir: str | Path,
    source_dir: str | Path,
    config_updates: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json, model.safetensors and the tokenizer files of `source_dir` into `out_dir`.

    config.json is the source's with `config_updates` applied (layer count, MLP width, ...). Each file
    is written to a temporary name and renamed: a crash leaves the previous file or the new one.
    `dtype` defaults to the source config's dtype (bf16 for the default model).
    """
    out_dir, source_dir = Path(out_dir), Path(source_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    config.update(config_updates or {})
    if dtype is None:
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
        dtype = {v: k for k, v in DTYPE_NAMES.items()}.get(name, torch.float32)
    config["dtype"] = config["torch_dtype"] = DTYPE_NAMES[dtype]
    config.pop("quantization_config", None)
    tensors = {k: v.to("cpu", dtype).contiguous().clone() for k, v in hf_state_dict(model).items()}
    tmp = out_dir / f".model.safetensors.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / "model.safetensors")
    for name in TOKENIZER_FILES:
        src = source_dir / name
        if src.is_file() and src.resolve() != (out_dir / name).resolve():
            tmp_copy = out_dir / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(src, tmp_copy)
            os.replace(tmp_copy, out_dir / name)
    # config.json last: a directory with a config.json is taken as complete by the catalog.
    _atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir
