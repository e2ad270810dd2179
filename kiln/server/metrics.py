"""Prometheus metrics: `GET :METRICS_PORT/metrics` (Prometheus text format, prometheus-client).

Where the numbers come from
---------------------------
* Per-request families (latencies, token counters, finish reasons, errors) are recorded by the front ends
  that serve requests -- every HTTP worker and the gRPC server -- through `MetricsObserver`, the request
  observer that kiln.server.frontend installs (`make_request_observer`). Those are separate processes, so
  prometheus-client runs in **multi-process mode**: each process writes its counters and histograms to
  memory-mapped files in one shared directory, and the metrics process sums them at scrape time
  (`MultiProcessCollector`).
* Engine-side families (requests running / waiting, KV-cache usage, preemptions, and the seed's
  `inference_server_metrics` gauge) are read at scrape time from the latest `EngineStats` that the engine
  core broadcasts to every client; the metrics process keeps its own `AsyncEngineClient` for that. No
  engine-side gauge ever goes through the multi-process files, so a dead process can leave no stale gauge.

What the supervisor must do (environment contract)
--------------------------------------------------
    PROMETHEUS_MULTIPROC_DIR   a directory shared by all Kiln processes of one server, empty at start-up.

It must be in the environment of every front-end process *before* prometheus_client is imported there, i.e.
set it in the supervisor's own `os.environ` before spawning any child: call
`kiln.server.metrics.setup_multiprocess_dir()` first thing in `kiln serve` (it creates a fresh temporary
directory, or empties the one the user set, and exports the variable). Without it each process keeps its own
numbers and `/metrics` shows only the engine-side families (a warning is logged).

Families (all under the `kiln:` prefix unless noted)
----------------------------------------------------
    kiln:num_requests_running              gauge      requests in the running batch
    kiln:num_requests_waiting              gauge      requests queued in the engine
    kiln:kv_cache_usage_perc               gauge      used share of the KV-cache blocks, 0..1
    kiln:num_preemptions_total             counter    preemptions (running request evicted, recomputed later)
    kiln:num_requests_refused_total        counter    requests refused with a full queue (MAX_CACHED_TASK_NUM: 429)
    kiln:prefill_tokens_per_step           histogram  prefill tokens per engine step (KILN_MAX_PREFILL_TOKENS_PER_STEP)
    kiln:lora_adapter_loaded{adapter}      gauge      1 per LoRA adapter held (configured or loaded while serving)
    kiln:spec_decode_num_drafts_total      counter    speculative decoding (KILN_SPECULATIVE_CONFIG set): decode
    kiln:spec_decode_num_draft_tokens_total           rows with drafts, draft tokens, drafts confirmed
    kiln:spec_decode_num_accepted_tokens_total
    kiln:engine_ready                      gauge      1 once the model is loaded and warm
    kiln:time_to_first_token_seconds       histogram  request arrival at the front end -> first token
    kiln:inter_token_latency_seconds       histogram  gap between consecutive tokens of one request
    kiln:e2e_request_latency_seconds       histogram  arrival -> last packet
    kiln:request_queue_time_seconds        histogram  time before the engine first schedules the request (until
                                                      the engine reports it per request: arrival to first token,
                                                      an upper bound)
    kiln:request_prompt_tokens             histogram  prompt length per finished request
    kiln:request_generation_tokens         histogram  generated tokens per finished request
    kiln:prompt_tokens_total               counter    prompt tokens of requests that reached the engine
    kiln:generation_tokens_total           counter    tokens generated (and sent) to clients
    kiln:request_success_total{finished_reason=stop|length|abort}
    kiln:request_errors_total{error_type=invalid|bad_body|too_long|duplicate_id|queue_full|timeout|not_ready|
                              internal}
    inference_server_metrics{<label>="<label>"}   the seed's gauge family, one series per label:
        batch_size (running requests), block_num (free KV blocks), max_batch_size, max_block_num (all KV
        blocks), available_resource (block_num / max_block_num)
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

log = logging.getLogger("kiln.metrics")

ENV_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
SEED_FAMILY = "inference_server_metrics"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def setup_multiprocess_dir(path: str | None = None) -> str:
    """Create (or empty) the shared metrics directory and export PROMETHEUS_MULTIPROC_DIR.

    Call in the supervisor before spawning any process. `path` defaults to the variable's current value,
    else a fresh temporary directory. Returns the directory."""
    path = path or os.environ.get(ENV_MULTIPROC_DIR)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):  # numbers of an earlier run must not leak into this one
            if name.endswith(".db"):
                try:
                    os.remove(os.path.join(path, name))
                except OSError:
                    pass
    else:
        path = tempfile.mkdtemp(prefix="kiln-metrics-")
    os.environ[ENV_MULTIPROC_DIR] = path
    return path


def cleanup_multiprocess_dir(path: str | None = None) -> None:
    """Remove a directory made by setup_multiprocess_dir (supervisor exit); ignores errors."""
    path = path or os.environ.get(ENV_MULTIPROC_DIR)
    if path and os.path.basename(path).startswith("kiln-metrics-"):
        shutil.rmtree(path, ignore_errors=True)


# -- front-end families: built on first use, so that importing this module creates no files ------------------
class _Families:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.ttft = Histogram("kiln:time_to_first_token_seconds", "Time to first token (front-end arrival to "
                              "first token sent).", buckets=TTFT_BUCKETS)
        self.itl = Histogram("kiln:inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=ITL_BUCKETS)
        self.e2e = Histogram("kiln:e2e_request_latency_seconds", "End-to-end request latency (arrival to last "
                             "packet).", buckets=LATENCY_BUCKETS)
        self.queue = Histogram("kiln:request_queue_time_seconds", "Time a request waited in the engine's queue "
                               "before it was first scheduled.", buckets=LATENCY_BUCKETS)
        self.prompt_hist = Histogram("kiln:request_prompt_tokens", "Prompt tokens per finished request.",
                                     buckets=TOKEN_BUCKETS)
        self.gen_hist = Histogram("kiln:request_generation_tokens", "Generated tokens per finished request.",
                                  buckets=TOKEN_BUCKETS)
        self.prompt_tokens = Counter("kiln:prompt_tokens", "Prompt tokens processed (requests that reached "
                                     "the engine).")
        self.generation_tokens = Counter("kiln:generation_tokens", "Tokens generated and sent to clients.")
        self.success = Counter("kiln:request_success", "Finished requests by finish reason.",
                               ["finished_reason"])
        self.errors = Counter("kiln:request_errors", "Failed or rejected requests by error type.", ["error_type"])


_families: _Families | None = None
_pid = os.getpid()


def _note_fork() -> None:
    global _pid
    _pid = os.getpid()


def _cached_pid() -> int:
    return _pid


def _use_cached_pid() -> None:
    """prometheus_client's multiprocess values call os.getpid() (a system call) on every update, to notice a fork:
    three per streamed token. The pid is read once, and again after a fork, instead (the same answer)."""
    from prometheus_client import values

    if getattr(values.ValueClass, "_multiprocess", False) and not getattr(values.ValueClass, "_kiln_pid", False):
        values.ValueClass = values.MultiProcessValue(_cached_pid)
        values.ValueClass._kiln_pid = True


os.register_at_fork(after_in_child=_note_fork)


def families() -> _Families:
    global _families
    if _families is None:
        if ENV_MULTIPROC_DIR not in os.environ:
            log.debug("%s unset: request metrics stay in this process", ENV_MULTIPROC_DIR)
        else:
            _use_cached_pid()
        _families = _Families()
    return _families


class MetricsObserver:
    """The front ends' request observer (kiln.server.frontend.RequestObserver hooks): records the
    per-request families. Stateless (everything comes from the RequestRecord), so one instance serves every
    request of a process. Hooks run on the event loop: they only touch memory-mapped counters."""

    def on_request(self, record: Any) -> None:
        pass

    def on_first_token(self, record: Any, ttft_s: float) -> None:
        f = families()
        ttft_s = max(0.0, float(ttft_s))
        f.ttft.observe(ttft_s)
        # the engine's own queue time when it reports one; else the front end's view of it (arrival to first
        # token: an upper bound, the prefill included)
        q = getattr(record, "queue_time_s", None)
        f.queue.observe(ttft_s if q is None else max(0.0, float(q)))
        if record.num_prompt_tokens:
            f.prompt_tokens.inc(record.num_prompt_tokens)
        f.generation_tokens.inc(1)

    def on_token(self, record: Any, num_tokens: int, itl_s: float) -> None:
        if num_tokens <= 0:
            return
        f = families()
        gap = max(0.0, float(itl_s)) / num_tokens
        for _ in range(num_tokens):
            f.itl.observe(gap)
        f.generation_tokens.inc(num_tokens)

    def on_finish(self, record: Any) -> None:
        f = families()
        reason = record.finish_reason or "abort"
        if reason in ("error", "timeout") or (record.error_type and reason not in ("stop", "length", "abort")):
            f.errors.labels(record.error_type or reason).inc()
            return
        f.success.labels(reason).inc()
        if record.end_time is not None:
            f.e2e.observe(max(0.0, record.end_time - record.arrival_time))
        if record.num_prompt_tokens:
            f.prompt_hist.observe(record.num_prompt_tokens)
        f.gen_hist.observe(record.num_output_tokens)


def make_request_observer(cfg: Any = None) -> MetricsObserver:
    """Called by kiln.server.frontend for every front-end process (when METRICS_PORT is on). Creates the
    families now, so that /metrics lists them (at zero) before the first request."""
    families()
    return MetricsObserver()


# -- engine-side families: a collector reading the latest EngineStats at scrape time ------------------------
class EngineStatsCollector:
    """Reads `stats_source()` (an EngineStats or None) at every scrape."""

    def __init__(self, stats_source, max_age_s: float | None = None):
        self.stats_source = stats_source
        self.max_age_s = max_age_s

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

        s = self.stats_source()
        ready = GaugeMetricFamily("kiln:engine_ready", "1 when the engine has loaded the model, warmed up and "
                                  "its heartbeat is fresh.")
        fresh = s is not None and (self.max_age_s is None or time.time() - s.timestamp <= self.max_age_s)
        ready.add_metric([], 1.0 if (fresh and s.ready) else 0.0)
        yield ready
        if s is None:
            return
        total = max(int(s.num_total_blocks), 0)
        free = max(int(s.num_free_blocks), 0)
        g = GaugeMetricFamily("kiln:num_requests_running", "Requests in the running batch.")
        g.add_metric([], s.num_running)
        yield g
        g = GaugeMetricFamily("kiln:num_requests_waiting", "Requests waiting in the engine's queue.")
        g.add_metric([], s.num_waiting)
        yield g
        g = GaugeMetricFamily("kiln:kv_cache_usage_perc", "Used share of the KV-cache blocks (0..1).")
        g.add_metric([], (total - free) / total if total else 0.0)
        yield g
        c = CounterMetricFamily("kiln:num_preemptions", "Preemptions: running requests evicted from the KV "
                                "cache and recomputed later.")
        c.add_metric([], s.num_preemptions_total)
        yield c
        c = CounterMetricFamily("kiln:num_requests_refused", "Requests refused because the engine's queue was "
                                "full (MAX_CACHED_TASK_NUM): HTTP 429, gRPC RESOURCE_EXHAUSTED.")
        c.add_metric([], s.num_refused_total)
        yield c
        if s.prefill_tokens_buckets:
            from kiln.engine.scheduler import PREFILL_TOKEN_BUCKETS

            h = HistogramMetricFamily("kiln:prefill_tokens_per_step", "Prefill tokens (prompts, prompt chunks, "
                                      "recomputes) per engine step; bounded by KILN_MAX_PREFILL_TOKENS_PER_STEP.")
            bounds = [str(b) for b in PREFILL_TOKEN_BUCKETS] + ["+Inf"]
            h.add_metric([], list(zip(bounds, s.prefill_tokens_buckets)), s.prefill_tokens_sum)
            yield h
        for key, doc in (("num_drafts", "Speculative decoding: decode rows that carried draft tokens."),
                         ("num_draft_tokens", "Speculative decoding: draft tokens computed."),
                         ("num_accepted_tokens", "Speculative decoding: draft tokens the model's samples confirmed "
                          "(over num_draft_tokens: the acceptance rate).")):
            if key in s.spec_decode:  # only when KILN_SPECULATIVE_CONFIG is set
                c = CounterMetricFamily(f"kiln:spec_decode_{key}", doc)
                c.add_metric([], s.spec_decode[key])
                yield c
        g = GaugeMetricFamily("kiln:lora_adapter_loaded", "1 per LoRA adapter the engine holds (KILN_LORA_MODULES "
                              "and those loaded while serving).", labels=["adapter"])
        for name in sorted(s.lora_adapters):
            g.add_metric([name], 1)
        yield g
        # The seed's family: one series per label, the label's value being its own name (as the seed's
        # Triton Python backend exposes it), e.g. inference_server_metrics{batch_size="batch_size"} 3
        m = Metric(SEED_FAMILY, "Inference server status (the seed's family): running batch, free and total "
                   "KV blocks, the free share.", "gauge")
        for key, value in (("batch_size", s.num_running), ("block_num", free),
                           ("max_batch_size", s.max_batch_size), ("max_block_num", total),
                           ("available_resource", free / total if total else 0.0)):
            m.add_sample(SEED_FAMILY, {key: key}, float(value))
        yield m


def build_registry(stats_source=None, max_age_s: float | None = None):
    """The registry /metrics serves: the front ends' multi-process files plus the engine collector."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    path = os.environ.get(ENV_MULTIPROC_DIR)
    if path and os.path.isdir(path):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry, path=path)
    else:
        log.warning("%s is not set (or not a directory): /metrics shows only the engine-side families; "
                    "the supervisor must set it before starting the front ends", ENV_MULTIPROC_DIR)
    if stats_source is not None:
        registry.register(EngineStatsCollector(stats_source, max_age_s))
    return registry


def _engine_address(cfg: Any) -> str:
    for name in ("engine_address", "engine_addr", "zmq_address"):
        v = getattr(cfg, name, None)
        if isinstance(v, str) and v:
            return v
        if callable(v):
            return v()
    port = getattr(cfg, "infer_queue_port", None) or getattr(cfg, "INFER_QUEUE_PORT", None) or 56666
    return f"tcp://127.0.0.1:{int(port)}"


def make_app(client=None, max_age_s: float | None = None):
    """The metrics ASGI app; `client` is an AsyncEngineClient whose stats feed the engine-side families."""
    from fastapi import FastAPI
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = build_registry((lambda: client.stats) if client is not None else None, max_age_s)
    app = FastAPI(title="Kiln metrics", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    def metrics() -> Response:  # sync def: runs in a thread, never blocks the client's reader
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    def root() -> Response:
        return Response("Kiln metrics: GET /metrics\n", media_type="text/plain")

    return app


def run(cfg: Any) -> None:
    """Process entry point (the supervisor spawns it): serve /metrics on cfg.metrics_port."""
    import asyncio

    import uvicorn

    from kiln.engine.client import AsyncEngineClient

    if not logging.getLogger().handlers:  # the supervisor's _component_main normally set it up
        try:
            from kiln.config import setup_logging

            setup_logging(cfg, "kiln-metrics")
        except Exception:  # noqa: BLE001 - logging must not stop the metrics server
            logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    port = int(getattr(cfg, "metrics_port"))
    host = getattr(cfg, "host", None) or "0.0.0.0"
    max_age = float(getattr(cfg, "check_health_interval", 0) or 0) or None

    async def main() -> None:
        from kiln.server.auth import ApiKeyMiddleware, ApiKeys

        client = AsyncEngineClient(_engine_address(cfg), cfg.engine_secret)
        await client.start()
        app = ApiKeyMiddleware(make_app(client, max_age), ApiKeys.for_metrics(cfg), open_paths=())
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                               lifespan="off"))
        try:
            await server.serve()
        finally:
            await client.close()

    asyncio.run(main())
