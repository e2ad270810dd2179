"""What every front end (native HTTP, OpenAI, gRPC) shares on a request's way: the tokenizer, the engine
client, the limits, one token stream per request (detokenized, stop strings, whole-request timeout, abort on
early exit), the per-request log line and the observer hooks that metrics plug into.

Nothing here knows HTTP: errors are `kiln.errors.RequestError`s, whose kind each protocol maps to its own
status (the tables in kiln/errors.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from kiln.config import KilnConfig
from kiln.engine.output_processor import OutputProcessor, TokenEvent
from kiln.engine.request import SamplingParams
from kiln.errors import SEED_CODE_TIMEOUT, ErrorKind, RequestError, as_kind, seed_message
from kiln.layers.lora import parse_lora_modules
from kiln.server.sampling import Limits

log = logging.getLogger("kiln.frontend")
request_log = logging.getLogger("kiln.requests")

# ----------------------------------------------------------------------------------------------------
# observers (metrics hook point)
# ----------------------------------------------------------------------------------------------------

@dataclass
class RequestRecord:
    """Everything known about one request when it ends (handed to observers and the request log)."""

    request_id: str
    api: str                               # "native" | "completions" | "chat" | "grpc"
    arrival_time: float                    # time.time()
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    first_token_time: float | None = None  # time.time()
    end_time: float | None = None
    finish_reason: str | None = None       # stop | length | abort | error | timeout
    error_type: str | None = None
    error: str | None = None
    queue_time_s: float | None = None      # engine-reported: arrival in the engine to first scheduling

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_time is None else self.end_time - self.arrival_time


class RequestObserver:
    """Hooks called on the request path (all no-ops here; metrics subclass it). Calls are synchronous and run
    on the event loop: keep them cheap and never raise."""

    def on_request(self, record: RequestRecord) -> None:
        """The engine accepted the request (called with its first output)."""

    def on_first_token(self, record: RequestRecord, ttft_s: float) -> None:
        """First output token (time to first token, from arrival)."""

    def on_token(self, record: RequestRecord, num_tokens: int, itl_s: float) -> None:
        """Further output tokens; itl_s = time since the previous ones (inter-token latency)."""

    def on_finish(self, record: RequestRecord) -> None:
        """The request ended (any reason, rejections included); record.finish_reason says how."""


class _Observers(RequestObserver):
    def __init__(self, observers: Sequence[RequestObserver]):
        self.observers = list(observers)

    def _call(self, name: str, *args: Any) -> None:
        for o in self.observers:
            try:
                getattr(o, name)(*args)
            except Exception as e:  # noqa: BLE001 - an observer must never break a request
                log.debug("observer %s.%s failed: %s", type(o).__name__, name, e)

    def on_request(self, record):
        self._call("on_request", record)

    def on_first_token(self, record, ttft_s):
        self._call("on_first_token", record, ttft_s)

    def on_token(self, record, num_tokens, itl_s):
        self._call("on_token", record, num_tokens, itl_s)

    def on_finish(self, record):
        self._call("on_finish", record)


class RequestLogObserver(RequestObserver):
    """One line per request in FD_LOG_DIR/requests.log."""

    def on_finish(self, r: RequestRecord) -> None:
        ttft = "-" if r.ttft_s is None else f"{r.ttft_s:.3f}"
        e2e = "-" if r.e2e_s is None else f"{r.e2e_s:.3f}"
        decode = None
        if r.first_token_time is not None and r.end_time is not None and r.num_output_tokens > 1:
            decode = (r.num_output_tokens - 1) / max(r.end_time - r.first_token_time, 1e-9)
        # the server-side split of a request (kiln bench serve reads it): queue = the engine's arrival to first
        # scheduling; prefill = the rest of the server's TTFT; decode = first token to the end
        def secs(v: float | None) -> str:
            return "-" if v is None else f"{v:.4f}"
        queue = r.queue_time_s
        prefill = None if r.ttft_s is None else r.ttft_s - (queue or 0.0)
        decode_s = None if r.first_token_time is None or r.end_time is None else r.end_time - r.first_token_time
        line = (f"req_id={r.request_id} api={r.api} prompt_tokens={r.num_prompt_tokens} "
                f"output_tokens={r.num_output_tokens} ttft_s={ttft} e2e_s={e2e} "
                f"decode_tok_s={'-' if decode is None else f'{decode:.1f}'} finish_reason={r.finish_reason} "
                f"queue_s={secs(queue)} prefill_s={secs(prefill)} decode_s={secs(decode_s)}")
        if r.error:
            line += f" error_type={r.error_type} error={r.error!r}"
        request_log.info(line)


_extra_observers: list[RequestObserver] = []


def register_observer(observer: RequestObserver) -> None:
    """Add an observer to every Frontend created afterwards in this process."""
    _extra_observers.append(observer)


def _default_observers(cfg: KilnConfig) -> list[RequestObserver]:
    obs: list[RequestObserver] = [RequestLogObserver()]
    # The metrics module (issue #4) may provide `make_request_observer(cfg) -> RequestObserver`.
    try:
        from kiln.server import metrics as _metrics  # type: ignore
        make = getattr(_metrics, "make_request_observer", None)
        if make is not None and cfg.metrics_enabled:
            o = make(cfg)
            if o is not None:
                obs.append(o)
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001
        log.warning("metrics request observer not available: %s", e)
    return obs + list(_extra_observers)


# ----------------------------------------------------------------------------------------------------
# one request's token stream
# ----------------------------------------------------------------------------------------------------

@dataclass
class GenerationState:
    """Final facts of a stream, filled as it runs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Frontend:
    """Per-process front-end context. `await Frontend.start(cfg)` loads the tokenizer and connects to the
    engine core at cfg.engine_address."""

    def __init__(self, cfg: KilnConfig, tokenizer: Any, client: Any, observers: Sequence[RequestObserver] = ()):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.client = client
        self.observer = _Observers(observers)
        self.max_seq_len = cfg.max_seq_len
        self.max_dec_len = cfg.max_dec_len
        self.eos_token_ids = list(getattr(tokenizer, "eos_token_ids", []) or [])
        self.model_name = cfg.model_name
        self._configured_lora = parse_lora_modules(cfg.lora_modules)
        self.created = int(time.time())
        self.shutting_down = False
        self._bg: set[asyncio.Task] = set()
        self._tokenizer_thread: concurrent.futures.ThreadPoolExecutor | None = None

    @classmethod
    async def start(cls, cfg: KilnConfig, observers: Sequence[RequestObserver] | None = None) -> "Frontend":
        from kiln.engine.client import AsyncEngineClient
        from kiln.tokenizer import Tokenizer

        if cfg.model_path is None:
            cfg.resolve()
        loop = asyncio.get_running_loop()
        tokenizer = await loop.run_in_executor(None, Tokenizer.from_dir, cfg.model_path)
        client = AsyncEngineClient(cfg.engine_address, cfg.engine_secret)
        await client.start()
        return cls(cfg, tokenizer, client, _default_observers(cfg) if observers is None else observers)

    async def close(self) -> None:
        for t in list(self._bg):
            try:
                await asyncio.wait_for(asyncio.shield(t), 1.0)
            except Exception:  # noqa: BLE001
                pass
        await self.client.close()

    # -- health -----------------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, int, str]:
        """(ready, seed health error code, message) as seen from this process."""
        if self.shutting_down:
            return False, 1, "server is not ready"
        fatal = getattr(self.client, "fatal", None)
        stats = getattr(self.client, "stats", None)
        if fatal or stats is None or not stats.ready:
            return False, 2, "infer engine is down"
        if time.time() - stats.timestamp > self.cfg.check_health_interval:
            return False, 3, "infer engine hangs"
        return True, 0, ""

    @property
    def lora_modules(self) -> dict[str, str]:
        """The LoRA adapters served, name -> path (an OpenAI `model` picks one): the engine's list once it is
        ready, which adapters loaded while serving join; KILN_LORA_MODULES' before."""
        stats = getattr(self.client, "stats", None)
        adapters = getattr(stats, "lora_adapters", None)
        return adapters if adapters is not None and stats.ready else self._configured_lora

    async def update_lora(self, name: str, load: bool, path: str = "") -> None:
        """Load (or unload) a LoRA adapter while serving; RequestError says why it could not."""
        out = await self.client.update_lora(self.new_id("lora-"), name, load, path)
        if out.error is not None:
            raise RequestError(out.error, out.error_type or ErrorKind.INTERNAL)

    def check_accepting(self) -> None:
        """Every API refuses new requests the same way once the server is shutting down."""
        if self.shutting_down:
            raise RequestError("the server is shutting down", ErrorKind.NOT_READY)

    # -- helpers ----------------------------------------------------------------------------------------
    # Prompts up to this many characters are tokenized inline (faster than a thread hop); longer ones on
    # the tokenizer thread, so a large prompt never stalls the other requests on the event loop.
    INLINE_TOKENIZE_CHARS = 8192

    async def run_tokenizer(self, fn, *args, size: int = 0) -> Any:
        """fn(*args) (tokenizer work on `size` characters), off the event loop when large. One thread: large
        prompts queue behind each other instead of taking every core from the event loop."""
        if size <= self.INLINE_TOKENIZE_CHARS:
            return fn(*args)
        if self._tokenizer_thread is None:
            self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kiln-tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    @staticmethod
    def new_id(prefix: str = "") -> str:
        return f"{prefix}{uuid.uuid4().hex}"

    def spawn(self, coro) -> None:
        """Run a coroutine detached from the caller's task (so it survives the caller's cancellation)."""
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    def _cleanup(self, request_id: str, gen: Any) -> None:
        async def run():
            try:
                await gen.aclose()
            except BaseException:  # noqa: BLE001 - already running / already closed
                pass
            try:
                await self.client.abort(request_id)
            except BaseException:  # noqa: BLE001
                pass
        self.spawn(run())

    def new_record(self, request_id: str, api: str, arrival_time: float | None = None) -> RequestRecord:
        return RequestRecord(request_id, api, arrival_time or time.time())

    def reject(self, record: RequestRecord, err: RequestError) -> None:
        """Account for a request that failed before (or without) reaching the engine."""
        record.end_time = time.time()
        record.finish_reason = "error"
        record.error_type = err.error_type
        record.error = err.message
        self.observer.on_finish(record)

    def token_text(self, token_id: int) -> str:
        """Text of one token for logprobs output (a lone byte-fallback token keeps its raw form)."""
        s = self.tokenizer.decode([token_id], skip_special_tokens=False)
        if s == "" or "\ufffd" in s:
            toks = self.tokenizer.convert_ids_to_tokens([token_id])
            return toks[0] if toks and toks[0] is not None else s
        return s

    async def _wait_engine_ready(self, deadline: float | None) -> Any:
        """The engine's stats once it is ready: requests that arrive while the model loads wait for it (within
        their deadline). Raises RequestError (not_ready) when it is down or not ready in time."""
        stats = getattr(self.client, "stats", None)
        if stats is not None and stats.ready and not getattr(self.client, "fatal", None):
            return stats
        try:
            timeout = 600.0 if deadline is None else max(0.0, deadline - time.monotonic())
            return await self.client.wait_ready(timeout)
        except TimeoutError:
            raise RequestError("the model is still loading: the engine was not ready within the request's "
                               "timeout", ErrorKind.NOT_READY, SEED_CODE_TIMEOUT) from None
        except Exception as e:  # noqa: BLE001 - EngineDeadError
            raise RequestError(f"infer engine is down: {e}", ErrorKind.NOT_READY) from None

    @property
    def max_model_len(self) -> int | None:
        """Prompt + new tokens per sequence, as the engine publishes it (None until it has)."""
        stats = getattr(self.client, "stats", None)
        return stats.max_model_len if stats is not None and stats.max_model_len else None

    async def limits(self, timeout: float | None = None) -> Limits:
        """The length limits a request is checked against: MAX_SEQ_LEN and MAX_DEC_LEN (this server's
        settings) and the engine's max_model_len, waiting up to `timeout` s for an engine that is loading."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stats = await self._wait_engine_ready(deadline)
        return Limits(self.max_seq_len, self.max_dec_len, stats.max_model_len, stats.embedding_size)

    # -- the stream ------------------------------------------------------------------------------------
    async def stream(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                     record: RequestRecord, eos_token_ids: Sequence[int] = (), deadline: float | None = None,
                     skip_special_tokens: bool = True, include_stop_str_in_output: bool = False,
                     state: GenerationState | None = None, timeout_s: float | None = None
                     ) -> AsyncIterator[TokenEvent]:
        """Run one request in the engine; yield a TokenEvent per output token, the last one finished.

        Raises RequestError on rejection (queue full, duplicate id, too long...), engine failure and on the
        deadline (time.monotonic()) passing; leaving early (break, close, cancellation) aborts the request in
        the engine at once."""
        processor = OutputProcessor(self.tokenizer, prompt_token_ids, params, skip_special_tokens=skip_special_tokens,
                                    include_stop_str_in_output=include_stop_str_in_output)
        eos = list(dict.fromkeys(list(eos_token_ids) + self.eos_token_ids))
        state = state if state is not None else GenerationState()
        record.num_prompt_tokens = len(prompt_token_ids)
        try:
            await self._wait_engine_ready(deadline)
        except RequestError as e:
            self.reject(record, e)
            raise
        gen = self.client.generate(request_id, prompt_token_ids, params, eos, deadline=deadline)
        engine_done = False
        last_t = None
        started = False
        try:
            while True:
                out = await gen.__anext__()  # raises asyncio.TimeoutError past the deadline
                engine_done = out.finished
                if out.finish_reason == "error":
                    kind = as_kind(out.error_type)
                    raise RequestError(seed_message(kind, out.error, out.error_args), kind)
                if not started:
                    started = True
                    self.observer.on_request(record)
                ids = out.new_token_ids or []
                now = time.time()
                if ids:
                    if record.first_token_time is None:
                        record.first_token_time = now
                        if out.queue_time is not None:
                            record.queue_time_s = out.queue_time
                        self.observer.on_first_token(record, now - record.arrival_time)
                        if len(ids) > 1:
                            self.observer.on_token(record, len(ids) - 1, 0.0)
                    else:
                        self.observer.on_token(record, len(ids), now - (last_t or now))
                    last_t = now
                for ev in processor.process(out):
                    record.num_output_tokens = ev.num_output_tokens
                    state.token_ids.extend(ev.token_ids)
                    if ev.finished:
                        # a stop string ends it before the engine does (engine_done stays False): the finally
                        # below aborts it there
                        state.text, state.finish_reason = processor.text, ev.finish_reason
                    yield ev
                    if ev.finished:
                        return
        except asyncio.TimeoutError:
            t = f" of {timeout_s:g} s" if timeout_s else ""
            err = RequestError(f"Timeout for getting inference result: the request's timeout{t} expired and "
                               f"it was cancelled", ErrorKind.TIMEOUT)
            record.finish_reason, record.error, record.error_type = "timeout", err.message, err.error_type
            raise err from None
        except StopAsyncIteration:
            err = RequestError("the engine ended the request without a result", ErrorKind.INTERNAL)
            record.error, record.error_type = err.message, err.error_type
            raise err from None
        except RequestError as e:
            record.error, record.error_type = e.message, e.error_type
            raise
        finally:
            if not engine_done:
                self._cleanup(request_id, gen)
            record.end_time = time.time()
            if record.finish_reason is None:
                if record.error_type:
                    record.finish_reason = "error"
                else:
                    record.finish_reason = state.finish_reason or "abort"
            self.observer.on_finish(record)


async def merge_streams(streams: Sequence[AsyncIterator[TokenEvent]]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Interleave several request streams (n > 1, several prompts): yields (index, event). The first
    RequestError cancels the others and is raised."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, s):
        try:
            async for ev in s:
                await q.put((i, ev))
            await q.put((i, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await q.put((i, e))

    tasks = [asyncio.get_running_loop().create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await q.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                if isinstance(item, asyncio.CancelledError):
                    remaining -= 1
                    continue
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
