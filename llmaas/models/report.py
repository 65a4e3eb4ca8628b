"""What a loaded model costs: total parameters, parameters active per token, KV-cache bytes per token.

Computed from the modules, not from config arithmetic, so every family reports the same way:
- total: every parameter once (tied embeddings count once);
- active: total minus what a token skips, which each module says through an optional
  `inactive_params_per_token()` method (MoE experts: the E - k experts not chosen). Embedding and
  output matrices count in full, as model cards count them;
- KV bytes: each attention layer's `cache_elements_per_token()` times the cache's element size
  (hybrids: the full-attention layers only);
- state bytes per sequence: what the linear-attention layers of a hybrid keep per sequence whatever
  its length (each layer's `state_bytes()`); 0 for the other families.

Take the report before quantization or weight packing, which turn parameters into buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelReport:
    total_params: int
    active_params_per_token: int
    kv_bytes_per_token: int
    kv_dtype: str
    state_bytes_per_sequence: int = 0

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def summary(self) -> str:
        total, active = _human(self.total_params), _human(self.active_params_per_token)
        state = self.state_bytes_per_sequence
        return (
            f"{total} parameters, {active} active per token, "
            f"{self.kv_bytes_per_token:,} KV-cache bytes per token ({self.kv_dtype})"
            + (f", {state:,} state bytes per sequence" if state else "")
        )


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def active_params_per_token(model: nn.Module) -> int:
    skipped = sum(
        m.inactive_params_per_token() for m in model.modules() if hasattr(m, "inactive_params_per_token")
    )
    return total_params(model) - skipped


def kv_bytes_per_token(model: nn.Module, kv_dtype: torch.dtype) -> int:
    elements = sum(layer.cache_elements_per_token() for layer in model.attention_layers())
    return elements * torch.empty(0, dtype=kv_dtype).element_size()


def state_bytes_per_sequence(model: nn.Module, dtype: torch.dtype) -> int:
    layers = model.linear_layers() if hasattr(model, "linear_layers") else []
    return sum(layer.state_bytes(dtype) for layer in layers)


def describe_model(model: nn.Module, kv_dtype: torch.dtype) -> ModelReport:
    return ModelReport(
        total_params=total_params(model),
        active_params_per_token=active_params_per_token(model),
        kv_bytes_per_token=kv_bytes_per_token(model, kv_dtype),
        kv_dtype=str(kv_dtype).removeprefix("torch."),
        state_bytes_per_sequence=state_bytes_per_sequence(model, kv_dtype),
    )
