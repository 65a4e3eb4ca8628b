"""Which dtype `auto` means on this machine.

bf16 halves the bytes a decode step reads, but it only pays where the hardware computes in bf16:
CUDA, and x86 CPUs with AVX512_BF16 or AMX. On an AVX2-only CPU torch's bf16 matmuls are emulated
and oneDNN cannot pre-pack bf16 weights, so a bf16 decode step measured several times slower than
fp32 (docs/performance.md). `auto` therefore picks bf16 only where it is native.
"""

from __future__ import annotations

import torch

from llmaas.cpu_info import cpu_flags  # empty off Linux: we then assume no native bf16

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)


def auto_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def resolve_dtype_name(name: str, device: torch.device | str = "cpu") -> str:
    """'auto' -> the name of the dtype it means on `device` ('bfloat16', 'float32', ...); others as given."""
    if name != "auto":
        return name
    return str(auto_dtype(torch.device(device))).removeprefix("torch.")
