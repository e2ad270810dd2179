"""The front ends' async client of the engine core: submit, stream outputs per request, abort.

The engine's death is felt at once. A ZMQ socket monitor on this DEALER reports EVENT_DISCONNECTED as soon as
the engine's end of the connection closes, which the kernel does the moment the engine process dies (kill -9,
OOM, a crash), whatever the engine was doing. A heartbeat-age rule can't tell a dead engine from a long CPU
step and needs a timer of several seconds. Every request in flight then ends with a "not_ready" error (HTTP
503, gRPC UNAVAILABLE), and new ones get that error at once, until an engine that starts again in its place
(KILN_ENGINE_RESTART) connects. The 60 s silence rule stays for an engine that is alive but hung.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import AsyncIterator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kiln.engine.request import EngineOutput, EngineStats, SamplingParams
from kiln.engine.wire import Abort, AddRequest, Fatal, Hello, LoRAUpdate, Message, Outputs, Stats, decode, encode
from kiln.errors import ErrorKind

log = logging.getLogger("kiln.client")

ENGINE_DOWN = "infer engine is down"
_DEADLINE = object()  # put in a request's queue when its deadline passes


class EngineDeadError(RuntimeError):
    pass


class AsyncEngineClient:
    # no message at all from the engine for this long (it sends stats every 0.5 s, even when busy) = hung
    dead_after_s = 60.0

    def __init__(self, address: str, secret: str):
        self.address = address
        self.secret = secret
        self.ctx = zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self.queues: dict[str, asyncio.Queue] = {}
        self.stats: EngineStats | None = None
        self.last_message_time = 0.0
        self.fatal: str | None = None
        self.down: str | None = None   # why the engine is unreachable now (its process went away), else None
        self._reader: asyncio.Task | None = None
        self._monitor: asyncio.Task | None = None

    async def start(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(self.address)
        self.last_message_time = time.monotonic()
        await self._hello()
        self._reader = asyncio.create_task(self._read_loop())
        self._monitor = asyncio.create_task(self._monitor_loop(monitor))

    async def close(self) -> None:
        for t in (self._reader, self._monitor):
            if t:
                t.cancel()
        if self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.sock.close()
            self.sock = None

    async def _send(self, msg: Message) -> None:
        await self.sock.send(encode(msg))

    async def _hello(self) -> None:
        # the engine serves only front ends that know the per-start secret (kiln.engine.core.FrontEnds)
        await self._send(Hello(self.secret, os.getpid()))

    async def _monitor_loop(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._engine_lost("the engine core process went away")
                elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    if self.down is not None:
                        log.info("engine connection is back: waiting for the engine to be ready")
                    # a new engine (restarted in place) knows nobody yet; stats (ready or loading) follow
                    self.down = None
                    self.last_message_time = time.monotonic()
                    await self._hello()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the socket closed under us
            log.debug("engine monitor stopped: %s", e)
        finally:
            monitor.close()

    def _engine_lost(self, why: str) -> None:
        if self.down is None:
            log.error("%s: failing %d request(s) in flight", why, len(self.queues))
        self.down = why
        self.stats = None  # health reads "engine down"; new requests fail at once (wait_ready / generate)
        self._fail_all(f"{ENGINE_DOWN}: {why}", ErrorKind.NOT_READY)

    async def _read_loop(self) -> None:
        while True:
            try:
                if await self.sock.poll(1000):
                    msg = decode(await self.sock.recv())
                    self.last_message_time = time.monotonic()
                    if isinstance(msg, Outputs):
                        for out in msg.outputs:
                            q = self.queues.get(out.request_id)
                            if q is not None:
                                q.put_nowait(out)
                    elif isinstance(msg, Stats):
                        if self.down is None:  # never a late heartbeat of an engine that is gone
                            self.stats = msg.stats
                    elif isinstance(msg, Fatal):
                        self.fatal = msg.message
                        self._fail_all(msg.message)
                elif time.monotonic() - self.last_message_time > self.dead_after_s:
                    self._fail_all(f"the engine has not answered for {self.dead_after_s:.0f} s")
                    await self._hello()  # if it comes back, it will know us again
                    self.last_message_time = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep reading; one bad message must not stall every request
                log.error("engine client read error: %s", e)

    def _fail_all(self, why: str, kind: ErrorKind = ErrorKind.INTERNAL) -> None:
        for rid, q in self.queues.items():
            q.put_nowait(EngineOutput(rid, [], True, "error", 0, error=why, error_type=kind))

    def engine_alive(self, max_age_s: float) -> bool:
        """Heartbeat fresher than max_age_s (used by health checks)."""
        return self.stats is not None and time.time() - self.stats.timestamp <= max_age_s

    async def wait_ready(self, timeout: float = 600.0) -> EngineStats:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.fatal:
                raise EngineDeadError(self.fatal)
            if self.down:
                raise EngineDeadError(self.down)
            if self.stats is not None and self.stats.ready:
                return self.stats
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the engine at {self.address} was not ready within {timeout:.0f} s")

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       eos_token_ids: list[int] | None = None, deadline: float | None = None
                       ) -> AsyncIterator[EngineOutput]:
        """Stream the outputs of one request; the last has finished=True. Leaving early aborts it. Past
        `deadline` (time.monotonic()) the next wait raises asyncio.TimeoutError: one timer per request, not a
        wait_for (a task) per token, which cost a tenth of an HTTP worker's time (benchmarks/frontend_bench.py)."""
        if request_id in self.queues:
            yield EngineOutput(request_id, [], True, "error", len(prompt_token_ids),
                               error=f"request id {request_id!r} already exists among this front end's requests",
                               error_type=ErrorKind.DUPLICATE_ID,
                               error_args={"why": "duplicate_id", "request_id": request_id})
            return
        if self.down or self.fatal:
            yield EngineOutput(request_id, [], True, "error", len(prompt_token_ids),
                               error=f"{ENGINE_DOWN}: {self.down or self.fatal}", error_type=ErrorKind.NOT_READY)
            return
        q: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = q
        finished = False
        timer = None
        if deadline is not None:
            timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()),
                                                          q.put_nowait, _DEADLINE)
        try:
            await self._send(AddRequest(request_id, list(prompt_token_ids), params.to_dict(), list(eos_token_ids or [])))
            while True:
                out: EngineOutput = await q.get()
                if out is _DEADLINE:
                    raise asyncio.TimeoutError
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if timer is not None:
                timer.cancel()
            if self.queues.get(request_id) is q:
                del self.queues[request_id]
            if not finished and self.sock is not None:
                try:
                    await self._send(Abort([request_id]))
                except Exception:  # noqa: BLE001 - socket closing during shutdown
                    pass

    async def update_lora(self, request_id: str, name: str, load: bool, path: str = "",
                          timeout: float = 300.0) -> EngineOutput:
        """Load (or unload) a LoRA adapter in the engine: its answer, an EngineOutput whose error is set where it
        could not."""
        if self.down or self.fatal:
            return EngineOutput(request_id, [], True, "error", 0, error=f"{ENGINE_DOWN}: {self.down or self.fatal}",
                                error_type=ErrorKind.NOT_READY)
        q: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = q
        try:
            await self._send(LoRAUpdate(request_id, name, load, path))
            return await asyncio.wait_for(q.get(), timeout)
        finally:
            self.queues.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        await self._send(Abort([request_id]))
