"""The Python API: `LLM(model).generate(prompts, SamplingParams)` and `LLM.chat(messages)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from llmaas.engine.llm_engine import EngineConfig, LLMEngine
from llmaas.engine.outputs import RequestOutput
from llmaas.engine.sampling_params import SamplingParams
from llmaas.models.report import ModelReport

Prompt = str | list[int]


class LLM:
    """Offline batch inference on our engine. Keyword arguments are EngineConfig fields."""

    def __init__(self, model: str = "smollm2-135m", *, config: EngineConfig | None = None, **engine_kwargs):
        self.engine = LLMEngine(config or EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @property
    def model_report(self) -> ModelReport:
        """Total and active parameters and KV-cache bytes per token, computed from the loaded model."""
        return self.engine.model_report

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt, all batched together; results in the order of the prompts."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or token ids
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
                request_id = f"llm-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, params, priority[i] if priority else 0)
                ids.append(request_id)
        except Exception:
            for request_id in ids:  # all or nothing: a bad prompt cancels the batch
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; the model's own chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(conv, add_generation_prompt=True) for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        while len(finished) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [finished[i] for i in ids]
