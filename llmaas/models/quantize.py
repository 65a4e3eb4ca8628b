"""Weight-only quantization: int8 (per output channel, symmetric) and int4 (groups of 32, asymmetric).

Why: batch-1 decode on a CPU is bound by how fast weights stream from memory, and torch's bf16
single-row matmul streams at well under the memory's bandwidth. torch's int8 weight-pack kernel reads
half the bytes, its int4 kernel a quarter (plus a bf16 scale and zero per group of 32). Both are slow
for larger batches, so those use the same quantized weights dequantized to the compute dtype: one
model, the same numbers at every batch size up to rounding.

int4 is llama.cpp's Q4_1 scheme: each group of 32 input weights of one output row keeps its min `lo`
and max `hi`; scale = (hi - lo) / 15, q = round((w - lo) / scale) in 0..15, and torch's kernel
dequantizes (q - 8) * scale + zero with zero = lo + 8 * scale. Its limits, and what we do:
- the kernel runs on CPU only, and only fast with bf16 activations (fp32 is ~30x slower than a plain
  matmul): fp32 models and CUDA use the dequantized weights at every batch size;
- group sizes 32, 64, 128 or 256 dividing K: a layer whose in_features is not a multiple of 32 stays
  unquantized (in the model dtype; `pack_linears` packs it). Real models' widths are multiples of 64;
- out_features a multiple of 16: otherwise the layer is quantized but uses the dequantized weights.
MoE experts are quantized the same way (Experts.quantize_int4), all of one layer's experts or none.
The output head gets int8 in groups of 32 under int4 (see quantize_model).

On a CPU with AVX-512 BF16 our own kernels (llmaas/kernels/decode_matmul.cpp) take over: int4 up to
MAX_INT4_MATMUL_ROWS rows instead of torch's kernel (which is then not packed), the int8-group head up
to MAX_INT8_MATMUL_ROWS, and our bf16 matmul on the dequantized copy for larger steps. That switch
changes a token's numbers with the size of its step; with `batch_invariant` the int4 and int8 kernels
take every step size instead (docs/batch_invariance.md).
"""

from __future__ import annotations

import torch
from torch import nn

from llmaas.errors import InvalidRequestError
from llmaas.kernels import cpu_ops
from llmaas.models.packed_linear import CpuLayoutLinear, native_matmul_applies, replace_linears

SMALL_BATCH = 4  # rows at or below this use the int8 kernel
INT4_SMALL_BATCH = 4  # rows at or below this use the int4 kernel (measured: docs/performance.md)
INT4_GROUP_SIZE = 32
SUPPORTED = ("int8", "int4")


class _WeightOnlyLinear(CpuLayoutLinear):
    """What int8 and int4 share: a dequantized copy of the quantized weight for larger batches, kept in
    the fastest layout here (packed_linear.CpuLayoutLinear)."""

    def _keep_dequantized(self, dequantized: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._store_weight(dequantized, bias)

    def _dequantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x)


class Int8Linear(_WeightOnlyLinear):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        dtype = linear.weight.dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(dtype))
        self._keep_dequantized((qweight.float() * scales[:, None]).to(dtype), linear.bias)
        self.use_int8_kernel = qweight.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_int8_kernel and x.dim() == 2 and x.shape[0] <= SMALL_BATCH:
            return self._add_bias(torch._weight_int8pack_mm(x, self.qweight, self.scales.to(x.dtype)))
        return self._dequantized_linear(x)


def quantize_int4_groups(
    weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int32 [N, K] in 0..15, scale [N, K/g], zero [N, K/g]) in weight's dtype.

    Scale and zero are rounded to the weight's dtype first and q is taken against the rounded values,
    so that (q - 8) * scale + zero is within scale / 2 of w (up to that rounding at a group's edges).
    """
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    # a constant group gets the dtype's smallest normal scale: q = 8 and w = zero there
    scale = ((hi - lo) / 15.0).to(weight.dtype).clamp(min=torch.finfo(weight.dtype).tiny)
    zero = (lo + 8.0 * scale.float()).to(weight.dtype)
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8.0).clamp(0, 15)
    return q.to(torch.int32).reshape(n, k), scale, zero


def dequantize_int4_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - 8) * scale + zero per group, in float32, [N, K]."""
    n, k = q.shape
    groups = q.float().reshape(n, scale.shape[1], -1) - 8.0
    return (groups * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


def int4_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


class Int4Linear(_WeightOnlyLinear):
    """Weight-only int4 in groups of `group_size` input weights (Q4_1-like); see the module docstring."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE, batch_invariant: bool = False):
        super().__init__()
        n, k = linear.weight.shape
        self.native_max_rows = None if batch_invariant else cpu_ops.MAX_INT4_MATMUL_ROWS
        if k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
        dtype = linear.weight.dtype
        q, scale, zero = quantize_int4_groups(linear.weight, group_size)
        self.group_size = group_size
        self._keep_dequantized(dequantize_int4_groups(q, scale, zero).to(dtype), linear.bias)
        # Our kernel (CPU with AVX-512 BF16) up to MAX_INT4_MATMUL_ROWS rows; else torch's int4 kernel
        # up to INT4_SMALL_BATCH rows (CPU, bf16 activations: its fp32 path is ~30x slower than a plain
        # matmul; N a multiple of 16).
        native = native_matmul_applies(linear.weight) and group_size == cpu_ops.INT4_GROUP
        self.native_int4 = cpu_ops.pack_int4_for_matmul(q, scale, zero) if native else None
        self.use_int4_kernel = (
            not native
            and linear.weight.device.type == "cpu"
            and dtype == torch.bfloat16
            and n % 16 == 0
            and int4_kernel_available()
        )
        if self.use_int4_kernel:
            packed_q = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # two values a byte
            # [K/g, N, 2]: the kernel's layout of scale and zero
            scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()
        else:
            packed_q = scales_and_zeros = torch.empty(0)
        self.register_buffer("int4_weight", packed_q)
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    @classmethod
    def or_none(cls, linear: nn.Linear, batch_invariant: bool = False) -> Int4Linear | None:
        """Int4Linear(linear), or None (left unquantized) when in_features is not a multiple of 32."""
        if linear.in_features % INT4_GROUP_SIZE:
            return None
        return cls(linear, batch_invariant=batch_invariant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_int4 is not None and cpu_ops.int4_matmul_fits(x, self.native_max_rows):
            return self._add_bias(cpu_ops.int4_matmul(x, self.native_int4, torch.get_num_threads()))
        if (
            self.use_int4_kernel
            and x.dim() == 2
            and x.shape[0] <= INT4_SMALL_BATCH
            and x.dtype == torch.bfloat16
        ):
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.contiguous(), self.int4_weight, self.group_size, self.scales_and_zeros
            )
            return self._add_bias(out)
        return self._dequantized_linear(x)


class Int8GroupLinear(_WeightOnlyLinear):
    """Weight-only int8 in groups of 32 input weights, one fp32 scale each (llama.cpp's Q8_0).

    For a few rows on the CPU the native kernel reads the int8 weights directly (about half the bytes
    of bf16) on all torch threads; otherwise the dequantized weights. Used for the output head under
    int4: near-lossless where int4 is not, and for SmolLM2 exact, as its GGUF stores the head as Q8_0.
    """

    def __init__(self, linear: nn.Linear, batch_invariant: bool = False):
        super().__init__()
        n, k = linear.weight.shape
        self.native_max_rows = None if batch_invariant else cpu_ops.MAX_INT8_MATMUL_ROWS
        groups = linear.weight.detach().float().reshape(n, k // cpu_ops.INT8_GROUP, cpu_ops.INT8_GROUP)
        scales = (groups.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
        qweight = torch.round(groups / scales[..., None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("qweight", qweight.reshape(n, k).contiguous())
        self.register_buffer("group_scales", scales.contiguous())
        self.model_dtype = linear.weight.dtype
        self._keep_dequantized(self.dequantized_weight(), linear.bias)
        native = native_matmul_applies(linear.weight)
        self.native_int8 = cpu_ops.pack_int8_for_matmul(self.qweight, self.group_scales) if native else None

    def dequantized_weight(self) -> torch.Tensor:
        """[N, K] in the model dtype: qweight x its group's scale."""
        n, k = self.qweight.shape
        groups = self.qweight.float().reshape(n, k // cpu_ops.INT8_GROUP, cpu_ops.INT8_GROUP)
        return (groups * self.group_scales[..., None]).reshape(n, k).to(self.model_dtype)

    @classmethod
    def or_none(cls, linear: nn.Linear, batch_invariant: bool = False) -> Int8GroupLinear | None:
        return cls(linear, batch_invariant) if linear.in_features % cpu_ops.INT8_GROUP == 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_int8 is not None and cpu_ops.int8_matmul_fits(x, self.native_max_rows):
            return self._add_bias(cpu_ops.int8_matmul(x, self.native_int8, torch.get_num_threads()))
        if self.qweight.device.type == "cpu" and cpu_ops.gemv_fits(x):
            out = cpu_ops.int8_group_gemv(x, self.qweight, self.group_scales, torch.get_num_threads())
            return self._add_bias(out)
        return self._dequantized_linear(x)


def quantize_model(model: nn.Module, method: str, batch_invariant: bool = False) -> nn.Module:
    """Replace nn.Linear layers in place by quantized ones, and quantize MoE experts.

    batch_invariant (int4): our int4 and int8-group kernels at every step size, so that a token's
    numbers do not depend on what shares its step (slower prefills; docs/batch_invariance.md).

    int8: every nn.Linear. int4: every nn.Linear whose in_features is a multiple of 32, except the
    output head `lm_head`, which gets int8 in groups of 32 (Int8GroupLinear), as llama.cpp's 4-bit
    presets keep the head at 6-8 bits. On SmolLM2-135M an int4 head cost ~15 points of top-1 agreement,
    and torch's per-channel int8 kernel was slower than bf16 (docs/performance.md). MoE experts (weights
    kept outside nn.Linear) quantize
    themselves.
    """
    if method not in SUPPORTED:
        raise InvalidRequestError(f"quantization '{method}' is not one of {SUPPORTED}", param="quantization")
    if method == "int8":
        replace_linears(model, Int8Linear)
    else:
        head = getattr(model, "lm_head", None)

        def quantized(linear: nn.Linear) -> nn.Module | None:
            return (Int8GroupLinear if linear is head else Int4Linear).or_none(linear, batch_invariant)

        replace_linears(model, quantized)
    for module in model.modules():
        quantize_experts = getattr(module, f"quantize_{method}", None)
        if quantize_experts is not None:
            quantize_experts()
    return model
