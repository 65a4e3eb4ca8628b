"""llmaas: LLM as a Service at the lowest cost per token."""

from llmaas.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing llmaas (for SamplingParams or the CLI's --help) should not pay for torch models.
    if name == "LLM":
        from llmaas.llm import LLM

        return LLM
    raise AttributeError(name)
