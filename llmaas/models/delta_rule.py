"""The gated delta rule: the recurrence of a Gated DeltaNet layer, in two exact forms.

Per head, a state S [Dk, Dv] is carried from token to token. At token t, with decay a_t = exp(g_t),
write strength beta_t, key k_t (L2-normalised), value v_t and query q_t (L2-normalised, scaled by
Dk^-1/2):

    S <- a_t S                               (forget)
    u_t = beta_t (v_t - S^T k_t)             (the part of v_t the state does not already predict)
    S <- S + k_t u_t^T                       (write it)
    o_t = S^T q_t                            (read)

`recurrent_step` is that, one token for a batch of sequences (decode). `chunked` gives the same
outputs for a run of tokens, a chunk of C tokens at a time: inside a chunk the u_t solve one
unit-lower-triangular system (the writes of earlier tokens of the chunk feed later ones), so a chunk
costs a few matmuls and only the chunk-to-chunk state hand-over is sequential. Chunks are aligned to
absolute positions (multiples of C), so the state at every multiple of C inside the run is available
for snapshots (prefix caching). Everything is computed in fp32.
"""

from __future__ import annotations

import torch


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum x^2 + 1e-6) over the last dimension (the normalisation the reference uses)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def prepare(q: torch.Tensor, k: torch.Tensor, heads_per_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [T, Hk, Dk] -> fp32, normalised, q scaled, each key head repeated for its value heads."""
    q, k = l2_normalize(q.float()), l2_normalize(k.float())
    q = q * q.shape[-1] ** -0.5
    if heads_per_key > 1:
        q, k = q.repeat_interleave(heads_per_key, dim=1), k.repeat_interleave(heads_per_key, dim=1)
    return q, k


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One token per row, the state updated in place. q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H],
    state [B, H, Dk, Dv] (fp32). Returns o [B, H, Dv]."""
    b, h, dk, dv = state.shape
    state.mul_(g.exp()[..., None, None])
    predicted = (k.unsqueeze(-2) @ state).squeeze(-2)  # batched matmuls: several times einsum's speed
    u = (v.float() - predicted) * beta[..., None]
    state.view(b * h, dk, dv).baddbmm_(k.reshape(b * h, dk, 1), u.reshape(b * h, 1, dv))
    return (q.unsqueeze(-2) @ state).squeeze(-2)


def unit_lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """(I + L)^-1 for strictly lower-triangular L [..., C, C]: L is nilpotent (L^C = 0), so the inverse
    is the finite series I - L + L^2 - ..., summed as (I - L)(I + L^2)(I + L^4)... in log2(C) steps of
    two batched matmuls (a batched triangular solve is far slower for many small systems on CPU)."""
    c = lower.shape[-1]
    power = -lower
    inverse = torch.eye(c, dtype=lower.dtype, device=lower.device) + power
    terms = 2
    while terms < c:
        power = power @ power
        inverse = inverse + inverse @ power
        terms *= 2
    return inverse


def chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    first_position: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """A run of T tokens of one sequence starting at absolute position `first_position`.

    q, k [T, H, Dk] (prepared), v [T, H, Dv], g, beta [T, H], state [H, Dk, Dv] fp32 (the state
    before the run). Returns (o [T, H, Dv] fp32, the state after the run, {p: state before position p}
    for every multiple p of chunk_size with first_position < p < first_position + T).
    """
    t_len, h, dk = k.shape
    dv = v.shape[-1]
    c = chunk_size
    # Zero tokens in front (up to the previous multiple of C) and behind: beta = 0 writes nothing and
    # g = 0 forgets nothing, so they leave the state as it is and their outputs are dropped.
    front = first_position % c
    back = (-(front + t_len)) % c
    n = (front + t_len + back) // c

    def padded(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        pad = x.new_zeros((front + t_len + back, *x.shape[1:]))
        pad[front : front + t_len] = x
        return pad.view(n, c, *x.shape[1:]).transpose(1, 2)  # [n, H, C, ...]

    q, k, v, g, beta = padded(q), padded(k), padded(v), padded(g), padded(beta)
    decay = g.cumsum(-1)  # [n, H, C]: log of the decay from the chunk's start through each token
    causal = torch.ones(c, c, dtype=torch.bool, device=k.device).tril()
    # exp(decay_i - decay_j) for j <= i: the decay between token j's write and token i
    pair = (decay[..., :, None] - decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta[..., None]
    # u = (I + L)^-1 (beta v - beta decay k S): L, strictly lower, holds the earlier writes each u sees
    lower = (k_beta @ k.transpose(-1, -2)) * pair
    inverse = unit_lower_inverse(lower.masked_fill(~causal.tril(-1), 0.0))
    u_from_values = inverse @ (v * beta[..., None])
    u_from_state = inverse @ (k_beta * decay.exp()[..., None])
    attend = (q @ k.transpose(-1, -2)) * pair  # within-chunk reads, the diagonal included
    q_decayed = q * decay.exp()[..., None]
    k_to_end = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]  # [n, H, 1, 1]
    out = torch.empty(n, h, c, dv, dtype=torch.float32, device=k.device)
    snapshots: dict[int, torch.Tensor] = {}
    base = first_position - front
    for i in range(n):
        if i > 0 and base + i * c > first_position:
            snapshots[base + i * c] = state
        u = u_from_values[i] - u_from_state[i] @ state
        out[i] = q_decayed[i] @ state + attend[i] @ u
        state = state * chunk_decay[i] + k_to_end[i].transpose(-1, -2) @ u
    out = out.transpose(1, 2).reshape(n * c, h, dv)[front : front + t_len]
    return out, state, snapshots
