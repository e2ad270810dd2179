"""What every HTTP route that generates shares (the native and OpenAI APIs in http.py, KServe HTTP in
kserve_http.py): reading a JSON body, racing a request against the client's disconnect, and streams that close
their generator (so a disconnect aborts the request in the engine at once)."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from kiln.errors import ErrorKind, RequestError
from kiln.server.validation import loads_json

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientGone(Exception):
    """The client closed the connection before the answer was ready (answered 499)."""


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def read_json(request: Request) -> Any:
    """The request's JSON body, parsed and checked (kiln.server.validation.loads_json); RequestError if bad.
    BodyLimit (http.py) has already bounded its size and read time."""
    raw = await request.body()
    if not raw.strip():
        raise RequestError("The request body is empty; send a JSON object", ErrorKind.BAD_BODY)
    return loads_json(raw)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator (so a disconnect aborts the request at once,
    not when the generator is garbage-collected)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                task = asyncio.get_running_loop().create_task(close())
                with contextlib.suppress(BaseException):
                    await asyncio.shield(task)


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def race_disconnect(request: Request, awaitable) -> Any:
    """Await `awaitable`; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


async def first_item(request: Request, agen: AsyncIterator) -> Any:
    """The first item of agen (before the response status is chosen), watching for a disconnect."""
    async def first():
        return await agen.__anext__()
    return await race_disconnect(request, first())
