"""KServe v2 / Triton gRPC front end (`inference.GRPCInferenceService` on GRPC_PORT).

One model, `model` (version 1), decoupled like the seed's Triton Python backend: input `IN` and output `OUT`,
both BYTES of shape [1] holding JSON (seed-system-spec.md section 2). `IN` carries `[request]` with the native
API's fields; the request goes through the same path as the HTTP API (`kiln.server.seed_protocol`: validation,
tokenization, engine, detokenization) and each packet comes back as one response:

* ModelStreamInfer: one response per packet; normal packets are `json.dumps([packet])`, errors
  `json.dumps({"req_id", "error_msg", "error_code", ...})`; the last response of a request (is_end == 1 or
  an error) carries the `triton_final_response` parameter = true, as Triton marks a decoupled model's final
  response (every other response carries it = false). Several requests may share one stream; their
  responses interleave, each carrying its gRPC request id. Cancelling the stream (or the client going away)
  aborts every request still running on it in the engine.
* ModelInfer (unary): the whole answer in one response (the final packet, with tokens_all); errors are
  gRPC status codes (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ALREADY_EXISTS, DEADLINE_EXCEEDED, INTERNAL,
  NOT_FOUND for an unknown model) whose message is the packet's error_msg.
* ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata, ModelConfig, RepositoryIndex and
  ModelStatistics (server-wide request counts and times since ready: kserve.model_statistics).
* RepositoryModelLoad / RepositoryModelUnload: LoRA adapters as models, where KILN_ALLOW_RUNTIME_LORA_UPDATING
  allows it (kserve.repository_update); else UNIMPLEMENTED, as the other RPCs (shared memory, trace and log
  settings).

gRPC does not need the HTTP API: it talks to the engine core directly (unlike the seed, whose gRPC breaks when
PUSH_MODE_HTTP_PORT is off). The supervisor runs `run(cfg)` in its own process.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import struct
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import grpc
from google.protobuf import json_format

# The KServe v2 / Triton protocol's generated message and service classes, as tritonclient ships them: the
# server speaks exactly the wire format of the client package it is tested with.
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from kiln.errors import GRPC_STATUS, ErrorKind, RequestError, as_kind, retry_after, seed_error_body
from kiln.server.kserve import (
    EXTENSIONS,
    INPUT_NAME,
    MODEL_NAME,
    MODEL_VERSION,
    OUTPUT_NAME,
    REPOSITORY_OFF,
    SERVER_NAME,
    bad,
    check_model,
    model_metadata,
    model_statistics,
    repository_index,
    repository_update,
    request_in,
)
from kiln.server.kserve import model_config as model_config_dict

log = logging.getLogger("kiln.grpc")

FINAL_PARAM = "triton_final_response"
MAX_MESSAGE = 2**31 - 1

# A runner takes a seed request dict and streams its seed packets (dicts); final_only asks for just the
# final packet (unary ModelInfer). It never raises for a bad request: errors are packets with error_msg.
Runner = Callable[[dict, bool], AsyncIterator[dict]]


def grpc_status(kind: ErrorKind | str | None) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, GRPC_STATUS[as_kind(kind)])


# -- BYTES tensors -----------------------------------------------------------------------------------------
def serialize_bytes_tensor(items: list[bytes]) -> bytes:
    """Triton's raw BYTES layout: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def deserialize_bytes_tensor(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ValueError("truncated BYTES tensor")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise ValueError("truncated BYTES tensor")
        out.append(raw[i:i + n])
        i += n
    return out


def parse_request(request: pb.ModelInferRequest) -> dict:
    """The seed request dict held in input IN (`json.dumps([request])`; a bare object is accepted too)."""
    if not request.inputs:
        raise bad(f"expected 1 inputs but got 0 inputs for model '{request.model_name}': "
                           f"send input {INPUT_NAME} (BYTES, shape [1]) holding json.dumps([request])")
    idx = next((i for i, t in enumerate(request.inputs) if t.name == INPUT_NAME), None)
    if idx is None:
        names = ", ".join(repr(t.name) for t in request.inputs)
        raise bad(f"unexpected inference input {names} for model '{request.model_name}': "
                           f"the model's input is {INPUT_NAME!r} (BYTES, shape [1])")
    tensor = request.inputs[idx]
    if tensor.datatype and tensor.datatype != "BYTES":
        raise bad(f"input {INPUT_NAME!r} must be BYTES (TYPE_STRING), got {tensor.datatype}")
    try:
        if request.raw_input_contents:
            if idx >= len(request.raw_input_contents):
                raise bad(f"input {INPUT_NAME!r} has no data in raw_input_contents")
            items = deserialize_bytes_tensor(request.raw_input_contents[idx])
        else:
            items = list(tensor.contents.bytes_contents)
    except ValueError as e:
        raise bad(f"input {INPUT_NAME!r}: {e}") from None
    if not items:
        raise bad(f"input {INPUT_NAME!r} is empty: it must hold json.dumps([request])")
    if len(items) != 1 or list(tensor.shape) not in ([1], []):
        raise bad(f"input {INPUT_NAME!r} must have shape [1] (one JSON element), got shape "
                           f"{list(tensor.shape)} with {len(items)} elements")
    return request_in(items[0])


def is_final(packet: dict) -> bool:
    return bool(packet.get("is_end") == 1 or packet.get("error_msg") or packet.get("error_code"))


def packet_json(packet: dict) -> bytes:
    """Normal packets travel as a one-item list, error packets as the bare object (the seed's format)."""
    if "error_type" in packet:  # internal: picks the unary status, not part of the seed's packet
        packet = {k: v for k, v in packet.items() if k != "error_type"}
    body = packet if packet.get("error_msg") else [packet]
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def make_response(packet: dict, request: pb.ModelInferRequest, final: bool | None) -> pb.ModelInferResponse:
    r = pb.ModelInferResponse(model_name=MODEL_NAME, model_version=MODEL_VERSION, id=request.id)
    r.outputs.add(name=OUTPUT_NAME, datatype="BYTES", shape=[1])
    r.raw_output_contents.append(serialize_bytes_tensor([packet_json(packet)]))
    if final is not None:
        r.parameters[FINAL_PARAM].bool_param = final
    return r


class StreamResponses:
    """The stream responses of one request: the fields that never change (model, id, output spec, final flag)
    are built once, and each packet's response is a copy with its JSON in place (a tenth of the front end's
    time per token went to building each response whole: benchmarks/frontend_bench.py --api grpc)."""

    def __init__(self, request: pb.ModelInferRequest):
        self.request = request
        self.templates: dict[bool, pb.ModelStreamInferResponse] = {}

    def __call__(self, packet: dict, final: bool) -> pb.ModelStreamInferResponse:
        template = self.templates.get(final)
        if template is None:
            template = self.templates[final] = pb.ModelStreamInferResponse(
                infer_response=make_response({}, self.request, final))
        r = pb.ModelStreamInferResponse()
        r.CopyFrom(template)
        r.infer_response.raw_output_contents[0] = serialize_bytes_tensor([packet_json(packet)])
        return r


def error_packet(req_id: str, msg: str, code: int) -> dict:
    return {"req_id": req_id, "error_msg": msg, "error_code": code, "is_end": 1}


def request_id_of(req: dict, request: pb.ModelInferRequest) -> str:
    rid = req.get("req_id")
    if rid is None or rid == "":
        rid = request.id or str(uuid.uuid4())
        req["req_id"] = rid
    return str(rid)


# -- the service ---------------------------------------------------------------------------------------------
class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runner: Runner, ready: Callable[[], bool], model_aliases: tuple[str, ...] = (),
                 version: str = "", engine_stats: Callable[[], Any] = lambda: None,
                 adapters: Callable[[], Iterable[str]] | tuple[str, ...] = (),
                 repository: Callable[[str, bool, dict], Awaitable[None]] | None = None):
        self.runner = runner
        self.ready = ready
        self.engine_stats = engine_stats  # the engine's last EngineStats (None before its first)
        # LoRA adapters (KILN_LORA_MODULES, and those loaded while serving): each a model of its own name
        self._adapters = adapters if callable(adapters) else (lambda: adapters)
        self.model_aliases = model_aliases
        self.repository = repository  # kserve.repository_update bound to the front end; None: load / unload off
        self.version = version
        self.stopping = False
        self._stream_queues: set[asyncio.Queue] = set()

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._adapters())

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(a for a in (*self.model_aliases, *self.adapters) if a and a != MODEL_NAME)

    def begin_shutdown(self) -> None:
        """Streams with nothing running end now; the others end once their requests finish (the server's
        stop grace bounds that). Without this an idle client's open stream would hold the shutdown."""
        self.stopping = True
        for q in list(self._stream_queues):
            q.put_nowait(None)

    # health and metadata
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=bool(self.ready()))

    async def ModelReady(self, request, context):
        try:
            check_model(request.name, request.version, self.aliases)
        except RequestError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=bool(self.ready()))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    async def _check_or_abort(self, name: str, version: str, context) -> None:
        try:
            check_model(name, version, self.aliases)
        except RequestError as e:
            await context.abort(grpc_status(e.kind), e.message)

    async def ModelMetadata(self, request, context):
        await self._check_or_abort(request.name, request.version, context)
        return json_format.ParseDict(model_metadata(), pb.ModelMetadataResponse())

    async def ModelConfig(self, request, context):
        await self._check_or_abort(request.name, request.version, context)
        return pb.ModelConfigResponse(config=model_config())

    async def RepositoryIndex(self, request, context):
        ready = bool(self.ready())
        models = [m for m in repository_index(ready, self.adapters) if ready or not request.ready]
        return json_format.ParseDict({"models": models}, pb.RepositoryIndexResponse())

    async def ModelStatistics(self, request, context):
        if request.name or request.version:  # no name: every model's (the one)
            await self._check_or_abort(request.name, request.version, context)
        return json_format.ParseDict(model_statistics(self.engine_stats()), pb.ModelStatisticsResponse())

    async def _repository(self, request, context, load: bool) -> None:
        if self.repository is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, REPOSITORY_OFF)
        params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in request.parameters.items()
                  if v.WhichOneof("parameter_choice")}
        try:
            await self.repository(request.model_name, load, params)
        except RequestError as e:
            await context.abort(grpc_status(e.kind), e.message)

    async def RepositoryModelLoad(self, request, context):
        await self._repository(request, context, True)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        await self._repository(request, context, False)
        return pb.RepositoryModelUnloadResponse()

    def _with_adapter(self, req: dict, model_name: str) -> dict:
        """A request to a LoRA adapter's model runs with that adapter (the seed request's `model`)."""
        if model_name in self.adapters:
            req["model"] = model_name
        return req

    # inference
    async def ModelInfer(self, request, context):
        try:
            check_model(request.model_name, request.model_version, self.aliases)
            req = self._with_adapter(parse_request(request), request.model_name)
        except RequestError as e:
            await context.abort(grpc_status(e.kind), e.message)
        request_id_of(req, request)
        final = None
        try:
            async with contextlib.aclosing(self.runner(req, True)) as packets:
                async for packet in packets:
                    final = packet
                    if is_final(packet):
                        break
        except Exception:  # noqa: BLE001 - its text may carry internals: logged, not sent
            log.exception("gRPC request %s failed", req.get("req_id"))
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error (the server log has the details)")
        if final is None:
            await context.abort(grpc.StatusCode.INTERNAL, "the request ended without an answer")
        if final.get("error_msg") or final.get("error_code"):
            kind = final.get("error_type")
            if kind is None:
                kind = ErrorKind.INTERNAL if final.get("error_code") in (500, 501) else ErrorKind.INVALID
            msg = str(final.get("error_msg") or f"error {final.get('error_code')}")
            wait = retry_after(kind)
            if wait is not None:  # a full queue: say when to retry, in the message and the trailing metadata
                context.set_trailing_metadata((("retry-after", str(wait)),))
                msg += f"; retry after {wait} s"
            await context.abort(grpc_status(kind), msg)
        return make_response(final, request, None)

    async def ModelStreamInfer(self, request_iterator, context):
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        reading_done = asyncio.Event()

        async def serve_one(request: pb.ModelInferRequest) -> None:
            """Every request on the stream gets a final response, whatever happens to it."""
            try:
                await serve_checked(request)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one request's failure must not end the stream or go unanswered
                log.exception("gRPC stream request %r failed", request.id)
                await out.put(pb.ModelStreamInferResponse(infer_response=make_response(
                    error_packet(request.id or "", "internal server error (the server log has the details)", 500),
                    request, True)))

        async def serve_checked(request: pb.ModelInferRequest) -> None:
            try:
                check_model(request.model_name, request.model_version, self.aliases)
                req = self._with_adapter(parse_request(request), request.model_name)
            except RequestError as e:
                if e.kind == ErrorKind.NOT_FOUND:  # as Triton: an error response, not OUT
                    await out.put(pb.ModelStreamInferResponse(error_message=e.message))
                else:
                    rid = request.id or ""
                    await out.put(pb.ModelStreamInferResponse(
                        infer_response=make_response(error_packet(rid, e.message, e.code), request, True)))
                return
            rid = request_id_of(req, request)
            sent_final = False
            respond = StreamResponses(request)
            try:
                async with contextlib.aclosing(self.runner(req, False)) as packets:
                    async for packet in packets:
                        final = is_final(packet)
                        await out.put(respond(packet, final))
                        if final:
                            sent_final = True
                            break
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one request's failure must not end the stream
                log.exception("gRPC request %s failed", rid)
                await out.put(pb.ModelStreamInferResponse(infer_response=make_response(
                    error_packet(rid, "internal server error (the server log has the details)", 500), request,
                    True)))
                sent_final = True
            if not sent_final:
                await out.put(pb.ModelStreamInferResponse(infer_response=make_response(
                    error_packet(rid, "the request ended without a final packet", 500), request, True)))

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    t = asyncio.create_task(serve_one(request))
                    tasks.add(t)
                    t.add_done_callback(lambda t: (tasks.discard(t), out.put_nowait(None)))
            finally:
                reading_done.set()
                out.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        self._stream_queues.add(out)
        try:
            while True:
                item = await out.get()
                if item is not None:
                    yield item
                elif (reading_done.is_set() or self.stopping) and not tasks and out.empty():
                    break
        finally:
            self._stream_queues.discard(out)
            # the client closed or cancelled the stream, or the server is stopping: abort what still runs
            reader.cancel()
            for t in list(tasks):
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)


def model_config() -> mc.ModelConfig:
    return json_format.ParseDict(model_config_dict(), mc.ModelConfig())


async def start_server(servicer: KServeServicer, address: str, interceptors=(),
                       max_message: int = MAX_MESSAGE) -> grpc.aio.Server:
    """max_message bounds a request (KILN_MAX_REQUEST_BYTES): a larger one gets RESOURCE_EXHAUSTED unread."""
    server = grpc.aio.server(interceptors=list(interceptors), options=[("grpc.max_send_message_length", MAX_MESSAGE),
                                      ("grpc.max_receive_message_length", max_message),
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server


# -- process entry point ------------------------------------------------------------------------------------
def build_runner(frontend: Any) -> Runner:
    """The shared seed request path (kiln.server.seed_protocol) as a Runner: parse + validate + tokenize,
    run through the engine, yield seed packets; every failure becomes a final error packet carrying an
    internal `error_type` key (used for the unary status, stripped before sending)."""
    import time

    from kiln.server.seed_protocol import parse_seed_request, run_seed_request

    def error(err: RequestError, rid: str) -> dict:
        p = seed_error_body(err, rid)
        p["is_end"] = 1
        p["error_type"] = err.error_type
        return p

    async def runner(body: dict, final_only: bool) -> AsyncIterator[dict]:
        arrival = time.time()
        rid = str(body.get("req_id") or "")
        try:
            frontend.check_accepting()
            req = await parse_seed_request(body, frontend, api="grpc", arrival_time=arrival)
        except RequestError as e:
            frontend.reject(frontend.new_record(rid, "grpc", arrival), e)
            yield error(e, rid)
            return
        if final_only:
            req.return_all_tokens = True
        try:
            async for packet in run_seed_request(req, frontend):
                yield packet
        except RequestError as e:
            if req.record is None:  # failed before reaching the engine
                frontend.reject(frontend.new_record(req.req_id, "grpc", arrival), e)
            yield error(e, req.req_id)

    return runner


def run(cfg: Any) -> None:
    """Process entry point (the supervisor spawns it): serve gRPC on cfg.grpc_port until SIGTERM/SIGINT."""
    if not logging.getLogger().handlers:  # the supervisor's _component_main normally set it up
        try:
            from kiln.config import setup_logging

            setup_logging(cfg, "kiln-grpc")
        except Exception:  # noqa: BLE001
            logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(cfg))


async def _serve(cfg: Any) -> None:
    import kiln
    from kiln.server.frontend import Frontend

    frontend = await Frontend.start(cfg)
    servicer = KServeServicer(build_runner(frontend), lambda: frontend.readiness()[0],
                              (getattr(cfg, "model_name", None) or "",), getattr(kiln, "__version__", ""),
                              lambda: getattr(frontend.client, "stats", None), lambda: frontend.lora_modules,
                              functools.partial(repository_update, frontend)
                              if cfg.allow_runtime_lora_updating else None)
    host = getattr(cfg, "host", None) or "0.0.0.0"
    address = f"[::]:{cfg.grpc_port}" if host in ("0.0.0.0", "::", "") else f"{host}:{cfg.grpc_port}"
    from kiln.server.auth import ApiKeyInterceptor, ApiKeys

    server = await start_server(servicer, address, [ApiKeyInterceptor(ApiKeys.for_api(cfg))],
                                cfg.max_request_bytes)
    log.info("KServe v2 gRPC on %s (model %r)", address, MODEL_NAME)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    await stop.wait()
    grace = float(getattr(cfg, "shutdown_timeout", 30.0) or 0.0)
    frontend.shutting_down = True
    servicer.begin_shutdown()
    log.info("gRPC: stopping; letting running requests finish (up to %.0f s)", grace)
    await server.stop(grace)
    await frontend.close()
