"""`llmaas distill`, `llmaas eval` and `llmaas finetune`."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is faster on a machine busy with other work)",
    )


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _config(cls, args: argparse.Namespace, **overrides):
    """A `cls` config from the flags named like its fields; `overrides` for the fields that are not."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="smollm2-135m", help="catalog name or HF-format directory")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--student-layers", type=int, help="cut a student of N layers from the teacher (evenly spaced)"
    )
    who.add_argument("--student", help="start from an existing student directory (same tokenizer)")
    p.add_argument(
        "--mlp-keep",
        type=float,
        default=1.0,
        help="share of MLP channels to keep, by activation importance (default 1: no pruning)",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="shakespeare, news, wiki, a .txt/.jsonl file or directory, or teacher:PROMPTS (repeatable)",
    )
    p.add_argument("--loss", choices=["fkl", "rkl", "jsd", "ce"], default="fkl")
    p.add_argument("--beta", type=float, default=0.5, help="JSD weight: 0 = forward KL, 1 = reverse KL")
    p.add_argument("--temperature", type=float, default=1.0, help="softens teacher and student logits")
    p.add_argument("--ce-weight", type=float, default=0.0, help="mix in cross-entropy on the data (0..1)")
    p.add_argument(
        "--on-policy", type=float, default=0.0, help="share of sequences the student writes itself"
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps before the cosine decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (teacher weights in bf16)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--teacher-max-tokens", type=int, default=256, help="length of teacher-written answers")
    p.add_argument("--out", required=True, help="student directory to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _threads_arg(p)


def cmd_distill(args: argparse.Namespace) -> int:
    _set_threads(args)
    from llmaas.distill.trainer import DistillConfig, format_summary, run_distill

    cfg = _config(DistillConfig, args, progress=not args.quiet)
    summary = run_distill(cfg)
    print(format_summary(summary), file=sys.stderr)
    return 130 if summary["interrupted"] else 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="model to evaluate (repeatable); the first is the teacher unless --teacher is given",
    )
    p.add_argument("--teacher", default=None, help="reference for agreement and KL (default: first --model)")
    p.add_argument(
        "--data", action="append", default=None, help="held-out text (default shakespeare:heldout)"
    )
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens of held-out text to score per model")
    p.add_argument("--seq-len", type=int, default=512, help="scoring window")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens to time batch-1 decode (0: skip)")
    p.add_argument("--usd-per-hour", default="1.00", help="machine price in USD per hour (cost column)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="scoring and decode dtype (default auto: bfloat16 where the hardware has it natively, "
        "else float32)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    _threads_arg(p)


def cmd_eval(args: argparse.Namespace) -> int:
    _set_threads(args)
    import json

    from llmaas.distill.evaluate import EvalConfig, evaluate, markdown_table

    cfg = _config(EvalConfig, args, models=args.model, data=args.data or ["shakespeare:heldout"])
    rows = evaluate(cfg)
    print(markdown_table(rows, cfg))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    return 0


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model to fine-tune (catalog name or directory)")
    p.add_argument("--data", required=True, help='chat jsonl: one {"messages": [...]} per line')
    p.add_argument("--out", required=True, help="directory for the fine-tuned model")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (merged on save)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="stop after N steps (default: the epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512, help="conversations are cut to this many tokens")
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 with --lora, 2e-5 without")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    _threads_arg(p)


def cmd_finetune(args: argparse.Namespace) -> int:
    _set_threads(args)
    from llmaas.distill.finetune import FinetuneConfig, run_finetune

    summary = run_finetune(_config(FinetuneConfig, args, progress=not args.quiet))
    print(
        f"done: {summary['steps']} steps on {summary['conversations']} conversations "
        f"({summary['assistant_tokens']:,} assistant tokens), loss {summary['first_loss']:.4f} -> "
        f"{summary['last_loss']:.4f}; model written to {summary['out']}",
        file=sys.stderr,
    )
    return 0


def add_distill_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a smaller student")
    _distill_args(p)
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("eval", help="compare models on held-out text: bits/byte, agreement, KL, speed, cost")
    _eval_args(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("finetune", help="supervised fine-tuning on chat jsonl (full or LoRA)")
    _finetune_args(p)
    p.set_defaults(func=cmd_finetune)
