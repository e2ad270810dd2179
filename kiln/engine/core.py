"""The engine core: scheduler + runner in a loop, in-process (EngineCore) or as its own process over ZMQ.

Wire protocol: the typed messages of kiln/engine/wire.py over a ZMQ ROUTER socket (each front end is a DEALER):
  front end -> engine: Hello(secret, pid) | AddRequest | Abort   (nothing is served before a Hello with the
                       per-start secret)
  engine -> front end: Outputs | Stats | Fatal
Stats go to every front end that said hello, at least every HEARTBEAT_S: health checks read them.
"""
from __future__ import annotations

import hmac
import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass

from kiln.engine.config import EngineConfig
from kiln.engine.cuda_graph import batch_size_ladder
from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.request import (
    EngineOutput,
    EngineStats,
    FinishReason,
    Request,
    RequestStatus,
    RequestTotals,
    SamplingParams,
)
from kiln.engine.runner import PromptLogprobs
from kiln.engine.sampler import PendingSample, Sampler
from kiln.engine.scheduler import ScheduledBatch, Scheduler
from kiln.engine.speculative import NgramProposer, SpecDecodeStats, SpeculativeConfig, confirmed
from kiln.engine.structured import GrammarCompiler, PendingGrammars
from kiln.engine.variants import CompileWatch, VariantLog, compiled_triton_kernels
from kiln.engine.wire import (Abort, AddRequest, Fatal, Hello, LoRAUpdate, Message, Outputs, Stats, WireError, decode,
                              encode)
from kiln.errors import ErrorKind
from kiln.threads import follow_free_cores

log = logging.getLogger("kiln.engine")

HEARTBEAT_S = 0.5
GiB = 1 << 30


@dataclass
class InFlightStep:
    """A step the runner has queued whose sampled ids are not on the host yet."""
    batch: ScheduledBatch
    sampling: list[Request]     # the requests that sample this step, in the order of the sampled ids
    slots: list[int]            # where each one's token goes in its output list
    rows: list[int]             # sampled rows of each (1, or 1 + its draft tokens when it speculates)
    sample: PendingSample | None
    logits: object = None       # torch.Tensor: logits still to sample (grammar rows wait for the previous ids)
    prompt: PromptLogprobs | None = None  # the prompt logprobs the step computes
    embeddings: object = None   # (embedding requests, their answers [rows, hidden] on the device) or None


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: /proc), None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def warmup_enabled(setting: bool | None, device_type: str) -> bool:
    """USE_WARMUP: unset means on with a GPU (the first requests would otherwise compile kernels: 1.8 s for the
    first one on an H100), off on CPU (nothing compiles there, and start-up stays short)."""
    return setting if setting is not None else device_type == "cuda"


class EngineCore:
    """Owns the model runner and the scheduler; `step()` runs one batch and returns the new tokens.

    With async scheduling (default on CUDA) a step queues the next batch on the GPU before it
    collects the previous batch's ids, so the host's work (scheduling, inputs, outputs) hides behind the GPU's;
    outputs then come one step later. Steps run synchronously while speculative decoding may draft and while a
    request with penalties is running (they read the whole output on the host). A step with grammar rows still
    overlaps: its forward is queued first, then the previous step's ids are collected and accepted into the
    matchers (their masks are filled while the GPU runs the forward), then it is sampled. Under tensor parallelism
    rank 0 sends its sampled ids to the other ranks with the step that reads them (kiln/engine/tp.py).
    """

    def __init__(self, cfg: EngineConfig, imports_s: float | None = None):
        """imports_s: the engine process's time from its start to here (the interpreter, torch's and Kiln's imports),
        logged as the first start-up phase."""
        from kiln.engine.tp import TPGroup, build_runner
        from kiln.models.default_model import resolve_model_path

        self.cfg = cfg
        self.model_dir = str(resolve_model_path(cfg.model))
        if not cfg.max_num_batched_tokens:
            cfg.max_num_batched_tokens = max(2048, cfg.max_num_seqs)
        self.tp = TPGroup(cfg, self.model_dir) if cfg.tensor_parallel_size > 1 else None
        self.max_num_batched_tokens = cfg.max_num_batched_tokens
        self.runner, num_blocks, why = build_runner(cfg, self.model_dir)
        self.runner.tp_group = self.tp
        mc = self.runner.model_config
        self.max_model_len = self.runner.max_model_len()
        self.kv = KVCacheManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.speculative = SpeculativeConfig.parse(cfg.speculative_config)
        self.spec_stats = SpecDecodeStats()
        self.spec_quiet = 0              # synchronous steps in a row that drafted nothing (_pace_drafting)
        self.spec_overlap_until = 0      # steps before this one overlap without drafting
        self.spec_backoff = self.SPEC_OVERLAP_STEPS[0]
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, self.max_num_batched_tokens, self.max_model_len,
                                   cfg.max_prefill_tokens, reserve_ratio=cfg.kv_reserve_ratio,
                                   proposer=NgramProposer(self.speculative) if self.speculative else None,
                                   policy=cfg.scheduling_policy)
        if self.speculative:
            log.info("speculative decoding: %s (steps that may draft run synchronously)", self.speculative.describe())
        self.requests: dict[str, Request] = {}
        self.num_steps = 0
        self.num_overlapped_steps = 0  # steps queued while the previous one was still in flight
        self.num_refused = 0           # requests refused with a full queue
        self.totals = RequestTotals()  # requests ended since ready (KServe's model statistics)
        self.num_warmup_steps = 0
        self.inflight: InFlightStep | None = None
        self.last_collected: ScheduledBatch | None = None  # the batch whose results step() last returned
        a = cfg.async_scheduling
        self.async_scheduling = self.runner.device.type == "cuda" if a is None else a
        self.on_cpu = self.runner.device.type == "cpu"  # auto CPU threads follow the free cores
        self.eos_token_ids = list(mc.eos_token_ids)
        # structured-output requests wait here while their grammar compiles (off this loop)
        self.grammars = PendingGrammars(GrammarCompiler(self.model_dir, mc.vocab_size, self.eos_token_ids),
                                        cfg.grammar_compile_timeout)
        self._log_budget(why)
        self.variants = VariantLog(cfg.max_num_seqs)  # what steps have run: the warm-up's checklist
        self.compile_watch = CompileWatch().install()  # names any kernel compiled after ready
        self.compile_watch.warmed_up = warmup_enabled(cfg.warmup, self.runner.device.type)
        if self.compile_watch.warmed_up:
            t0 = time.monotonic()
            self.warmup()
            self.runner.startup_seconds["warm-up"] = time.monotonic() - t0
        self.compile_watch.ready = True
        # where start to ready goes (the model runner's time includes its weights and CUDA's start)
        phases = ({} if imports_s is None else {"process start and imports": imports_s}) | self.runner.startup_seconds
        log.info("start-up: %s", ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))

    def _log_budget(self, why: str) -> None:
        r, bs = self.runner, self.cfg.block_size
        tokens = self.kv.num_blocks * bs
        per_seq = -(-self.max_model_len // bs)
        log.info("model %s (%s) on %s, %s, loaded in %.1f s; weights %.2f GiB", self.model_dir,
                 r.model_config.architecture, r.device, r.dtype, r.load_seconds, r.weight_bytes / GiB)
        act = getattr(r, "activation_peak_bytes", None)
        log.info("KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%s, %s); activation peak %s; "
                 "fits %d sequences of max length %d; batch %d, %d tokens per step",
                 self.kv.num_blocks, bs, tokens, self.kv.num_blocks * r.bytes_per_block() / GiB,
                 r.kv_cache_dtype if r.kv_cache_dtype != "auto" else str(r.dtype).replace("torch.", ""), why,
                 "n/a" if act is None else f"{act / GiB:.2f} GiB", self.kv.num_blocks // per_seq,
                 self.max_model_len, self.cfg.max_num_seqs, self.max_num_batched_tokens)

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    eos_token_ids: list[int] | None = None) -> EngineOutput | None:
        """Queue a request; returns an error output instead when it is rejected."""
        def reject(msg: str, kind: ErrorKind, **args):
            self.totals.record(None, failed=True)
            return EngineOutput(request_id, [], True, FinishReason.ERROR.value, len(prompt_token_ids),
                                error=msg, error_type=kind, error_args=args or None)

        if request_id in self.requests:
            return reject(f"request id {request_id!r} already exists among the engine's requests",
                          ErrorKind.DUPLICATE_ID, why="duplicate_id", request_id=request_id)
        num_waiting = len(self.scheduler.waiting) + len(self.grammars)
        if num_waiting >= self.cfg.max_waiting:
            self.num_refused += 1
            return reject(f"{num_waiting} requests are waiting, the limit (MAX_CACHED_TASK_NUM) is "
                          f"{self.cfg.max_waiting}", ErrorKind.QUEUE_FULL, why="queue_full", waiting=num_waiting,
                          limit=self.cfg.max_waiting)
        if not prompt_token_ids:
            return reject("the prompt is empty: give at least one token", ErrorKind.INVALID)
        # every field the step will read is checked here, so a bad request is refused alone, never mid-step
        try:
            params.validate()
        except (ValueError, TypeError) as e:
            return reject(f"invalid sampling parameters: {e}", ErrorKind.INVALID)
        if params.embed and (params.prompt_logprobs is not None or params.structured is not None):
            return reject("an embedding request takes no prompt_logprobs and no structured output", ErrorKind.INVALID)
        if params.priority and self.scheduler.policy != "priority":
            return reject(f"priority {params.priority} needs the priority scheduling policy: start the server with "
                          f"KILN_SCHEDULING_POLICY=priority (--scheduling-policy priority)", ErrorKind.INVALID)
        lora_index = 0
        if params.lora_name is not None:
            lora = self.runner.lora
            lora_index = lora.index.get(params.lora_name, 0) if lora is not None else 0
            if not lora_index:
                loaded = ", ".join(lora.index) if lora and lora.index else \
                    "none (KILN_LORA_MODULES, or POST /v1/load_lora_adapter, loads them)"
                return reject(f"unknown LoRA adapter {params.lora_name!r}; loaded: {loaded}", ErrorKind.INVALID)
        vocab = self.runner.model_config.vocab_size
        for name, ids in (("prompt", prompt_token_ids), ("stop_token_ids", params.stop_token_ids),
                          ("eos_token_ids", eos_token_ids or []), ("logit_bias", [t for t, _ in params.logit_bias])):
            bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
            if bad:
                return reject(f"{name}: token ids out of the vocabulary [0, {vocab}): {bad[:5]}", ErrorKind.INVALID)
        if len(prompt_token_ids) >= self.max_model_len:
            return reject(f"the prompt has {len(prompt_token_ids)} tokens, the model length is {self.max_model_len}: "
                          f"leave room for at least one new token", ErrorKind.TOO_LONG, why="model_length",
                          prompt_tokens=len(prompt_token_ids), max_model_len=self.max_model_len)
        eos = frozenset(self.eos_token_ids if eos_token_ids is None else set(eos_token_ids) | set(self.eos_token_ids))
        req = Request(request_id, prompt_token_ids, params, eos)
        req.lora_index = lora_index
        if self.scheduler.max_blocks_needed(req) > self.kv.num_blocks:
            needed = self.scheduler.max_blocks_needed(req)
            return reject(f"{req.num_prompt_tokens} prompt + {params.max_tokens} max new tokens need {needed} KV "
                          f"blocks, the cache has {self.kv.num_blocks}", ErrorKind.TOO_LONG, why="kv_blocks",
                          prompt_tokens=req.num_prompt_tokens, max_tokens=params.max_tokens, blocks_needed=needed,
                          num_blocks=self.kv.num_blocks)
        self.requests[request_id] = req
        if params.structured is not None:
            self.grammars.add(req)   # scheduled once its grammar is compiled (step() checks)
        else:
            self.scheduler.add(req)
        return None

    def abort(self, request_ids: list[str]) -> list[EngineOutput]:
        outs = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if not self.grammars.discard(rid):
                self.scheduler.finish(req)
            self.totals.record(req, failed=False)  # the client's wish (a stop string, a cancel): not a failure
            outs.append(EngineOutput(rid, [], True, FinishReason.ABORT.value, req.num_prompt_tokens))
        return outs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.inflight is not None or bool(self.grammars)

    def run_to_completion(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts together to the end, in this process; each one's new token ids (parity checks, benchmarks)."""
        for i, p in enumerate(prompts):
            err = self.add_request(str(i), p, params)
            assert err is None, err
        outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
        while self.has_unfinished():
            for o in self.step():
                outs[o.request_id] += o.new_token_ids
        return [outs[str(i)] for i in range(len(prompts))]

    # -- one step ------------------------------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        """Queue the next batch, then collect the step before it (async) or this one (sync)."""
        outs: list[EngineOutput] = self._admit_compiled()
        if self.async_scheduling and self.speculative is not None:
            self.scheduler.drafting_paused = self.num_steps < self.spec_overlap_until
        if self.inflight is not None and not self._may_overlap():
            outs += self._collect(self.inflight)
            self.inflight = None
        drafting = self.scheduler.drafting()
        batch = self.scheduler.schedule()
        if drafting and self.async_scheduling and batch:
            self._pace_drafting(batch.num_draft_tokens > 0)
        launched = None
        if batch:
            self.num_steps += 1
            if self.on_cpu:
                follow_free_cores(batch.total_tokens)
            launched = self._launch(batch, outs)
        if self.inflight is not None:
            if launched is not None:
                self.num_overlapped_steps += 1
            outs += self._collect(self.inflight)
            self.inflight = None
        if launched is not None and launched.logits is not None:
            self._sample(launched, outs)
        if launched is not None:
            if self.async_scheduling:
                self.inflight = launched
            else:
                outs += self._collect(launched)
        return outs

    # async scheduling with speculation: after this many synchronous steps in a row whose lookups drafted nothing,
    # steps overlap again for a while (4 steps, doubling up to 64 while still nothing is drafted): with nothing to
    # draft a synchronous step cost 9% at batch 1 on an H100 (run BA)
    SPEC_QUIET_STEPS = 4
    SPEC_OVERLAP_STEPS = (4, 64)

    def _pace_drafting(self, drafted: bool) -> None:
        if drafted:
            self.spec_quiet, self.spec_backoff = 0, self.SPEC_OVERLAP_STEPS[0]
            return
        self.spec_quiet += 1
        if self.spec_quiet >= self.SPEC_QUIET_STEPS:
            self.spec_overlap_until = self.num_steps + 1 + self.spec_backoff
            self.spec_backoff = min(2 * self.spec_backoff, self.SPEC_OVERLAP_STEPS[1])
            self.spec_quiet = 0

    def _may_overlap(self) -> bool:
        # penalties read the whole output on the host (a grammar's mask waits in _sample instead); drafts are
        # looked up in every known token, and a step's confirmed count moves the next step's positions (above
        # disable_by_batch_size nobody drafts: steps overlap again)
        return (self.async_scheduling and not self.scheduler.drafting()
                and not (self.inflight is not None and self.inflight.batch.num_draft_tokens)
                and not any(r.needs_output_history for r in self.scheduler.running))

    def _admit_compiled(self) -> list[EngineOutput]:
        """Requests whose grammar compiled go to the scheduler; those whose grammar failed or timed out end."""
        if not self.grammars:
            return []
        if not self.scheduler.has_work() and self.inflight is None:
            self.grammars.wait(0.01)  # nothing else to run: do not spin while compiling
        ready, failed = self.grammars.pop_done()
        for req in ready:
            self.scheduler.add(req)
        outs = []
        for req, why in failed:
            del self.requests[req.request_id]
            self.totals.record(req, failed=True)
            req.status = RequestStatus.FINISHED
            outs.append(EngineOutput(req.request_id, [], True, FinishReason.ERROR.value, req.num_prompt_tokens,
                                     error=why, error_type=ErrorKind.INVALID))
        return outs

    def _fail(self, reqs: list[Request], e: Exception | None = None) -> list[EngineOutput]:
        """A failed step must not hang anyone: fail its requests, keep serving. The exception goes to the log
        only: its text may name tensors, shapes or paths."""
        if e is not None:
            log.error("engine step failed: %s\n%s", e, traceback.format_exc())
        outs = []
        for req in reqs:
            if req.status == RequestStatus.FINISHED:
                continue
            self.scheduler.finish(req)
            self.requests.pop(req.request_id, None)
            self.totals.record(req, failed=True)
            outs.append(EngineOutput(req.request_id, [], True, FinishReason.ERROR.value, req.num_prompt_tokens,
                                     error="internal error in the engine while running this request (the server "
                                     "log has the details)", error_type=ErrorKind.INTERNAL))
        return outs

    def _launch(self, batch: ScheduledBatch, outs: list[EngineOutput]) -> InFlightStep | None:
        try:
            sampling, logits, prompt, embeddings = self.runner.launch(batch)
            # grammar rows' masks need the ids of the step in flight: sampled after it is collected (_sample)
            deferred = logits is not None and self.inflight is not None and any(r.grammar is not None
                                                                                 for r in sampling)
            sample = None if logits is None or deferred else self.runner.sample(logits, sampling)
        except Exception as e:  # noqa: BLE001
            outs += self._fail(batch.requests, e)
            return None
        self.variants.record_step(batch.num_tokens, batch.num_decode_rows, len(sampling), Sampler.paths(sampling),
                                  batch.num_draft_tokens)
        # sample is None for a step in which nobody samples (a middle chunk of a prefill: sampling is []) or
        # whose sampling is deferred (logits kept)
        return InFlightStep(batch, sampling, self.scheduler.launched(batch, sampling),
                            [r.num_sample_rows for r in sampling], sample, logits if deferred else None, prompt,
                            embeddings)

    def _sample(self, step: InFlightStep, outs: list[EngineOutput]) -> None:
        """Sample a step whose sampling waited for the previous step's ids (now accepted by the matchers)."""
        try:
            step.sample = self.runner.sample(step.logits, step.sampling)
        except Exception as e:  # noqa: BLE001
            outs += self._fail(step.batch.requests, e)
        step.logits = None

    def _collect(self, step: InFlightStep) -> list[EngineOutput]:
        self.last_collected = step.batch
        try:
            res = step.sample.result() if step.sample is not None else None
            unscored = self._take_prompt_logprobs(step.prompt) if step.prompt is not None else []
            embedded = step.embeddings[1].tolist() if step.embeddings is not None else []
        except Exception as e:  # noqa: BLE001 - e.g. a device error surfacing at the sync
            return self._fail(step.batch.requests, e)
        first_row = list(itertools.accumulate(step.rows, initial=0))  # each request's first sampled row
        # a request whose own sampling work failed ends alone (the sampler logged why); the others go on
        if res is not None and res.failed_rows:
            owner = [i for i, k in enumerate(step.rows) for _ in range(k)]
            outs = self._fail([step.sampling[i] for i in sorted({owner[row] for row in res.failed_rows})])
        else:
            outs = []
        outs += self._fail(unscored)
        # requests finished or aborted since the launch get nothing (their blocks are already back)
        live = [i for i, r in enumerate(step.sampling) if r.status != RequestStatus.FINISHED]
        sampling = [step.sampling[i] for i in live]
        slots = [step.slots[i] for i in live]
        toks = []  # each live request's new tokens
        for i, req in zip(live, sampling) if res is not None else ():
            sampled = res.token_ids[first_row[i]:first_row[i + 1]]
            if req.draft_token_ids:  # the drafts the samples confirm, then the sample after them
                n = confirmed(req.draft_token_ids, sampled)
                self.spec_stats.record(len(req.draft_token_ids), n)
                sampled = sampled[:n + 1]
            toks.append(sampled)
            if req.grammar is not None:
                req.grammar.accept(sampled[0])  # before resolve: a grammar that has ended ends its request
        self.scheduler.resolve(step.batch, sampling, slots, toks)
        for req, slot, i, sampled in zip(sampling, slots, live, toks):
            rid = req.request_id
            fin = req.status == RequestStatus.FINISHED
            new = req.output_token_ids[slot:slot + len(sampled)]  # fewer where a stop came among them
            lps = res.logprobs[first_row[i]:first_row[i] + len(new)]
            queue_time = (req.first_scheduled_time - req.arrival_time
                          if slot == 0 and req.first_scheduled_time is not None else None)
            out = EngineOutput(rid, new, fin, req.finish_reason.value if fin else None, req.num_prompt_tokens,
                               None if lps[0] is None else lps, queue_time=queue_time)
            if slot == 0 and req.params.prompt_logprobs is not None:  # with the first token
                out.prompt_logprobs = [None, *req.prompt_logprobs]
            outs.append(out)
            if fin:
                del self.requests[rid]
                self.totals.record(req, failed=False)
        # embedding requests end with their prompt's last step, their answer the vector
        for req, vector in zip(step.embeddings[0] if step.embeddings is not None else (), embedded):
            if req.status == RequestStatus.FINISHED:  # aborted since the launch
                continue
            req.finish_reason = FinishReason.STOP
            self.scheduler.finish(req)
            del self.requests[req.request_id]
            self.totals.record(req, failed=False)
            queue_time = (req.first_scheduled_time - req.arrival_time if req.first_scheduled_time is not None
                          else None)
            outs.append(EngineOutput(req.request_id, [], True, FinishReason.STOP.value, req.num_prompt_tokens,
                                     queue_time=queue_time, embedding=vector))
        return outs

    @staticmethod
    def _take_prompt_logprobs(prompt: PromptLogprobs) -> list[Request]:
        """Append each request's newly scored prompt positions to its list, in order; positions it already has
        (rows computed again after a preemption) are skipped. Returns the requests whose positions came out of
        order (a scheduling bug: they end alone, logged)."""
        res = prompt.pending.result()
        row = 0
        broken = []
        for req, first, count in prompt.spans:
            have = req.prompt_logprobs
            if req.status != RequestStatus.FINISHED and first + count > len(have):
                if first > len(have):
                    log.error("request %s: prompt logprobs from position %d came before those from %d", req.request_id,
                              first, len(have))
                    broken.append(req)
                else:
                    have.extend(res.logprobs[row + len(have) - first:row + count])
            row += count
        return broken

    def update_lora(self, load: bool, name: str, path: str = "") -> tuple[ErrorKind, str] | None:
        """Load (or unload) a LoRA adapter while serving, on every tensor-parallel rank: None when done, else
        (kind, what went wrong). An adapter that a request is using stays until no request uses it."""
        lora = self.runner.lora
        loaded = ", ".join(lora.index) if lora and lora.index else "none"
        if load:
            if lora is not None and name in lora.index:
                return ErrorKind.INVALID, f"LoRA adapter {name!r} is already loaded (unload it first to replace it)"
            try:
                number = self.runner.load_lora(name, path)
            except (ValueError, OSError) as e:
                return ErrorKind.INVALID, str(e)
            except RuntimeError as e:  # torch.OutOfMemoryError: the KV cache holds the rest of the GPU
                if "out of memory" not in str(e).lower():
                    raise
                return ErrorKind.INVALID, (f"LoRA adapter {name!r}: not enough GPU memory left beside the KV cache "
                                           f"({len(lora.index) if lora else 0} adapters loaded); unload one, or "
                                           f"start with a smaller KV cache (GPU_MEMORY_UTILIZATION)")
            if self.tp is not None and not self.tp.send_lora(number, name, path):
                self.runner.unload_lora(name)
                return ErrorKind.INVALID, (f"LoRA adapter {name!r}: a tensor-parallel rank could not load it (its log "
                                           f"says why); no rank holds it")
            return None
        if lora is None or name not in lora.index:
            return ErrorKind.NOT_FOUND, f"LoRA adapter {name!r} is not loaded; loaded: {loaded}"
        users = sum(r.lora_index == lora.index[name] for r in self.requests.values())
        if users:
            return ErrorKind.INVALID, (f"LoRA adapter {name!r} is in use by {users} request(s): unload it when they "
                                       f"have ended")
        self.runner.unload_lora(name)
        if self.tp is not None:
            self.tp.send_lora(0, name, "")
        return None

    def close(self) -> None:
        self.grammars.compiler.shutdown()
        if self.tp is not None:
            self.tp.shutdown()
            self.tp = None

    def stats(self, ready: bool = True) -> EngineStats:
        return EngineStats(time.time(), len(self.scheduler.running),
                           len(self.scheduler.waiting) + len(self.grammars), self.cfg.max_num_seqs,
                           self.kv.num_free_blocks, self.kv.num_blocks, self.cfg.block_size,
                           self.scheduler.num_preemptions, self.num_steps, ready, self.max_model_len,
                           self.num_refused, self.scheduler.prefill_tokens_per_step.cumulative(),
                           self.scheduler.prefill_tokens_per_step.sum, self.num_warmup_steps,
                           dict(vars(self.totals)),  # every step: a shallow copy, not asdict
                           dict(vars(self.spec_stats)) if self.speculative else {},
                           self.runner.model_config.hidden_size,
                           {a.name: a.path for a in self.runner.lora.adapters.values()} if self.runner.lora else {})

    # one request per sampler path (Sampler.paths), and one scoring its prompt (the runner's prompt logprobs):
    # each path's ops run once before ready
    WARMUP_SAMPLING = (
        dict(temperature=0.0),
        dict(temperature=0.8),
        dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05),
        dict(temperature=0.8, seed=1),
        dict(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.1, presence_penalty=0.1),
        dict(temperature=0.0, min_tokens=2, stop_token_ids=[0]),
        dict(temperature=0.0, logprobs=0),
        dict(temperature=0.0, logprobs=5),
        dict(temperature=0.0, logit_bias=[(0, -1.0)]),
        dict(temperature=0.0, prompt_logprobs=1),
    )

    def warmup(self) -> None:
        """Before ready, run every kind of step traffic can produce (kiln/engine/variants.py): prefill, a chunked
        prefill beside decodes (mixed and mixed+chunk steps), a long-context decode beside a prompt, each sampler
        path, a decode at every CUDA-graph ladder size and each prefill tile class, so the first user requests
        compile and initialise nothing (tests/unit/test_warmup_variants.py checks the Triton kernels' variants).
        Logs what it ran and how long it took. (Structured-output grammars are not warmed: their compile is per
        schema and off the engine loop anyway.)"""
        t0 = time.monotonic()
        steps0 = self.num_steps
        budget = self.scheduler.max_prefill_tokens
        room = min(self.max_model_len, self.kv.num_blocks * self.cfg.block_size)  # tokens one request may hold
        n_req = 0
        max_waiting, self.cfg.max_waiting = self.cfg.max_waiting, 1 << 30  # a batch of warm-up requests is no overload

        def add(prompt_len: int, max_tokens: int, prompt: list[int] | None = None, **params) -> None:
            nonlocal n_req
            n_req += 1
            prompt_len = max(1, min(prompt_len, room - max_tokens - 1))
            # distinct tokens per request: no prefix-cache hit turns a prefill into something smaller
            prompt = prompt or [(n_req * 7919 + i) % max(2, self.runner.model_config.vocab_size - 1) + 1
                                for i in range(prompt_len)]
            err = self.add_request(f"__warmup_{n_req}", prompt, SamplingParams(ignore_eos=True, max_tokens=max_tokens,
                                                                               **params))
            if err is not None:
                raise RuntimeError(f"warm-up request refused: {err.error}")

        def drain() -> None:
            while self.has_unfinished():
                self.step()

        # 1. the sampler paths (in groups that leave a batch slot free), the first group decoding while a prompt
        #    longer than the prefill budget comes in chunks beside it: prefill, mixed+chunk, mixed, decode steps
        group = max(1, self.cfg.max_num_seqs - 1)
        for i in range(0, len(self.WARMUP_SAMPLING), group):
            for params in self.WARMUP_SAMPLING[i:i + group]:
                add(4, 6, **params)
            self.step()
            if i == 0:
                add(2 * budget + budget // 2, 4, temperature=0.0)
            drain()
        # 2. a decode row with a long context beside a prompt (a mixed step): at a small batch the decode kernel
        #    splits a context over 2 x its BLOCK_N (256) tokens into partitions (DIRECT off), the short rows above
        #    ran whole (docs/kernels.md)
        add(4096, 8, temperature=0.0)
        long_req = self.requests.get(f"__warmup_{n_req}")
        while long_req is not None and long_req.num_computed_tokens < len(long_req.prompt_token_ids) \
                and self.has_unfinished():
            self.step()
        add(16, 1, temperature=0.0)
        drain()
        # 3. a prefill alone of each tile class (the step's longest prompt row: <= 16, 32, 64 tokens; 128 and 256
        #    reach the int8-weight kernel's row classes on a GPU), then a prompt over the budget alone
        #    (prefill+chunk, then prefill)
        for n in sorted({min(n, budget) for n in (16, 32, 64, 128, 256)}):
            add(n, 1, temperature=0.0)
            drain()
        add(budget + budget // 2 + 1, 1, temperature=0.0)
        drain()
        if self.runner.lora is not None:
            # each LoRA adapter's rows beside the base model's (their steps run eagerly, outside the decode graphs)
            for name in self.runner.lora.index:
                add(8, 3, temperature=0.0, lora_name=name)
            add(8, 3, temperature=0.0)
            drain()
        if self.speculative:
            # speculating decode rows beside a plain one (a "+spec" step): a prompt of one repeated token that a
            # logit bias makes the model repeat, so the n-gram lookup drafts it and the samples confirm it
            k = self.speculative.num_speculative_tokens
            add(8, 1 + k, temperature=0.0)
            add(8, 2 * k + 2, prompt=[3] * 8, temperature=0.0, logit_bias=[(3, 100.0)])
            drain()
        # 4. a decode at every CUDA-graph ladder size (eager on CPU; on the GPU the graphs were captured, this
        #    runs their replay and the sampler at that batch)
        for size in batch_size_ladder(self.cfg.max_num_seqs):
            for _ in range(min(size, self.kv.num_blocks // 2)):
                add(1, 2, temperature=0.0)
            drain()
        self.kv.reset_prefix_cache()
        # the warm-up's steps are not traffic: start the published step statistics afresh
        self.scheduler.prefill_tokens_per_step.reset()
        self.totals = RequestTotals()
        self.spec_stats = SpecDecodeStats()
        self.num_warmup_steps = self.num_steps
        self.cfg.max_waiting = max_waiting
        kernels = compiled_triton_kernels()
        log.info("warm-up: %d requests, %d steps in %.1f s; reached %s%s", n_req, self.num_steps - steps0,
                 time.monotonic() - t0, VariantLog.describe(self.variants.snapshot()),
                 f"; Triton kernel variants compiled: {sum(kernels.values())}" if any(kernels.values()) else "")


# ------------------------------------------------------------------------------------------------------
# The engine-core process
# ------------------------------------------------------------------------------------------------------

def _parent_alive(ppid: int) -> bool:
    return os.getppid() == ppid


def pid_alive(pid: int) -> bool:
    """A front end's process still runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)


class FrontEnds:
    """Who may talk to the engine, and whose requests are whose.

    The socket listens on 127.0.0.1, where any local process can connect. A front end is admitted by a
    Hello(secret, pid) message carrying the per-start secret the supervisor hands to its children (never on
    a command line or in the environment); every message from a socket identity that has not been admitted
    is dropped and logged, so a foreign client gets no tokens and no stats.

    Each admitted front end gives its pid. The engine and the front ends share a host, so a front end that
    dies (kill -9, OOM) is seen within one heartbeat by `reap()`, and its requests are aborted with their KV
    blocks instead of running to max_dec_len with nobody listening."""

    def __init__(self, secret: str):
        self.secret = secret.encode()
        self.pid: dict[bytes, int] = {}        # admitted socket identity -> front end pid
        self.owner: dict[str, bytes] = {}      # request id -> the identity that added it
        self._refused: set[bytes] = set()

    def admit(self, ident: bytes, msg: Message) -> bool:
        """Handle a hello; True if `ident` is (now) admitted, False if the message must be dropped."""
        if isinstance(msg, Hello):
            given, pid = msg.secret, msg.pid
            if isinstance(given, str) and hmac.compare_digest(given.encode(), self.secret) and \
                    isinstance(pid, int) and not isinstance(pid, bool):
                self.pid[ident] = pid
                self._refused.discard(ident)
                return True
            self.refuse(ident, "a hello without the engine's secret")
            return False
        if ident in self.pid:
            return True
        self.refuse(ident, "a message from a client that has not said hello with the engine's secret")
        return False

    def refuse(self, ident: bytes, why: str) -> None:
        if ident not in self._refused and len(self._refused) < 10_000:  # one log line per foreign client
            self._refused.add(ident)
            log.warning("engine socket: dropped %s (identity %s); only Kiln's own front ends are served",
                        why, ident.hex()[:16])

    def requests_of(self, ident: bytes) -> list[str]:
        return [rid for rid, who in self.owner.items() if who == ident]

    def reap(self) -> dict[bytes, list[str]]:
        """Forget front ends whose process is gone; returns their request ids (to abort)."""
        gone = {ident: self.requests_of(ident) for ident, pid in self.pid.items() if not pid_alive(pid)}
        for ident, rids in gone.items():
            log.warning("front end pid %d is gone: aborting its %d request(s)", self.pid.pop(ident), len(rids))
            for rid in rids:
                self.owner.pop(rid, None)
        return gone


def run_engine_core(cfg: EngineConfig, address: str, secret: str, log_level: str = "INFO") -> None:
    """Process entry: load the model, then serve the ROUTER socket until SIGTERM/SIGINT or the parent dies.
    Only front ends that say hello with `secret` are served (see FrontEnds)."""
    import zmq

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = {"flag": False}

    def on_signal(*_):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; Ctrl-C reaches the whole group
    ppid = os.getppid()

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 64 << 20)  # a foreign peer must not make us buffer gigabytes
    sock.bind(address)
    fronts = FrontEnds(secret)
    owner = fronts.owner

    def send(ident: bytes, msg: Message) -> None:
        try:
            sock.send_multipart([ident, encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def broadcast_stats(stats: EngineStats) -> None:
        for c in list(fronts.pid):
            send(c, Stats(stats))

    def receive():
        """(identity, message) of each waiting message from an admitted front end; hellos are answered
        with the current stats by the caller (kind "hello")."""
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                fronts.refuse(frames[0], f"a message of {len(frames) - 1} frames")
                continue
            ident, raw = frames
            try:
                msg = decode(raw)
            except WireError as e:  # not one of ours
                fronts.refuse(ident, f"a message that is not of the engine protocol ({e})")
                continue
            if fronts.admit(ident, msg):
                yield ident, msg

    # Load the model in a thread while this one answers: front ends see "not ready" heartbeats meanwhile.
    box: dict = {}
    loaded = threading.Event()

    def load():
        try:
            box["core"] = EngineCore(cfg, imports_s=process_age_s())
        except BaseException as e:  # noqa: BLE001 - reported to the front ends and the log
            box["error"] = e
            log.error("engine failed to start: %s\n%s", e, traceback.format_exc())
        loaded.set()

    threading.Thread(target=load, daemon=True, name="kiln-model-load").start()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while not loaded.is_set():
        if stop["flag"] or not _parent_alive(ppid):
            return
        if poller.poll(100):
            for ident, msg in receive():
                if isinstance(msg, (AddRequest, LoRAUpdate)):
                    send(ident, Outputs([EngineOutput(msg.request_id, [], True, "error", 0, error="the engine is "
                                                      "still loading the model, try again shortly",
                                                      error_type=ErrorKind.NOT_READY)]))
        fronts.reap()
        broadcast_stats(EngineStats(timestamp=time.time(), max_batch_size=cfg.max_num_seqs, ready=False))
    core, load_error = box.get("core"), box.get("error")

    if core is None:
        # stay up long enough to tell the front ends why, then exit non-zero
        for c in list(fronts.pid):
            send(c, Fatal(f"engine failed to start: {load_error}"))
        time.sleep(0.5)
        sock.close()
        ctx.term()
        raise SystemExit(3)

    broadcast_stats(core.stats())  # ready now: the front ends and the supervisor need not wait for a heartbeat
    last_stats = time.monotonic()
    while not stop["flag"]:
        busy = core.has_unfinished()
        if poller.poll(0 if busy else int(HEARTBEAT_S * 1000)):
            for ident, msg in receive():
                if isinstance(msg, Hello):
                    send(ident, Stats(core.stats()))
                elif isinstance(msg, AddRequest):
                    rid, prompt = msg.request_id, msg.prompt_token_ids
                    try:
                        err = core.add_request(rid, prompt, SamplingParams.from_dict(msg.params), msg.eos_token_ids)
                    except (ValueError, TypeError) as e:
                        err = EngineOutput(rid, [], True, "error", len(prompt) if isinstance(prompt, list) else 0,
                                           error=str(e), error_type=ErrorKind.INVALID)
                    if err is not None:
                        send(ident, Outputs([err]))
                    else:
                        owner[rid] = ident
                elif isinstance(msg, Abort):
                    ids = [r for r in msg.request_ids if isinstance(r, str) and owner.get(r) == ident]
                    for out in core.abort(ids):
                        owner.pop(out.request_id, None)
                        send(ident, Outputs([out]))
                elif isinstance(msg, LoRAUpdate):
                    try:
                        err = core.update_lora(msg.load, msg.name, msg.path)
                    except Exception as e:  # noqa: BLE001 - the answer, not a dead engine loop
                        log.error("LoRA update failed: %s\n%s", e, traceback.format_exc())
                        err = ErrorKind.INTERNAL, f"internal error loading the LoRA adapter: {e}"
                    broadcast_stats(core.stats())  # every front end learns the adapters before this answer
                    send(ident, Outputs([EngineOutput(msg.request_id, [], True, "error" if err else "stop", 0,
                                                      error=err[1] if err else None,
                                                      error_type=err[0] if err else None)]))
        if core.has_unfinished():
            try:
                outs = core.step()
            except Exception as e:  # noqa: BLE001 - never leave a request hanging: fail everything in flight
                log.error("engine step failed outside the model: %s\n%s", e, traceback.format_exc())
                outs = [EngineOutput(o.request_id, [], True, "error", 0, error=f"internal error in the engine: {e}",
                                     error_type=ErrorKind.INTERNAL) for o in core.abort(list(core.requests))]
            per_client: dict[bytes, list] = {}
            for out in outs:
                ident = owner.get(out.request_id)
                if out.finished:
                    owner.pop(out.request_id, None)
                if ident is not None:
                    per_client.setdefault(ident, []).append(out)
            for ident, batch in per_client.items():
                send(ident, Outputs(batch))
        now = time.monotonic()
        if now - last_stats >= HEARTBEAT_S / 2:
            last_stats = now
            for rids in fronts.reap().values():
                core.abort(rids)  # nobody listens: free their slots and KV blocks now
            broadcast_stats(core.stats())
            if not _parent_alive(ppid):
                break
    core.close()
    sock.close()
    ctx.term()


def launch_engine_core(cfg: EngineConfig, address: str, secret: str, log_level: str = "INFO") -> mp.Process:
    """Start the engine core in its own (spawned) process; talk to it with kiln.engine.client, giving it the
    same `secret`."""
    proc = mp.get_context("spawn").Process(target=run_engine_core, args=(cfg, address, secret, log_level),
                                           name="kiln-engine-core", daemon=False)
    proc.start()
    return proc
