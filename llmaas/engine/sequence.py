"""Sequence: one stream of tokens being generated; a request with n > 1 owns n of them."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from llmaas.engine.grammar import GrammarMatcher
from llmaas.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) alternatives, best first


_arrival_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    max_tokens: int = 16  # resolved against the context window by the engine
    arrival: int = field(default_factory=lambda: next(_arrival_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # [0] is None: no context
    cumulative_logprob: float = 0.0
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache (first admission)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of this sequence's full blocks
    state_slot: int | None = None  # hybrid models: this sequence's slot of the linear layers' state pool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    admitted_once: bool = False
    text: str = ""  # detokenized output, stop strings already cut
    emitted_text_len: int = 0  # how much of text has been streamed out
    emitted_token_count: int = 0
    detokenizer: object = None
    matcher: GrammarMatcher | None = None  # constrained decoding: this sequence's grammar state
    leader: Sequence | None = None  # n > 1: siblings wait for the leader's prompt, then share its blocks

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def sort_key(self) -> tuple[int, int]:
        """Higher priority first, then first come first served."""
        return (-self.priority, self.arrival)
