"""The gated MLP activation every family here uses: silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmaas.kernels import cpu_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[tokens, 2 * inter] laid out [gate | up] -> silu(gate) * up; one native call for decode-sized steps."""
    if cpu_ops.fits(gate_up):
        return cpu_ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
