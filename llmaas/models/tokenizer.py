"""Text <-> token ids, chat templates, and streaming detokenization.

Run-time dependencies are only `tokenizers` and jinja2 (transformers is a test oracle, not a runtime
dependency). Works on any HF-format directory: ours from gguf_convert, or one saved by transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from llmaas.errors import InvalidRequestError, ModelLoadError

# Roles the OpenAI protocol sends. "developer" is OpenAI's newer name for "system".
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# Texts longer than this are tokenized without holding the GIL (Tokenizer.encode).
_LONG_TEXT = 4096

# Turn-end tokens: when the chat template writes one and the vocabulary has it, generation stops on it.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable JSON ({exc})", param="model") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _load_chat_template(path: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The default chat template: tokenizer_config.json, or chat_template.jinja/.json (newer layouts)."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template:
        return template
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) and template else None


def _make_jinja_env() -> Any:
    """A sandboxed environment shaped like transformers' so templates render the same way."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class SafeNamespace(jinja2.utils.Namespace):
        # Refuse dunder/underscore attributes on namespaces: a known path out of the sandbox.
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = SafeNamespace
    return env


def _flatten_content(content: Any, index: int) -> str:
    """OpenAI content: a string, or a list of parts; text parts are joined with newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            where = f"messages[{index}].content[{j}]"
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                shown = repr(kind) if isinstance(part, dict) else type(part).__name__
                raise InvalidRequestError(
                    f"{where}: only parts of type 'text' are supported, got {shown}", param=f"{where}.type"
                )
            if not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"{where}: a part of type 'text' needs a string 'text' field", param=f"{where}.text"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequestError(
        f"messages[{index}].content must be a string or a list of text parts",
        param=f"messages[{index}].content",
    )


def normalize_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Validated copies of chat messages with string content, ready for a chat template."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role {role!r} is not one of {', '.join(CHAT_ROLES)}", param="messages"
            )
        content = message.get("content")
        if content is None:
            # An assistant turn that only calls tools may have no content.
            if role == "assistant" and message.get("tool_calls"):
                content = ""
            else:
                raise InvalidRequestError(f"messages[{i}].content is missing", param="messages")
        copy = dict(message)
        copy["role"] = "system" if role == "developer" else role
        copy["content"] = _flatten_content(content, i)
        out.append(copy)
    return out


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids and chat template a model directory declares."""

    def __init__(
        self,
        backend: Any,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
        name: str = "",
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.chat_template = chat_template
        # Passed to the template as bos_token=..., like transformers; unset ones stay undefined.
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.name = name

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and the special ids from config.json, generation_config.json and
        tokenizer_config.json of a model directory."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(f"{path}: no tokenizer.json", param="model")
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ModelLoadError(f"{file}: unreadable tokenizer ({exc})", param="model") from exc
        # A file's truncation and padding are training-time settings (all-MiniLM-L6-v2's: 128 tokens,
        # padded to 128): they would cut and pad every text here, where callers bound tokens themselves.
        backend.no_truncation()
        backend.no_padding()
        config = _read_json(path / "config.json")
        generation = _read_json(path / "generation_config.json")
        tok_config = _read_json(path / "tokenizer_config.json")
        chat_template = _load_chat_template(path, tok_config)
        special = {
            k: _token_text(tok_config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }

        def token_id(text: str | None) -> int | None:
            return backend.token_to_id(text) if text else None

        bos = token_id(special["bos_token"])
        if bos is None:
            bos = generation.get("bos_token_id", config.get("bos_token_id"))
        eos: set[int] = set(_ids(generation.get("eos_token_id"))) | set(_ids(config.get("eos_token_id")))
        if (eos_id := token_id(special["eos_token"])) is not None:
            eos.add(eos_id)
        if chat_template:
            for text in TURN_END_TOKENS:
                if text in chat_template and (tid := token_id(text)) is not None:
                    eos.add(tid)
        tokenizer = cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos,
            chat_template=chat_template,
            special_tokens=special,
            name=str(path),
        )
        # Computed now, while loading: the first request must not pay ~0.3 s holding the GIL for it.
        tokenizer.min_tokens("")
        return tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. from a chat template) are matched."""
        if len(text) > _LONG_TEXT:
            # `encode` keeps the GIL for the whole call (measured: 0.8 s for 650k characters, during
            # which the server's event loop got 12 turns); the batch calls release it, same ids. The
            # fast one (tokenizers >= 0.21) skips character offsets: half the memory (46 vs 85 MB here).
            batch = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
            return batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (chat markers, eos) are dropped unless asked for."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry such as "<|im_end|>", or None (for stop strings, special ids)."""
        return self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, even when they are not a whole UTF-8 character (the first
        half of an emoji decodes to U+FFFD; its bytes are still exact). For logprobs' `bytes`."""
        token = self.backend.id_to_token(token_id)
        if token is None:
            return b""
        if token_id in self._added_token_ids:
            return token.encode("utf-8")
        byte_of = self._byte_level_chars
        if byte_of is not None:
            if all(ch in byte_of for ch in token):
                return bytes(byte_of[ch] for ch in token)
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:  # sentencepiece byte
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        else:
            return token.replace("\u2581", " ").encode("utf-8")  # sentencepiece's word-start marker
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def min_tokens(self, text: str) -> int | None:
        """A lower bound on len(encode(text)) that costs O(1), or None when this tokenizer gives none.

        No token stands for more than `_longest_token_bytes` bytes of (normalized) text, and text has
        at least one UTF-8 byte per character, so it needs at least len(text) / longest tokens. Only
        valid when normalization never shrinks text (no normalizer, or prepend / longer replacements):
        a too-long prompt is then refused before it is tokenized, and a prompt that may fit never is.
        """
        longest = self._longest_token_bytes
        if longest is None:
            return None
        return -(-len(text) // longest)

    @cached_property
    def _longest_token_bytes(self) -> int | None:
        spec = json.loads(self.backend.to_str())

        def never_shrinks(normalizer: dict[str, Any] | None) -> bool:
            if normalizer is None:
                return True
            kind = normalizer.get("type")
            if kind == "Sequence":
                return all(never_shrinks(n) for n in normalizer.get("normalizers", []))
            if kind == "Prepend":
                return True
            if kind == "Replace":
                pattern = normalizer.get("pattern") or {}
                literal = pattern.get("String")
                return isinstance(literal, str) and len(normalizer.get("content", "").encode()) >= len(
                    literal.encode()
                )
            return False

        if not never_shrinks(spec.get("normalizer")):
            return None
        byte_of = self._byte_level_chars
        added = {token.content for token in self.backend.get_added_tokens_decoder().values()}

        def covers(token: str) -> int:
            # Byte-level BPE spells each byte as one character; otherwise a token's UTF-8 spelling is at
            # least as long as the text it stands for (metaspace: a 3-byte U+2581 per space; byte
            # fallback: "<0x0A>" for one byte).
            if byte_of is not None and token not in added and all(ch in byte_of for ch in token):
                return len(token)
            return len(token.encode("utf-8"))

        vocab = self.backend.get_vocab(with_added_tokens=True)
        return max((covers(token) for token in vocab), default=0) or None

    @cached_property
    def _added_token_ids(self) -> frozenset[int]:
        return frozenset(self.backend.get_added_tokens_decoder())

    @cached_property
    def _byte_level_chars(self) -> dict[str, int] | None:
        """Byte-level BPE (GPT-2 style) writes each byte as one printable character: that map,
        reversed; None for other tokenizers."""
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        if not any(part.get("type") == "ByteLevel" for part in parts):
            return None
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
        chars = {b: chr(b) for b in printable}
        shifted = 256
        for b in range(256):
            if b not in chars:
                chars[b], shifted = chr(shifted), shifted + 1
        return {ch: b for b, ch in chars.items()}

    @cached_property
    def _compiled_template(self) -> Any:
        import jinja2

        if not self.chat_template:
            raise InvalidRequestError(
                f"model {self.name or '(unnamed)'} has no chat template; send a plain completion prompt",
                param="messages",
            )
        try:
            return _make_jinja_env().from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(
                f"{self.name}: chat template does not compile ({exc})", param="model"
            ) from exc

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        variables: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text for a conversation, rendered the way transformers renders it (`tools`: OpenAI's
        tool list, for a template that renders tools itself; `variables`: more template variables, such
        as vLLM's chat_template_kwargs, never overriding the ones set here)."""
        import jinja2

        template = self._compiled_template
        chat = normalize_messages(messages)
        try:
            return template.render(
                **(variables or {}),
                messages=chat,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:  # raise_exception(...) in the template, or bad message shape
            raise InvalidRequestError(
                f"chat template rejected the messages: {exc}", param="messages"
            ) from exc


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces, for streaming responses.

    Decodes a short window of recent ids rather than everything (O(1) per token), and holds text back
    while it ends in U+FFFD: a multi-byte character split across tokens must not be sent half-done.
    The pieces, joined, equal `tokenizer.decode(all_ids)` (after `flush()`).
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything returned so far
        self._prefix_offset = 0  # window start: earlier ids are already fully emitted
        self._read_offset = 0  # ids before this are reflected in self.text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Feed one id; returns the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        window = self._decode(self.ids[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return ""
        piece = window[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        self.text += piece
        return piece

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Feed several ids at once (a step that produced more than one); returns their new text."""
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back (e.g. a truly invalid byte sequence)."""
        full = self._decode(self.ids)
        if full.startswith(self.text):
            piece = full[len(self.text) :]
        else:  # cannot happen for byte-level BPE; fall back to the window's tail
            piece = self._decode(self.ids[self._prefix_offset :])[
                len(self._decode(self.ids[self._prefix_offset : self._read_offset])) :
            ]
        self._prefix_offset = self._read_offset = len(self.ids)
        self.text += piece
        return piece
