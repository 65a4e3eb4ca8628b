"""Constrained decoding: a request's output held to a JSON schema, a regex, choices or a grammar.

The grammar library is llguidance (a Rust Earley parser with a lazy lexer; a token mask for a 49k
vocabulary costs tens of microseconds). The pieces:

- `StructuredOutput` (structured.py): what a request asks for; a hashable value (the server builds it).
- `GrammarCompiler`: StructuredOutput -> `Grammar`, once per value (an LRU cache), in worker threads,
  with a time limit. Everything the matcher cannot enforce is refused here, before any work, as an
  `InvalidRequestError` naming the request field (`StructuredOutput.param`), the keyword and its
  JSON path: never silently unconstrained output (fail closed).
- `GrammarMatcher`: one per sequence (n samples: one each), advanced by the engine on every token.
- `fill_masks` / `TokenMasks`: the allowed tokens of a step's constrained rows, which the sampler
  applies before penalties, bias, temperature and top-k/p. End-of-sequence is allowed only where the
  grammar accepts.

JSON is generated in one fixed spelling: `{"a": 1, "b": [1, 2]}` (Python's json.dumps separators, no
other whitespace). Free whitespace would let a small model pad forever (newlines until max_tokens,
a common complaint against other servers); this spelling is also what models mostly write anyway.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import llguidance
import numpy as np
import torch

from llmaas.engine.structured import StructuredOutput, check_structured
from llmaas.errors import EngineOverloadedError, InvalidRequestError
from llmaas.models.tokenizer import Tokenizer

log = logging.getLogger("llmaas.engine")

COMPILE_TIMEOUT_S = 2.0  # a grammar that takes longer to build is refused (400): never a stalled engine
MAX_CHOICES = 4096
GRAMMAR_CACHE_SIZE = 256  # compiled grammars kept (LRU), refusals included
COMPILE_WORKERS = 2  # builds run at once; llguidance's own limits bound each one's time and memory
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ERROR_DETAIL = 300  # characters of llguidance's message passed on to the client

# Keywords whose value is a subschema, a list of subschemas or a map of name -> subschema: where the
# walk that locates an unsupported keyword looks for nested schemas (never inside const/enum/default).
_SUBSCHEMA = (
    "items",
    "additionalItems",
    "additionalProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
)
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


class GrammarError(Exception):
    """A sampled token the grammar refused, or a matcher in its error state: fails that request alone."""


class Grammar:
    """One compiled StructuredOutput: a matcher in its start state, copied for each sequence."""

    __slots__ = ("key", "_start")

    def __init__(self, key: tuple[str, str], start: Any):
        self.key = key
        self._start = start

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._start.deep_copy())


class GrammarMatcher:
    """The grammar state of one sequence: advanced on every appended token."""

    __slots__ = ("inner",)

    def __init__(self, inner: Any):
        self.inner = inner

    def advance(self, token: int) -> bool:
        """Consume `token`; True when the output is complete (nothing but end-of-sequence may follow)."""
        if not self.inner.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self.inner.get_error()[:_ERROR_DETAIL]}")
        return self.inner.is_stopped()

    def is_accepting(self) -> bool:
        return self.inner.is_accepting()

    def check(self) -> None:
        """Raise GrammarError if the matcher is in its error state (it then never leaves it)."""
        if self.inner.is_error():
            raise GrammarError(f"the grammar matcher failed: {self.inner.get_error()[:_ERROR_DETAIL]}")


# ------------------------------------------------------------------------------------------- masks
_executor: Any = None
_executor_lock = threading.Lock()


def _mask_executor() -> Any:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        return _executor


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_masks(rows: int, vocab_size: int) -> torch.Tensor:
    """Packed masks (one bit per token, int32 words) for `rows` constrained rows, all allowed."""
    return torch.full((rows, mask_words(vocab_size)), -1, dtype=torch.int32)


def fill_masks(matchers: list[GrammarMatcher], packed: torch.Tensor) -> None:
    """Write each matcher's allowed tokens into its row of `packed` (llguidance's threads, GIL released)."""
    executor = _mask_executor()
    executor.unsafe_compute_mask_ptr(
        [(m.inner, row) for row, m in enumerate(matchers)],
        packed.data_ptr(),
        packed.shape[1] * 4,
        packed.shape[0],
    )


def fill_mask(matcher: GrammarMatcher, packed: torch.Tensor, row: int) -> None:
    """One row (the fallback that pins a failure on one sequence)."""
    target = packed[row]
    matcher.inner.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)


# byte value -> the additive bias of its 8 tokens (bit set: 0, allowed; clear: -inf, forbidden).
_BYTE_BIAS = np.array(
    [[0.0 if (byte >> bit) & 1 else -np.inf for bit in range(8)] for byte in range(256)], dtype=np.float32
)


def empty_rows(packed: torch.Tensor) -> list[int]:
    """Rows of `packed` in which no token at all is allowed."""
    return [i for i, ok in enumerate((packed != 0).any(-1).tolist()) if not ok]


def mask_bias(packed: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[R, words] int32 bits -> [R, vocab] float32: 0 where allowed, -inf where forbidden.

    An additive bias rather than a boolean mask: adding it is branch-free, while a masked_fill or
    torch.where with a mask as irregular as a grammar's costs ~4 ns a token in mispredicted branches
    (measured: 200 us against 9 us per 49k-token row on this 2-core machine). One table look-up per
    byte builds it (llguidance's bit order is little-endian: token 8k + b is bit b of byte k)."""
    table = np.take(_BYTE_BIAS, packed.numpy().view(np.uint8), axis=0)  # [R, words * 4, 8]
    bias = torch.from_numpy(table.reshape(packed.shape[0], -1)[:, :vocab_size])
    return bias.to(device, non_blocking=True)


class TokenMasks:
    """The allowed tokens of the constrained rows of one sampling batch, as an additive bias."""

    __slots__ = ("rows", "bias")

    def __init__(self, rows: list[int], bias: torch.Tensor):
        self.rows = rows  # batch rows, in order
        self.bias = bias  # [len(rows), vocab] float: 0 allowed, -inf forbidden

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of `logits` with every token the grammar forbids at -inf."""
        if len(self.rows) == logits.shape[0]:
            return logits + self.bias
        index = torch.tensor(self.rows, dtype=torch.long, device=logits.device)
        return logits.index_add(0, index, self.bias)

    def for_row(self, row: int) -> TokenMasks | None:
        """The mask of batch row `row` alone, as row 0 (for sampling one row), or None if unconstrained."""
        try:
            i = self.rows.index(row)
        except ValueError:
            return None
        return TokenMasks([0], self.bias[i : i + 1])


# ---------------------------------------------------------------------------------------- compiling
class _Entry:
    """A cache slot: the build's future, and when the build started (None while it queues)."""

    __slots__ = ("future", "started")

    def __init__(self) -> None:
        self.future: Future = Future()
        self.started: float | None = None


class GrammarCompiler:
    """StructuredOutput -> Grammar for one tokenizer: cached, built in worker threads, time-limited.

    Thread-safe: the engine thread (LLM.generate's inline path) and the server's event loop (through
    AsyncEngine.submit) both call it. A build that outlives `timeout_s` is refused; its result is
    cached as that refusal, so the same schema sent again is refused at once instead of building again.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        *,
        timeout_s: float = COMPILE_TIMEOUT_S,
        cache_size: int = GRAMMAR_CACHE_SIZE,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=COMPILE_WORKERS, thread_name_prefix="llmaas-grammar")
        self._ll_tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self.num_builds = 0  # grammars actually built (not served from the cache)

    def warm(self) -> None:
        """Build llguidance's view of the vocabulary in the background (about 0.25 s for 49k tokens),
        so the first structured request does not pay for it."""
        self._pool.submit(self._lltokenizer)

    def _lltokenizer(self) -> Any:
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self.tokenizer.backend.to_str(),
                    n_vocab=self.vocab_size,
                    eos_token=self.eos_token_ids or None,
                )
            return self._ll_tokenizer

    def special_token_id(self, text: str) -> int | None:
        """The id of `text` when it is one token that the matcher treats as special (Mistral's
        "[TOOL_CALLS]", Llama's "<|python_tag|>", an added "<tool_call>"): a grammar must name such a
        token by id (`<[id]>`), since no string literal ever matches it. None otherwise."""
        token_id = self.tokenizer.token_to_id(text)
        if token_id is None or not 0 <= token_id < self.vocab_size:
            return None
        return token_id if self._lltokenizer().is_special_token(token_id) else None

    def start(self, structured: StructuredOutput) -> _Entry:
        """The cache entry for `structured`, its build queued if it is new."""
        check_structured(structured)
        key = (structured.kind, structured.spec)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                return entry
            entry = self._cache[key] = _Entry()
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._pool.submit(self._build, key, entry)
        return entry

    def compile(self, structured: StructuredOutput) -> Grammar:
        """Blocking: the compiled grammar, or InvalidRequestError naming `structured.param`."""
        entry = self.start(structured)
        try:
            outcome = entry.future.result(timeout=self.timeout_s)
        except FutureTimeout:
            outcome = self._overdue(entry)
        return self._unwrap(outcome, structured)

    async def compile_async(self, structured: StructuredOutput) -> Grammar:
        """The same without blocking the event loop (AsyncEngine.submit awaits it)."""
        import asyncio

        entry = self.start(structured)
        if not entry.future.done():
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(entry.future)), self.timeout_s)
            except asyncio.TimeoutError:
                return self._unwrap(self._overdue(entry), structured)
        return self._unwrap(entry.future.result(), structured)

    def _overdue(self, entry: _Entry) -> str:
        if entry.started is None:  # still queued behind other builds: the compiler is busy, not the schema
            raise EngineOverloadedError("the grammar compiler is busy; retry shortly")
        return f"building the grammar took longer than {self.timeout_s:g} s (the limit)"

    @staticmethod
    def _unwrap(outcome: Grammar | str, structured: StructuredOutput) -> Grammar:
        if isinstance(outcome, Grammar):
            return outcome
        raise InvalidRequestError(f"{structured.param}: {outcome}", param=structured.param)

    def _build(self, key: tuple[str, str], entry: _Entry) -> None:
        try:
            ll_tokenizer = self._lltokenizer()
            entry.started = time.monotonic()
            outcome = self._build_grammar(key, ll_tokenizer)
            if time.monotonic() - entry.started > self.timeout_s:
                outcome = f"building the grammar took longer than {self.timeout_s:g} s (the limit)"
        except Exception as exc:  # a bug here must not leave waiters hanging
            log.exception("building a grammar failed")
            outcome = f"the grammar could not be built ({type(exc).__name__})"
        self.num_builds += 1
        entry.future.set_result(outcome)

    def _build_grammar(self, key: tuple[str, str], ll_tokenizer: Any) -> Grammar | str:
        """The Grammar, or why not (a message for the client)."""
        kind, spec = key
        schema: Any = None
        if kind in ("json_schema", "json_object"):
            if kind == "json_object":
                schema = {"type": "object"}
            else:
                try:
                    schema = json.loads(spec)
                except ValueError as exc:
                    return f"the JSON schema is not valid JSON ({exc})"
                if not isinstance(schema, (dict, bool)):
                    return "the JSON schema must be an object (or true / false)"
            source = llguidance.LLMatcher.grammar_from_json_schema(
                schema if isinstance(schema, dict) else json.dumps(schema), overrides=JSON_OPTIONS
            )
        elif kind == "regex":
            source = llguidance.LLMatcher.grammar_from_regex(spec)
        elif kind == "choice":
            problem = _check_choices(spec)
            if problem:
                return problem
            source = llguidance.grammar_from("choice", spec)
        else:
            try:
                source = llguidance.grammar_from("grammar", spec)
            except ValueError as exc:
                return f"the grammar is not valid Lark or GBNF ({str(exc)[:_ERROR_DETAIL]})"
        matcher = llguidance.LLMatcher(ll_tokenizer, source, log_level=0)
        if matcher.is_error():
            return _explain(kind, schema, [matcher.get_error()])
        warnings = matcher.get_grammar_warnings()
        if warnings:  # a warning means something would go unenforced: refused too (fail closed)
            return _explain(kind, schema, warnings)
        return Grammar(key, matcher)


def _check_choices(spec: str) -> str | None:
    try:
        choices = json.loads(spec)
    except ValueError:
        return "the choices must be a JSON list of strings"
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        return "the choices must be a non-empty list of non-empty strings"
    if len(choices) > MAX_CHOICES:
        return f"at most {MAX_CHOICES} choices, got {len(choices)}"
    return None


# --------------------------------------------------------------------------- explaining a refusal
def _explain(kind: str, schema: Any, messages: list[str]) -> str:
    """A client-facing reason: for a JSON schema, the unsupported keyword and where it is."""
    message = (messages[0] if messages else "unknown error").strip()
    if kind == "json_schema" and isinstance(schema, dict):
        if message.startswith("Unimplemented keys:"):
            try:
                names = json.loads(message.removeprefix("Unimplemented keys:").strip())
            except ValueError:
                names = []
            for name in names:
                path = next(_keyword_paths(schema, lambda k, v, name=name: k == name), None)
                if path is not None:
                    return (
                        f"the JSON schema keyword '{name}' at '{path}' is not supported "
                        f"(constrained decoding cannot enforce it)"
                    )
        if message.startswith("Unknown format:"):
            fmt = message.removeprefix("Unknown format:").strip()
            path = next(_keyword_paths(schema, lambda k, v: k == "format" and v == fmt), None)
            if path is not None:
                return f"the JSON schema keyword 'format' at '{path}' has a format we cannot enforce: '{fmt}'"
        if "oneOf" in message:
            path = next(_keyword_paths(schema, lambda k, v: k == "oneOf"), None)
            if path is not None:
                return (
                    f"the JSON schema keyword 'oneOf' at '{path}' is not supported where its options "
                    f"can overlap (exactly one must match; use anyOf, or make the options disjoint)"
                )
        if "not present in a registry" in message or "Resource" in message:
            external = lambda k, v: k == "$ref" and isinstance(v, str) and not v.startswith("#")  # noqa: E731
            path = next(_keyword_paths(schema, external), None)
            if path is not None:
                return (
                    f"the JSON schema keyword '$ref' at '{path}' points outside the schema; only references "
                    f"within it ('#/$defs/...') can be enforced"
                )
        if "regex" in message:
            for path, pattern in _bad_patterns(schema):
                return (
                    f"the JSON schema keyword 'pattern' at '{path}' is a regular expression we cannot "
                    f"enforce ({pattern!r}): {_first_line_after_error(message)}"
                )
    names = {"regex": "regular expression", "choice": "choice list", "grammar": "grammar"}
    what = names.get(kind, "JSON schema")
    return f"the {what} cannot be enforced: {message[:_ERROR_DETAIL]}"


def _first_line_after_error(message: str) -> str:
    for line in message.splitlines():
        if line.strip().startswith("error:"):
            return line.strip().removeprefix("error:").strip()
    return message.splitlines()[0][:_ERROR_DETAIL]


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _keyword_paths(schema: Any, match: Any, path: str = "#") -> Iterator[str]:
    """JSON pointers (as '#/properties/a') of the schema objects holding a keyword for which
    match(keyword, value) is true; only schema positions are searched, never const/enum values."""
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if match(key, value):
            yield path
    for key in _SUBSCHEMA:
        if isinstance(schema.get(key), dict):
            yield from _keyword_paths(schema[key], match, f"{path}/{_escape(key)}")
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                yield from _keyword_paths(sub, match, f"{path}/{_escape(key)}/{i}")
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                yield from _keyword_paths(sub, match, f"{path}/{_escape(key)}/{_escape(str(name))}")


def _bad_patterns(schema: dict) -> Iterator[tuple[str, str]]:
    """The `pattern`s that llguidance refuses on their own (to name the one at fault)."""
    for path in _keyword_paths(schema, lambda k, v: k == "pattern" and isinstance(v, str)):
        node = _resolve(schema, path)
        pattern = node["pattern"]
        source = llguidance.LLMatcher.grammar_from_json_schema({"type": "string", "pattern": pattern})
        if llguidance.LLMatcher.validate_grammar_with_warnings(source)[0]:
            yield path, pattern


def _resolve(schema: Any, path: str) -> Any:
    node = schema
    for part in path.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node
