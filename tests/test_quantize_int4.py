"""Weight-only int4 (groups of 32, asymmetric, like llama.cpp's Q4_1): the layer, the model, the engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmaas import SamplingParams
from llmaas.engine.llm_engine import EngineConfig
from llmaas.errors import InvalidRequestError
from llmaas.kernels import cpu_ops
from llmaas.llm import LLM
from llmaas.models.moe import SparseMoeBlock
from llmaas.models.quantize import (
    INT4_SMALL_BATCH,
    Int4Linear,
    Int8GroupLinear,
    dequantize_int4_groups,
    int4_kernel_available,
    quantize_int4_groups,
    quantize_model,
)
from tests.model_factory import make_tiny_checkpoint


def random_linear(k: int, n: int, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=True).to(dtype).requires_grad_(False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.5)
        lin.bias.normal_(0, 0.5)
    return lin


def float_reference(layer: Int4Linear, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x @ dequantized(W).T + b in float32, from a fresh quantization of the same weight."""
    w = dequantize_int4_groups(*quantize_int4_groups(lin.weight, layer.group_size))
    return x.float() @ w.t() + lin.bias.float()


@pytest.mark.parametrize("rows", [1, 8])  # 1: the int4 kernel; 8: the dequantized (packed) weights
def test_int4_linear_matches_dequantized_float_reference(rows):
    lin = random_linear(128, 96, torch.bfloat16)
    layer = Int4Linear(lin)
    if rows <= INT4_SMALL_BATCH and not layer.use_int4_kernel:
        pytest.skip("no int4 CPU kernel in this torch")
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
    expected = float_reference(layer, lin, x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    # bf16 output rounding and accumulation order: ~2^-8 of the output's scale
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_kernel_and_dequantized_paths_agree():
    """Whichever int4 kernel this machine uses (ours with AVX-512 BF16, else torch's) against the
    dequantized weights, at every row count the kernel takes."""
    layer = Int4Linear(random_linear(64, 48, torch.bfloat16))
    if layer.native_int4 is None and not layer.use_int4_kernel:
        pytest.skip("no int4 CPU kernel here")
    rows = cpu_ops.MAX_INT4_MATMUL_ROWS if layer.native_int4 is not None else INT4_SMALL_BATCH
    for m in range(1, rows + 1):
        x = torch.randn(m, 64).to(torch.bfloat16)
        with torch.no_grad():
            kernel = layer(x)
            dequantized = layer._dequantized_linear(x)
        torch.testing.assert_close(
            kernel.float(), dequantized.float(), rtol=1e-2, atol=2e-2 * kernel.abs().max().item()
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantization_error_per_group_within_half_a_step(dtype):
    torch.manual_seed(3)
    w = torch.randn(16, 256) * torch.rand(16, 1) * 3  # rows of different scales
    w[0, :32] = 0.25  # a constant group
    w[1, 32:64] += 40.0  # a group far from zero: its zero point is large
    w = w.to(dtype)
    q, scale, zero = quantize_int4_groups(w, 32)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    assert scale.shape == zero.shape == (16, 8) and scale.dtype == zero.dtype == dtype
    error = (dequantize_int4_groups(q, scale, zero) - w.float()).abs().reshape(16, 8, 32).amax(-1)
    # scale and zero are rounded to the dtype: bf16 may clamp a group's edge by that rounding
    slack = 1e-6 if dtype == torch.float32 else 2**-8 * (zero.float().abs() + 8 * scale.float())
    assert (error <= scale.float() / 2 + slack).all()
    assert error[0, 0] == 0  # a constant group comes back exactly


def test_widths_the_kernel_cannot_take():
    # in_features not a multiple of 32: left unquantized (nn.Linear, packed later like any other)
    model = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 24)).to(torch.bfloat16).requires_grad_(False)
    quantize_model(model, "int4")
    assert type(model[0]) is nn.Linear
    # out_features not a multiple of 16: quantized, but the dequantized weights at every batch size
    assert isinstance(model[1], Int4Linear) and not model[1].use_int4_kernel and model[1].native_int4 is None
    x = torch.randn(1, 40).to(torch.bfloat16)
    with torch.no_grad():
        assert model(x).shape == (1, 24)
    # fp32 activations: the kernel would be ~30x slower, so fp32 layers never use it
    fp32 = Int4Linear(random_linear(64, 64, torch.float32))
    assert not fp32.use_int4_kernel and fp32.native_int4 is None


def test_off_cpu_uses_the_dequantized_weights():
    """CUDA has no CPU int4 kernel; a non-CPU weight (meta here: no GPU needed) takes the plain path."""
    lin = nn.Linear(64, 64, device="meta", dtype=torch.bfloat16).requires_grad_(False)
    layer = Int4Linear(lin)
    assert not layer.use_int4_kernel and layer.native_int4 is None and layer.plain.device.type == "meta"
    assert layer(torch.empty(1, 64, device="meta", dtype=torch.bfloat16)).shape == (1, 64)


def test_unknown_method_is_an_invalid_request():
    with pytest.raises(InvalidRequestError) as info:
        quantize_model(nn.Linear(32, 32), "int3")
    assert info.value.param == "quantization"


def test_moe_experts_quantize_to_int4_when_widths_allow():
    block = SparseMoeBlock(64, num_experts=4, top_k=2, expert_intermediate_size=32, renormalize=True)
    small = SparseMoeBlock(8, num_experts=4, top_k=2, expert_intermediate_size=5, renormalize=True)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in [*block.parameters(), *small.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen))
    block, small = block.to(torch.bfloat16), small.to(torch.bfloat16)
    x = torch.randn(8, 64, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.arange(8) % 4, (torch.arange(8) + 1) % 4], dim=1)  # fixed routing
    weights = torch.rand(8, 2, generator=gen)
    with torch.no_grad():
        expected = block.experts(x, ids, weights).float()
        quantize_model(block, "int4")
        quantize_model(small, "int4")
        assert block.experts.gate_up is None and isinstance(block.experts.converted[0][0], Int4Linear)
        assert small.experts.converted is None  # widths 8 and 5: left unquantized
        many = block.experts(x, ids, weights).float()  # 8 tokens, 4 rows per expert: dequantized weights
        one = block.experts(x[:1], ids[:1], weights[:1]).float()  # 1 row per expert: the int4 kernel
    # the same quantized experts either way, up to bf16 rounding
    torch.testing.assert_close(one, many[:1], rtol=2e-2, atol=2e-2 * many.abs().max().item())
    # and near the original: int4 of N(0, 1) weights is ~9% noise per projection, two in a row
    assert (many - expected).norm() <= 0.25 * expected.norm()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("int4"))


def test_engine_int4_same_greedy_tokens_at_batch_1_and_8(tmp_path):
    """Batch 1 and a batch of 20 (more rows than the int4 kernel takes by default): with batch_invariant
    the int4 kernels take both, so the tokens and their logprobs are identical (the default switches to
    the dequantized weights there, whose rounding differs). Head size 64: the native attention."""
    model_dir = make_tiny_checkpoint("llama", tmp_path, head_dim=64)
    llm = LLM(
        config=EngineConfig(
            model=str(model_dir),
            dtype="bfloat16",
            quantization="int4",
            block_size=4,
            kv_cache_memory=2**22,
            batch_invariant=cpu_ops.decode_matmul_available(),
        )
    )
    layers = [m for m in llm.engine.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 2 * 4  # per layer qkv, o, gate_up, down; lm_head is int8 in groups
    assert type(llm.engine.model.lm_head) is Int8GroupLinear
    kernels = [layer.native_int4 is not None or layer.use_int4_kernel for layer in layers]
    assert all(kernels) or not (cpu_ops.decode_matmul_available() or int4_kernel_available())
    prompt = [5, 17, 33, 101, 7]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    alone = llm.generate([prompt], greedy)[0].outputs[0]
    others = [[9, 250, 14, 3], [77, 78], list(range(10, 40)), [1, 2, 3], [300, 7], [44] * 6, [8, 9]]
    others += [[i, i + 1, 2 * i] for i in range(60, 72)]  # 20 sequences: more rows than the int4 kernels take
    assert len(others) + 1 > cpu_ops.MAX_INT4_MATMUL_ROWS
    batched = llm.generate([prompt, *others], greedy)[0].outputs[0]
    assert len(alone.token_ids) == 12
    if not cpu_ops.decode_matmul_available():
        return  # without our kernels the two paths round differently: near ties may flip
    assert batched.token_ids == alone.token_ids
    assert [lp.logprob for lp in batched.logprobs] == [lp.logprob for lp in alone.logprobs]


def test_engine_rejects_unknown_quantization(model_dir):
    with pytest.raises(InvalidRequestError):
        LLM(config=EngineConfig(model=str(model_dir), quantization="int3", kv_cache_memory=2**20))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])  # 1 and 3: the native kernel (where built); 8: dequantized
def test_int8_group_linear_matches_its_dequantized_weights(dtype, rows):
    lin = random_linear(96, 1000, dtype, seed=3)  # 1000 rows: split over threads unevenly
    layer = Int8GroupLinear(lin)
    groups = lin.weight.float().reshape(1000, 3, 32)
    scales = groups.abs().amax(dim=-1) / 127
    # symmetric rounding: every weight within half a step of its group's scale (plus the model
    # dtype's own rounding of the dequantized value)
    err = (layer.dequantized_weight().float().reshape(1000, 3, 32) - groups).abs()
    dtype_rounding = groups.abs() * torch.finfo(dtype).eps
    assert (err <= scales[..., None] / 2 + dtype_rounding + 1e-6).all()
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        got = layer(x)
    expected = x.float() @ layer.dequantized_weight().float().t() + lin.bias.float()
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(
        got.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()
    )
