"""Torch-facing wrappers of the native CPU kernels (cpu_kernels.cpp, decode_matmul.cpp).

Each `*_fits` check says whether a call can take the native path: CPU tensors in fp32 or bf16, laid
out as the kernel expects, and the library built. Otherwise the caller uses its torch code, which
gives the same results up to rounding. The small ops (norm, activation, rotary) take steps of any
size, so that a token's numbers never depend on how many others share its step
(docs/batch_invariance.md); they run on one thread up to MAX_TOKENS rows and on torch's OpenMP threads
above; decode attention and the matmuls on torch's OpenMP threads; the output head's GEMV on threads
of its own. `ENABLED = False` turns the native path off in this process (tests compare both).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llmaas.kernels.build import load_cpu_kernels

ENABLED = True
MAX_TOKENS = 64  # per step; more tokens are a prefill: milliseconds-long calls that release the GIL
# Decode attention reads keys and values in place from the paged cache, (sequence, kv head) pairs split
# over the threads; bf16 caches use vdpbf16ps where the CPU has it. Against gather + torch's batched
# matmuls (SmolLM2 shapes, bf16, two threads): 325 vs 4,684 µs for 16 sequences of 1,100 keys, 308 vs
# 3,232 for 64 of 200 (docs/performance.md), so it takes every decode batch.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_p, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "llmaas_rms_norm": [_int, _p, _i64, _p, _p, _i64, _i64, _i64, _f32, _i64],
    "llmaas_silu_mul": [_int, _p, _i64, _p, _i64, _i64, _i64, _i64],
    "llmaas_rope_write_kv": [_int, _p, _p, _p, _i64, _p, _p, _i64, _i64, _i64, _i64, _p, _p, _p, _i64, _i64],
    "llmaas_int8_group_gemv": [_int, _p, _i64, _i64, _i64, _p, _p, _i64, _p, _i64, _i64],
    "llmaas_int4_matmul": [_p, _i64, _i64, _i64, _p, _i64, _p, _i64, _i64],
    "llmaas_bf16_matmul": [_p, _i64, _i64, _i64, _p, _i64, _p, _i64, _i64],
    "llmaas_int8_matmul": [_p, _i64, _i64, _i64, _p, _i64, _p, _i64, _i64],
    "llmaas_decode_matmul_available": [],
    "llmaas_paged_decode_attention": [
        _int,
        _p,
        _i64,
        _p,
        _p,
        _i64,
        _p,
        _i64,
        _p,
        _i64,
        _i64,
        _i64,
        _i64,
        _i64,
        _i64,
        _f32,
        _p,
        _i64,
    ],
}
_RESULTS = {  # 0: a shape not compiled in, or no AVX-512 BF16 on this CPU
    "llmaas_paged_decode_attention": ctypes.c_int,
    "llmaas_int4_matmul": ctypes.c_int,
    "llmaas_bf16_matmul": ctypes.c_int,
    "llmaas_int8_matmul": ctypes.c_int,
    "llmaas_decode_matmul_available": ctypes.c_int,
}
ATTENTION_HEAD_DIMS = (64, 128)  # compiled head sizes, with up to MAX_HEAD_GROUP query heads per kv head
MAX_HEAD_GROUP = 8


@functools.cache
def _libraries() -> tuple[ctypes.PyDLL, ctypes.CDLL] | None:
    """The kernels twice: as PyDLL (keeps the GIL: microsecond calls) and as CDLL (releases it)."""
    holding = load_cpu_kernels()
    if holding is None:
        return None
    releasing = ctypes.CDLL(holding._name)
    for lib in (holding, releasing):
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, _RESULTS.get(name)
    return holding, releasing


def _library() -> ctypes.PyDLL:
    return _libraries()[0]


def _releasing_gil() -> ctypes.CDLL:
    """For milliseconds-long calls (the output head): the server's event loop runs meanwhile."""
    return _libraries()[1]


def available() -> bool:
    return ENABLED and _libraries() is not None


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Autograd would track these (training, distillation): the kernels have no backward pass."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fits(x: torch.Tensor) -> bool:
    """x: [tokens, features] with unit stride along features, on the CPU, fp32 or bf16; any tokens;
    outside autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype in _DTYPE_CODES
        and x.dim() == 2
        and x.stride(1) == 1
        and not needs_grad(x)
        and available()
    )


def _for_rows(rows: int) -> ctypes.PyDLL | ctypes.CDLL:
    """The library to call for `rows` rows: a prefill's call takes milliseconds, so it lets the server's
    event loop run meanwhile; a decode step's takes microseconds and keeps the GIL."""
    return _library() if rows <= MAX_TOKENS else _releasing_gil()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (dim,), weight, eps) for x that `fits`; the weight is cast to x's dtype if needed."""
    weight = weight.to(x.dtype).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    rows, dim = x.shape
    _for_rows(rows).llmaas_rms_norm(
        _DTYPE_CODES[x.dtype],
        x.data_ptr(),
        x.stride(0),
        weight.data_ptr(),
        out.data_ptr(),
        dim,
        rows,
        dim,
        eps,
        torch.get_num_threads(),
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] that `fits`: [tokens, 2 * inter] -> [tokens, inter]."""
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype)
    _for_rows(rows).llmaas_silu_mul(
        _DTYPE_CODES[gate_up.dtype],
        gate_up.data_ptr(),
        gate_up.stride(0),
        out.data_ptr(),
        inter,
        rows,
        inter,
        torch.get_num_threads(),
    )
    return out


def rope_write_kv(
    qkv: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate q and k of a fused qkv projection in place and write k, v to their cache slots.

    qkv: [tokens, (q_heads + 2 kv_heads) * head_dim] that `fits`; cos, sin: [tokens, 1, head_dim] in
    qkv's dtype; caches: [kv_heads, blocks, block_size, head_dim]. Returns the q, k, v views.
    """
    tokens = qkv.shape[0]
    cos, sin = (t.contiguous() for t in cos_sin)
    slots = slots.contiguous()
    q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
    elem = qkv.element_size()
    base = qkv.data_ptr()
    _for_rows(tokens).llmaas_rope_write_kv(
        _DTYPE_CODES[qkv.dtype],
        base,
        base + q_size * elem,
        base + (q_size + kv_size) * elem,
        qkv.stride(0),
        cos.data_ptr(),
        sin.data_ptr(),
        tokens,
        q_heads,
        kv_heads,
        head_dim,
        slots.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[1] * k_cache.shape[2],
        torch.get_num_threads(),
    )
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return (
        q.view(tokens, q_heads, head_dim),
        k.view(tokens, kv_heads, head_dim),
        v.view(tokens, kv_heads, head_dim),
    )


def can_write_kv(qkv: torch.Tensor, cos: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Rotary over the whole head (cos as wide as a cached key) and caches in qkv's dtype."""
    return (
        fits(qkv)
        and cos.dtype == qkv.dtype
        and cos.shape[-1] == k_cache.shape[-1]
        and k_cache.dtype == qkv.dtype
        and k_cache.is_contiguous()
    )


def decode_fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """q: [batch, q_heads, head_dim], one query per sequence, heads contiguous, a compiled head shape."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[0]
    return (
        q.device.type == "cpu"
        and q.dtype in _DTYPE_CODES
        and k_cache.dtype == q.dtype
        and k_cache.is_contiguous()
        and head_dim in ATTENTION_HEAD_DIMS
        and q_heads % kv_heads == 0
        and q_heads // kv_heads <= MAX_HEAD_GROUP
        and q.stride(2) == 1
        and q.stride(1) == q.shape[2]
        and available()
    )


def prefill_fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """A prefill chunk's queries [L, q_heads, head_dim] through the decode kernel, one query a row: bf16
    caches on a CPU with AVX-512 BF16 only (there it beats torch's flash attention 1.4-2.7x; the generic
    fp32 loop would not)."""
    return q.dtype == torch.bfloat16 and decode_matmul_available() and decode_fits(q, k_cache)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per sequence over its keys, read in place from the paged caches.

    q: [batch, q_heads, head_dim] that `decode_fits`; block_tables: [batch, width] int64, unit stride
    along width (rows may share memory: an expanded single table);
    seq_lens: [batch] int64, keys each query sees. Returns [batch, q_heads, head_dim].
    """
    batch, q_heads, head_dim = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    lens = seq_lens.contiguous()
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype)
    done = _for_rows(batch).llmaas_paged_decode_attention(
        _DTYPE_CODES[q.dtype],
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.shape[1] * block_size,
        tables.data_ptr(),
        tables.stride(0),  # 0: every query reads the same table (a prefill's chunk)
        lens.data_ptr(),
        batch,
        q_heads,
        kv_heads,
        head_dim,
        block_size,
        sliding_window or 0,
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if not done:
        raise ValueError(f"no native decode attention for {q_heads} query heads of {head_dim} on {kv_heads}")
    return out


INT8_GROUP = 32  # weights per fp32 scale along the input dimension (llama.cpp's Q8_0 block)
MAX_GEMV_ROWS = 4  # beyond a few rows oneDNN's GEMM on the dequantized weight wins


def gemv_fits(x: torch.Tensor) -> bool:
    return fits(x) and x.shape[0] <= MAX_GEMV_ROWS


def int8_group_gemv(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, threads: int
) -> torch.Tensor:
    """x [M, K] that `gemv_fits` @ (qweight int8 [N, K] * scales fp32 [N, K/32] per group).T -> [M, N]."""
    rows, k = x.shape
    n = qweight.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype)
    _releasing_gil().llmaas_int8_group_gemv(
        _DTYPE_CODES[x.dtype],
        x.data_ptr(),
        x.stride(0),
        rows,
        k,
        qweight.data_ptr(),
        scales.data_ptr(),
        n,
        out.data_ptr(),
        n,
        threads,
    )
    return out


# Matmuls for decode-sized steps (decode_matmul.cpp).
# int4: groups of 32 inputs, (q - 8) * scale + zero, as Int4Linear.
MATMUL_TILE = 16  # output columns per packed tile, in every layout of decode_matmul.cpp
INT4_GROUP = 32
# Rows up to which it beats our bf16 matmul on the dequantized weights (the bytes it saves outweigh the
# widening). SmolLM2's 30 layers, 2 threads, distinct weights: even with torch's int4 kernel at one
# row, 1.1-1.6x it at 2-16; 1.8x our bf16 at one row, 1.15x at 8, even at 16-24 (docs/performance.md).
MAX_INT4_MATMUL_ROWS = 16


@functools.cache
def _decode_matmul_built() -> bool:
    return bool(_library().llmaas_decode_matmul_available())


def decode_matmul_available() -> bool:
    """The native matmuls (and bf16 attention) can run here: kernels built, and the CPU has AVX-512 BF16.
    Asked per prefill chunk and layer: the library's answer is asked once."""
    return available() and _decode_matmul_built()


def pack_int4_for_matmul(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15, scale and zero [N, K/32] -> uint8 [N/16, K/32, 320] in the kernel's layout.

    Per tile of 16 output columns and group: 256 bytes of nibbles, the 16 scales, the 16 zeros (bf16).
    N must be a multiple of 16 and K of 32. See decode_matmul.cpp for the layout and the offset identity.
    """
    n, k = q.shape
    tiles, groups = n // MATMUL_TILE, k // INT4_GROUP
    # k within a group = 16 * half + 2 * chunk + parity; a byte holds half 0 (low) and half 1 (high)
    q6 = q.to(torch.uint8).reshape(tiles, MATMUL_TILE, groups, 2, 8, 2)
    nibbles = (q6[:, :, :, 0] | (q6[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4).reshape(tiles, groups, -1)

    def by_tile(t: torch.Tensor) -> torch.Tensor:  # [N, groups] -> bytes [tiles, groups, 32]
        t = t.to(torch.bfloat16).reshape(tiles, MATMUL_TILE, groups).permute(0, 2, 1).contiguous()
        return t.view(torch.uint8)

    return torch.cat([nibbles, by_tile(scale), by_tile(zero)], dim=-1).contiguous()


def int4_matmul_fits(x: torch.Tensor, max_rows: int | None = MAX_INT4_MATMUL_ROWS) -> bool:
    """max_rows None: any number of rows (batch-invariant mode: one kernel, so one order, at every size)."""
    return fits(x) and x.dtype == torch.bfloat16 and (max_rows is None or x.shape[0] <= max_rows)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, threads: int) -> torch.Tensor:
    """x [M, K] bf16 that `int4_matmul_fits` @ the packed int4 weight [N, K].T -> [M, N] bf16."""
    kernel = _for_rows(x.shape[0]).llmaas_int4_matmul
    return _packed_matmul(kernel, x, packed, packed.shape[0] * MATMUL_TILE, threads)


def _packed_matmul(kernel, x: torch.Tensor, packed: torch.Tensor, n: int, threads: int) -> torch.Tensor:
    rows, k = x.shape
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    if not kernel(x.data_ptr(), x.stride(0), rows, k, packed.data_ptr(), n, out.data_ptr(), n, threads):
        raise ValueError(f"no native matmul for a {n} x {k} weight")
    return out


# int8 in groups of 32 with an fp32 scale each (Int8GroupLinear: the output head under int4), for a
# few rows: it streams half the bytes of bf16 but multiplies twice (decode_matmul.cpp).
MAX_INT8_MATMUL_ROWS = 4


def pack_int8_for_matmul(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """qweight int8 [N, K], scales fp32 [N, K/32] -> uint8 [N/16, K/32, 576] in the kernel's layout:
    per tile of 16 columns and group, the (k, k+1) pairs of q + 128 in 16 chunks, then the 16 scales."""
    n, k = qweight.shape
    tiles, groups = n // MATMUL_TILE, k // INT8_GROUP
    biased = (qweight.to(torch.int16) + 128).to(torch.uint8).reshape(tiles, MATMUL_TILE, groups, 16, 2)
    pairs = biased.permute(0, 2, 3, 1, 4).reshape(tiles, groups, -1)
    by_tile = scales.float().reshape(tiles, MATMUL_TILE, groups).permute(0, 2, 1).contiguous()
    return torch.cat([pairs, by_tile.view(torch.uint8)], dim=-1).contiguous()


def int8_matmul_fits(x: torch.Tensor, max_rows: int | None = MAX_INT8_MATMUL_ROWS) -> bool:
    """max_rows None: any number of rows (batch-invariant mode)."""
    return fits(x) and x.dtype == torch.bfloat16 and (max_rows is None or x.shape[0] <= max_rows)


def int8_matmul(x: torch.Tensor, packed: torch.Tensor, threads: int) -> torch.Tensor:
    """x [M, K] bf16 that `int8_matmul_fits` @ the packed int8-group weight [N, K].T -> [M, N] bf16."""
    kernel = _for_rows(x.shape[0]).llmaas_int8_matmul
    return _packed_matmul(kernel, x, packed, packed.shape[0] * MATMUL_TILE, threads)


def pack_bf16_for_matmul(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> bf16 [N/16, K/2, 16, 2]: per tile of 16 columns, the (k, k+1) pairs of each."""
    n, k = weight.shape
    tiles = weight.detach().to(torch.bfloat16).reshape(n // MATMUL_TILE, MATMUL_TILE, k // 2, 2)
    return tiles.permute(0, 2, 1, 3).contiguous()


def unpack_bf16_for_matmul(packed: torch.Tensor) -> torch.Tensor:
    """The [N, K] weight back from pack_bf16_for_matmul (a copy)."""
    return packed.permute(0, 2, 1, 3).reshape(packed.shape[0] * MATMUL_TILE, -1)


def bf16_matmul_fits(x: torch.Tensor) -> bool:
    """x: [rows, K] bf16 on the CPU, unit stride along K; any number of rows (on prefills it is as fast
    as oneDNN's GEMM and 1.1-1.2x plain F.linear on SmolLM2's layers at 512 and 2,048 rows)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.dim() == 2
        and x.stride(1) == 1
        and available()
    )


def bf16_matmul(x: torch.Tensor, packed: torch.Tensor, threads: int) -> torch.Tensor:
    """x [M, K] bf16 that `bf16_matmul_fits` @ the packed weight [N, K].T -> [M, N] bf16."""
    kernel = _for_rows(x.shape[0]).llmaas_bf16_matmul
    return _packed_matmul(kernel, x, packed, packed.shape[0] * MATMUL_TILE, threads)
