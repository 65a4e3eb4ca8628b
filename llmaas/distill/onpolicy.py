"""On-policy samples (GKD): the student writes continuations, in our engine, with its current weights.

One engine is built once from the student's initial directory (no prefix caching: the weights change
between calls, so cached keys and values would be stale) and its weights are refreshed from the
training module before each use — a copy of a few tens of MB, not a reload.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmaas.models.dense import DenseDecoder


class StudentSampler:
    def __init__(self, student_dir: Path, max_rows: int, seq_len: int, dtype: str, device: str | None):
        from llmaas.engine.llm_engine import EngineConfig
        from llmaas.llm import LLM

        self._llm = LLM(
            config=EngineConfig(
                model=str(student_dir),
                dtype=dtype,
                device=device,
                enable_prefix_caching=False,
                pack_weights=False,
                quantization=None,
                max_num_seqs=max(1, max_rows),
                max_num_batched_tokens=max(256, max_rows * seq_len),
                kv_cache_memory=self._cache_bytes(student_dir, max_rows, seq_len),
            )
        )

    @staticmethod
    def _cache_bytes(student_dir: Path, rows: int, seq_len: int) -> int:
        from llmaas.models.config import load_config

        cfg = load_config(student_dir)
        per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
        return max(4 * 2**20, 2 * per_token * (rows + 1) * (seq_len + 32))

    @torch.no_grad()
    def sync(self, model: DenseDecoder) -> None:
        self._llm.engine.model.load_state_dict(model.state_dict())

    def continue_rows(self, prompts: torch.Tensor, new_tokens: int, seeds: list[int]) -> torch.Tensor:
        """prompts [n, P] -> [n, P + new_tokens]: each row continued by the student (temperature 1)."""
        from llmaas.engine.sampling_params import SamplingParams

        params = [
            SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=s, ignore_eos=True) for s in seeds
        ]
        outputs = self._llm.generate([row.tolist() for row in prompts], params)
        tails = torch.tensor([out.outputs[0].token_ids for out in outputs], dtype=prompts.dtype)
        return torch.cat([prompts, tails], dim=1)
