"""OpenAI's Responses API (POST /v1/responses) on a real `kiln serve` (the bundled SmolLM2), driven by the `openai`
package: the text of the chat request it means, whole and as the Responses stream of events; instructions; function
tools, forced calls and their outputs sent back; text.format as structured output; what it refuses."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.e2e.test_tool_calling import SCHEMAS, WEATHER, client, server  # noqa: F401 - the same fixtures

QUESTION = "What is the capital of France?"
TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}


def chat_text(client, messages, **kw) -> tuple[str, str]:
    r = client.chat.completions.create(model="m", messages=messages, temperature=0, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


def test_a_response_is_the_chat_answer_whole_and_streamed(client):
    want, _ = chat_text(client, [{"role": "system", "content": "Answer in one short sentence."},
                                 {"role": "user", "content": QUESTION}], max_tokens=24)
    r = client.responses.create(model="m", instructions="Answer in one short sentence.", input=QUESTION,
                                max_output_tokens=24, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.status in ("completed", "incomplete")
    assert r.output_text == want and "Paris" in want
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.usage.output_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    with client.responses.stream(model="m", instructions="Answer in one short sentence.", input=QUESTION,
                                 max_output_tokens=24, temperature=0) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
    assert final.output_text == want and final.usage.output_tokens == r.usage.output_tokens


def test_the_guides_base_url_reaches_it_too(server):
    """openai.Client(base_url=".../v1/chat/completions"), as the seed's guide writes it: responses.create works."""
    guide = openai.Client(base_url=server.url + "/v1/chat/completions", api_key="x", timeout=120, max_retries=0)
    r = guide.responses.create(model="m", input=QUESTION, max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.output_text


def test_a_stored_response_is_a_404_that_says_none_are_kept(client):
    r = client.responses.create(model="m", input=QUESTION, max_output_tokens=2, temperature=0, store=True)
    with pytest.raises(openai.NotFoundError, match="keeps no responses"):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError, match="keeps no responses"):
        client.responses.delete(r.id)


def test_max_output_tokens_makes_an_incomplete_response(client):
    r = client.responses.create(model="m", input=QUESTION, max_output_tokens=2, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2


def test_message_list_input_is_the_conversation(client):
    history = [{"role": "developer", "content": "You answer with one word."},
               {"role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Paris."}]},
               {"role": "user", "content": "And of Italy?"}]
    want, _ = chat_text(client, [{"role": "system", "content": "You answer with one word."},
                                 {"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Paris."},
                                 {"role": "user", "content": "And of Italy?"}], max_tokens=12)
    assert client.responses.create(model="m", input=history, max_output_tokens=12,
                                   temperature=0).output_text == want


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_function_call_then_its_output(client, stream):
    kw = dict(model="m", input=[{"role": "user", "content": "What is the weather like in Paris today?"}],
              tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=96,
              temperature=0)
    if stream:
        with client.responses.stream(**kw) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert "response.function_call_arguments.done" in kinds
    else:
        r = client.responses.create(**kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS["get_weather"])
    # the call and its output sent back: an answer in text
    follow = kw["input"] + [{"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                             "arguments": calls[0].arguments},
                            {"type": "function_call_output", "call_id": calls[0].call_id,
                             "output": json.dumps({"temperature": 21, "sky": "clear"})}]
    answer = client.responses.create(model="m", input=follow, tools=[TOOL], tool_choice="none",
                                     max_output_tokens=32, temperature=0)
    assert answer.output_text and not [o for o in answer.output if o.type == "function_call"]


def test_text_format_json_schema_is_structured_output(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    r = client.responses.create(model="m", input="Name the capital of France as JSON.", max_output_tokens=40,
                                temperature=0, text={"format": {"type": "json_schema", "name": "city",
                                                                "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)


@pytest.mark.parametrize("kw,param,words", [
    (dict(input=QUESTION, previous_response_id="resp_1"), "previous_response_id", "keeps no responses"),
    (dict(input=QUESTION, tools=[{"type": "web_search"}]), "tools", "'web_search'"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "input",
     "'input_image'"),
    (dict(input=[]), "input", "non-empty"),
    (dict(input=QUESTION, extra_body={"frobnicate": 1}), "frobnicate", "unknown field"),
    (dict(input=QUESTION, max_output_tokens=0), "max_output_tokens", "max_output_tokens"),
    (dict(input=QUESTION, top_logprobs=2), "top_logprobs", "chat and completions APIs"),
])
def test_what_it_cannot_serve_is_a_400_naming_the_field(client, kw, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="m", **kw)
    assert words in str(e.value) and e.value.body["param"] == param
