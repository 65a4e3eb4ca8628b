"""A request's prompts -> token ids: the CPU work of a request before the engine, run in a worker thread.

It runs after the request took its rate-limit slot (server/billing.py `ServerBilling.begin`) and never
on the event loop: a chat template over megabytes of messages, or tokenizing them, takes long enough
(hundreds of ms per MB) to stall every other connection if it ran there. A prompt that is provably
longer than the context window (`Tokenizer.min_tokens`) is refused before it is tokenized at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from llmaas.engine.llm_engine import LLMEngine
from llmaas.engine.sampling_params import SamplingParams
from llmaas.errors import ContextLengthExceededError

Prompt = str | list[int]
# The prompts, or a function that makes them (chat: renders the template); called in the worker thread.
PromptSource = Sequence[Prompt] | Callable[[], Sequence[Prompt]]


def tokenize_prompts(engine: LLMEngine, source: PromptSource, params: SamplingParams) -> list[list[int]]:
    """Token ids of each prompt (texts are tokenized, id lists checked), each checked against the
    context window with `params.max_tokens` (the engine's rule). Raises 400s naming `prompt` or
    `max_tokens`, before the request's tokens are taken from its rate limit."""
    prompts = source() if callable(source) else source
    room = engine.context_room
    token_ids = []
    for prompt in prompts:
        least = engine.tokenizer.min_tokens(prompt) if isinstance(prompt, str) else len(prompt)
        if least is not None and least >= room:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {room} tokens, but the prompt has at least "
                f"{least} tokens.",
                param="prompt",
            )
        ids = engine.tokenize_prompt(prompt)
        engine.resolve_max_tokens(len(ids), params)
        token_ids.append(ids)
    return token_ids
