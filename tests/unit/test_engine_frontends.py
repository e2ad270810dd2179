"""The engine core's socket serves only Kiln's own front ends, and aborts the requests of a front end whose
process died (kiln.engine.core.FrontEnds), with the engine in its own process as `kiln serve` runs it."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from kiln.engine.client import AsyncEngineClient
from kiln.engine.config import EngineConfig
from kiln.engine.core import launch_engine_core
from kiln.engine.request import SamplingParams
from tests.helpers.tiny_models import write_tiny_model
from tests.helpers.ports import free_port

SECRET = "a-per-start-secret"
REPO = Path(__file__).resolve().parents[2]
BLOCKS = 600


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = write_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    addr = f"tcp://127.0.0.1:{free_port()}"
    proc = launch_engine_core(EngineConfig(model=str(d), dtype="float32", block_size=16, num_gpu_blocks=BLOCKS,
                                           max_num_seqs=8, max_waiting=8), addr, SECRET)
    yield addr
    proc.terminate()
    proc.join(10)


async def _ready_client(addr: str) -> AsyncEngineClient:
    c = AsyncEngineClient(addr, SECRET)
    await c.start()
    await c.wait_ready(120)
    return c


def _foreign_exchange(addr: str, messages: list, listen_s: float) -> list:
    """A local process that is not Kiln: connects, sends, and returns whatever comes back."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(addr)
    for m in messages:
        s.send(msgpack.packb(m))
    got = []
    deadline = time.monotonic() + listen_s
    while time.monotonic() < deadline:
        if s.poll(100):
            got.append(msgpack.unpackb(s.recv()))
    s.close()
    ctx.term()
    return got


def test_foreign_client_gets_nothing(engine):
    async def main():
        c = await _ready_client(engine)
        params = {"max_tokens": 50, "temperature": 0.0, "ignore_eos": True}
        loop = asyncio.get_running_loop()
        # no hello; a hello with the wrong secret; a hello with no secret (the old protocol): all dropped
        for msgs in ([["add", "foreign-1", [1, 2, 3], params, []]],
                     [["hello", "wrong-secret", os.getpid()], ["add", "foreign-2", [1, 2, 3], params, []]],
                     [["hello"], ["add", "foreign-3", [1, 2, 3], params, []]]):
            steps_before = c.stats.num_steps_total
            got = await loop.run_in_executor(None, _foreign_exchange, engine, msgs, 1.5)
            assert got == []                                   # no tokens, no stats, no error to probe with
            await asyncio.sleep(0.6)                           # a fresh heartbeat
            assert c.stats.num_running == 0 and c.stats.num_waiting == 0
            assert c.stats.num_steps_total == steps_before     # the engine ran nothing for it

        # Kiln's own client, with the secret, is served as before
        outs = [o async for o in c.generate("own", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0,
                                                                              ignore_eos=True))]
        assert sum(len(o.new_token_ids) for o in outs) == 4 and outs[-1].finish_reason == "length"
        await c.close()

    asyncio.run(main())


CHILD = textwrap.dedent("""
    import asyncio, sys, time
    from kiln.engine.client import AsyncEngineClient
    from kiln.engine.request import SamplingParams

    async def main():
        c = AsyncEngineClient(sys.argv[1], sys.argv[2])
        await c.start()
        await c.wait_ready(120)
        gens = [c.generate(f"orphan-{i}", [1, 2, 3], SamplingParams(max_tokens=1000, temperature=0,
                                                                      ignore_eos=True)) for i in range(8)]
        for g in gens:
            await g.__anext__()
        print("running", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def test_requests_of_a_killed_front_end_are_aborted(engine):
    async def main():
        c = await _ready_client(engine)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        child = subprocess.Popen([sys.executable, "-c", CHILD, engine, SECRET], stdout=subprocess.PIPE, env=env)
        try:
            line = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
            assert line.strip() == b"running"
            await asyncio.sleep(0.6)
            assert c.stats.num_running == 8 and c.stats.num_free_blocks < BLOCKS
            steps_at_kill = c.stats.num_steps_total
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            s = c.stats
            if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == BLOCKS:
                break
        s = c.stats
        assert s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == BLOCKS
        # aborted, not run out: the 8 requests had ~1000 decode steps left; a reap takes one heartbeat
        assert s.num_steps_total - steps_at_kill < 500, (steps_at_kill, s.num_steps_total)
        await c.close()

    asyncio.run(main())
