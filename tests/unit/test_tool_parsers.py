"""Tool-call parsers (kiln/server/tool_parsers.py) on recorded outputs of each format: whole outputs, and the same
outputs streamed in pieces and reassembled from the deltas as a client does."""
from __future__ import annotations

import json

import jsonschema
import pytest

from kiln.server import tool_parsers as tp

# Recorded outputs (Qwen2.5-7B-Instruct, Hermes-3, Llama-3.1-8B-Instruct styles).
HERMES_ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
HERMES_TEXT_THEN_TWO = (
    "Let me look both up.\n\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris", "fmt": "a \\"quoted\\" {brace}"}}\n'
    "</tool_call>")
HERMES_MALFORMED = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>'
HERMES_KEYS_SWAPPED = '<tool_call>\n{"arguments": {"q": "kiln"}, "name": "search"}\n</tool_call>'
HERMES_UNICODE = '<tool_call>\n{"name": "translate", "arguments": {"text": "日本語 ✓", "n": [1, {"x": null}]}}\n</tool_call>'
LLAMA_ONE = '{"name": "get_weather", "parameters": {"city": "San Francisco", "unit": "fahrenheit"}}'
LLAMA_TAG_TWO = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                 '{"name": "get_time", "parameters": {"tz": "CET"}}')
LLAMA_TEXT = "The weather in Paris is sunny, 21 degrees {roughly}."
LLAMA_JSON_NOT_CALL = '{"answer": 42}'
LLAMA_MALFORMED = '{"name": "get_weather", "parameters": {"city": "Paris"}'


def calls_of(out: tp.ParsedOutput) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in out.tool_calls]


def stream(parser: tp.StreamingToolParser, text: str, size: int) -> list[dict]:
    deltas = []
    for i in range(0, len(text), size):
        deltas += parser.feed(text[i:i + size])
    return deltas + parser.finish()


def assert_stream_matches(make_parser, parse, text: str) -> None:
    """Every chunking of the output gives the same content and calls as the whole-output parser."""
    whole = parse(text)
    for size in (1, 2, 3, 5, 8, 13, len(text)):
        deltas = stream(make_parser(), text, size)
        content, calls = tp.merge_deltas(deltas)
        assert (content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]) == \
            (whole.content, calls_of(whole)), f"chunk size {size}"
        for d in deltas:
            for tc in d.get("tool_calls", []):
                if "id" in tc:  # a call's first delta: index, id, type, name; arguments follow
                    assert tc["id"].startswith("call_") and tc["type"] == "function" and tc["function"]["name"]
                else:
                    assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}


# ---------------------------------------------------------------------------------------------- hermes


def test_hermes_single_call():
    out = tp.parse_hermes(HERMES_ONE)
    assert out.content is None
    assert calls_of(out) == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert out.tool_calls[0].to_openai()["id"].startswith("call_")


def test_hermes_text_before_several_calls():
    out = tp.parse_hermes(HERMES_TEXT_THEN_TWO)
    assert out.content == "Let me look both up."
    assert calls_of(out) == [("get_weather", {"city": "Paris"}),
                             ("get_time", {"tz": "Europe/Paris", "fmt": 'a "quoted" {brace}'})]
    assert len({c.id for c in out.tool_calls}) == 2


def test_hermes_malformed_json_stays_content():
    out = tp.parse_hermes(HERMES_MALFORMED)
    assert out.tool_calls == []
    assert out.content == HERMES_MALFORMED


def test_hermes_plain_text():
    assert tp.parse_hermes("Hello there.") == tp.ParsedOutput("Hello there.", [])


def test_hermes_keys_in_other_order_and_unicode():
    assert calls_of(tp.parse_hermes(HERMES_KEYS_SWAPPED)) == [("search", {"q": "kiln"})]
    assert calls_of(tp.parse_hermes(HERMES_UNICODE)) == [("translate", {"text": "日本語 ✓", "n": [1, {"x": None}]})]


@pytest.mark.parametrize("text", [HERMES_ONE, HERMES_TEXT_THEN_TWO, HERMES_KEYS_SWAPPED,
                                  HERMES_UNICODE, "Hello there.", "a < b <tool", "text <tool_call> unclosed"])
def test_hermes_streamed_deltas_reassemble(text):
    assert_stream_matches(tp.HermesStream, tp.parse_hermes, text)


def test_hermes_stream_malformed_block_whose_head_was_sent():
    """Streaming commits to a call at its head; arguments that never close end at </tool_call>, which never
    leaks into them, and the text after the block is content again."""
    text = HERMES_MALFORMED + "\nDone."
    for size in (1, 4, len(text)):
        content, calls = tp.merge_deltas(stream(tp.HermesStream(), text, size))
        assert content == "Sure.\nDone."
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
        assert calls[0]["function"]["arguments"] == '{"city": "Paris"\n'
    # a block whose head does not match is held until it closes, and stays text when it does not parse
    bad_head = 'Hi <tool_call>{"name": get_weather}</tool_call>'
    assert tp.merge_deltas(stream(tp.HermesStream(), bad_head, 2)) == (bad_head, [])


def test_hermes_stream_holds_back_a_possible_tag():
    p = tp.HermesStream()
    assert p.feed("Checking <tool") == [{"content": "Checking"}]  # the space waits too: dropped if a tag follows
    assert p.feed("_ca") == []
    out = p.feed('ll>{"name": "f", "arguments": {"a"')
    assert out[0]["tool_calls"][0]["function"]["name"] == "f"
    assert out[1]["tool_calls"][0]["function"]["arguments"] == '{"a"'
    assert p.feed(": 1}}</tool_call>") == [{"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}]
    assert p.finish() == []


def test_hermes_stream_arguments_arrive_in_fragments():
    deltas = stream(tp.HermesStream(), HERMES_ONE, 4)
    fragments = [tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls", []) if "id" not in tc]
    assert len(fragments) > 3 and json.loads("".join(fragments)) == {"city": "Paris", "unit": "celsius"}


def test_parallel_false_keeps_the_first_call():
    plan = tp.ToolPlan("auto", [], parser="hermes", parallel=False)
    assert [c.name for c in plan.parse(HERMES_TEXT_THEN_TWO).tool_calls] == ["get_weather"]
    _, calls = tp.merge_deltas(stream(plan.stream_parser(), HERMES_TEXT_THEN_TWO, 3))
    assert [c["function"]["name"] for c in calls] == ["get_weather"]


# ---------------------------------------------------------------------------------------------- llama 3


def test_llama3_single_call():
    out = tp.parse_llama3_json(LLAMA_ONE)
    assert out.content is None
    assert calls_of(out) == [("get_weather", {"city": "San Francisco", "unit": "fahrenheit"})]


def test_llama3_python_tag_and_several_calls():
    out = tp.parse_llama3_json(LLAMA_TAG_TWO)
    assert calls_of(out) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]


@pytest.mark.parametrize("text", [LLAMA_TEXT, LLAMA_JSON_NOT_CALL, LLAMA_MALFORMED, ""])
def test_llama3_text_and_malformed_stay_content(text):
    assert tp.parse_llama3_json(text) == tp.ParsedOutput(text or None, [])


@pytest.mark.parametrize("text", [LLAMA_ONE, LLAMA_TAG_TWO, LLAMA_TEXT, LLAMA_JSON_NOT_CALL,
                                  '{"name": "f", "parameters": "city=Paris"}', "  " + LLAMA_ONE, '{"parameters": {"a": 1}, "name": "f"}', "<|python_ta"])
def test_llama3_streamed_deltas_reassemble(text):
    assert_stream_matches(lambda: tp.JsonCallsStream("llama3_json"), tp.parse_llama3_json, text)


# ---------------------------------------------------------------------------------------------- forced calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"type": "string"},
                                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}},
]


def test_required_output_parses_and_streams():
    text = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {"tz": "CET"}}]'
    out = tp.parse_json_calls(text)
    assert calls_of(out) == [("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "CET"})]
    assert_stream_matches(lambda: tp.JsonCallsStream("json_array"), tp.parse_json_calls, text)
    cut = text[:40]  # stopped at max_tokens: no call is claimed
    assert tp.parse_json_calls(cut) == tp.ParsedOutput(cut, [])


def test_named_output_is_the_arguments():
    text = '{"city": "Oslo", "unit": "celsius"}'
    out = tp.parse_named_call(text, "get_weather")
    assert calls_of(out) == [("get_weather", {"city": "Oslo", "unit": "celsius"})]
    assert_stream_matches(lambda: tp.ArgumentsStream("get_weather"), lambda t: tp.parse_named_call(t, "get_weather"),
                          text)
    assert tp.parse_named_call('{"city": "Os', "get_weather").tool_calls == []


def test_required_schema_accepts_only_calls_of_the_tools():
    schema = tp.required_calls_schema(tp.check_tools(TOOLS))
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {"tz": "UTC"}}]
    jsonschema.validate(ok, schema)
    for bad in ([], [{"name": "nope", "arguments": {}}], [{"name": "get_time", "arguments": {}}],
                [{"name": "get_weather", "arguments": {"city": "Oslo"}, "x": 1}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = tp.required_calls_schema(tp.check_tools(TOOLS), parallel=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ok, single)


def test_named_schema_is_the_parameters():
    plan = tp.plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, None, "hermes")
    assert plan.mode == "named" and plan.function == "get_time"
    assert plan.schema == TOOLS[1]["function"]["parameters"]
    assert tp.named_call_schema({"name": "f"}) == {"type": "object"}


# ---------------------------------------------------------------------------------------------- requests


def test_plan_modes():
    assert tp.plan_tools(None, None, None, "hermes") is None
    assert tp.plan_tools(TOOLS, None, None, "hermes").mode == "auto"
    none = tp.plan_tools(TOOLS, "none", None, "hermes")
    assert none.mode == "none" and none.tools is None
    req = tp.plan_tools(TOOLS, "required", False, "hermes")
    assert req.mode == "required" and req.schema["maxItems"] == 1 and not req.parallel


@pytest.mark.parametrize("tools,choice,param,words", [
    (TOOLS, {"type": "function", "function": {"name": "launch_rocket"}}, "tool_choice", "launch_rocket"),
    (TOOLS, "sometimes", "tool_choice", "sometimes"),
    (TOOLS, {"name": "get_time"}, "tool_choice", "named"),
    (None, "required", "tool_choice", "needs `tools`"),
    ("get_weather", None, "tools", "list"),
    ([{"type": "retrieval"}], None, "tools[0]", "function"),
    ([{"type": "function", "function": {"description": "x"}}], None, "tools[0].function.name", "name"),
    ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name", "1-64"),
    ([TOOLS[0], TOOLS[0]], None, "tools[1].function.name", "unique"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}], None,
     "tools[0].function.parameters", "not a valid JSON schema"),
])
def test_bad_tools_are_named(tools, choice, param, words):
    with pytest.raises(tp.ToolCallError) as e:
        tp.plan_tools(tools, choice, None, "hermes")
    assert e.value.param == param and words in str(e.value)


def test_tool_messages_are_checked():
    good = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    tp.check_tool_messages(good)
    with pytest.raises(tp.ToolCallError, match="tool_call_id"):
        tp.check_tool_messages([{"role": "tool", "content": "42"}])
    with pytest.raises(tp.ToolCallError, match="not valid JSON"):
        tp.check_tool_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}])


def test_select_parser(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    assert tp.select_parser("none", str(tmp_path), "<tool_call>") == "none"
    assert tp.select_parser("auto", None, "{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert tp.select_parser("auto", None, "{{ '<|python_tag|>' }} {% if tools %}{% endif %}") == "llama3_json"
    assert tp.select_parser("auto", str(tmp_path), "{% if tools %}{% endif %}") == "hermes"
    assert tp.select_parser("auto", None, "{{ messages }}") == "hermes"  # no tool support: Kiln's preamble format
    assert tp.select_parser("auto", None, "[TOOL_CALLS] {% if tools %}{% endif %}") == "none"
