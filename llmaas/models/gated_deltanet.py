"""Gated DeltaNet: the linear-attention layer of the hybrid families (qwen3_5_text, qwen3_next).

A token's path: one input projection -> [qkv | z | b | a]; qkv through a causal depthwise conv1d
(kernel K) and SiLU; q, k, v per head; the gated delta rule (delta_rule.py) with decay
g = -exp(A_log) * softplus(a + dt_bias) and write strength beta = sigmoid(b); an RMSNorm of each
head's output gated by SiLU(z); the output projection.

What a sequence carries from step to step is constant in size, whatever its length: the last K - 1
conv inputs and one recurrent state [Hv, Dk, Dv] per layer. Both live in a pool of slots owned by
the layer (allocated once, like the paged KV cache of the attention layers); `StateBatch` says which
slot each sequence of a step uses and where to snapshot states for the prefix cache. A sequence with
no cached tokens starts from zeros; one resumed from a prefix-cache snapshot finds it copied into its
slot by the engine before the step (`copy_state`). The recurrent state is kept in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmaas.models import delta_rule
from llmaas.models.attention import ForwardBatch

STATE_DTYPE = torch.float32  # the recurrence accumulates over the whole context: keep it exact


@dataclass
class StateBatch:
    """The state slots of one step's sequences, in ForwardBatch order."""

    prefill_slots: list[int]  # per ForwardBatch.prefills
    decode_slots: torch.Tensor | None  # [B] for the decode tokens
    chunk_size: int  # the delta rule's chunk: divides the block size, so block ends are chunk ends
    # per prefill: (position p, slot) -> save the state before position p (p ends a block) into slot
    snapshots: list[list[tuple[int, int]]] = field(default_factory=list)
    # set when the decode slots are consecutive from this one: the layers then read and update the
    # pool in place instead of gathering and scattering (the engine keeps running slots packed)
    decode_first_slot: int | None = None


class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's output, then times SiLU(z) (in fp32, cast back as the reference)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((self.weight * normed.to(dtype)) * F.silu(z.float())).to(dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg, layer: int = 0):
        super().__init__()
        lin = cfg.linear
        self.num_k_heads, self.num_v_heads = lin.num_key_heads, lin.num_value_heads
        self.head_k_dim, self.head_v_dim = lin.key_head_dim, lin.value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = lin.conv_kernel
        # [q k v | z | b | a] in one matmul (the loader concatenates the checkpoint's projections)
        self.splits = [self.conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads]
        self.in_proj = nn.Linear(cfg.hidden_size, sum(self.splits), bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.kernel))
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, cfg.hidden_size, bias=False)
        self.conv_state = torch.empty(0)  # [slots, conv_dim, K - 1]
        self.recurrent_state = torch.empty(0)  # [slots, Hv, Dk, Dv]

    # ------------------------------------------------------------------ state pool
    def state_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one sequence's state in this layer (conv inputs in `dtype`, recurrence in fp32)."""
        conv = self.conv_dim * (self.kernel - 1) * torch.empty(0, dtype=dtype).element_size()
        rec = self.num_v_heads * self.head_k_dim * self.head_v_dim * STATE_DTYPE.itemsize
        return conv + rec

    def allocate_state(self, num_slots: int, dtype: torch.dtype, device) -> None:
        self.conv_state = torch.zeros(num_slots, self.conv_dim, self.kernel - 1, dtype=dtype, device=device)
        shape = (num_slots, self.num_v_heads, self.head_k_dim, self.head_v_dim)
        self.recurrent_state = torch.zeros(shape, dtype=STATE_DTYPE, device=device)

    def copy_state(self, src: int, dst: int) -> None:
        self.conv_state[dst] = self.conv_state[src]
        self.recurrent_state[dst] = self.recurrent_state[src]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope=None) -> torch.Tensor:
        states: StateBatch = batch.linear
        qkv, z, b, a = self.in_proj(x).split(self.splits, dim=-1)
        beta = torch.sigmoid(b.float())
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        core = torch.empty(x.shape[0], self.num_v_heads, self.head_v_dim, dtype=x.dtype, device=x.device)
        for i, seg in enumerate(batch.prefills):
            sl = slice(seg.start, seg.start + seg.length)
            snaps = states.snapshots[i] if states.snapshots else []
            core[sl] = self._prefill(qkv[sl], g[sl], beta[sl], seg, states.prefill_slots[i], snaps, states)
        if batch.decode is not None:
            d = batch.decode.start
            core[d:] = self._decode(qkv[d:], g[d:], beta[d:], states)
        z = z.reshape(-1, self.num_v_heads, self.head_v_dim)
        return self.out_proj(self.norm(core, z).reshape(x.shape[0], self.value_dim))

    def _split_heads(self, mixed: torch.Tensor):
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(-1, self.num_k_heads, self.head_k_dim)
        k = k.reshape(-1, self.num_k_heads, self.head_k_dim)
        q, k = delta_rule.prepare(q, k, self.num_v_heads // self.num_k_heads)
        return q, k, v.reshape(-1, self.num_v_heads, self.head_v_dim)

    def _prefill(self, qkv, g, beta, seg, slot: int, snaps: list[tuple[int, int]], states: StateBatch):
        begin = seg.context_len - seg.length
        history = self.kernel - 1
        if begin == 0:
            conv_prev = qkv.new_zeros(self.conv_dim, history)
            rec = torch.zeros_like(self.recurrent_state[slot])
        else:
            conv_prev, rec = self.conv_state[slot], self.recurrent_state[slot]
        window = torch.cat([conv_prev.to(qkv.dtype), qkv.t()], dim=1)  # [C, K-1+L]: positions begin-K+1 ..
        mixed = F.silu(F.conv1d(window[None], self.conv_weight[:, None, :], groups=self.conv_dim)[0]).t()
        q, k, v = self._split_heads(mixed)
        out, final, inner = delta_rule.chunked(q, k, v, g, beta, rec, begin, states.chunk_size)
        end = begin + seg.length
        for pos, snap in snaps:  # states before `pos`, for the prefix cache
            self.conv_state[snap] = window[:, pos - begin : pos - begin + history]
            self.recurrent_state[snap] = final if pos == end else inner[pos]
        self.conv_state[slot] = window[:, -history:]
        self.recurrent_state[slot] = final
        return out.to(qkv.dtype)

    def _decode(self, qkv, g, beta, states: StateBatch):
        slots = states.decode_slots
        first = states.decode_first_slot
        if first is not None:  # the slots are first, first + 1, ...: work on the pool in place
            conv = self.conv_state.narrow(0, first, slots.shape[0])
            rec = self.recurrent_state.narrow(0, first, slots.shape[0])
        else:
            conv, rec = self.conv_state.index_select(0, slots), self.recurrent_state.index_select(0, slots)
        window = torch.cat([conv.to(qkv.dtype), qkv[:, :, None]], dim=2)
        mixed = F.silu((window * self.conv_weight).sum(-1))  # [B, C]: the conv at the newest position
        conv.copy_(window[:, :, 1:])
        q, k, v = self._split_heads(mixed)
        out = delta_rule.recurrent_step(q, k, v, g, beta, rec)
        if first is None:
            self.conv_state.index_copy_(0, slots, conv)
            self.recurrent_state.index_copy_(0, slots, rec)
        return out.to(qkv.dtype)
