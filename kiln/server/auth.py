"""API keys: the one check every interface uses (HTTP and KServe HTTP routes, gRPC, metrics).

A request carries its key as `Authorization: Bearer <key>` (what the OpenAI clients send; gRPC: metadata
`authorization: Bearer <key>`) or as `X-API-Key: <key>`. Keys are compared in constant time against every
configured key, so the answer's timing tells nothing about how much of a key was right. Health probes stay
open: a load balancer or Kubernetes must see readiness without a key.
"""
from __future__ import annotations

import hmac
import json
from typing import Iterable

import grpc

MISSING = "missing API key: send the header `Authorization: Bearer <key>` (the key set in KILN_API_KEY)"
WRONG = "invalid API key: the key in `Authorization: Bearer <key>` is not one of the server's keys"

# paths served without a key on the HTTP port (health probes) and the gRPC methods likewise
OPEN_HTTP_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/health"})
OPEN_GRPC_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive",
                               "/inference.GRPCInferenceService/ServerReady",
                               "/inference.GRPCInferenceService/ModelReady"})


class ApiKeys:
    """The accepted keys; empty = no key needed."""

    def __init__(self, keys: Iterable[str] = ()):
        self.keys = tuple(k.encode() for k in keys)

    @classmethod
    def parse(cls, raw: str | None) -> "ApiKeys":
        """`key1,key2` -> the keys (blanks around commas ignored)."""
        return cls(k.strip() for k in (raw or "").split(",") if k.strip())

    @classmethod
    def for_api(cls, cfg) -> "ApiKeys":
        return cls.parse(getattr(cfg, "api_key", None))

    @classmethod
    def for_metrics(cls, cfg) -> "ApiKeys":
        raw = getattr(cfg, "metrics_api_key", None)
        return cls.for_api(cfg) if (raw or "").strip().lower() == "same" else cls.parse(raw)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def problem(self, authorization: str | None, x_api_key: str | None = None) -> str | None:
        """None if the request may pass, else what is wrong (for the 401 / UNAUTHENTICATED message)."""
        if not self.keys:
            return None
        given = presented_key(authorization, x_api_key)
        if given is None:
            return MISSING
        g = given.encode("utf-8", "surrogateescape")
        ok = False
        for k in self.keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(g, k)
        return None if ok else WRONG


def presented_key(authorization: str | None, x_api_key: str | None = None) -> str | None:
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def unauthorized_body(message: str) -> dict:
    """Both error shapes the HTTP port speaks: the seed's (error_msg, error_code) and OpenAI's (error)."""
    return {"error_msg": message, "error_code": 401,
            "error": {"message": message, "type": "authentication_error", "param": None, "code": "invalid_api_key"}}


class ApiKeyMiddleware:
    """ASGI middleware: HTTP requests outside `open_paths` need a key; others get 401 before any routing."""

    def __init__(self, app, keys: ApiKeys, open_paths: Iterable[str] = OPEN_HTTP_PATHS):
        self.app = app
        self.keys = keys
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys.enabled or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope.get("headers") or ():
            if name in (b"authorization", b"x-api-key"):
                headers[name] = value.decode("latin-1")
        problem = self.keys.problem(headers.get(b"authorization"), headers.get(b"x-api-key"))
        if problem is None:
            return await self.app(scope, receive, send)
        body = json.dumps(unauthorized_body(problem)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="kiln"')]})
        await send({"type": "http.response.body", "body": body})


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """gRPC: every method outside OPEN_GRPC_METHODS needs `authorization: Bearer <key>` metadata (or
    `x-api-key`); others end with UNAUTHENTICATED before the servicer runs."""

    def __init__(self, keys: ApiKeys, open_methods: Iterable[str] = OPEN_GRPC_METHODS):
        self.keys = keys
        self.open_methods = frozenset(open_methods)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not self.keys.enabled or details.method in self.open_methods:
            return handler
        md = {k.lower(): v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        problem = self.keys.problem(md.get("authorization"), md.get("x-api-key"))
        if problem is None:
            return handler
        return _denying_handler(handler, problem)


def _denying_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.response_streaming:
        async def deny_stream(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - an async generator, as a streaming handler must be

        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming \
            else grpc.unary_stream_rpc_method_handler
        return make(deny_stream, **kw)

    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(deny, **kw)
