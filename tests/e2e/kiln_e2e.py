"""Helpers of the end-to-end tests: a real `kiln serve` (subprocess, default model, free ports, small cache).
The fixtures are in conftest.py:

    @pytest.fixture(scope="module")
    def server(kiln_server_factory):
        return kiln_server_factory(BATCH_SIZE=4)          # env overrides; started and ready

    server.url            http://127.0.0.1:<PUSH_MODE_HTTP_PORT>
    server.health_url     http://127.0.0.1:<HTTP_PORT>
    server.ports          {"PUSH_MODE_HTTP_PORT": ..., "HTTP_PORT": ..., "GRPC_PORT": ..., ...}
    server.stats()        the engine stats + process list (GET health /stats)
    server.stop()         SIGTERM, wait, return the exit code
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from kiln.engine.core import pid_alive  # noqa: F401 - the e2e tests' check that a process is gone
from tests.helpers.ports import free_ports

REPO = Path(__file__).resolve().parents[2]

# a small, fast configuration for the default model on CPU
SMALL = {
    "BATCH_SIZE": "8",
    "MAX_SEQ_LEN": "512",
    "MAX_DEC_LEN": "128",
    "BLOCK_SIZE": "16",
    "KILN_NUM_BLOCKS": "160",
    "MAX_CACHED_TASK_NUM": "16",
    "KILN_SHUTDOWN_TIMEOUT": "60",
}

SEED_ENV = ("MODEL_DIR", "MP_NUM", "HTTP_PORT", "GRPC_PORT", "METRICS_PORT", "INFER_QUEUE_PORT",
            "PUSH_MODE_HTTP_PORT", "PUSH_MODE_HTTP_WORKERS", "DISABLE_STREAMING", "MAX_SEQ_LEN", "MAX_DEC_LEN",
            "BATCH_SIZE", "BLOCK_BS", "BLOCK_RATIO", "BLOCK_SIZE", "MAX_CACHED_TASK_NUM", "USE_WARMUP",
            "USE_HF_TOKENIZER", "USE_CACHE_KV_INT8", "FD_MODEL_CONFIG_PATH", "DISTRIBUTED_CONFIG", "FD_LOG_DIR",
            "CHECK_HEALTH_INTERVAL", "DTYPE", "FD_DEBUG", "HEALTH_HTTP_PORT", "SERVICE_GRPC_PORT",
            "METRICS_HTTP_PORT", "INTER_PROC_PORT", "SERVICE_HTTP_PORT", "GPU_MEMORY_UTILIZATION",
            "ENC_DEC_BLOCK_NUM", "MAX_PREFILL_BATCH", "PROMETHEUS_MULTIPROC_DIR")


def clean_env(**overrides: str) -> dict[str, str]:
    """os.environ without any seed/Kiln setting, plus overrides."""
    env = {k: v for k, v in os.environ.items() if k not in SEED_ENV and not k.startswith("KILN_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def kiln_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln.entrypoints.cli", *args]


class KilnServer:
    def __init__(self, workdir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        p = free_ports(5)
        self.ports = {"PUSH_MODE_HTTP_PORT": p[0], "HTTP_PORT": p[1], "GRPC_PORT": p[2], "METRICS_PORT": p[3],
                      "INFER_QUEUE_PORT": p[4]}
        self.log_dir = self.workdir / "log"
        settings = dict(SMALL)
        settings.update({k: str(v) for k, v in self.ports.items()})
        settings["FD_LOG_DIR"] = str(self.log_dir)
        settings.update(env or {})
        for k in self.ports:
            if k in settings:
                self.ports[k] = int(settings[k])
        self.env = clean_env(**settings)
        self.args = tuple(args)
        self.proc: subprocess.Popen | None = None
        self.console = self.workdir / "console.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['PUSH_MODE_HTTP_PORT']}"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['HTTP_PORT']}"

    def start(self, wait: bool = True, timeout: float = 300.0) -> "KilnServer":
        out = open(self.console, "ab")
        self.proc = subprocess.Popen(kiln_cmd("serve", *self.args), cwd=self.workdir, env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited ({self.proc.returncode}) during start-up:\n{self.tail()}")
            try:
                if requests.get(self.health_url + "/v2/health/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"kiln serve not ready within {timeout} s:\n{self.tail()}")

    def stats(self) -> dict:
        key = self.env.get("KILN_API_KEY", "").split(",")[0].strip()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.get(self.health_url + "/stats", headers=headers, timeout=5).json()

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Until nothing runs or waits in the engine and every KV block is free; returns the stats."""
        deadline = time.monotonic() + timeout
        s = {}
        while time.monotonic() < deadline:
            s = self.stats()
            if s.get("num_running") == 0 and s.get("num_waiting") == 0 and \
                    s.get("num_free_blocks") == s.get("num_total_blocks"):
                return s
            time.sleep(0.1)
        raise AssertionError(f"engine not idle after {timeout} s: {s}")

    def pids(self) -> list[int]:
        s = self.stats()
        return [s["supervisor_pid"]] + [p["pid"] for p in s.get("processes", [])]

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def requests_log(self) -> str:
        p = self.log_dir / "requests.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with_suppress_kill(self.proc.pid)
            return self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with_suppress_kill(self.proc.pid)
            self.proc.wait(10)


def with_suppress_kill(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
