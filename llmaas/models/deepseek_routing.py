"""DeepSeek routers: router logits [T, E] -> (weights [T, k] fp32, expert ids [T, k]).

- v2 "greedy": softmax over all experts, the k best.
- v2 "group_limited_greedy": experts form n_group groups, each scored by its best expert; only the
  topk_group best groups compete for the k slots.
- v3 "noaux_tc": sigmoid scores; selection uses score + e_score_correction_bias (the bias balances
  load without an auxiliary loss), groups scored by the sum of their two best; the weights are the
  unbiased scores of the chosen experts.

Weights follow DeepSeek's reference code: v2 either renormalises the k weights (norm_topk_prob with
k > 1) or multiplies them by routed_scaling_factor; v3 renormalises if asked, then always scales.
(transformers 5's DeepSeek-V2 ignores norm_topk_prob; every released V2 config has it false.)
"""

from __future__ import annotations

import torch


def _keep_best_groups(choice: torch.Tensor, group_scores: torch.Tensor, topk_group: int, fill: float):
    """choice [T, E], group_scores [T, G] -> choice with experts outside the topk_group best groups = fill."""
    t, g = group_scores.shape
    best = torch.topk(group_scores, topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    keep = keep.unsqueeze(-1).expand(t, g, choice.shape[-1] // g).reshape(t, -1)
    return choice.masked_fill(~keep, fill)


def _renormalize(weights: torch.Tensor) -> torch.Tensor:
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)


def v2_route(
    router_logits: torch.Tensor,
    top_k: int,
    topk_method: str,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.softmax(router_logits.float(), dim=-1)
    if topk_method == "group_limited_greedy":
        group_scores = scores.view(scores.shape[0], n_group, -1).amax(dim=-1)
        scores = _keep_best_groups(scores, group_scores, topk_group, 0.0)
    elif topk_method != "greedy":
        raise ValueError(f"topk_method {topk_method!r}")  # deepseek_config refuses it at load
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if top_k > 1 and norm_topk_prob:
        return _renormalize(weights), ids
    return weights * routed_scaling_factor, ids


def v3_route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.sigmoid(router_logits.float())
    choice = scores + correction_bias.float()
    group_scores = choice.view(choice.shape[0], n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
    choice = _keep_best_groups(choice, group_scores, topk_group, float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if top_k > 1 and norm_topk_prob:
        weights = _renormalize(weights)
    return weights * routed_scaling_factor, ids
