"""Prometheus metrics of a real `kiln serve` (gRPC + 2 HTTP workers + the metrics process): every family is
exposed, parsed with prometheus-client's parser before and after traffic, counters rise by exactly the tokens
generated (summed over the front-end processes), engine gauges move while a request runs, errors and
aborts are counted."""
from __future__ import annotations

import json
import queue
import threading
import time
from functools import partial

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "Name three colours."

FAMILIES = {
    "kiln:num_requests_running": "gauge", "kiln:num_requests_waiting": "gauge",
    "kiln:kv_cache_usage_perc": "gauge", "kiln:num_preemptions": "counter", "kiln:engine_ready": "gauge",
    "kiln:time_to_first_token_seconds": "histogram", "kiln:inter_token_latency_seconds": "histogram",
    "kiln:e2e_request_latency_seconds": "histogram", "kiln:request_queue_time_seconds": "histogram",
    "kiln:request_prompt_tokens": "histogram", "kiln:request_generation_tokens": "histogram",
    "kiln:prompt_tokens": "counter", "kiln:generation_tokens": "counter",
    "inference_server_metrics": "gauge",
}


@pytest.fixture(scope="module")
def server(kiln_server_factory):
    return kiln_server_factory(PUSH_MODE_HTTP_WORKERS="2", BATCH_SIZE="8", MAX_SEQ_LEN="512", MAX_DEC_LEN="64")


@pytest.fixture(scope="module")
def grpc_url(server):
    return f"127.0.0.1:{server.ports['GRPC_PORT']}"


def scrape(server) -> dict[tuple[str, tuple], float]:
    r = requests.get(f"http://127.0.0.1:{server.ports['METRICS_PORT']}/metrics", timeout=10)
    assert r.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def v(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_metrics(server, pred, timeout: float = 20.0, what: str = "metrics"):
    """Scrape until pred(metrics) holds (the last hooks of a request run just after its final packet)."""
    deadline = time.monotonic() + timeout
    m = {}
    while time.monotonic() < deadline:
        m = scrape(server)
        if pred(m):
            return m
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last scrape: "
                         f"{ {k: x for k, x in m.items() if not k[0].endswith('_bucket')} }")


def grpc_request(url: str, req: dict) -> list[dict]:
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
    inp = grpcclient.InferInput("IN", [1], "BYTES")
    inp.set_data_from_numpy(np.array([json.dumps([req])], dtype=np.object_))
    c.async_stream_infer("model", [inp], request_id=req["req_id"])
    msgs = []
    try:
        while True:
            r = q.get(timeout=120)
            assert not isinstance(r, Exception), r
            msg = json.loads(r.as_numpy("OUT")[0])
            msg = msg[0] if isinstance(msg, list) else msg
            msgs.append(msg)
            if msg.get("is_end") == 1 or msg.get("error_msg"):
                return msgs
    finally:
        c.stop_stream()
        c.close()


def test_http_worker_warm_up_leaves_no_trace_in_metrics_or_the_request_log(server):
    """Each HTTP worker sends in-process requests through its app before it takes connections (the first real
    request would pay for FastAPI's route build and anyio's imports): they reach no engine and count nowhere."""
    assert server.tail(400).count("HTTP worker warmed up in") == 2, server.tail(400)
    m = scrape(server)
    assert not [k for k, x in m.items() if x and k[0] in ("kiln:request_errors_total", "kiln:request_success_total",
                                                          "kiln:prompt_tokens_total")], m
    assert server.requests_log() == ""


def test_the_engine_start_up_line_begins_with_its_process_start(server):
    """Start to ready, phase by phase, from the engine process's own start (its imports included)."""
    line = next(ln for ln in server.tail(400).splitlines() if "start-up: " in ln)
    first = line.split("start-up: ", 1)[1].split(", ")[0]
    assert first.startswith("process start and imports ") and 0 < float(first.split()[-2]) < 120, line


def test_every_family_is_exposed(server):
    # the metrics process subscribes to the engine's stats on its own, and may do so a heartbeat or two after the
    # HTTP API is ready (a CI run on a loaded machine scraped before: no engine families yet, engine_ready 0)
    wait_metrics(server, lambda m: v(m, "kiln:engine_ready") == 1, what="the metrics process's first engine stats")
    r = requests.get(f"http://127.0.0.1:{server.ports['METRICS_PORT']}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    types = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, (name, types.get(name))
    m = scrape(server)
    assert v(m, "kiln:engine_ready") == 1
    assert v(m, "inference_server_metrics", max_batch_size="max_batch_size") == 8
    total = v(m, "inference_server_metrics", max_block_num="max_block_num")
    free = v(m, "inference_server_metrics", block_num="block_num")
    assert total > 0 and 0 <= free <= total
    assert v(m, "inference_server_metrics", available_resource="available_resource") == pytest.approx(free / total)


def _traffic_deltas(before, after):
    names = ["kiln:generation_tokens_total", "kiln:prompt_tokens_total", "kiln:time_to_first_token_seconds_count",
             "kiln:e2e_request_latency_seconds_count", "kiln:inter_token_latency_seconds_count",
             "kiln:request_queue_time_seconds_count", "kiln:request_generation_tokens_sum",
             "kiln:request_prompt_tokens_sum"]
    return {n: v(after, n) - v(before, n) for n in names}


def _check(server, before, n_requests, gen_tokens, prompt_tokens, reasons):
    def done(m):
        ok = sum(v(m, "kiln:request_success_total", finished_reason=r) - v(before, "kiln:request_success_total",
                                                                          finished_reason=r)
                 for r in ("stop", "length", "abort"))
        return ok >= n_requests
    after = wait_metrics(server, done, what=f"{n_requests} finished requests")
    d = _traffic_deltas(before, after)
    assert d["kiln:generation_tokens_total"] == gen_tokens
    assert d["kiln:request_generation_tokens_sum"] == gen_tokens
    assert d["kiln:prompt_tokens_total"] == prompt_tokens
    assert d["kiln:request_prompt_tokens_sum"] == prompt_tokens
    assert d["kiln:time_to_first_token_seconds_count"] == n_requests
    assert d["kiln:e2e_request_latency_seconds_count"] == n_requests
    assert d["kiln:request_queue_time_seconds_count"] == n_requests
    assert d["kiln:inter_token_latency_seconds_count"] == gen_tokens - n_requests
    for r, n in reasons.items():
        assert v(after, "kiln:request_success_total", finished_reason=r) - \
            v(before, "kiln:request_success_total", finished_reason=r) == n
    assert v(after, "kiln:time_to_first_token_seconds_sum") > v(before, "kiln:time_to_first_token_seconds_sum")
    return after


def test_counters_rise_by_the_tokens_generated_over_grpc(server, grpc_url):
    before = scrape(server)
    gen = prompt = 0
    reasons: dict[str, int] = {}
    for i in range(3):
        msgs = grpc_request(grpc_url, {"req_id": f"m-grpc-{i}", "text": PROMPT, "max_dec_len": 4 + i,
                                       "return_usage": True})
        last = msgs[-1]
        assert last["is_end"] == 1 and last["tokens_all_num"] == len(msgs)
        gen += last["tokens_all_num"]
        prompt += last["usage"]["prompt_tokens"]
        reasons[last["finish_reason"]] = reasons.get(last["finish_reason"], 0) + 1
    _check(server, before, 3, gen, prompt, reasons)


def test_counters_sum_over_the_http_workers(server, grpc_url):
    """Requests spread over two HTTP worker processes and the gRPC process: one sum."""
    before = scrape(server)
    results = []

    def post(i):
        r = requests.post(server.url + "/v1/chat/completions", timeout=120,
                          json={"text": PROMPT, "req_id": f"m-http-{i}", "max_dec_len": 5, "return_usage": True})
        assert r.status_code == 200, r.text
        results.append(r.json())

    threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    msgs = grpc_request(grpc_url, {"req_id": "m-mixed", "text": PROMPT, "max_dec_len": 5, "return_usage": True})
    for t in threads:
        t.join(180)
    assert len(results) == 4
    gen = sum(r["usage"]["completion_tokens"] for r in results) + msgs[-1]["tokens_all_num"]
    prompt = sum(r["usage"]["prompt_tokens"] for r in results) + msgs[-1]["usage"]["prompt_tokens"]
    reasons: dict[str, int] = {}
    for fr in [r["finish_reason"] for r in results] + [msgs[-1]["finish_reason"]]:
        reasons[fr] = reasons.get(fr, 0) + 1
    _check(server, before, 5, gen, prompt, reasons)


def test_errors_are_counted_by_type(server, grpc_url):
    before = scrape(server)
    msgs = grpc_request(grpc_url, {"req_id": "m-bad-1", "text": "hi", "temperature": -1})
    assert msgs[-1]["error_msg"]
    r = requests.post(server.url + "/v1/chat/completions", json={"req_id": "m-bad-2", "text": "hi", "topp": 3},
                      timeout=30)
    assert r.status_code >= 400
    after = wait_metrics(server, lambda m: v(m, "kiln:request_errors_total", error_type="invalid")
                         - v(before, "kiln:request_errors_total", error_type="invalid") >= 2, what="2 errors")
    assert v(after, "kiln:request_errors_total", error_type="invalid") - \
        v(before, "kiln:request_errors_total", error_type="invalid") == 2
    assert v(after, "kiln:generation_tokens_total") == v(before, "kiln:generation_tokens_total")


def test_an_empty_or_unparsable_body_counts_as_bad_body(server):
    before = scrape(server)
    for path, data in (("/v1/completions", b""), ("/v1/chat/completions/chat/completions", b"{not json")):
        r = requests.post(server.url + path, data=data, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, (path, r.text)
    after = wait_metrics(server, lambda m: v(m, "kiln:request_errors_total", error_type="bad_body")
                         - v(before, "kiln:request_errors_total", error_type="bad_body") >= 2, what="2 bad bodies")
    assert v(after, "kiln:request_errors_total", error_type="bad_body") - \
        v(before, "kiln:request_errors_total", error_type="bad_body") == 2


def test_engine_gauges_move_while_a_request_runs_and_aborts_count(server, grpc_url):
    before = scrape(server)
    total = v(before, "inference_server_metrics", max_block_num="max_block_num")
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(grpc_url)
    c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
    inp = grpcclient.InferInput("IN", [1], "BYTES")
    inp.set_data_from_numpy(np.array([json.dumps([{"req_id": "m-long", "text": PROMPT, "max_dec_len": 64,
                                                   "min_dec_len": 64}])], dtype=np.object_))
    c.async_stream_infer("model", [inp], request_id="m-long")
    try:
        q.get(timeout=120)      # it is running
        during = wait_metrics(server, lambda m: v(m, "kiln:num_requests_running") >= 1, what="a running request")
        assert v(during, "inference_server_metrics", batch_size="batch_size") >= 1
        assert v(during, "inference_server_metrics", block_num="block_num") < total
        assert v(during, "inference_server_metrics", available_resource="available_resource") < 1
        assert v(during, "kiln:kv_cache_usage_perc") > 0
        assert v(during, "kiln:generation_tokens_total") > v(before, "kiln:generation_tokens_total")
    finally:
        c.stop_stream(cancel_requests=True)
        c.close()
    after = wait_metrics(server, lambda m: v(m, "kiln:num_requests_running") == 0 and
                         v(m, "kiln:request_success_total", finished_reason="abort")
                         > v(before, "kiln:request_success_total", finished_reason="abort"),
                         what="the aborted request")
    assert v(after, "inference_server_metrics", batch_size="batch_size") == 0
    assert v(after, "kiln:request_success_total", finished_reason="abort") - \
        v(before, "kiln:request_success_total", finished_reason="abort") == 1
