"""Distillation on a tiny random teacher: losses, the student cut, training, resume, eval, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmaas.distill.evaluate import EvalConfig, evaluate, markdown_table
from llmaas.distill.losses import divergence, generalized_jsd
from llmaas.distill.modeling import load_frozen, sequence_logits
from llmaas.distill.student import make_student, select_layers
from llmaas.distill.teacher_data import generate_documents
from llmaas.distill.trainer import DistillConfig, run_distill
from llmaas.errors import InvalidRequestError
from tests.model_factory import _TRAINING_TEXT, make_tiny_checkpoint
from tests.torch_threads import one_torch_thread  # noqa: F401  (autouse: one thread here)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("teacher"), num_hidden_layers=4)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    lines = _TRAINING_TEXT.splitlines()
    path.write_text("\n".join(lines[(i * 7) % len(lines)] for i in range(400)))
    return path


def _cfg(teacher: Path, text_file: Path, out: Path, **kw) -> DistillConfig:
    base = dict(
        teacher=str(teacher),
        out=str(out),
        student_layers=2,
        data=[str(text_file)],
        loss="fkl",
        steps=6,
        batch_size=2,
        seq_len=32,
        lr=3e-3,
        warmup=1,
        save_every=3,
        progress=False,
    )
    base.update(kw)
    return DistillConfig(**base)


# ------------------------------------------------------------------ losses


def _log_probs(seed: int, shape=(3, 5, 11)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=torch.float64).log_softmax(-1)
    q = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).log_softmax(-1)
    return p, q


def test_jsd_limits_are_forward_and_reverse_kl():
    p, q = _log_probs(0)
    fkl = (p.exp() * (p - q)).sum(-1)
    rkl = (q.exp() * (q - p)).sum(-1)
    torch.testing.assert_close(generalized_jsd(p, q, 0.0), fkl)
    torch.testing.assert_close(generalized_jsd(p, q, 1.0), rkl)
    # Continuous at both ends: the beta -> 0 and beta -> 1 limits are the same KLs.
    torch.testing.assert_close(generalized_jsd(p, q, 1e-9), fkl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(generalized_jsd(p, q, 1 - 1e-9), rkl, rtol=1e-5, atol=1e-7)
    # Swapping the distributions swaps beta; JSD_0.5 <= ln 2, so the normalised value is <= 4 ln 2.
    torch.testing.assert_close(generalized_jsd(p, q, 0.3), generalized_jsd(q, p, 0.7))
    mid = generalized_jsd(p, q, 0.5)
    assert (mid > 0).all() and (mid <= 4 * math.log(2)).all()


def test_divergences_vanish_for_identical_logits_and_use_the_mask():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 9, generator=g)
    for kind in ("fkl", "rkl", "jsd"):
        assert float(divergence(logits, logits, kind, 0.5, 2.0)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 4, 9, generator=g)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = True
    one = divergence(other[:, 1:2][:1], logits[:, 1:2][:1], "fkl")
    torch.testing.assert_close(divergence(other, logits, "fkl", mask=mask), one)
    # Temperature: T^2 scaling of a KL computed on logits / T.
    t = 3.0
    manual = divergence(other / t, logits / t, "fkl") * t * t
    torch.testing.assert_close(divergence(other, logits, "fkl", temperature=t), manual)


# ----------------------------------------------------------------- student


def test_select_layers_keeps_first_and_last_evenly():
    assert select_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert select_layers(4, 2) == [0, 3]
    assert select_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(InvalidRequestError, match="deeper than the teacher"):
        select_layers(4, 5)


def test_student_cut_and_pruned_keeps_teacher_weights(teacher, tmp_path):
    calib = torch.randint(3, 300, (2, 16))
    out = make_student(teacher, tmp_path / "s", 2, mlp_keep=0.5, calibration=calib)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["intermediate_size"] == 64
    t = load_file(str(teacher / "model.safetensors"))
    s = load_file(str(out / "model.safetensors"))
    # Student layer 1 is teacher layer 3; attention is untouched, the MLP keeps a subset of rows.
    torch.testing.assert_close(
        s["model.layers.1.self_attn.q_proj.weight"], t["model.layers.3.self_attn.q_proj.weight"]
    )
    t_rows = {tuple(r.tolist()) for r in t["model.layers.3.mlp.up_proj.weight"]}
    assert all(tuple(r.tolist()) in t_rows for r in s["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])


# ---------------------------------------------------------------- training


def test_distill_loss_falls_and_student_loads_in_engine_and_transformers(teacher, text_file, tmp_path):
    out = tmp_path / "student"
    summary = run_distill(_cfg(teacher, text_file, out, steps=12, batch_size=4))
    assert not summary["interrupted"] and summary["steps"] == 12
    # On fixed text (the batch losses are noisy): the trained student is much closer to the teacher.
    from llmaas.models.tokenizer import Tokenizer

    ids = torch.tensor([Tokenizer.from_dir(teacher).encode(text_file.read_text())[:256]])
    with torch.no_grad():
        t_logits = sequence_logits(load_frozen(teacher), ids)
        before = divergence(
            sequence_logits(load_frozen(out / "checkpoint" / "student-init"), ids), t_logits, "fkl"
        )
        after = divergence(sequence_logits(load_frozen(out), ids), t_logits, "fkl")
    assert after < 0.9 * before, (before, after)

    from llmaas.engine.sampling_params import SamplingParams
    from llmaas.llm import LLM

    text = LLM(str(out), dtype="float32").generate("Hello", SamplingParams(max_tokens=5, temperature=0))
    assert len(text[0].outputs[0].token_ids) == 5

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 2
    ids = torch.randint(3, 300, (1, 12))
    ours = sequence_logits(load_frozen(out), ids)
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_interrupted_run_resumes_exactly_where_it_stopped(teacher, text_file, tmp_path):
    kw = dict(loss="jsd", beta=0.3, temperature=2.0, ce_weight=0.2, on_policy=0.5, save_every=100)
    kw.update(steps=4, seq_len=16)
    whole = run_distill(_cfg(teacher, text_file, tmp_path / "whole", **kw))
    assert whole["steps"] == 4

    def interrupt(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: finish the step, checkpoint, stop

    first = run_distill(_cfg(teacher, text_file, tmp_path / "split", **kw), on_step=interrupt)
    assert first["interrupted"] and first["steps"] == 2
    assert not (tmp_path / "split" / "model.safetensors").exists()
    with pytest.raises(InvalidRequestError, match="--resume"):
        run_distill(_cfg(teacher, text_file, tmp_path / "split", **kw))
    second = run_distill(_cfg(teacher, text_file, tmp_path / "split", resume=True, **kw))
    assert second["steps"] == 4 and not second["interrupted"]

    a = torch.load(tmp_path / "whole" / "checkpoint" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint" / "state.pt", weights_only=False)
    assert a["history"] == b["history"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_same_seed_same_run(teacher, text_file, tmp_path):
    a = run_distill(_cfg(teacher, text_file, tmp_path / "a", steps=3))
    b = run_distill(_cfg(teacher, text_file, tmp_path / "b", steps=3))
    assert a["first_loss"] == b["first_loss"] and a["last_loss"] == b["last_loss"]


# --------------------------------------------------------------- bad input


def test_bad_input_fails_before_training(teacher, text_file, tmp_path):
    out = tmp_path / "x"
    other = make_tiny_checkpoint("llama", tmp_path, num_hidden_layers=2, vocab_size=300)
    cases = [
        (dict(student_layers=None, student=str(other)), "different tokenizers"),
        (dict(student_layers=5), "deeper than the teacher"),
        (dict(data=[str(tmp_path / "missing.txt")]), "neither a named source"),
        (dict(data=["shakespeare:heldout"]), "held-out"),
        (dict(loss="ce", on_policy=0.5), "on-policy"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases.append((dict(data=[str(empty)]), "is empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    cases.append((dict(data=[str(bad)]), "line 2"))
    for overrides, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            run_distill(_cfg(teacher, text_file, out, **overrides))
        assert not (out / "checkpoint" / "state.pt").exists()


def test_resume_from_an_incompatible_checkpoint_is_refused(teacher, text_file, tmp_path):
    out = tmp_path / "s"
    run_distill(_cfg(teacher, text_file, out, steps=2, save_every=1))
    with pytest.raises(InvalidRequestError, match="seq_len: checkpoint 32, now 16"):
        run_distill(_cfg(teacher, text_file, out, steps=4, resume=True, seq_len=16))
    with pytest.raises(InvalidRequestError, match="no checkpoint"):
        run_distill(_cfg(teacher, text_file, tmp_path / "none", resume=True))


def test_cli_reports_bad_input_with_the_parameter(teacher, text_file, tmp_path, capsys):
    from llmaas.cli import main

    rc = main(
        ["distill", "--teacher", str(teacher), "--student-layers", "9", "--data", str(text_file),
         "--out", str(tmp_path / "o"), "--quiet"]
    )  # fmt: skip
    assert rc == 2
    assert "deeper than the teacher" in capsys.readouterr().err


# -------------------------------------------------------------------- eval


def test_eval_table_compares_teacher_and_students(teacher, text_file, tmp_path):
    student = make_student(teacher, tmp_path / "s", 2)
    cfg = EvalConfig(
        models=[str(teacher), str(student)],
        data=[f"{text_file}:heldout"],
        max_tokens=256,
        seq_len=64,
        decode_tokens=4,
        decode_rounds=1,
    )
    rows = evaluate(cfg)
    assert rows[0].agreement == 1.0 and rows[0].kl == pytest.approx(0.0, abs=1e-4)
    assert rows[1].kl > 0 and 0 <= rows[1].agreement < 1 and rows[1].bits_per_byte > 0
    assert rows[1].layers == 2 and rows[1].decode_tok_s > 0 and rows[1].usd_per_mtok > 0
    table = markdown_table(rows, cfg)
    assert table.count("\n|") >= 3 and "bits/byte" in table


def test_teacher_writes_the_data_once(teacher, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\nWhat is the weather like?\n\nTell me a story\n")
    cache = tmp_path / "cache"
    docs = generate_documents(teacher, prompts, cache, max_tokens=6, seed=1)
    assert len(docs) == 3 and docs[1].text.startswith("<|im_start|>user\nWhat is the weather like?")
    assert "<|im_start|>assistant\n" in docs[0].text
    assert list(cache.glob("teacher-*.jsonl"))
    assert generate_documents(teacher, prompts, cache, max_tokens=6, seed=1) == docs  # read from the cache
    run = run_distill(
        _cfg(
            teacher,
            prompts,
            tmp_path / "seq",
            data=[f"teacher:{prompts}:all"],
            steps=1,
            seq_len=8,
            teacher_max_tokens=8,
        )
    )
    assert run["steps"] == 1
