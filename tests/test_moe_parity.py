"""Sparse MoE families (mixtral, qwen2_moe, qwen3_moe) against transformers, fp32, max abs diff <= 1e-4.

The paged runs (prefill of mixed lengths, chunked prefill mixed with decodes, token-by-token decode)
come from the dense parity tests. Also here: what `save_pretrained` writes and the fused form both
load, MoE configs we cannot serve are refused by field name, per-expert token counts, and the
parameter / KV reports.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmaas.errors import ModelLoadError
from llmaas.models.config import config_from_dict
from llmaas.models.loader import load_model
from llmaas.models.moe import SparseMoeBlock, expert_token_counts, reset_expert_token_counts
from llmaas.models.report import describe_model
from llmaas.server.metrics import Metrics
from tests.test_model_parity import TOL, PagedRun, checkpoint_pairs, max_diff, prompt

EXPERTS, TOP_K = 8, 2
MODELS = {
    "mixtral": ("mixtral", dict(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=32)),
    "qwen2_moe": ("qwen2_moe", dict(
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, norm_topk_prob=False,
    )),
    # decoder_sparse_step and mlp_only_layers: of 4 layers only layer 1 is sparse (0, 2: step; 3: listed).
    "qwen2_moe-sparse-step": ("qwen2_moe", dict(
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, norm_topk_prob=True, num_hidden_layers=4,
        decoder_sparse_step=2, mlp_only_layers=[3],
    )),
    "qwen3_moe": ("qwen3_moe", dict(
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=32, norm_topk_prob=True,
    )),
    "mixtral-sliding-window": ("mixtral", dict(
        num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=32, sliding_window=4,
    )),
    "qwen3_moe-no-renorm": ("qwen3_moe", dict(
        num_experts=EXPERTS, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=False,
    )),
}  # fmt: skip


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    return checkpoint_pairs(tmp_path_factory.mktemp("moe"), MODELS)


def _run_mixed(ours, seed: int) -> list:
    """Prefills of mixed lengths, a chunked prefill beside decodes, then token-by-token decode."""
    run = PagedRun(ours, seed=seed, sliding_window=ours.config.sliding_window)
    a, b, c, d = run.new_seq(28), run.new_seq(24), run.new_seq(16), run.new_seq(16)
    a_prompt = prompt(17, seed + 10)
    run.step([(a, a_prompt[:6]), (b, prompt(11, seed + 11)), (c, prompt(1, seed + 12))])
    run.step([(a, a_prompt[6:13]), (d, prompt(4, seed + 13)), (b, [run.greedy(b)]), (c, [run.greedy(c)])])
    run.step([(a, a_prompt[13:]), (b, [run.greedy(b)]), (c, [run.greedy(c)]), (d, [run.greedy(d)])])
    for _ in range(5):
        run.step([(s, [run.greedy(s)]) for s in (a, b, c, d)])
    return [a, b, c, d]


@pytest.mark.parametrize("name", list(MODELS))
def test_paged_parity(moe_models, name):
    _, ref, ours = moe_models(name)
    reset_expert_token_counts(ours)
    seqs = _run_mixed(ours, seed=len(name))
    diff = max_diff(ref, seqs)
    print(f"{name}: max abs diff {diff:.2e}")
    assert diff <= TOL
    # Routing is not degenerate (a model routing everything to one expert would hide errors), and
    # every token was counted k times in every MoE layer.
    tokens = sum(len(s.tokens) for s in seqs)
    counts = expert_token_counts(ours)
    cfg = ours.config.moe
    assert sorted(counts) == list(cfg.sparse_layers)
    for per_expert in counts.values():
        assert sum(per_expert) == tokens * cfg.top_k
        assert sum(1 for c in per_expert if c) >= 4


def test_sparse_step_and_mlp_only_layers(moe_models):
    _, ref, ours = moe_models("qwen2_moe-sparse-step")
    is_moe = [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.layers]
    ref_moe = ["SparseMoe" in type(layer.mlp).__name__ for layer in ref.model.layers]
    assert is_moe == ref_moe == [False, True, False, False]


def test_fused_expert_tensors_load_too(moe_models, tmp_path):
    """transformers keeps experts as gate_up_proj [E, 2I, H] / down_proj [E, H, I]; that form loads."""
    model_dir, ref, ours = moe_models("qwen3_moe")
    tensors = load_file(model_dir / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(ours.config.num_layers):
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = [torch.cat([tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"]])
                   for e in range(EXPERTS)]  # fmt: skip
        fused[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        fused[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(EXPERTS)])
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    save_file(fused, tmp_path / "model.safetensors")
    again = load_model(tmp_path, dtype=torch.float32)
    for name, param in ours.state_dict().items():
        assert torch.equal(param, again.state_dict()[name]), name


def test_missing_expert_tensor_is_refused(moe_models, tmp_path):
    model_dir, _, _ = moe_models("mixtral")
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.experts\.gate_up.*\(5, 1\)"):
        load_model(tmp_path, dtype=torch.float32)


BASE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip
MIXTRAL = {**BASE, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
QWEN3 = {
    **BASE,
    "model_type": "qwen3_moe",
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
}
QWEN2 = {**QWEN3, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 48}


def _without(cfg: dict, key: str) -> dict:
    return {k: v for k, v in cfg.items() if k != key}


REFUSED = {
    "mixtral without num_experts_per_tok": (_without(MIXTRAL, "num_experts_per_tok"), "num_experts_per_tok"),
    "qwen3_moe without num_experts_per_tok": (_without(QWEN3, "num_experts_per_tok"), "num_experts_per_tok"),
    "mixtral without experts": (_without(MIXTRAL, "num_local_experts"), "num_experts"),
    "qwen2_moe without experts": (_without(QWEN2, "num_experts"), "num_experts"),
    "qwen2_moe without expert size": (_without(QWEN2, "moe_intermediate_size"), "moe_intermediate_size"),
    "qwen2_moe without shared expert size": (
        _without(QWEN2, "shared_expert_intermediate_size"), "shared_expert_intermediate_size"
    ),
    "top-k above the experts": ({**QWEN3, "num_experts_per_tok": 5}, "num_experts_per_tok"),
    "zero experts (transformers would go dense)": ({**QWEN3, "num_experts": 0}, "num_experts"),
    "zero sparse step": ({**QWEN3, "decoder_sparse_step": 0}, "decoder_sparse_step"),
    "mlp_only_layers not a list": ({**QWEN3, "mlp_only_layers": "all"}, "mlp_only_layers"),
    "non-silu experts": ({**MIXTRAL, "hidden_act": "gelu"}, "hidden_act"),
    "qwen2_moe window on some layers": ({**QWEN2, "use_sliding_window": True, "sliding_window": 8}, "slid"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_moe_config_refused_naming_the_field(case):
    cfg, field = REFUSED[case]
    with pytest.raises(ModelLoadError, match=field):
        config_from_dict(cfg)


def test_moe_configs_read_as_transformers_would():
    mixtral = config_from_dict(MIXTRAL).moe
    assert (mixtral.num_experts, mixtral.top_k, mixtral.expert_intermediate_size) == (4, 2, 128)
    assert mixtral.renormalize and mixtral.sparse_layers == (0, 1)
    qwen3 = config_from_dict({**_without(QWEN3, "num_experts"), "num_local_experts": 4})
    assert qwen3.qk_norm and qwen3.moe.num_experts == 4 and not qwen3.moe.renormalize
    qwen2 = config_from_dict(QWEN2)
    assert qwen2.attention_bias and qwen2.moe.shared_expert_intermediate_size == 48
    assert not config_from_dict({**QWEN2, "qkv_bias": False}).attention_bias
    assert config_from_dict({**MIXTRAL, "sliding_window": 16}).sliding_window == 16
    windowed = {**QWEN3, "use_sliding_window": True, "sliding_window": 16}
    assert config_from_dict(windowed).sliding_window == 16
    assert config_from_dict({**QWEN3, "sliding_window": 16}).sliding_window is None


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen2_moe-sparse-step"])
def test_report_counts_total_active_and_kv_bytes(moe_models, name):
    _, ref, ours = moe_models(name)
    cfg = ours.config
    report = describe_model(ours, torch.bfloat16)
    assert report.total_params == ref.num_parameters()
    expert = 3 * cfg.hidden_size * cfg.moe.expert_intermediate_size
    skipped = len(cfg.moe.sparse_layers) * (cfg.moe.num_experts - cfg.moe.top_k) * expert
    assert report.active_params_per_token == report.total_params - skipped
    assert report.kv_bytes_per_token == cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    assert report.as_dict()["kv_dtype"] == "bfloat16"


def test_engine_reports_and_exports_expert_counts(moe_models):
    from llmaas import SamplingParams
    from llmaas.engine.llm_engine import EngineConfig
    from llmaas.llm import LLM

    model_dir, ref, _ = moe_models("qwen2_moe")
    llm = LLM(config=EngineConfig(model=str(model_dir), dtype="float32", block_size=4, kv_cache_memory=2**20))
    assert llm.model_report.total_params > llm.model_report.active_params_per_token > 0
    out = llm.generate([[5, 6, 7, 8], [9, 10]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    # The engine (experts packed for oneDNN where it applies) decodes as transformers does.
    for o in out:
        tokens = list(o.prompt_token_ids)
        for _ in range(3):
            with torch.no_grad():
                tokens.append(int(ref(torch.tensor([tokens])).logits[0, -1].argmax()))
        assert o.outputs[0].token_ids == tokens[len(o.prompt_token_ids) :]
    fed = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in out)
    stats = llm.engine.stats()
    assert {layer: sum(c) for layer, c in stats["expert_tokens"].items()} == {0: fed * TOP_K, 1: fed * TOP_K}
    text = Metrics().render({"tiny-moe": stats})
    lines = [line for line in text.splitlines() if line.startswith("llmaas_moe_expert_tokens_total{")]
    assert len(lines) == 2 * EXPERTS
    assert sum(int(line.split()[-1]) for line in lines) == 2 * fed * TOP_K
    assert 'llmaas_moe_expert_tokens_total{expert="0",layer="1",model="tiny-moe"}' in text
