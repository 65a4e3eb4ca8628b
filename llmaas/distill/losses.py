"""Distillation losses on temperature-scaled logits, averaged over the positions a mask selects.

With p the teacher's and q the student's distribution at temperature T:

- forward KL  ``KL(p || q)``: mode-covering; the classic (Hinton) distillation loss.
- reverse KL  ``KL(q || p)``: mode-seeking; what on-policy distillation (GKD) often pairs with.
- generalized JSD(beta), as in GKD: with ``m = beta p + (1 - beta) q``,
  ``JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)``. It tends to 0 at both ends, like
  ``beta KL(p || q)`` as beta -> 0 and ``(1 - beta) KL(q || p)`` as beta -> 1, so we divide by
  ``beta (1 - beta)``: the loss is then continuous in beta, equal to forward KL at beta = 0 and
  reverse KL at beta = 1 (tested). At beta = 0.5 it is 4x the plain JSD.

KL terms are multiplied by T^2 (Hinton et al.) so their gradients keep their size as T changes.
Cross-entropy is on the student's unscaled logits against the data's next tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("fkl", "rkl", "jsd", "ce")


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp_min(1.0)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities over the last axis."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD_beta(p, q) / (beta (1 - beta)) per position; forward KL at beta 0, reverse KL at beta 1."""
    if beta <= 0.0:
        return _kl(log_p, log_q)
    if beta >= 1.0:
        return _kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    jsd = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return jsd / (beta * (1.0 - beta))


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean divergence between teacher and student at `temperature` over masked positions."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "fkl":
        per = _kl(log_p, log_q)
    elif kind == "rkl":
        per = _kl(log_q, log_p)
    elif kind == "jsd":
        per = generalized_jsd(log_p, log_q, beta)
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    return _masked_mean(per, mask) * temperature**2


def cross_entropy(
    student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy; `labels` [B, T] aligned with the logits' positions."""
    per = F.cross_entropy(student_logits.float().flatten(0, -2), labels.flatten(), reduction="none")
    return _masked_mean(per.view(labels.shape), mask)
