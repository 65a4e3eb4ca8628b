"""GGUF file -> Hugging Face-format directory (config.json, bf16 safetensors, tokenizer.json).

Why convert instead of reading GGUF at serve time: the engine wants plain bf16 tensors under HF names,
and one converted directory is loaded in well under a second afterwards. Conversion happens once;
`catalog.resolve_model_dir` caches the result.

Two llama.cpp conventions are undone here:
- llama.cpp's converter permutes the rows of the q and k projections of llama-architecture models so
  that its rotary embedding can rotate *adjacent* pairs (x0, x1), (x2, x3)...; HF's rotates the two
  *halves* of each head (rotate_half). `unpermute_rows` restores the HF order.
- the tokenizer lives in metadata (tokens, merges, token types, a pre-tokenizer *name*); we rebuild a
  `tokenizers` byte-level BPE from it, with the split rule llama.cpp uses for that name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from llmaas.errors import ModelLoadError
from llmaas.models.tokenizer import TURN_END_TOKENS

# Bump when the output format changes, so cached conversions are redone (it is part of the cache key).
CONVERTER_VERSION = 1

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_HF_ARCH = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

# GGUF leaf name -> HF leaf name inside model.layers.N
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# Pre-tokenizer split rules, by the `tokenizer.ggml.pre` name llama.cpp writes (see llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# smollm/starcoder: every digit is its own piece (llama.cpp: "\p{N}" first, then the GPT-2 rule) —
# the same as HF's Digits(individual_digits=True) + ByteLevel in SmolLM's own tokenizer.json.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r")
_GPT2_ONLY = ("gpt2", "mpt", "olmo", "jais")
_LLAMA3_LIKE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx", "pixtral")
_QWEN2_LIKE = ("qwen2", "deepseek-r1-qwen", "stablelm2")
SUPPORTED_PRE_TOKENIZERS = _DIGITS_THEN_GPT2 + _GPT2_ONLY + _LLAMA3_LIKE + _QWEN2_LIKE

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class _Metadata:
    """Typed access to a GGUFReader's key/value fields, with errors that name the file and key."""

    def __init__(self, reader: Any, path: Path):
        self.reader = reader
        self.path = path
        self.arch = str(self.get("general.architecture"))

    def get(self, key: str, default: Any = ...) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ModelLoadError(f"{self.path}: GGUF metadata has no {key!r}", param="model")
            return default
        return field.contents()

    def arch_int(self, key: str, default: Any = ...) -> Any:
        value = self.get(f"{self.arch}.{key}", default)
        return int(value) if value is not None and value is not ... else value

    def arch_float(self, key: str, default: Any = ...) -> Any:
        value = self.get(f"{self.arch}.{key}", default)
        # Metadata floats are float32; print them the short way (1e-05, not 9.999999747378752e-06).
        return float(str(np.float32(value))) if value is not None and value is not ... else value


def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` for `path`, or ModelLoadError naming the file if it is not a readable GGUF."""
    import gguf

    path = Path(path)
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct/IndexError, OSError...
        raise ModelLoadError(
            f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})", param="model"
        ) from exc


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head, n_head_kv)` on the q/k projection rows (or bias).

    llama.cpp stores, within each head, row pairs (j, j + d/2) of HF's rotate-half layout as adjacent
    rows (2j, 2j + 1). We reshape to (head, j, pair) and swap back to (head, pair, j).
    """
    rows = weight.shape[0]
    head_dim = rows // n_head
    if head_dim * n_head != rows or head_dim % 2:
        raise ValueError(f"cannot un-permute {rows} rows into {n_head} heads")
    w = weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(weight.shape))


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF parameter name for a GGUF tensor name, or None if we do not know it."""
    if gguf_name in _TOP_TENSORS:
        return _TOP_TENSORS[gguf_name]
    m = _LAYER_NAME.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def build_config(meta: _Metadata, tensor_names: set[str], vocab_rows: int) -> dict[str, Any]:
    """config.json contents from GGUF metadata (llama.cpp key names -> HF key names)."""
    arch = meta.arch
    model_type, hf_class = _HF_ARCH[arch]
    hidden = meta.arch_int("embedding_length")
    n_head = meta.arch_int("attention.head_count")
    head_dim = meta.arch_int("attention.key_length", None) or hidden // n_head
    rope_dims = meta.arch_int("rope.dimension_count", None)
    if rope_dims is not None and rope_dims != head_dim:
        raise ModelLoadError(
            f"{meta.path}: partial rotary embedding ({rope_dims} of {head_dim} dims) is not supported",
            param="model",
        )
    scaling = meta.get(f"{arch}.rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise ModelLoadError(f"{meta.path}: rope scaling {scaling!r} is not supported", param="model")
    rope_theta = meta.arch_float("rope.freq_base", 10000.0)
    bos = meta.get("tokenizer.ggml.bos_token_id", None)
    eos = meta.get("tokenizer.ggml.eos_token_id", None)
    pad = meta.get("tokenizer.ggml.padding_token_id", None)
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": meta.arch_int("feed_forward_length"),
        "num_hidden_layers": meta.arch_int("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.arch_int("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": meta.arch_float("attention.layer_norm_rms_epsilon"),
        "rope_theta": rope_theta,
        # transformers 5 reads rope_parameters; older readers read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": meta.arch_int("context_length"),
        "vocab_size": vocab_rows,
        # llama.cpp writes output.weight only when it differs from the embedding
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "use_cache": True,
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    return config


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the spelling of byte-level BPE vocabularies)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes get the next code points after 255, in byte order
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer(pre: str, path: Path) -> tuple[Any, Any]:
    """(normalizer, pre_tokenizer) for a llama.cpp pre-tokenizer name."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    byte_level_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    byte_level_plain = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    if pre in _DIGITS_THEN_GPT2:
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level_regex]
        )
    if pre in _GPT2_ONLY:
        return None, byte_level_regex
    if pre in _LLAMA3_LIKE:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False)
        return None, pre_tokenizers.Sequence([split, byte_level_plain])
    if pre in _QWEN2_LIKE:
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False)
        return normalizers.NFC(), pre_tokenizers.Sequence([split, byte_level_plain])
    raise ModelLoadError(
        f"{path}: unsupported tokenizer pre-tokenizer {pre!r} "
        f"(supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)})",
        param="model",
    )


def build_tokenizer(meta: _Metadata) -> Any:
    """A `tokenizers.Tokenizer` (byte-level BPE) equivalent to the one the GGUF metadata describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"{meta.path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')",
            param="model",
        )
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens"))
    types: list[int] = [int(t) for t in meta.get("tokenizer.ggml.token_type", [1] * len(tokens))]
    if len(types) != len(tokens):
        raise ModelLoadError(f"{meta.path}: {len(tokens)} tokens but {len(types)} token types", param="model")
    merges_raw: list[str] = list(meta.get("tokenizer.ggml.merges"))
    pre = str(meta.get("tokenizer.ggml.pre", "gpt2"))
    normalizer, pre_tokenizer = _pre_tokenizer(pre, meta.path)

    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
        if token_type not in (_CONTROL, _USER_DEFINED) and not set(token) <= alphabet:
            # A normal token stored as raw text: spell its UTF-8 bytes in the byte alphabet.
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]

    ignore_merges = pre in _LLAMA3_LIKE  # Llama 3's tokenizer.json sets it; a whole-word vocab hit wins
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges))
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _CONTROL
        ]
    )
    user_defined = [t for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED]
    if user_defined:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

    post = processors.ByteLevel(trim_offsets=False)
    bos_id = meta.get("tokenizer.ggml.bos_token_id", None)
    if bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None:
        bos = tokens[int(bos_id)]
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
        )
        post = processors.Sequence([post, template])
    tokenizer.post_processor = post
    return tokenizer


def _eos_ids(meta: _Metadata, tokens: list[str], chat_template: str | None) -> list[int]:
    """Ids that end generation: eos, llama.cpp's eot/eom, and any turn-end token the template writes."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = meta.get(key, None)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if chat_template:
        for index, token in enumerate(tokens):
            if token in TURN_END_TOKENS and token in chat_template and index not in ids:
                ids.append(index)
    return ids


def _tokenizer_files(meta: _Metadata, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_config.json, generation_config.json) contents."""
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens"))
    chat_template = meta.get("tokenizer.chat_template", None)

    def token(key: str) -> str | None:
        value = meta.get(key, None)
        return None if value is None or int(value) >= len(tokens) else tokens[int(value)]

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": chat_template,
    }
    generation_config = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": _eos_ids(meta, tokens, chat_template),
        "pad_token_id": config["pad_token_id"],
    }
    return tokenizer_config, generation_config


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, *, progress: bool = True, max_shard_bytes: int = 4 << 30
) -> Path:
    """Write an HF-format copy of `gguf_path` into `out_dir` (created; should be empty). Returns out_dir.

    Every tensor is dequantized to float32 and stored as bf16; the engine re-quantizes as it likes.
    """
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    meta = _Metadata(reader, gguf_path)
    if meta.arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{gguf_path}: architecture {meta.arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
            param="model",
        )
    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ModelLoadError(f"{gguf_path}: no token_embd.weight tensor", param="model")
    unknown = sorted(n for n in names if hf_tensor_name(n) is None)
    if unknown:
        raise ModelLoadError(f"{gguf_path}: unsupported tensors {unknown[:5]}", param="model")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config = build_config(meta, names, vocab_rows=int(embd.shape[-1]))
    tokenizer_config, generation_config = _tokenizer_files(meta, config)
    tokenizer = build_tokenizer(meta)

    out_dir.mkdir(parents=True, exist_ok=True)
    permute_heads = {}
    if meta.arch == "llama":  # only llama.cpp's LlamaModel permutes; Qwen2/Qwen3 are stored as in HF
        permute_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    bar = tqdm(reader.tensors, desc=f"converting {gguf_path.name}", unit="tensor", disable=not progress)
    for t in bar:
        try:
            values = dequantize(t.data, GGMLQuantizationType(t.tensor_type))
        except Exception as exc:
            raise ModelLoadError(f"{gguf_path}: cannot dequantize {t.name} ({exc})", param="model") from exc
        values = np.asarray(values, dtype=np.float32)
        leaf = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        if leaf in permute_heads:
            values = unpermute_rows(values, permute_heads[leaf])
        if not values.flags.writeable or not values.flags.c_contiguous:
            values = np.array(values, dtype=np.float32, order="C")
        tensor = torch.from_numpy(values).to(torch.bfloat16)
        if shard_bytes and shard_bytes + tensor.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][hf_tensor_name(t.name)] = tensor
        shard_bytes += tensor.nbytes
    bar.close()

    metadata = {"format": "pt"}
    if len(shards) == 1:
        _save_readable(save_file, shards[0], out_dir / "model.safetensors", metadata)
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save_readable(save_file, shard, out_dir / file, metadata)
            for name, tensor in shard.items():
                weight_map[name] = file
                total += tensor.nbytes
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(out_dir / "model.safetensors.index.json", index)

    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation_config)
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(
        out_dir / "llmaas_source.json", {"gguf": str(gguf_path), "converter_version": CONVERTER_VERSION}
    )
    return out_dir


def _save_readable(save_file: Any, tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)
    path.chmod(
        0o644
    )  # safetensors creates 0600; the cache may be shared with a server running as another user


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
