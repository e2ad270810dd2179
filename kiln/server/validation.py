"""Input hygiene shared by every front end (native HTTP, OpenAI, KServe HTTP, gRPC): JSON parsing with a depth
limit, no NaN/Infinity, no lone surrogates, integers that fit the engine's 64-bit fields, token ids inside the
vocabulary, and a prompt size bound checked before tokenizing.

Everything raises `RequestError` (kiln.errors) with a message that says what to fix; never the text of
an internal exception. The engine repeats the checks that guard it (SamplingParams.validate,
EngineCore.add_request): this is the front end's complete, friendlier pass.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable

from kiln.engine.request import INT64_MAX, INT64_MIN, UINT64_MAX
from kiln.errors import ErrorKind, RequestError

# Deep enough for any real request (messages with content parts, tool schemas), shallow enough that no code
# on the request path can hit Python's recursion limit.
MAX_JSON_DEPTH = 64
# A prompt longer than MAX_SEQ_LEN * this many characters cannot fit MAX_SEQ_LEN tokens with any tokenizer we
# serve (real tokens are a few characters; whitespace runs rarely pass 16), so it is refused before tokenizing.
MAX_CHARS_PER_TOKEN = 64


def invalid(msg: str, param: str | None = None) -> RequestError:
    return RequestError(msg, ErrorKind.INVALID, param=param)


def bad_body(msg: str) -> RequestError:
    return RequestError(msg, ErrorKind.BAD_BODY)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def loads_json(raw: bytes | str, what: str = "The request body") -> Any:
    """Parse JSON and check the whole tree (check_json_tree); RequestError("bad_body") on any problem."""
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise bad_body(f"{what} is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from None
    except json.JSONDecodeError as e:
        raise bad_body(f"{what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise bad_body(f"{what} is not valid UTF-8 text") from None
    except ValueError as e:  # NaN / Infinity, integers of thousands of digits
        msg = str(e) if "not a valid JSON number" in str(e) else "it holds a number that is too large"
        raise bad_body(f"{what} is not valid JSON: {msg}") from None
    check_json_tree(obj, what)
    return obj


def has_lone_surrogate(s: str) -> bool:
    """True when s holds a UTF-16 surrogate that is not part of a pair (JSON "\\ud800"): it has no UTF-8 form."""
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_json_tree(obj: Any, what: str = "The request body") -> None:
    """Walk a parsed JSON value without recursion: at most MAX_JSON_DEPTH levels, no string (key or value) with a
    lone surrogate, every integer in [-2^63, 2^64) (what a 64-bit field can hold), every float finite."""
    stack: list[tuple[Any, int, str]] = [(obj, 1, "")]
    while stack:
        v, depth, path = stack.pop()
        if isinstance(v, str):
            if has_lone_surrogate(v):
                raise bad_body(f"{what}: {_where(path)}holds a lone UTF-16 surrogate (e.g. \"\\ud800\"), which is not "
                               f"valid Unicode text")
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, int):
            if not INT64_MIN <= v <= UINT64_MAX:
                raise bad_body(f"{what}: {_where(path)}holds an integer outside the 64-bit range")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise bad_body(f"{what}: {_where(path)}holds a number too large to represent")
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise bad_body(f"{what} is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
            if isinstance(v, dict):
                for k, item in v.items():
                    if has_lone_surrogate(k):
                        raise bad_body(f"{what}: {_where(path)}has a key with a lone UTF-16 surrogate")
                    if isinstance(item, (dict, list, str, int, float)):
                        stack.append((item, depth + 1, f"{path}.{k}" if path else k))
            else:
                for item in v:
                    if isinstance(item, (dict, list, str, float)) or (isinstance(item, int) and
                                                                     not INT64_MIN <= item <= UINT64_MAX):
                        stack.append((item, depth + 1, path + "[]"))


def _where(path: str) -> str:
    return f"`{path}` " if path else ""


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(v: Any, name: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """An integer field: a JSON integer (not a bool, not a string) in [lo, hi]."""
    if not is_int(v):
        raise invalid(f"The `{name}` must be an integer", name)
    if not lo <= v <= hi:
        raise invalid(f"The `{name}` must be in [{lo}, {hi}], got {v}", name)
    return v


def check_token_ids(ids: Iterable[Any], vocab_size: int | None, name: str) -> list[int]:
    """Token ids: integers in [0, vocab_size) (or [0, 2^63) when the vocabulary size is unknown)."""
    out = list(ids)
    hi = vocab_size if vocab_size else INT64_MAX
    bad = [t for t in out if not is_int(t) or not 0 <= t < hi]
    if bad:
        shown = ", ".join(repr(t) for t in bad[:5])
        raise invalid(f"The `{name}` holds ids outside the vocabulary [0, {hi}) (token ids): {shown}", name)
    return out


def check_prompt_chars(num_chars: int, max_seq_len: int, name: str = "text") -> None:
    """Refuse a text prompt that cannot fit MAX_SEQ_LEN tokens, before spending time tokenizing it."""
    limit = max_seq_len * MAX_CHARS_PER_TOKEN
    if num_chars > limit:
        raise RequestError(f"The prompt is too long: {num_chars} characters cannot fit the limit MAX_SEQ_LEN "
                           f"({max_seq_len} tokens)", ErrorKind.TOO_LONG, param=name)


def prompt_char_bound(max_seq_len: int) -> int:
    """Characters of a text prompt that are certainly enough for MAX_SEQ_LEN tokens (enable_text_truncate keeps
    this head of an over-long text before tokenizing it)."""
    return max_seq_len * MAX_CHARS_PER_TOKEN
