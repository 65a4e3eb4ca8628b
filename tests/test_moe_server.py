"""A served MoE model: /v1/models carries its size report (the openai SDK still parses it) and
/metrics exports the tokens each expert received."""

from __future__ import annotations

import httpx
import openai

from llmaas.server import create_app
from tests.model_factory import make_tiny_checkpoint
from tests.test_server_api import make_engine, serve


def test_models_metadata_and_expert_token_metrics(tmp_path):
    model_dir = make_tiny_checkpoint(
        "qwen3_moe", tmp_path, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
    )
    engine = make_engine(model_dir)
    report = engine.engine.model_report
    try:
        with serve(create_app({"tiny-moe": engine})) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            (card,) = client.models.list().data
            assert card.id == "tiny-moe"
            assert card.model_extra["metadata"] == {"family": "qwen3_moe", **report.as_dict()}
            assert client.models.retrieve("tiny-moe").model_extra["metadata"]["kv_dtype"] == "float32"
            assert report.total_params > report.active_params_per_token
            out = client.completions.create(model="tiny-moe", prompt=[5, 6, 7], max_tokens=2, temperature=0)
            assert out.usage.completion_tokens == 2
            metrics = httpx.get(url + "/metrics").text
    finally:
        engine.shutdown()
    lines = [line for line in metrics.splitlines() if line.startswith("llmaas_moe_expert_tokens_total{")]
    assert len(lines) == 2 * 4  # two layers, four experts
    # 3 prompt tokens + 1 fed-back token, each routed to 2 experts in each of the 2 layers.
    assert sum(int(line.split()[-1]) for line in lines) == 4 * 2 * 2
