"""Sequence-level distillation data: the teacher writes the text, through our engine.

``--data teacher:PROMPTS`` reads PROMPTS (a .txt file, one prompt per line, or a .jsonl file of
``{"prompt": ...}`` or ``{"messages": [...]}`` objects). Each prompt goes to the teacher as a user
turn of its chat template (plain continuation when it has none); each document is the whole
conversation as the template renders it, the teacher's answer included. Generation is seeded and
the result is cached next to the run, keyed by the prompts, the teacher and the sampling settings,
so a resumed run reads the same text without generating it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from llmaas.distill.data import Document, jsonl_records
from llmaas.errors import InvalidRequestError


def read_prompts(path: Path) -> list[Any]:
    """Prompts as strings (plain) or message lists (chat); errors name the line."""
    prompts: list[Any] = []
    if path.suffix != ".jsonl":
        with path.open(encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        for _, where, obj in jsonl_records(path):
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                prompts.append(obj["prompt"])
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                prompts.append(obj["messages"])
            else:
                raise InvalidRequestError(
                    f'{where}: expected {{"prompt": "..."}} or {{"messages": [...]}}', param="data"
                )
    if not prompts:
        raise InvalidRequestError(f"prompts file {path} is empty", param="data")
    return prompts


def generate_documents(
    teacher_dir: Path,
    prompts_path: Path,
    cache_dir: Path,
    max_tokens: int = 256,
    temperature: float = 0.7,
    seed: int = 0,
) -> list[Document]:
    prompts = read_prompts(prompts_path)
    key = hashlib.sha256(
        json.dumps([str(teacher_dir), prompts, max_tokens, temperature, seed]).encode()
    ).hexdigest()[:16]
    cache = cache_dir / f"teacher-{key}.jsonl"
    if cache.is_file():
        rows = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines() if line]
        return [Document(r["name"], r["text"]) for r in rows]

    from llmaas.engine.sampling_params import SamplingParams
    from llmaas.llm import LLM

    llm = LLM(str(teacher_dir), dtype="auto", enable_prefix_caching=True)
    tok = llm.tokenizer
    texts = []
    for p in prompts:
        if tok.chat_template:
            messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
            texts.append(tok.apply_chat_template(messages, add_generation_prompt=True))
        else:
            texts.append(p if isinstance(p, str) else "\n".join(m.get("content", "") for m in p))
    params = []
    for i, text in enumerate(texts):
        # Answers end at the teacher's context window; a prompt that fills it is an error.
        room = llm.engine.max_model_len - len(tok.encode(text))
        if room < 1:
            raise InvalidRequestError(
                f"{prompts_path} prompt {i + 1}: longer than the teacher's context window", param="data"
            )
        params.append(
            SamplingParams(
                max_tokens=min(max_tokens, room),
                temperature=temperature,
                seed=seed + i,
                skip_special_tokens=False,
            )
        )
    outputs = llm.generate(texts, params, use_tqdm=True)
    docs = []
    for i, (text, out) in enumerate(zip(texts, outputs)):
        completion = out.outputs[0]
        end = ""
        if completion.finish_reason == "stop" and tok.chat_template and "<|im_end|>" in tok.chat_template:
            end = "<|im_end|>"  # the stop token is not in the text; keep the turn well-formed
        docs.append(Document(f"{prompts_path.name}:{i + 1}", text + completion.text + end))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
    tmp.write_text(
        "".join(json.dumps({"name": d.name, "text": d.text}) + "\n" for d in docs), encoding="utf-8"
    )
    os.replace(tmp, cache)
    del llm
    return docs
