"""The front ends' async client of the engine core: submit, stream outputs per request, abort."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator

import msgpack
import zmq
import zmq.asyncio

from kiln.engine.request import EngineOutput, EngineStats, SamplingParams

log = logging.getLogger("kiln.client")


class EngineDeadError(RuntimeError):
    pass


class AsyncEngineClient:
    # no message at all from the engine for this long (it sends stats every 0.5 s, even when busy) = dead
    dead_after_s = 60.0

    def __init__(self, address: str):
        self.address = address
        self.ctx = zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self.queues: dict[str, asyncio.Queue] = {}
        self.stats: EngineStats | None = None
        self.last_message_time = 0.0
        self.fatal: str | None = None
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(self.address)
        self.last_message_time = time.monotonic()
        await self._send(["hello"])
        self._reader = asyncio.create_task(self._read_loop())

    async def close(self) -> None:
        if self._reader:
            self._reader.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def _send(self, msg) -> None:
        await self.sock.send(msgpack.packb(msg))

    async def _read_loop(self) -> None:
        while True:
            try:
                if await self.sock.poll(1000):
                    msg = msgpack.unpackb(await self.sock.recv())
                    self.last_message_time = time.monotonic()
                    if msg[0] == "out":
                        for w in msg[1]:
                            q = self.queues.get(w[0])
                            if q is not None:
                                q.put_nowait(EngineOutput.from_wire(w))
                    elif msg[0] == "stats":
                        self.stats = EngineStats.from_wire(msg[1])
                    elif msg[0] == "fatal":
                        self.fatal = msg[1]
                        self._fail_all(msg[1])
                elif time.monotonic() - self.last_message_time > self.dead_after_s:
                    self._fail_all(f"the engine has not answered for {self.dead_after_s:.0f} s")
                    await self._send(["hello"])  # if it comes back, it will know us again
                    self.last_message_time = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep reading; one bad message must not stall every request
                log.error("engine client read error: %s", e)

    def _fail_all(self, why: str) -> None:
        for rid, q in self.queues.items():
            q.put_nowait(EngineOutput(rid, [], True, "error", 0, error=why, error_code=500, error_type="internal"))

    def engine_alive(self, max_age_s: float) -> bool:
        """Heartbeat fresher than max_age_s (used by health checks)."""
        return self.stats is not None and time.time() - self.stats.timestamp <= max_age_s

    async def wait_ready(self, timeout: float = 600.0) -> EngineStats:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.fatal:
                raise EngineDeadError(self.fatal)
            if self.stats is not None and self.stats.ready:
                return self.stats
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the engine at {self.address} was not ready within {timeout:.0f} s")

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       eos_token_ids: list[int] | None = None) -> AsyncIterator[EngineOutput]:
        """Stream the outputs of one request; the last has finished=True. Leaving early aborts it."""
        if request_id in self.queues:
            yield EngineOutput(request_id, [], True, "error", len(prompt_token_ids),
                               error=f"The req_id {request_id} already exists in the current batch, "
                                     f"the current request will be ignored.", error_code=200,
                               error_type="duplicate_id")
            return
        q: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = q
        finished = False
        try:
            await self._send(["add", request_id, list(prompt_token_ids), params.to_dict(), list(eos_token_ids or [])])
            while True:
                out: EngineOutput = await q.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if self.queues.get(request_id) is q:
                del self.queues[request_id]
            if not finished and self.sock is not None:
                try:
                    await self._send(["abort", [request_id]])
                except Exception:  # noqa: BLE001 - socket closing during shutdown
                    pass

    async def abort(self, request_id: str) -> None:
        await self._send(["abort", [request_id]])
