"""scripts/start_server.sh and scripts/stop_server.sh, the seed's workflow: start in the background with logs
under FD_LOG_DIR, serve, stop gracefully (a request in flight finishes), nothing left behind. The server is
configured with the Gen-B port names here, which must work as well as the Gen-A ones. Then the README's way:
scripts/serve.sh in the foreground, stopped by scripts/stop_server.sh, and stale pid files."""
from __future__ import annotations

import os
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
    e = clean_env(**{**SMALL, "KILN_SHUTDOWN_TIMEOUT": "240"}, SERVICE_HTTP_PORT=p[0], HEALTH_HTTP_PORT=p[1], SERVICE_GRPC_PORT=p[2],
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
                                 timeout=300)

    t = threading.Thread(target=in_flight)
    t.start()
    deadline = time.monotonic() + 30
    while requests.get(f"http://127.0.0.1:{env['health']}/stats", timeout=5).json()["num_running"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # the documented default timeout: KILN_SHUTDOWN_TIMEOUT (generous here: a busy CI machine) + 30 s
    r = script("stop_server.sh", env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "up to 270 s" in r.stdout
    assert "Kiln stopped" in r.stdout and "killing" not in r.stderr, r.stdout + r.stderr
    t.join(60)
    assert box["r"].status_code == 200 and box["r"].json()["tokens_all_num"] == 50
    assert [p for p in pids if pid_alive(p)] == []
    assert not (log / "kiln.pid").exists()
    for f in ("console.log", "server.log", "requests.log"):
        assert (log / f).stat().st_size > 0, f
    assert "received SIGTERM" in (log / "server.log").read_text()
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


def descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... (from /proc), e.g. multiprocessing's resource tracker, which /stats
    does not list."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out += [int(entry)] + descendants(int(entry))
    return out


def test_serve_sh_is_stopped_by_stop_server_sh(tmp_path):
    p = free_ports(5)
    env = clean_env(**{**SMALL, "KILN_SHUTDOWN_TIMEOUT": "30"}, PUSH_MODE_HTTP_PORT=p[0], HTTP_PORT=p[1],
                    GRPC_PORT=p[2], METRICS_PORT=p[3], INFER_QUEUE_PORT=p[4])
    health = f"http://127.0.0.1:{p[1]}"
    console = open(tmp_path / "serve.out", "wb")
    serve = subprocess.Popen(["bash", str(REPO / "scripts" / "serve.sh")], cwd=tmp_path, env=env, stdout=console,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    console.close()
    try:
        deadline = time.monotonic() + 300
        while True:
            assert serve.poll() is None, (tmp_path / "serve.out").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.out").read_text()
            try:
                if requests.get(health + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        stats = requests.get(health + "/stats", timeout=5).json()
        supervisor = stats["supervisor_pid"]
        # the pid file sits where stop_server.sh looks: ./log relative to where serve.sh was run
        pid_file = tmp_path / "log" / "kiln.pid"
        assert int(pid_file.read_text()) == supervisor
        children = [c["pid"] for c in stats["processes"]]
        assert {"engine", "http", "grpc", "metrics"} <= {c["kind"] for c in stats["processes"]}
        pids = [supervisor] + children + descendants(supervisor)
        assert all(pid_alive(q) for q in pids)

        r = subprocess.run(["bash", str(REPO / "scripts" / "stop_server.sh")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Kiln stopped" in r.stdout and "killing" not in r.stderr, r.stdout + r.stderr
        # graceful: serve.sh ends with the server's exit code 0 and has removed the pid file
        assert serve.wait(30) == 0, (tmp_path / "serve.out").read_text()
        assert [q for q in pids if pid_alive(q)] == []
        assert not pid_file.exists()
        assert "received SIGTERM" in (tmp_path / "log" / "server.log").read_text()
        # the set-up steps and the start say what they do
        assert "[kiln serve] starting kiln serve" in (tmp_path / "serve.out").read_text()
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, 9)
            serve.wait(10)


@pytest.mark.parametrize("occupant", ["gone", "not kiln"])
def test_stale_pid_file_is_reported_and_removed(tmp_path, occupant):
    if occupant == "gone":
        p = subprocess.Popen(["true"])
        p.wait()
    else:  # a live process that is not Kiln (a recycled pid): it must not be signalled
        p = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "log").mkdir()
        (tmp_path / "log" / "kiln.pid").write_text(f"{p.pid}\n")
        r = subprocess.run(["bash", str(REPO / "scripts" / "stop_server.sh")], cwd=tmp_path, env=clean_env(),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "stale pid file" in r.stdout and str(p.pid) in r.stdout, r.stdout
        assert not (tmp_path / "log" / "kiln.pid").exists()
        if occupant == "not kiln":
            assert p.poll() is None
    finally:
        p.kill()
        p.wait()
