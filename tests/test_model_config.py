"""config.json and checkpoints we cannot serve faithfully are refused with a ModelLoadError naming why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmaas.errors import ModelLoadError
from llmaas.models.config import config_from_dict, load_config
from llmaas.models.loader import load_model
from tests.model_factory import make_tiny_checkpoint

VALID = dict(
    model_type="llama",
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    hidden_act="silu",
    eos_token_id=2,
)


def write_config(tmp_path: Path, cfg) -> Path:
    (tmp_path / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return tmp_path


def without(cfg: dict, key: str) -> dict:
    return {k: v for k, v in cfg.items() if k != key}


REFUSED = {
    "unknown model_type": ({**VALID, "model_type": "gpt2"}, ["model_type", "gpt2"]),
    "unsupported model_type": ({**VALID, "model_type": "dbrx"}, ["model_type", "dbrx"]),
    "no model_type": (without(VALID, "model_type"), ["model_type"]),
    "rope dynamic (legacy rope_scaling)": (
        {**VALID, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
        ["rope_type", "dynamic"],
    ),
    "rope unknown (rope_parameters)": (
        {**VALID, "rope_parameters": {"rope_type": "spiral", "rope_theta": 10000.0, "factor": 2.0}},
        ["rope_type", "spiral"],
    ),
    "rope longrope": (
        {**VALID, "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
        ["rope_type", "longrope"],
    ),
    "rope linear without factor": ({**VALID, "rope_scaling": {"rope_type": "linear"}}, ["factor"]),
    "rope llama3 without low_freq_factor": (
        {**VALID, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
        ["low_freq_factor"],
    ),
    "hidden_act gelu": ({**VALID, "hidden_act": "gelu"}, ["hidden_act", "gelu"]),
    "mlp_bias": ({**VALID, "mlp_bias": True}, ["mlp_bias"]),
    "missing hidden_size": (without(VALID, "hidden_size"), ["hidden_size"]),
    "missing num_attention_heads": (without(VALID, "num_attention_heads"), ["num_attention_heads"]),
    "missing vocab_size": (without(VALID, "vocab_size"), ["vocab_size"]),
    "missing num_hidden_layers": (without(VALID, "num_hidden_layers"), ["num_hidden_layers"]),
    "qwen2 window on some layers": (
        {
            **VALID,
            "model_type": "qwen2",
            "use_sliding_window": True,
            "sliding_window": 4,
            "max_window_layers": 1,
        },
        ["sliding_window"],
    ),
    "not JSON": ("{ this is not json", ["config.json", "JSON"]),
    "JSON but not an object": ("[1, 2, 3]", ["config.json", "object"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_config_refused(tmp_path, case):
    cfg, words = REFUSED[case]
    with pytest.raises(ModelLoadError) as err:
        load_config(write_config(tmp_path, cfg))
    for word in words:
        assert word in str(err.value)


def test_missing_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_config(tmp_path)


def test_valid_configs_read_as_transformers_would():
    llama = config_from_dict(VALID)
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (4, 2, 16)
    assert llama.rope_scaling is None and llama.sliding_window is None and not llama.attention_bias
    assert llama.eos_token_ids == [2]

    qwen2 = config_from_dict({**VALID, "model_type": "qwen2", "eos_token_id": [2, 5], "sliding_window": 4096})
    assert qwen2.attention_bias and not qwen2.qk_norm
    assert qwen2.sliding_window is None  # use_sliding_window is false
    assert qwen2.eos_token_ids == [2, 5]
    # transformers' qwen2 has q/k/v biases whatever attention_bias says.
    assert config_from_dict({**VALID, "model_type": "qwen2", "attention_bias": False}).attention_bias
    all_windowed = {**VALID, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4}
    assert config_from_dict({**all_windowed, "max_window_layers": 0}).sliding_window == 4
    assert config_from_dict({**all_windowed, "max_window_layers": 2}).sliding_window is None

    qwen3 = config_from_dict({**VALID, "model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": True})
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.tie_word_embeddings and not qwen3.attention_bias

    mistral = config_from_dict({**VALID, "model_type": "mistral", "sliding_window": 4096})
    assert mistral.sliding_window == 4096
    assert config_from_dict({**VALID, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    assert config_from_dict({**VALID, "sliding_window": 16}).sliding_window is None  # llama has none

    v5_rope = {"rope_type": "default", "rope_theta": 5e5}
    v5 = config_from_dict({**without(VALID, "rope_theta"), "rope_parameters": v5_rope})
    assert v5.rope_theta == 5e5 and v5.rope_scaling is None
    yarn = config_from_dict({**VALID, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert yarn.rope_scaling["rope_type"] == "yarn"
    assert yarn.rope_scaling["original_max_position_embeddings"] == 256  # defaults as transformers does


# Checkpoints whose tensors do not match their config.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("config-tests"))


def copy_with(checkpoint: Path, tmp_path: Path, edit) -> Path:
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint, model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return model_dir


def test_checkpoint_loads(checkpoint):
    model = load_model(checkpoint, dtype=torch.float32)
    assert model.config.family == "qwen2" and len(model.layers) == 2


def test_missing_layer_tensor(checkpoint, tmp_path):
    model_dir = copy_with(checkpoint, tmp_path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.down_proj\.weight"):
        load_model(model_dir, dtype=torch.float32)


def test_missing_part_of_fused_projection(checkpoint, tmp_path):
    model_dir = copy_with(checkpoint, tmp_path, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"layers\.0\.self_attn\.qkv_proj"):
        load_model(model_dir, dtype=torch.float32)


def test_missing_bias(checkpoint, tmp_path):
    model_dir = copy_with(checkpoint, tmp_path, lambda t: t.pop("model.layers.0.self_attn.q_proj.bias"))
    with pytest.raises(ModelLoadError, match="qkv_proj"):
        load_model(model_dir, dtype=torch.float32)


def test_wrong_shape(checkpoint, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 96)

    model_dir = copy_with(checkpoint, tmp_path, edit)
    with pytest.raises(ModelLoadError, match=r"layers\.0\.mlp\.down_proj\.weight.*\(64, 96\)"):
        load_model(model_dir, dtype=torch.float32)


def test_wrong_shape_inside_fused_projection(checkpoint, tmp_path):
    def edit(t):
        t["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(48, 64)

    model_dir = copy_with(checkpoint, tmp_path, edit)
    with pytest.raises(ModelLoadError, match=r"layers\.1\.self_attn\.qkv_proj"):
        load_model(model_dir, dtype=torch.float32)


def test_unexpected_tensor(checkpoint, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)

    model_dir = copy_with(checkpoint, tmp_path, edit)
    with pytest.raises(ModelLoadError, match=r"o_proj\.bias"):
        load_model(model_dir, dtype=torch.float32)


def test_config_with_more_layers_than_tensors(checkpoint, tmp_path):
    model_dir = copy_with(checkpoint, tmp_path, lambda t: None)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"layers\.2\."):
        load_model(model_dir, dtype=torch.float32)


def test_no_weights(checkpoint, tmp_path):
    model_dir = copy_with(checkpoint, tmp_path, lambda t: None)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(model_dir, dtype=torch.float32)


def test_corrupt_weights(checkpoint, tmp_path):
    model_dir = copy_with(checkpoint, tmp_path, lambda t: None)
    (model_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(model_dir, dtype=torch.float32)
