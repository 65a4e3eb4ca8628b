"""Training checkpoints: written atomically, checked for compatibility before a resume.

A checkpoint is one file, ``OUT/checkpoint/state.pt``: the student's weights, the optimizer and
scheduler states, the random number generators, the number of finished steps (which fixes the data
position) and the run's fingerprint — the settings that must not change across a resume. It is
written under a temporary name and renamed, so a kill during the write leaves the previous one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from llmaas.errors import InvalidRequestError

FORMAT_VERSION = 1


def checkpoint_path(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoint" / "state.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidRequestError(f"--resume: no checkpoint at {path}", param="resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise InvalidRequestError(
            f"--resume: {path} is not a readable checkpoint ({exc})", param="resume"
        ) from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise InvalidRequestError(f"--resume: {path} is not a checkpoint of this version", param="resume")
    return state


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Raise naming every setting that differs between the checkpoint's run and this one."""
    keys = sorted(set(saved) | set(current))
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise InvalidRequestError(
            f"--resume: the checkpoint in {where} is from an incompatible run ({'; '.join(diffs)})",
            param="resume",
        )
