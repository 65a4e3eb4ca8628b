"""Where llmaas keeps its files: LLMAAS_HOME, default ~/.cache/llmaas."""

from __future__ import annotations

import os
from pathlib import Path


def llmaas_home() -> Path:
    home = Path(os.environ.get("LLMAAS_HOME") or Path.home() / ".cache" / "llmaas")
    home.mkdir(parents=True, exist_ok=True)
    return home


def model_cache_dir() -> Path:
    path = llmaas_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path
