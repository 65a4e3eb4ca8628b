"""The grouped expert executor and softmax top-k routing against a per-token reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmaas.kernels import cpu_ops
from llmaas.models.moe import Experts, SparseMoeBlock, softmax_topk
from llmaas.models.quantize import quantize_model


def _experts(num_experts=6, hidden=8, inter=5, seed=0) -> Experts:
    gen = torch.Generator().manual_seed(seed)
    experts = Experts(num_experts, hidden, inter)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(experts.gate_up.shape, generator=gen))
        experts.down.copy_(torch.randn(experts.down.shape, generator=gen))
    return experts


def _reference(experts: Experts, x, ids, weights):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (experts.gate_up[e] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (experts.down[e] @ (F.silu(gate) * up))
    return out


def test_experts_match_per_token_reference_and_count_tokens():
    experts = _experts()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 8, generator=gen)
    ids = torch.tensor([[0, 3], [3, 0], [5, 3], [3, 1], [0, 5], [1, 3], [3, 5], [0, 1], [5, 0]])
    weights = torch.rand(9, 2, generator=gen)
    with torch.no_grad():
        out = experts(x, ids, weights)
    torch.testing.assert_close(out, _reference(experts, x, ids, weights), rtol=1e-5, atol=1e-5)
    assert experts.token_counts.tolist() == [5, 3, 0, 6, 0, 4]
    with torch.no_grad():
        experts(x[:2], ids[:2], weights[:2])
    assert experts.token_counts.tolist() == [7, 3, 0, 8, 0, 4]
    experts.reset_token_counts()
    assert experts.token_counts is None


def test_experts_no_token_chose_are_never_computed():
    experts = _experts()
    with torch.no_grad():
        experts.gate_up[[2, 4]] = float("nan")  # any use of experts 2 or 4 would poison the output
        experts.down[[2, 4]] = float("nan")
        x = torch.randn(4, 8)
        out = experts(x, torch.tensor([[0, 1], [1, 5], [3, 0], [5, 3]]), torch.rand(4, 2))
    assert torch.isfinite(out).all()


def test_softmax_topk_with_and_without_renormalisation():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    probs = torch.softmax(logits, dim=-1)
    weights, ids = softmax_topk(logits, 2, renormalize=False)
    assert ids.tolist() == [[1, 2], [2, 3]]
    torch.testing.assert_close(weights, probs.gather(1, ids))
    weights, ids = softmax_topk(logits, 2, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    torch.testing.assert_close(weights, probs.gather(1, ids) / probs.gather(1, ids).sum(-1, keepdim=True))


def test_sparse_block_with_shared_expert_counts_active_parameters():
    block = SparseMoeBlock(8, num_experts=6, top_k=2, expert_intermediate_size=5, renormalize=False,
                           shared_intermediate_size=7)  # fmt: skip
    for p in block.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 8)
    with torch.no_grad():
        weights, ids = softmax_topk(block.gate(x), 2, False)
        shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        expected = _reference(block.experts, x, ids, weights) + shared
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    # the four experts no token uses: 4 * (10*8 + 8*5)
    assert block.experts.inactive_params_per_token() == 4 * 120


def _routed_batch():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=gen)
    ids = torch.tensor([[0, 1], [1, 5], [3, 0], [5, 3], [0, 5]])
    return x, ids, torch.rand(5, 2, generator=gen)


def test_packed_experts_give_the_same_result():
    experts = _experts()
    x, ids, weights = _routed_batch()
    with torch.no_grad():
        expected = experts(x, ids, weights)
        if not experts.pack():
            return  # no oneDNN packing for this build / CPU: nothing to compare
        assert experts.gate_up is None and len(experts.converted) == 6  # one copy of the weights
        assert not experts.pack()  # already converted
        torch.testing.assert_close(experts(x, ids, weights), expected, rtol=1e-5, atol=1e-5)


def test_int8_experts_stay_close_and_quantize_model_reaches_them():
    block = SparseMoeBlock(8, num_experts=6, top_k=2, expert_intermediate_size=5, renormalize=True)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    # Fixed routing (a quantized router may flip near-ties), 16 tokens over 6 experts.
    x = torch.randn(16, 8, generator=gen)
    ids = torch.stack([torch.arange(16) % 6, (torch.arange(16) + 1) % 6], dim=1)
    weights = torch.rand(16, 2, generator=gen)
    with torch.no_grad():
        expected = block.experts(x, ids, weights)
        quantize_model(block, "int8")
        assert block.experts.gate_up is None and block.experts.converted is not None
        # One token: the int8 kernel (a few rows per expert); 16 tokens: more rows, dequantized weights.
        for n in (1, 16):
            got = block.experts(x[:n], ids[:n], weights[:n])
            assert (got - expected[:n]).abs().max() <= 0.02 * expected.abs().max()
        assert block(x).shape == x.shape


def test_bf16_experts_packed_for_the_native_matmul_stay_close():
    """bf16 experts whose shapes the native matmul takes (16-column tiles): packing changes the
    accumulation order, not the result beyond bf16 rounding."""
    experts = _experts(hidden=32, inter=16).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(7, 32, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, 6, (7, 2), generator=gen)
    weights = torch.rand(7, 2, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        expected = experts(x, ids, weights).float()
        if not experts.pack():
            return  # neither our matmul nor oneDNN packing here: nothing to compare
        got = experts(x, ids, weights).float()
    gate_up, down = experts.converted[0]
    assert bool(gate_up.native.numel()) == cpu_ops.decode_matmul_available() == bool(down.native.numel())
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
