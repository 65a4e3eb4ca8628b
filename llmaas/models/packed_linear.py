"""Linear layers with weights pre-packed in oneDNN's blocked layout, for CPU inference.

Why: torch's plain CPU matmul re-reads the weight in its row-major layout every call; pre-packing
(what inductor's CPU "freezing" does) streams it about twice as fast for single-row decode and ~1.5x
at batch 32 on this machine (measured: 30 SmolLM2 layers, bf16, 21.7 -> 11.5 ms at m=1).
Results equal F.linear up to accumulation order. Falls back to nothing where oneDNN is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BATCH_HINT = 32  # oneDNN's packing hint; measured to matter little between 1 and 512


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN layout, or None when this build/device/dtype cannot use it."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)
        probe = torch.randn(2, weight.shape[1], dtype=weight.dtype)
        expected = F.linear(probe, weight)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return None
    tolerance = 1e-2 if weight.dtype == torch.bfloat16 else 1e-3
    if not torch.allclose(
        got.float(), expected.float(), rtol=tolerance, atol=tolerance * float(expected.abs().max())
    ):
        return None
    return packed


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("packed_weight", packed)
        self.bias = bias
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)


def replace_linears(model: nn.Module, make) -> int:
    """Swap each nn.Linear for make(linear) unless that returns None; returns how many were swapped."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                new = make(child)
                if new is not None:
                    setattr(module, name, new)
                    replaced += 1
    return replaced


def packed_or_none(linear: nn.Linear) -> PackedLinear | None:
    packed = pack_weight(linear.weight)
    if packed is None:
        return None
    return PackedLinear(packed, linear.bias, linear.in_features, linear.out_features)


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear whose weight packs; returns how many were replaced."""
    return replace_linears(model, packed_or_none)
