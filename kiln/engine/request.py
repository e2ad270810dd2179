"""Request state, sampling parameters and the messages that cross the engine boundary.

Text never enters the engine: a request is token ids + SamplingParams, an output is new token ids + a
finish reason. Stop *strings* are matched by the front end's detokenizer, which then aborts the request.
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

from kiln.engine.structured import StructuredSpec
from kiln.errors import ErrorKind, as_kind

# Stands in an output list for a token that is sampled on the device but not yet on the host (async
# scheduling); the runner feeds the device-side id to the next step, the engine fills it in one step later.
PENDING_TOKEN = -1

# What the engine's 64-bit fields (torch.long, msgpack, torch.Generator seeds) can hold.
INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop token id or a stop string
    LENGTH = "length"    # max_tokens reached
    ABORT = "abort"      # cancelled by the client, a timeout or a disconnect
    ERROR = "error"      # rejected or failed in the engine


@dataclass
class SamplingParams:
    """Per-request sampling settings, the names vLLM users know (seed names in comments)."""

    max_tokens: int = 16                 # max_dec_len
    min_tokens: int = 0                  # min_dec_len: EOS / stop ids masked until reached
    temperature: float = 1.0             # 0 means greedy
    top_p: float = 1.0                   # topp
    top_k: int = 0                       # 0 (or -1) disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0      # penalty_score
    frequency_penalty: float = 0.0       # frequency_score
    presence_penalty: float = 0.0        # presence_score
    seed: int | None = None              # infer_seed
    stop: list[str] = field(default_factory=list)           # stop strings (front end)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None          # number of top logprobs to return per token (0: only the sampled)
    structured: StructuredSpec | None = None  # the grammar the output must follow (kiln/engine/structured.py)
    logit_bias: list[tuple[int, float]] = field(default_factory=list)  # (token id, added to its logit), OpenAI's
    # logprobs of the prompt's own tokens (and this many top ones at each position): OpenAI's echo with logprobs
    prompt_logprobs: int | None = None
    # the scheduling policy "priority" (KILN_SCHEDULING_POLICY) serves lower values first, as vLLM's `priority`
    priority: int = 0
    # the LoRA adapter (KILN_LORA_MODULES' name) that changes the model for this request; None: the base model
    lora_name: str | None = None
    # an embedding request (OpenAI's /v1/embeddings): the prompt's last position's final hidden state, L2-normalized,
    # comes back as EngineOutput.embedding; no token is generated
    embed: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.top_k, int) and self.top_k < 0:
            self.top_k = 0
        self.structured = StructuredSpec.coerce(self.structured)  # also from its wire form; raises ValueError
        if isinstance(self.logit_bias, list):  # its wire form: lists of [id, bias]
            self.logit_bias = [tuple(p) if isinstance(p, list) else p for p in self.logit_bias]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError unless every field has a type and range the sampler can use (the engine calls it at
        admission, so a bad request is refused alone instead of failing a step)."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        def is_int(v: Any, lo: int, hi: int = INT64_MAX) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(self.max_tokens, 1), f"max_tokens must be an int in [1, 2^63), got {self.max_tokens!r}")
        need(is_int(self.min_tokens, 0), f"min_tokens must be an int in [0, 2^63), got {self.min_tokens!r}")
        need(is_int(self.top_k, 0), f"top_k must be an int in [0, 2^63) (0 or -1: off), got {self.top_k!r}")
        need(self.seed is None or is_int(self.seed, INT64_MIN, UINT64_MAX),
             f"seed must be an int in [-2^63, 2^64), got {self.seed!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            need(is_num(getattr(self, name)), f"{name} must be a finite number, got {getattr(self, name)!r}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        need(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        need(-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        need(-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        need(self.logprobs is None or is_int(self.logprobs, 0, 20), f"logprobs must be in [0, 20], got {self.logprobs}")
        need(self.prompt_logprobs is None or is_int(self.prompt_logprobs, 0, 20),
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        need(is_int(self.priority, INT64_MIN), f"priority must be an int in [-2^63, 2^63), got {self.priority!r}")
        need(self.lora_name is None or isinstance(self.lora_name, str), "lora_name must be a string or None")
        need(isinstance(self.embed, bool), "embed must be a bool")
        need(isinstance(self.stop_token_ids, list) and all(is_int(t, 0) for t in self.stop_token_ids),
             "stop_token_ids must be a list of token ids (ints >= 0)")
        need(isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop), "stop must be a list of strings")
        need(isinstance(self.logit_bias, list) and all(
            isinstance(p, tuple) and len(p) == 2 and is_int(p[0], 0) and is_num(p[1]) and -100 <= p[1] <= 100
            for p in self.logit_bias), "logit_bias must be a list of (token id >= 0, bias in [-100, 100]) pairs")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        return cls(**d)


class RequestStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Request:
    """The engine's view of one request: its tokens, its blocks and how far the KV cache has got."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hashes of the full blocks, filled incrementally
        # Tokens whose K/V are in the cache. A preempted request starts again from 0 and recomputes
        # prompt + output so far, so its later tokens are exactly those it would have produced.
        self.num_computed_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_scheduled_time: float | None = None
        self.num_preemptions = 0
        self.num_overtaken = 0     # later requests admitted past it while it waited for KV blocks (scheduler)
        self.generator = None  # torch.Generator for seeded sampling, made by the sampler on first use
        self.num_pending_tokens = 0  # trailing PENDING_TOKENs of output_token_ids (0 or 1, 2 for a moment)
        self.pending_row = -1        # row of the last launched step's sampled ids that holds the newest one
        self.grammar = None          # RequestGrammar once params.structured is compiled (kiln/engine/structured.py)
        self.prompt_ids_array = None  # the prompt ids as a numpy array, made by the sampler's penalties on first use
        # params.prompt_logprobs: entry i is the logprob pair of prompt token i + 1 (what position i predicted),
        # filled chunk by chunk as the prefill runs, sent with the first new token
        self.prompt_logprobs: list = []
        # speculative decoding (kiln/engine/speculative.py): this step's draft tokens, computed after the last
        # known token and sampled at each of their positions; the n-gram lookup's copy of the known tokens
        self.draft_token_ids: list[int] = []
        self.draft_limit = 0  # drafts it may carry next (speculative.next_draft_limit; 0: the configured number)
        # the LoRA adapter's number (kiln/layers/lora.py; 0: the base model), set by the engine at admission; the
        # prefix cache keeps each adapter's blocks apart (their K/V differ)
        self.lora_index = 0
        self.history_array = None
        self.history_len = 0
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= set(eos_token_ids)
        self.stop_token_set = frozenset(ids)   # ids that end the request (after min_tokens)
        # penalties read the whole output on the host: such a request makes the engine step synchronously
        self.needs_output_history = (params.repetition_penalty != 1.0 or bool(params.frequency_penalty)
                                     or bool(params.presence_penalty))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt positions still lack their logprobs: the prefill must compute them (no prefix-cache hits)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def cache_salt(self) -> object:
        """Where the prefix cache's hash chain starts: requests share cached blocks only under the same salt."""
        return ("lora", self.lora_index) if self.lora_index else None

    @property
    def num_sample_rows(self) -> int:
        """Logit rows this request samples in its step: its next token's, and one per draft token."""
        return 1 + len(self.draft_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids are on the host (all of them but those still in flight)."""
        return self.num_tokens - self.num_pending_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, out={len(self.output_token_ids)}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)}, {self.status.name})")


@dataclass
class EngineOutput:
    """New tokens of one request after one engine step (or its end)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None       # FinishReason value
    num_prompt_tokens: int = 0
    # per new token: (sampled token logprob, [(token_id, logprob), ...] top-n) when logprobs were asked
    logprobs: list[Any] | None = None
    # with the request's first new token, when params.prompt_logprobs: one per prompt token, None for the first
    # (nothing predicts it), then (logprob of the prompt token, [(token_id, logprob), ...] top-n)
    prompt_logprobs: list[Any] | None = None
    error: str | None = None               # set with finish_reason "error": what went wrong, in plain words
    # the kind of error (kiln.errors.ErrorKind): each front end maps it to its status and wording
    error_type: ErrorKind | None = None
    error_args: dict[str, Any] | None = None  # the facts behind the error, for the APIs' own wording
    queue_time: float | None = None        # on the first token: seconds from arrival to first scheduling
    embedding: list[float] | None = None   # an embedding request's answer (SamplingParams.embed), with its end

    def __post_init__(self) -> None:
        if self.error_type is not None:
            self.error_type = as_kind(self.error_type)


@dataclass
class RequestTotals:
    """Requests that ended since ready, and where their time went (KServe's model statistics): a request ends
    well with its answer, at a stop or at the client's cancel, and fails with an error (refusals included)."""

    succeeded: int = 0
    failed: int = 0
    success_seconds: float = 0.0   # arrival to end, summed over the requests that ended well
    fail_seconds: float = 0.0
    queue_seconds: float = 0.0     # arrival to first scheduling, summed over the requests that ended well
    last_end_time: float = 0.0     # time.time() of the last end, 0 before any

    def record(self, req: "Request | None", failed: bool) -> None:
        """One request's end (None: refused before it became a request, which took no time)."""
        now = time.monotonic()
        took = 0.0 if req is None else now - req.arrival_time
        if failed:
            self.failed += 1
            self.fail_seconds += took
        else:
            self.succeeded += 1
            self.success_seconds += took
            if req is not None and req.first_scheduled_time is not None:
                self.queue_seconds += req.first_scheduled_time - req.arrival_time
        self.last_end_time = time.time()


@dataclass
class EngineStats:
    """Snapshot the engine core publishes every step (and at least every heartbeat interval when idle)."""

    timestamp: float = 0.0             # time.time() of the snapshot: health uses it as the heartbeat
    num_running: int = 0
    num_waiting: int = 0
    max_batch_size: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    block_size: int = 0
    num_preemptions_total: int = 0
    num_steps_total: int = 0
    ready: bool = False                # model loaded and warm-up done
    # prompt + output tokens a sequence may hold (0 while loading): the one limit every front end reads
    max_model_len: int = 0
    num_refused_total: int = 0         # requests refused because the queue was full (MAX_CACHED_TASK_NUM: 429s)
    # prefill tokens per step: cumulative counts per bound of scheduler.PREFILL_TOKEN_BUCKETS (+Inf last), sum
    prefill_tokens_buckets: list[int] = field(default_factory=list)
    prefill_tokens_sum: float = 0.0
    num_warmup_steps: int = 0          # of num_steps_total, those the warm-up ran before ready
    requests: dict[str, float] = field(default_factory=dict)  # RequestTotals' fields since ready
    spec_decode: dict[str, int] = field(default_factory=dict)  # SpecDecodeStats since ready ({}: speculation off)
    embedding_size: int = 0            # an embedding's length (the model's hidden size; 0 while loading)
    lora_adapters: dict[str, str] = field(default_factory=dict)  # the LoRA adapters loaded: name -> path

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
