"""Fuzz the HTTP APIs from the served OpenAPI schema (/openapi.json) with Hypothesis: bodies that follow the
schema's field names with values of any JSON type (right, wrong, huge, nested, odd unicode), plus free-form
JSON and broken bytes. Every answer is < 500 and comes in time. Bounded to well under a minute."""
from __future__ import annotations

import json
import time

import pytest
import requests

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BUDGET_S = 45.0
ANSWER_TIMEOUT_S = 60.0  # a hang fails the test through requests' timeout


@pytest.fixture(scope="module")
def server(kiln_server_factory):
    return kiln_server_factory(MAX_DEC_LEN="8")


@pytest.fixture(scope="module")
def schema(server):
    return requests.get(server.url + "/openapi.json", timeout=30).json()


def resolve(schema: dict, s: dict) -> dict:
    while "$ref" in s:
        s = schema["components"]["schemas"][s["$ref"].rsplit("/", 1)[-1]]
    return s


def properties(schema: dict, s: dict) -> dict:
    s = resolve(schema, s)
    out = dict(s.get("properties", {}))
    for sub in s.get("anyOf", []):
        out.update(properties(schema, sub))
    return out


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                    st.sampled_from(["\ud800", "10", "", "user", "assistant", "system", "hi"]),
                    st.sampled_from([0, 1, -1, 2**63, 2**64, 2**63 - 1, 50000, 49152]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
good_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "\ud800", 1]),
                                      "content": st.one_of(st.text(max_size=30), json_values)})


def body_strategy(schema: dict, path: str):
    body_schema = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    props = sorted(properties(schema, body_schema))
    value = st.one_of(json_values, st.lists(good_message, min_size=1, max_size=2),
                      st.lists(st.integers(min_value=-5, max_value=60000), max_size=5))
    fields = st.dictionaries(st.sampled_from(props), value, max_size=6)
    prompt = st.fixed_dictionaries({}, optional={"text": st.text(max_size=40), "prompt": st.text(max_size=40),
                                                 "model": st.just("m"), "max_tokens": st.integers(1, 4),
                                                 "max_dec_len": st.integers(1, 4),
                                                 "messages": st.lists(good_message, min_size=1, max_size=2)})
    return st.builds(lambda a, b: {**a, **b}, prompt, fields)


ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/chat/completions/chat/completions",
          "/v1/chat/completions/completions", "/v2/models/model/generate", "/tokenize", "/detokenize", "/v1/responses"]


def test_fuzz_no_5xx_no_hang(server, schema):
    deadline = time.monotonic() + BUDGET_S
    strategies = {p: body_strategy(schema, p) for p in ROUTES}
    raw_bodies = st.one_of(st.binary(max_size=64), st.text(max_size=64).map(lambda s: s.encode("utf-8", "replace")))
    seen = {"cases": 0, "4xx": 0}

    # no shrinking phase: a failure is reported as found, and the time bound holds
    @settings(max_examples=400, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate))
    @given(route=st.sampled_from(ROUTES), data=st.data(), raw=st.booleans(), as_raw=raw_bodies)
    def one(route, data, raw, as_raw):
        body = as_raw if raw else json.dumps(data.draw(strategies[route])).encode()
        if time.monotonic() > deadline:  # after every draw: Hypothesis needs the same draws on a replay
            return
        res = requests.post(server.url + route, data=body, headers={"Content-Type": "application/json"},
                            timeout=ANSWER_TIMEOUT_S)
        if res.headers.get("content-type", "").startswith(("text/event-stream", "application/x-ndjson")):
            text = res.text  # a stream must end (the timeout above catches a hang)
            assert "internal server error" not in text, (route, body[:300], text[-300:])
        seen["cases"] += 1
        seen["4xx"] += 400 <= res.status_code < 500
        assert res.status_code < 500, (route, body[:300], res.status_code, res.text[:300])

    one()
    assert seen["cases"] >= 20, seen
    print(f"fuzz: {seen['cases']} cases, {seen['4xx']} answered 4xx, none 5xx")
    assert server.wait_idle()["num_running"] == 0
