"""Prompts for a load run: synthetic ones of exact token lengths, or prompts read from a file.

Synthetic prompts are text (every OpenAI-compatible server takes text; not all take token ids). Each is
an optional shared prefix (the same for every prompt: the system-prompt case, where prefix caching
pays) followed by a unique part: a request number, then a slice of plain prose. The unique part is grown
or shrunk until the whole text encodes to exactly the wanted number of tokens with the model's
tokenizer (tokens can merge where two pieces meet, so the check is on the whole text).

Which tokenizer: `--tokenizer` if given, else the model name when it resolves locally (a catalog name
such as smollm2-135m, an HF-format directory or a .gguf file), so lengths are exact for the model being
served. For a model we cannot resolve (another server's model), the default model's tokenizer is used
and the lengths are marked approximate; the server's reported prompt_tokens then show the real ones.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from llmaas.errors import InvalidRequestError, LlmaasError

DEFAULT_TOKENIZER_MODEL = "smollm2-135m"

# Original prose, the raw material of synthetic prompts (no download needed).
PROSE = """\
The lighthouse keeper wrote the weather into a blue ledger every evening, the way her mother had, and
her grandfather before that. Wind from the west meant the fishing boats would come home early; fog from
the south meant the bell had to be rung every two minutes until morning. In the long winters she mended
nets for the harbour families and read the same six novels in turn, and in summer she sold postcards to
visitors who climbed the spiral stair and complained about their knees. The town below changed slowly.
A bakery opened where the chandler had been, the school gained a second storey, and the old quay was
rebuilt in concrete after the storm that took half the boats. Engineers came from the capital to ask
whether the light could run itself, and she showed them the ledgers: forty years of wind and fog, of
ships that had passed and ships that had not. They measured the tower, counted the steps, photographed
the lamp and its great glass lens, and went away to write a report that nobody in the town ever read.
Two winters later an automatic lamp arrived on a lorry, with a small grey box that would call the coast
guard if the light ever failed. She kept writing the ledger anyway, because the weather had not stopped
and somebody ought to notice it, and because the boats still came home early when the wind was west.
"""

SYSTEM_HEADER = "You are a careful assistant. Read the notes below, then answer the question that follows.\n"


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a run and how their lengths were obtained."""

    prompts: list[str]
    token_lengths: list[int]  # by our tokenizer
    tokenizer: str  # what counted them
    exact: bool  # True when `tokenizer` is the served model's own
    shared_prefix_len: int
    source: str  # "synthetic" or the prompts file


def load_tokenizer(model: str, tokenizer: str | None):
    """(Tokenizer, name, exact): the named tokenizer, else the model's own when it resolves locally,
    else the default model's (lengths then approximate)."""
    from llmaas.models.catalog import resolve_model_dir
    from llmaas.models.tokenizer import Tokenizer

    if tokenizer is not None:
        try:
            return Tokenizer.from_dir(resolve_model_dir(tokenizer, progress=False)), tokenizer, True
        except LlmaasError as exc:
            raise InvalidRequestError(
                f"cannot load tokenizer {tokenizer!r}: {exc.message}", "tokenizer"
            ) from None
    try:
        return Tokenizer.from_dir(resolve_model_dir(model, progress=False)), model, True
    except LlmaasError:
        pass
    try:
        tok = Tokenizer.from_dir(resolve_model_dir(DEFAULT_TOKENIZER_MODEL, progress=False))
    except LlmaasError as exc:
        raise InvalidRequestError(
            f"no tokenizer for {model!r} and the default model's is unavailable ({exc.message}); "
            "pass --tokenizer DIR_OR_GGUF",
            "tokenizer",
        ) from None
    return tok, f"{DEFAULT_TOKENIZER_MODEL} (approximate for {model})", False


def _exact_text(tok, head: list[int], body: list[int], target: int) -> tuple[str, int]:
    """Text of head + body[:k], with k chosen so the text encodes to `target` tokens when possible.

    Returns the text and its token count (== target unless no k hits it exactly).
    """
    k = max(0, target - len(head))
    best: tuple[int, str, int] | None = None
    seen: set[int] = set()
    for _ in range(40):
        if k in seen or k < 0 or k > len(body):
            break
        seen.add(k)
        text = tok.decode(head + body[:k], skip_special_tokens=False)
        n = len(tok.encode(text))
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), text, n)
        if n == target:
            return text, n
        k += target - n
    # Oscillating at a merge: try the neighbours of the last guesses.
    for k2 in sorted({s + d for s in seen for d in (-2, -1, 1, 2)} - seen):
        if 0 <= k2 <= len(body):
            text = tok.decode(head + body[:k2], skip_special_tokens=False)
            n = len(tok.encode(text))
            if abs(n - target) < best[0]:
                best = (abs(n - target), text, n)
            if n == target:
                break
    return best[1], best[2]


def synthetic_prompts(
    tok, num_prompts: int, input_len: int, shared_prefix_len: int = 0, seed: int = 0
) -> tuple[list[str], list[int]]:
    """`num_prompts` distinct prompts of shared_prefix_len + input_len tokens each (see module doc)."""
    prose = tok.encode(PROSE)
    rng = random.Random(seed)

    def body(length: int, offset: int) -> list[int]:
        return [prose[(offset + i) % len(prose)] for i in range(length)]

    prefix_text = ""
    if shared_prefix_len > 0:
        header = tok.encode(SYSTEM_HEADER)
        prefix_text, _ = _exact_text(
            tok, header[:shared_prefix_len], body(shared_prefix_len, 0), shared_prefix_len
        )
    prefix_ids = tok.encode(prefix_text) if prefix_text else []
    prompts, lengths = [], []
    target = len(prefix_ids) + input_len
    for i in range(num_prompts):
        tag = tok.encode(f"\nRequest {i}: " if prefix_ids else f"Request {i}: ")
        head = prefix_ids + tag
        text, n = _exact_text(tok, head, body(input_len + 8, rng.randrange(len(prose))), target)
        prompts.append(text)
        lengths.append(n)
    return prompts, lengths


def file_prompts(path: str | Path, num_prompts: int) -> list[str]:
    """Prompts from a file: JSON lines with a "prompt" field (or a bare JSON string), else one per line.

    Blank lines are skipped; fewer prompts than asked for are reused in order.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot read prompts file {path}: {exc.strerror}", "prompts_file"
        ) from None
    prompts = []
    for line in lines:
        if not line.strip():
            continue
        text = line
        if line.lstrip().startswith(("{", '"')):
            try:
                value = json.loads(line)
            except ValueError:
                value = line
            if isinstance(value, dict):
                value = value.get("prompt")
            if not isinstance(value, str):
                raise InvalidRequestError(f"{path}: a JSON line without a string 'prompt'", "prompts_file")
            text = value
        prompts.append(text)
    if not prompts:
        raise InvalidRequestError(f"prompts file {path} has no prompts", "prompts_file")
    return [prompts[i % len(prompts)] for i in range(num_prompts)]


def make_prompt_set(
    model: str,
    num_prompts: int,
    input_len: int,
    shared_prefix_len: int = 0,
    prompts_file: str | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
) -> PromptSet:
    tok, name, exact = load_tokenizer(model, tokenizer)
    if prompts_file:
        prompts = file_prompts(prompts_file, num_prompts)
        lengths = [len(tok.encode(p)) for p in prompts]
        return PromptSet(prompts, lengths, name, exact, 0, str(prompts_file))
    prompts, lengths = synthetic_prompts(tok, num_prompts, input_len, shared_prefix_len, seed)
    return PromptSet(prompts, lengths, name, exact, shared_prefix_len, "synthetic")
