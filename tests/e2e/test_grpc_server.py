"""The KServe v2 gRPC API of a real `kiln serve` (default model, HTTP API off), driven by the real
tritonclient.grpc: the seed's streaming client pattern, unary infer, health and metadata, invalid requests,
duplicate req_id, several requests on one stream, cancellation (the engine frees the request at once). The
KServe v2 HTTP routes (kiln.server.kserve_http) are checked here too, on the session's shared server with the HTTP
API on."""
from __future__ import annotations

import json
import queue
import time
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.helpers.grpc_clients import run_dying_client

PROMPT = "Write one sentence about the sea."


@pytest.fixture(scope="module")
def server(kiln_server_factory):
    # gRPC must work with the HTTP API off (the seed's gRPC did not)
    return kiln_server_factory(PUSH_MODE_HTTP_PORT="-1", BATCH_SIZE="8", MAX_SEQ_LEN="512", MAX_DEC_LEN="64")


@pytest.fixture(scope="module")
def url(server):
    return f"127.0.0.1:{server.ports['GRPC_PORT']}"


@pytest.fixture()
def client(url):
    c = grpcclient.InferenceServerClient(url)
    yield c
    c.close()


def make_inputs(req) -> list:
    inp = grpcclient.InferInput("IN", [1], "BYTES")
    inp.set_data_from_numpy(np.array([json.dumps([req])], dtype=np.object_))
    return [inp]


def out_msg(result) -> dict:
    msg = json.loads(result.as_numpy("OUT")[0])
    return msg[0] if isinstance(msg, list) else msg


def final_flag(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def seed_stream(url: str, req: dict, timeout: float = 120) -> list[tuple[dict, bool]]:
    """The seed's client pattern (seed-system-spec.md section 2), as written; returns (packet, final flag)s."""
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
    client.async_stream_infer(model_name="model", inputs=make_inputs(req), request_id=req["req_id"],
                              outputs=[grpcclient.InferRequestedOutput("OUT")])
    got = []
    try:
        while True:
            r = q.get(timeout=timeout)    # result or InferenceServerException
            if isinstance(r, InferenceServerException):
                raise r
            msg = out_msg(r)
            got.append((msg, final_flag(r)))
            if msg.get("is_end") == 1 or msg.get("error_msg"):
                break
    finally:
        client.stop_stream()
        client.close()
    return got


# -- health and metadata ----------------------------------------------------------------------------------
def test_http_api_is_off(server):
    assert server.ports["PUSH_MODE_HTTP_PORT"] == -1


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("model")
    assert client.is_model_ready("model", "1")
    assert not client.is_model_ready("no-such-model")
    sm = client.get_server_metadata(as_json=True)
    assert sm["name"] == "kiln" and sm["version"]
    mm = client.get_model_metadata("model", as_json=True)
    assert mm["name"] == "model" and mm["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in mm["inputs"]] == [("IN", "BYTES", ["1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in mm["outputs"]] == [("OUT", "BYTES", ["1"])]
    cfg = client.get_model_config("model", as_json=True)["config"]
    assert cfg["name"] == "model"
    assert cfg["model_transaction_policy"]["decoupled"] is True
    assert cfg["input"] == [{"name": "IN", "data_type": "TYPE_STRING", "dims": ["1"]}]
    assert cfg["output"] == [{"name": "OUT", "data_type": "TYPE_STRING", "dims": ["1"]}]
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("no-such-model")


def wait_for_stats(read, done, timeout: float = 30.0) -> dict:
    """The statistics once done(stats) holds: the front end sees the engine's counts with its next stats
    message (every step, and every heartbeat when idle)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = read()
        if done(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def test_repository_index_and_statistics(client):
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": "model", "version": "1", "state": "READY"}]
    assert client.get_model_repository_index(as_json=True) == {"models": index}

    def stats() -> dict:
        return client.get_inference_statistics("model", as_json=True)["model_stats"][0]
    s0 = stats()
    before_ms = time.time() * 1000
    client.infer("model", make_inputs({"req_id": "stats-1", "text": PROMPT, "max_dec_len": 4}))
    s1 = wait_for_stats(stats, lambda s: int(s.get("inference_count", 0)) > int(s0.get("inference_count", 0)))
    ok0, ok1 = (int(s["inference_stats"].get("success", {}).get("count", 0)) for s in (s0, s1))
    assert int(s1["inference_count"]) == int(s0.get("inference_count", 0)) + 1 and ok1 == ok0 + 1
    assert int(s1["execution_count"]) > int(s0.get("execution_count", 0))
    assert int(s1["last_inference"]) >= before_ms - 1
    inf = s1["inference_stats"]
    assert 0 < int(inf["queue"]["ns"]) < int(inf["success"]["ns"])
    assert client.get_inference_statistics(as_json=True)["model_stats"][0]["name"] == "model"  # all models
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_inference_statistics("no-such-model")


# -- inference ---------------------------------------------------------------------------------------------
def test_seed_streaming_pattern(url):
    req = {"req_id": "stream-1", "text": PROMPT, "max_dec_len": 8, "temperature": 0, "return_usage": True}
    got = seed_stream(url, req)
    msgs = [m for m, _ in got]
    assert [f for _, f in got] == [False] * (len(got) - 1) + [True]   # only the last is flagged final
    assert all(m["req_id"] == "stream-1" and m["error_code"] == 0 and m["error_msg"] == "" for m in msgs)
    assert [m["send_idx"] for m in msgs] == list(range(len(msgs)))
    assert [m["is_end"] for m in msgs] == [0] * (len(msgs) - 1) + [1]
    assert all(len(m["token_ids"]) == 1 for m in msgs)              # one packet per token
    last = msgs[-1]
    assert last["tokens_all_num"] == len(msgs) <= 8
    assert last["tokens_all_ids"] == [m["token_ids"][0] for m in msgs]
    assert last["tokens_all"] == "".join(m["token"] for m in msgs)
    assert last["finish_reason"] in ("stop", "length")
    assert last["usage"]["completion_tokens"] == len(msgs) and last["usage"]["prompt_tokens"] > 0


def test_return_all_tokens_sends_only_the_final_packet(url):
    got = seed_stream(url, {"req_id": "all-1", "text": PROMPT, "max_dec_len": 6, "temperature": 0,
                            "return_all_tokens": True})
    assert len(got) == 1
    msg, final = got[0]
    assert final and msg["is_end"] == 1 and msg["tokens_all_num"] >= 1 and msg["tokens_all"]


def test_unary_infer_returns_the_whole_answer(url, client):
    req = {"req_id": "unary-1", "text": PROMPT, "max_dec_len": 8, "temperature": 0}
    res = client.infer("model", make_inputs(req), request_id="unary-1",
                       outputs=[grpcclient.InferRequestedOutput("OUT")])
    msg = out_msg(res)
    assert res.get_response().id == "unary-1"
    assert msg["req_id"] == "unary-1" and msg["is_end"] == 1 and msg["error_code"] == 0
    # greedy: the same text as the streamed answer
    streamed = seed_stream(url, dict(req, req_id="unary-1-stream"))[-1][0]
    assert msg["tokens_all"] == streamed["tokens_all"]
    assert msg["tokens_all_ids"] == streamed["tokens_all_ids"]


def test_grpc_accepts_input_ids_and_openai_style_names(client, tokenizer):
    ids = tokenizer.encode("The capital of France is", add_special_tokens=False)
    msg = out_msg(client.infer("model", make_inputs(
        {"req_id": "ids-1", "input_ids": ids, "max_tokens": 4, "top_p": 0.5, "seed": 7, "return_usage": True})))
    assert msg["is_end"] == 1 and msg["usage"]["prompt_tokens"] == len(ids)
    assert 1 <= msg["tokens_all_num"] <= 4 and msg["infer_seed"] == 7


def test_several_requests_on_one_stream(url):
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
    ids = [f"multi-{i}" for i in range(3)]
    for i, rid in enumerate(ids):
        c.async_stream_infer("model", make_inputs({"req_id": rid, "text": f"Count to {i + 3}.", "max_dec_len": 6,
                                                   "temperature": 0}), request_id=rid)
    packets: dict[str, list] = {rid: [] for rid in ids}
    ended = set()
    try:
        while len(ended) < len(ids):
            r = q.get(timeout=120)
            assert not isinstance(r, Exception), r
            msg = out_msg(r)
            assert r.get_response().id == msg["req_id"]
            packets[msg["req_id"]].append(msg)
            if msg["is_end"] == 1:
                ended.add(msg["req_id"])
    finally:
        c.stop_stream()
        c.close()
    for rid in ids:
        assert [m["send_idx"] for m in packets[rid]] == list(range(len(packets[rid])))
        assert packets[rid][-1]["tokens_all_num"] == len(packets[rid])


# -- errors --------------------------------------------------------------------------------------------------
INVALID = [
    ({"req_id": "bad-1"}, "should contain either `text`, `input_ids` or `messages`"),
    ({"req_id": "bad-2", "text": "hi", "temperature": -1}, "temperature"),
    ({"req_id": "bad-3", "text": "hi", "topp": 1.5}, "The `topp` must be in [0, 1]"),
    ({"req_id": "bad-4", "text": "hi", "max_dec_len": 1000}, "exceeds the limit MAX_DEC_LEN(64)"),
    ({"req_id": "bad-5", "text": "hi", "topp": 0.5, "top_p": 0.5}, "topp"),
    ({"req_id": "bad-6", "text": "hi", "min_dec_len": 0}, "min_dec_len"),
]


@pytest.mark.parametrize("req,needle", INVALID, ids=[r["req_id"] for r, _ in INVALID])
def test_invalid_requests_get_a_final_error_packet(url, req, needle):
    got = seed_stream(url, req, timeout=30)
    assert len(got) == 1
    msg, final = got[0]
    assert final
    assert needle in msg["error_msg"] and msg["error_code"] != 0 and msg["req_id"] == req["req_id"]


def test_invalid_unary_requests_get_grpc_errors(client):
    with pytest.raises(InferenceServerException, match="temperature") as ei:
        client.infer("model", make_inputs({"text": "hi", "temperature": -1}))
    assert ei.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="unknown model") as ei:
        client.infer("no-such-model", make_inputs({"text": "hi"}))
    assert ei.value.status() == "StatusCode.NOT_FOUND"
    bad = grpcclient.InferInput("IN", [1], "BYTES")
    bad.set_data_from_numpy(np.array(["not json"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="not valid JSON"):
        client.infer("model", [bad])


def test_malformed_stream_input_and_the_server_stays_up(url):
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
    try:
        bad = grpcclient.InferInput("IN", [1], "BYTES")
        bad.set_data_from_numpy(np.array(["[{not json"], dtype=np.object_))
        c.async_stream_infer("model", [bad], request_id="junk")
        r = q.get(timeout=30)
        msg = out_msg(r)
        assert "not valid JSON" in msg["error_msg"] and final_flag(r)
        c.async_stream_infer("no-such-model", make_inputs({"text": "hi"}), request_id="nomodel")
        err = q.get(timeout=30)
        assert isinstance(err, InferenceServerException) and "unknown model" in str(err)
        # the same stream still serves a good request
        c.async_stream_infer("model", make_inputs({"req_id": "after-junk", "text": "hi", "max_dec_len": 2}),
                             request_id="after-junk")
        while True:
            msg = out_msg(q.get(timeout=60))
            if msg["is_end"] == 1:
                break
        assert msg["req_id"] == "after-junk" and msg["error_code"] == 0
    finally:
        c.stop_stream()
        c.close()


def test_duplicate_req_id_in_flight_is_rejected(url, server):
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
    long = {"req_id": "dup-1", "text": PROMPT, "max_dec_len": 64, "min_dec_len": 64}
    try:
        c.async_stream_infer("model", make_inputs(long), request_id="first")
        assert out_msg(q.get(timeout=60))["send_idx"] == 0           # the first one is running
        c.async_stream_infer("model", make_inputs(dict(long, max_dec_len=2, min_dec_len=1)), request_id="second")
        while True:
            r = q.get(timeout=60)
            if r.get_response().id == "second":
                break
        msg = out_msg(r)
        assert "already exists" in msg["error_msg"] and final_flag(r)
    finally:
        c.stop_stream(cancel_requests=True)
        c.close()
    server.wait_idle(30)


# -- cancellation ----------------------------------------------------------------------------------------------
def requests_log_line(server, req_id: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.requests_log().splitlines():
            if f"req_id={req_id} " in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"no request log line for {req_id}")


def test_cancelling_the_stream_aborts_the_request(url, server):
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
    c.async_stream_infer("model", make_inputs({"req_id": "cancel-1", "text": PROMPT, "max_dec_len": 64,
                                               "min_dec_len": 64}), request_id="cancel-1")
    assert out_msg(q.get(timeout=60))["send_idx"] == 0
    t0 = time.monotonic()
    c.stop_stream(cancel_requests=True)
    c.close()
    st = server.wait_idle(15)                       # nothing running, every KV block back
    assert st["num_running"] == 0
    line = requests_log_line(server, "cancel-1")
    assert "finish_reason=abort" in line
    assert time.monotonic() - t0 < 15


def test_client_that_dies_mid_stream_aborts_the_request(url, server):
    req = {"req_id": "dies-1", "text": PROMPT, "max_dec_len": 64, "min_dec_len": 64}
    assert '"send_idx": 0' in run_dying_client(url, req, first_response_timeout=120)
    server.wait_idle(15)
    assert "finish_reason=abort" in requests_log_line(server, "dies-1")


def test_unary_deadline_aborts_the_request(client, server):
    # 64 tokens take ~1 s on the 2-core CPU at its 70 tok/s, so a 1 s deadline raced the answer; 0.25 s cannot
    with pytest.raises(InferenceServerException) as ei:
        client.infer("model", make_inputs({"req_id": "deadline-1", "text": PROMPT, "max_dec_len": 64,
                                           "min_dec_len": 64}), client_timeout=0.25)
    assert "Deadline" in str(ei.value) or "DEADLINE" in str(ei.value.status())
    server.wait_idle(15)
    assert "finish_reason=abort" in requests_log_line(server, "deadline-1")


def test_request_timeout_field(url, server):
    got = seed_stream(url, {"req_id": "timeout-1", "text": PROMPT, "max_dec_len": 64, "min_dec_len": 64,
                            "timeout": 0.5})
    msg, final = got[-1]
    assert final and "Timeout" in msg["error_msg"] and msg["error_code"] == 501
    server.wait_idle(15)


def test_serves_normally_after_all_that(url, client):
    assert client.is_server_ready()
    got = seed_stream(url, {"req_id": "after-1", "text": PROMPT, "max_dec_len": 4})
    assert got[-1][0]["is_end"] == 1 and got[-1][0]["error_code"] == 0


# -- KServe v2 over HTTP (kiln.server.kserve_http), on the session's shared server (HTTP API on) -------------
@pytest.fixture(scope="module")
def kserve_http(default_server):
    # A real server: a front end built here could not reach an engine, which admits only the processes of its
    # own start (they get its per-start secret from the supervisor).
    import httpx

    with httpx.Client(base_url=default_server.url, timeout=120) as c:
        yield c


def test_kserve_http_metadata(kserve_http):
    r = kserve_http.get("/v2")
    assert r.status_code == 200 and r.json()["name"] == "kiln" and "generate" in r.json()["extensions"]
    r = kserve_http.get("/v2/models/model")
    assert r.status_code == 200 and r.json()["inputs"] == [{"name": "IN", "datatype": "BYTES", "shape": [1]}]
    assert kserve_http.get("/v2/models/model/versions/1").status_code == 200
    assert kserve_http.get("/v2/models/model/ready").status_code == 200
    assert kserve_http.get("/v2/models/nope/ready").status_code == 404
    assert kserve_http.get("/v2/models/model/config").json()["model_transaction_policy"] == {"decoupled": True}


def test_kserve_http_statistics_and_repository_index(kserve_http):
    assert "statistics" in kserve_http.get("/v2").json()["extensions"]
    s0 = kserve_http.get("/v2/models/model/stats").json()["model_stats"][0]
    r = kserve_http.post("/v2/models/model/generate", json={"text": PROMPT, "max_dec_len": 3})
    assert r.status_code == 200, r.text
    s1 = wait_for_stats(lambda: kserve_http.get("/v2/models/stats").json()["model_stats"][0],
                        lambda s: s["inference_count"] > s0["inference_count"])
    assert s1["inference_count"] >= s0["inference_count"] + 1 and s1["execution_count"] > s0["execution_count"]
    assert s1["inference_stats"]["success"]["ns"] > s0["inference_stats"]["success"]["ns"]
    assert kserve_http.get("/v2/models/model/versions/1/stats").status_code == 200
    assert kserve_http.get("/v2/models/nope/stats").status_code == 404
    assert kserve_http.get("/v2/models/model/versions/7/stats").status_code == 404
    index = [{"name": "model", "version": "1", "state": "READY", "reason": ""}]
    assert kserve_http.post("/v2/repository/index").json() == index
    assert kserve_http.post("/v2/repository/index", json={"ready": True}).json() == index
    bad = kserve_http.post("/v2/repository/index", content=b"[1]")
    assert bad.status_code == 400 and "ready" in bad.json()["error"]


def test_kserve_http_generate(kserve_http):
    req = {"req_id": "gen-1", "text": PROMPT, "max_dec_len": 6, "temperature": 0}
    r = kserve_http.post("/v2/models/model/generate", json={"IN": json.dumps([req])})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "model" and body["model_version"] == "1"
    packet = json.loads(body["OUT"])[0]
    assert packet["is_end"] == 1 and packet["tokens_all"] == body["text_output"]
    # the same answer from the short forms
    r2 = kserve_http.post("/v2/models/model/generate", json=dict(req, req_id="gen-2"))
    assert r2.json()["text_output"] == body["text_output"]
    r3 = kserve_http.post("/v2/models/model/generate",
                          json={"text_input": PROMPT, "parameters": {"max_tokens": 6, "temperature": 0}})
    assert r3.json()["text_output"] == body["text_output"]
    # errors: a status and the seed's fields
    r = kserve_http.post("/v2/models/model/generate", json={"text": "hi", "temperature": -2})
    assert r.status_code == 400 and "temperature" in r.json()["error"] and r.json()["error_code"] != 0
    r = kserve_http.post("/v2/models/model/generate", content=b"{oops")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    assert kserve_http.post("/v2/models/nope/generate", json={"text": "hi"}).status_code == 404


def test_kserve_http_generate_stream(kserve_http):
    req = {"req_id": "gens-1", "text": PROMPT, "max_dec_len": 5, "temperature": 0}
    events = []
    with kserve_http.stream("POST", "/v2/models/model/generate_stream", json=req) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    packets = [json.loads(e["OUT"])[0] for e in events]
    assert [p["send_idx"] for p in packets] == list(range(len(packets)))
    assert packets[-1]["is_end"] == 1
    assert "".join(e["text_output"] for e in events) == packets[-1]["tokens_all"]
    r = kserve_http.post("/v2/models/model/generate_stream", json={"text": "hi", "max_dec_len": 999})
    assert r.status_code == 400 and "MAX_DEC_LEN" in r.json()["error"]
