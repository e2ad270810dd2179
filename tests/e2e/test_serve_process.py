"""`kiln serve` as a process: --help, start-up errors (one clear line, exit != 0), several HTTP workers,
DISABLE_STREAMING, SIGTERM with a request in flight (it finishes, then everything exits, no orphans)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time

import pytest
import requests

from kiln_e2e import KilnServer, clean_env, free_ports, kiln_cmd, pid_alive

GUIDE_ENV = ["MP_NUM", "HTTP_PORT", "GRPC_PORT", "METRICS_PORT", "INFER_QUEUE_PORT", "PUSH_MODE_HTTP_PORT",
             "DISABLE_STREAMING", "MAX_SEQ_LEN", "MAX_DEC_LEN", "BATCH_SIZE", "BLOCK_BS", "BLOCK_RATIO",
             "MAX_CACHED_TASK_NUM", "PUSH_MODE_HTTP_WORKERS", "USE_WARMUP", "USE_HF_TOKENIZER", "USE_CACHE_KV_INT8",
             "MODEL_DIR", "FD_MODEL_CONFIG_PATH", "DISTRIBUTED_CONFIG", "FD_LOG_DIR", "CHECK_HEALTH_INTERVAL",
             "DTYPE", "BLOCK_SIZE", "GPU_MEMORY_UTILIZATION", "CUDA_VISIBLE_DEVICES"]


def run_kiln(args, env, cwd, timeout=120):
    return subprocess.run(kiln_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_setting(tmp_path):
    r = run_kiln(["serve", "--help"], clean_env(), tmp_path)
    assert r.returncode == 0
    for name in GUIDE_ENV:
        assert name in r.stdout, name
    assert "--push-mode-http-port" in r.stdout and "--max-dec-len" in r.stdout


def _ports_env(tmp_path, **kw):
    p = free_ports(5)
    env = {"PUSH_MODE_HTTP_PORT": p[0], "HTTP_PORT": p[1], "GRPC_PORT": p[2], "METRICS_PORT": p[3],
           "INFER_QUEUE_PORT": p[4], "FD_LOG_DIR": str(tmp_path / "log")}
    env.update(kw)
    return clean_env(**{k: str(v) for k, v in env.items()})


@pytest.mark.parametrize("env,args,needle", [
    ({"BATCH_SIZE": "abc"}, [], "BATCH_SIZE='abc': expected an integer"),
    ({"BATCH_SIZE": "0"}, [], "BATCH_SIZE=0: must be >= 1"),
    ({"MAX_SEQ_LEN": "-5"}, [], "MAX_SEQ_LEN=-5"),
    ({"DISABLE_STREAMING": "maybe"}, [], "DISABLE_STREAMING='maybe': expected a boolean"),
    ({"GPU_MEMORY_UTILIZATION": "1.5"}, [], "GPU_MEMORY_UTILIZATION=1.5"),
    ({"DTYPE": "int4"}, [], "DTYPE='int4': must be one of"),
    ({"PUSH_MODE_HTTP_PORT": "70000"}, [], "PUSH_MODE_HTTP_PORT=70000: must be a TCP port"),
    ({"HTTP_PORT": "-1"}, [], "HTTP_PORT=-1: must be a TCP port"),
    ({}, ["--batch-size", "x"], "--batch-size='x': expected an integer"),
    ({"MODEL_DIR": "/no/such/model"}, [], "MODEL_DIR='/no/such/model': no such file or directory"),
    # the flag wins over the env: BATCH_SIZE=abc is overridden, so the next problem (the model) is reported
    ({"BATCH_SIZE": "abc", "MODEL_DIR": "/no/such/model"}, ["--batch-size", "4"], "MODEL_DIR="),
    ({"SERVICE_HTTP_PORT": "1234", "PUSH_MODE_HTTP_PORT": "1235"}, [], "disagree"),
])
def test_bad_settings_stop_with_one_line(tmp_path, env, args, needle):
    e = _ports_env(tmp_path)
    e.update(env)
    r = run_kiln(["serve", *args], e, tmp_path)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


def test_same_port_twice(tmp_path):
    e = _ports_env(tmp_path)
    e["GRPC_PORT"] = e["HTTP_PORT"]
    r = run_kiln(["serve"], e, tmp_path)
    assert r.returncode == 2 and "HTTP_PORT and GRPC_PORT are both" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("which", ["PUSH_MODE_HTTP_PORT", "HTTP_PORT", "INFER_QUEUE_PORT"])
def test_busy_port(tmp_path, which):
    e = _ports_env(tmp_path)
    with socket.socket() as s:
        s.bind(("0.0.0.0" if which != "INFER_QUEUE_PORT" else "127.0.0.1", int(e[which])))
        s.listen(1)
        r = run_kiln(["serve"], e, tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"{which}={e[which]}" in r.stderr and "already in use" in r.stderr


def test_unwritable_log_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    e = _ports_env(tmp_path, FD_LOG_DIR=str(tmp_path / "file" / "log"))
    r = run_kiln(["serve"], e, tmp_path)
    assert r.returncode == 2 and "FD_LOG_DIR=" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- a real server with two HTTP workers and DISABLE_STREAMING --------------------------------------------

@pytest.fixture(scope="module")
def server(kiln_server_factory):
    return kiln_server_factory(PUSH_MODE_HTTP_WORKERS="2", DISABLE_STREAMING="1", GRPC_PORT="-1",
                               METRICS_PORT="-1")


def test_two_http_workers(server):
    procs = server.stats()["processes"]
    workers = [p for p in procs if p["kind"] == "http"]
    assert len(workers) == 2 and all(p["alive"] for p in workers)
    assert {p["kind"] for p in procs} == {"engine", "http"}     # gRPC and metrics switched off with -1
    results = []

    def one(i):
        r = requests.post(server.url + "/v1/chat/completions",
                          json={"text": f"Count to {i}", "max_dec_len": 4, "min_dec_len": 4}, timeout=120)
        results.append(r.json())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 6 and all(r["error_code"] == 0 and r["tokens_all_num"] == 4 for r in results)


def test_duplicate_id_across_workers(server):
    """The engine sees every worker: the same req_id sent twice at once is rejected once."""
    out = []

    def one():
        r = requests.post(server.url + "/v1/chat/completions",
                          json={"text": "Tell me a story", "req_id": "same", "max_dec_len": 40, "min_dec_len": 40},
                          timeout=120)
        out.append((r.status_code, r.json()))

    ts = [threading.Thread(target=one) for _ in range(4)]
    for t in ts:
        t.start()
        time.sleep(0.05)
    for t in ts:
        t.join(120)
    ok = [b for s, b in out if s == 200]
    dup = [b for s, b in out if s == 409]
    assert len(ok) >= 1 and len(ok) + len(dup) == 4
    assert all("already exists" in b["error_msg"] for b in dup)


def test_disable_streaming_sends_only_the_final_packet(server):
    res = requests.post(server.url + "/v1/chat/completions",
                        json={"text": "Hi", "max_dec_len": 5, "min_dec_len": 5, "stream": True}, stream=True,
                        timeout=60)
    lines = [json.loads(x) for x in res.iter_lines() if x]
    assert len(lines) == 1 and lines[0]["is_end"] == 1 and lines[0]["tokens_all_num"] == 5


def test_sigterm_with_a_request_in_flight(server):
    pids = server.pids()
    assert len(pids) == 4                               # supervisor, engine, 2 HTTP workers
    box = {}

    def long_request():
        r = requests.post(server.url + "/v1/chat/completions",
                          json={"text": "Tell me a long story.", "max_dec_len": 60, "min_dec_len": 60}, timeout=120)
        box["r"] = r

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while server.stats()["num_running"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    # draining: readiness is off at once, liveness stays
    deadline = time.monotonic() + 5
    while requests.get(server.health_url + "/v2/health/ready", timeout=5).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = requests.get(server.health_url + "/v2/health/ready", timeout=5)
    assert r.status_code == 500 and r.json() == {"error_code": 1, "error_msg": "server is not ready"}
    t.join(120)
    b = box["r"].json()
    assert box["r"].status_code == 200 and b["error_code"] == 0 and b["tokens_all_num"] == 60
    assert server.proc.wait(60) == 0
    time.sleep(0.5)
    assert [p for p in pids if pid_alive(p)] == []
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/v2/health/live", timeout=5)
    log = (server.log_dir / "server.log").read_text()
    assert "received SIGTERM" in log and "Kiln stopped" in log


def test_engine_death_stops_the_service(kiln_server_factory):
    s = kiln_server_factory(GRPC_PORT="-1", METRICS_PORT="-1")
    pids = s.pids()
    engine = [p["pid"] for p in s.stats()["processes"] if p["kind"] == "engine"][0]
    import os

    os.kill(engine, signal.SIGKILL)
    assert s.proc.wait(120) == 1
    assert "engine core exited" in s.tail()
    time.sleep(0.5)
    assert [p for p in pids if pid_alive(p)] == []
