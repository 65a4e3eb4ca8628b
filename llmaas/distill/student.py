"""A student cut from its teacher: fewer layers (DistilBERT), optionally a narrower MLP (Minitron).

Layers: `num_layers` of the teacher's, evenly spaced with the first and the last always kept
(30 -> 10 keeps 0, 3, 6, 10, 13, 16, 19, 23, 26, 29), each initialised with the teacher's weights;
embeddings, final norm and head are the teacher's too, and so is the tokenizer.

MLP width: every kept layer keeps the `mlp_keep` share of its intermediate channels that matter most,
measured as the mean absolute activation entering `down_proj` over calibration text (Minitron's
activation-based importance). Rows of gate/up and columns of down are sliced; nothing is re-initialised.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from llmaas.distill.modeling import load_frozen, save_hf_model, sequence_hidden
from llmaas.errors import InvalidRequestError
from llmaas.models.config import DENSE_FAMILIES
from llmaas.models.dense import MLP, DenseDecoder


def select_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced layer indices, first and last included."""
    if student_layers < 1:
        raise InvalidRequestError("--student-layers must be at least 1", param="student_layers")
    if student_layers > teacher_layers:
        raise InvalidRequestError(
            f"--student-layers {student_layers} is deeper than the teacher ({teacher_layers} layers)",
            param="student_layers",
        )
    if student_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [round(i * step) for i in range(student_layers)]


def check_teacher(model: DenseDecoder, where: str) -> None:
    cfg = model.config
    if cfg.family not in DENSE_FAMILIES or getattr(cfg, "moe", None) is not None:
        raise InvalidRequestError(
            f"{where}: only dense teachers ({', '.join(DENSE_FAMILIES)}) can be cut into a student, "
            f"not {cfg.family!r}",
            param="teacher",
        )


@torch.no_grad()
def mlp_importance(model: DenseDecoder, calibration: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, mean |activation| of each intermediate channel over `calibration` [B, T] tokens."""
    sums = [torch.zeros(layer.mlp.intermediate) for layer in model.layers]
    count = [0]
    hooks = []
    for i, layer in enumerate(model.layers):

        def hook(_module, inputs, _output, i=i):
            act = inputs[0].float().abs().reshape(-1, inputs[0].shape[-1])
            sums[i] += act.sum(0).cpu()
            if i == 0:
                count[0] += act.shape[0]

        hooks.append(layer.mlp.down_proj.register_forward_hook(hook))
    try:
        for row in calibration:
            sequence_hidden(model, row.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return [s / max(count[0], 1) for s in sums]


def prune_mlp(layer_mlp: MLP, keep: torch.Tensor) -> MLP:
    """A new MLP holding only channels `keep` (sorted indices)."""
    inter = layer_mlp.intermediate
    w = layer_mlp.gate_up_proj.weight.data
    gate, up = w[:inter], w[inter:]
    new = MLP(w.shape[1], len(keep))
    new.gate_up_proj.weight.data = torch.cat([gate[keep], up[keep]], dim=0).clone()
    new.down_proj.weight.data = layer_mlp.down_proj.weight.data[:, keep].clone()
    return new.to(w.device, w.dtype)


def make_student(
    teacher_dir: str | Path,
    out_dir: str | Path,
    num_layers: int,
    mlp_keep: float = 1.0,
    calibration: torch.Tensor | None = None,
) -> Path:
    """Write an HF-format student directory cut from the teacher directory; returns it."""
    teacher_dir = Path(teacher_dir)
    if not 0.0 < mlp_keep <= 1.0:
        raise InvalidRequestError("--mlp-keep must be in (0, 1]", param="mlp_keep")
    model = load_frozen(teacher_dir)
    check_teacher(model, str(teacher_dir))
    cfg = model.config
    kept = select_layers(cfg.num_layers, num_layers)
    model.layers = torch.nn.ModuleList(model.layers[i] for i in kept)
    model.config = dataclasses.replace(cfg, num_layers=len(kept))
    updates: dict = {"num_hidden_layers": len(kept)}
    raw = json.loads((teacher_dir / "config.json").read_text(encoding="utf-8"))
    if isinstance(raw.get("layer_types"), list) and len(raw["layer_types"]) == cfg.num_layers:
        updates["layer_types"] = [raw["layer_types"][i] for i in kept]
    if "max_window_layers" in raw:  # qwen2/3: layers below this index use full attention
        updates["max_window_layers"] = sum(1 for i in kept if i < raw["max_window_layers"])
    if mlp_keep < 1.0:
        width = max(1, round(cfg.intermediate_size * mlp_keep))
        if calibration is None or calibration.numel() == 0:
            raise InvalidRequestError("MLP pruning needs calibration text (--data)", param="data")
        scores = mlp_importance(model, calibration)
        for layer, score in zip(model.layers, scores):
            keep = torch.topk(score, width).indices.sort().values
            layer.mlp = prune_mlp(layer.mlp, keep)
        model.config = dataclasses.replace(model.config, intermediate_size=width)
        updates["intermediate_size"] = width
    updates["llmaas_student_of"] = {"teacher": str(teacher_dir), "layers": kept, "mlp_keep": mlp_keep}
    return save_hf_model(model, out_dir, teacher_dir, updates, dtype=torch.float32)
