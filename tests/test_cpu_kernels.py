"""Native CPU kernels (llmaas/kernels) against the torch code they replace, and their fallbacks.

fp32 results must match torch to rounding; bf16 ones to a bf16 step (the kernels keep fp32 inside and
round once, torch rounds after every op). The engine must give the same greedy tokens and nearly the
same logprobs with the kernels on and off.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from llmaas import LLM, SamplingParams
from llmaas.engine.llm_engine import EngineConfig
from llmaas.kernels import build, cpu_ops
from llmaas.models.attention import decode_attention, gather_blocks
from llmaas.models.rope import RotaryEmbedding, apply_rotary
from tests.model_factory import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler for the native kernels")

DTYPES = [torch.float32, torch.bfloat16]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 3e-2


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(1.0, float(want.float().abs().max()))
    assert (got.float() - want.float()).abs().max().item() <= tolerance(dtype) * scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch_on_strided_rows(dtype):
    torch.manual_seed(0)
    wide = torch.randn(7, 96, dtype=dtype)
    x = wide[:, 16:80]  # rows 96 apart, features contiguous
    weight = torch.randn(64, dtype=dtype)
    assert cpu_ops.fits(x)
    close(cpu_ops.rms_norm(x, weight, 1e-6), F.rms_norm(x, (64,), weight, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    torch.manual_seed(1)
    gate_up = torch.randn(5, 2 * 48, dtype=dtype) * 3
    gate, up = gate_up.split(48, dim=-1)
    close(cpu_ops.silu_mul(gate_up), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_rotates_in_place_and_fills_the_cache(dtype):
    torch.manual_seed(2)
    tokens, q_heads, kv_heads, dim, block_size, blocks = 5, 6, 2, 16, 4, 4
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * dim, dtype=dtype)
    rope = RotaryEmbedding(dim, 64, 10000.0, None).lookup(torch.tensor([3, 4, 9, 10, 30]), dtype)
    q, k, v = (t.clone() for t in qkv.split([q_heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
    want_q, want_k = apply_rotary(q.view(tokens, q_heads, dim), k.view(tokens, kv_heads, dim), rope)
    k_cache = torch.zeros(kv_heads, blocks, block_size, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 5, 6, 7, 12])
    got_q, got_k, got_v = cpu_ops.rope_write_kv(qkv, q_heads, kv_heads, dim, rope, slots, k_cache, v_cache)
    close(got_q, want_q, dtype)
    close(got_k, want_k, dtype)
    assert torch.equal(got_v, v.view(tokens, kv_heads, dim))
    cached_k = k_cache.view(kv_heads, -1, dim)[:, slots].transpose(0, 1)
    cached_v = v_cache.view(kv_heads, -1, dim)[:, slots].transpose(0, 1)
    assert torch.equal(cached_k, got_k) and torch.equal(cached_v, got_v)
    untouched = torch.ones(blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.view(kv_heads, -1, dim)[:, untouched].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("q_heads, kv_heads, dim", [(6, 2, 64), (4, 4, 128), (8, 1, 64)])
def test_paged_decode_attention_matches_gather_then_attend(dtype, window, q_heads, kv_heads, dim):
    torch.manual_seed(3)
    block_size = 4
    k_cache = torch.randn(kv_heads, 12, block_size, dim, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.tensor([[1, 4, 7, 0, 0, 0], [2, 3, 5, 8, 9, 10], [11, 0, 0, 0, 0, 0]])
    lens = torch.tensor([10, 23, 3])
    q = torch.randn(3, q_heads, dim, dtype=dtype)
    positions = torch.arange(tables.shape[1] * block_size)
    mask = positions[None] < lens[:, None]
    if window is not None:
        mask &= positions[None] > (lens - 1 - window)[:, None]
    gathered = gather_blocks(k_cache, tables), gather_blocks(v_cache, tables)
    want = decode_attention(q, *gathered, mask[:, None, None, :], dim**-0.5)
    assert cpu_ops.decode_fits(q, k_cache)
    got = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, window, dim**-0.5)
    close(got, want, dtype)


def test_fits_refuses_what_the_kernels_do_not_handle():
    assert cpu_ops.fits(torch.randn(4 * cpu_ops.MAX_TOKENS, 8))  # a prefill too: rows split over threads
    assert not cpu_ops.fits(torch.randn(4, 8, requires_grad=True))  # training: no backward pass here
    assert not cpu_ops.fits(torch.randn(4, 8, dtype=torch.float16))
    assert not cpu_ops.fits(torch.randn(8, 4).t())  # features not contiguous
    assert not cpu_ops.fits(torch.randn(2, 3, 8))
    cache = torch.zeros(2, 4, 4, 64)
    assert cpu_ops.decode_fits(torch.randn(4, 6, 64), cache)
    odd_head = torch.randn(2, 6, 48)  # a head size the kernel is not compiled for
    assert not cpu_ops.decode_fits(odd_head, torch.zeros(2, 4, 4, 48))
    many = 200  # any decode batch: the kernel beats gather + torch's batched matmuls at every size
    assert cpu_ops.decode_fits(torch.randn(many, 6, 64), cache)
    assert not cpu_ops.decode_fits(torch.randn(4, 64, 6).transpose(1, 2), cache)


def generate(llm: LLM, prompts: list[list[int]], enabled: bool, monkeypatch) -> list:
    monkeypatch.setattr(cpu_ops, "ENABLED", enabled)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    return [o.outputs[0] for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_engine_gives_the_same_tokens_with_and_without_kernels(tmp_path, monkeypatch, family):
    overrides = {"sliding_window": 6} if family == "mistral" else {}
    # head_dim 64: a head size the native decode attention is compiled for
    model = make_tiny_checkpoint(family, tmp_path, hidden_size=128, head_dim=64, **overrides)
    llm = LLM(config=EngineConfig(model=str(model), dtype="float32", block_size=4, kv_cache_memory=2**20))
    prompts = [[5, 17, 33, 101, 7], [9, 250, 14, 3, 88, 61, 12, 40, 41], [77, 78], list(range(10, 40))]
    calls = []
    real = cpu_ops.paged_decode_attention
    monkeypatch.setattr(cpu_ops, "paged_decode_attention", lambda *a: calls.append(1) or real(*a))
    native = generate(llm, prompts, True, monkeypatch)
    assert calls, "the engine never took the native decode path"
    calls.clear()
    plain = generate(llm, prompts, False, monkeypatch)
    assert not calls
    for a, b in zip(native, plain):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.logprobs, b.logprobs):
            assert abs(la.logprob - lb.logprob) < 1e-4


def test_no_compiler_or_switched_off_falls_back_with_a_reason(monkeypatch, caplog):
    build.load_cpu_kernels.cache_clear()
    try:
        monkeypatch.setenv("LLMAAS_CPU_KERNELS", "0")
        assert build.load_cpu_kernels() is None
        build.load_cpu_kernels.cache_clear()
        monkeypatch.delenv("LLMAAS_CPU_KERNELS")
        monkeypatch.setenv("CXX", "no-such-compiler-here")
        with caplog.at_level(logging.WARNING, logger="llmaas.kernels"):
            assert build.load_cpu_kernels() is None
        assert "no C++ compiler" in caplog.text
    finally:
        build.load_cpu_kernels.cache_clear()


def test_a_failing_build_falls_back_and_says_why(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(build, "SOURCES", [broken])
    monkeypatch.setenv("LLMAAS_HOME", str(tmp_path / "home"))
    build.load_cpu_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="llmaas.kernels"):
            assert build.load_cpu_kernels() is None
        assert "building native CPU kernels failed" in caplog.text
    finally:
        build.load_cpu_kernels.cache_clear()


needs_decode_matmul = pytest.mark.skipif(
    not cpu_ops.decode_matmul_available(), reason="the native matmuls need a CPU with AVX-512 BF16"
)


@needs_decode_matmul
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, cpu_ops.MAX_INT4_MATMUL_ROWS])
@pytest.mark.parametrize("n", [48, 64])  # 48: two tiles and a lone one
def test_int4_matmul_matches_the_dequantized_weights(rows, n):
    from llmaas.models.quantize import dequantize_int4_groups, quantize_int4_groups

    torch.manual_seed(rows * n)
    k = 96  # three groups of 32
    weight = (torch.randn(n, k) * torch.rand(n, 1) * 2 + torch.randn(n, 1)).to(torch.bfloat16)
    q, scale, zero = quantize_int4_groups(weight)
    wide = torch.randn(rows, k + 16).to(torch.bfloat16)
    x = wide[:, 8 : 8 + k]  # rows with a stride wider than k
    got = cpu_ops.int4_matmul(x, cpu_ops.pack_int4_for_matmul(q, scale, zero), threads=2)
    want = x.float() @ dequantize_int4_groups(q, scale, zero).t()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # fp32 accumulation, one bf16 rounding at the end
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@needs_decode_matmul
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 64, 200])  # 200: a prefill, without the GIL
@pytest.mark.parametrize("n", [16, 80])  # one lone tile; two pairs and a lone one
def test_bf16_matmul_matches_torch(rows, n):
    torch.manual_seed(rows + n)
    k = 70
    weight = torch.randn(n, k).to(torch.bfloat16)
    x = torch.randn(rows, k + 6).to(torch.bfloat16)[:, 3 : 3 + k]
    got = cpu_ops.bf16_matmul(x, cpu_ops.pack_bf16_for_matmul(weight), threads=2)
    want = x.float() @ weight.float().t()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@needs_decode_matmul
def test_packed_linear_keeps_one_copy_and_matches_at_every_size(monkeypatch):
    from llmaas.models.packed_linear import PackedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16).requires_grad_(False)
    layer = PackedLinear(linear)
    assert (
        layer.native.numel() == linear.weight.numel() and not layer.packed.numel() and not layer.plain.numel()
    )
    for rows in (1, 4, 64, 65, 300):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        want = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
        torch.testing.assert_close(layer(x).float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    monkeypatch.setattr(cpu_ops, "ENABLED", False)  # kernels off after loading: the same result via torch
    torch.testing.assert_close(layer(x).float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_the_kernels_run_on_torchs_openmp_pool():
    """The library's libgomp is the one torch loaded, not a second thread pool beside it."""
    assert cpu_ops.available()
    with open("/proc/self/maps") as maps:
        gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, gomp


@pytest.mark.parametrize("q_heads, kv_heads, dim", [(9, 3, 64), (8, 1, 128)])
def test_paged_decode_attention_over_long_contexts(q_heads, kv_heads, dim):
    """Hundreds of keys over shuffled 16-slot blocks (the bf16 kernel works 16 keys at a time)."""
    torch.manual_seed(5)
    block_size, blocks = 16, 40
    k_cache = torch.randn(kv_heads, blocks, block_size, dim, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.stack([torch.randperm(blocks - 1)[:24] + 1 for _ in range(3)])
    lens = torch.tensor([383, 17, 250])
    q = torch.randn(3, q_heads, dim, dtype=torch.bfloat16)
    mask = torch.arange(tables.shape[1] * block_size)[None] < lens[:, None]
    gathered = gather_blocks(k_cache, tables), gather_blocks(v_cache, tables)
    want = decode_attention(q.float(), *(g.float() for g in gathered), mask[:, None, None, :], dim**-0.5)
    got = cpu_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, None, dim**-0.5)
    close(got, want, torch.bfloat16)


@needs_decode_matmul
@pytest.mark.parametrize("rows", [1, 2, 3, cpu_ops.MAX_INT8_MATMUL_ROWS])
def test_int8_matmul_matches_the_dequantized_weights(rows):
    from llmaas.models.quantize import Int8GroupLinear

    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 48, bias=False).to(torch.bfloat16).requires_grad_(False)
    linear.weight[0, :32] = 0.0  # a zero group: q = 0, u = 128
    layer = Int8GroupLinear(linear)
    assert layer.qweight.min() == -127 and layer.qweight.max() == 127  # both ends of the range
    x = torch.randn(rows, 100).to(torch.bfloat16)[:, 2:98]
    got = cpu_ops.int8_matmul(x, cpu_ops.pack_int8_for_matmul(layer.qweight, layer.group_scales), threads=2)
    want = x.float() @ layer.dequantized_weight().float().t()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@needs_decode_matmul
@pytest.mark.parametrize("window", [None, 7])
def test_native_prefill_matches_torch_attention(monkeypatch, window):
    """Prefill chunks (a fresh prompt, and a chunk after 21 cached tokens) through the decode kernel,
    one query a row, against torch's SDPA on the same cache."""
    from llmaas.models.attention import SequenceChunk, attend_cached, build_forward_batch, write_kv_cache

    torch.manual_seed(11)
    block_size, q_heads, kv_heads, dim = 4, 6, 2, 64
    k_cache = torch.zeros(kv_heads, 40, block_size, dim, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    prefix = torch.randn(2, kv_heads, 21, dim).to(torch.bfloat16)  # keys and values already cached
    cached_table = [9, 3, 17, 5, 30, 11, 2, 25, 7]
    for pos in range(21):
        slot = cached_table[pos // block_size] * block_size + pos % block_size
        k_cache.view(kv_heads, -1, dim)[:, slot] = prefix[0, :, pos]
        v_cache.view(kv_heads, -1, dim)[:, slot] = prefix[1, :, pos]
    chunks = [SequenceChunk(13, 0, [1, 4, 8, 12]), SequenceChunk(12, 21, cached_table)]
    batch = build_forward_batch(chunks, block_size, sliding_window=window)
    tokens = batch.num_tokens
    q = torch.randn(tokens, q_heads, dim).to(torch.bfloat16)
    k, v = (torch.randn(tokens, kv_heads, dim).to(torch.bfloat16) for _ in range(2))
    write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
    assert cpu_ops.prefill_fits(q[:13], k_cache)
    native = attend_cached(q, k, v, k_cache, v_cache, batch, dim**-0.5)
    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    torch_path = attend_cached(q, k, v, k_cache, v_cache, batch, dim**-0.5)
    close(native, torch_path, torch.bfloat16)
