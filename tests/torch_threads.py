"""A module-wide fixture for test files of tiny models: one torch thread.

Per-op threading overhead dominates tiny models, and on a busy machine OpenMP's barriers made a step
many times slower with two threads than with one (measured: an MLA preemption test 13 s vs 0.4 s at
load 12). Import it into a test module to apply it there; the thread count is restored afterwards.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
