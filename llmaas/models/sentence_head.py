"""How a sentence encoder turns token states into one vector: its sentence-transformers config.

A sentence-transformers folder lists its modules in modules.json: the Transformer (the encoder and its
`max_seq_length` in sentence_bert_config.json), a Pooling module (its mode in <path>/config.json),
and optionally Normalize (unit length). We read exactly that and refuse any other module or pooling
mode by name: an embedding pooled differently from how the model was trained is silently wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmaas.errors import ModelLoadError

_MODULE_PREFIX = "sentence_transformers.models."
KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
_OTHER_POOLING = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


@dataclass(frozen=True)
class SentenceHead:
    pooling: str  # "mean" (over every token, [CLS] and [SEP] included) or "cls"
    normalize: bool  # unit L2 length
    max_seq_length: int | None  # tokens, special ones included; None: the position table's size
    dimensions: int  # the vector's length


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(
            f"{path} is missing: an embedding model needs its sentence-transformers configuration "
            "(modules.json, the pooling module's config.json) to say how it pools",
            param="model",
        ) from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable JSON ({exc})", param="model") from exc


def _pooling_mode(config: Any, path: Path, hidden_size: int) -> tuple[str, int]:
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object", param="model")
    other = [key for key in _OTHER_POOLING if config.get(key)]
    chosen = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
    if other or len(chosen) != 1:
        raise ModelLoadError(
            f"{path}: pooling {other or chosen or 'none'} is not supported (exactly one of "
            f"{', '.join(POOLING_MODES)})",
            param="model",
        )
    dimensions = config.get("word_embedding_dimension", hidden_size)
    if dimensions != hidden_size:
        raise ModelLoadError(
            f"{path}: word_embedding_dimension {dimensions} is not the encoder's hidden_size {hidden_size}",
            param="model",
        )
    return chosen[0], dimensions


def load_sentence_head(model_dir: str | Path, hidden_size: int) -> SentenceHead:
    model_dir = Path(model_dir)
    modules = _read(model_dir / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelLoadError(f"{model_dir / 'modules.json'}: must be a list of modules", param="model")
    kinds = [str(m.get("type", "")).removeprefix(_MODULE_PREFIX) for m in modules]
    unknown = [k for k in kinds if k not in KNOWN_MODULES]
    if unknown or kinds[:1] != ["Transformer"] or kinds.count("Pooling") != 1:
        raise ModelLoadError(
            f"{model_dir / 'modules.json'}: modules {kinds} are not supported (Transformer, Pooling, "
            "then optionally Normalize)",
            param="model",
        )
    pooling_path = model_dir / str(modules[kinds.index("Pooling")].get("path", "")) / "config.json"
    pooling, dimensions = _pooling_mode(_read(pooling_path), pooling_path, hidden_size)
    max_seq_length = None
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.is_file():
        value = _read(st_config).get("max_seq_length")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
            raise ModelLoadError(f"{st_config}: max_seq_length must be an integer >= 2", param="model")
        max_seq_length = value
    return SentenceHead(pooling, "Normalize" in kinds, max_seq_length, dimensions)


def pool(
    head: SentenceHead, hidden: torch.Tensor, seq_index: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """[num_seqs, dimensions] fp32 sentence vectors from a packed batch's token states [T, hidden]."""
    hidden = hidden.float()
    if head.pooling == "mean":
        sums = torch.zeros(len(lengths), hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
        vectors = sums.index_add_(0, seq_index, hidden) / lengths[:, None].to(hidden.dtype)
    else:  # cls: each sequence's first token
        starts = torch.cumsum(lengths, 0) - lengths
        vectors = hidden.index_select(0, starts)
    return F.normalize(vectors, p=2, dim=1) if head.normalize else vectors
