"""The health server on HTTP_PORT (run inside the supervisor process, which sees every child process).

GET /v2/health/live   200, empty body: the service process answers.
GET /v2/health/ready  200, empty body: model loaded, warm-up done, engine heartbeat fresher than
                      CHECK_HEALTH_INTERVAL, HTTP workers up, gRPC accepting. Otherwise 500 with the seed's
                      {"error_code": n, "error_msg": ...}: 1 "server is not ready", 2 "infer engine is down",
                      3 "infer engine hangs".
GET /stats            the engine's latest stats as JSON (running, waiting, free/total KV blocks...).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

NOT_READY = (1, "server is not ready")
ENGINE_DOWN = (2, "infer engine is down")
ENGINE_HANGS = (3, "infer engine hangs")


@dataclass
class HealthStatus:
    ok: bool
    code: int = 0
    msg: str = ""


def engine_status(stats, fatal: str | None, engine_alive: bool, interval_s: float) -> HealthStatus:
    """The engine part of readiness from its latest stats snapshot."""
    if not engine_alive or fatal:
        return HealthStatus(False, *ENGINE_DOWN)
    if stats is None or not stats.ready:
        return HealthStatus(False, *ENGINE_DOWN)
    if time.time() - stats.timestamp > interval_s:
        return HealthStatus(False, *ENGINE_HANGS)
    return HealthStatus(True)


async def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    w.close()
    try:
        await w.wait_closed()
    except OSError:
        pass
    return True


def create_health_app(ready_check: Callable[[], Awaitable[HealthStatus]],
                      stats: Callable[[], dict] | None = None) -> FastAPI:
    app = FastAPI(title="Kiln health", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        st = await ready_check()
        if st.ok:
            return Response(status_code=200)
        return JSONResponse({"error_code": st.code, "error_msg": st.msg}, status_code=500)

    @app.get("/stats")
    async def engine_stats():
        return JSONResponse(stats() if stats else {})

    return app
