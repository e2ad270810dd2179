"""The engine core in its own process, driven over ZMQ by the async client."""
from __future__ import annotations

import asyncio

import pytest

from kiln.engine.client import AsyncEngineClient
from kiln.engine.config import EngineConfig
from kiln.engine.core import launch_engine_core
from kiln.engine.request import SamplingParams
from tests.helpers.tiny_models import write_tiny_model
from tests.helpers.ports import free_port


SECRET = "test-secret"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = write_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    addr = f"tcp://127.0.0.1:{free_port()}"
    proc = launch_engine_core(EngineConfig(model=str(d), dtype="float32", block_size=16, num_gpu_blocks=64,
                                           max_num_seqs=8, max_waiting=4), addr, SECRET)
    yield addr
    proc.terminate()
    proc.join(10)
    assert proc.exitcode is not None


def test_stream_abort_and_stats(engine):
    async def main():
        c = AsyncEngineClient(engine, SECRET)
        await c.start()
        stats = await c.wait_ready(120)
        assert stats.ready and stats.num_total_blocks == 64

        toks, last = [], None
        async for out in c.generate("a", [1, 2, 3], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)):
            toks += out.new_token_ids
            last = out
        assert len(toks) == 9 and last.finished and last.finish_reason == "length" and last.num_prompt_tokens == 3

        # a consumer that walks away aborts its request; its blocks come back
        gen = c.generate("b", [1, 2, 3], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        n = 0
        async for out in gen:
            n += 1
            if n == 3:
                break
        await gen.aclose()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if c.stats.num_running == 0 and c.stats.num_free_blocks == 64:
                break
        assert c.stats.num_running == 0 and c.stats.num_free_blocks == 64

        # two requests interleave (continuous batching) and an explicit abort ends one with "abort"
        async def collect(rid, max_tokens):
            outs = [o async for o in c.generate(rid, [4, 5], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                              ignore_eos=True))]
            return outs

        t1 = asyncio.create_task(collect("c", 400))
        t2 = asyncio.create_task(collect("d", 5))
        d_outs = await t2
        await c.abort("c")
        c_outs = await t1
        assert d_outs[-1].finish_reason == "length" and c_outs[-1].finish_reason == "abort"

        # duplicate ids in flight are rejected by the engine, with the seed's message
        other = AsyncEngineClient(engine, SECRET)
        await other.start()
        g1 = c.generate("dup", [1], SamplingParams(max_tokens=300, ignore_eos=True))
        first = await g1.__anext__()
        errs = [o async for o in other.generate("dup", [1], SamplingParams(max_tokens=3))]
        assert errs[-1].error_type == "duplicate_id" and "already exists" in errs[-1].error
        await g1.aclose()
        await other.close()
        await c.close()
        return first

    asyncio.run(main())
