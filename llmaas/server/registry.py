"""The models this process serves, by name, and whether each is loaded yet."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmaas.engine.async_embedding_engine import AsyncEmbeddingEngine
from llmaas.engine.async_engine import AsyncEngine
from llmaas.errors import InvalidRequestError, ModelNotFoundError
from llmaas.server.errors import ModelLoadingError

# What each kind of model answers; asking a model of the other kind is a 400 that says where to go.
GENERATION, EMBEDDINGS = "generation", "embeddings"
ENDPOINTS_OF = {
    GENERATION: "/v1/chat/completions, /v1/completions and /v1/responses",
    EMBEDDINGS: "/v1/embeddings",
}


@dataclass
class ServedModel:
    name: str
    engine: AsyncEngine | AsyncEmbeddingEngine | None = None  # None while loading
    error: str | None = None  # why loading failed
    created: int = field(default_factory=lambda: int(time.time()))
    system_fingerprint: str | None = None  # set once loaded

    @property
    def kind(self) -> str:
        return EMBEDDINGS if isinstance(self.engine, AsyncEmbeddingEngine) else GENERATION

    def attach(self, engine: AsyncEngine | AsyncEmbeddingEngine) -> None:
        self.engine = engine
        self.system_fingerprint = engine.system_fingerprint  # on every completion and chunk
        if self.kind == EMBEDDINGS:
            return  # no logprobs, so no token texts to cache
        self.token_text, self.token_bytes = engine.token_text, engine.token_bytes  # for logprobs


class ModelRegistry:
    def __init__(self, names: list[str] | tuple[str, ...] = ()):
        self.models: dict[str, ServedModel] = {name: ServedModel(name) for name in names}

    def add(self, name: str, engine: AsyncEngine | AsyncEmbeddingEngine) -> None:
        self.models.setdefault(name, ServedModel(name)).attach(engine)

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(m.engine is not None for m in self.models.values())

    def get(self, name: str, kind: str = GENERATION) -> ServedModel:
        """The loaded model `name`, which must be of `kind` (the endpoint's)."""
        model = self.models.get(name)
        if model is None:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist or you do not have access to it.", param="model"
            )
        if model.engine is None:
            why = f"failed to load: {model.error}" if model.error else "is still loading; retry shortly"
            raise ModelLoadingError(f"The model '{name}' {why}", param="model")
        if model.kind != kind:
            what = "an embedding" if model.kind == EMBEDDINGS else "a text generation"
            raise InvalidRequestError(
                f"The model '{name}' is {what} model: it serves {ENDPOINTS_OF[model.kind]}, not this "
                "endpoint.",
                param="model",
                code="model_not_supported",
            )
        return model
