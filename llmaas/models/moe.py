"""Sparse Mixture-of-Experts: softmax top-k routing and a grouped expert executor.

`Experts` keeps every expert's weights stacked ([E, 2*I, H] gate+up, [E, H, I] down) and runs a
step's tokens grouped by expert: the (token, expert) pairs are sorted by expert id, each *active*
expert does one matmul over its rows, and the weighted results are added back per token. Experts
that no token chose cost nothing; there is no loop over tokens. It also counts the tokens each
expert received (load balance), on the device, with no host sync beyond the grouping's one.

`SparseMoeBlock` is the mixtral / qwen2_moe / qwen3_moe MLP: a linear router, softmax top-k (with or
without renormalising the k weights), the routed experts, and qwen2_moe's optional shared expert
scaled by its own sigmoid gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmaas.models.activation import silu_and_mul
from llmaas.models.packed_linear import packed_or_none


def _as_linear(weight: torch.Tensor) -> nn.Linear:
    """One expert's [out, in] weight as a bias-free nn.Linear (no copy), for the per-layer converters."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear


def softmax_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] router logits -> (weights [T, k] fp32, expert ids [T, k]).

    Softmax over all experts in fp32 (as the reference implementations), keep the k largest; with
    `renormalize` the k weights are rescaled to sum to 1 (mixtral, norm_topk_prob=true).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Experts(nn.Module):
    """E SiLU-gated MLPs with stacked weights, run only for the tokens routed to them."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, top_k: int | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k  # experts per token, for the active-parameter count (None: unknown)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # Tokens routed to each expert since the last reset; a plain tensor (not a buffer) so it stays
        # out of the state dict and follows the device of the activations.
        self.token_counts: torch.Tensor | None = None
        # After pack() or quantize_int8/int4(): per expert, [gate_up, down] as nn.Linear-like modules.
        self.converted: nn.ModuleList | None = None

    def _convert(self, make) -> bool:
        """Replace the stacked weights by make(nn.Linear) per expert and projection; all or nothing."""
        if self.converted is not None:
            return False
        modules = []
        for e in range(self.num_experts):
            pair = [make(_as_linear(self.gate_up[e])), make(_as_linear(self.down[e]))]
            if any(m is None for m in pair):
                return False
            modules.append(nn.ModuleList(pair))
        self.converted = nn.ModuleList(modules)
        self.gate_up = self.down = None  # one copy of the weights
        return True

    def pack(self) -> bool:
        """Each expert's weights in oneDNN's blocked layout (CPU), as `pack_linears` does for nn.Linear.

        The packed kernel streams weights about twice as fast for few-row decode (packed_linear.py);
        without it the experts would lose that against a dense model of the same active size. False
        where packing does not apply or the experts were already converted (e.g. quantized).
        """
        return self._convert(packed_or_none)

    def quantize_int8(self) -> bool:
        """Weight-only int8 per output channel, each expert as quantize.Int8Linear."""
        from llmaas.models.quantize import Int8Linear  # quantize calls this method

        return self._convert(Int8Linear)

    def quantize_int4(self) -> bool:
        """Weight-only int4 in groups of 32, each expert as quantize.Int4Linear; False (experts left
        unquantized) when a projection's input width is not a multiple of 32."""
        from llmaas.models.quantize import Int4Linear  # quantize calls this method

        return self._convert(Int4Linear.or_none)

    def _expert(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        if self.converted is not None:
            gate_up, down = self.converted[expert]
            return down(silu_and_mul(gate_up(rows)))
        return F.linear(silu_and_mul(F.linear(rows, self.gate_up[expert])), self.down[expert])

    def reset_token_counts(self) -> None:
        self.token_counts = None

    def _count(self, counts: torch.Tensor) -> None:
        if self.token_counts is None or self.token_counts.device != counts.device:
            self.token_counts = torch.zeros(self.num_experts, dtype=torch.long, device=counts.device)
        self.token_counts = self.token_counts + counts  # out of place: safe across inference mode

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids [T, k], topk_weights [T, k] -> sum_j weight_j * expert_{id_j}(x), [T, H]."""
        k = topk_ids.shape[-1]
        flat_ids = topk_ids.reshape(-1)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        self._count(counts)
        order = torch.argsort(flat_ids, stable=True)  # (token, slot) pairs grouped by expert
        token_of_row = order // k
        rows = x.index_select(0, token_of_row)
        outputs = []
        start = 0
        for expert, n in enumerate(counts.tolist()):  # one host sync per layer; idle experts skipped
            if n == 0:
                continue
            outputs.append(self._expert(expert, rows[start : start + n]))
            start += n
        if not outputs:
            return torch.zeros_like(x)
        weights = topk_weights.reshape(-1).index_select(0, order).to(x.dtype)
        weighted = torch.cat(outputs) * weights.unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of_row, weighted)

    def params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    def inactive_params_per_token(self) -> int:
        """Parameters of the E - k experts a token does not use (0 when top_k is unknown)."""
        if self.top_k is None:
            return 0
        return (self.num_experts - self.top_k) * self.params_per_expert()


class SparseMoeBlock(nn.Module):
    """Router -> top-k experts (+ an always-on shared expert with a sigmoid gate, qwen2_moe)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        expert_intermediate_size: int,
        renormalize: bool,
        shared_intermediate_size: int = 0,
    ):
        super().__init__()
        from llmaas.models.dense import MLP  # dense imports this module to build its layers

        self.top_k, self.renormalize = top_k, renormalize
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden_size, expert_intermediate_size, top_k)
        self.shared_expert = None
        self.shared_expert_gate = None
        if shared_intermediate_size:
            self.shared_expert = MLP(hidden_size, shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = softmax_topk(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def expert_layers(model: nn.Module) -> list[tuple[int, Experts]]:
    """(layer index, Experts) for each MoE layer of a model whose layers live in `model.layers`."""
    found = []
    for i, layer in enumerate(getattr(model, "layers", [])):
        found.extend((i, m) for m in layer.modules() if isinstance(m, Experts))
    return found


def expert_token_counts(model: nn.Module) -> dict[int, list[int]]:
    """Tokens routed to each expert of each MoE layer since the last reset: {layer: [count per expert]}."""
    counts = {}
    for layer, experts in expert_layers(model):
        c = experts.token_counts
        counts[layer] = c.tolist() if c is not None else [0] * experts.num_experts
    return counts


def pack_experts(model: nn.Module) -> int:
    """Pack every Experts module's weights for oneDNN (CPU); returns how many were packed."""
    return sum(m.pack() for m in model.modules() if isinstance(m, Experts))


def reset_expert_token_counts(model: nn.Module) -> None:
    for _, experts in expert_layers(model):
        experts.reset_token_counts()
