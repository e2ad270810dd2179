"""From a validated API request to `SamplingParams`: the one home of the length limits, the default number of
new tokens, the length checks and the greedy rule, for every API (native, OpenAI, KServe, gRPC).

Each API keeps only its field names, its defaults and its wording (a `LengthWording`); the rules are here.
The limits come from the engine (`Frontend.limits()`): MAX_SEQ_LEN and MAX_DEC_LEN are the server's settings,
max_model_len is what the engine publishes (its model's length, capped by MAX_SEQ_LEN + MAX_DEC_LEN), so a
request the front end accepts is never refused by the engine for its length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from kiln.engine.request import SamplingParams
from kiln.errors import ErrorKind, RequestError


@dataclass(frozen=True)
class Limits:
    max_seq_len: int     # MAX_SEQ_LEN: prompt tokens
    max_dec_len: int     # MAX_DEC_LEN: new tokens
    max_model_len: int   # prompt + new tokens (the engine's)
    embedding_size: int = 0  # an embedding's length (the engine's model)


# (message, error kind, the field at fault); the message's str.format fields: n (prompt tokens), max_seq,
# limit (MAX_DEC_LEN), max_len (max_model_len), max_tokens, min_tokens, total (n + max_tokens)
Check = tuple[str, ErrorKind, Optional[str]]


@dataclass(frozen=True)
class LengthWording:
    """One API's words for the length checks, in the order they run. None: the API does not check it."""
    prompt_over_seq: Check
    max_over_limit: Check
    total_over_len: Check
    min_over_max: Check
    min_leaves_no_room: Check | None = None   # n + min_tokens >= max_model_len (the seed's step 7)
    min_over_limit: Check | None = None


def is_greedy(temperature: float, top_p: float) -> bool:
    """The rule every API shares: temperature 0 or top_p 0 means greedy decoding."""
    return temperature == 0 or top_p == 0


def build_sampling_params(limits: Limits, prompt_len: int, wording: LengthWording, *, max_tokens: int | None,
                          min_tokens: int = 0, default_max_tokens: int | None = None, temperature: float = 1.0,
                          top_p: float = 1.0, **fields: Any) -> SamplingParams:
    """SamplingParams for a prompt of `prompt_len` tokens, or a RequestError in the API's words.

    max_tokens None: as many as fit (max_model_len - prompt), at most MAX_DEC_LEN and default_max_tokens.
    `fields` are the other SamplingParams fields, already read from the request."""
    n, max_len, limit = prompt_len, limits.max_model_len, limits.max_dec_len
    if max_tokens is None:
        cap = limit if default_max_tokens is None else min(default_max_tokens, limit)
        max_tokens = max(1, min(max_len - n, cap))
    facts = dict(n=n, max_seq=limits.max_seq_len, limit=limit, max_len=max_len, max_tokens=max_tokens,
                 min_tokens=min_tokens, total=n + max_tokens)

    def check(failed: bool, words: Check | None) -> None:
        if failed and words is not None:
            msg, kind, param = words
            raise RequestError(msg.format(**facts), kind, param=param)

    check(n + min_tokens >= max_len, wording.min_leaves_no_room)
    check(n > limits.max_seq_len, wording.prompt_over_seq)
    check(max_tokens > limit, wording.max_over_limit)
    check(min_tokens > limit, wording.min_over_limit)
    check(n + max_tokens > max_len, wording.total_over_len)
    check(min_tokens > max_tokens, wording.min_over_max)
    greedy = is_greedy(temperature, top_p)
    try:
        return SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, temperature=0.0 if greedy else temperature,
                              top_p=1.0 if greedy else top_p, **fields)
    except (ValueError, TypeError) as e:
        raise RequestError(str(e), ErrorKind.INVALID) from None
