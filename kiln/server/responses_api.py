"""OpenAI's Responses API (POST /v1/responses) over the chat path: a request becomes the chat request it means
(instructions as the system turn, input items as messages, function tools and their calls and outputs, text.format
as response_format), runs as one, and its answer is written back as a Response object or as the Responses stream
of events.

The server keeps no responses (as vLLM without a store): `previous_response_id` is refused, naming how to send
the conversation instead, and `store` is accepted but stores nothing.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from kiln.errors import ErrorKind, RequestError

# Responses fields with a chat equivalent, or that change nothing here
_CHAT_FIELDS = {"max_output_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                "tool_choice": "tool_choice", "parallel_tool_calls": "parallel_tool_calls", "user": "user",
                "seed": "seed", "top_k": "top_k", "stop": "stop"}
# a chat request's field at fault -> the Responses field the user wrote
_RESPONSES_PARAM = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text"}
_IGNORED = {"model", "input", "instructions", "stream", "tools", "text", "store", "metadata", "reasoning",
            "top_logprobs", "truncation", "include", "service_tier", "prompt_cache_key", "safety_identifier",
            "background", "stream_options", "max_tool_calls", "previous_response_id", "conversation"}


def _bad(msg: str, param: str | None = None) -> RequestError:
    return RequestError(msg, ErrorKind.INVALID, param=param)


def _text_of(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of input_text / output_text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of text parts", "input")
    out = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _bad(f"{where}.content: a part of type {kind!r}; this server takes text parts (input_text, "
                       f"output_text) only", "input")
        out.append(part["text"])
    return "".join(out)


def _messages(body: dict) -> list[dict]:
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("`instructions` must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("`input` must be a string or a non-empty list of input items", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object (a message, function_call or function_call_output)", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(f"{where}.role must be user, assistant, system or developer", "input")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if not all(isinstance(x, str) for x in (call["id"], item.get("name"), item.get("arguments"))):
                raise _bad(f"{where}: a function_call needs string call_id, name and arguments", "input")
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise _bad(f"{where}: a function_call_output needs string call_id and output", "input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        elif kind == "reasoning":
            continue  # a model's earlier reasoning: chat templates drop it too
        else:
            raise _bad(f"{where}: input items of type {kind!r} are not supported here (message, function_call, "
                       f"function_call_output)", "input")
    return messages


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("`tools` must be a list", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise _bad(f"tools[{i}]: tools of type {kind!r} are not supported here (function tools are)", "tools")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        out.append({"type": "function", "function": fn})
    return out


# the request body as the OpenAPI document describes it (kiln.server.openapi)
OPENAPI_SCHEMA = {
    "title": "ResponsesRequest", "type": "object", "required": ["input"],
    "properties": {"model": {"type": "string"}, "input": {"anyOf": [{"type": "string"}, {"type": "array"}]},
                   "instructions": {"type": "string"}, "max_output_tokens": {"type": "integer"},
                   "temperature": {"type": "number"}, "top_p": {"type": "number"}, "stream": {"type": "boolean"},
                   "tools": {"type": "array"}, "tool_choice": {}, "text": {"type": "object"},
                   "parallel_tool_calls": {"type": "boolean"}, "store": {"type": "boolean"},
                   "metadata": {"type": "object"}}}


def to_chat_body(body: Any) -> dict:
    """The chat completion request a Responses request means (RequestError naming what to fix)."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    unknown = sorted(set(body) - set(_CHAT_FIELDS) - _IGNORED)
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(unknown)}", unknown[0])
    if body.get("previous_response_id") is not None or body.get("conversation") is not None:
        raise _bad("this server keeps no responses: send the whole conversation in `input` (earlier messages, "
                   "function_call and function_call_output items) instead of previous_response_id / conversation",
                   "previous_response_id")
    if body.get("top_logprobs"):
        raise _bad("top_logprobs is not served on /v1/responses (the chat and completions APIs give logprobs)",
                   "top_logprobs")
    if body.get("background"):
        raise _bad("background responses are not supported: this server keeps no responses", "background")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body)}
    for ours, theirs in _CHAT_FIELDS.items():
        if body.get(ours) is not None:
            chat[theirs] = body[ours]
    tc = body.get("tool_choice")
    if isinstance(tc, dict):  # {"type": "function", "name": ...} -> chat's {"type": "function", "function": {...}}
        if tc.get("type") != "function" or not isinstance(tc.get("name"), str):
            raise _bad("`tool_choice` must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                       "tool_choice")
        chat["tool_choice"] = {"type": "function", "function": {"name": tc["name"]}}
    tools = _tools(body)
    if tools is not None:
        chat["tools"] = tools
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if body.get("text") is not None and not isinstance(body.get("text"), dict):
        raise _bad("`text` must be an object, e.g. {\"format\": {\"type\": \"json_schema\", ...}}", "text")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise _bad("`text.format.type` must be text, json_object or json_schema", "text")
        if fmt["type"] == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
        elif fmt["type"] == "json_object":
            chat["response_format"] = {"type": "json_object"}
    return chat


def in_responses_terms(e: RequestError) -> RequestError:
    """A chat-path error about a field the user wrote under its Responses name, named that way."""
    theirs = _RESPONSES_PARAM.get(e.param or "")
    if theirs is None:
        return e
    message = e.message.replace("max_tokens", theirs) if e.param == "max_tokens" else e.message
    return RequestError(message, e.kind, e.code, theirs)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseWriter:
    """One response's objects: its output items as they are made, and the Response object around them."""

    def __init__(self, body: dict, model: str):
        self.body, self.model = body, model
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.message_id = new_id("msg")
        self.reasoning_id = new_id("rs")

    def reasoning_item(self, text: str, status: str = "completed") -> dict:
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": text}]}

    def message_item(self, text: str | None, status: str = "completed") -> dict:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def call_item(call: dict) -> dict:
        return {"type": "function_call", "id": new_id("fc"), "call_id": call["id"], "name": call["function"]["name"],
                "arguments": call["function"]["arguments"], "status": "completed"}

    def items(self, message: dict) -> list[dict]:
        """A finished chat message (chat_message's) as output items: reasoning, text, function calls."""
        out = []
        if message.get("reasoning_content"):
            out.append(self.reasoning_item(message["reasoning_content"]))
        calls = message.get("tool_calls") or []
        if message.get("content") or not calls:
            out.append(self.message_item(message.get("content") or ""))
        out += [self.call_item(c) for c in calls]
        return out

    def response(self, output: list[dict], status: str = "completed", usage: tuple[int, int] | None = None,
                 finish_reason: str | None = None) -> dict:
        b = self.body
        incomplete = status == "completed" and finish_reason == "length"
        fmt = (b.get("text") or {}).get("format") if isinstance(b.get("text"), dict) else None
        r = {"id": self.id, "object": "response", "created_at": self.created_at,
             "status": "incomplete" if incomplete else status, "model": self.model, "output": output,
             "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "error": None,
             "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
             "temperature": b.get("temperature"), "top_p": b.get("top_p"),
             "parallel_tool_calls": b.get("parallel_tool_calls", True), "tool_choice": b.get("tool_choice", "auto"),
             "tools": b.get("tools") or [], "text": {"format": fmt or {"type": "text"}}, "store": False,
             "metadata": b.get("metadata") or {}, "previous_response_id": None, "reasoning": b.get("reasoning"),
             "usage": None}
        if usage is not None:
            r["usage"] = {"input_tokens": usage[0], "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": usage[1], "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": usage[0] + usage[1]}
        return r


class ResponseEvents:
    """The Responses stream's events for one generation: created and in_progress, then its reasoning, text and
    function calls as output items (added, deltas, done), then completed (or incomplete at max_output_tokens)."""

    def __init__(self, writer: ResponseWriter):
        self.w = writer
        self.seq = 0
        self.output: list[dict] = []
        self.reasoning: str | None = None   # reasoning text of an open reasoning item
        self.text: str | None = None        # text of the open message item

    def _ev(self, kind: str, **fields) -> dict:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def start(self) -> list[dict]:
        r = self.w.response([], "in_progress")
        return [self._ev("response.created", response=r), self._ev("response.in_progress", response=r)]

    def _close_reasoning(self) -> list[dict]:
        if self.reasoning is None:
            return []
        item, idx = self.w.reasoning_item(self.reasoning), len(self.output)
        self.output.append(item)
        self.reasoning = None
        return [self._ev("response.reasoning_text.done", item_id=item["id"], output_index=idx, content_index=0,
                         text=item["content"][0]["text"]),
                self._ev("response.output_item.done", output_index=idx, item=item)]

    def delta(self, delta: dict) -> list[dict]:
        """A chat delta (ChatChoiceStream's): reasoning_content and content become text deltas of their items
        (tool-call deltas wait for the end, where the calls are read whole)."""
        out = []
        if delta.get("reasoning_content"):
            if self.reasoning is None:
                self.reasoning = ""
                out.append(self._ev("response.output_item.added", output_index=len(self.output),
                                    item=self.w.reasoning_item("", "in_progress")))
            self.reasoning += delta["reasoning_content"]
            out.append(self._ev("response.reasoning_text.delta", item_id=self.w.reasoning_id,
                                output_index=len(self.output), content_index=0, delta=delta["reasoning_content"]))
        if delta.get("content"):
            out += self._close_reasoning()
            if self.text is None:
                self.text = ""
                idx = len(self.output)
                out.append(self._ev("response.output_item.added", output_index=idx,
                                    item=self.w.message_item(None, "in_progress")))
                out.append(self._ev("response.content_part.added", item_id=self.w.message_id, output_index=idx,
                                    content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
            self.text += delta["content"]
            out.append(self._ev("response.output_text.delta", item_id=self.w.message_id,
                                output_index=len(self.output), content_index=0, delta=delta["content"],
                                logprobs=[]))
        return out

    def finish(self, message: dict, usage: tuple[int, int], finish_reason: str | None) -> list[dict]:
        """The end: open items closed, the function calls of the finished message, and the response."""
        out = self._close_reasoning()
        calls = message.get("tool_calls") or []
        if self.text is None and not calls:  # no text came: still one (empty) message, as the object has
            self.text = ""
            out.append(self._ev("response.output_item.added", output_index=len(self.output),
                                item=self.w.message_item(None, "in_progress")))
            out.append(self._ev("response.content_part.added", item_id=self.w.message_id,
                                output_index=len(self.output), content_index=0,
                                part={"type": "output_text", "text": "", "annotations": []}))
        if self.text is not None:
            idx = len(self.output)
            item = self.w.message_item(self.text)
            out += [self._ev("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                             text=self.text, logprobs=[]),
                    self._ev("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                             part=item["content"][0]),
                    self._ev("response.output_item.done", output_index=idx, item=item)]
            self.output.append(item)
        for call in calls:
            item, idx = self.w.call_item(call), len(self.output)
            out += [self._ev("response.output_item.added", output_index=idx, item={**item, "status": "in_progress"}),
                    self._ev("response.function_call_arguments.delta", item_id=item["id"], output_index=idx,
                             delta=item["arguments"]),
                    self._ev("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                             arguments=item["arguments"], name=item["name"]),
                    self._ev("response.output_item.done", output_index=idx, item=item)]
            self.output.append(item)
        r = self.w.response(self.output, usage=usage, finish_reason=finish_reason)
        return out + [self._ev("response.completed" if r["status"] == "completed" else "response.incomplete",
                               response=r)]

    def error(self, e: RequestError) -> dict:
        return self._ev("error", message=e.message, code=str(e.kind), param=e.param)
