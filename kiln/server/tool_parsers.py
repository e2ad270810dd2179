"""Tool calling for the OpenAI chat API: the request's `tools` / `tool_choice` checked and turned into a plan, the
JSON schema that forces a call (`tool_choice` "required" or a named function, held by a grammar), and parsers
that turn the model's output into OpenAI `tool_calls`, whole or as streamed deltas.

Native formats (what a model writes when it chooses to call, `tool_choice: "auto"`):
  hermes       Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, several in a row;
               text outside the tags is content (whitespace just before a tag or at the end is dropped)
  llama3_json  Llama 3.x: the whole output is `{"name": ..., "parameters": {...}}`, optionally after
               `<|python_tag|>`, several separated by `;`; anything else is content
Forced calls (the grammar's output, parsed as JSON): a named function's output is its arguments object; "required"
gives `[{"name": ..., "arguments": {...}}, ...]`.

Streaming commits to a call once its name and the start of its arguments object are seen; the arguments then
stream as they come. A call written another way (keys in another order, arguments as a string) is sent whole
once it is complete; a malformed one stays content.
"""
from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOOL_CALL_PARSERS = ("llama3_json", "hermes")
PYTHON_TAG = "<|python_tag|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")
# The head of a call object up to the `{` that opens its arguments: from here on the arguments can stream.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')
_DECODER = json.JSONDecoder()


class ToolCallError(ValueError):
    """A bad `tools` / `tool_choice` / tool message; `param` names the field (the API answers 400)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


# ----------------------------------------------------------------------------------------------------
# requests: tools, tool_choice, tool messages
# ----------------------------------------------------------------------------------------------------


def check_tools(tools: Any) -> list[dict]:
    """OpenAI `tools` -> normalized `{"type": "function", "function": {name, description?, parameters}}` dicts."""
    from jsonschema import Draft202012Validator, SchemaError

    if not isinstance(tools, list):
        raise ToolCallError("`tools` must be a list of {\"type\": \"function\", \"function\": {...}} objects", "tools")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolCallError(f"`{where}` must be an object with \"type\": \"function\"", where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolCallError(f"`{where}.function` must be an object with a `name`", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ToolCallError(f"`{where}.function.name` must be 1-64 characters of a-z, A-Z, 0-9, _, . or -",
                                f"{where}.function.name")
        if name in seen:
            raise ToolCallError(f"two tools are named {name!r}; tool names must be unique", f"{where}.function.name")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolCallError(f"`{where}.function.description` must be a string", f"{where}.function.description")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolCallError(f"`{where}.function.parameters` must be a JSON schema object",
                                f"{where}.function.parameters")
        try:
            Draft202012Validator.check_schema(params)
        except SchemaError as e:
            raise ToolCallError(f"`{where}.function.parameters` of {name!r} is not a valid JSON schema: {e.message}",
                                f"{where}.function.parameters") from None
        norm = {"name": name, "parameters": params}
        if desc is not None:
            norm["description"] = desc
        out.append({"type": "function", "function": norm})
    return out


def check_tool_messages(messages: list[dict]) -> None:
    """Assistant `tool_calls` and `role: "tool"` messages in the history have the OpenAI shape."""
    for i, m in enumerate(messages):
        if m.get("role") == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise ToolCallError(f"`messages[{i}]` has role \"tool\" and needs a `tool_call_id` (a string)",
                                f"messages[{i}].tool_call_id")
        calls = m.get("tool_calls")
        if calls is None:
            continue
        where = f"messages[{i}].tool_calls"
        if m.get("role") != "assistant" or not isinstance(calls, list):
            raise ToolCallError(f"`{where}` must be a list on an assistant message", where)
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ToolCallError(f"`{where}[{j}]` must be {{\"type\": \"function\", \"function\": {{\"name\", "
                                    f"\"arguments\"}}}}", f"{where}[{j}]")
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    raise ToolCallError(f"`{where}[{j}].function.arguments` is not valid JSON",
                                        f"{where}[{j}].function.arguments") from None
            if not isinstance(args, dict):
                raise ToolCallError(f"`{where}[{j}].function.arguments` must be a JSON object",
                                    f"{where}[{j}].function.arguments")


@dataclass
class ToolPlan:
    """What one chat request does with tools. `tools` go into the prompt (None: no tools rendered); `schema` (the
    forced modes) is the JSON schema the output is held to by a grammar."""

    mode: str                       # none | auto | required | named
    tools: list[dict] | None
    parser: str = "none"            # auto: the native format read from the output
    function: str | None = None     # named: the function's name
    parallel: bool = True
    schema: dict | None = None

    def structured_spec(self):
        """The forced modes' grammar for SamplingParams.structured (None otherwise); ToolCallError if it does not
        compile. The schema keeps its property order ("name" before "arguments"), so calls stream as they come."""
        if self.schema is None:
            return None
        from kiln.engine.structured import GrammarError, StructuredSpec, grammar_of

        spec = StructuredSpec.json_schema(self.schema)
        try:
            grammar_of(spec)
        except GrammarError as e:
            raise ToolCallError(f"the parameters of the forced tool call(s) do not make a grammar: {e}",
                                "tools") from None
        return spec

    def parse(self, text: str) -> ParsedOutput:
        if self.mode == "named":
            out = parse_named_call(text, self.function or "")
        elif self.mode == "required":
            out = parse_json_calls(text)
        elif self.mode == "auto" and self.parser == "hermes":
            out = parse_hermes(text)
        elif self.mode == "auto" and self.parser == "llama3_json":
            out = parse_llama3_json(text)
        else:
            out = ParsedOutput(text, [])
        if not self.parallel:
            out.tool_calls = out.tool_calls[:1]
        return out

    def stream_parser(self) -> "StreamingToolParser":
        if self.mode == "named":
            return ArgumentsStream(self.function or "")
        if self.mode == "required":
            return JsonCallsStream("json_array", self.parallel)
        if self.mode == "auto" and self.parser == "hermes":
            return HermesStream(self.parallel)
        if self.mode == "auto" and self.parser == "llama3_json":
            return JsonCallsStream("llama3_json", self.parallel)
        return StreamingToolParser(self.parallel)


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any, parser: str) -> ToolPlan | None:
    """The request's tool fields -> a ToolPlan (None: no tools). ToolCallError on bad input."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolCallError("`parallel_tool_calls` must be a boolean", "parallel_tool_calls")
    parallel = parallel_tool_calls is not False
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolCallError("`tool_choice` needs `tools`: name the functions the model may call", "tool_choice")
        if tools is not None and not isinstance(tools, list):
            check_tools(tools)
        return None
    tools = check_tools(tools)
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ToolCallError(f"`tool_choice` must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                                f"\"function\": {{\"name\": ...}}}}, got {choice!r}", "tool_choice")
        if choice == "none":
            return ToolPlan("none", None, parallel=parallel)
        if choice == "auto":
            return ToolPlan("auto", tools, parser=parser, parallel=parallel)
        return ToolPlan("required", tools, parallel=parallel, schema=required_calls_schema(tools, parallel))
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolCallError("a named `tool_choice` must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                            "tool_choice")
    name = fn["name"]
    if name not in by_name:
        raise ToolCallError(f"`tool_choice` names the function {name!r}, which is not in `tools` "
                            f"(tools: {', '.join(sorted(by_name))})", "tool_choice")
    return ToolPlan("named", tools, function=name, parallel=parallel, schema=named_call_schema(by_name[name]))


def named_call_schema(function: dict) -> dict:
    """The forced output of a named function: its arguments object."""
    params = dict(function.get("parameters") or {})
    params.setdefault("type", "object")
    return params


def required_calls_schema(tools: list[dict], parallel: bool = True) -> dict:
    """The forced output of tool_choice "required": a list of one (or, parallel, more) {name, arguments} objects."""
    options = [{"type": "object",
                "properties": {"name": {"const": t["function"]["name"]},
                               "arguments": named_call_schema(t["function"])},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": options[0] if len(options) == 1 else {"anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


# ----------------------------------------------------------------------------------------------------
# which native format a model writes
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _model_type(model_dir: str | None) -> tuple[str, str]:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text()) if model_dir else {}
    except (OSError, ValueError):
        cfg = {}
    archs = cfg.get("architectures") or [""]
    return str(cfg.get("model_type") or "").lower(), str(archs[0]).lower()


def select_parser(setting: str, model_dir: str | None, chat_template: str) -> str:
    """The parser for `tool_choice: "auto"`: the setting unless it is auto; else the chat template's format, the
    model family, and hermes for templates without tool support (Kiln's tool preamble asks for that format)."""
    if setting != "auto":
        return setting
    if TOOL_CALL_OPEN in chat_template:
        return "hermes"
    if PYTHON_TAG in chat_template or "ipython" in chat_template:
        return "llama3_json"
    model_type, arch = _model_type(model_dir)
    if model_type.startswith("qwen") or arch.startswith("qwen"):
        return "hermes"
    if "tools" not in chat_template:
        return "hermes"
    if "<|start_header_id|>" in chat_template:
        return "llama3_json"
    return "none"


# ----------------------------------------------------------------------------------------------------
# whole outputs
# ----------------------------------------------------------------------------------------------------


def _call_from_obj(obj: Any) -> ToolCall | None:
    """{"name": str, "arguments" | "parameters": object or its JSON text} -> a ToolCall."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _call_from_text(text: str) -> ToolCall | None:
    try:
        return _call_from_obj(json.loads(text))
    except ValueError:
        return None


def parse_hermes(text: str) -> ParsedOutput:
    """`<tool_call>{...}</tool_call>` blocks -> calls; the text around them (and malformed blocks) -> content."""
    calls, content, pos = [], [], 0
    while True:
        i = text.find(TOOL_CALL_OPEN, pos)
        if i < 0:
            content.append(text[pos:].rstrip())
            break
        j = text.find(TOOL_CALL_CLOSE, i)
        body_end = len(text) if j < 0 else j
        call = _call_from_text(text[i + len(TOOL_CALL_OPEN):body_end])
        if call is None:  # malformed: the block stays text, as written
            content.append(text[pos:body_end + (0 if j < 0 else len(TOOL_CALL_CLOSE))])
        else:
            content.append(text[pos:i].rstrip())
            calls.append(call)
        if j < 0:
            break
        pos = j + len(TOOL_CALL_CLOSE)
    joined = "".join(content)
    return ParsedOutput(joined or None, calls)


def _json_call_list(text: str, start: int, sep: str, close: str | None) -> list[ToolCall] | None:
    """Call objects from text[start:] separated by `sep` (and ended by `close`, when given); None if anything else."""
    calls, pos = [], start
    while True:
        pos = _skip_ws(text, pos)
        try:
            obj, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            return None
        call = _call_from_obj(obj)
        if call is None:
            return None
        calls.append(call)
        pos = _skip_ws(text, pos)
        if pos == len(text) and close is None:
            return calls
        if close is not None and text.startswith(close, pos) and not text[pos + len(close):].strip():
            return calls
        if not text.startswith(sep, pos):
            return None
        pos += len(sep)


def parse_llama3_json(text: str) -> ParsedOutput:
    """Llama 3.x: the whole output is call objects separated by `;` (optionally after <|python_tag|>), else content."""
    start = _skip_ws(text, 0)
    if text.startswith(PYTHON_TAG, start):
        start += len(PYTHON_TAG)
    calls = _json_call_list(text, start, ";", None) if text[start:].strip() else None
    return ParsedOutput(None, calls) if calls else ParsedOutput(text or None, [])


def parse_json_calls(text: str) -> ParsedOutput:
    """tool_choice "required": `[{"name": ..., "arguments": {...}}, ...]`; anything else is content."""
    start = _skip_ws(text, 0)
    calls = _json_call_list(text, start + 1, ",", "]") if text.startswith("[", start) else None
    return ParsedOutput(None, calls) if calls else ParsedOutput(text or None, [])


def parse_named_call(text: str, name: str) -> ParsedOutput:
    """A named tool_choice: the output is the arguments object."""
    try:
        args = json.loads(text)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        return ParsedOutput(text or None, [])
    return ParsedOutput(None, [ToolCall(name, text.strip())])


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


# ----------------------------------------------------------------------------------------------------
# streamed outputs
# ----------------------------------------------------------------------------------------------------


class _ValueEnd:
    """Finds where a JSON object that streams in ends (brackets counted outside strings)."""

    def __init__(self):
        self.depth, self.in_str, self.esc = 0, False, False

    def feed(self, text: str, start: int, stop: int) -> int | None:
        """Scan text[start:stop] (the part not scanned yet); the index just past the value's end, or None."""
        for i in range(start, stop):
            c = text[i]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


def _held_prefix(text: str, start: int, tag: str) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of `tag` (may become the tag)."""
    for k in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class StreamingToolParser:
    """Turns streamed text into OpenAI chat deltas: `feed(text)` and, at the end, `finish()` each return a list of
    deltas ({"content": ...} or {"tool_calls": [...]}). This base passes everything through as content."""

    def __init__(self, parallel: bool = True):
        self.parallel = parallel
        self.calls: list[ToolCall] = []  # calls sent so far (arguments as streamed)
        self._buf = ""
        self._pos = 0                    # text before this is handled
        self._out: list[dict] = []
        self._muted = False              # parallel_tool_calls=false: calls after the first are dropped

    def feed(self, text: str) -> list[dict]:
        self._buf += text
        while self._step(final=False):
            pass
        return self._take()

    def finish(self) -> list[dict]:
        while self._step(final=True):
            pass
        return self._take()

    def _step(self, final: bool) -> bool:
        """Handle what the buffer allows; True when the state changed and another step may do more."""
        self._content(self._buf[self._pos:])
        self._pos = len(self._buf)
        return False

    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    def _content(self, text: str) -> None:
        if text:
            self._out.append({"content": text})

    def _begin_call(self, name: str) -> None:
        self._muted = bool(self.calls) and not self.parallel
        if self._muted:
            return
        call = ToolCall(name, "")
        self.calls.append(call)
        self._out.append({"tool_calls": [{"index": len(self.calls) - 1, "id": call.id, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]})

    def _arguments(self, text: str) -> None:
        if text and not self._muted:
            self.calls[-1].arguments += text
            self._out.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": text}}]})

    def _whole_call(self, call: ToolCall) -> None:
        self._begin_call(call.name)
        self._arguments(call.arguments)

    def _call_head(self) -> bool:
        """At a call object's head: once the name and the arguments' `{` are in, start streaming the call."""
        m = _CALL_HEAD.match(self._buf, self._pos)
        if m is None:
            return False
        try:
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            return False
        self._begin_call(name)
        self._pos = m.end()
        self._args_end = _ValueEnd()
        return True

    def _call_arguments(self, stop: int | None = None) -> bool:
        """Stream the arguments object (the text up to `stop`); True once it has ended."""
        stop = len(self._buf) if stop is None else stop
        end = self._args_end.feed(self._buf, self._pos, stop)
        stop = stop if end is None else end
        self._arguments(self._buf[self._pos:stop])
        self._pos = stop
        return end is not None


class HermesStream(StreamingToolParser):
    """Hermes / Qwen `<tool_call>` blocks; text outside them streams as content, holding back a possible tag start
    and trailing whitespace (dropped when a tag follows, as in parse_hermes)."""

    def __init__(self, parallel: bool = True):
        super().__init__(parallel)
        self._state = "text"
        self._gap = ""

    def _step(self, final: bool) -> bool:
        buf = self._buf
        if self._state == "text":
            i = buf.find(TOOL_CALL_OPEN, self._pos)
            if i >= 0:
                before = buf[self._pos:i].rstrip()
                self._content(before)
                self._gap = buf[self._pos + len(before):i]  # sent only if the block is not a call
                self._pos, self._state = i + len(TOOL_CALL_OPEN), "head"
                return True
            end = len(buf) if final else len(buf) - _held_prefix(buf, self._pos, TOOL_CALL_OPEN)
            text = buf[self._pos:end].rstrip()
            self._content(text)
            self._pos = len(buf) if final else self._pos + len(text)
            return False
        if self._state == "head":
            if self._call_head():
                self._state = "arguments"
                return True
            j = buf.find(TOOL_CALL_CLOSE, self._pos)
            if j < 0 and not final:
                return False
            body = buf[self._pos:j if j >= 0 else len(buf)]
            call = _call_from_text(body)
            if call is None:  # malformed: the block stays text
                self._content(self._gap + TOOL_CALL_OPEN + body + (TOOL_CALL_CLOSE if j >= 0 else ""))
            else:
                self._whole_call(call)
            self._pos, self._state = (j + len(TOOL_CALL_CLOSE) if j >= 0 else len(buf)), "text"
            return True
        if self._state == "arguments":
            # A </tool_call> before the arguments close ends them: the call was malformed, and the tag (or what
            # may be its start) never goes into the arguments.
            j = buf.find(TOOL_CALL_CLOSE, self._pos)
            stop = j if j >= 0 else len(buf) - (0 if final else _held_prefix(buf, self._pos, TOOL_CALL_CLOSE))
            if self._call_arguments(stop) or j >= 0 or final:
                self._state = "tail"
                return True
            return False
        # tail: the call's closing `}` and </tool_call>
        j = buf.find(TOOL_CALL_CLOSE, self._pos)
        if j >= 0:
            self._pos, self._state = j + len(TOOL_CALL_CLOSE), "text"
            return True
        if final:
            self._pos = len(buf)
        return False


class JsonCallsStream(StreamingToolParser):
    """Call objects in a row: Llama 3.x (`<|python_tag|>`? obj ; obj ...) or a forced "required" list
    ([obj, obj]). Output that is not such a list is content, sent whole as soon as that is clear."""

    def __init__(self, style: str, parallel: bool = True):
        super().__init__(parallel)
        self._llama = style == "llama3_json"
        self._state = "start"

    def _step(self, final: bool) -> bool:
        buf = self._buf
        k = _skip_ws(buf, self._pos)
        if self._state == "done":  # after a forced list's `]`
            self._pos = len(buf)
            return False
        if self._state == "content":
            self._content(buf[self._pos:])
            self._pos = len(buf)
            return False
        if self._state == "start":
            rest = buf[k:]
            if not rest:
                return False
            if self._llama and rest.startswith(PYTHON_TAG):
                self._pos, self._state = k + len(PYTHON_TAG), "head"
            elif self._llama and PYTHON_TAG.startswith(rest) and not final:
                return False
            elif rest[0] == ("{" if self._llama else "["):
                self._pos, self._state = (k if self._llama else k + 1), "head"
            else:
                self._state = "content"
            return True
        if self._state == "head":
            if self._call_head():
                self._state = "arguments"
                return True
            if k < len(buf) and buf[k] != "{":
                return self._to_content()
            try:
                obj, end = _DECODER.raw_decode(buf, k)
            except ValueError:
                return self._to_content() if final else False
            call = _call_from_obj(obj)
            if call is None:
                return self._to_content()
            self._whole_call(call)
            self._pos, self._state = end, "separator"
            return True
        if self._state == "arguments":
            if self._call_arguments():
                self._state = "close"
                return True
            return False
        if k == len(buf):
            if final:
                self._pos = len(buf)
            return False
        if self._state == "close":  # the call object's own `}`
            if buf[k] != "}":
                return self._to_content()
            self._pos, self._state = k + 1, "separator"
            return True
        # separator
        if buf[k] == (";" if self._llama else ","):
            self._pos, self._state = k + 1, "head"
            return True
        if not self._llama and buf[k] == "]":
            self._pos, self._state = len(buf), "done"
            return False
        return self._to_content()

    def _to_content(self) -> bool:
        """Not (or no longer) a list of calls: everything from here on, or the whole output if no call was sent."""
        if not self.calls:
            self._pos = 0
        self._state = "content"
        return True


class ArgumentsStream(StreamingToolParser):
    """A named tool_choice: the output is the function's arguments object, streamed as they come."""

    def __init__(self, name: str):
        super().__init__(True)
        self._name = name

    def _step(self, final: bool) -> bool:
        if not self.calls:
            self._begin_call(self._name)
        self._arguments(self._buf[self._pos:])
        self._pos = len(self._buf)
        return False


def merge_deltas(deltas: list[dict]) -> tuple[str | None, list[dict]]:
    """Reassemble streamed deltas as a client does: (content, tool_calls in OpenAI form)."""
    content, calls = None, {}
    for d in deltas:
        if "content" in d:
            content = (content or "") + d["content"]
        for tc in d.get("tool_calls", []):
            c = calls.setdefault(tc["index"], {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            c["id"] = tc.get("id") or c["id"]
            fn = tc.get("function", {})
            c["function"]["name"] += fn.get("name") or ""
            c["function"]["arguments"] += fn.get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)]


__all__ = ["TOOL_CALL_PARSERS", "ToolCall", "ToolCallError", "ParsedOutput", "ToolPlan", "plan_tools", "check_tools",
           "check_tool_messages", "named_call_schema", "required_calls_schema", "select_parser", "parse_hermes",
           "parse_llama3_json", "parse_json_calls", "parse_named_call", "StreamingToolParser", "HermesStream",
           "JsonCallsStream", "ArgumentsStream", "merge_deltas"]
