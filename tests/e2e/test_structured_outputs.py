"""Structured outputs on a real `kiln serve` (bundled SmolLM2), driven by the `openai` package: json_schema
responses validate with jsonschema (streamed and not), vLLM's structured_outputs regex/choice match, requests
without a grammar are unchanged beside grammar requests, and a bad schema is a 400 naming the problem. The
native API takes the same `response_format`."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import requests

from tests.helpers.structured import ASK_PERSON as ASK, PERSON

RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def server(kiln_server_factory):
    # float32: greedy outputs do not depend on the batch's make-up (bf16 on CPU can), so "unchanged" is exact
    return kiln_server_factory(DTYPE="float32")


@pytest.fixture(scope="module")
def client(server):
    return openai.Client(base_url=server.url + "/v1", api_key="EMPTY_API_KEY", timeout=300, max_retries=0)


def test_json_schema_chat(client):
    r = client.chat.completions.create(model="default", messages=ASK, max_tokens=80, temperature=0,
                                       response_format=RESPONSE_FORMAT)
    c = r.choices[0]
    assert c.finish_reason == "stop", c
    jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_schema_chat_streamed(client):
    stream = client.chat.completions.create(model="default", messages=ASK, max_tokens=80, temperature=0.7, seed=3,
                                            response_format=RESPONSE_FORMAT, stream=True)
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_regex_and_choice_through_structured_outputs(client):
    r = client.completions.create(model="default", prompt="My phone number is", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert r.choices[0].finish_reason == "stop" and re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Is water wet?"}],
                                       max_tokens=10, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content in ("yes", "no")


def test_plain_requests_unchanged_beside_grammar_requests(client):
    def plain():
        return client.completions.create(model="default", prompt="The capital of France is", max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    def grammar():
        return client.chat.completions.create(model="default", messages=ASK, max_tokens=80, temperature=0,
                                              response_format=RESPONSE_FORMAT).choices[0].message.content

    alone = plain()
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(grammar), pool.submit(plain), pool.submit(grammar), pool.submit(plain)]
        outs = [f.result() for f in futs]
    assert outs[1] == outs[3] == alone
    for o in (outs[0], outs[2]):
        jsonschema.validate(json.loads(o), PERSON)


def test_invalid_schema_is_a_400_naming_the_problem(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=ASK, max_tokens=10, response_format=bad)
    assert "objekt" in str(e.value) and "response_format" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="default", prompt="x", max_tokens=5,
                                  extra_body={"structured_outputs": {"regex": "[a-"}})
    assert "regex" in str(e.value)


def test_native_api_response_format(server):
    body = {"text": "Describe a person as JSON: name, age, favourite color, tags.", "temperature": 0,
            "max_dec_len": 80, "response_format": RESPONSE_FORMAT}
    res = requests.post(server.url + "/v1/chat/completions", json=body, timeout=300)
    assert res.status_code == 200, res.text
    out = res.json()
    assert out["finish_reason"] == "stop", out
    jsonschema.validate(json.loads(out["result"]), PERSON)
    res = requests.post(server.url + "/v1/chat/completions", json={**body, "response_format": {"type": "xml"}},
                        timeout=60)
    assert res.status_code == 400 and "response_format" in res.text
