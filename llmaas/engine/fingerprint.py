"""`system_fingerprint`: a short name for the model build and the engine configuration that serve a request.

OpenAI's field says "these backend settings changed" next to `seed`: the same fingerprint and seed should
give the same output. It is a hash of what changes the numbers a request gets back:

- the weights' identity: each file of the model directory (name, size, modification time). The files are
  not read (a multi-GB checkpoint would take seconds to hash); a rebuilt or replaced file has a new size
  or time. A GGUF source is converted once into a cached directory, so its fingerprint holds across
  restarts until that conversion is redone.
- the engine configuration that reaches the arithmetic: resolved dtype, device type, quantization,
  weight packing, KV block size, per-step token budget (prefill chunking), context length, prefix caching,
  the engine's seed, and this package's version.

Capacity settings (KV cache bytes, max running sequences) are left out: they change how many requests
run at once, not the program. Stable across restarts with one configuration; different when it changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FINGERPRINT_PREFIX = "fp_"
FINGERPRINT_HEX_DIGITS = 10  # the length OpenAI's fingerprints have (fp_ + 10 hex digits)


def weights_identity(model_dir: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of every regular file directly in `model_dir`, sorted by name."""
    files = []
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file():
            stat = path.stat()
            files.append((path.name, stat.st_size, stat.st_mtime_ns))
    return files


def system_fingerprint(model_dir: Path, settings: dict[str, Any]) -> str:
    """fp_ + 10 hex digits of the sha256 of the weights' identity and `settings` (JSON-able values)."""
    from llmaas import __version__

    described = {"weights": weights_identity(model_dir), "engine": settings, "llmaas": __version__}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
    return FINGERPRINT_PREFIX + digest[:FINGERPRINT_HEX_DIGITS]
