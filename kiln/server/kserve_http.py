"""KServe v2 over HTTP, on PUSH_MODE_HTTP_PORT: the same model `model` as the gRPC service.

    GET  /v2                                   server metadata {name, version, extensions}
    GET  /v2/models/model[/versions/1]         model metadata {name, versions, platform, inputs, outputs}
    GET  /v2/models/model[/versions/1]/ready   200 when ready, 400 when not (KServe v2: a 4xx means false)
    GET  /v2/models/model[/versions/1]/config  the model configuration (Triton's JSON form)
    GET  /v2/models[/model[/versions/1]]/stats  Triton's model statistics (kserve.model_statistics)
    POST /v2/repository/index                  the model repository's index (the model, its LoRA adapters, state)
    POST /v2/repository/models/{name}/load | unload   LoRA adapters as models (kserve.repository_update)
    POST /v2/models/model[/versions/1]/generate          Triton's generate extension: one JSON answer
    POST /v2/models/model[/versions/1]/generate_stream   the same as server-sent events, one per token

Generate bodies. As Triton maps a generate body's fields to the model's inputs, `{"IN": "[{...seed
request...}]"}` (IN as the JSON text gRPC carries, or as the array / object itself) is the exact form. Two
shorter forms are accepted: the seed request's fields at the top level (`{"text": "...", "max_dec_len": 20}`),
and the LLM convention `{"text_input": "...", "parameters": {"max_tokens": 20, "temperature": 0}}` (the
parameters are seed / OpenAI-style field names). Validation is the native API's (kiln.server.seed_protocol).

Answers: `{"model_name": "model", "model_version": "1", "OUT": "<json.dumps([packet])>", "text_output":
"<text>"}`: OUT is what gRPC's OUT carries (the final packet for /generate, one packet per event for
/generate_stream); text_output the whole text (/generate) or this packet's text (/generate_stream).
Errors: the HTTP status of the error type (400, 404, 409, 429, 500, 503, 504) and `{"error": msg,
"error_msg": msg, "error_code": n}`; in a stream, an event carrying the same object, then the stream ends.

The HTTP app includes `router` (`app.include_router(kserve_http.router)`); it finds the front end in
`request.app.state.frontend`.
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kiln.errors import RequestError
from kiln.server.http_common import (
    SSE_HEADERS,
    ClientGone,
    ClosingStreamingResponse,
    dumps,
    race_disconnect,
    read_json,
)
from kiln.server.kserve import (
    EXTENSIONS,
    MODEL_NAME,
    MODEL_VERSION,
    SERVER_NAME,
    bad,
    check_model,
    model_config,
    model_metadata,
    model_statistics,
    repository_index,
    repository_update,
    request_in,
    server_version,
)

router = APIRouter()


def _fe(request: Request) -> Any:
    return request.app.state.frontend


def _check(request: Request, name: str, version: str | None) -> JSONResponse | None:
    """None if name/version is the model, else the 404 answer."""
    fe = getattr(request.app.state, "frontend", None)
    try:
        check_model(name, version, (getattr(fe, "model_name", None) or "", *getattr(fe, "lora_modules", {})))
    except RequestError as e:
        return JSONResponse(_error_body(e), status_code=e.http_status, headers=e.headers)
    return None


# -- metadata and health ------------------------------------------------------------------------------------
@router.get("/v2")
async def server_metadata() -> JSONResponse:
    return JSONResponse({"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS})


@router.get("/v2/models/stats")  # before /v2/models/{name}, which would take "stats" for a name
async def all_model_statistics(request: Request) -> JSONResponse:
    return JSONResponse(model_statistics(getattr(_fe(request).client, "stats", None)))


@router.get("/v2/models/{name}/stats")
@router.get("/v2/models/{name}/versions/{version}/stats")
async def get_model_statistics(request: Request, name: str, version: str | None = None) -> JSONResponse:
    return _check(request, name, version) or await all_model_statistics(request)


@router.post("/v2/repository/index")
async def get_repository_index(request: Request) -> JSONResponse:
    """Triton's index of the model repository; a body {"ready": true} lists only ready models."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
        err = bad('the body must be empty or a JSON object {"ready": true|false}')
        return JSONResponse(_error_body(err), status_code=err.http_status)
    ready = _fe(request).readiness()[0]
    return JSONResponse([m for m in repository_index(ready, _fe(request).lora_modules)
                         if ready or not body.get("ready", False)])


async def _repository(request: Request, name: str, load: bool) -> Response:
    """Triton's POST /v2/repository/models/{name}/load | unload, body {"parameters": {...}} (optional)."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        body = None
    params = body.get("parameters", {}) if isinstance(body, dict) else None
    try:
        if not isinstance(params, dict):
            raise bad('the body must be empty or a JSON object {"parameters": {...}}')
        await repository_update(_fe(request), name, load, params)
    except RequestError as e:
        return JSONResponse(_error_body(e), status_code=e.http_status)
    return Response(status_code=200)


@router.post("/v2/repository/models/{name}/load")
async def load_model(request: Request, name: str) -> Response:
    return await _repository(request, name, True)


@router.post("/v2/repository/models/{name}/unload")
async def unload_model(request: Request, name: str) -> Response:
    return await _repository(request, name, False)


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def get_model_metadata(request: Request, name: str, version: str | None = None) -> JSONResponse:
    return _check(request, name, version) or JSONResponse(model_metadata())


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    if (not_found := _check(request, name, version)) is not None:
        return not_found
    ok, _code, msg = _fe(request).readiness()
    if ok:
        return Response(status_code=200)
    return JSONResponse({"error": msg or "model is not ready"}, status_code=400)


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config")
async def get_model_config(request: Request, name: str, version: str | None = None) -> JSONResponse:
    return _check(request, name, version) or JSONResponse(model_config())


# -- generate -------------------------------------------------------------------------------------------------
def seed_body(body: Any) -> Any:
    """A generate body -> the seed request dict (see the module docstring); raises RequestError."""
    if not isinstance(body, dict):
        raise bad("The generate body must be a JSON object")
    if "IN" in body:
        v = body["IN"]
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):  # IN as a one-element BYTES tensor
            v = v[0]
        return request_in(v)
    if "text_input" in body:
        d = {k: v for k, v in body.items() if k not in ("text_input", "parameters")}
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise bad("`parameters` must be a JSON object")
        d.update(params)
        d["text"] = body["text_input"]
        if "id" in d and "req_id" not in d:
            d["req_id"] = d.pop("id")
        return d
    d = dict(body)
    if "id" in d and "req_id" not in d:
        d["req_id"] = d.pop("id")
    return d


def _error_body(err: RequestError, req_id: str | None = None) -> dict:
    out = {"error": err.message, "error_msg": err.message, "error_code": err.code}
    if req_id:
        out["req_id"] = req_id
    return out


def _answer(packet: dict, text: str) -> dict:
    return {"model_name": MODEL_NAME, "model_version": MODEL_VERSION,
            "OUT": json.dumps([packet], ensure_ascii=False), "text_output": text}


async def _start(request: Request, name: str, version: str | None, stream: bool):
    """Parse and validate; returns (frontend, SeedRequest) or an error Response."""
    from kiln.server.seed_protocol import parse_seed_request

    if (not_found := _check(request, name, version)) is not None:
        return None, not_found
    fe = _fe(request)
    arrival = time.time()
    rid_hint = None
    try:
        d = seed_body(await read_json(request))
        rid_hint = d.get("req_id") if isinstance(d, dict) else None
        if isinstance(d, dict) and name in fe.lora_modules:  # a LoRA adapter's model runs with that adapter
            d["model"] = name
        fe.check_accepting()
        req = await parse_seed_request(d, fe, api="kserve", arrival_time=arrival)
    except RequestError as e:
        rid = str(rid_hint) if rid_hint is not None else None
        fe.reject(fe.new_record(rid or "-", "kserve", arrival), e)
        return None, JSONResponse(_error_body(e, rid), status_code=e.http_status, headers=e.headers)
    req.return_all_tokens = req.return_all_tokens or not stream
    return fe, req


@router.post("/v2/models/{name}/generate")
@router.post("/v2/models/{name}/versions/{version}/generate")
async def generate(request: Request, name: str, version: str | None = None) -> Response:
    from kiln.server.seed_protocol import run_seed_request

    fe, req = await _start(request, name, version, stream=False)
    if fe is None:
        return req

    async def final() -> dict:
        last = None
        async with contextlib.aclosing(run_seed_request(req, fe)) as packets:
            async for p in packets:
                last = p
        return last

    try:
        packet = await race_disconnect(request, final())
    except ClientGone:  # the request was cancelled, so aborted in the engine
        return Response(status_code=499)
    except RequestError as e:
        return JSONResponse(_error_body(e, req.req_id), status_code=e.http_status, headers=e.headers)
    return JSONResponse(_answer(packet, packet.get("tokens_all", "")))


@router.post("/v2/models/{name}/generate_stream")
@router.post("/v2/models/{name}/versions/{version}/generate_stream")
async def generate_stream(request: Request, name: str, version: str | None = None) -> Response:
    from kiln.server.seed_protocol import run_seed_request

    fe, req = await _start(request, name, version, stream=True)
    if fe is None:
        return req
    packets = run_seed_request(req, fe)

    def event(obj: dict) -> str:
        return "data: " + dumps(obj) + "\n\n"

    # the first packet decides the status: a rejection is a plain error response, not a stream
    try:
        first = await packets.__anext__()
    except RequestError as e:
        await packets.aclose()
        return JSONResponse(_error_body(e, req.req_id), status_code=e.http_status, headers=e.headers)
    except StopAsyncIteration:
        return JSONResponse({"error": "the request ended without a result"}, status_code=500)

    async def events() -> AsyncIterator[str]:
        try:
            p = first
            while True:
                text = p.get("tokens_all", "") if req.return_all_tokens else p.get("token", "")
                yield event(_answer(p, text))
                if p.get("is_end") == 1:
                    return
                p = await packets.__anext__()
        except StopAsyncIteration:
            return
        except RequestError as e:
            yield event({"model_name": MODEL_NAME, "model_version": MODEL_VERSION, **_error_body(e, req.req_id)})
        finally:
            await packets.aclose()

    return ClosingStreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
