"""The HTTP API on PUSH_MODE_HTTP_PORT: the seed's native API and the OpenAI API, one FastAPI app per worker
process (the supervisor starts PUSH_MODE_HTTP_WORKERS of them on one shared listening socket).

Routes
  POST /v1/chat/completions        native body (text / input_ids / messages without model) -> native answer,
                                   OpenAI chat body -> OpenAI answer
  POST /v1/completions             OpenAI completions (raw prompt; a native body is served natively)
  POST /v1/chat/completions/completions, /v1/chat/completions/chat/completions
                                   the Gen-A OpenAI routes, so base_url=".../v1/chat/completions" works
  POST /v1/embeddings              OpenAI embeddings (the last position's final hidden state, L2-normalized)
  GET  /v1/models (+ /v1/chat/completions/models)
  GET  /v2/health/live, /v2/health/ready, /health    (this worker's view; the health port is HTTP_PORT)
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from kiln.config import KilnConfig, setup_logging
from kiln.errors import ErrorKind, RequestError, openai_error_body, seed_error_body
from kiln.server import kserve_http
from kiln.server import openai_schema as oai
from kiln.server import responses_api as rapi
from kiln.server.auth import ApiKeyMiddleware, ApiKeys
from kiln.server.frontend import Frontend, GenerationState, merge_streams
from kiln.server.http_common import (
    SSE_HEADERS,
    ClientGone,
    ClosingStreamingResponse,
    dumps,
    first_item,
    race_disconnect,
    read_json,
)
from kiln.server.seed_protocol import collect_seed_result, parse_seed_request, run_seed_request

log = logging.getLogger("kiln.http")

NDJSON = "application/x-ndjson"


class BodyTooLarge(Exception):
    pass


class BodyReadTimeout(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is answered 413 before it is read whole (at once from its
    Content-Length, else as soon as the bytes read pass the limit); a body whose next piece takes longer than
    `read_timeout` seconds is answered 408."""

    def __init__(self, app, max_bytes: int, read_timeout: float):
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send, BodyTooLarge())
        received = 0
        body_done = False
        started = False

        async def limited_receive():
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                raise BodyReadTimeout() from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge()
            else:
                body_done = True
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyReadTimeout) as e:
            if not started:
                await self._refuse(send, e)

    async def _refuse(self, send, e: Exception) -> None:
        if isinstance(e, BodyTooLarge):
            err = RequestError(f"The request body is larger than the limit of {self.max_bytes} bytes "
                               f"(KILN_MAX_REQUEST_BYTES)", ErrorKind.BODY_TOO_LARGE)
        else:
            err = RequestError(f"The request body was not sent in time (more than {self.read_timeout:g} s between "
                               f"two pieces)", ErrorKind.BODY_TIMEOUT)
        body = dumps(_both_error_body(err)).encode()
        await send({"type": "http.response.start", "status": err.http_status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _native_error(err: RequestError, req_id: Any = None) -> JSONResponse:
    rid = req_id if isinstance(req_id, (str, int)) and not isinstance(req_id, bool) else None
    return JSONResponse(seed_error_body(err, None if rid is None else str(rid)), status_code=err.http_status,
                        headers=err.headers)


def _openai_error(err: RequestError) -> JSONResponse:
    return JSONResponse(openai_error_body(err.message, err.http_status, err.param, err.error_type),
                        status_code=err.http_status, headers=err.headers)


def _both_error_body(err: RequestError) -> dict:
    body = seed_error_body(err)
    body.update(openai_error_body(err.message, err.http_status, err.param, err.error_type))
    return body


def _both_error(err: RequestError) -> JSONResponse:
    """Error on a route that serves both APIs, before we know which: both bodies in one."""
    return JSONResponse(_both_error_body(err), status_code=err.http_status, headers=err.headers)


def _is_native_chat(body: Any) -> bool:
    if not isinstance(body, dict):
        return True
    return "text" in body or "input_ids" in body or "model" not in body


def _is_native_completion(body: Any) -> bool:
    return isinstance(body, dict) and "prompt" not in body and ("text" in body or "input_ids" in body)


# ----------------------------------------------------------------------------------------------------
# native API
# ----------------------------------------------------------------------------------------------------

async def serve_native(request: Request, body: Any, fe: Frontend) -> Response:
    arrival = time.time()
    rid_hint = body.get("req_id") if isinstance(body, dict) else None
    try:
        fe.check_accepting()
        req = await parse_seed_request(body, fe, arrival_time=arrival)
    except RequestError as e:
        fe.reject(fe.new_record(str(rid_hint) if rid_hint is not None else "-", "native", arrival), e)
        return _native_error(e, rid_hint)

    if not req.stream:
        try:
            result = await race_disconnect(request, collect_seed_result(req, fe))
        except RequestError as e:
            return _native_error(e, req.req_id)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(result)

    agen = run_seed_request(req, fe)
    try:
        first = await first_item(request, agen)
    except RequestError as e:
        return _native_error(e, req.req_id)
    except ClientGone:
        return Response(status_code=499)

    async def lines() -> AsyncIterator[str]:
        try:
            yield dumps(first) + "\n"
            if first.get("is_end") == 1:
                return
            async for packet in agen:
                yield dumps(packet) + "\n"
        except RequestError as e:
            yield dumps(seed_error_body(e, req.req_id)) + "\n"
        finally:
            await agen.aclose()

    return ClosingStreamingResponse(lines(), media_type=NDJSON)


# ----------------------------------------------------------------------------------------------------
# OpenAI API
# ----------------------------------------------------------------------------------------------------

def _streams(job: oai.OpenAIJob, fe: Frontend):
    deadline = time.monotonic() + job.timeout
    streams, states, records = [], [], []
    for idx, p, rid in job.request_ids():
        rec = fe.new_record(rid, job.kind, job.arrival_time)
        st = GenerationState()
        streams.append(fe.stream(rid, job.prompts[p], job.params_for(p, idx % job.n), record=rec,
                                 deadline=deadline, state=st, skip_special_tokens=job.skip_special_tokens,
                                 include_stop_str_in_output=job.include_stop_str_in_output, timeout_s=job.timeout))
        states.append(st)
        records.append(rec)
    return streams, states, records


async def _collect_openai(job: oai.OpenAIJob, fe: Frontend) -> dict:
    streams, states, records = _streams(job, fe)
    builders = [oai.LogprobsBuilder(job, fe) for _ in streams]
    lp_parts: list[list] = [[] for _ in streams]
    finish: list[str | None] = [None] * len(streams)
    merged = merge_streams(streams)
    try:
        async for idx, ev in merged:
            if job.kind == "chat":
                if job.want_logprobs:
                    lp_parts[idx].append(builders[idx].chat_part(ev.token_ids, ev.logprobs))
                if ev.finished:
                    finish[idx] = ev.finish_reason
                continue
            d = oai.completion_delta(job, builders[idx], idx // job.n, ev, first=not lp_parts[idx])
            lp_parts[idx].append(d.logprobs)  # (None without logprobs: it marks that the choice has begun)
            if d.finish_reason is not None:
                finish[idx] = d.finish_reason
    finally:
        await merged.aclose()
    choices = []
    for idx, p, _rid in job.request_ids():
        if job.kind == "chat":
            message, finish_reason = oai.chat_message(job, states[idx].text, finish[idx])
            choices.append({"index": idx, "message": message, "logprobs": oai.merge_chat_logprobs(lp_parts[idx]),
                            "finish_reason": finish_reason})
        else:
            text = (job.prompt_texts[p] if job.echo else "") + ("" if job.echo_only else states[idx].text)
            choices.append({"index": idx, "text": text,
                            "logprobs": oai.merge_completion_logprobs(lp_parts[idx]), "finish_reason": finish[idx]})
    prompt_tokens = sum(len(x) for x in job.prompts)
    completion_tokens = 0 if job.echo_only else sum(len(st.token_ids) for st in states)
    if job.kind == "chat":
        return oai.chat_response(job, choices, prompt_tokens, completion_tokens)
    return oai.completion_response(job, choices, prompt_tokens, completion_tokens)


async def _start_streams(request: Request, job: oai.OpenAIJob, fe: Frontend):
    """(states, the merged streams, their first item or None, None), or (..., the error response) when the first
    output is an error: a streamed answer's status comes from its first output."""
    streams, states, _records = _streams(job, fe)
    merged = merge_streams(streams)
    try:
        return states, merged, await first_item(request, merged), None
    except RequestError as e:
        await merged.aclose()
        return states, merged, None, _openai_error(e)
    except ClientGone:
        return states, merged, None, Response(status_code=499)
    except StopAsyncIteration:
        return states, merged, None, None


async def serve_openai(request: Request, body: Any, fe: Frontend, kind: str) -> Response:
    arrival = time.time()
    try:
        fe.check_accepting()
        job = await (oai.parse_chat(body, fe) if kind == "chat" else oai.parse_completion(body, fe))
    except RequestError as e:
        fe.reject(fe.new_record("-", kind, arrival), e)
        return _openai_error(e)

    if not job.stream:
        try:
            return JSONResponse(await race_disconnect(request, _collect_openai(job, fe)))
        except RequestError as e:
            return _openai_error(e)
        except ClientGone:
            return Response(status_code=499)

    states, merged, first, error = await _start_streams(request, job, fe)
    if error is not None:
        return error

    builders = [oai.LogprobsBuilder(job, fe) for _ in states]
    choice_streams = [oai.ChatChoiceStream(job) for _ in states]
    text_events = [oai.TextDeltaEvent(job, idx, dumps) for idx in range(len(states))]
    thought_events = ([oai.TextDeltaEvent(job, idx, dumps, "reasoning_content") for idx in range(len(states))]
                      if job.reasoning is not None else None)
    plain = not (job.include_usage and job.continuous_usage)  # events that carry only the text
    prompt_tokens = sum(len(x) for x in job.prompts)

    def sse(obj: Any) -> str:
        return f"data: {dumps(obj)}\n\n"

    async def events() -> AsyncIterator[str]:
        started: set[int] = set()
        out_tokens = [0] * len(states)

        def chunks(idx: int, ev) -> list[str]:
            out = []
            p = idx // job.n
            out_tokens[idx] = ev.num_output_tokens
            if job.kind == "chat":
                if idx not in started:
                    started.add(idx)
                    out.append(sse(oai.chat_chunk(job, idx, {"role": "assistant", "content": ""}, None)))
                lp = builders[idx].chat_part(ev.token_ids, ev.logprobs)
                deltas, finish_reason = choice_streams[idx].deltas(ev.text, ev.finished, ev.finish_reason)
                if lp and not deltas:
                    deltas = [{"content": ""}]
                for k, delta in enumerate(deltas):
                    last = k == len(deltas) - 1
                    if plain and lp is None and not (last and ev.finished) and len(delta) == 1:
                        if "content" in delta:
                            out.append(text_events[idx].sse(delta["content"]))
                            continue
                        if thought_events is not None and "reasoning_content" in delta:
                            out.append(thought_events[idx].sse(delta["reasoning_content"]))
                            continue
                    c = oai.chat_chunk(job, idx, delta, finish_reason if last and ev.finished else None,
                                       lp if k == 0 else None)
                    if job.include_usage and job.continuous_usage:
                        c["usage"] = oai.usage(len(job.prompts[p]), ev.num_output_tokens)
                    out.append(sse(c))
            else:
                d = oai.completion_delta(job, builders[idx], p, ev, first=idx not in started)
                started.add(idx)
                if plain and d.text and d.finish_reason is None and d.logprobs is None:
                    out.append(text_events[idx].sse(d.text))
                elif d.text or d.finish_reason or d.logprobs:
                    c = oai.completion_chunk(job, idx, d.text, d.finish_reason, d.logprobs)
                    if job.include_usage and job.continuous_usage:
                        c["usage"] = oai.usage(len(job.prompts[p]), d.num_output_tokens)
                    out.append(sse(c))
            return out

        try:
            # one write per engine output: its chunks (a chat stream's role chunk, several tool-call deltas) joined
            if first is not None:
                head = "".join(chunks(*first))
                if head:
                    yield head
                async for idx, ev in merged:
                    out = chunks(idx, ev)
                    if out:
                        yield "".join(out)
            if job.include_usage:
                yield sse(oai.usage_chunk(job, prompt_tokens,
                                          0 if job.echo_only else sum(len(st.token_ids) for st in states)))
        except RequestError as e:
            yield sse(openai_error_body(e.message, e.http_status, e.param, e.error_type))
        finally:
            await merged.aclose()
        yield "data: [DONE]\n\n"

    return ClosingStreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def serve_responses(request: Request, body: Any, fe: Frontend) -> Response:
    """OpenAI's Responses API: the request runs as the chat request it means (kiln.server.responses_api)."""
    arrival = time.time()
    try:
        fe.check_accepting()
        chat = rapi.to_chat_body(body)
        job = await oai.parse_chat({**chat, "stream": False, "n": 1}, fe)
    except RequestError as e:
        e = rapi.in_responses_terms(e)
        fe.reject(fe.new_record("-", "responses", arrival), e)
        return _openai_error(e)
    writer = rapi.ResponseWriter(body, job.model)
    prompt_tokens = len(job.prompts[0])
    if not body.get("stream"):
        try:
            answer = await race_disconnect(request, _collect_openai(job, fe))
        except RequestError as e:
            return _openai_error(e)
        except ClientGone:
            return Response(status_code=499)
        choice = answer["choices"][0]
        return JSONResponse(writer.response(writer.items(choice["message"]), usage=(
            prompt_tokens, answer["usage"]["completion_tokens"]), finish_reason=choice["finish_reason"]))

    states, merged, first, error = await _start_streams(request, job, fe)
    if error is not None:
        return error
    events = rapi.ResponseEvents(writer)
    choice = oai.ChatChoiceStream(job)

    def sse(evs: list[dict]) -> str:
        return "".join(f"event: {ev['type']}\ndata: {dumps(ev)}\n\n" for ev in evs)

    async def stream() -> AsyncIterator[str]:
        finish = None
        try:
            yield sse(events.start())
            pending = [first] if first is not None else []
            async for item in _chain(pending, merged):
                _, ev = item
                deltas, finish_reason = choice.deltas(ev.text, ev.finished, ev.finish_reason)
                out = [e for d in deltas for e in events.delta(d)]
                if ev.finished:
                    finish = ev.finish_reason
                if out:
                    yield sse(out)
            message, finish = oai.chat_message(job, states[0].text, finish)
            yield sse(events.finish(message, (prompt_tokens, len(states[0].token_ids)), finish))
        except RequestError as e:
            yield sse([events.error(e)])
        finally:
            await merged.aclose()

    return ClosingStreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _chain(first: list, rest) -> AsyncIterator:
    for x in first:
        yield x
    async for x in rest:
        yield x


# ----------------------------------------------------------------------------------------------------
# the app
# ----------------------------------------------------------------------------------------------------

def create_app(cfg: KilnConfig, frontend: Frontend | None = None, warm_up: bool = False) -> FastAPI:
    """The HTTP API; `warm_up` (a worker's) runs warm_up_worker before the app takes connections."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        fe = frontend or await Frontend.start(cfg)
        app.state.frontend = fe
        if warm_up:
            try:
                log.info("HTTP worker warmed up in %.0f ms", 1000 * await warm_up_worker(app, cfg))
            except Exception:  # noqa: BLE001 - a failed warm-up costs the first request time, nothing more
                log.warning("HTTP worker warm-up failed", exc_info=True)
        try:
            yield
        finally:
            fe.shutting_down = True
            await fe.close()

    app = FastAPI(title="Kiln", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(kserve_http.router)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_request_bytes, read_timeout=cfg.http_read_timeout)
    app.add_middleware(ApiKeyMiddleware, keys=ApiKeys.for_api(cfg))  # KILN_API_KEY; health paths stay open

    def fe_of(request: Request) -> Frontend:
        return request.app.state.frontend

    async def body_or_error(request: Request, api: str, error_response):
        """The parsed JSON body, or (None, the error response) for one that is empty or not JSON: counted like
        any rejected request, except the worker's own warm-up calls (warm_up_worker)."""
        try:
            return await read_json(request), None
        except RequestError as e:
            if not request.scope.get(WARM_UP_SCOPE_KEY):
                fe_of(request).reject(fe_of(request).new_record("-", api), e)
            return None, error_response(e)

    async def native_or_openai(request: Request, is_native, kind: str):
        """The OpenAI paths also take the seed's native bodies (is_native tells them apart)."""
        fe = fe_of(request)
        body, error = await body_or_error(request, kind, _both_error)
        if error is not None:
            return error
        if is_native(body):
            return await serve_native(request, body, fe)
        return await serve_openai(request, body, fe, kind)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await native_or_openai(request, _is_native_chat, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await native_or_openai(request, _is_native_completion, "completions")

    async def openai_only(request: Request, kind: str, serve):
        """A route of the OpenAI API alone: its body, or its error, then serve(request, body, frontend)."""
        body, error = await body_or_error(request, kind, _openai_error)
        return error if error is not None else await serve(request, body, fe_of(request))

    @app.post("/v1/chat/completions/completions")
    async def genA_completions(request: Request):
        return await openai_only(request, "completions", lambda r, b, fe: serve_openai(r, b, fe, "completions"))

    @app.post("/v1/chat/completions/chat/completions")
    async def genA_chat(request: Request):
        return await openai_only(request, "chat", lambda r, b, fe: serve_openai(r, b, fe, "chat"))

    @app.post("/v1/responses")
    @app.post("/v1/chat/completions/responses")  # the Gen-A base URL's, as its other OpenAI routes
    async def responses(request: Request):
        return await openai_only(request, "responses", serve_responses)

    @app.get("/v1/responses/{response_id}")
    @app.delete("/v1/responses/{response_id}")
    @app.post("/v1/responses/{response_id}/cancel")
    @app.get("/v1/responses/{response_id}/input_items")
    async def stored_response(response_id: str):
        return _openai_error(RequestError(f"No response with id {response_id!r}: this server keeps no responses "
                                          f"(send the whole conversation in `input`)", ErrorKind.NOT_FOUND))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        arrival = time.time()
        fe = fe_of(request)
        body, error = await body_or_error(request, "embeddings", _openai_error)
        if error is not None:
            return error
        try:
            fe.check_accepting()
            job = await oai.parse_embeddings(body, fe)
        except RequestError as e:
            fe.reject(fe.new_record("-", "embeddings", arrival), e)
            return _openai_error(e)
        try:  # each input's request records its own end
            return JSONResponse(await race_disconnect(request, oai.run_embeddings(job, fe, arrival)))
        except RequestError as e:
            return _openai_error(e)

    async def tokenizer_route(request: Request, work):
        try:
            body = await read_json(request)
            return JSONResponse(await work(body, fe_of(request)))
        except RequestError as e:
            return _openai_error(e)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await tokenizer_route(request, oai.tokenize)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await tokenizer_route(request, oai.detokenize)

    async def lora_route(request: Request, load: bool):
        try:
            body = await read_json(request)
            return PlainTextResponse(await oai.update_lora_adapter(body, fe_of(request), load))
        except RequestError as e:
            return _openai_error(e)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await lora_route(request, True)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await lora_route(request, False)

    @app.get("/v1/models")
    @app.get("/v1/chat/completions/models")
    async def models(request: Request):
        return JSONResponse(oai.models_response(fe_of(request)))

    @app.get("/v1/models/{model:path}")  # a served name may hold "/"
    async def retrieve_model(request: Request, model: str):
        try:
            return JSONResponse(oai.retrieve_model(fe_of(request), model))
        except RequestError as e:
            return _openai_error(e)

    @app.get("/version")
    async def version():
        import kiln

        return JSONResponse({"version": getattr(kiln, "__version__", "")})

    @app.get("/v2/health/live")
    async def live(request: Request):
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    @app.get("/health")
    async def ready(request: Request):
        ok, code, msg = fe_of(request).readiness()
        if ok:
            return Response(status_code=200)
        return JSONResponse({"error_code": code, "error_msg": msg}, status_code=500 if request.url.path != "/health"
                            else 503)

    @app.get("/openapi.json")
    async def openapi_schema():
        from kiln.server.openapi import openapi_schema

        return JSONResponse(openapi_schema())

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        # the exception's text may carry paths, shapes or internals: it goes to the log only
        log.exception("unhandled error on %s", request.url.path)
        err = RequestError("internal server error (the server log has the details)", ErrorKind.INTERNAL, 501)
        return _both_error(err)

    return app


# ----------------------------------------------------------------------------------------------------
# worker process
# ----------------------------------------------------------------------------------------------------

def die_with_parent() -> None:
    """Linux: get SIGTERM when the parent (the supervisor) dies, so no worker outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux
        pass


def _watch_parent(server, ppid: int) -> None:
    while not server.should_exit:
        if os.getppid() != ppid:
            log.warning("the supervisor is gone; stopping")
            server.should_exit = True
            return
        time.sleep(1.0)


def h11_with_head_timeout(timeout: float):
    """uvicorn's h11 protocol, except that a connection which has not sent a whole request head within `timeout`
    seconds (from connecting, or from its previous response) is closed: uvicorn itself waits for ever, so
    partial headers could hold connections open without limit."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutH11Protocol(H11Protocol):
        _head_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a whole head arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadTimeoutH11Protocol


WARM_UP_SCOPE_KEY = "kiln.warm_up"  # marks warm_up_worker's in-process calls, which count nowhere


async def _asgi_call(app, method: str, path: str, body: bytes = b"", headers: list | None = None) -> None:
    """One request through the whole app in-process (middleware, routing, handler); the response is dropped."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *(headers or [])],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {}, WARM_UP_SCOPE_KEY: True}
    request_sent = False

    async def receive():
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects

    async def send(message):
        pass
    await app(scope, receive, send)


async def warm_up_worker(app, cfg: KilnConfig) -> float:
    """Work that the first request to a worker paid for (40-180 ms measured), done before it takes connections:
    FastAPI builds its route tables at the first match, and the first streamed response imports anyio's task
    groups and memory streams (compiling their bytecode where pip installed without it). In-process calls that
    reach no engine: every API path with an empty body (its 400 error) and one stream to a sink."""
    t0 = time.perf_counter()
    keys = ApiKeys.for_api(cfg)
    auth = [(b"authorization", b"Bearer " + keys.keys[0])] if keys.enabled else []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method == "POST":
                await _asgi_call(app, method, route.path, b"", auth)
    await _asgi_call(app, "GET", "/v1/models", b"", auth)

    async def two_chunks():
        yield "data: {}\n\n"
        yield "data: [DONE]\n\n"
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "asgi": {"version": "3.0"}}

    async def receive():
        await asyncio.sleep(3600)

    async def sink(message):
        pass
    await ClosingStreamingResponse(two_chunks(), media_type="text/event-stream", headers=SSE_HEADERS)(
        scope, receive, sink)
    return time.perf_counter() - t0


def run_worker(cfg: KilnConfig, sock: socket.socket, index: int = 0, started=None) -> None:
    """Process entry of one HTTP worker: serve the app on the supervisor's listening socket until SIGTERM
    (graceful: stop accepting, finish running requests within cfg.shutdown_timeout). `started` (an event)
    is set once the worker serves."""
    import uvicorn

    ppid = os.getppid()
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
    setup_logging(cfg, f"kiln-http-{index}")

    class WorkerServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            signal.signal(signal.SIGTERM, self.handle_exit)
            yield

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if started is not None and not self.should_exit:
                started.set()

    config = uvicorn.Config(create_app(cfg, warm_up=True), log_config=None, access_log=cfg.fd_debug, lifespan="on",
                            timeout_graceful_shutdown=int(max(1, cfg.shutdown_timeout)), timeout_keep_alive=5,
                            proxy_headers=False, server_header=False,
                            http=h11_with_head_timeout(cfg.http_read_timeout))
    server = WorkerServer(config)
    threading.Thread(target=_watch_parent, args=(server, ppid), daemon=True).start()
    server.run(sockets=[sock])
    log.info("HTTP worker %d stopped", index)
