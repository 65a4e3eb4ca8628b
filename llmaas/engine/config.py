"""EngineConfig: what an engine is built with. Importing it does not import torch (the CLI builds its
flags from these defaults before any subcommand decides whether it needs torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmaas.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
}


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto: bf16 where the hardware computes in bf16 (CUDA, AVX512_BF16/AMX), else fp32
    device: str | None = None  # None: cuda when present, else cpu
    kv_cache_memory: int = 512 * 2**20  # bytes for the paged KV cache, allocated once at start
    block_size: int = 16
    max_num_seqs: int = 64  # cap on running sequences
    max_num_batched_tokens: int = 1024  # per-step token budget shared by prefill chunks and decodes
    max_model_len: int | None = None  # default: the model's context window
    enable_prefix_caching: bool = True
    seed: int = 0
    quantization: str | None = None  # "int8" / "int4": weight-only, for small-batch decode (quantize.py)
    pack_weights: bool = True  # CPU: weights in oneDNN's blocked layout (about 2x faster decode)
    # int4 too: a request's logits independent of what shares its steps (bf16 is by default);
    # slower int4 prefills. Refused where it cannot be kept (batch_invariance.py)
    batch_invariant: bool = False

    def torch_dtype(self) -> torch.dtype:
        import torch

        from llmaas.engine.dtype_choice import auto_dtype

        if self.dtype == "auto":
            return auto_dtype(self.torch_device())
        if self.dtype not in DTYPE_NAMES:
            choices = sorted([*DTYPE_NAMES, "auto"])
            raise InvalidRequestError(f"dtype '{self.dtype}' is not one of {choices}", param="dtype")
        return getattr(torch, DTYPE_NAMES[self.dtype])

    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
