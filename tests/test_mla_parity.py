"""DeepSeek-V2 / V3 (latent attention + DeepSeekMoE) against transformers, and the latent KV cache.

Parity: fp32 logits within 1e-4 of one transformers forward over each sequence's full token list,
in batched prefill, token by token through our paged latent cache (decode attends in latent space),
chunked prefill over a cached prefix mixed with decodes, and decode batches on both attention paths
(the fused kernel for 1-2 rows, batched matmuls above).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmaas import SamplingParams
from llmaas.engine.llm_engine import EngineConfig
from llmaas.errors import ModelLoadError
from llmaas.llm import LLM
from llmaas.models.config import config_from_dict
from llmaas.models.deepseek_routing import v2_route, v3_route
from llmaas.models.loader import load_model
from llmaas.models.mla import MLAttention
from llmaas.models.moe import expert_token_counts
from llmaas.models.report import describe_model
from tests.model_factory import make_tiny_checkpoint
from tests.test_model_parity import TOL, PagedRun, load_pair, max_diff, prompt
from tests.torch_threads import one_torch_thread  # noqa: F401  (autouse: one thread here)

MLA_SIZES = dict(
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    head_dim=8,  # transformers' DeepSeek sizes its rotary table by head_dim: keep it = qk_rope_head_dim
    v_head_dim=20,  # differs from nope + rope, so a mixed-up head size cannot pass
)
MOE_SIZES = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
)
YARN = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
    beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
)  # fmt: skip
VARIANTS = {
    "v2-q_lora-greedy": ("deepseek_v2", dict(q_lora_rank=48, topk_method="greedy")),
    # attention_bias: biases on kv_a_proj_with_mqa and o_proj (q_proj has none)
    "v2-no_q_lora-group_limited-bias": (
        "deepseek_v2",
        dict(
            q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2, attention_bias=True
        ),
    ),
    "v3-noaux_tc": ("deepseek_v3", dict(q_lora_rank=48, n_group=4, topk_group=2)),
    # rotate-half rotary and yarn with mscale_all_dim (the softmax scale grows by mscale squared)
    "v3-yarn-no_interleave": (
        "deepseek_v3",
        dict(
            q_lora_rank=48,
            n_group=2,
            topk_group=1,
            rope_interleave=False,
            rope_parameters=YARN,
            v_head_dim=32,  # wider than qk_head_dim (24)
        ),
    ),
}


def make_deepseek(root: Path, family: str, **overrides) -> Path:
    """A tiny DeepSeek checkpoint; v3's selection bias is made non-zero so routing depends on it."""
    model_dir = make_tiny_checkpoint(family, root, **{**MLA_SIZES, **MOE_SIZES, **overrides})
    weights_path = model_dir / "model.safetensors"
    tensors = load_file(weights_path)
    gen = torch.Generator().manual_seed(7)
    for name, tensor in tensors.items():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = 0.1 * torch.randn(tensor.shape, generator=gen)
    save_file(tensors, weights_path, metadata={"format": "pt"})
    return model_dir


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    """Each variant's checkpoint, made once per module."""
    root = tmp_path_factory.mktemp("deepseek")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            family, overrides = VARIANTS[name]
            made[name] = make_deepseek(root, family, **overrides)
        return made[name]

    return get


@pytest.fixture(scope="module")
def variant_models(variant_dirs):
    """(transformers' model, ours) of a variant, loaded once per module."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_pair(variant_dirs(name))
        return loaded[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_batched_prefill_then_latent_decode(variant_models, name):
    ref, ours = variant_models(name)
    assert all(isinstance(a, MLAttention) for a in ours.attention_layers())
    run = PagedRun(ours, seed=1)
    lengths = [7, 13, 1, 4]
    seqs = [run.new_seq(L + 6) for L in lengths]
    run.step([(s, prompt(L, i)) for i, (s, L) in enumerate(zip(seqs, lengths, strict=True))])
    for _ in range(5):  # four rows: the batched-matmul decode path
        run.step([(s, [run.greedy(s)]) for s in seqs])
    for _ in range(2):  # two rows: the fused-kernel decode path
        run.step([(s, [run.greedy(s)]) for s in seqs[:2]])
    diff = max_diff(ref, seqs)
    print(f"{name}: batched prefill + latent decode max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("name", list(VARIANTS))
def test_chunked_prefill_over_cached_prefix_mixed_with_decode(variant_models, name):
    ref, ours = variant_models(name)
    run = PagedRun(ours, seed=2)
    a_prompt = prompt(21, 10)  # prefilled as 8 + 7 + 5 + 1 tokens
    a, b, c = run.new_seq(28), run.new_seq(20), run.new_seq(20)
    run.step([(a, a_prompt[:8]), (b, prompt(9, 11))])
    run.step([(a, a_prompt[8:15]), (c, prompt(5, 12)), (b, [run.greedy(b)])])
    run.step([(a, a_prompt[15:20]), (b, [run.greedy(b)]), (c, [run.greedy(c)])])
    run.step([(b, [run.greedy(b)]), (a, a_prompt[20:]), (c, [run.greedy(c)])])
    for _ in range(3):
        run.step([(s, [run.greedy(s)]) for s in (a, b, c)])
    diff = max_diff(ref, [a, b, c])
    print(f"{name}: chunked prefill + mixed decode max abs diff {diff:.2e}")
    assert diff <= TOL


def test_yarn_softmax_scale(variant_models):
    """With mscale_all_dim, DeepSeek multiplies the softmax scale by yarn mscale squared."""
    _, ours = variant_models("v3-yarn-no_interleave")
    cfg = ours.config
    assert cfg.softmax_scale == pytest.approx(24**-0.5 * (0.1 * torch.log(torch.tensor(4.0)).item() + 1) ** 2)
    assert not cfg.rope_interleave and cfg.rope_scaling["rope_type"] == "yarn"


# Routers against transformers' own router modules on many tokens (ids as sets: order is free).
def _same_routing(ours, theirs):
    our_w, our_ids = ours
    _, their_w, their_ids = theirs
    our_ids, order = our_ids.sort(dim=-1)
    their_ids, their_order = their_ids.sort(dim=-1)
    assert torch.equal(our_ids, their_ids)
    torch.testing.assert_close(our_w.gather(1, order), their_w.gather(1, their_order), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_v2_router_matches_transformers(method):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = DeepseekV2Config(
        hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, topk_method=method, n_group=4,
        topk_group=2, routed_scaling_factor=1.7,
    )  # fmt: skip
    router = DeepseekV2TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(500, 32, generator=torch.Generator().manual_seed(1))
    logits = x @ router.weight.T
    ours = v2_route(logits, 3, method, 4, 2, False, 1.7)
    _same_routing(ours, router(x))
    if method == "group_limited_greedy":  # the group limit must bite on these tokens
        greedy = v2_route(logits, 3, "greedy", 4, 2, False, 1.7)
        assert not torch.equal(ours[1].sort().values, greedy[1].sort().values)


def test_v2_norm_topk_prob_renormalizes_instead_of_scaling():
    """DeepSeek's V2 gate: with norm_topk_prob and k > 1 the k weights sum to 1 and are not scaled."""
    logits = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    weights, ids = v2_route(logits, 3, "greedy", 1, 1, True, 16.0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    assert torch.equal(ids, v2_route(logits, 3, "greedy", 1, 1, False, 16.0)[1])
    single, _ = v2_route(logits, 1, "greedy", 1, 1, True, 16.0)  # k = 1: scaled, as DeepSeek's code
    torch.testing.assert_close(single[:, 0], 16.0 * torch.softmax(logits, -1).amax(-1))


def test_v3_router_matches_transformers():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(
        hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5,
    )  # fmt: skip
    router = DeepseekV3TopkRouter(cfg)
    gen = torch.Generator().manual_seed(0)
    torch.nn.init.normal_(router.weight, std=0.5, generator=gen)
    router.e_score_correction_bias.copy_(0.2 * torch.randn(16, generator=gen))
    x = torch.randn(500, 32, generator=torch.Generator().manual_seed(1))
    logits = x @ router.weight.T
    ours = v3_route(logits, router.e_score_correction_bias, 4, 4, 2, True, 2.5)
    _same_routing(ours, router(x))
    unbiased = v3_route(logits, torch.zeros(16), 4, 4, 2, True, 2.5)
    assert not torch.equal(ours[1].sort().values, unbiased[1].sort().values)  # the bias steers selection


# The latent cache: what it holds per token, and the engine on top of it.
def test_cache_bytes_per_token_is_latent_plus_rope(variant_models):
    _, ours = variant_models("v2-q_lora-greedy")
    cfg = ours.config
    for dtype in (torch.float32, torch.bfloat16):
        expected = cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize
        assert describe_model(ours, dtype).kv_bytes_per_token == expected == 2 * 40 * dtype.itemsize
    # A dense attention of the same heads would cache 2 x heads x head dims per token and layer.
    assert cfg.kv_lora_rank + cfg.qk_rope_head_dim < 2 * cfg.num_heads * cfg.v_head_dim


def test_report_counts_routed_experts_as_inactive(variant_models):
    _, ours = variant_models("v3-noaux_tc")
    cfg = ours.config
    report = describe_model(ours, torch.float32)
    total = sum(p.numel() for p in ours.parameters())
    expert = 3 * cfg.hidden_size * cfg.moe.expert_intermediate_size
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    assert moe_layers == 1
    assert report.total_params == total
    assert report.active_params_per_token == total - moe_layers * (8 - 2) * expert


def test_multi_token_prediction_layers_are_skipped(variant_dirs, tmp_path):
    """V3 checkpoints carry num_nextn_predict_layers extra layers after the last one; we do not serve them."""
    model_dir = tmp_path / "v3"
    shutil.copytree(variant_dirs("v3-noaux_tc"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    tensors = load_file(model_dir / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert len(load_model(model_dir, dtype=torch.float32).layers) == 2
    (model_dir / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(ModelLoadError, match="eh_proj"):
        load_model(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def engine_model(variant_dirs, variant_models):
    """A v3 checkpoint for the engine, and transformers' model of it."""
    ref, _ = variant_models("v3-noaux_tc")
    return variant_dirs("v3-noaux_tc"), ref


def _reference_greedy(ref, tokens: list[int], n: int) -> list[int]:
    tokens = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(ref(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[-n:]


GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_engine_sizes_the_latent_cache_and_reuses_prefixes(engine_model):
    model_dir, ref = engine_model
    llm = LLM(config=EngineConfig(model=str(model_dir), dtype="float32", block_size=4, kv_cache_memory=2**18))
    runner = llm.engine.runner
    layers = llm.engine.model.attention_layers()
    assert runner.kv_bytes_per_token == 2 * (32 + 8) * 4
    assert runner.num_blocks == 2**18 // (runner.kv_bytes_per_token * 4)
    assert tuple(layers[0].cache.shape) == (1, runner.num_blocks, 4, 40)
    shared = prompt(16, 40)
    first = llm.generate([shared + [5, 6, 7]], GREEDY)[0]
    second = llm.generate([shared + [9, 10]], GREEDY)[0]
    assert first.cached_tokens == 0 and second.cached_tokens == 16
    assert first.outputs[0].token_ids == _reference_greedy(ref, shared + [5, 6, 7], 6)
    assert second.outputs[0].token_ids == _reference_greedy(ref, shared + [9, 10], 6)
    # Layer 1 is the MoE layer, 2 experts per token; tokens run: each prompt less its cached prefix,
    # plus the 5 sampled tokens fed back.
    counts = expert_token_counts(llm.engine.model)
    assert list(counts) == [1] and sum(counts[1]) == 2 * ((19 + 5) + (18 - 16 + 5))


def test_engine_preempts_and_chunks_deepseek(engine_model):
    model_dir, ref = engine_model
    # 10 blocks of 4 tokens: far fewer than 5 requests of ~20 tokens need together, so some are
    # preempted and recomputed; a 5-token step budget also splits every prompt into chunks.
    llm = LLM(
        config=EngineConfig(
            model=str(model_dir), dtype="float32", block_size=4, kv_cache_memory=10 * 4 * 320,
            max_num_batched_tokens=5,
        )
    )  # fmt: skip
    assert llm.engine.block_manager.num_blocks == 10
    prompts = [prompt(8 + 3 * i, 50 + i) for i in range(5)]
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _reference_greedy(ref, p, 6)


# Refusals, each naming its field.
BASE = dict(
    model_type="deepseek_v2", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=256, q_lora_rank=None, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
    moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy",
)  # fmt: skip
V3 = {**BASE, "model_type": "deepseek_v3", "topk_method": "noaux_tc", "n_group": 2, "topk_group": 1}


def _without(cfg: dict, key: str) -> dict:
    return {k: v for k, v in cfg.items() if k != key}


REFUSED = {
    "no num_experts_per_tok": (_without(BASE, "num_experts_per_tok"), "num_experts_per_tok"),
    "null num_experts_per_tok": ({**BASE, "num_experts_per_tok": None}, "num_experts_per_tok"),
    "no n_routed_experts": (_without(BASE, "n_routed_experts"), "n_routed_experts"),
    "unknown topk_method": ({**BASE, "topk_method": "noaux_tc"}, "topk_method"),
    "v3 greedy": ({**V3, "topk_method": "greedy"}, "topk_method"),
    "unknown scoring_func": ({**BASE, "scoring_func": "sigmoid"}, "scoring_func"),
    "v3 softmax": ({**V3, "scoring_func": "softmax"}, "scoring_func"),
    "rope dynamic": ({**BASE, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type"),
    "group routing without n_group": (
        {**BASE, "topk_method": "group_limited_greedy", "topk_group": 2},
        "n_group",
    ),
    "n_group not dividing experts": ({**V3, "n_group": 3}, "n_group"),
    "no kv_lora_rank": (_without(BASE, "kv_lora_rank"), "kv_lora_rank"),
    "gelu": ({**BASE, "hidden_act": "gelu"}, "hidden_act"),
    "fp8 weights": ({**V3, "quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_config_is_refused_by_name(tmp_path, case):
    cfg, field = REFUSED[case]
    with pytest.raises(ModelLoadError, match=field):
        config_from_dict(json.loads(json.dumps(cfg)), tmp_path / "config.json")


def test_dense_first_layers_and_moe_layer_freq():
    cfg = config_from_dict({**BASE, "num_hidden_layers": 6, "first_k_dense_replace": 1, "moe_layer_freq": 2})
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
    assert cfg.moe.shared_expert_intermediate_size == 32
    assert config_from_dict(V3).topk_method == "noaux_tc"
