"""Structured outputs on the API side: one function every front end calls to read a request's
structured-output fields into a `StructuredSpec` and check it (kiln/engine/structured.py does the rest).

Fields, under the names clients already send:
  OpenAI  `response_format`: {"type": "text"} | {"type": "json_object"} |
          {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}
          (the native API and KServe take the same object, or its JSON text, as `response_format`)
  vLLM    `structured_outputs`: {"json": schema} | {"regex": str} | {"choice": [str, ...]} | {"grammar": ebnf}
          | {"json_object": true}; and the older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`
"""
from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from kiln.engine.structured import GrammarError, StructuredSpec, grammar_of
from kiln.errors import RequestError

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _bad(msg: str, param: str) -> RequestError:
    return RequestError(msg, "invalid", param=param)


def _schema(value: Any, param: str) -> StructuredSpec:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise _bad(f"`{param}` is not valid JSON: {e}", param) from None
    if not isinstance(value, (dict, bool)):
        raise _bad(f"`{param}` must be a JSON schema (an object), got {type(value).__name__}", param)
    return StructuredSpec.json_schema(value)


def _from_response_format(rf: Any) -> StructuredSpec | None:
    param = "response_format"
    if isinstance(rf, str):  # KServe parameters and form-like clients send it as JSON text
        try:
            rf = json.loads(rf)
        except ValueError as e:
            raise _bad(f"`response_format` is not valid JSON: {e}", param) from None
    if not isinstance(rf, dict):
        raise _bad("`response_format` must be an object such as {\"type\": \"json_object\"}", param)
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec("json_object", "")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise _bad("`response_format.json_schema` must be an object with a `schema`", "response_format.json_schema")
        if "schema" not in js:
            raise _bad("`response_format.json_schema.schema` is required", "response_format.json_schema.schema")
        return _schema(js["schema"], "response_format.json_schema.schema")
    raise _bad(f"`response_format.type` must be text, json_object or json_schema, got {kind!r}", "response_format.type")


def _from_vllm(kind: str, value: Any, param: str) -> StructuredSpec:
    if kind == "json":
        return _schema(value, param)
    if kind == "json_object":
        return StructuredSpec("json_object", "")
    if kind in ("regex", "grammar"):
        if not isinstance(value, str) or not value:
            raise _bad(f"`{param}` must be a non-empty string", param)
        return StructuredSpec(kind, value)
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
            raise _bad(f"`{param}` must be a non-empty list of non-empty strings", param)
        return StructuredSpec.choice(value)
    raise _bad(f"`{param}`: unknown kind {kind!r}", param)


async def structured_outputs(body: dict[str, Any]) -> StructuredSpec | None:
    """The request's structured-output constraint, checked (off the event loop), or None. Raises RequestError
    ("invalid", a 400) that names the field and what is wrong with the schema / regex / grammar."""
    found: list[tuple[str, StructuredSpec | None]] = []
    if body.get("response_format") is not None:
        found.append(("response_format", _from_response_format(body["response_format"])))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("`structured_outputs` must be an object such as {\"regex\": \"...\"}", "structured_outputs")
        given = [(k, v) for k, v in so.items() if k in ("json", "regex", "choice", "grammar", "json_object")
                 and v not in (None, False)]
        if len(given) != 1:
            raise _bad("`structured_outputs` must hold exactly one of json, regex, choice, grammar, json_object",
                       "structured_outputs")
        k, v = given[0]
        found.append(("structured_outputs", _from_vllm(k, v, f"structured_outputs.{k}")))
    for name, kind in _GUIDED.items():
        if body.get(name) is not None:
            found.append((name, _from_vllm(kind, body[name], name)))
    specs = [(name, spec) for name, spec in found if spec is not None]
    if len(specs) > 1:
        raise _bad(f"give one structured-output constraint, got {', '.join(n for n, _ in specs)}", specs[1][0])
    if not specs:
        return None
    name, spec = specs[0]
    why = await asyncio.get_running_loop().run_in_executor(None, _check, spec)
    if why:
        raise _bad(f"`{name}`: {why}", name)
    return spec


@functools.lru_cache(maxsize=256)
def _check(spec: StructuredSpec) -> str | None:
    """Why xgrammar cannot take the spec (None: it can). Converting needs no tokenizer (ms); the engine
    compiles against the vocabulary later, off its loop and under its time limit."""
    try:
        grammar_of(spec)
    except GrammarError as e:
        return str(e)
    return None
