"""OpenAI API shapes: request models (pydantic), their conversion to token ids + SamplingParams, and the
response / stream-chunk / error builders. No HTTP here (kiln/server/http.py serves it)."""
from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.engine.request import INT64_MAX, INT64_MIN, UINT64_MAX, SamplingParams
from kiln.errors import ErrorKind, RequestError
from kiln.server.frontend import Frontend
from kiln.server.reasoning import ReasoningParser
from kiln.server.sampling import LengthWording, Limits, build_sampling_params
from kiln.server.seed_protocol import normalize_messages
from kiln.server.structured_api import structured_outputs
from kiln.server.tool_parsers import ToolCallError, ToolPlan, check_tool_messages, plan_tools, select_parser
from kiln.server.validation import check_prompt_chars, check_token_ids

# ----------------------------------------------------------------------------------------------------
# requests
# ----------------------------------------------------------------------------------------------------


# Strict types (as OpenAI's own API): "10" and true are not integers, 1 is not a bool; no NaN / Infinity.
_STRICT = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Common(BaseModel):
    model_config = _STRICT

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1, le=INT64_MAX)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None
    # vLLM extras
    top_k: Optional[int] = Field(None, ge=-1, le=INT64_MAX)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    timeout: Optional[float] = Field(None, gt=0)     # Kiln: whole-request timeout (s), as the native API's
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)  # vLLM: lower first (KILN_SCHEDULING_POLICY=priority)


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(None, ge=0, le=INT64_MAX)  # 0: with echo, score the prompt only
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=64)


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: str
    content: Optional[Union[str, list[Any]]] = None
    name: Optional[str] = None


class _ChatPrompt(BaseModel):
    """What the chat template renders (and what decides the tools' plan): a chat completion's and /tokenize's."""
    model_config = _STRICT
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    # vLLM's: the last (assistant) message left open for the model to go on with; extra template variables (Qwen3's
    # enable_thinking, ...)
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[Any] = None               # checked by kiln/server/tool_parsers.py (messages that say what to fix)
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None


class ChatCompletionRequest(_Common, _ChatPrompt):
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class TokenizeCompletionRequest(BaseModel):
    """/tokenize of a prompt (vLLM's body)."""
    model_config = _STRICT
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_ChatPrompt):
    """/tokenize of chat messages rendered by the model's template, as /v1/chat/completions renders them."""
    model: Optional[str] = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = _STRICT
    model: Optional[str] = None
    tokens: list[int]


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return f"`{loc}` is required", loc or None
    return f"`{loc}`: {msg}" if loc else msg, loc or None


# ----------------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------------


@dataclass
class OpenAIJob:
    """A parsed OpenAI request: one engine request per (prompt, choice)."""

    kind: Literal["completions", "chat"]
    id: str
    model: str
    created: int
    prompts: list[list[int]]
    prompt_texts: list[str]
    params: list[SamplingParams]              # per prompt
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    echo: bool = False
    echo_only: bool = False                   # completions' max_tokens 0: the prompt (and its logprobs) only
    logprobs: int | None = None               # top-n asked (completions: logprobs; chat: top_logprobs)
    want_logprobs: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    timeout: float = 300.0
    arrival_time: float = field(default_factory=time.time)
    tool_plan: ToolPlan | None = None         # chat with tools: how the output becomes tool_calls
    reasoning: ReasoningParser | None = None  # chat: how the output's reasoning becomes reasoning_content


    def request_ids(self) -> list[tuple[int, int, str]]:
        """(choice index, prompt index, engine request id) for every choice."""
        out = []
        for p in range(len(self.prompts)):
            for i in range(self.n):
                idx = p * self.n + i
                out.append((idx, p, f"{self.id}-{idx}"))
        return out

    def params_for(self, prompt_index: int, choice: int) -> SamplingParams:
        base = self.params[prompt_index]
        if base.seed is None or choice == 0:
            return base
        d = base.to_dict()
        d["seed"] = base.seed + choice  # n choices of a seeded request differ, reproducibly
        return SamplingParams.from_dict(d)


def _bad(msg: str, param: str | None = None) -> RequestError:
    return RequestError(msg, ErrorKind.INVALID, param=param)


def _parse(model_cls, body: Any):
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object", ErrorKind.BAD_BODY)
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise _bad(msg, param) from None


# OpenAI's words for the length checks (kiln.server.sampling)
OPENAI_LENGTH_WORDING = LengthWording(
    prompt_over_seq=("The prompt has {n} tokens, more than the limit MAX_SEQ_LEN ({max_seq}). Please reduce the "
                     "length of the prompt.", ErrorKind.TOO_LONG, "prompt"),
    max_over_limit=("max_tokens ({max_tokens}) exceeds the limit MAX_DEC_LEN ({limit})", ErrorKind.INVALID,
                    "max_tokens"),
    total_over_len=("This model's maximum context length is {max_len} tokens. However, you requested {total} tokens "
                    "({n} in the prompt, {max_tokens} in the completion). Please reduce the length of the prompt or "
                    "completion.", ErrorKind.TOO_LONG, "max_tokens"),
    min_over_max=("min_tokens ({min_tokens}) must not be greater than max_tokens ({max_tokens})", ErrorKind.INVALID,
                  "min_tokens"),
)


def lora_of(model: str | None, frontend: Frontend) -> str | None:
    """The LoRA adapter an OpenAI request's `model` names, or None for the served model. Where adapters are served
    (KILN_LORA_MODULES, or loadable while serving) a name that is neither is a 404, as vLLM answers it: a mistyped
    adapter must not quietly get the model. Without adapters any name reaches the model (clients that send a fixed
    name keep working)."""
    adapters = getattr(frontend, "lora_modules", {})
    if model in adapters:
        return model
    cfg = getattr(frontend, "cfg", None)
    if model and model != frontend.model_name and (adapters or getattr(cfg, "allow_runtime_lora_updating", False)):
        raise RequestError(f"The model `{model}` does not exist: this server serves `{frontend.model_name}` and the "
                           f"LoRA adapters {', '.join(f'`{a}`' for a in adapters) or '(none loaded now)'}",
                           ErrorKind.NOT_FOUND, param="model")
    return None


def _params(req: _Common, frontend: Frontend, limits: Limits, prompt_len: int, max_tokens: int | None,
            default_max: int | None, logprobs: int | None) -> SamplingParams:
    if prompt_len == 0:
        raise _bad("The prompt is empty", "prompt")
    vocab = getattr(frontend.tokenizer, "vocab_size", None)
    bias = _logit_bias(req.logit_bias or {}, vocab)
    stop_token_ids = check_token_ids(req.stop_token_ids or [], vocab, "stop_token_ids")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sp = build_sampling_params(
        limits, prompt_len, OPENAI_LENGTH_WORDING, max_tokens=max_tokens, min_tokens=req.min_tokens,
        default_max_tokens=default_max, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0, frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0, seed=req.seed, stop=[s for s in stop if s],
        stop_token_ids=stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs, logit_bias=bias)
    sp.priority = req.priority
    sp.lora_name = lora_of(req.model, frontend)
    return sp


def _logit_bias(bias: dict[str, float], vocab: int | None) -> list[tuple[int, float]]:
    """OpenAI's logit_bias ({"token id": bias in [-100, 100]}) as (id, bias) pairs."""
    out = []
    for key, value in bias.items():
        if not key.isdigit():
            raise _bad(f"logit_bias keys must be token ids (digits), got {key!r}", "logit_bias")
        if not -100 <= value <= 100:  # a float: the model's strict types checked that
            raise _bad(f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {key}",
                       "logit_bias")
        out.append((int(key), value))
    check_token_ids([t for t, _ in out], vocab, "logit_bias")
    return out


async def parse_completion(body: Any, frontend: Frontend) -> OpenAIJob:
    req: CompletionRequest = _parse(CompletionRequest, body)
    lora_of(req.model, frontend)  # an unknown model's 404 before any tokenizing
    if req.suffix:
        raise _bad("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise _bad("best_of must equal n (best_of > n is not supported)", "best_of")
    if req.max_tokens == 0 and not req.echo:
        raise _bad("max_tokens must be at least 1 (0 only with echo=true, which returns the prompt and, with "
                   "logprobs, scores it)", "max_tokens")
    structured = await structured_outputs(body)
    p = req.prompt
    tok = frontend.tokenizer
    vocab = getattr(tok, "vocab_size", None)
    if isinstance(p, str):
        texts = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [check_token_ids(p, vocab, "prompt")]
    elif p and all(isinstance(x, str) for x in p):
        texts = list(p)
    elif p and all(isinstance(x, list) for x in p):
        prompts = [check_token_ids(x, vocab, "prompt") for x in p]
    else:
        raise _bad("`prompt` must be a string, a list of strings, a list of token ids or a list of those", "prompt")
    n_prompts = len(texts) if isinstance(p, str) or isinstance(p[0], str) else len(prompts)
    if n_prompts * req.n > 64:
        raise _bad("too many choices: len(prompt) * n must be <= 64", "n")
    if isinstance(p, str) or isinstance(p[0], str):
        size = sum(len(x) for x in texts)
        for x in texts:
            check_prompt_chars(len(x), frontend.max_seq_len, "prompt")
        prompts = await frontend.run_tokenizer(lambda: [tok.encode(x, add_special_tokens=True) for x in texts],
                                               size=size)
    else:
        texts = [tok.decode(x, skip_special_tokens=False) for x in prompts]
    limits = await frontend.limits(req.timeout or frontend.cfg.request_timeout)
    echo_only = req.max_tokens == 0  # the engine makes one token, which nobody sees
    params = [_params(req, frontend, limits, len(ids), 1 if echo_only else req.max_tokens, 16, req.logprobs)
              for ids in prompts]
    for sp in params:
        sp.structured = structured
        if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get logprobs too
            sp.prompt_logprobs = req.logprobs
    so = req.stream_options
    return OpenAIJob(kind="completions", id=f"cmpl-{uuid.uuid4().hex}", model=req.model or frontend.model_name,
                     created=int(time.time()), prompts=prompts, prompt_texts=texts, params=params, n=req.n,
                     stream=req.stream, include_usage=bool(so and so.include_usage),
                     continuous_usage=bool(so and so.continuous_usage_stats), echo=req.echo,
                     echo_only=echo_only, logprobs=req.logprobs, want_logprobs=req.logprobs is not None,
                     skip_special_tokens=req.skip_special_tokens,
                     include_stop_str_in_output=req.include_stop_str_in_output,
                     timeout=req.timeout or frontend.cfg.request_timeout)


async def parse_chat(body: Any, frontend: Frontend) -> OpenAIJob:
    req: ChatCompletionRequest = _parse(ChatCompletionRequest, body)
    lora_of(req.model, frontend)  # an unknown model's 404 before any tokenizing
    structured = await structured_outputs(body)
    if req.top_logprobs is not None and not req.logprobs:
        raise _bad("top_logprobs needs logprobs=true", "top_logprobs")
    ids, tool_plan = await _chat_prompt(req, frontend)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    limits = await frontend.limits(req.timeout or frontend.cfg.request_timeout)
    params = _params(req, frontend, limits, len(ids), max_tokens, None, logprobs)
    params.structured = structured
    if tool_plan is not None and tool_plan.schema is not None:
        params.structured = _tool_call(tool_plan.structured_spec)
    so = req.stream_options
    return OpenAIJob(kind="chat", id=f"chatcmpl-{uuid.uuid4().hex}", model=req.model or frontend.model_name,
                     created=int(time.time()), prompts=[ids], prompt_texts=[""], params=[params], n=req.n,
                     stream=req.stream, include_usage=bool(so and so.include_usage),
                     continuous_usage=bool(so and so.continuous_usage_stats), logprobs=logprobs,
                     want_logprobs=req.logprobs, skip_special_tokens=req.skip_special_tokens,
                     include_stop_str_in_output=req.include_stop_str_in_output,
                     timeout=req.timeout or frontend.cfg.request_timeout, tool_plan=tool_plan,
                     reasoning=_reasoning_parser(frontend.cfg.reasoning_parser))


async def _chat_prompt(req: _ChatPrompt, frontend: Frontend) -> tuple[list[int], ToolPlan | None]:
    """The prompt's token ids (the messages and tools rendered by the chat template) and the tool plan."""
    messages = normalize_messages([m.model_dump(exclude_none=True) for m in req.messages])
    tok = frontend.tokenizer
    tool_plan = _tool_plan(req, messages, frontend)
    size = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    check_prompt_chars(size, frontend.max_seq_len, "messages")
    extra = _template_kwargs(req, messages)
    try:
        render = functools.partial(tok.apply_chat_template, **extra,
                                   **({"tools": tool_plan.tools} if tool_plan is not None and tool_plan.tools else {}))
        ids = await frontend.run_tokenizer(render, messages, req.add_generation_prompt, size=size)
    except ValueError as e:
        raise _bad(str(e), "messages") from None
    return ids, tool_plan


# what Kiln itself hands the template: not for chat_template_kwargs to override
_TEMPLATE_OWN_ARGS = {"messages", "conversation", "tools", "documents", "add_generation_prompt",
                      "continue_final_message", "tokenize", "return_dict", "return_tensors", "chat_template"}


def _template_kwargs(req: _ChatPrompt, messages: list[dict]) -> dict[str, Any]:
    """chat_template_kwargs and continue_final_message as the chat template's keyword arguments (400s that say
    what to fix)."""
    extra = dict(req.chat_template_kwargs or {})
    own = sorted(set(extra) & _TEMPLATE_OWN_ARGS)
    if own:
        raise _bad(f"chat_template_kwargs may not set {', '.join(own)}: use the request's own fields",
                   "chat_template_kwargs")
    if req.continue_final_message:
        if req.add_generation_prompt:
            raise _bad("continue_final_message needs add_generation_prompt=false (the last message is continued, "
                       "not answered)", "continue_final_message")
        if messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
            raise _bad("continue_final_message needs the last message to be the assistant's, with text content",
                       "continue_final_message")
        extra["continue_final_message"] = True
    return extra


async def tokenize(body: Any, frontend: Frontend) -> dict:
    """/tokenize (vLLM's API): a prompt, or chat messages as /v1/chat/completions renders them -> their token ids
    (and their token strings when asked)."""
    tok = frontend.tokenizer
    if isinstance(body, dict) and "messages" in body:
        chat: TokenizeChatRequest = _parse(TokenizeChatRequest, body)
        ids, _ = await _chat_prompt(chat, frontend)
        want_strs = chat.return_token_strs
    else:
        req: TokenizeCompletionRequest = _parse(TokenizeCompletionRequest, body)
        check_prompt_chars(len(req.prompt), frontend.max_seq_len, "prompt")
        ids = await frontend.run_tokenizer(tok.encode, req.prompt, req.add_special_tokens, size=len(req.prompt))
        want_strs = req.return_token_strs
    return {"count": len(ids), "max_model_len": frontend.max_model_len or frontend.max_seq_len, "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if want_strs else None}


async def detokenize(body: Any, frontend: Frontend) -> dict:
    """/detokenize (vLLM's API): token ids -> their text, special tokens included."""
    req: DetokenizeRequest = _parse(DetokenizeRequest, body)
    tok = frontend.tokenizer
    ids = check_token_ids(req.tokens, getattr(tok, "vocab_size", None), "tokens")
    return {"prompt": await frontend.run_tokenizer(tok.decode, ids, False, size=len(ids))}


def _tool_call(fn, *args):
    """fn(*args) with tool_parsers' ToolCallError as a 400 naming the field."""
    try:
        return fn(*args)
    except ToolCallError as e:
        raise _bad(str(e), e.param) from None


def _tool_plan(req: _ChatPrompt, messages: list[dict], frontend: Frontend) -> ToolPlan | None:
    """The request's tools checked and planned; the parser for tool_choice "auto" comes from the model."""
    _tool_call(check_tool_messages, messages)
    parser = select_parser(frontend.cfg.tool_call_parser, frontend.cfg.model_path,
                           getattr(frontend.tokenizer, "chat_template_source", ""))
    plan = _tool_call(plan_tools, req.tools, req.tool_choice, req.parallel_tool_calls, parser)
    if plan is not None and plan.schema is not None and (req.response_format or {}).get("type", "text") != "text":
        raise _bad(f"tool_choice {plan.mode!r} forces a tool call; it cannot be combined with response_format",
                   "response_format")
    return plan


# ----------------------------------------------------------------------------------------------------
# responses
# ----------------------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _lp_pair(lp: Any) -> tuple[float, list[tuple[int, float]]]:
    chosen, top = lp[0], lp[1] if len(lp) > 1 else []
    return float(chosen), [(int(t), float(v)) for t, v in (top or [])]


class LogprobsBuilder:
    """Accumulates one choice's logprobs in the completions or chat shape."""

    def __init__(self, job: OpenAIJob, frontend: Frontend):
        self.job, self.fe = job, frontend
        self.offset = 0

    def completion_part(self, token_ids: list[int], lps: list | None, text_offset_base: int = 0) -> dict | None:
        if not self.job.want_logprobs or not token_ids:
            return None
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, lp in zip(token_ids, lps or [None] * len(token_ids)):
            s = self.fe.token_text(tid)
            tokens.append(s)
            offsets.append(text_offset_base + self.offset)
            self.offset += len(s)
            if lp is None:
                token_lps.append(None)
                tops.append(None)
                continue
            chosen, top = _lp_pair(lp)
            token_lps.append(chosen)
            d = {s: chosen}
            for t, v in top:
                d.setdefault(self.fe.token_text(t), v)
            tops.append(d)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_part(self, token_ids: list[int], lps: list | None) -> dict | None:
        if not self.job.want_logprobs or not token_ids:
            return None
        content = []
        for tid, lp in zip(token_ids, lps or [None] * len(token_ids)):
            s = self.fe.token_text(tid)
            item: dict[str, Any] = {"token": s, "logprob": None, "bytes": list(s.encode("utf-8")),
                                    "top_logprobs": []}
            if lp is not None:
                chosen, top = _lp_pair(lp)
                item["logprob"] = chosen
                item["top_logprobs"] = [{"token": (ts := self.fe.token_text(t)), "logprob": v,
                                         "bytes": list(ts.encode("utf-8"))} for t, v in top]
            content.append(item)
        return {"content": content}


@dataclass
class CompletionDelta:
    """What one engine event adds to a completions choice, echo applied."""
    text: str
    logprobs: dict | None
    finish_reason: str | None  # set on the last event
    num_output_tokens: int     # the choice's output tokens so far, as usage counts them


def completion_delta(job: OpenAIJob, builder: LogprobsBuilder, prompt_index: int, ev: Any,
                     first: bool) -> CompletionDelta:
    """One event of a completions choice: with echo its first one leads with the prompt's text and, when
    logprobs are asked, the prompt tokens' logprobs (the first token's None); with max_tokens 0 (echo_only) the
    engine's one token is left out."""
    parts = []
    text = ""
    if first and job.echo:
        text = job.prompt_texts[prompt_index]
        if ev.prompt_logprobs is not None:
            parts.append(builder.completion_part(job.prompts[prompt_index], ev.prompt_logprobs))
    if job.echo_only:
        return CompletionDelta(text, merge_completion_logprobs(parts), "length" if ev.finished else None, 0)
    parts.append(builder.completion_part(ev.token_ids, ev.logprobs))
    return CompletionDelta(text + ev.text, merge_completion_logprobs(parts),
                           ev.finish_reason if ev.finished else None, ev.num_output_tokens)


def merge_completion_logprobs(parts: list[dict | None]) -> dict | None:
    parts = [p for p in parts if p]
    if not parts:
        return None
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for k in out:
            out[k].extend(p[k])
    return out


def merge_chat_logprobs(parts: list[dict | None]) -> dict | None:
    parts = [p for p in parts if p]
    if not parts:
        return None
    return {"content": [c for p in parts for c in p["content"]]}


def completion_response(job: OpenAIJob, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chat_response(job: OpenAIJob, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def completion_chunk(job: OpenAIJob, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict:
    c = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
         "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if job.include_usage:
        c["usage"] = None
    return c


class TextDeltaEvent:
    """One choice's SSE event for a plain text delta (no finish reason, logprobs or usage: nearly every event of
    a stream), its constant parts serialized once per stream: an event costs one dumps of the text, not of the
    whole chunk. The same JSON as completion_chunk / chat_chunk give; a chat delta's `field` is its content or,
    with a reasoning parser, its reasoning_content."""

    _MARK = "\x00kiln-text\x00"

    def __init__(self, job: OpenAIJob, index: int, dumps, field: str = "content"):
        c = (chat_chunk(job, index, {field: self._MARK}, None) if job.kind == "chat"
             else completion_chunk(job, index, self._MARK, None))
        self.prefix, self.suffix = dumps(c).split(dumps(self._MARK))
        self.prefix, self.dumps = "data: " + self.prefix, dumps

    def sse(self, text: str) -> str:
        return f"{self.prefix}{self.dumps(text)}{self.suffix}\n\n"


def chat_chunk(job: OpenAIJob, index: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
    c = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
         "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if job.include_usage:
        c["usage"] = None
    return c


@functools.lru_cache(maxsize=None)
def _reasoning_parser(name: str) -> ReasoningParser | None:
    return None if name == "none" else ReasoningParser(name)


def chat_message(job: OpenAIJob, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """A finished chat choice's assistant message and finish_reason: its reasoning as `reasoning_content` (with a
    reasoning parser), and with tools the rest read into `tool_calls` (finish_reason "tool_calls" when the model
    stopped after calling)."""
    message: dict[str, Any] = {"role": "assistant"}
    if job.reasoning is not None:
        split = job.reasoning.split(text)
        text = split.content
        if split.reasoning is not None:
            message["reasoning_content"] = split.reasoning
    plan = job.tool_plan
    if plan is None or plan.mode == "none":
        return message | {"content": text}, finish_reason
    out = plan.parse(text)
    message["content"] = out.content
    if out.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in out.tool_calls]
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    return message, finish_reason


class ChatChoiceStream:
    """One streamed chat choice's deltas: its reasoning as reasoning_content (with a reasoning parser), the rest
    as content or, with tools, read by the tool-call parser."""

    def __init__(self, job: OpenAIJob):
        plan = job.tool_plan
        self.parser = plan.stream_parser() if plan is not None and plan.mode != "none" else None
        self.reasoning = job.reasoning.stream() if job.reasoning is not None else None

    def deltas(self, text: str, finished: bool, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """(deltas for this piece of text, the finish_reason to send with the last one)."""
        if self.reasoning is None:
            return self._content_deltas(text, finished, finish_reason)
        pieces = self.reasoning.feed(text) + (self.reasoning.finish() if finished else [])
        thought = [{"reasoning_content": t} for kind, t in pieces if kind == "reasoning"]
        content = "".join(t for kind, t in pieces if kind == "content")
        deltas, finish_reason = self._content_deltas(content, finished, finish_reason)
        if thought and not content:  # the reasoning deltas carry the end: no empty content delta after them
            deltas = [d for d in deltas if d not in ({}, {"content": ""})]
        return thought + deltas, finish_reason

    def _content_deltas(self, text: str, finished: bool, finish_reason: str | None) -> tuple[list[dict], str | None]:
        if self.parser is None:
            return ([{"content": text}] if text or finished else []), finish_reason
        deltas = self.parser.feed(text) + (self.parser.finish() if finished else [])
        if finished and not deltas:
            deltas = [{}]
        if finished and self.parser.calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        return deltas, finish_reason


def usage_chunk(job: OpenAIJob, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "text_completion" if job.kind == "completions" else "chat.completion.chunk"
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_card(frontend: Frontend, lora: str | None = None) -> dict:
    """The served model's card, or a LoRA adapter's (vLLM's: its path as root, the model as parent)."""
    card = {"id": lora or frontend.model_name, "object": "model", "created": frontend.created, "owned_by": "kiln",
            "root": frontend.lora_modules[lora] if lora else frontend.model_name,
            "max_model_len": frontend.max_model_len}
    if lora:
        card["parent"] = frontend.model_name
    return card


def models_response(frontend: Frontend) -> dict:
    return {"object": "list", "data": [model_card(frontend)] + [model_card(frontend, name)
                                                                   for name in frontend.lora_modules]}


def retrieve_model(frontend: Frontend, model: str) -> dict:
    """GET /v1/models/{model}: the served model's or a LoRA adapter's card, 404 for another name (requests may
    name any where no adapters are served: lora_of)."""
    if model in frontend.lora_modules:
        return model_card(frontend, model)
    if model != frontend.model_name:
        raise RequestError(f"The model `{model}` does not exist: this server serves `{frontend.model_name}`",
                           ErrorKind.NOT_FOUND, param="model")
    return model_card(frontend)


# -- LoRA adapters loaded while serving (vLLM's routes) ------------------------------------------------------------

async def update_lora_adapter(body: Any, frontend: Frontend, load: bool) -> str:
    """POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name}: vLLM's answer
    text; RequestError naming what to fix."""
    route = "/v1/load_lora_adapter" if load else "/v1/unload_lora_adapter"
    if not frontend.cfg.allow_runtime_lora_updating:
        raise RequestError(f"{route} is off: start the server with KILN_ALLOW_RUNTIME_LORA_UPDATING=1 "
                           f"(--allow-runtime-lora-updating) to load and unload LoRA adapters while it runs",
                           ErrorKind.NOT_FOUND)
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object", None)
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not name.strip():
        raise _bad("`lora_name` must be a non-empty string: the name requests will give as `model`", "lora_name")
    if load and (not isinstance(path, str) or not path.strip()):
        raise _bad("`lora_path` must be a non-empty string: the adapter's directory on the server (PEFT's "
                   "adapter_config.json and adapter_model.safetensors)", "lora_path")
    if name == frontend.model_name:
        raise _bad(f"`lora_name` {name!r} is the served model's name: give the adapter a name of its own",
                   "lora_name")
    frontend.check_accepting()
    await frontend.update_lora(name, load, path if load else "")
    return (f"Success: LoRA adapter '{name}' added successfully." if load
            else f"Success: LoRA adapter '{name}' removed successfully.")


# -- embeddings --------------------------------------------------------------------------------------------------

class EmbeddingRequest(BaseModel):
    model_config = _STRICT

    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None
    timeout: Optional[float] = Field(None, gt=0)     # Kiln: whole-request timeout (s)


@dataclass
class EmbeddingJob:
    req: EmbeddingRequest
    prompts: list[list[int]]
    params: SamplingParams
    timeout: float


async def parse_embeddings(body: Any, frontend: Frontend) -> EmbeddingJob:
    """POST /v1/embeddings' body checked and tokenized. Raises RequestError."""
    req: EmbeddingRequest = _parse(EmbeddingRequest, body)
    lora = lora_of(req.model, frontend)
    tok = frontend.tokenizer
    vocab = getattr(tok, "vocab_size", None)
    p = req.input
    if isinstance(p, str):
        p = [p]
    if not p:
        raise _bad("`input` is empty: give a string, a list of strings or token ids", "input")
    if len(p) > 2048:
        raise _bad("`input` may hold at most 2048 items", "input")
    if all(isinstance(x, int) for x in p):
        prompts = [check_token_ids(p, vocab, "input")]
    elif all(isinstance(x, list) for x in p):
        prompts = [check_token_ids(x, vocab, "input") for x in p]
    else:
        for x in p:
            check_prompt_chars(len(x), frontend.max_seq_len, "input")
        prompts = await frontend.run_tokenizer(lambda: [tok.encode(x, add_special_tokens=True) for x in p],
                                               size=sum(len(x) for x in p))
    if any(not ids for ids in prompts):
        raise _bad("an `input` item is empty", "input")
    limits = await frontend.limits(req.timeout or frontend.cfg.request_timeout)
    if req.dimensions is not None and req.dimensions != limits.embedding_size:
        raise _bad(f"dimensions {req.dimensions}: this model's embeddings have {limits.embedding_size} (other sizes "
                   f"are not supported)", "dimensions")
    for ids in prompts:
        if len(ids) > limits.max_seq_len:
            raise RequestError(f"An input has {len(ids)} tokens, more than the limit MAX_SEQ_LEN "
                               f"({limits.max_seq_len})", ErrorKind.TOO_LONG, param="input")
    params = SamplingParams(max_tokens=1, embed=True, lora_name=lora)
    return EmbeddingJob(req, prompts, params, req.timeout or frontend.cfg.request_timeout)


async def run_embeddings(job: EmbeddingJob, frontend: Frontend, arrival: float) -> dict:
    """Each input's last position's final hidden state, L2-normalized (the pooling of last-token embedding models
    such as Qwen3-Embedding; of a chat model, a vector all the same), as OpenAI's embeddings response."""
    import asyncio
    import base64
    import struct

    req, prompts = job.req, job.prompts
    deadline = time.monotonic() + job.timeout

    async def one(ids: list[int]) -> list[float]:
        rid = frontend.new_id("embd-")
        record = frontend.new_record(rid, "embeddings", arrival)
        async for ev in frontend.stream(rid, ids, job.params, record=record, deadline=deadline, timeout_s=job.timeout):
            if ev.embedding is not None:
                return ev.embedding
        raise RequestError("the engine ended an embedding request without its vector", ErrorKind.INTERNAL)

    vectors = await asyncio.gather(*(one(ids) for ids in prompts))
    data = []
    for i, v in enumerate(vectors):
        emb = (base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if req.encoding_format == "base64"
               else v)
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(ids) for ids in prompts)
    return {"object": "list", "data": data, "model": req.model or frontend.model_name,
            "usage": {"prompt_tokens": n, "total_tokens": n}}
