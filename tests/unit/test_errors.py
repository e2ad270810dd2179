"""kiln.errors: every error kind has its status in every API, and the seed's wording of engine errors."""
from __future__ import annotations

import grpc

from kiln.errors import (GRPC_STATUS, HTTP_STATUS, OPENAI_ERROR_TYPE, SEED_CODE, ErrorKind, RequestError,
                         seed_message)


def test_every_kind_has_a_status_in_every_api():
    for kind in ErrorKind:
        assert HTTP_STATUS[kind] in OPENAI_ERROR_TYPE or HTTP_STATUS[kind] in (408, 413), kind
        assert isinstance(getattr(grpc.StatusCode, GRPC_STATUS[kind]), grpc.StatusCode), kind
        assert SEED_CODE[kind] in (200, 400, 404, 500, 501), kind


def test_request_error_takes_its_codes_from_the_kind():
    e = RequestError("full", "queue_full")
    assert (e.kind, e.http_status, e.code, e.grpc_status_name) == (ErrorKind.QUEUE_FULL, 429, 200,
                                                                   "RESOURCE_EXHAUSTED")
    assert RequestError("late", ErrorKind.NOT_READY, 501).code == 501       # an explicit seed code wins
    assert RequestError("?", "no-such-kind").kind == ErrorKind.INTERNAL


def test_seed_wording_of_engine_errors():
    assert seed_message("queue_full", "2 requests are waiting", {"why": "queue_full", "waiting": 2, "limit": 2}) \
        == "cached task num (2) exceeds the limit (2)"
    assert seed_message("duplicate_id", "x", {"why": "duplicate_id", "request_id": "r1"}) == \
        "The req_id r1 already exists in the current batch, the current request will be ignored."
    assert seed_message("invalid", "top_k must be an int") == "top_k must be an int"   # no seed wording: detail


def test_only_a_full_queue_asks_for_a_retry():
    from kiln.errors import RETRY_AFTER_S, retry_after

    assert RequestError("full", "queue_full").headers == {"Retry-After": str(RETRY_AFTER_S)}
    assert retry_after("queue_full") == RETRY_AFTER_S
    for kind in ErrorKind:
        if kind is not ErrorKind.QUEUE_FULL:
            assert RequestError("x", kind).headers is None and retry_after(kind) is None
