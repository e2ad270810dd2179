"""API keys (issue 15, defect 8): with KILN_API_KEY set, HTTP (native, OpenAI, KServe routes), gRPC and (with
KILN_METRICS_API_KEY=same) /metrics need a key; health probes stay open; wrong or missing keys get 401 /
UNAUTHENTICATED with a message that says what to send; the key never reaches the log."""
from __future__ import annotations

import json

import numpy as np
import pytest
import requests

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException  # noqa: E402

KEYS = "first-key-123,second-key-456"
NATIVE = {"text": "hi", "max_dec_len": 2}


@pytest.fixture(scope="module")
def server(kiln_server_factory):
    return kiln_server_factory(KILN_API_KEY=KEYS, KILN_METRICS_API_KEY="same")


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers,problem", [
    ({}, "missing API key"),
    (bearer("wrong"), "invalid API key"),
    ({"Authorization": "Basic Zmlyc3Qta2V5LTEyMw=="}, "missing API key"),
    (bearer("first-key-12"), "invalid API key"),                  # a prefix of a key is not the key
])
def test_http_refuses_without_a_right_key(server, headers, problem):
    for path, body in (("/v1/chat/completions", NATIVE),
                       ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2}),
                       ("/v2/models/model/generate", {"text_input": "hi", "parameters": {"max_tokens": 2}}),
                       ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        r = requests.post(server.url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        b = r.json()
        assert problem in b["error_msg"] and "Authorization: Bearer" in b["error_msg"]
        assert b["error_code"] == 401 and b["error"]["type"] == "authentication_error"
    for path in ("/v1/models", "/v2/models/stats", "/v2/models/model/stats"):  # the statistics too
        r = requests.get(server.url + path, headers=headers, timeout=30)
        assert r.status_code == 401, path
    assert requests.post(server.url + "/v2/repository/index", headers=headers, timeout=30).status_code == 401


def test_http_serves_each_key_and_both_headers(server):
    for headers in (bearer("first-key-123"), bearer("second-key-456"), {"X-API-Key": "second-key-456"}):
        r = requests.post(server.url + "/v1/chat/completions", json=NATIVE, headers=headers, timeout=60)
        assert r.status_code == 200 and isinstance(r.json()["result"], str), r.text
    r = requests.post(server.url + "/v2/models/model/generate", json={"text_input": "hi", "parameters":
                                                                      {"max_tokens": 2}},
                      headers=bearer("first-key-123"), timeout=60)
    assert r.status_code == 200, r.text


def test_openai_client_with_and_without_key(server):
    import openai
    good = openai.Client(base_url=server.url + "/v1", api_key="second-key-456", timeout=60, max_retries=0)
    out = good.completions.create(model="m", prompt="hi", max_tokens=2)
    assert out.choices[0].text is not None
    bad = openai.Client(base_url=server.url + "/v1", api_key="nope", timeout=60, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="m", prompt="hi", max_tokens=2)


def test_health_probes_stay_open(server):
    for url in (server.health_url + "/v2/health/ready", server.health_url + "/v2/health/live",
                server.url + "/v2/health/ready", server.url + "/v2/health/live", server.url + "/health"):
        assert requests.get(url, timeout=10).status_code == 200, url


def _infer(client, headers=None):
    inp = grpcclient.InferInput("IN", [1], "BYTES")
    inp.set_data_from_numpy(np.array([json.dumps([{"text": "hi", "max_dec_len": 2}])], dtype=np.object_))
    return client.infer("model", [inp], headers=headers)


def test_grpc_needs_the_key(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports['GRPC_PORT']}")
    try:
        assert client.is_server_live() and client.is_server_ready()       # health stays open
        for headers in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as e:
                _infer(client, headers)
            assert "UNAUTHENTICATED" in str(e.value.status()) and "API key" in e.value.message()
        for call in (lambda: client.get_model_metadata("model"), lambda: client.get_inference_statistics("model"),
                     client.get_model_repository_index):
            with pytest.raises(InferenceServerException) as e:
                call()
            assert "UNAUTHENTICATED" in str(e.value.status())
        assert client.get_inference_statistics("model", headers={"x-api-key": "second-key-456"}).model_stats
        r = _infer(client, {"authorization": "Bearer first-key-123"})
        assert json.loads(r.as_numpy("OUT")[0])[0]["is_end"] == 1
        assert client.get_model_metadata("model", headers={"x-api-key": "second-key-456"}).name == "model"
    finally:
        client.close()


def test_grpc_stream_without_key_is_refused(server):
    import queue

    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports['GRPC_PORT']}")
    client.start_stream(callback=lambda result, error: q.put(error or result))
    inp = grpcclient.InferInput("IN", [1], "BYTES")
    inp.set_data_from_numpy(np.array([json.dumps([{"text": "hi", "max_dec_len": 2}])], dtype=np.object_))
    try:
        client.async_stream_infer("model", [inp])
    except InferenceServerException:
        pass  # the server refused the stream before this request was queued: the callback has the reason
    got = q.get(timeout=30)
    client.stop_stream()
    client.close()
    assert isinstance(got, InferenceServerException) and "UNAUTHENTICATED" in str(got.status())


def test_metrics_follow_the_main_key(server):
    url = f"http://127.0.0.1:{server.ports['METRICS_PORT']}/metrics"
    assert requests.get(url, timeout=10).status_code == 401
    r = requests.get(url, headers=bearer("first-key-123"), timeout=10)
    assert r.status_code == 200 and "kiln" in r.text


def test_the_key_is_not_logged(server):
    text = (server.log_dir / "server.log").read_text(errors="replace") + server.tail(400)
    assert "KILN_API_KEY=***" in text
    assert "first-key-123" not in text and "second-key-456" not in text


def test_health_stats_need_the_key(server):
    url = server.health_url + "/stats"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers=bearer("wrong"), timeout=10).status_code == 401
    r = requests.get(url, headers=bearer("second-key-456"), timeout=10)
    assert r.status_code == 200 and r.json()["processes"]
    assert server.stats()["processes"]  # the test helper sends the key
