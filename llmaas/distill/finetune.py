"""`llmaas finetune`: supervised fine-tuning on chat jsonl, loss on the assistant's tokens only.

Each line of the data file is ``{"messages": [{"role": ..., "content": ...}, ...]}`` with at least one
assistant turn. The conversation is rendered with the model's own chat template; the characters of
each assistant turn (its content and the template's end-of-turn marker, so the model learns to stop)
are found by rendering the conversation up to that turn, and only tokens that start inside them carry
loss. System and user tokens are context, never targets.

Full fine-tuning trains every weight; ``--lora`` trains low-rank adapters (peft) on the attention and
MLP projections and merges them into the weights on save, so the result serves like any model.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmaas.distill.data import jsonl_records
from llmaas.distill.losses import cross_entropy
from llmaas.distill.modeling import load_trainable, save_hf_model, sequence_logits
from llmaas.distill.trainer import lr_factor
from llmaas.errors import InvalidRequestError, LlmaasError
from llmaas.models.catalog import resolve_model_dir
from llmaas.models.tokenizer import Tokenizer

LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@dataclass
class FinetuneConfig:
    model: str
    data: str
    out: str
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 4
    max_len: int = 512
    lr: float | None = None
    warmup: int = 5
    seed: int = 0
    bf16: bool = False
    device: str | None = None
    progress: bool = True


@dataclass
class Example:
    ids: list[int]
    targets: list[bool]  # targets[i]: token i is an assistant token (predicted from position i - 1)


def read_conversations(path: Path) -> list[list[dict[str, Any]]]:
    """Validated conversations; a bad line raises naming the file and the line number."""
    if not path.is_file():
        raise InvalidRequestError(f"data file {path} does not exist", param="data")
    conversations = []
    for _, where, obj in jsonl_records(path):
        messages = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError(f'{where}: expected {{"messages": [...]}}', param="data")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequestError(f"{where}: messages[{i}] needs a role", param="data")
            if not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"{where}: messages[{i}].content must be a string", param="data")
        if not any(m["role"] == "assistant" for m in messages):
            raise InvalidRequestError(f"{where}: no assistant message to learn from", param="data")
        if messages[0]["role"] == "assistant":
            raise InvalidRequestError(f"{where}: the conversation starts with the assistant", param="data")
        conversations.append(messages)
    if not conversations:
        raise InvalidRequestError(f"data file {path} is empty", param="data")
    return conversations


def encode_conversation(tok: Tokenizer, messages: list[dict[str, Any]], where: str = "") -> Example:
    """Token ids of the rendered conversation and which of them are the assistant's."""
    try:
        full = tok.apply_chat_template(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
            through = tok.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise InvalidRequestError(
                    f"{where}: the chat template does not render conversations prefix by prefix, so the "
                    "assistant's tokens cannot be located",
                    param="data",
                )
            spans.append((len(before), len(through)))
    except LlmaasError as exc:
        raise InvalidRequestError(f"{where}: {exc.message}", param="data") from exc
    enc = tok.backend.encode(full, add_special_tokens=False)
    targets = [any(a <= start < b for a, b in spans) for start, _end in enc.offsets]
    return Example(list(enc.ids), targets)


def _batch(examples: list[Example], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, T], labels [B, T-1], loss mask [B, T-1] (right padding; pads are never targets)."""
    t = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), t), pad, dtype=torch.long)
    mask = torch.zeros(len(examples), t, dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = torch.tensor(e.targets)
    return ids, ids[:, 1:], mask[:, 1:]


class _Holder(torch.nn.Module):
    """peft wraps a module; ours carries a dataclass `config` that peft would try to read as HF's."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder


def add_lora(model: torch.nn.Module, rank: int, alpha: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(_Holder(model), LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS))


def merge_lora(peft_model: torch.nn.Module) -> torch.nn.Module:
    return peft_model.merge_and_unload().decoder


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.max_len < 2:
        raise InvalidRequestError(
            "--batch-size, --epochs must be >= 1 and --max-len >= 2", param="batch_size"
        )
    model_dir = resolve_model_dir(cfg.model)
    tok = Tokenizer.from_dir(model_dir)
    if not tok.chat_template:
        raise InvalidRequestError(f"model {cfg.model} has no chat template to fine-tune on", param="model")
    path = Path(cfg.data)
    conversations = read_conversations(path)
    examples = []
    for n, messages in enumerate(conversations, 1):
        e = encode_conversation(tok, messages, f"{path} conversation {n}")
        e = Example(e.ids[: cfg.max_len], e.targets[: cfg.max_len])
        if any(e.targets[1:]):
            examples.append(e)
    if not examples:
        raise InvalidRequestError(f"{path}: no assistant tokens within --max-len {cfg.max_len}", param="data")
    pad = min(tok.eos_token_ids) if tok.eos_token_ids else 0

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    base = load_trainable(model_dir, device)
    if cfg.lora:
        model = add_lora(base, cfg.lora_rank, cfg.lora_alpha)
        decoder = model.base_model.model.decoder
    else:
        model = decoder = base
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr or (2e-4 if cfg.lora else 2e-5)
    per_epoch = -(-len(examples) // cfg.batch_size)
    total = cfg.steps or per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup, total))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(cfg.seed)

    from tqdm import tqdm

    history: list[float] = []
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    step = 0
    while step < total:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for first in range(0, len(order), cfg.batch_size):
            if step >= total:
                break
            ids, labels, mask = _batch([examples[i] for i in order[first : first + cfg.batch_size]], pad)
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            with autocast:
                logits = sequence_logits(decoder, ids)[:, :-1]
            loss = cross_entropy(logits, labels, mask)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    bar.close()
    final = merge_lora(model) if cfg.lora else base
    source = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    dtype_name = source.get("dtype") or source.get("torch_dtype") or "float32"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype_name, torch.float32)
    save_hf_model(final, cfg.out, model_dir, dtype=dtype)
    return {
        "out": cfg.out,
        "steps": step,
        "conversations": len(examples),
        "assistant_tokens": sum(sum(e.targets) for e in examples),
        "first_loss": history[0],
        "last_loss": sum(history[-5:]) / len(history[-5:]),
        "seconds": round(time.perf_counter() - t0, 1),
        "trainable_parameters": sum(p.numel() for p in params),
    }
