"""Unit tests of kiln.server.metrics: per-request recording, the engine-stats collector, multi-process
aggregation and the /metrics app (no engine, no model)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kiln.engine.request import EngineStats
from kiln.server import metrics as M

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(name: str, **labels) -> float:
    M.families()  # make sure the families exist in this process
    return REGISTRY.get_sample_value(name, labels) or 0.0


def stats(**kw) -> EngineStats:
    d = dict(timestamp=time.time(), num_running=3, num_waiting=2, max_batch_size=8, num_free_blocks=30,
             num_total_blocks=40, block_size=16, num_preemptions_total=5, num_steps_total=100, ready=True)
    d.update(kw)
    return EngineStats(**d)


def record(**kw):
    from kiln.server.frontend import RequestRecord

    d = dict(request_id="r", api="grpc", arrival_time=1000.0)
    d.update(kw)
    return RequestRecord(**d)


def drive(obs, rec, token_times, finish_reason, end_time):
    """Replay what kiln.server.frontend does for a request: first token, further tokens, finish."""
    last = None
    for t, n in token_times:
        if last is None:
            rec.first_token_time = t
            obs.on_first_token(rec, t - rec.arrival_time)
            if n > 1:
                obs.on_token(rec, n - 1, 0.0)
        else:
            obs.on_token(rec, n, t - last)
        last = t
        rec.num_output_tokens += n
    rec.end_time = end_time
    rec.finish_reason = finish_reason
    obs.on_finish(rec)


def test_observer_records_a_streamed_request():
    names = ("kiln:generation_tokens_total", "kiln:prompt_tokens_total", "kiln:time_to_first_token_seconds_count",
             "kiln:time_to_first_token_seconds_sum", "kiln:inter_token_latency_seconds_count",
             "kiln:inter_token_latency_seconds_sum", "kiln:e2e_request_latency_seconds_count",
             "kiln:e2e_request_latency_seconds_sum", "kiln:request_queue_time_seconds_count",
             "kiln:request_generation_tokens_sum", "kiln:request_prompt_tokens_sum")
    before = {k: val(k) for k in names}
    ok_before = val("kiln:request_success_total", finished_reason="length")
    obs = M.make_request_observer(None)
    rec = record(num_prompt_tokens=7)
    drive(obs, rec, [(1000.5, 1), (1000.6, 1), (1001.0, 2)], "length", 1001.1)
    d = {k: val(k) - before[k] for k in names}
    assert d["kiln:generation_tokens_total"] == 4
    assert d["kiln:prompt_tokens_total"] == 7
    assert d["kiln:time_to_first_token_seconds_count"] == 1
    assert d["kiln:time_to_first_token_seconds_sum"] == pytest.approx(0.5)
    assert d["kiln:inter_token_latency_seconds_count"] == 3          # 1 + 2 tokens after the first
    assert d["kiln:inter_token_latency_seconds_sum"] == pytest.approx(0.1 + 0.4)
    assert d["kiln:e2e_request_latency_seconds_count"] == 1
    assert d["kiln:e2e_request_latency_seconds_sum"] == pytest.approx(1.1)
    assert d["kiln:request_queue_time_seconds_count"] == 1
    assert d["kiln:request_generation_tokens_sum"] == 4
    assert d["kiln:request_prompt_tokens_sum"] == 7
    assert val("kiln:request_success_total", finished_reason="length") - ok_before == 1


def test_observer_first_packet_with_several_tokens():
    g0 = val("kiln:generation_tokens_total")
    i0 = val("kiln:inter_token_latency_seconds_count")
    drive(M.make_request_observer(None), record(num_prompt_tokens=2), [(1000.2, 3)], "stop", 1000.3)
    assert val("kiln:generation_tokens_total") - g0 == 3
    assert val("kiln:inter_token_latency_seconds_count") - i0 == 2


def test_observer_counts_errors_not_successes():
    e0 = val("kiln:request_errors_total", error_type="queue_full")
    t0 = val("kiln:request_errors_total", error_type="timeout")
    p0 = val("kiln:prompt_tokens_total")
    s0 = sum(val("kiln:request_success_total", finished_reason=k) for k in ("stop", "length", "abort"))
    obs = M.make_request_observer(None)
    rec = record(num_prompt_tokens=12, end_time=1000.1, finish_reason="error", error_type="queue_full")
    obs.on_finish(rec)                       # rejected by the engine: never produced a token
    drive(obs, record(num_prompt_tokens=3, error_type="timeout"), [(1000.2, 1)], "timeout", 1009.0)
    assert val("kiln:request_errors_total", error_type="queue_full") - e0 == 1
    assert val("kiln:request_errors_total", error_type="timeout") - t0 == 1
    assert val("kiln:prompt_tokens_total") - p0 == 3   # only the prompt that was actually processed
    assert sum(val("kiln:request_success_total", finished_reason=k) for k in ("stop", "length", "abort")) == s0


def test_observer_abort_after_some_tokens():
    a0 = val("kiln:request_success_total", finished_reason="abort")
    g0 = val("kiln:generation_tokens_total")
    drive(M.make_request_observer(None), record(num_prompt_tokens=3), [(1000.1, 1), (1000.2, 1)], "abort", 1000.3)
    assert val("kiln:request_success_total", finished_reason="abort") - a0 == 1
    assert val("kiln:generation_tokens_total") - g0 == 2


def test_frontend_installs_the_metrics_observer():
    from kiln.config import KilnConfig
    from kiln.server import frontend

    obs = frontend._default_observers(KilnConfig())
    assert any(isinstance(o, M.MetricsObserver) for o in obs)


def test_engine_collector_families():
    reg = M.build_registry(lambda: stats(), max_age_s=10)
    s = samples(generate_latest(reg).decode())
    assert s[("kiln:num_requests_running", ())] == 3
    assert s[("kiln:num_requests_waiting", ())] == 2
    assert s[("kiln:kv_cache_usage_perc", ())] == pytest.approx(0.25)
    assert s[("kiln:num_preemptions_total", ())] == 5
    assert s[("kiln:engine_ready", ())] == 1
    seed = {k[1][0][0]: v for k, v in s.items() if k[0] == "inference_server_metrics"}
    assert seed == {"batch_size": 3, "block_num": 30, "max_batch_size": 8, "max_block_num": 40,
                    "available_resource": pytest.approx(0.75)}
    # each seed series carries one label whose value is its own name, as the seed exposes it
    assert all(k[1] == ((k[1][0][0], k[1][0][0]),) for k in s if k[0] == "inference_server_metrics")
    assert not [k for k in s if k[0] == "kiln:lora_adapter_loaded"]
    s = samples(generate_latest(M.build_registry(lambda: stats(lora_adapters={"sql": "/a", "chat": "/b"}),
                                                 max_age_s=10)).decode())
    assert {k[1]: v for k, v in s.items() if k[0] == "kiln:lora_adapter_loaded"} == {
        (("adapter", "chat"),): 1, (("adapter", "sql"),): 1}


def test_engine_collector_stale_or_missing_stats():
    s = samples(generate_latest(M.build_registry(lambda: stats(timestamp=time.time() - 60), 10)).decode())
    assert s[("kiln:engine_ready", ())] == 0
    s = samples(generate_latest(M.build_registry(lambda: None)).decode())
    assert s == {("kiln:engine_ready", ()): 0}


def test_setup_multiprocess_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(M.ENV_MULTIPROC_DIR, raising=False)
    d = M.setup_multiprocess_dir()
    try:
        assert os.environ[M.ENV_MULTIPROC_DIR] == d and os.path.isdir(d)
    finally:
        M.cleanup_multiprocess_dir(d)
    assert not os.path.exists(d)
    (tmp_path / "counter_123.db").write_bytes(b"old")
    (tmp_path / "keep.txt").write_text("x")
    assert M.setup_multiprocess_dir(str(tmp_path)) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]   # stale numbers of an earlier run are gone


def test_multiprocess_aggregation(tmp_path, monkeypatch):
    """Two front-end processes record; one registry (the metrics process's) sums them."""
    code = textwrap.dedent("""
        import sys
        from kiln.server.frontend import RequestRecord
        from kiln.server.metrics import make_request_observer
        obs = make_request_observer(None)
        n = int(sys.argv[1])
        for i in range(n):
            r = RequestRecord("r%d" % i, "grpc", 1000.0, num_prompt_tokens=10)
            obs.on_first_token(r, 0.1)
            obs.on_token(r, 2, 0.2)
            r.num_output_tokens, r.end_time, r.finish_reason = 3, 1000.5, "stop" if i % 2 == 0 else "length"
            obs.on_finish(r)
        obs.on_finish(RequestRecord("bad", "grpc", 1000.0, end_time=1000.0, finish_reason="error",
                                    error_type="invalid"))
    """)
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), PYTHONPATH=ROOT)
    for n in (2, 3):
        subprocess.run([sys.executable, "-c", code, str(n)], env=env, check=True, timeout=60)
    monkeypatch.setenv(M.ENV_MULTIPROC_DIR, str(tmp_path))
    s = samples(generate_latest(M.build_registry(lambda: stats())).decode())
    assert s[("kiln:generation_tokens_total", ())] == 15
    assert s[("kiln:prompt_tokens_total", ())] == 50
    assert s[("kiln:request_success_total", (("finished_reason", "stop"),))] == 3
    assert s[("kiln:request_success_total", (("finished_reason", "length"),))] == 2
    assert s[("kiln:request_errors_total", (("error_type", "invalid"),))] == 2
    assert s[("kiln:time_to_first_token_seconds_count", ())] == 5
    assert s[("kiln:inter_token_latency_seconds_count", ())] == 10
    assert s[("kiln:num_requests_running", ())] == 3          # engine side next to the front ends' numbers


def test_multiprocess_values_read_the_pid_once_and_again_after_a_fork(tmp_path, monkeypatch):
    """Per-token updates make no getpid system call; a forked child still writes its own file."""
    code = textwrap.dedent("""
        import os
        from prometheus_client import values
        from kiln.server.frontend import RequestRecord
        from kiln.server.metrics import make_request_observer
        obs = make_request_observer(None)
        assert values.ValueClass._kiln_pid
        calls, real = [0], os.getpid
        def counted():
            calls[0] += 1
            return real()
        os.getpid = counted
        obs.on_token(RequestRecord("a", "grpc", 1000.0), 3, 0.3)
        assert calls[0] == 0, calls
        os.getpid = real
        child = os.fork()
        if child == 0:
            obs.on_token(RequestRecord("b", "grpc", 1000.0), 2, 0.2)
            os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        print(os.getpid(), child)
    """)
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60, capture_output=True, text=True)
    parent, child = out.stdout.split()
    assert {f"counter_{parent}.db", f"counter_{child}.db"} <= set(os.listdir(tmp_path))
    monkeypatch.setenv(M.ENV_MULTIPROC_DIR, str(tmp_path))
    s = samples(generate_latest(M.build_registry(lambda: stats())).decode())
    assert s[("kiln:generation_tokens_total", ())] == 5
    assert s[("kiln:inter_token_latency_seconds_count", ())] == 5


def test_metrics_app_serves_prometheus_text():
    from starlette.testclient import TestClient

    class FakeClient:
        stats = stats(num_running=1)

    with TestClient(M.make_app(FakeClient())) as c:
        r = c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        s = samples(r.text)
        assert s[("kiln:num_requests_running", ())] == 1
        assert ("inference_server_metrics", (("batch_size", "batch_size"),)) in s


def test_engine_address_from_config():
    class Cfg:
        engine_address = "tcp://127.0.0.1:1234"

    class Old:
        infer_queue_port = 4321

    assert M._engine_address(Cfg()) == "tcp://127.0.0.1:1234"
    assert M._engine_address(Old()) == "tcp://127.0.0.1:4321"
