"""llmaas finetune: only assistant tokens are targets; LoRA is merged on save; bad lines are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmaas.distill.finetune import FinetuneConfig, encode_conversation, read_conversations, run_finetune
from llmaas.errors import InvalidRequestError
from llmaas.models.tokenizer import Tokenizer
from tests.model_factory import make_tiny_checkpoint
from tests.torch_threads import one_torch_thread  # noqa: F401  (autouse: one thread here)

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How are you?"},
    ],
    [
        {"role": "user", "content": "What is 1+2?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("ft"))


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    return path


def test_only_assistant_tokens_are_targets(model):
    tok = Tokenizer.from_dir(model)
    example = encode_conversation(tok, CONVERSATIONS[1])
    target_text = tok.decode(
        [i for i, t in zip(example.ids, example.targets) if t], skip_special_tokens=False
    )
    context_text = tok.decode(
        [i for i, t in zip(example.ids, example.targets) if not t], skip_special_tokens=False
    )
    assert target_text == "3<|im_end|>\n4<|im_end|>\n"
    assert "What is 1+2?" in context_text and "And 2+2?" in context_text and "assistant" in context_text
    assert "3" not in context_text and "4" not in context_text


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_writes_a_model_the_engine_serves(model, data, tmp_path, lora):
    out = tmp_path / "tuned"
    summary = run_finetune(
        FinetuneConfig(model=str(model), data=str(data), out=str(out), lora=lora, steps=4, batch_size=2,
                       lr=1e-2, progress=False)
    )  # fmt: skip
    assert summary["steps"] == 4 and summary["last_loss"] < summary["first_loss"]
    tok = Tokenizer.from_dir(model)
    assert summary["assistant_tokens"] == sum(sum(encode_conversation(tok, c).targets) for c in CONVERSATIONS)
    if lora:
        assert summary["trainable_parameters"] < 50_000  # adapters only
    from llmaas.llm import LLM

    out_text = LLM(str(out), dtype="float32").chat([{"role": "user", "content": "Hello there"}])
    assert out_text[0].completion_tokens > 0
    names = set(json.loads((out / "config.json").read_text()))
    assert "num_hidden_layers" in names and not list(out.glob("adapter_*"))  # merged, no adapter files


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"messages": CONVERSATIONS[0]}), "{not json", json.dumps({"messages": []})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidRequestError, match="bad.jsonl line 2: not valid JSON"):
        read_conversations(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(InvalidRequestError, match="line 1: no assistant message"):
        read_conversations(path)
    with pytest.raises(InvalidRequestError, match="does not exist"):
        read_conversations(tmp_path / "missing.jsonl")
