"""Linear layers whose weight is kept once, in the layout that is fastest on this CPU.

Why: torch's plain CPU matmul re-reads the weight in its row-major layout every call. In order of
preference:
- bf16 on a CPU with AVX-512 BF16: packed for our matmul (`cpu_ops.bf16_matmul`, two inputs of 16
  columns per vector), at every batch size: on SmolLM2's layers 1.1-1.6x oneDNN's packed GEMM at 1-64
  rows, as fast on 512- and 2,048-token prefills, 1.1-2.5x torch's plain F.linear (docs/performance.md).
- otherwise oneDNN's blocked layout (what inductor's CPU "freezing" does): about twice as fast as the
  plain layout for single-row decode and ~1.5x at batch 32 (30 SmolLM2 layers, bf16, 21.7 -> 11.5 ms at m=1);
- otherwise the plain weight.
Results equal F.linear up to accumulation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmaas.kernels import cpu_ops

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


def native_matmul_applies(weight: torch.Tensor) -> bool:
    """Our matmuls take this weight: a bf16 CPU weight of whole 16-column tiles, on AVX-512 BF16."""
    n, k = weight.shape
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and n % cpu_ops.MATMUL_TILE == 0
        and k % 2 == 0
        and cpu_ops.decode_matmul_available()
    )


class CpuLayoutLinear(nn.Module):
    """x @ W.T + b with W stored once as `native` (our kernel's layout), `packed` (oneDNN) or `plain`;
    the two unused buffers are empty."""

    def _store_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        weight = weight.detach()
        empty = torch.empty(0, device=weight.device)
        native = cpu_ops.pack_bf16_for_matmul(weight) if native_matmul_applies(weight) else None
        packed = pack_weight(weight) if native is None else None
        self.register_buffer("native", native if native is not None else empty)
        self.register_buffer("packed", packed if packed is not None else empty)
        self.register_buffer("plain", weight if native is None and packed is None else empty)
        self.bias = bias

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.native.numel():
            if cpu_ops.bf16_matmul_fits(x):
                return self._add_bias(cpu_ops.bf16_matmul(x, self.native, torch.get_num_threads()))
            # kernels switched off since loading, or an odd input: unpack a copy (slow, but right)
            return F.linear(x, cpu_ops.unpack_bf16_for_matmul(self.native), self.bias)
        if self.packed.numel():
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.plain, self.bias)

    def _add_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out + self.bias if self.bias is not None else out


class PackedLinear(CpuLayoutLinear):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store_weight(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)


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
    """PackedLinear(linear) where a faster layout than the plain one applies, else None."""
    layer = PackedLinear(linear)
    return None if layer.plain.numel() else layer


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear whose weight packs; returns how many were replaced."""
    return replace_linears(model, packed_or_none)
