"""Our dense models over the paged KV cache give transformers' logits (fp32, max abs diff <= 1e-4).

The reference is one transformers forward over each sequence's full token list: a causal model's
logits at position t depend only on tokens <= t, so every logit we produce along the way (prefill
chunks, decode steps) must match the reference row of the same position.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llmaas.models.attention import SequenceChunk, build_forward_batch
from llmaas.models.config import load_config
from llmaas.models.loader import load_model
from llmaas.models.rope import rope_inv_freq
from tests.model_factory import make_tiny_checkpoint

TOL = 1e-4
BLOCK_SIZE = 4
NUM_BLOCKS = 32  # tight: the sequences of a test use most of it
FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
TIED = {"qwen3", "llama"}  # tie_word_embeddings for these, untied for the others


@dataclass
class Seq:
    tokens: list[int]  # every token fed so far (prompt + generated)
    block_table: list[int]
    num_cached: int = 0  # tokens whose K/V are in the cache
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> our logits row


class PagedRun:
    """Drives our model the way the engine does: per step, a list of (sequence, new tokens)."""

    def __init__(self, model, seed: int = 0, sliding_window: int | None = None):
        self.model = model
        self.sliding_window = sliding_window
        for attn in model.attention_layers():
            attn.allocate_cache(NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu")
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)  # block tables are scattered, not in order

    def new_seq(self, max_tokens: int) -> Seq:
        n = math.ceil(max_tokens / BLOCK_SIZE)
        table, self.free = self.free[:n], self.free[n:]
        return Seq([], table)

    @torch.no_grad()
    def step(self, work: list[tuple[Seq, list[int]]]) -> None:
        """One forward over all (sequence, new tokens) pairs; prefills must precede decodes."""
        chunks, ids = [], []
        for seq, new in work:
            chunks.append(SequenceChunk(len(new), seq.num_cached, seq.block_table))
            ids.extend(new)
        batch = build_forward_batch(chunks, BLOCK_SIZE, sliding_window=self.sliding_window)
        self.prepare(batch, work)
        logits = self.model.compute_logits(self.model(torch.tensor(ids), batch))
        row = 0
        for seq, new in work:
            seq.tokens.extend(new)
            for _ in new:
                seq.logits[seq.num_cached] = logits[row]
                seq.num_cached += 1
                row += 1
        assert row == logits.shape[0]

    def prepare(self, batch, work: list[tuple[Seq, list[int]]]) -> None:
        """What a model family needs in the batch beyond the KV cache (hybrids: state slots)."""

    def greedy(self, seq: Seq) -> int:
        return int(seq.logits[seq.num_cached - 1].argmax())


@torch.no_grad()
def max_diff(ref, seqs: list[Seq]) -> float:
    worst = 0.0
    for seq in seqs:
        expected = ref(torch.tensor([seq.tokens])).logits[0]
        assert sorted(seq.logits) == list(range(len(seq.tokens)))
        ours = torch.stack([seq.logits[p] for p in range(len(seq.tokens))])
        worst = max(worst, (ours - expected).abs().max().item())
    return worst


def load_pair(model_dir: Path, attn_implementation: str = "sdpa"):
    ref = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    return ref, load_model(model_dir, dtype=torch.float32)


def checkpoint_pairs(root: Path, models: dict[str, tuple[str, dict]]):
    """name -> (model dir, transformers' model, ours) for `models` {name: (family, config overrides)},
    each checkpoint written and loaded on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            family, overrides = models[name]
            model_dir = make_tiny_checkpoint(family, root, **overrides)
            cache[name] = (model_dir, *load_pair(model_dir))
        return cache[name]

    return get


def prompt(length: int, seed: int, vocab: int = 320) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(family: str):
        if family not in cache:
            model_dir = make_tiny_checkpoint(family, root, tie_word_embeddings=family in TIED)
            cache[family] = load_pair(model_dir)
        return cache[family]

    return get


# 1. Batched prefill of prompts of different lengths, then batched decode through the cache.
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_prefill_then_decode(family_models, family):
    ref, ours = family_models(family)
    assert ours.config.num_kv_heads == 2 and ours.config.num_heads == 4
    assert ours.config.tie_word_embeddings == (family in TIED)
    run = PagedRun(ours, seed=1)
    lengths = [7, 13, 1, 4]
    seqs = [run.new_seq(L + 8) for L in lengths]
    run.step([(s, prompt(L, i)) for i, (s, L) in enumerate(zip(seqs, lengths, strict=True))])
    for _ in range(6):
        run.step([(s, [run.greedy(s)]) for s in seqs])
    diff = max_diff(ref, seqs)
    print(f"{family}: batched prefill + decode max abs diff {diff:.2e}")
    assert diff <= TOL


# 2. Chunked prefill reading its prefix from the cache, mixed with other sequences' prefills/decodes.
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_mixed_with_decode(family_models, family):
    ref, ours = family_models(family)
    run = PagedRun(ours, seed=2)
    a_prompt = prompt(21, 10)  # prefilled as 8 + 7 + 5 + 1 tokens
    a, b, c = run.new_seq(32), run.new_seq(24), run.new_seq(24)
    run.step([(a, a_prompt[:8]), (b, prompt(9, 11))])
    run.step([(a, a_prompt[8:15]), (c, prompt(5, 12)), (b, [run.greedy(b)])])
    run.step([(a, a_prompt[15:20]), (b, [run.greedy(b)]), (c, [run.greedy(c)])])
    # A one-token final chunk is indistinguishable from a decode step and goes with the decodes.
    run.step([(b, [run.greedy(b)]), (a, a_prompt[20:]), (c, [run.greedy(c)])])
    for _ in range(3):
        run.step([(s, [run.greedy(s)]) for s in (a, b, c)])
    assert a.tokens[:21] == a_prompt
    diff = max_diff(ref, [a, b, c])
    print(f"{family}: chunked prefill + mixed decode max abs diff {diff:.2e}")
    assert diff <= TOL


# 3. RoPE scalings against transformers' own ROPE_INIT_FUNCTIONS, from the same config.json.
_BIG = dict(
    vocab_size=320,
    hidden_size=1024,
    intermediate_size=128,
    num_hidden_layers=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    head_dim=128,
)


def legacy(model_type: str, theta: float, max_pos: int, original: int | None = None, **rope_scaling) -> dict:
    """A config.json as checkpoints ship it: rope_theta + rope_scaling."""
    if original is not None:
        rope_scaling["original_max_position_embeddings"] = original
    return dict(
        model_type=model_type, rope_theta=theta, max_position_embeddings=max_pos, rope_scaling=rope_scaling
    )


LLAMA31 = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
NO_ORIGINAL = {k: v for k, v in LLAMA31.items() if k != "original_max_position_embeddings"}
ROPE_CASES = {
    "linear": legacy("llama", 1e4, 8192, type="linear", factor=4.0),
    "llama3.1": legacy("llama", 5e5, 131072, **LLAMA31),
    "llama3.2": legacy("llama", 5e5, 131072, **{**LLAMA31, "factor": 32.0}),
    "llama3-transformers5-format": dict(
        model_type="llama", max_position_embeddings=131072, rope_parameters={**LLAMA31, "rope_theta": 5e5}
    ),
    "llama3-no-original": legacy("llama", 5e5, 16384, **NO_ORIGINAL),
    # transformers lets a top-level original_max_position_embeddings win over rope_scaling's.
    "llama3-top-level-original": {
        **legacy("llama", 5e5, 131072, **LLAMA31),
        "original_max_position_embeddings": 4096,
    },
    "yarn-qwen2.5": legacy("qwen2", 1e6, 32768, type="yarn", factor=4.0, original=32768),
    "yarn-qwen3": legacy("qwen3", 1e6, 131072, rope_type="yarn", factor=4.0, original=32768),
    "yarn-smaller": legacy("qwen2", 1e4, 16384, type="yarn", factor=4.0, original=4096),
    "yarn-no-original": legacy("llama", 1e4, 4096, rope_type="yarn", factor=8.0),
    "yarn-no-factor": legacy("qwen2", 1e6, 131072, type="yarn", factor=None, original=32768),
    "yarn-mscale": legacy(
        "llama", 1e4, 163840, rope_type="yarn", factor=40.0, original=4096,
        beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.5,
    ),
    "yarn-mscale-equal": legacy(
        "llama", 1e4, 163840, rope_type="yarn", factor=40.0, original=4096,
        mscale=0.707, mscale_all_dim=0.707,
    ),
    "yarn-mscale-only": legacy(
        "llama", 1e4, 16384, rope_type="yarn", factor=4.0, original=4096, mscale=2.0
    ),
    "yarn-attention-factor-betas": legacy(
        "mistral", 1e6, 65536, rope_type="yarn", factor=8.0, attention_factor=0.8,
        beta_fast=16, beta_slow=2, original=8192,
    ),
    "yarn-no-truncate": legacy(
        "llama", 1.5e5, 131072, rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
        original=4096, truncate=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_scaling_matches_transformers(tmp_path, case):
    (tmp_path / "config.json").write_text(json.dumps({**_BIG, **ROPE_CASES[case]}))
    hf_config = AutoConfig.from_pretrained(tmp_path)
    hf_config.standardize_rope_params()
    rope_type = hf_config.rope_parameters["rope_type"]
    expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")

    cfg = load_config(tmp_path)
    assert cfg.rope_scaling["rope_type"] == rope_type
    inv_freq, factor = rope_inv_freq(
        cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
    )
    assert inv_freq.shape == expected_inv_freq.shape == (64,)
    torch.testing.assert_close(inv_freq, expected_inv_freq.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)
    # The case must actually scale something, or it would test nothing.
    plain, _ = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None, cfg.max_position_embeddings)
    assert not torch.allclose(inv_freq, plain) or factor != 1.0


# Full-model parity with scaled RoPE. A small original context (64) puts the tiny model's positions
# in every regime of the scaling (kept, smoothed / ramped, and fully scaled frequencies).
SCALED_MODELS = {
    "llama3": ("llama", dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64)),
    "yarn": ("qwen2", dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                           original_max_position_embeddings=64)),
    "yarn-mscale": ("qwen3", dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0,
                                  mscale_all_dim=0.5, original_max_position_embeddings=64)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SCALED_MODELS))
def test_scaled_rope_model_parity(tmp_path, name):
    family, rope_parameters = SCALED_MODELS[name]
    model_dir = make_tiny_checkpoint(family, tmp_path, rope_parameters=rope_parameters)
    ref, ours = load_pair(model_dir)
    assert ours.config.rope_scaling["rope_type"] == rope_parameters["rope_type"]
    run = PagedRun(ours, seed=3)
    seqs = [run.new_seq(48), run.new_seq(48)]
    run.step([(seqs[0], prompt(30, 20)), (seqs[1], prompt(17, 21))])
    run.step([(seqs[1], prompt(12, 22)), (seqs[0], [run.greedy(seqs[0])])])  # chunked + decode
    for _ in range(4):
        run.step([(s, [run.greedy(s)]) for s in seqs])
    diff = max_diff(ref, seqs)
    print(f"{name}: scaled rope max abs diff {diff:.2e}")
    assert diff <= TOL

    # The scaling must matter at these positions, or this test would not see it.
    plain_dir = make_tiny_checkpoint(family, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = torch.tensor([seqs[0].tokens])
        assert (plain(tokens).logits - ref(tokens).logits).abs().max() > 100 * TOL


# 4. Sliding window (window 4, 12-token prompts): prefill, chunked prefill and decode. Mistral, and
# qwen2 with the window on every layer (max_window_layers=0).
WINDOWED = {
    "mistral": ("mistral", dict(sliding_window=4)),
    "qwen2": ("qwen2", dict(sliding_window=4, use_sliding_window=True, max_window_layers=0)),
}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(WINDOWED))
def test_sliding_window_parity(tmp_path, name, attn_implementation):
    family, overrides = WINDOWED[name]
    model_dir = make_tiny_checkpoint(family, tmp_path, **overrides)
    ref, ours = load_pair(model_dir, attn_implementation)
    assert ours.config.sliding_window == 4
    run = PagedRun(ours, seed=4, sliding_window=ours.config.sliding_window)
    a, b, c = run.new_seq(24), run.new_seq(24), run.new_seq(24)
    c_prompt = prompt(12, 32)
    run.step([(a, prompt(12, 30)), (b, prompt(3, 31)), (c, c_prompt[:5])])
    run.step([(c, c_prompt[5:]), (a, [run.greedy(a)]), (b, [run.greedy(b)])])
    for _ in range(5):
        run.step([(s, [run.greedy(s)]) for s in (a, b, c)])
    diff = max_diff(ref, [a, b, c])
    print(f"{name} sliding window ({attn_implementation} reference): max abs diff {diff:.2e}")
    assert diff <= TOL

    # transformers does apply the window here: without it the logits differ well beyond tolerance.
    unwindowed_config = AutoConfig.from_pretrained(model_dir)
    unwindowed_config.sliding_window = None
    if getattr(unwindowed_config, "layer_types", None):
        unwindowed_config.layer_types = ["full_attention"] * unwindowed_config.num_hidden_layers
    unwindowed = AutoModelForCausalLM.from_pretrained(
        model_dir, config=unwindowed_config, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    with torch.no_grad():
        tokens = torch.tensor([a.tokens])
        assert (unwindowed(tokens).logits - ref(tokens).logits).abs().max() > 100 * TOL
