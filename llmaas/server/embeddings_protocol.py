"""The body of POST /v1/embeddings (OpenAI's shape), and its response for /openapi.json.

`input` is a string, a list of strings, a list of token ids or a list of token-id lists, at most
MAX_EMBEDDING_INPUTS of them (OpenAI's bound); each token-id list at most MAX_INPUT_TOKEN_IDS long
before the model's own, smaller limit answers `context_length_exceeded` (EmbeddingEngine.check_input).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictInt

from llmaas.server.protocol import Text, TokenIds, _Body
from llmaas.server.request_ids import ClientRequestId

MAX_EMBEDDING_INPUTS = 2048
MAX_INPUT_TOKEN_IDS = 65_536

InputIds = Annotated[TokenIds, Field(min_length=1, max_length=MAX_INPUT_TOKEN_IDS)]


class EmbeddingRequest(_Body):
    model: Text
    input: (
        Annotated[Text, Field(min_length=1)]
        | Annotated[
            list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
        ]
        | InputIds
        | Annotated[list[InputIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector's little-endian float32 bytes"
    )
    dimensions: StrictInt | None = Field(
        None, ge=1, description="only the model's own size: no model served here can shorten its vectors"
    )
    user: Text | None = None
    request_id: ClientRequestId | None = Field(
        None, description="extension (vLLM's): the request's client id when no X-Client-Request-Id is sent"
    )


# ------------------------------------------------------------------ response (documentation only)
class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # a string with encoding_format "base64"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int  # the tokens the model read, special tokens included
    total_tokens: int
    cost: float | None = None  # USD, with billing


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
