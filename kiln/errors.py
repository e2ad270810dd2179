"""Every error a request can end with: its kind, and what each API makes of a kind.

The engine reports an `ErrorKind` plus a plain detail (and, for the few errors the seed words its own way, the
facts in `args`); it knows no status codes and no API's wording. The front ends turn a kind into an HTTP
status, a gRPC status, an OpenAI error type and the seed's `error_code`, all from the tables here, and
`seed_message()` gives the seed's wording where the seed's API has one.
"""
from __future__ import annotations

import enum
from typing import Any


class ErrorKind(str, enum.Enum):
    INVALID = "invalid"                # a request field is wrong
    BAD_BODY = "bad_body"              # not JSON / not an object / not the protocol's shape
    BODY_TIMEOUT = "body_timeout"      # the body was not sent in time (KILN_HTTP_READ_TIMEOUT)
    BODY_TOO_LARGE = "body_too_large"  # the body is over KILN_MAX_REQUEST_BYTES
    TOO_LONG = "too_long"              # prompt (+ output) can never fit the model length or the KV cache
    NOT_FOUND = "not_found"            # unknown model
    DUPLICATE_ID = "duplicate_id"      # the req_id is already in flight
    QUEUE_FULL = "queue_full"          # MAX_CACHED_TASK_NUM requests are waiting
    INTERNAL = "internal"
    NOT_READY = "not_ready"            # the engine is loading, down, or the server is shutting down
    TIMEOUT = "timeout"                # the request's `timeout` expired (it is cancelled in the engine)

    def __str__(self) -> str:
        return self.value


K = ErrorKind

HTTP_STATUS: dict[ErrorKind, int] = {
    K.INVALID: 400, K.BAD_BODY: 400, K.BODY_TIMEOUT: 408, K.BODY_TOO_LARGE: 413, K.TOO_LONG: 400, K.NOT_FOUND: 404,
    K.DUPLICATE_ID: 409, K.QUEUE_FULL: 429, K.INTERNAL: 500, K.NOT_READY: 503, K.TIMEOUT: 504,
}

# names of grpc.StatusCode members (this module does not import grpc)
GRPC_STATUS: dict[ErrorKind, str] = {
    K.INVALID: "INVALID_ARGUMENT", K.BAD_BODY: "INVALID_ARGUMENT", K.BODY_TIMEOUT: "DEADLINE_EXCEEDED",
    K.BODY_TOO_LARGE: "RESOURCE_EXHAUSTED", K.TOO_LONG: "INVALID_ARGUMENT", K.NOT_FOUND: "NOT_FOUND",
    K.DUPLICATE_ID: "ALREADY_EXISTS", K.QUEUE_FULL: "RESOURCE_EXHAUSTED", K.INTERNAL: "INTERNAL",
    K.NOT_READY: "UNAVAILABLE", K.TIMEOUT: "DEADLINE_EXCEEDED",
}

# A full queue (MAX_CACHED_TASK_NUM) is the one refusal worth retrying soon: HTTP `Retry-After`, gRPC trailing
# metadata `retry-after` and the message say when. One second: a step of a loaded server frees queue slots in
# tens of milliseconds, so a client that waits this long finds room unless the overload persists.
RETRY_AFTER_S = 1


def retry_after(kind: "ErrorKind | str | None") -> int | None:
    """Seconds a client should wait before retrying a request that ended with `kind`; None: do not retry."""
    return RETRY_AFTER_S if kind is not None and as_kind(kind) is ErrorKind.QUEUE_FULL else None


# HTTP status -> the OpenAI error object's `type`
OPENAI_ERROR_TYPE: dict[int, str] = {
    400: "invalid_request_error", 404: "not_found_error", 409: "invalid_request_error", 429: "rate_limit_error",
    500: "server_error", 503: "server_error", 504: "timeout_error",
}

# the seed's error codes (the native API's `error_code`): 0 ok, 200 model-side validation / rejection,
# 400 bad body, 500 internal inference error, 501 handler exception / timeout
SEED_CODE_REJECTED = 200
SEED_CODE_BAD_BODY = 400
SEED_CODE_INTERNAL = 500
SEED_CODE_TIMEOUT = 501

SEED_CODE: dict[ErrorKind, int] = {
    K.INVALID: SEED_CODE_REJECTED, K.TOO_LONG: SEED_CODE_REJECTED, K.DUPLICATE_ID: SEED_CODE_REJECTED,
    K.QUEUE_FULL: SEED_CODE_REJECTED, K.BAD_BODY: SEED_CODE_BAD_BODY, K.BODY_TIMEOUT: SEED_CODE_BAD_BODY,
    K.BODY_TOO_LARGE: SEED_CODE_BAD_BODY, K.NOT_FOUND: 404, K.INTERNAL: SEED_CODE_INTERNAL,
    K.NOT_READY: SEED_CODE_INTERNAL, K.TIMEOUT: SEED_CODE_TIMEOUT,
}

# The seed's wording of the engine's own rejections, keyed by the `args` the engine sends with them.
_SEED_WORDING: dict[str, str] = {
    "duplicate_id": "The req_id {request_id} already exists in the current batch, the current request will be "
                    "ignored.",
    "queue_full": "cached task num ({waiting}) exceeds the limit ({limit})",
    "model_length": "Length of input token({prompt_tokens}) exceeds the limit of the model length "
                    "({max_model_len}); leave room for at least one new token",
    "kv_blocks": "The input task required resources is exceed the limit: {prompt_tokens} prompt + {max_tokens} "
                 "max new tokens need {blocks_needed} KV blocks, the cache has {num_blocks}",
}


def seed_message(kind: ErrorKind | str | None, detail: str | None, args: dict[str, Any] | None = None) -> str:
    """The seed's words for an engine error: its own wording where it has one (args["why"] picks it), else
    the engine's detail."""
    why = (args or {}).get("why")
    if why in _SEED_WORDING:
        try:
            return _SEED_WORDING[why].format(**args)
        except (KeyError, IndexError):
            pass
    return detail or f"the request failed ({kind or ErrorKind.INTERNAL})"


def as_kind(kind: ErrorKind | str | None) -> ErrorKind:
    try:
        return ErrorKind(kind)
    except ValueError:
        return ErrorKind.INTERNAL


class RequestError(Exception):
    """A request failed: `message` for the user, `kind` picks every API's status; `code` is the seed's
    error_code (its kind's unless given), `param` the request field at fault (OpenAI's `param`)."""

    def __init__(self, message: str, kind: ErrorKind | str = ErrorKind.INVALID, code: int | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.message = message
        self.kind = as_kind(kind)
        self.code = SEED_CODE[self.kind] if code is None else code
        self.param = param

    @property
    def error_type(self) -> str:
        return self.kind.value

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.kind]

    @property
    def grpc_status_name(self) -> str:
        return GRPC_STATUS[self.kind]

    @property
    def headers(self) -> dict[str, str] | None:
        """HTTP headers of the error response: Retry-After for a full queue."""
        s = retry_after(self.kind)
        return None if s is None else {"Retry-After": str(s)}

    def __repr__(self) -> str:
        return f"RequestError({self.message!r}, {self.kind.value!r}, {self.code})"


def openai_error_body(message: str, status: int, param: str | None = None, code: Any = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": OPENAI_ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": code if code is not None else status}}


def seed_error_body(err: RequestError, req_id: str | None = None) -> dict[str, Any]:
    """The seed's error body: {req_id, error_msg, error_code}."""
    out: dict[str, Any] = {}
    if req_id is not None:
        out["req_id"] = req_id
    out["error_msg"] = err.message
    out["error_code"] = err.code
    return out
