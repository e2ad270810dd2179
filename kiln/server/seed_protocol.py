"""The seed's request protocol, shared by the native HTTP API and the gRPC (KServe v2) server.

    req = await parse_seed_request(body_dict, frontend)    # validate (spec section 3 order), tokenize
    async for packet in run_seed_request(req, frontend):   # seed packets (spec section 5)
        ...
    result = await collect_seed_result(req, frontend)      # the non-stream body

Errors are `kiln.errors.RequestError`s: `.message` / `.code` are the seed's error_msg / error_code, `.kind`
picks the transport's status, and `kiln.errors.seed_error_body(err, req_id)` is the seed's error body.
Nothing here knows HTTP or gRPC.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from kiln.engine.request import INT64_MAX, SamplingParams
from kiln.errors import ErrorKind, RequestError
from kiln.server.frontend import Frontend, GenerationState, RequestRecord
from kiln.server.sampling import LengthWording, build_sampling_params
from kiln.server.structured_api import structured_outputs
from kiln.server.validation import check_int, check_prompt_chars, check_token_ids, prompt_char_bound

# the seed's defaults (spec section 3, step 4)
DEFAULT_MIN_DEC_LEN = 1
DEFAULT_TOPP = 0.7
DEFAULT_TEMPERATURE = 0.95
DEFAULT_PENALTY_SCORE = 1.0
DEFAULT_FREQUENCY_SCORE = 0.0
DEFAULT_PRESENCE_SCORE = 0.0

# the seed's words for the length checks (spec section 3, steps 7-9)
SEED_LENGTH_WORDING = LengthWording(
    min_leaves_no_room=("Input text is too long, input_ids_len ({n}) + min_dec_len ({min_tokens}) >= max_seq_len "
                        "({max_len})", ErrorKind.TOO_LONG, None),
    prompt_over_seq=("Length of input token({n}) exceeds the limit MAX_SEQ_LEN({max_seq}).", ErrorKind.TOO_LONG, None),
    max_over_limit=("The parameter max_dec_len({max_tokens}) exceeds the limit MAX_DEC_LEN({limit}).",
                    ErrorKind.INVALID, "max_dec_len"),
    min_over_limit=("The parameter min_dec_len({min_tokens}) exceeds the limit MAX_DEC_LEN({limit}).",
                    ErrorKind.INVALID, "min_dec_len"),
    total_over_len=("Input text is too long, input_ids_len ({n}) + max_dec_len ({max_tokens}) > max_seq_len "
                    "({max_len})", ErrorKind.TOO_LONG, None),
    min_over_max=("The `min_dec_len` ({min_tokens}) must not be greater than `max_dec_len` ({max_tokens})",
                  ErrorKind.INVALID, "min_dec_len"),
)


@dataclass
class SeedRequest:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int] = field(default_factory=list)
    stream: bool = False
    timeout: float = 300.0
    return_usage: bool = False
    return_all_tokens: bool = False        # only the final packet (also DISABLE_STREAMING=1)
    benchmark: bool = False
    infer_seed: int | None = None
    arrival_time: float = 0.0              # time.time()
    preprocess_start_time: float = 0.0
    preprocess_end_time: float = 0.0
    record: RequestRecord | None = None
    api: str = "native"


# ----------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------

def _fail(msg: str, kind: ErrorKind = ErrorKind.INVALID, param: str | None = None) -> RequestError:
    return RequestError(msg, kind, param=param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flag(d: dict, key: str, default: bool = False) -> bool:
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    if _is_int(v) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    raise _fail(f"The `{key}` must be a boolean", param=key)


def _message_text(content: Any) -> str:
    """OpenAI-style content parts -> text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise _fail("Only text content is supported in `messages`", param="messages")
        return "".join(parts)
    if content is None:
        return ""
    raise _fail("The `content` of a message must be a string", param="messages")


def normalize_messages(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        role = m.get("role") or "user"
        if not isinstance(role, str):
            raise _fail("The `role` of a message must be a string", param="messages")
        item = {"role": role, "content": _message_text(m.get("content"))}
        for k, v in m.items():
            if k not in ("role", "content"):
                item[k] = v
        out.append(item)
    return out


def check_basic_params(d: dict) -> None:
    """The seed's check_basic_params (spec section 3, step 2), in its order; fills the aliases
    (seq_len / max_tokens -> max_dec_len, top_p -> topp, seed -> infer_seed, eos int -> list).
    Raises the first problem as a RequestError."""
    has = ("text" in d, "input_ids" in d, "messages" in d)
    if not any(has):
        raise _fail("The input parameters should contain either `text`, `input_ids` or `messages`")
    if "text" in d:
        if not isinstance(d["text"], str):
            raise _fail("The `text` in input parameters must be a string", param="text")
        if d["text"] == "" and not d.get("input_ids") and not d.get("messages"):
            raise _fail("The `text` in input parameters cannot be empty", param="text")
    if "input_ids" in d:
        ids = d["input_ids"]
        if not isinstance(ids, list):
            raise _fail("The `input_ids` in input parameters must be a list", param="input_ids")
        if not all(_is_int(t) and t >= 0 for t in ids):
            raise _fail("The `input_ids` must be a list of non-negative integers (token ids)", param="input_ids")
        if not ids and "text" not in d and "messages" not in d:
            raise _fail("The `input_ids` in input parameters cannot be empty", param="input_ids")
    if "messages" in d:
        msgs = d["messages"]
        if not isinstance(msgs, list):
            raise _fail("The `messages` in input parameters must be a list", param="messages")
        if not msgs and not d.get("input_ids") and not d.get("text"):
            raise _fail("The `messages` in input parameters cannot be empty", param="messages")
        if not all(isinstance(m, dict) and "content" in m for m in msgs):
            raise _fail("The item in messages must include `content`", param="messages")

    if "min_dec_len" in d and (not _is_int(d["min_dec_len"]) or not 1 <= d["min_dec_len"] <= INT64_MAX):
        raise _fail("The `min_dec_len` must be an integer and greater than 0", param="min_dec_len")
    for key in ("max_dec_len", "seq_len", "max_tokens"):
        if key in d and d[key] is not None and (not _is_int(d[key]) or not 1 <= d[key] <= INT64_MAX):
            raise _fail(f"The `{key}` must be an integer and greater than 0", param=key)
    if d.get("max_dec_len") is None:
        if d.get("seq_len") is not None:
            d["max_dec_len"] = d["seq_len"]
        elif d.get("max_tokens") is not None:
            d["max_dec_len"] = d["max_tokens"]

    if "topp" in d and "top_p" in d:
        raise _fail("Only one of ('topp', 'top_p') should be set", param="top_p")
    for key in ("topp", "top_p"):
        if key in d:
            if not _is_num(d[key]) or not 0 <= d[key] <= 1:
                raise _fail(f"The `{key}` must be in [0, 1]", param=key)
    if "top_p" in d:
        d["topp"] = d.pop("top_p")

    if "temperature" in d:
        if not _is_num(d["temperature"]):
            raise _fail("The `temperature` must be a number", param="temperature")
        if d["temperature"] < 0:
            raise _fail("The `temperature` must be >= 0", param="temperature")

    if "eos_token_ids" in d:
        e = d["eos_token_ids"]
        if _is_int(e):
            e = [e]
        elif isinstance(e, tuple):
            e = list(e)
        if not isinstance(e, list):
            raise _fail("The `eos_token_ids` must be a list of token ids", param="eos_token_ids")
        d["eos_token_ids"] = check_token_ids(e, None, "eos_token_ids")

    if "infer_seed" in d and "seed" in d:
        raise _fail("Only one of ('infer_seed', 'seed') should be set", param="seed")
    if "seed" in d:
        d["infer_seed"] = d.pop("seed")
    if "infer_seed" in d and d["infer_seed"] is not None:
        check_int(d["infer_seed"], "seed", hi=2**64 - 1)

    if "stream" in d and not isinstance(d["stream"], bool):
        raise _fail("The `stream` must be a boolean", param="stream")


def _value(d: dict, key: str, default: float) -> float:
    v = d.get(key)
    return default if v is None else float(v)


def _number(d: dict, key: str, default: float, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> float:
    v = d.get(key, default)
    if v is None:
        return default
    if not _is_num(v):
        raise _fail(f"The `{key}` must be a number", param=key)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        lo_s = f"{'(' if lo_open else '['}{lo:g}" if lo is not None else "(-inf"
        hi_s = f"{hi:g}]" if hi is not None else "inf)"
        raise _fail(f"The `{key}` must be in {lo_s}, {hi_s}", param=key)
    return float(v)


def _stop_strings(frontend: Frontend, d: dict) -> tuple[list[str], list[int]]:
    """stop_sequences / stop: strings (matched on text) or token-id sequences."""
    strings: list[str] = []
    ids: list[int] = []
    for key in ("stop_sequences", "stop"):
        v = d.get(key)
        if v is None:
            continue
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list):
            raise _fail(f"The `{key}` must be a string or a list of strings / token-id lists", param=key)
        if items and all(_is_int(t) for t in items):  # one token sequence given flat
            items = [items]
        for s in items:
            if isinstance(s, str):
                if s:
                    strings.append(s)
            elif isinstance(s, list) and s and all(_is_int(t) for t in s):
                check_token_ids(s, getattr(frontend.tokenizer, "vocab_size", None), key)
                if len(s) == 1:
                    ids.append(s[0])
                else:
                    strings.append(frontend.tokenizer.decode(s, skip_special_tokens=False))
            else:
                raise _fail(f"The `{key}` must be a string or a list of strings / token-id lists", param=key)
    return strings, ids


async def parse_seed_request(body: Any, frontend: Frontend, *, api: str = "native",
                             arrival_time: float | None = None) -> SeedRequest:
    """Validate a seed request dict and turn it into token ids + SamplingParams (spec section 3, steps 2-9;
    the queue cap (1), duplicate req_id (3) and the KV-resource check (10) are the engine's, which sees every
    front end). Raises RequestError."""
    t0 = time.time()
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object", ErrorKind.BAD_BODY)
    d = dict(body)
    req_id = d.get("req_id")
    if req_id is None or req_id == "":
        req_id = str(uuid.uuid4())
    elif isinstance(req_id, (str, int)) and not isinstance(req_id, bool):
        req_id = str(req_id)
    else:
        raise _fail("The `req_id` must be a string", param="req_id")

    check_basic_params(d)

    cfg = frontend.cfg
    min_dec_len = d.get("min_dec_len", DEFAULT_MIN_DEC_LEN)
    topp = _value(d, "topp", DEFAULT_TOPP)                       # both checked by check_basic_params
    temperature = _value(d, "temperature", DEFAULT_TEMPERATURE)
    penalty = _number(d, "penalty_score", DEFAULT_PENALTY_SCORE, 0.0, lo_open=True)
    frequency = _number(d, "frequency_score", DEFAULT_FREQUENCY_SCORE, -2.0, 2.0)
    presence = _number(d, "presence_score", DEFAULT_PRESENCE_SCORE, -2.0, 2.0)
    top_k = d.get("top_k", 0)
    if top_k is None:
        top_k = 0
    if not _is_int(top_k) or not -1 <= top_k <= INT64_MAX:
        raise _fail("The `top_k` must be an integer in [0, 2^63) (0 or -1: off)", param="top_k")
    min_p = _number(d, "min_p", 0.0, 0.0, 1.0)
    timeout = d.get("timeout")
    if timeout is None:
        timeout = cfg.request_timeout
    if not _is_num(timeout) or timeout <= 0:
        raise _fail("The `timeout` must be a number of seconds greater than 0", param="timeout")
    stream = d.get("stream", False)
    return_usage = _flag(d, "return_usage")
    return_all_tokens = _flag(d, "return_all_tokens")
    benchmark = _flag(d, "benchmark")
    truncate = _flag(d, "enable_text_truncate", False)
    stop_strings, stop_ids = _stop_strings(frontend, d)
    structured = await structured_outputs(d)   # `response_format`, as the OpenAI API's
    model = d.get("model")  # Kiln's extension, OpenAI's name: a LoRA adapter of KILN_LORA_MODULES picks it
    if model is not None and not isinstance(model, str):
        raise _fail("The `model` must be a string (a LoRA adapter's name)", param="model")
    system = d.get("system")
    if system is not None and not isinstance(system, str):
        raise _fail("The `system` must be a string", param="system")

    # step 5: the prompt's token ids
    tok = frontend.tokenizer
    ids = d.get("input_ids")
    from_text = False
    if ids:
        prompt = check_token_ids(ids, getattr(tok, "vocab_size", None), "input_ids")
    else:
        from_text = True
        if d.get("messages"):
            messages = normalize_messages(d["messages"])
        else:
            messages = [{"role": "user", "content": d["text"]}]
        if system:
            messages = [{"role": "system", "content": system}] + messages
        # refuse (or, truncating, cut) a text that cannot fit MAX_SEQ_LEN before spending time tokenizing it
        num_chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
        if truncate and not d.get("messages") and num_chars > prompt_char_bound(frontend.max_seq_len):
            messages[-1]["content"] = messages[-1]["content"][:prompt_char_bound(frontend.max_seq_len)]
            d["text"] = messages[-1]["content"]
        elif not truncate:
            check_prompt_chars(num_chars, frontend.max_seq_len, "messages" if d.get("messages") else "text")
        try:
            if d.get("messages") or tok.has_chat_template:
                prompt = await frontend.run_tokenizer(tok.apply_chat_template, messages, True, size=num_chars)
            else:
                text = d["text"] if not system else system + "\n" + d["text"]
                prompt = await frontend.run_tokenizer(tok.encode, text, True, size=num_chars)
        except ValueError as e:
            raise _fail(str(e)) from None
    if not prompt:
        raise _fail("The prompt is empty after tokenization")

    limits = await frontend.limits(float(timeout))
    if truncate and from_text and len(prompt) > limits.max_seq_len:
        prompt = prompt[:limits.max_seq_len]  # the seed's enable_text_truncate keeps the head
    # steps 6-9: the default max_dec_len and the length checks, in the seed's words
    params = build_sampling_params(
        limits, len(prompt), SEED_LENGTH_WORDING, max_tokens=d.get("max_dec_len"), min_tokens=min_dec_len,
        temperature=temperature, top_p=topp, top_k=top_k, min_p=min_p, repetition_penalty=penalty,
        frequency_penalty=frequency, presence_penalty=presence, seed=d.get("infer_seed"), stop=stop_strings,
        stop_token_ids=stop_ids, structured=structured)
    if model in getattr(frontend, "lora_modules", {}):
        params.lora_name = model

    eos = list(d.get("eos_token_ids") or [])
    now = time.time()
    req = SeedRequest(
        req_id=req_id, prompt_token_ids=prompt, params=params, eos_token_ids=eos, stream=stream,
        timeout=float(timeout), return_usage=return_usage,
        return_all_tokens=return_all_tokens or cfg.disable_streaming, benchmark=benchmark,
        infer_seed=d.get("infer_seed"), arrival_time=arrival_time or t0, preprocess_start_time=t0,
        preprocess_end_time=now, api=api)
    return req


# ----------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------

def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def run_seed_request(req: SeedRequest, frontend: Frontend) -> AsyncIterator[dict[str, Any]]:
    """Run a validated request; yield seed packets: one per token (is_end=0), the last with is_end=1,
    tokens_all*, finish_reason; only the final one when return_all_tokens / DISABLE_STREAMING.
    Raises RequestError (rejection, timeout, engine failure); leaving early aborts the request."""
    record = req.record or frontend.new_record(req.req_id, req.api, req.arrival_time)
    req.record = record
    deadline = time.monotonic() + req.timeout - max(0.0, time.time() - req.arrival_time)
    state = GenerationState()
    schedule_start = time.time()
    send_idx = 0
    stream = frontend.stream(req.req_id, req.prompt_token_ids, req.params, record=record,
                             eos_token_ids=req.eos_token_ids, deadline=deadline, state=state,
                             timeout_s=req.timeout)
    P = len(req.prompt_token_ids)
    try:
        async for ev in stream:
            if req.return_all_tokens and not ev.finished:
                continue
            now = time.time()
            if req.return_all_tokens:
                packet: dict[str, Any] = {"req_id": req.req_id, "token": state.text,
                                          "token_ids": list(state.token_ids), "send_idx": 0}
            else:
                packet = {"req_id": req.req_id, "token": ev.text, "token_ids": ev.token_ids, "send_idx": send_idx}
            packet["is_end"] = 1 if ev.finished else 0
            packet["inference_time_cost"] = round(now - req.arrival_time, 6)
            if req.infer_seed is not None:
                packet["infer_seed"] = req.infer_seed
            if req.return_usage:
                packet["usage"] = _usage(P, ev.num_output_tokens)
            if req.benchmark:
                packet["preprocess_start_time"] = req.preprocess_start_time
                packet["preprocess_end_time"] = req.preprocess_end_time
                packet["schedule_start_time"] = schedule_start
                packet["inference_start_time"] = record.first_token_time
                packet["inference_current_step_time"] = now
            if ev.finished:
                packet["tokens_all"] = state.text
                packet["tokens_all_num"] = len(state.token_ids)
                packet["tokens_all_ids"] = list(state.token_ids)
                packet["finish_reason"] = ev.finish_reason
            packet["error_msg"] = ""
            packet["error_code"] = 0
            send_idx += 1
            yield packet
            if ev.finished:
                return
    finally:
        await stream.aclose()


async def collect_seed_result(req: SeedRequest, frontend: Frontend) -> dict[str, Any]:
    """The non-stream native body: {req_id, result, tokens_all, tokens_all_num, tokens_all_ids,
    finish_reason, usage?, error_msg, error_code}. Raises RequestError."""
    final: dict[str, Any] | None = None
    req.return_all_tokens = True
    async for packet in run_seed_request(req, frontend):
        final = packet
    assert final is not None
    out: dict[str, Any] = {"req_id": req.req_id, "result": final["tokens_all"], "tokens_all": final["tokens_all"],
                           "tokens_all_num": final["tokens_all_num"], "tokens_all_ids": final["tokens_all_ids"],
                           "finish_reason": final["finish_reason"],
                           "inference_time_cost": final["inference_time_cost"]}
    if req.infer_seed is not None:
        out["infer_seed"] = req.infer_seed
    if req.return_usage:
        out["usage"] = final["usage"]
    if req.benchmark:
        for k in ("preprocess_start_time", "preprocess_end_time", "schedule_start_time", "inference_start_time",
                  "inference_current_step_time"):
            out[k] = final.get(k)
    out["error_msg"] = ""
    out["error_code"] = 0
    return out


__all__ = ["SeedRequest", "parse_seed_request", "run_seed_request", "collect_seed_result",
           "check_basic_params", "RequestError"]
