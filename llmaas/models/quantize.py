"""Weight-only int8 quantization (per output channel, symmetric).

Why: batch-1 decode on a CPU is bound by how fast weights stream from memory, and torch's bf16
single-row matmul streams at well under the memory's bandwidth. torch's int8 weight-pack kernel reads
half the bytes. It is slow for larger batches, so those use the same quantized weights dequantized to
the compute dtype: one model, the same numbers at every batch size up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmaas.errors import InvalidRequestError
from llmaas.models.packed_linear import pack_weight, packed_linear, replace_linears

SMALL_BATCH = 4  # rows at or below this use the int8 kernel
SUPPORTED = ("int8",)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        dtype = linear.weight.dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(dtype))
        dequantized = (qweight.float() * scales[:, None]).to(dtype)
        packed = pack_weight(dequantized)
        # Larger batches read one copy: the packed one where oneDNN takes it, else the plain one.
        self.register_buffer("packed", packed if packed is not None else torch.empty(0))
        self.register_buffer("dequantized", dequantized if packed is None else torch.empty(0))
        self.bias = linear.bias
        self.use_int8_kernel = qweight.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_int8_kernel and x.dim() == 2 and x.shape[0] <= SMALL_BATCH:
            out = torch._weight_int8pack_mm(x, self.qweight, self.scales.to(x.dtype))
            return out + self.bias if self.bias is not None else out
        if self.packed.numel():
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.dequantized, self.bias)


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Replace every nn.Linear (lm_head included) in place, and quantize MoE experts."""
    if method not in SUPPORTED:
        raise InvalidRequestError(f"quantization '{method}' is not one of {SUPPORTED}", param="quantization")
    replace_linears(model, Int8Linear)
    for module in model.modules():  # weights kept outside nn.Linear (MoE experts) quantize themselves
        if hasattr(module, "quantize_int8"):
            module.quantize_int8()
    return model
