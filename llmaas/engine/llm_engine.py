"""LLMEngine: requests in, tokens out. `step()` is schedule -> run -> postprocess.

Synchronous and single-threaded; `AsyncEngine` drives it from a thread for the HTTP server.

Failure isolation: a fault while handling one sequence (its sampling, prompt logprobs, appending its
token, stop matching, detokenizing, building its output) fails that sequence's request alone: it ends
with a finished RequestOutput whose `error` is set, finish_reason "error" on its unfinished choices and
its token counts so far (see outputs.py). Every other request of the step carries on. Only a fault in
the forward pass fails the whole step, and then each of its requests ends the same way, with its
tokens so far; requests not in that step are untouched.

Constrained decoding (params.structured, grammar.py): the grammar is compiled once per StructuredOutput
(cached; AsyncEngine compiles it off this thread and hands it to add_request), each sequence gets its
own matcher, advanced in `_append_token`; a grammar that refuses a token fails that request alone.
A sequence whose grammar is complete (nothing but end-of-sequence may follow) finishes with "stop".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from llmaas.engine import batch_invariance
from llmaas.engine.block_manager import BlockManager
from llmaas.engine.config import EngineConfig
from llmaas.engine.fingerprint import system_fingerprint
from llmaas.engine.grammar import Grammar, GrammarCompiler, GrammarError
from llmaas.engine.model_runner import ModelRunner
from llmaas.engine.outputs import CompletionOutput, RequestOutput
from llmaas.engine.sampling_params import SamplingParams
from llmaas.engine.scheduler import Scheduler
from llmaas.engine.sequence import Sequence, SequenceStatus, TokenLogprob
from llmaas.errors import ContextLengthExceededError, InvalidRequestError
from llmaas.kernels import cpu_ops
from llmaas.models.catalog import resolve_model_dir
from llmaas.models.loader import load_model
from llmaas.models.moe import expert_token_counts, pack_experts
from llmaas.models.packed_linear import pack_linears
from llmaas.models.report import describe_model
from llmaas.models.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("llmaas.engine")


def _refuse_batch_invariance(reason: str | None) -> None:
    if reason is not None:
        raise InvalidRequestError(reason, param="batch_invariant")


MAX_ERROR_DETAIL = 200  # characters of the exception's text passed on in RequestOutput.error


def _failure(what: str, exc: BaseException) -> str:
    detail = str(exc)
    if len(detail) > MAX_ERROR_DETAIL:
        detail = detail[: MAX_ERROR_DETAIL - 3] + "..."
    return f"{what} ({type(exc).__name__}: {detail})" if detail else f"{what} ({type(exc).__name__})"


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig()
        for key, value in overrides.items():
            setattr(config, key, value)
        self.config = config
        dtype, device = config.torch_dtype(), config.torch_device()
        if config.batch_invariant:
            _refuse_batch_invariance(batch_invariance.refusal_before_load(device, dtype, config.quantization))
        t0 = time.perf_counter()
        self.model_dir = resolve_model_dir(config.model)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.model = load_model(self.model_dir, dtype=dtype, device=device)
        # Before quantization and packing, which turn parameters into buffers.
        self.model_report = describe_model(self.model, dtype)
        if config.quantization:
            from llmaas.models.quantize import quantize_model

            quantize_model(self.model, config.quantization, config.batch_invariant)
        if config.pack_weights:
            pack_linears(self.model)
            pack_experts(self.model)
        if device.type == "cpu":
            cpu_ops.available()  # build or load the native kernels now, not inside the first request
        if config.batch_invariant:
            _refuse_batch_invariance(batch_invariance.refusal_for_model(self.model))
        self.load_seconds = time.perf_counter() - t0
        self.model_config = self.model.config
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        self.runner = ModelRunner(
            self.model, config.block_size, config.kv_cache_memory, device, dtype, config.seed,
            max_num_seqs=config.max_num_seqs, enable_prefix_caching=config.enable_prefix_caching,
        )  # fmt: skip
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching, self.runner.states
        )
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self.system_fingerprint = system_fingerprint(
            self.model_dir,
            {
                "dtype": str(dtype),
                "device": device.type,
                "quantization": config.quantization,
                "pack_weights": config.pack_weights,
                "batch_invariant": config.batch_invariant,
                "block_size": config.block_size,
                "max_num_batched_tokens": config.max_num_batched_tokens,
                "max_model_len": self.max_model_len,
                "enable_prefix_caching": config.enable_prefix_caching,
                "seed": config.seed,
            },
        )
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.grammars.warm()
        self.requests: dict[str, _Request] = {}
        self.num_steps = 0
        log.info(
            "loaded %s (%s, %s) in %.2fs: %s; KV cache %d blocks x %d tokens = %.0f MiB",
            config.model,
            self.model_config.family,
            str(dtype).removeprefix("torch."),
            self.load_seconds,
            self.model_report.summary(),
            self.runner.num_blocks,
            config.block_size,
            self.runner.kv_cache_bytes / 2**20,
        )
        if self.runner.states is not None:
            log.info(
                "linear-attention state: %d slots (%d sequences + %d prefix-cache snapshots) x %d bytes "
                "= %.0f MiB, from the same budget as the KV cache",
                self.runner.states.num_slots,
                self.runner.states.num_sequence_slots,
                self.runner.states.num_snapshot_slots,
                self.runner.state_bytes_per_sequence,
                self.runner.state_pool_bytes / 2**20,
            )

    # ----------------------------------------------------------------- requests
    def render_chat(
        self, messages: list[dict], tools: list[dict] | None = None, variables: dict | None = None
    ) -> str:
        """A conversation's prompt text, by the model's own chat template (`tools`: OpenAI's tool list,
        for a template that renders tools itself; `variables`: more template variables, e.g.
        enable_thinking)."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tools=tools, variables=variables
        )

    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; a text provably longer than the context window (more characters than
        the window times the longest token's bytes: `Tokenizer.min_tokens`) is refused before the
        tokenizer runs, so a megabyte prompt costs O(1)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            least, room = self.tokenizer.min_tokens(prompt), self.context_room
            if least is not None and least >= room:
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {room} tokens, but the prompt has at least "
                    f"{least} tokens.",
                    param="prompt",
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(
                    f"prompt token ids must be integers in [0, {vocab})", param="prompt"
                )
        if not ids:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return ids

    @property
    def context_room(self) -> int:
        """The most tokens (prompt + completion) one sequence may have: the window, or the KV cache."""
        return min(self.max_model_len, self.block_manager.num_blocks * self.config.block_size)

    def resolve_max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """Check the context window; None means 'up to the window', like the OpenAI API."""
        room = self.context_room
        if num_prompt_tokens >= room:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {room} tokens, but the prompt has "
                f"{num_prompt_tokens} tokens.",
                param="prompt",
            )
        if params.max_tokens is None:
            return room - num_prompt_tokens
        if num_prompt_tokens + params.max_tokens > room:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {room} tokens. However, you requested "
                f"{num_prompt_tokens + params.max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                f"{params.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )
        return params.max_tokens

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        grammar: Grammar | None = None,
    ) -> list[int]:
        """Validate and queue; raises InvalidRequestError before any work. Returns the prompt token ids.

        `grammar`: params.structured already compiled (AsyncEngine does it off the engine thread);
        without it a structured request is compiled here, within the compiler's time limit."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id '{request_id}' is already in use", param="request_id")
        params.validate(self.model_config.vocab_size)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError("'priority' must be an integer", param="priority")
        prompt_ids = self.tokenize_prompt(prompt)
        max_tokens = self.resolve_max_tokens(len(prompt_ids), params)
        if params.min_tokens:
            eos = () if params.ignore_eos else self.eos_token_ids
            params.min_tokens_banned = tuple(sorted({*eos, *params.stop_token_ids}))
        if params.structured is not None:
            key = (params.structured.kind, params.structured.spec)
            if grammar is None or grammar.key != key:
                grammar = self.grammars.compile(params.structured)
        else:
            grammar = None
        seqs: list[Sequence] = []
        for index in range(params.n):
            seq = Sequence(request_id, index, prompt_ids, params, priority=priority, max_tokens=max_tokens)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.runner.device)
                seq.generator.manual_seed(params.seed + index)  # int64 seed + index < 2**64: in torch's range
            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, skip_special_tokens=params.skip_special_tokens
            )
            seq.leader = seqs[0] if seqs else None
            if grammar is not None:
                seq.matcher = grammar.matcher()
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, prompt_ids, seqs, time.monotonic())
        return prompt_ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Cancel now: blocks are freed at once. Returns the final output (tokens so far) or None."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        try:
            for seq in request.seqs:
                if not seq.is_finished:
                    self._finish(seq, "abort")
            out = self._request_output(request)
        except Exception as exc:  # e.g. its detokenizer's flush: it still ends, with its tokens so far
            log.error("aborting request %s failed", request_id, exc_info=exc)
            return self.fail_requests({request_id: _failure("aborting this request failed", exc)})[0]
        del self.requests[request_id]
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        self.num_steps += 1
        try:
            result = self.runner.run(chunks)
        except Exception as exc:  # the forward pass: no single request is to blame
            in_step = {c.seq.request_id for c in chunks}
            log.exception("forward pass failed; failing the %d request(s) of this step", len(in_step))
            return self.fail_requests(
                {rid: _failure("the forward pass of this step failed", exc) for rid in in_step}
            )
        failed: dict[str, str] = {}
        for seq, exc in result.failed.items():
            self._note_failure(failed, seq.request_id, exc)
        touched: dict[str, _Request] = {}
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_new_tokens
            # Publish filled blocks now: a sequence that finishes below frees its blocks at once.
            self.block_manager.register_full_blocks(seq)
            if (
                seq.max_tokens == 0
                and seq.num_computed_tokens == seq.num_tokens
                and seq.request_id not in failed
            ):
                # Prompt-only (scoring): its prefill computed the prompt logprobs; nothing to sample.
                try:
                    self._finish(seq, "length")
                except Exception as exc:
                    self._note_failure(failed, seq.request_id, exc)
                    continue
                touched[seq.request_id] = self.requests[seq.request_id]
        for seq, token, info in result.sampled:
            if seq.request_id in failed:
                continue
            try:
                self._append_token(seq, token, info)
            except Exception as exc:  # stop matching, detokenizing: this request's fault alone
                self._note_failure(failed, seq.request_id, exc)
                continue
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = []
        for request in touched.values():
            if request.request_id in failed:
                continue
            try:
                out = self._request_output(request)
            except Exception as exc:
                self._note_failure(failed, request.request_id, exc)
                continue
            outputs.append(out)
            if out.finished:
                del self.requests[request.request_id]
        if failed:
            outputs.extend(self.fail_requests(failed))
        return outputs

    @staticmethod
    def _note_failure(failed: dict[str, str], request_id: str, exc: Exception) -> None:
        log.error("request %s failed in the engine", request_id, exc_info=exc)
        failed.setdefault(request_id, _failure("generating this request failed", exc))

    def fail_requests(self, failures: dict[str, str]) -> list[RequestOutput]:
        """End each request (id -> what went wrong) now: finish_reason "error" on its unfinished
        choices, its blocks freed, and a final output with `error` and its tokens so far.

        Touches nothing that may be what failed (no detokenizer, no sampler), so it cannot fail itself
        for the same reason."""
        outputs = []
        for request_id, message in failures.items():
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            for seq in request.seqs:
                if seq.is_finished:
                    continue
                seq.finish_reason, seq.stop_reason = "error", None
                seq.status = SequenceStatus.FINISHED
                seq.matcher = None
                try:
                    self.scheduler.remove(seq)
                except Exception:
                    log.exception("freeing the blocks of failed request %s failed", request_id)
            outputs.append(self._failed_output(request, message))
        return outputs

    @staticmethod
    def _failed_output(request: _Request, message: str) -> RequestOutput:
        seqs = request.seqs
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=s.index,
                    text=s.text[: s.emitted_text_len],  # what was handed out before the fault
                    token_ids=list(s.output_token_ids),
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
                for s in seqs
            ],
            finished=True,
            prompt_tokens=len(request.prompt_token_ids),
            cached_tokens=seqs[0].num_cached_prompt_tokens,
            completion_tokens=sum(len(s.output_token_ids) for s in seqs),
            error=message,
        )

    def _append_token(self, seq: Sequence, token: int, info: TokenLogprob | None) -> None:
        seq.output_token_ids.append(token)
        if info is not None:
            seq.output_logprobs.append(info)
            seq.cumulative_logprob += info.logprob
        params = seq.params
        complete = False
        if seq.matcher is not None:
            if token in self.eos_token_ids:
                if not seq.matcher.is_accepting():  # the mask forbids it there: never an incomplete "stop"
                    raise GrammarError(f"end-of-sequence token {token} where the grammar does not accept")
                return self._finish(seq, "stop", None)
            complete = seq.matcher.advance(token)
        if token in params.stop_token_ids:  # the sampler kept it out before min_tokens
            return self._finish(seq, "stop", token)
        if token in self.eos_token_ids and not params.ignore_eos:
            return self._finish(seq, "stop", None)
        seq.text += seq.detokenizer.add(token)
        if params.stop and len(seq.output_token_ids) >= params.min_tokens and self._cut_at_stop_string(seq):
            return None
        if complete:  # nothing but end-of-sequence may follow: a whole output, even at max_tokens
            return self._finish(seq, "stop", None)
        if len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(seq, "length")
        return None

    def _cut_at_stop_string(self, seq: Sequence) -> bool:
        params = seq.params
        longest = max(len(s) for s in params.stop)
        search_from = max(0, seq.emitted_text_len - longest)
        best = None
        for stop in params.stop:
            idx = seq.text.find(stop, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        idx, stop = best
        seq.text = seq.text[: idx + (len(stop) if params.include_stop_str_in_output else 0)]
        self._finish(seq, "stop", stop)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        if not isinstance(stop_reason, str):  # a cut at a stop string must not be undone
            seq.text += seq.detokenizer.flush()
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        seq.status = SequenceStatus.FINISHED
        seq.matcher = None  # its grammar state is freed with the request's blocks
        self.scheduler.remove(seq)

    def _completion_output(self, seq: Sequence) -> CompletionOutput:
        # Hold back text that may turn out to be the start of a stop string, so it never leaks.
        holdback = 0 if seq.is_finished or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
        emit_to = max(seq.emitted_text_len, len(seq.text) - holdback)
        delta_text = seq.text[seq.emitted_text_len : emit_to]
        delta_tokens = seq.output_token_ids[seq.emitted_token_count :]
        delta_logprobs = seq.output_logprobs[seq.emitted_token_count :]
        seq.emitted_text_len, seq.emitted_token_count = emit_to, len(seq.output_token_ids)
        want_logprobs = seq.params.logprobs is not None
        return CompletionOutput(
            index=seq.index,
            text=seq.text,
            token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=list(seq.output_logprobs) if want_logprobs else None,
            cumulative_logprob=seq.cumulative_logprob if want_logprobs else None,
            delta_text=delta_text,
            delta_token_ids=delta_tokens,
            delta_logprobs=delta_logprobs,
        )

    def _request_output(self, request: _Request) -> RequestOutput:
        seqs = request.seqs
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[self._completion_output(s) for s in seqs],
            finished=all(s.is_finished for s in seqs),
            prompt_tokens=len(request.prompt_token_ids),
            cached_tokens=seqs[0].num_cached_prompt_tokens,
            completion_tokens=sum(len(s.output_token_ids) for s in seqs),
            prompt_logprobs=seqs[0].prompt_logprobs if seqs[0].params.prompt_logprobs is not None else None,
        )

    def stats(self) -> dict[str, float | dict[int, list[int]]]:
        bm = self.block_manager
        stats = {
            "running": self.num_running,
            "waiting": self.num_waiting,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_total": bm.num_blocks,
            "prefix_cache_hit_rate": bm.prefix_hit_rate,
            "preemptions": self.scheduler.num_preemptions,
        }
        expert_tokens = self.expert_token_counts()
        if expert_tokens:  # MoE models only
            stats["expert_tokens"] = expert_tokens
        return stats

    def expert_token_counts(self) -> dict[int, list[int]]:
        """MoE load balance: tokens routed to each expert of each MoE layer since start ({} if dense)."""
        return expert_token_counts(self.model)
