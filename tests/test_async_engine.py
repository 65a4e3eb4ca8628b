"""The asyncio front: streaming deltas, abort on early exit, backpressure, errors before the first token."""

from __future__ import annotations

import asyncio
import threading

import pytest

from llmaas import SamplingParams
from llmaas.engine.async_engine import AsyncEngine
from llmaas.engine.llm_engine import EngineConfig, LLMEngine
from llmaas.errors import EngineOverloadedError, InvalidRequestError
from tests.model_factory import make_tiny_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("async"))
    return LLMEngine(EngineConfig(model=str(d), dtype="float32", kv_cache_memory=2**20, block_size=4))


def run(coro):
    return asyncio.run(coro)


def test_stream_deltas_add_up_and_concurrent_requests_finish(engine):
    aeng = AsyncEngine(engine)

    async def one(i: int):
        pieces, tokens, last = [], [], None
        params = SamplingParams(max_tokens=10 + i, temperature=0.0, ignore_eos=True)
        async for out in aeng.generate([5 + i, 6, 7, 8], params):
            pieces.append(out.outputs[0].delta_text)
            tokens += out.outputs[0].delta_token_ids
            last = out
        assert last.finished and last.completion_tokens == 10 + i
        assert tokens == last.outputs[0].token_ids
        assert "".join(pieces) == last.outputs[0].text
        return last

    async def main():
        return await asyncio.gather(*(one(i) for i in range(6)))

    try:
        outs = run(main())
    finally:
        aeng.shutdown()
    assert len(outs) == 6
    assert not engine.has_unfinished_requests()


def test_leaving_early_aborts_in_the_engine(engine):
    aeng = AsyncEngine(engine)

    async def main():
        gen = aeng.generate([9, 10, 11], SamplingParams(max_tokens=200, ignore_eos=True), request_id="gone")
        async for out in gen:
            if out.completion_tokens >= 3:
                break
        await gen.aclose()
        # the abort is a command the loop runs before its next step
        stats = await asyncio.wrap_future(
            aeng.call(lambda e: (list(e.requests), e.block_manager.num_used_blocks))
        )
        return stats

    try:
        requests, used = run(main())
    finally:
        aeng.shutdown()
    assert requests == [] and used == 0


def test_validation_error_raises_before_first_yield(engine):
    aeng = AsyncEngine(engine)

    async def main():
        async for _ in aeng.generate([1, 2], SamplingParams(temperature=-1)):
            pass

    try:
        with pytest.raises(InvalidRequestError) as err:
            run(main())
    finally:
        aeng.shutdown()
    assert err.value.param == "temperature"


def test_full_waiting_queue_is_refused(engine):
    aeng = AsyncEngine(engine, max_waiting=0)

    async def main():
        async for _ in aeng.generate([1, 2], SamplingParams(max_tokens=2)):
            pass

    try:
        with pytest.raises(EngineOverloadedError):
            run(main())
    finally:
        aeng.shutdown()


def test_factory_builds_the_engine_on_the_loop_thread(engine):
    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return engine

    aeng = AsyncEngine(build)
    aeng.shutdown()
    assert built_on == ["llmaas-engine"]  # torch's OpenMP pool then lives on the one thread that steps

    def broken():
        raise InvalidRequestError("no such model", param="model")

    with pytest.raises(InvalidRequestError):
        AsyncEngine(broken)


def test_abort_ends_the_stream_with_the_tokens_so_far(engine):
    aeng = AsyncEngine(engine)

    async def main():
        seen = []
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        async for out in aeng.generate([3, 4, 5], params, request_id="cut"):
            seen.append(out)
            if out.completion_tokens >= 3 and len(seen) == 3:
                final = aeng.abort("cut")
        return seen, await asyncio.wrap_future(final)

    try:
        seen, final = run(main())
    finally:
        aeng.shutdown()
    last = seen[-1]
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert 3 <= last.completion_tokens < 200 and final.completion_tokens == last.completion_tokens
    assert not engine.has_unfinished_requests()


def test_submit_without_every_step_gets_the_first_and_the_last_output(engine):
    aeng = AsyncEngine(engine)

    async def main():
        got, done = [], asyncio.Event()

        def on_output(item):
            got.append(item)
            if isinstance(item, BaseException) or item.finished:
                done.set()

        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        await aeng.submit([7, 8, 9], params, "quiet", on_output, every_step=False)
        await done.wait()
        refused = []
        with pytest.raises(InvalidRequestError):
            await aeng.submit([7], SamplingParams(temperature=-1), "bad", refused.append)
        await asyncio.sleep(0)
        return got, refused

    try:
        got, refused = run(main())
    finally:
        aeng.shutdown()
    assert len(got) == 2 and not got[0].finished and got[1].finished
    assert got[1].completion_tokens == 12 and len(got[1].outputs[0].token_ids) == 12
    assert len(refused) == 1 and isinstance(refused[0], InvalidRequestError)  # the terminal item


def test_shutdown_ends_running_requests_with_their_tokens(engine):
    aeng = AsyncEngine(engine)

    async def main():
        outs = []
        async for out in aeng.generate([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True)):
            outs.append(out)
            if len(outs) == 2:
                threading.Thread(target=aeng.shutdown).start()
        return outs

    outs = run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
