"""`kiln serve`: the supervisor. Starts and watches every process of the service, in the foreground.

    supervisor (this process): health server on HTTP_PORT, child watchdog, signal handling
      ├─ engine core            (ZMQ ROUTER on tcp://127.0.0.1:INFER_QUEUE_PORT)
      ├─ HTTP worker × PUSH_MODE_HTTP_WORKERS   (one shared listening socket on PUSH_MODE_HTTP_PORT)
      ├─ gRPC server            (kiln.server.grpc_server.run(cfg), GRPC_PORT)
      └─ metrics server         (kiln.server.metrics.run(cfg), METRICS_PORT)

Start-up problems a user can fix (bad setting, busy port, missing model, unwritable log dir) raise
ConfigError before any child starts. SIGTERM / SIGINT (Ctrl-C): readiness turns 500, the front ends stop
accepting and finish their running requests (up to KILN_SHUTDOWN_TIMEOUT), then the engine and the rest stop;
a second signal cuts it short. No child outlives the supervisor (each dies with its parent).

If the engine core dies, the front ends fail its requests at once (kiln.engine.client watches the connection)
and the supervisor exits non-zero within 5 s, or with KILN_ENGINE_RESTART starts a new engine in its place.
A dead HTTP worker is restarted; the engine aborts its requests itself (kiln.engine.core.FrontEnds).
Every process names its role in `ps` (`kiln serve: engine`, `kiln serve: http-0`, ...).
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import multiprocessing as mp
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from kiln.config import ConfigError, KilnConfig, port_busy_message, setup_logging
from kiln.threads import ENGINE, configure_threads

log = logging.getLogger("kiln.serve")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

ENGINE_STOP_TIMEOUT_S = 10.0
ENGINE_DEATH_FRONT_GRACE_S = 2.0   # front ends' grace once the engine died (the whole exit stays under 5 s)
MAX_RESTARTS = 5


# ----------------------------------------------------------------------------------------------------
# child process entry points (module level: they are spawned)
# ----------------------------------------------------------------------------------------------------

def set_role_title(role: str) -> None:
    """Name the process after its role in `ps` / /proc/<pid>/cmdline (`kiln serve: engine`, `...: http-0`);
    it also hides the supervisor's argv (a --api-key flag) from other local users."""
    try:
        import setproctitle

        setproctitle.setproctitle(f"kiln serve: {role}")
    except ImportError:  # the package is a dependency; a broken install must not stop the service
        log.warning("setproctitle is not installed: processes keep their command line")


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def _engine_main(engine_cfg, address: str, cfg: KilnConfig) -> None:
    configure_threads(ENGINE, cfg.engine_threads)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_role_title("engine")
    setup_logging(cfg, "kiln-engine")
    log.info("engine: Triton compile cache %s", os.environ.get("TRITON_CACHE_DIR") or "unset (Triton's default)")
    from kiln.engine.core import run_engine_core

    run_engine_core(engine_cfg, address, cfg.engine_secret, "DEBUG" if cfg.fd_debug else "INFO")


def _component_main(module: str, cfg: KilnConfig) -> None:
    configure_threads(module)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_role_title({"kiln.server.grpc_server": "grpc", "kiln.server.metrics": "metrics"}.get(module, module))
    setup_logging(cfg, f"kiln-{module.rsplit('.', 1)[-1]}")
    mod = importlib.import_module(module)
    mod.run(cfg)


def _http_main(cfg: KilnConfig, sock: socket.socket, index: int, started) -> None:
    configure_threads("http")
    from kiln.server import http

    set_role_title(f"http-{index}")
    http.run_worker(cfg, sock, index, started)


# ----------------------------------------------------------------------------------------------------
# sockets
# ----------------------------------------------------------------------------------------------------

def bind_listen(name: str, host: str, port: int, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise ConfigError(port_busy_message(name, port, host, e)) from None
    s.listen(backlog)
    s.set_inheritable(True)
    return s


# ----------------------------------------------------------------------------------------------------
# the supervisor
# ----------------------------------------------------------------------------------------------------

@dataclass
class Child:
    name: str
    kind: str                       # engine | http | grpc | metrics
    proc: Any
    index: int = 0
    started: Any = None             # mp.Event set when an HTTP worker serves
    restarts: int = 0
    expected_exit: bool = False


@dataclass
class Supervisor:
    cfg: KilnConfig
    http_sock: socket.socket | None
    health_sock: socket.socket
    children: list[Child] = field(default_factory=list)
    stopping: bool = False
    exit_code: int = EXIT_OK
    failure: str | None = None

    def __post_init__(self):
        self.ctx = mp.get_context("spawn")
        self.stop_event: asyncio.Event | None = None
        self.signals = 0
        self.client = None
        self.engine_died = False
        self.ready_logged = False
        self.t0 = time.monotonic()

    # -- children -------------------------------------------------------------------------------------
    def _spawn(self, name: str, target, args: tuple) -> Any:
        p = self.ctx.Process(target=target, args=args, name=name, daemon=False)
        # children ignore SIGINT from their first instruction on (Ctrl-C reaches the whole process group;
        # the supervisor decides the order of the shutdown)
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            p.start()
        finally:
            signal.signal(signal.SIGINT, old)
        return p

    def start_engine(self, restarts: int = 0) -> None:
        ecfg = self.cfg.to_engine_config()
        p = self._spawn("kiln-engine", _engine_main, (ecfg, self.cfg.engine_address, self.cfg))
        self.children.append(Child("engine core", "engine", p, 0, None, restarts))
        log.info("engine core starting (pid %d): model %s, dtype %s, max_model_len %s, batch %d, block %d",
                 p.pid, self.cfg.model_path, ecfg.dtype, ecfg.max_model_len, ecfg.max_num_seqs, ecfg.block_size)

    def _start_http(self, index: int, restarts: int = 0) -> Child:
        started = self.ctx.Event()
        p = self._spawn(f"kiln-http-{index}", _http_main, (self.cfg, self.http_sock, index, started))
        c = Child(f"HTTP worker {index}", "http", p, index, started, restarts)
        self.children.append(c)
        return c

    def start_http_workers(self) -> None:
        if self.http_sock is None:
            return
        for i in range(self.cfg.push_mode_http_workers):
            self._start_http(i)

    def _start_component(self, kind: str, module: str, restarts: int = 0) -> Child | None:
        if importlib.util.find_spec(module) is None:
            log.warning("%s is not available (no module %s); %s is off", kind, module, kind)
            return None
        p = self._spawn(f"kiln-{kind}", _component_main, (module, self.cfg))
        c = Child(f"{kind} server", kind, p, 0, None, restarts)
        self.children.append(c)
        return c

    def start_components(self) -> None:
        if self.cfg.grpc_enabled:
            self._start_component("grpc", "kiln.server.grpc_server")
        if self.cfg.metrics_enabled:
            self._start_component("metrics", "kiln.server.metrics")

    def engine(self) -> Child | None:
        return next((c for c in self.children if c.kind == "engine"), None)

    # -- health ---------------------------------------------------------------------------------------
    async def readiness(self):
        from kiln.server.health import NOT_READY, HealthStatus, engine_status, port_accepts

        if self.stopping:
            return HealthStatus(False, *NOT_READY)
        eng = self.engine()
        client = self.client
        st = engine_status(getattr(client, "stats", None), getattr(client, "fatal", None),
                           eng is not None and eng.proc.is_alive(), self.cfg.check_health_interval)
        if not st.ok:
            return st
        for c in self.children:
            if c.kind == "http" and (not c.proc.is_alive() or not c.started.is_set()):
                return HealthStatus(False, *NOT_READY)
        if self.cfg.grpc_enabled and any(c.kind == "grpc" for c in self.children):
            host = "127.0.0.1" if self.cfg.host in ("0.0.0.0", "", "::") else self.cfg.host
            if not await port_accepts(host, self.cfg.grpc_port):
                return HealthStatus(False, *NOT_READY)
        return HealthStatus(True)

    def stats(self) -> dict:
        s = getattr(self.client, "stats", None)
        out = s.to_dict() if s is not None else {}
        out["supervisor_pid"] = os.getpid()
        out["processes"] = [{"name": c.name, "kind": c.kind, "pid": c.proc.pid, "alive": c.proc.is_alive(),
                             "restarts": c.restarts} for c in self.children]
        out["stopping"] = self.stopping
        return out

    # -- main loop ------------------------------------------------------------------------------------
    def _on_signal(self, sig: int) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("received %s: shutting down (running requests get up to %.0f s)",
                     signal.Signals(sig).name, self.cfg.shutdown_timeout)
            self.stop_event.set()
        else:
            log.warning("received %s again: stopping now", signal.Signals(sig).name)
            self._kill_all()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # the engine first: its start is the longest (start to ready), and these imports need not delay it
        self.start_engine()

        import uvicorn

        from kiln.engine.client import AsyncEngineClient
        from kiln.server.health import create_health_app

        self.client = AsyncEngineClient(self.cfg.engine_address, self.cfg.engine_secret)
        await self.client.start()
        self.start_http_workers()
        self.start_components()

        class HealthServer(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the supervisor handles signals itself
                yield

        from kiln.server.auth import ApiKeyMiddleware, ApiKeys

        # the probes stay open; /stats (pids, processes, cache use) needs the API key when one is set
        health_app = ApiKeyMiddleware(create_health_app(self.readiness, self.stats), ApiKeys.for_api(self.cfg))
        health = HealthServer(uvicorn.Config(health_app, log_config=None,
                                             access_log=False, lifespan="off", timeout_keep_alive=5))
        health_task = loop.create_task(health.serve(sockets=[self.health_sock]))

        try:
            while not self.stop_event.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), 0.25)
                self._check_children()
                self._check_ready()
        finally:
            await self.shutdown()
            health.should_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(health_task, 5)
            with contextlib.suppress(BaseException):
                await self.client.close()
        return self.exit_code

    def _check_ready(self) -> None:
        if self.ready_logged or self.client is None:
            return
        stats = self.client.stats
        if stats is not None and stats.ready and all(
                c.started.is_set() for c in self.children if c.kind == "http"):
            self.ready_logged = True
            cfg = self.cfg
            parts = []
            if cfg.http_enabled:
                parts.append(f"HTTP API on {cfg.host}:{cfg.push_mode_http_port} "
                             f"({cfg.push_mode_http_workers} worker{'s' if cfg.push_mode_http_workers > 1 else ''})")
            if cfg.grpc_enabled:
                parts.append(f"gRPC on {cfg.grpc_port}")
            parts.append(f"health on {cfg.http_port}")
            if cfg.metrics_enabled:
                parts.append(f"metrics on {cfg.metrics_port}")
            log.info("Kiln is ready in %.1f s: model %s (%s); %s; KV cache %d blocks x %d tokens",
                     time.monotonic() - self.t0, cfg.model_name, cfg.model_path, ", ".join(parts),
                     stats.num_total_blocks, stats.block_size)

    def _check_children(self) -> None:
        for c in list(self.children):
            if c.proc.is_alive() or c.expected_exit or self.stopping:
                continue
            code = c.proc.exitcode
            if c.kind == "engine":
                # The front ends already failed their requests (their engine clients saw the connection
                # drop); the supervisor only decides between a restart in place and exiting.
                why = getattr(self.client, "fatal", None)
                failure = (f"the engine core exited (exit code {code})" + (f": {why}" if why else "")
                           + f"; see {self.cfg.log_dir / 'server.log'}")
                if self.cfg.engine_restart and not why and c.restarts < MAX_RESTARTS:
                    log.error("%s; restarting it (KILN_ENGINE_RESTART)", failure)
                    self.children.remove(c)
                    self.start_engine(c.restarts + 1)
                    continue
                self.failure = failure
                log.error("%s; stopping the service", self.failure)
                self.exit_code = EXIT_FAILED
                self.engine_died = True
                self.stop_event.set()
                return
            self.children.remove(c)
            if c.restarts >= MAX_RESTARTS:
                self.failure = f"the {c.name} keeps dying (exit code {code}); see {self.cfg.log_dir / 'server.log'}"
                log.error("%s; stopping the service", self.failure)
                self.exit_code = EXIT_FAILED
                self.stop_event.set()
                return
            log.error("%s (pid %s) exited unexpectedly (exit code %s); restarting it", c.name, c.proc.pid, code)
            if c.kind == "http":
                self._start_http(c.index, c.restarts + 1)
            else:
                module = "kiln.server.grpc_server" if c.kind == "grpc" else "kiln.server.metrics"
                self._start_component(c.kind, module, c.restarts + 1)

    async def _wait_exit(self, children: list[Child], timeout: float) -> list[Child]:
        deadline = time.monotonic() + timeout
        alive = [c for c in children if c.proc.is_alive()]
        while alive and time.monotonic() < deadline and self.signals < 2:
            await asyncio.sleep(0.1)
            alive = [c for c in alive if c.proc.is_alive()]
        return alive

    def _term(self, children: list[Child]) -> None:
        for c in children:
            c.expected_exit = True
            if c.proc.is_alive():
                with contextlib.suppress(Exception):
                    os.kill(c.proc.pid, signal.SIGTERM)

    def _kill(self, children: list[Child]) -> None:
        for c in children:
            if c.proc.is_alive():
                log.warning("killing %s (pid %d)", c.name, c.proc.pid)
                with contextlib.suppress(Exception):
                    os.kill(c.proc.pid, signal.SIGKILL)

    def _kill_all(self) -> None:
        self._kill(self.children)

    async def shutdown(self) -> None:
        self.stopping = True
        t0 = time.monotonic()
        # 1. front ends: stop accepting, finish running requests
        if self.http_sock is not None:
            with contextlib.suppress(OSError):
                self.http_sock.close()
        front = [c for c in self.children if c.kind in ("http", "grpc")]
        self._term(front)
        # after the engine's death nothing can still be running: the front ends get a short grace, so that
        # the service exits within ENGINE_DEATH_EXIT_S and its process manager restarts it
        grace = ENGINE_DEATH_FRONT_GRACE_S if self.engine_died else self.cfg.shutdown_timeout + 5
        left = await self._wait_exit(front, grace)
        self._kill(left)
        # 2. the engine and the metrics server
        back = [c for c in self.children if c.kind in ("engine", "metrics")]
        self._term(back)
        left = await self._wait_exit(back, ENGINE_DEATH_FRONT_GRACE_S if self.engine_died else ENGINE_STOP_TIMEOUT_S)
        self._kill(left)
        for c in self.children:
            with contextlib.suppress(Exception):
                c.proc.join(2)
        log.info("Kiln stopped in %.1f s", time.monotonic() - t0)


def _prepare(cfg: KilnConfig) -> tuple[socket.socket | None, socket.socket]:
    """Everything that can fail because of the user's setup, before any child starts."""
    try:
        cfg.log_dir.mkdir(parents=True, exist_ok=True)
        probe = cfg.log_dir / ".kiln-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"FD_LOG_DIR={cfg.fd_log_dir!r}: cannot write there ({e.strerror or e})") from None
    cfg.check_ports_free()
    cfg.resolve()
    http_sock = bind_listen("PUSH_MODE_HTTP_PORT", cfg.host, cfg.push_mode_http_port) if cfg.http_enabled else None
    try:
        health_sock = bind_listen("HTTP_PORT", cfg.host, cfg.http_port)
    except ConfigError:
        if http_sock is not None:
            http_sock.close()
        raise
    return http_sock, health_sock


def setup_compile_cache() -> str:
    """Triton's compile cache under Kiln's cache directory ($KILN_CACHE_DIR or ~/.cache/kiln, then triton/), so a
    restart on this machine loads the kernels the last run compiled instead of compiling them again. Set in the
    supervisor's environment before any child (which inherit it) imports triton; an explicit TRITON_CACHE_DIR
    wins. (Kiln uses no torch.compile, so there is no Inductor cache to keep.) Returns the directory."""
    from kiln.models.gguf import default_cache_root

    path = os.environ.get("TRITON_CACHE_DIR") or str(default_cache_root() / "triton")
    os.makedirs(path, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = path
    return path


def _gpu_present(cfg: KilnConfig) -> bool:
    """Whether the engine will run on a GPU, told without importing torch in the supervisor: KILN_DEVICE=cuda,
    or auto with an NVIDIA device node that CUDA_VISIBLE_DEVICES does not hide."""
    if cfg.device != "auto":
        return cfg.device == "cuda"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1")
    return os.path.exists("/dev/nvidiactl") and not hidden


def serve(cfg: KilnConfig) -> int:
    """Run the service in the foreground until SIGTERM/SIGINT. Raises ConfigError for start-up problems."""
    http_sock, health_sock = _prepare(cfg)
    setup_logging(cfg, "kiln-supervisor")
    try:
        log.info("Triton compile cache: %s", setup_compile_cache())
    except OSError as e:  # an unwritable cache costs compile time on the next start, nothing else
        log.warning("no persistent Triton compile cache (%s): kernels compile again on every start", e)
    set_role_title("supervisor")
    # per start: the engine serves only processes that know it (handed to children with their config,
    # never on a command line or in the environment)
    cfg.engine_secret = secrets.token_hex(32)
    cfg.push_mode_http_workers = cfg.http_workers(on_gpu=_gpu_present(cfg))
    try:
        from kiln.server import metrics as _metrics  # noqa: F401
        if cfg.metrics_enabled and hasattr(_metrics, "setup_multiprocess_dir"):
            _metrics.setup_multiprocess_dir()
    except ImportError:
        pass
    log.info("starting Kiln (pid %d): %s", os.getpid(), cfg.summary())
    sup = Supervisor(cfg, http_sock, health_sock)
    try:
        code = asyncio.run(sup.run())
    finally:
        for s in (http_sock, health_sock):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        try:
            from kiln.server import metrics as _metrics  # noqa: F811
            if cfg.metrics_enabled and hasattr(_metrics, "cleanup_multiprocess_dir"):
                _metrics.cleanup_multiprocess_dir()
        except Exception:  # noqa: BLE001
            pass
    if sup.failure:
        print(f"kiln serve: error: {sup.failure}", file=sys.stderr)
    return code
