"""Request fields -> SamplingParams. The engine validates ranges and names the param it rejects."""

from __future__ import annotations

from llmaas.engine.sampling_params import SamplingParams, check_stop
from llmaas.errors import InvalidRequestError
from llmaas.server.protocol import _SamplingFields


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    check_stop(stops)  # the engine's rule and message, before any tokenizing
    return stops


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise InvalidRequestError(
                f"'logit_bias' keys must be token ids (integers as strings), got {key!r}", param="logit_bias"
            ) from None
    return out


def sampling_params(
    body: _SamplingFields, *, max_tokens: int | None, n: int, logprobs: int | None
) -> SamplingParams:
    def pick(value, default):
        return default if value is None else value

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick(body.temperature, 1.0),
        top_p=pick(body.top_p, 1.0),
        top_k=pick(body.top_k, 0),
        min_p=pick(body.min_p, 0.0),
        n=n,
        seed=body.seed if body.seed is not None else body.sampling_seed,
        stop=stop_strings(body.stop),
        stop_token_ids=list(body.stop_token_ids or ()),
        include_stop_str_in_output=bool(body.include_stop_str_in_output or body.no_stop_trim),
        skip_special_tokens=pick(body.skip_special_tokens, True),
        min_tokens=body.min_tokens or 0,
        ignore_eos=bool(body.ignore_eos),
        presence_penalty=pick(body.presence_penalty, 0.0),
        frequency_penalty=pick(body.frequency_penalty, 0.0),
        repetition_penalty=pick(body.repetition_penalty, 1.0),
        logit_bias=logit_bias(body.logit_bias),
        logprobs=logprobs,
    )
