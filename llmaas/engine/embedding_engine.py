"""EmbeddingEngine: token ids in, sentence vectors out, for a BERT-family encoder.

Synchronous, for one thread (AsyncEmbeddingEngine drives it for the server). `embed` takes any number
of texts' token ids, sorts them by length and runs them as packed forward passes of at most
`max_batch_tokens` tokens each (models/bert.py: no padding in the matmuls, attention padded per group
of similar lengths). Each input is checked against the model's limit here, the one place that rule
lives; the server asks `check_input` before admission, so a too-long input costs no hold.
"""

from __future__ import annotations

import logging
import time

import torch

from llmaas.engine.fingerprint import system_fingerprint
from llmaas.engine.llm_engine import EngineConfig
from llmaas.errors import ContextLengthExceededError, InvalidRequestError
from llmaas.kernels import cpu_ops
from llmaas.models.bert import load_bert, pack_sequences
from llmaas.models.catalog import resolve_model_dir
from llmaas.models.packed_linear import pack_linears
from llmaas.models.report import describe_model
from llmaas.models.sentence_head import load_sentence_head, pool
from llmaas.models.tokenizer import Tokenizer

log = logging.getLogger("llmaas.engine")

DEFAULT_MAX_BATCH_TOKENS = 8192  # tokens in one forward pass: big matmuls, bounded memory


class EmbeddingEngine:
    def __init__(self, config: EngineConfig, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        device = config.torch_device()
        dtype = config.torch_dtype()
        t0 = time.perf_counter()
        self.config = config
        self.device = device
        self.model_dir = resolve_model_dir(config.model)
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.model = load_bert(self.model_dir, dtype=dtype, device=device)
        self.model_config = self.model.config
        self.model_report = describe_model(self.model, dtype)
        self.head = load_sentence_head(self.model_dir, self.model_config.hidden_size)
        if config.pack_weights:
            pack_linears(self.model)
        if device.type == "cpu":
            cpu_ops.available()  # build or load the native kernels now, not inside the first request
        positions = self.model_config.max_position_embeddings
        # The sentence-transformers limit when it gives one (what the model was trained for), within the
        # position table either way; special tokens count.
        self.max_input_tokens = min(self.head.max_seq_length or positions, positions, max_batch_tokens)
        self.max_batch_tokens = max_batch_tokens
        self.dimensions = self.head.dimensions
        self.special_prefix, self.special_suffix = self._special_tokens()
        self.num_forwards = 0  # forward passes run since start (/metrics; tests prove batching with it)
        self.num_inputs = 0
        self.system_fingerprint = system_fingerprint(
            self.model_dir,
            {
                "dtype": str(dtype),
                "device": device.type,
                "pack_weights": config.pack_weights,
                "max_input_tokens": self.max_input_tokens,
            },
        )
        log.info(
            "loaded %s (%s embeddings, %s, %d dimensions, %s pooling%s, up to %d tokens an input) in %.2fs",
            config.model,
            self.model_config.family,
            str(dtype).removeprefix("torch."),
            self.dimensions,
            self.head.pooling,
            ", normalized" if self.head.normalize else "",
            self.max_input_tokens,
            time.perf_counter() - t0,
        )

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after a text's own ([CLS] ... [SEP] for BERT), so that
        an input given as token ids gets the same frame as the same text given as a string."""
        bare = self.tokenizer.encode("a")
        framed = self.tokenizer.encode("a", add_special_tokens=True)
        for start in range(len(framed) - len(bare) + 1):
            if framed[start : start + len(bare)] == bare:
                return framed[:start], framed[start + len(bare) :]
        return [], []

    # ------------------------------------------------------------- inputs
    def prepare(self, inputs: list[str | list[int]]) -> list[list[int]]:
        """Each input (a text, or a text's own token ids) as the ids the model reads, checked against
        the model's limit; raises 400s naming `input`. Thread-safe: the server calls it from a worker."""
        prepared = []
        for i, item in enumerate(inputs):
            where = f"input[{i}]" if len(inputs) > 1 else "the input"
            if isinstance(item, str):
                if len(item) > self.max_input_chars:
                    raise InvalidRequestError(
                        f"{where} has {len(item)} characters; this model takes at most "
                        f"{self.max_input_chars} characters and {self.max_input_tokens} tokens an input.",
                        param="input",
                    )
                ids = self.tokenize(item)
            else:
                ids = self.frame(item)
            self.check_input(ids, where)
            prepared.append(ids)
        return prepared

    @property
    def max_input_chars(self) -> int:
        """A bound checked before tokenizing, so a megabyte string costs nothing. Generous: a WordPiece
        token spells at most 100 characters of a word (a longer word becomes one [UNK])."""
        return 100 * self.max_input_tokens

    def tokenize(self, text: str) -> list[int]:
        """A text's ids as the model reads them, special tokens included."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    def frame(self, token_ids: list[int]) -> list[int]:
        """Ids a client sent (a text's own tokens) as the model reads them, special tokens added."""
        vocab = self.model_config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is outside the vocabulary (0-{vocab - 1})", param="input"
            )
        return [*self.special_prefix, *token_ids, *self.special_suffix]

    def check_input(self, token_ids: list[int], where: str = "input") -> None:
        """400 context_length_exceeded when one input is longer than the model takes."""
        if len(token_ids) > self.max_input_tokens:
            raise ContextLengthExceededError(
                f"This model's maximum input length is {self.max_input_tokens} tokens, but {where} has "
                f"{len(token_ids)} tokens. Shorten it or split it.",
                param="input",
            )

    # ------------------------------------------------------------- forward
    @torch.inference_mode()
    def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """[len(inputs), dimensions] fp32 vectors, in the order given; sorted by length inside, and run
        as packed forward passes of at most max_batch_tokens tokens."""
        for ids in inputs:
            self.check_input(ids)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        out = torch.empty(len(inputs), self.dimensions, dtype=torch.float32)
        batch: list[int] = []
        tokens = 0
        for i in order:
            if batch and tokens + len(inputs[i]) > self.max_batch_tokens:
                out[batch] = self._forward([inputs[j] for j in batch])
                batch, tokens = [], 0
            batch.append(i)
            tokens += len(inputs[i])
        if batch:
            out[batch] = self._forward([inputs[j] for j in batch])
        return out

    def _forward(self, sorted_inputs: list[list[int]]) -> torch.Tensor:
        packed = pack_sequences(sorted_inputs, self.device)
        hidden = self.model(packed)
        self.num_forwards += 1
        self.num_inputs += len(sorted_inputs)
        return pool(self.head, hidden, packed.seq_index, packed.lengths).cpu()

    def stats(self) -> dict[str, float]:
        return {"embedding_forwards": self.num_forwards, "embedding_inputs": self.num_inputs}
