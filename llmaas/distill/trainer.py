"""The distillation loop: teacher logits -> student loss -> AdamW, resumable step by step.

Everything a step reads is a function of the step number and the saved random state: the data
windows come from `WindowSampler` by sample index, on-policy rows are drawn from a seeded generator
saved in the checkpoint. So `--resume` continues exactly where the run stopped, and a fixed `--seed`
repeats a run. Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and exits; a second
Ctrl-C aborts at once (the previous checkpoint stays intact: checkpoints are renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmaas.distill.checkpoint import check_compatible, checkpoint_path, load_checkpoint, save_checkpoint
from llmaas.distill.data import DataSpec, WindowSampler, load_documents, parse_spec, tokenize_documents
from llmaas.distill.losses import LOSSES, cross_entropy, divergence
from llmaas.distill.modeling import load_frozen, load_trainable, save_hf_model, sequence_logits
from llmaas.distill.student import check_teacher, make_student
from llmaas.errors import InvalidRequestError
from llmaas.models.catalog import resolve_model_dir
from llmaas.models.tokenizer import Tokenizer

MIN_LR_RATIO = 0.1  # cosine decays to 10% of --lr
GRAD_CLIP = 1.0


@dataclass
class DistillConfig:
    teacher: str = "smollm2-135m"
    out: str = "students/student"
    student_layers: int | None = None  # cut a student from the teacher ...
    student: str | None = None  # ... or start from an existing student directory
    mlp_keep: float = 1.0
    data: list[str] = field(default_factory=lambda: ["shakespeare"])
    loss: str = "fkl"
    beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0
    on_policy: float = 0.0
    steps: int = 1000
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 20
    seed: int = 0
    bf16: bool = False
    save_every: int = 100
    resume: bool = False
    device: str | None = None
    teacher_max_tokens: int = 256  # teacher:PROMPTS generation length
    progress: bool = True

    # Settings that may change across --resume: how long to run and how often to save.
    RESUMABLE_CHANGES = ("steps", "save_every", "resume", "progress", "device")

    def fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.RESUMABLE_CHANGES}


def validate(cfg: DistillConfig) -> None:
    """Numbers and combinations that cannot work, before anything is loaded."""

    def need(ok: bool, param: str, message: str) -> None:
        if not ok:
            raise InvalidRequestError(message, param=param)

    need(cfg.loss in LOSSES, "loss", f"--loss must be one of {', '.join(LOSSES)}")
    need(
        (cfg.student_layers is None) != (cfg.student is None),
        "student_layers",
        "give exactly one of --student-layers N (cut from the teacher) or --student DIR",
    )
    need(0.0 <= cfg.beta <= 1.0, "beta", "--beta must be in [0, 1]")
    need(cfg.temperature > 0, "temperature", "--temperature must be positive")
    need(0.0 <= cfg.ce_weight <= 1.0, "ce_weight", "--ce-weight must be in [0, 1]")
    need(0.0 <= cfg.on_policy <= 1.0, "on_policy", "--on-policy must be in [0, 1]")
    need(
        not (cfg.loss == "ce" and cfg.on_policy > 0),
        "on_policy",
        "--on-policy needs a teacher loss (fkl, rkl or jsd): cross-entropy on the student's own samples "
        "teaches nothing",
    )
    need(cfg.steps >= 1, "steps", "--steps must be at least 1")
    need(cfg.batch_size >= 1, "batch_size", "--batch-size must be at least 1")
    need(cfg.seq_len >= 8, "seq_len", "--seq-len must be at least 8")
    need(cfg.grad_accum >= 1, "grad_accum", "--grad-accum must be at least 1")
    need(cfg.lr > 0, "lr", "--lr must be positive")
    need(cfg.warmup >= 0, "warmup", "--warmup must be >= 0")
    need(cfg.save_every >= 1, "save_every", "--save-every must be at least 1")
    need(bool(cfg.data), "data", "give at least one --data source")
    for spec in cfg.data:
        need(
            parse_spec(spec).split != "heldout",
            "data",
            f"--data {spec}: training never reads a held-out split",
        )


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 down to MIN_LR_RATIO at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return a.backend.get_vocab(with_added_tokens=True) == b.backend.get_vocab(with_added_tokens=True)


class _StopRequest:
    """SIGINT/SIGTERM -> finish the step, checkpoint, exit. A second Ctrl-C raises at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and writing a checkpoint (Ctrl-C again to abort now)", flush=True)

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class Prepared:
    """Everything checked and loaded before the first step."""

    teacher_dir: Path
    student_src: Path
    tokenizer: Tokenizer
    sampler: WindowSampler
    state: dict[str, Any] | None
    num_train_tokens: int


def prepare(cfg: DistillConfig) -> Prepared:
    """All checks that can fail, in the order a user fixes them; nothing is trained yet."""
    validate(cfg)
    out = Path(cfg.out)
    ckpt = checkpoint_path(out)
    teacher_dir = resolve_model_dir(cfg.teacher)
    tokenizer = Tokenizer.from_dir(teacher_dir)

    state = None
    if cfg.resume:
        state = load_checkpoint(ckpt)
        check_compatible(state["fingerprint"], cfg.fingerprint(), ckpt)
    elif ckpt.exists():
        raise InvalidRequestError(
            f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out",
            param="out",
        )

    def teacher_generator(prompts: Path):
        from llmaas.distill.teacher_data import generate_documents

        return generate_documents(
            teacher_dir, prompts, out / "checkpoint", cfg.teacher_max_tokens, 0.7, cfg.seed
        )

    docs = []
    for spec in cfg.data:
        docs += load_documents(DataSpec(parse_spec(spec).source, parse_spec(spec).split), teacher_generator)
    separator = next(iter(sorted(tokenizer.eos_token_ids)), None)
    tokens = tokenize_documents(tokenizer, docs, separator)
    sampler = WindowSampler(tokens, cfg.seq_len, cfg.seed, name=" + ".join(cfg.data))

    if cfg.student is not None:
        student_src = resolve_model_dir(cfg.student)
        if not same_tokenizer(tokenizer, Tokenizer.from_dir(student_src)):
            raise InvalidRequestError(
                f"teacher {cfg.teacher} and student {cfg.student} have different tokenizers: "
                "token-level distillation needs the same vocabulary",
                param="student",
            )
        from llmaas.models.config import load_config

        t_cfg, s_cfg = load_config(teacher_dir), load_config(student_src)
        if s_cfg.num_layers > t_cfg.num_layers:
            raise InvalidRequestError(
                f"student {cfg.student} ({s_cfg.num_layers} layers) is deeper than the teacher "
                f"({t_cfg.num_layers})",
                param="student",
            )
        if s_cfg.vocab_size != t_cfg.vocab_size:
            raise InvalidRequestError(
                f"teacher and student vocab sizes differ ({t_cfg.vocab_size} vs {s_cfg.vocab_size})",
                param="student",
            )
    else:
        from llmaas.distill.student import select_layers
        from llmaas.models.config import load_config

        select_layers(load_config(teacher_dir).num_layers, cfg.student_layers)  # depth check, early
        student_src = out / "checkpoint" / "student-init"
        if not (student_src / "config.json").is_file():
            calibration = sampler.batch(0, min(8, sampler.num_windows)) if cfg.mlp_keep < 1 else None
            make_student(teacher_dir, student_src, cfg.student_layers, cfg.mlp_keep, calibration)
    return Prepared(teacher_dir, student_src, tokenizer, sampler, state, int(tokens.numel()))


def _device(cfg: DistillConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def run_distill(cfg: DistillConfig, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train; returns the summary (also written to OUT/distill.json). `interrupted` says if stopped.

    `on_step(step)` runs after each finished step (progress reporting, tests).
    """
    prep = prepare(cfg)
    device = _device(cfg)
    out = Path(cfg.out)
    student = load_trainable(prep.student_src, device)
    teacher = None
    if cfg.loss != "ce":  # plain cross-entropy (the baseline) never runs the teacher
        teacher = load_frozen(prep.teacher_dir, device, torch.bfloat16 if cfg.bf16 else torch.float32)
        check_teacher(teacher, cfg.teacher)

    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.steps))
    rng = torch.Generator().manual_seed(cfg.seed)
    start_step, history, elapsed = 0, [], 0.0
    if prep.state is not None:
        s = prep.state
        try:
            student.load_state_dict(s["model"])
        except RuntimeError as exc:
            raise InvalidRequestError(
                f"--resume: checkpoint weights do not fit the student ({exc})", param="resume"
            ) from exc
        optimizer.load_state_dict(s["optimizer"])
        scheduler.load_state_dict(s["scheduler"])
        rng.set_state(s["rng"])
        torch.set_rng_state(s["torch_rng"])
        start_step, history, elapsed = s["step"], s["history"], s["elapsed"]
        if start_step >= cfg.steps:
            raise InvalidRequestError(
                f"--resume: the checkpoint has already run {start_step} steps (--steps {cfg.steps})",
                param="steps",
            )
    else:
        torch.manual_seed(cfg.seed)

    sampler_engine = None
    if cfg.on_policy > 0:
        from llmaas.distill.onpolicy import StudentSampler

        sampler_engine = StudentSampler(
            prep.student_src, cfg.batch_size, cfg.seq_len, "bfloat16" if cfg.bf16 else "float32", cfg.device
        )

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
    prompt_len = cfg.seq_len // 2
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len

    def save(step: int) -> None:
        save_checkpoint(
            checkpoint_path(out),
            {
                "step": step,
                "model": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng.get_state(),
                "torch_rng": torch.get_rng_state(),
                "fingerprint": cfg.fingerprint(),
                "history": history,
                "elapsed": elapsed,
            },
        )

    def micro_batch_loss(first_sample: int) -> torch.Tensor:
        ids = prep.sampler.batch(first_sample, cfg.batch_size)
        t = ids.shape[1]
        data_mask = torch.ones(cfg.batch_size, t - 1, dtype=torch.bool)
        kd_mask = data_mask.clone()
        if sampler_engine is not None:
            rows = (torch.rand(cfg.batch_size, generator=rng) < cfg.on_policy).nonzero().flatten()
            if len(rows):
                seeds = torch.randint(0, 2**31 - 1, (len(rows),), generator=rng).tolist()
                sampler_engine.sync(student)
                ids[rows] = sampler_engine.continue_rows(ids[rows, :prompt_len], t - prompt_len, seeds)
                data_mask[rows] = False  # no cross-entropy on the student's own samples
                kd_mask[rows, : prompt_len - 1] = False  # distil only where the student wrote
        ids = ids.to(device)
        data_mask, kd_mask = data_mask.to(device), kd_mask.to(device)
        with autocast:
            logits = sequence_logits(student, ids)[:, :-1]
            if cfg.loss == "ce":
                return cross_entropy(logits, ids[:, 1:], data_mask)
            with torch.no_grad():
                teacher_logits = sequence_logits(teacher, ids)[:, :-1]
        loss = divergence(logits, teacher_logits, cfg.loss, cfg.beta, cfg.temperature, kd_mask)
        if cfg.ce_weight > 0:
            loss = (1 - cfg.ce_weight) * loss + cfg.ce_weight * cross_entropy(logits, ids[:, 1:], data_mask)
        return loss

    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc="distill",
        unit="step",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    interrupted = False
    step = start_step
    with _StopRequest() as stop:
        while step < cfg.steps:
            t0 = time.perf_counter()
            total = 0.0
            for micro in range(cfg.grad_accum):
                first = (step * cfg.grad_accum + micro) * cfg.batch_size
                loss = micro_batch_loss(first) / cfg.grad_accum
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            history.append(total)
            bar.update(1)
            bar.set_postfix(
                loss=f"{total:.4f}",
                tok_s=f"{tokens_per_step / dt:.0f}",
                lr=f"{scheduler.get_last_lr()[0]:.2e}",
            )
            if on_step is not None:
                on_step(step)
            if stop.requested:
                save(step)
                interrupted = True
                break
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(step)
    bar.close()

    summary = {
        "teacher": cfg.teacher,
        "student": str(out),
        "steps": step,
        "interrupted": interrupted,
        "tokens": step * tokens_per_step,
        "train_seconds": round(elapsed, 1),
        "tokens_per_second": round(step * tokens_per_step / elapsed, 1) if elapsed else None,
        "first_loss": sum(history[:10]) / max(1, len(history[:10])),
        "last_loss": sum(history[-10:]) / max(1, len(history[-10:])),
        "student_parameters": count_parameters(student),
        "teacher_parameters": count_parameters(teacher) if teacher is not None else None,
        "train_tokens_available": prep.num_train_tokens,
        "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
    }
    if not interrupted:
        teacher_cfg = json.loads((prep.teacher_dir / "config.json").read_text(encoding="utf-8"))
        dtype_name = teacher_cfg.get("dtype") or teacher_cfg.get("torch_dtype") or "float32"
        save_hf_model(
            student,
            out,
            prep.student_src,
            {"dtype": dtype_name, "torch_dtype": dtype_name},
            dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype_name, torch.float32),
        )
        (out / "distill.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"{'stopped' if s['interrupted'] else 'done'}: {s['steps']} steps, {s['tokens']:,} tokens in "
        f"{s['train_seconds']:.0f} s ({s['tokens_per_second'] or 0:.0f} tok/s)",
        f"loss: {s['first_loss']:.4f} (first 10 steps) -> {s['last_loss']:.4f} (last 10)",
    ]
    if s["teacher_parameters"]:
        lines.append(
            f"student: {s['student_parameters'] / 1e6:.1f}M parameters "
            f"({s['student_parameters'] / s['teacher_parameters']:.0%} of the teacher's "
            f"{s['teacher_parameters'] / 1e6:.1f}M)"
        )
    if s["interrupted"]:
        lines.append(f"checkpoint saved; continue with the same command and --resume (out: {s['student']})")
    else:
        lines.append(f"student written to {s['student']} (serve it: llmaas serve --model {s['student']})")
    return "\n".join(lines)
