"""BERT-family encoder (all-MiniLM-L6-v2 and kin) for embeddings, on packed batches.

A batch is several sequences laid end to end ([T] tokens, no padding): every matmul, LayerNorm and
the MLP run on the real tokens only. Only attention needs a [batch, length] layout; the sequences
arrive sorted by length and are cut into groups of similar length (`PackedBatch`), each padded to
its own longest member, so padding costs little even when one long text shares a batch with many
short ones. Loaded from an HF-format directory (config.json + safetensors); q/k/v are fused at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmaas.errors import ModelLoadError
from llmaas.models.config import EMBEDDING_FAMILIES, read_config_json
from llmaas.models.loader import read_safetensors

# At most this share of an attention group's [count x longest] slots may be padding.
ATTENTION_PAD_SLACK = 1.25


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    family: str = "bert"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _int_field(cfg: dict[str, Any], key: str, path: Path, minimum: int = 1) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelLoadError(f"{path}: config field '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def bert_config_from_dict(cfg: dict[str, Any], path: Path) -> BertConfig:
    """What our encoder needs; anything that would change its arithmetic and that it does not do is
    refused by name (a silently different model is worse than none)."""
    if cfg.get("model_type") not in EMBEDDING_FAMILIES:
        raise ModelLoadError(f"{path}: model_type {cfg.get('model_type')!r} is not a BERT encoder")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ModelLoadError(f"{path}: hidden_act {cfg.get('hidden_act')!r} is not supported (only gelu)")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(
            f"{path}: position_embedding_type {cfg.get('position_embedding_type')!r} is not supported "
            "(only absolute)"
        )
    for flag in ("is_decoder", "add_cross_attention"):
        if cfg.get(flag):
            raise ModelLoadError(f"{path}: {flag}=true is not supported (an encoder only)")
    hidden, heads = _int_field(cfg, "hidden_size", path), _int_field(cfg, "num_attention_heads", path)
    if hidden % heads:
        raise ModelLoadError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return BertConfig(
        vocab_size=_int_field(cfg, "vocab_size", path),
        hidden_size=hidden,
        intermediate_size=_int_field(cfg, "intermediate_size", path),
        num_layers=_int_field(cfg, "num_hidden_layers", path),
        num_heads=heads,
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        max_position_embeddings=_int_field(cfg, "max_position_embeddings", path),
        type_vocab_size=_int_field(cfg, "type_vocab_size", path) if "type_vocab_size" in cfg else 2,
        raw=cfg,
    )


@dataclass
class AttentionGroup:
    """Consecutive sequences of a packed batch (tokens start:end) attended as one padded block."""

    start: int
    end: int
    count: int
    longest: int
    gather: torch.Tensor | None  # [count * longest]: the group's token behind each padded slot
    real_slots: torch.Tensor | None  # [end - start]: the padded slot of each real token
    key_mask: torch.Tensor | None  # [count, 1, 1, longest]: True where a key is a real token


@dataclass
class PackedBatch:
    """Sequences end to end, shortest first. `seq_index[t]`: which sequence token t belongs to."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    seq_index: torch.Tensor  # [T]
    lengths: torch.Tensor  # [num_seqs]
    groups: list[AttentionGroup]

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)


def _groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Cut sorted lengths into runs [i, j) whose padding stays within ATTENTION_PAD_SLACK."""
    runs, i = [], 0
    while i < len(lengths):
        j, total = i + 1, lengths[i]
        while j < len(lengths) and (j - i + 1) * lengths[j] <= ATTENTION_PAD_SLACK * (total + lengths[j]):
            total += lengths[j]
            j += 1
        runs.append((i, j))
        i = j
    return runs


def pack_sequences(sequences: list[list[int]], device: torch.device | str = "cpu") -> PackedBatch:
    """A PackedBatch of token-id lists that are already sorted by length (shortest first)."""
    lengths = [len(s) for s in sequences]
    if any(b < a for a, b in zip(lengths, lengths[1:])):
        raise ValueError("pack_sequences wants the sequences sorted by length")
    flat = [t for s in sequences for t in s]
    groups, offset = [], 0
    for i, j in _groups(lengths):
        group_lengths = lengths[i:j]
        count, longest, size = j - i, group_lengths[-1], sum(group_lengths)
        gather = real_slots = key_mask = None
        if any(n != longest for n in group_lengths):
            slot_token = torch.zeros(count, longest, dtype=torch.long)  # padding reads token 0, masked
            real = torch.zeros(count, longest, dtype=torch.bool)
            first = 0
            for row, n in enumerate(group_lengths):
                slot_token[row, :n] = torch.arange(first, first + n)
                real[row, :n] = True
                first += n
            gather = slot_token.flatten().to(device)
            real_slots = real.flatten().nonzero().squeeze(1).to(device)
            key_mask = real[:, None, None, :].to(device)
        groups.append(AttentionGroup(offset, offset + size, count, longest, gather, real_slots, key_mask))
        offset += size
    return PackedBatch(
        input_ids=torch.tensor(flat, dtype=torch.long, device=device),
        positions=torch.cat([torch.arange(n) for n in lengths]).to(device),
        seq_index=torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device),
        lengths=torch.tensor(lengths, device=device),
        groups=groups,
    )


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(h, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, h)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def _attend(self, qkv: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        out = torch.empty(qkv.shape[0], qkv.shape[1] // 3, dtype=qkv.dtype, device=qkv.device)
        for g in batch.groups:
            part = qkv[g.start : g.end]
            if g.gather is not None:
                part = part.index_select(0, g.gather)
            q, k, v = part.view(g.count, g.longest, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=g.key_mask)  # [count, heads, L, d]
            ctx = ctx.transpose(1, 2).reshape(g.count * g.longest, -1)
            out[g.start : g.end] = ctx if g.real_slots is None else ctx.index_select(0, g.real_slots)
        return out

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_out(self._attend(self.qkv(x), batch)))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        self.embeddings_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def attention_layers(self) -> list[nn.Module]:
        return []  # no KV cache: an encoder sees each text once (models/report.py)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """The last hidden state of every token of the batch, [T, hidden]."""
        x = (
            self.word_embeddings(batch.input_ids)
            + self.position_embeddings(batch.positions)
            + self.token_type_embeddings.weight[0]  # one segment: type 0 throughout
        )
        x = self.embeddings_norm(x)
        for layer in self.layers:
            x = layer(x, batch)
        return x


# HF name (after an optional "bert." prefix) -> ours; {i} is the layer index.
_NAMES = {
    "embeddings.word_embeddings.weight": "word_embeddings.weight",
    "embeddings.position_embeddings.weight": "position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embeddings_norm.weight",
    "embeddings.LayerNorm.bias": "embeddings_norm.bias",
}
_LAYER_NAMES = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up",
    "output.dense": "down",
    "output.LayerNorm": "mlp_norm",
}
_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
# Present in BERT checkpoints, unused by a sentence encoder: the position-id buffer, the pooler (its
# [CLS] projection) and a masked-LM head.
_UNUSED_PREFIXES = ("embeddings.position_ids", "pooler.", "cls.")


def _state_dict(cfg: BertConfig, tensors: dict[str, torch.Tensor], origin: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    unknown = []
    for hf_name, tensor in tensors.items():
        name = hf_name.removeprefix("bert.")
        if name.startswith(_UNUSED_PREFIXES):
            continue
        if name in _NAMES:
            state[_NAMES[name]] = tensor
            continue
        parts = name.split(".")
        if len(parts) >= 5 and parts[:2] == ["encoder", "layer"] and parts[2].isdigit():
            layer, module, kind = int(parts[2]), ".".join(parts[3:-1]), parts[-1]
            if module in _QKV:
                qkv_parts.setdefault((layer, kind), {})[_QKV.index(module)] = tensor
                continue
            if module in _LAYER_NAMES:
                state[f"layers.{layer}.{_LAYER_NAMES[module]}.{kind}"] = tensor
                continue
        unknown.append(hf_name)
    if unknown:
        raise ModelLoadError(f"{origin}: tensors a BERT encoder does not have: {sorted(unknown)[:5]}")
    for (layer, kind), pieces in qkv_parts.items():
        if len(pieces) != 3:
            raise ModelLoadError(f"{origin}: layer {layer} lacks some of its query/key/value {kind}s")
        state[f"layers.{layer}.qkv.{kind}"] = torch.cat([pieces[i] for i in range(3)])
    return state


def load_bert(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> BertEncoder:
    """Our encoder with the directory's weights; a tensor missing, extra or of the wrong shape fails."""
    model_dir = Path(model_dir)
    cfg = bert_config_from_dict(read_config_json(model_dir), model_dir / "config.json")
    state = _state_dict(cfg, read_safetensors(model_dir), model_dir)
    with torch.device("meta"):
        model = BertEncoder(cfg)
    expected = model.state_dict()
    missing, extra = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or extra:
        raise ModelLoadError(
            f"{model_dir}: weights do not match a BERT encoder of this config "
            f"(missing: {sorted(missing)[:5]}, unexpected: {sorted(extra)[:5]})"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelLoadError(
                f"{model_dir}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)
