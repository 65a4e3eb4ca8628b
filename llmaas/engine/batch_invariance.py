"""Whether this engine can promise batch invariance: a request's logits bit-identical whatever else
shares its steps (docs/batch_invariance.md).

Our CPU kernels reduce each row in an order fixed by its width alone, at every step size: the bf16
matmul, norms, activation, rotary, paged attention (prefill chunks through the decode kernel, one
query a row); with `batch_invariant`, the int4 and int8-group kernels too, instead of switching to a
dequantized bf16 matmul on larger steps. The promise needs those kernels on every layer: a CPU with
AVX-512 BF16, bf16 activations, and dense decoder layers. torch's own kernels (oneDNN on the CPU,
cuBLAS and flash attention on CUDA) pick their blocking by shape, so elsewhere it is refused rather
than half kept.
"""

from __future__ import annotations

import torch

from llmaas.kernels import cpu_ops


def refusal_before_load(device: torch.device, dtype: torch.dtype, quantization: str | None) -> str | None:
    """Why batch invariance cannot be promised for these settings, or None."""
    if device.type != "cpu":
        return f"batch_invariant needs our CPU kernels; on {device.type} torch's choose their order by shape"
    if dtype != torch.bfloat16:
        return f"batch_invariant needs dtype bfloat16 (got {str(dtype).removeprefix('torch.')})"
    if quantization not in (None, "int4"):
        return f"batch_invariant supports bf16 and int4 weights, not {quantization}"
    if not cpu_ops.decode_matmul_available():
        return "batch_invariant needs the native kernels on a CPU with AVX-512 BF16 (and a C++ compiler)"
    return None


def refusal_for_model(model: torch.nn.Module) -> str | None:
    """Why this model, as loaded, quantized and packed, cannot keep the promise, or None: MoE routing and
    latent attention are not covered, and every linear layer must run on our kernels."""
    from llmaas.models.dense import MLP, DecoderLayer, DenseDecoder
    from llmaas.models.packed_linear import CpuLayoutLinear
    from llmaas.models.quantize import Int4Linear, Int8GroupLinear

    layers = getattr(model, "layers", [])
    dense = type(model) is DenseDecoder and all(
        type(layer) is DecoderLayer and isinstance(layer.mlp, MLP) for layer in layers
    )
    if not dense:
        return "batch_invariant covers dense decoders (llama, mistral, qwen2, qwen3) only"
    cfg = model.config
    group = cfg.num_heads // cfg.num_kv_heads
    if cfg.head_dim not in cpu_ops.ATTENTION_HEAD_DIMS or group > cpu_ops.MAX_HEAD_GROUP:
        return f"batch_invariant: no attention kernel here for heads of {cfg.head_dim} in groups of {group}"
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear):
            native = module.native_int4 is not None
        elif isinstance(module, Int8GroupLinear):
            native = module.native_int8 is not None
        elif isinstance(module, CpuLayoutLinear):
            native = module.native.numel() > 0
        else:
            native = not isinstance(module, torch.nn.Linear)
        if not native:
            return (
                f"batch_invariant: layer {name} does not run on our kernels (its shape, or pack_weights off)"
            )
    return None
