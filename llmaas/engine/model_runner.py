"""ModelRunner: owns the model and its KV cache; turns scheduled chunks into one forward pass.

The KV cache is allocated once, at start-up, from a byte budget: memory never grows with traffic.
A hybrid model's linear-attention layers take their state pool from the same budget first (a slot per
sequence, `max_num_seqs` of them, and as many spare slots for prefix-cache snapshots); the KV blocks
of its attention layers get the rest.

`run` raises only for a fault that belongs to the whole step (the forward pass, the logits). A fault
in the work done for one sequence (its prompt logprobs, its sampling) is returned in
`StepResult.failed` instead, so the engine fails that request alone and the others carry on.

Constrained sequences (a grammar matcher, grammar.py): the allowed tokens of their next token are
computed after the forward pass, before sampling. Steps without a constrained sequence do none of
this. (Computing them in a worker thread during the forward pass, as GPU engines do, was measured and
dropped: a step's masks cost microseconds on CPU, less than handing the GIL to a second thread while
the forward runs Python between torch ops; docs/constrained_decoding.md.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from llmaas.engine import grammar, sampler
from llmaas.engine.scheduler import ScheduledChunk
from llmaas.engine.sequence import Sequence, TokenLogprob
from llmaas.engine.state_slots import StateSlots
from llmaas.errors import InvalidRequestError
from llmaas.models.attention import SequenceChunk, build_forward_batch, is_decode
from llmaas.models.gated_deltanet import StateBatch


def is_decode_chunk(chunk: ScheduledChunk) -> bool:
    return is_decode(chunk.num_new_tokens, chunk.seq.num_computed_tokens)


@dataclass
class StepResult:
    sampled: list[tuple[Sequence, int, TokenLogprob | None]] = field(default_factory=list)
    failed: dict[Sequence, Exception] = field(default_factory=dict)  # this sequence's request must fail


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        block_size: int,
        kv_cache_bytes: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
        max_num_seqs: int = 64,
        enable_prefix_caching: bool = True,
    ):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        layers = model.attention_layers()
        elem_size = torch.empty(0, dtype=dtype).element_size()
        self.kv_bytes_per_token = sum(layer.cache_elements_per_token() for layer in layers) * elem_size
        kv_cache_bytes -= self._allocate_state_pool(kv_cache_bytes, max_num_seqs, enable_prefix_caching)
        self.num_blocks = int(kv_cache_bytes // (self.kv_bytes_per_token * block_size))
        if self.num_blocks < 2:
            raise InvalidRequestError(
                f"kv cache memory of {kv_cache_bytes} bytes holds fewer than 2 blocks "
                f"({self.kv_bytes_per_token * block_size} bytes each)",
                param="kv_cache_memory",
            )
        for layer in layers:
            layer.allocate_cache(self.num_blocks, block_size, dtype, device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.sliding_window = getattr(model.config, "sliding_window", None)
        self.vocab_size = model.config.vocab_size

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.kv_bytes_per_token

    # ------------------------------------------------------------ linear-attention state (hybrids)
    def _allocate_state_pool(self, budget: int, max_num_seqs: int, snapshots: bool) -> int:
        """Allocate the linear layers' state pool out of `budget`; returns the bytes it takes. Without
        prefix caching there are no snapshot slots (and no snapshots are taken)."""
        self.linear_layers = self.model.linear_layers() if hasattr(self.model, "linear_layers") else []
        self.states: StateSlots | None = None
        self.state_bytes_per_sequence = sum(layer.state_bytes(self.dtype) for layer in self.linear_layers)
        if not self.linear_layers:
            return 0
        self.states = StateSlots(max_num_seqs, max_num_seqs if snapshots else 0)
        pool_bytes = self.states.num_slots * self.state_bytes_per_sequence
        if pool_bytes >= budget:
            raise InvalidRequestError(
                f"kv cache memory of {budget} bytes does not hold the linear-attention state of "
                f"{max_num_seqs} sequences (and as many prefix-cache snapshots) "
                f"({self.state_bytes_per_sequence} bytes each) and KV blocks beside it",
                param="kv_cache_memory",
            )
        for layer in self.linear_layers:
            layer.allocate_state(self.states.num_slots, self.dtype, self.device)
        # The delta rule's chunk divides the block size: every block end is a chunk end, where the
        # chunked form has the state at hand for a snapshot.
        self.state_chunk_size = math.gcd(self.block_size, 64)
        return pool_bytes

    @property
    def state_pool_bytes(self) -> int:
        return self.states.num_slots * self.state_bytes_per_sequence if self.states else 0

    def _state_batch(self, ordered: list[ScheduledChunk]) -> tuple[StateBatch, list[tuple[int, int]]]:
        """Slots of this step's sequences and the snapshots to take at block ends inside prefill chunks,
        after copying the snapshots that sequences admitted this step resume from into their slots.
        Also (sequence slot, snapshot slot) for decode tokens that complete a block: their state after
        the step is the state at that block end, copied once the step has run (multi-turn reuse)."""
        for src, dst in self.states.take_pending_copies():
            for layer in self.linear_layers:
                layer.copy_state(src, dst)
        prefill_slots: list[int] = []
        decode_slots: list[int] = []
        snapshots: list[list[tuple[int, int]]] = []
        after_step: list[tuple[int, int]] = []
        for c in ordered:
            seq = c.seq
            if is_decode_chunk(c):
                decode_slots.append(seq.state_slot)
                end = seq.num_computed_tokens + 1
                if end % self.block_size == 0 and seq.params.prompt_logprobs is None:
                    slot = self.states.snapshot_slot(seq.block_table[end // self.block_size - 1])
                    if slot is not None:
                        after_step.append((seq.state_slot, slot))
                continue
            prefill_slots.append(seq.state_slot)
            begin = seq.num_computed_tokens
            end = begin + c.num_new_tokens
            snaps = []
            if seq.params.prompt_logprobs is None:  # such prompts never read the prefix cache
                for pos in range(
                    begin // self.block_size * self.block_size + self.block_size, end + 1, self.block_size
                ):
                    slot = self.states.snapshot_slot(seq.block_table[pos // self.block_size - 1])
                    if slot is not None:
                        snaps.append((pos, slot))
            snapshots.append(snaps)
        decode = torch.tensor(decode_slots, device=self.device) if decode_slots else None
        first = None
        if decode_slots and decode_slots == list(range(decode_slots[0], decode_slots[0] + len(decode_slots))):
            first = decode_slots[0]
        return StateBatch(prefill_slots, decode, self.state_chunk_size, snapshots, first), after_step

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> StepResult:
        """One forward over all chunks; (seq, token, logprob info) for the chunks that sample, and the
        sequences whose own work (prompt logprobs, sampling) failed."""
        decodes = [c for c in chunks if is_decode_chunk(c)]
        if self.states is not None:  # by state slot: consecutive slots are read in place (gated_deltanet)
            decodes.sort(key=lambda c: c.seq.state_slot)
        ordered = [c for c in chunks if not is_decode_chunk(c)] + decodes
        input_ids: list[int] = []
        seq_chunks: list[SequenceChunk] = []
        sample_rows: list[int] = []
        sampling: list[Sequence] = []
        constrained: list[int] = []  # rows of `sampling` whose sequence has a grammar
        for c in ordered:
            seq = c.seq
            begin = seq.num_computed_tokens
            input_ids.extend(seq.all_token_ids[begin : begin + c.num_new_tokens])
            seq_chunks.append(SequenceChunk(c.num_new_tokens, begin, seq.block_table))
            if c.samples:
                sample_rows.append(len(input_ids) - 1)
                if seq.matcher is not None:
                    constrained.append(len(sampling))
                sampling.append(seq)
        result = StepResult()
        batch = build_forward_batch(seq_chunks, self.block_size, self.device, self.sliding_window)
        snapshot_after_step: list[tuple[int, int]] = []
        if self.states is not None:
            batch.linear, snapshot_after_step = self._state_batch(ordered)
        hidden = self.model(torch.tensor(input_ids, device=self.device), batch)
        for src, dst in snapshot_after_step:
            for layer in self.linear_layers:
                layer.copy_state(src, dst)
        offset = 0
        for c in ordered:
            if c.seq.params.prompt_logprobs is not None:
                try:
                    self._prompt_logprobs(c, hidden[offset : offset + c.num_new_tokens])
                except Exception as exc:
                    result.failed[c.seq] = exc
            offset += c.num_new_tokens
        if not sampling:
            return result
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        masks = None
        if constrained:
            masks = self._masks(constrained, sampling, result)
            if len(masks.rows) < len(constrained):  # a matcher failed: its sequence samples nothing
                keep = [r for r in range(len(sampling)) if sampling[r] not in result.failed]
                logits, sampling = logits[keep], [sampling[r] for r in keep]
                masks = grammar.TokenMasks([keep.index(r) for r in masks.rows], masks.bias)
            if not masks.rows:
                masks = None
        try:
            rows = sampler.sample(logits, sampling, self.generator, masks)
        except Exception:  # some row's request is at fault: find it, and sample the others
            rows, faults = sampler.sample_each(logits, sampling, self.generator, masks)
            for row, exc in faults.items():
                result.failed[sampling[row]] = exc
        result.sampled = [(seq, *row) for seq, row in zip(sampling, rows) if row is not None]
        return result

    def _masks(
        self, constrained: list[int], sampling: list[Sequence], result: StepResult
    ) -> grammar.TokenMasks:
        """The allowed tokens of the constrained rows of `sampling`, all computed at once. If that
        raises, row by row to pin the fault on its sequence (which fails alone), as for a matcher in
        its error state (a limit of the grammar library hit while computing its mask) or one that
        allows nothing; the masks of the others are returned."""
        packed = grammar.allocate_masks(len(constrained), self.vocab_size)
        try:
            grammar.fill_masks([sampling[r].matcher for r in constrained], packed)
            batched = True
        except Exception:
            batched = False
        for i, r in enumerate(constrained):
            matcher = sampling[r].matcher
            try:
                if not batched:
                    grammar.fill_mask(matcher, packed, i)
                matcher.check()  # a matcher in its error state must fail, never drift into a "stop"
            except Exception as exc:
                result.failed[sampling[r]] = exc
        for i in grammar.empty_rows(packed):
            if sampling[constrained[i]] not in result.failed:
                result.failed[sampling[constrained[i]]] = grammar.GrammarError("the grammar allows no token")
        kept = [i for i, r in enumerate(constrained) if sampling[r] not in result.failed]
        if len(kept) < len(constrained):
            packed = packed[kept]
        rows = [constrained[i] for i in kept]
        return grammar.TokenMasks(rows, grammar.mask_bias(packed, self.vocab_size, self.device))

    def _prompt_logprobs(self, chunk: ScheduledChunk, hidden: torch.Tensor) -> None:
        """Logprob of each prompt token given the tokens before it (for echo / scoring requests)."""
        seq = chunk.seq
        prompt = seq.prompt_token_ids
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)  # the first token has no context
        begin = seq.num_computed_tokens
        # position p predicts token p + 1; skip positions already scored (a preempted sequence recomputes)
        first = max(begin, len(seq.prompt_logprobs) - 1)
        last = min(begin + chunk.num_new_tokens, len(prompt) - 1)
        if first >= last:
            return
        logprobs = self.model.compute_logits(hidden[first - begin : last - begin]).float().log_softmax(-1)
        targets = torch.tensor(prompt[first + 1 : last + 1], device=logprobs.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        k = seq.params.prompt_logprobs
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        for row, (token, lp) in enumerate(zip(targets.tolist(), chosen)):
            top = list(zip(top_ids[row].tolist(), top_values[row].tolist())) if k else []
            seq.prompt_logprobs.append(TokenLogprob(token, lp, top))
