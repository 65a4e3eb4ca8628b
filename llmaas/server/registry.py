"""The models this process serves, by name, and whether each is loaded yet."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmaas.engine.async_engine import AsyncEngine
from llmaas.errors import ModelNotFoundError
from llmaas.server.errors import ModelLoadingError


@dataclass
class ServedModel:
    name: str
    engine: AsyncEngine | None = None  # None while loading
    error: str | None = None  # why loading failed
    created: int = field(default_factory=lambda: int(time.time()))
    system_fingerprint: str | None = None  # set once loaded

    def attach(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.system_fingerprint = engine.system_fingerprint  # on every completion and chunk
        self.token_text, self.token_bytes = engine.token_text, engine.token_bytes  # for logprobs


class ModelRegistry:
    def __init__(self, names: list[str] | tuple[str, ...] = ()):
        self.models: dict[str, ServedModel] = {name: ServedModel(name) for name in names}

    def add(self, name: str, engine: AsyncEngine) -> None:
        self.models.setdefault(name, ServedModel(name)).attach(engine)

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(m.engine is not None for m in self.models.values())

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist or you do not have access to it.", param="model"
            )
        if model.engine is None:
            why = f"failed to load: {model.error}" if model.error else "is still loading; retry shortly"
            raise ModelLoadingError(f"The model '{name}' {why}", param="model")
        return model
