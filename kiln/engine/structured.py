"""Structured outputs (guided decoding) through xgrammar: everything that knows what a grammar is.

A request's `SamplingParams.structured` is a `StructuredSpec` (kind + text). The engine compiles it against the
model's vocabulary off the engine loop (`GrammarCompiler`: a thread pool, a cache keyed by the spec, a time
limit); the request waits outside the scheduler meanwhile. Once scheduled, its `RequestGrammar` (an xgrammar
matcher) gives the sampler a token bitmask per step and advances with every sampled token; a matcher that has
accepted a stop token ends the request ("stop"). Under async scheduling a step with grammar rows is sampled only
after the previous step's ids are accepted (EngineCore._sample), its forward already queued. The front end
validates a spec with `grammar_of` before the engine sees it.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch
    import xgrammar

    from kiln.engine.request import Request

log = logging.getLogger("kiln.structured")

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


class StructuredSpec(NamedTuple):
    """What the output must match. `value`: the JSON schema as compact JSON text (json_schema), the regex,
    the choices as a JSON array text (choice), the EBNF/GBNF text (grammar), "" (json_object: any JSON object).
    A tuple of two strings: hashable (the compile cache's key) and msgpack-able (the ZMQ wire)."""

    kind: str
    value: str

    @classmethod
    def coerce(cls, spec: Any) -> "StructuredSpec | None":
        """None, a spec, or its wire form ([kind, value] or {"kind":, "value":}) -> a checked spec."""
        if spec is None:
            return None
        if isinstance(spec, dict):
            spec = (spec.get("kind"), spec.get("value", ""))
        if not (isinstance(spec, (list, tuple)) and len(spec) == 2):
            raise ValueError(f"structured must be (kind, value), got {spec!r}")
        kind, value = spec
        if kind not in KINDS:
            raise ValueError(f"structured kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not isinstance(value, str):
            raise ValueError(f"structured value must be a string, got {type(value).__name__}")
        return cls(kind, value)

    @classmethod
    def json_schema(cls, schema: dict | str) -> "StructuredSpec":
        if isinstance(schema, str):
            schema = json.loads(schema)
        # key order kept: it is the order the properties are generated in
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def choice(cls, choices: list[str]) -> "StructuredSpec":
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))


class GrammarError(ValueError):
    """The spec is not a valid schema / regex / grammar (the message says what is wrong)."""


_XGR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")


def grammar_error(spec: StructuredSpec, e: Exception) -> GrammarError:
    """xgrammar's message without its C++ source location, naming what was being converted."""
    msg = _XGR_PREFIX.sub("", str(e).strip()).strip()
    what = {"json_schema": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
            "choice": "choice", "grammar": "grammar (EBNF)"}[spec.kind]
    return GrammarError(f"invalid {what}: {msg}")


def grammar_of(spec: StructuredSpec) -> "xgrammar.Grammar":
    """The spec as an xgrammar Grammar (no tokenizer needed: cheap, and what the front end validates with).
    JSON is compact (no free whitespace): small models otherwise tend to emit whitespace until max_tokens."""
    import xgrammar as xgr

    try:
        if spec.kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if spec.kind == "json_schema":
            return xgr.Grammar.from_json_schema(spec.value, any_whitespace=False)
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.value)
        if spec.kind == "choice":
            choices = json.loads(spec.value)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise GrammarError("invalid choice: give a non-empty list of non-empty strings")
            # a JSON string literal is a valid EBNF string literal (same escapes)
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                   for c in choices))
        return xgr.Grammar.from_ebnf(spec.value)
    except GrammarError:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError / ValueError / its own types
        raise grammar_error(spec, e) from None


class GrammarCompiler:
    """Compiles specs against the model's vocabulary on worker threads (xgrammar releases the GIL), one
    future per distinct spec (an LRU of `cache_size`). The tokenizer info is built once, on first use."""

    def __init__(self, model_dir: str, vocab_size: int, stop_token_ids: list[int], max_workers: int = 2,
                 cache_size: int = 256):
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kiln-grammar")
        self._cache: OrderedDict[StructuredSpec, Future] = OrderedDict()
        self._compiler = None
        self._compiler_lock = threading.Lock()

    def _xgr_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                from pathlib import Path

                import xgrammar as xgr

                from kiln.tokenizer import load_hf_tokenizer
                try:
                    hf = load_hf_tokenizer(Path(self.model_dir))
                except Exception as e:  # noqa: BLE001
                    raise GrammarError(f"structured outputs need the model's tokenizer, which did not load: {e}")
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def _compile(self, spec: StructuredSpec) -> "xgrammar.CompiledGrammar":
        grammar = grammar_of(spec)
        compiler = self._xgr_compiler()
        try:
            return compiler.compile_grammar(grammar)
        except Exception as e:  # noqa: BLE001
            raise grammar_error(spec, e) from None

    def submit(self, spec: StructuredSpec) -> Future:
        """The spec's compiled grammar, now or later. A failed compile stays cached (it would fail again)."""
        fut = self._cache.get(spec)
        if fut is not None:
            self._cache.move_to_end(spec)
            return fut
        fut = self._pool.submit(self._compile, spec)
        self._cache[spec] = fut
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return fut

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RequestGrammar:
    """One request's position in its grammar."""

    def __init__(self, compiled: "xgrammar.CompiledGrammar", stop_token_ids: frozenset[int]):
        import xgrammar as xgr

        # the request's own end-of-sequence ids end the grammar (the front end may add some to the model's)
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids) or None)
        self.rejected_token: int | None = None   # a sampled token the grammar did not allow (a bug if ever set)

    def accept(self, token_id: int) -> None:
        if self.rejected_token is None and not self.matcher.accept_token(token_id):
            self.rejected_token = token_id
            log.error("sampled token %d is not allowed by the request's grammar", token_id)

    @property
    def terminated(self) -> bool:
        """The output is complete and a stop token was accepted."""
        return self.matcher.is_terminated()


class GrammarMasks:
    """Applies the grammar rows' token bitmasks to a step's logits, in place on the logits' device. The host
    bitmask is allocated once and reused (on CUDA: two pinned buffers used in turn, a buffer refilled only once
    its last copy to the device has run), and more than `batch_threshold` rows are filled by xgrammar's
    BatchGrammarMatcher on several threads (a row costs ~50-150 us with a 128k vocabulary). Rows without a
    grammar are untouched."""

    def __init__(self, batch_threshold: int = 4, max_threads: int | str = "auto"):
        self.batch_threshold = batch_threshold
        self.max_threads = max_threads
        self._host: list = [None, None]
        self._copied: list = [None, None]
        self._turn = 0
        self._batch_matcher = None

    def _buffer(self, rows: int, width: int, pinned: bool) -> "torch.Tensor":
        import torch

        k = self._turn = 1 - self._turn if pinned else 0
        if pinned and self._copied[k] is not None:
            self._copied[k].synchronize()  # two steps ago: long done
        buf = self._host[k]
        if buf is None or buf.shape[0] < rows or buf.shape[1] != width:
            buf = self._host[k] = torch.empty(max(rows, 2 * (0 if buf is None else buf.shape[0])), width,
                                              dtype=torch.int32, pin_memory=pinned)
        return buf[:rows]

    def apply(self, logits: "torch.Tensor", reqs: list["Request"]) -> None:
        import torch
        import xgrammar as xgr

        from kiln.engine.request import RequestStatus

        # a request finished since its row was scheduled (its grammar ended, an abort) samples a dropped token
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and r.status != RequestStatus.FINISHED]
        if not rows:
            return
        cuda = logits.is_cuda
        bitmask = self._buffer(logits.shape[0], xgr.get_bitmask_shape(1, logits.shape[1])[1], cuda)
        matchers = [reqs[i].grammar.matcher for i in rows]
        if len(rows) > self.batch_threshold:
            if self._batch_matcher is None:
                self._batch_matcher = xgr.BatchGrammarMatcher(self.max_threads)
            self._batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        else:
            for i, m in zip(rows, matchers):
                m.fill_next_token_bitmask(bitmask, i)
        if cuda:
            bitmask = bitmask.to(logits.device, non_blocking=True)
            self._copied[self._turn] = torch.cuda.Event()
            self._copied[self._turn].record()
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)


class PendingGrammars:
    """Requests whose grammar is still compiling: they wait here, outside the scheduler, so the others run.
    Each gets `timeout_s` from its arrival (queueing for a worker included); past that it fails alone."""

    def __init__(self, compiler: GrammarCompiler, timeout_s: float):
        self.compiler = compiler
        self.timeout_s = timeout_s
        self._waiting: dict[str, tuple["Request", Future, float]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, req: "Request") -> None:
        fut = self.compiler.submit(req.params.structured)
        self._waiting[req.request_id] = (req, fut, time.monotonic() + self.timeout_s)

    def discard(self, request_id: str) -> bool:
        return self._waiting.pop(request_id, None) is not None

    def wait(self, timeout_s: float) -> None:
        """Sleep until a compile finishes or timeout_s passes (the engine has nothing else to do)."""
        futures.wait([f for _, f, _ in self._waiting.values()], timeout=timeout_s,
                     return_when=futures.FIRST_COMPLETED)

    def pop_done(self) -> tuple[list["Request"], list[tuple["Request", str]]]:
        """(requests now ready to schedule, with their matcher set; (request, why) for those that failed)."""
        ready, failed = [], []
        now = time.monotonic()
        for rid, (req, fut, deadline) in list(self._waiting.items()):
            if fut.done():
                del self._waiting[rid]
                e = fut.exception()
                if e is None:
                    req.grammar = RequestGrammar(fut.result(), req.eos_token_ids)
                    ready.append(req)
                else:
                    if not isinstance(e, GrammarError):
                        log.error("grammar compile failed: %r", e)
                    failed.append((req, str(e) if isinstance(e, GrammarError) else f"the grammar failed to "
                                   f"compile: {type(e).__name__}"))
            elif now > deadline:
                del self._waiting[rid]
                failed.append((req, f"the {req.params.structured.kind} did not compile within the time limit "
                               f"({self.timeout_s:g} s, KILN_GRAMMAR_COMPILE_TIMEOUT): simplify it"))
        return ready, failed
