"""scripts/start_server.sh and scripts/stop_server.sh, the seed's workflow: start in the background with logs
under FD_LOG_DIR, serve, stop gracefully (a request in flight finishes), nothing left behind. The server is
configured with the Gen-B port names here, which must work as well as the Gen-A ones."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import requests

from kiln_e2e import REPO, SMALL, clean_env, free_ports, pid_alive


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("scripts")
    p = free_ports(5)
    e = clean_env(**SMALL, SERVICE_HTTP_PORT=p[0], HEALTH_HTTP_PORT=p[1], SERVICE_GRPC_PORT=p[2],
                  METRICS_HTTP_PORT=p[3], INTER_PROC_PORT=p[4], FD_LOG_DIR=str(work / "log"),
                  KILN_START_WAIT="300")
    e["KILN_PYTHON"] = sys.executable      # this interpreter, not some other `kiln` on PATH
    return {"env": e, "work": work, "http": p[0], "health": p[1]}


def script(name, env, *args, timeout=400):
    return subprocess.run(["bash", str(REPO / "scripts" / name), *args], env=env["env"], cwd=env["work"],
                          capture_output=True, text=True, timeout=timeout)


def test_start_request_stop(env):
    r = script("start_server.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Kiln is ready" in r.stdout
    log = env["work"] / "log"
    pid = int((log / "kiln.pid").read_text())
    assert pid_alive(pid)
    # already running: a second start refuses
    r2 = script("start_server.sh", env)
    assert r2.returncode == 1 and "already running" in r2.stderr

    url = f"http://127.0.0.1:{env['http']}/v1/chat/completions"
    assert requests.get(f"http://127.0.0.1:{env['health']}/v2/health/ready", timeout=5).status_code == 200
    b = requests.post(url, json={"text": "hello, llm", "max_dec_len": 4}, timeout=60).json()
    assert b["error_code"] == 0
    pids = [pid] + [p["pid"] for p in requests.get(f"http://127.0.0.1:{env['health']}/stats", timeout=5)
                    .json()["processes"]]

    box = {}

    def in_flight():
        box["r"] = requests.post(url, json={"text": "Tell me a story.", "max_dec_len": 50, "min_dec_len": 50},
                                 timeout=120)

    t = threading.Thread(target=in_flight)
    t.start()
    deadline = time.monotonic() + 30
    while requests.get(f"http://127.0.0.1:{env['health']}/stats", timeout=5).json()["num_running"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = script("stop_server.sh", env, "60")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Kiln stopped" in r.stdout and "killing" not in r.stderr
    t.join(60)
    assert box["r"].status_code == 200 and box["r"].json()["tokens_all_num"] == 50
    assert [p for p in pids if pid_alive(p)] == []
    assert not (log / "kiln.pid").exists()
    for f in ("console.log", "server.log", "requests.log"):
        assert (log / f).stat().st_size > 0, f
    assert "received SIGINT" in (log / "server.log").read_text()
    # stopping again is harmless
    r = script("stop_server.sh", env)
    assert r.returncode == 0 and "not running" in r.stdout


def test_start_failure_is_reported(env):
    e = dict(env)
    e["env"] = dict(env["env"], BATCH_SIZE="lots")
    r = script("start_server.sh", e)
    assert r.returncode == 1
    assert "BATCH_SIZE='lots'" in r.stderr
    assert not (env["work"] / "log" / "kiln.pid").exists()
