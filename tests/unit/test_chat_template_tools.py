"""Tools through the chat template (kiln/tokenizer.py): a template with tool support (Qwen2.5's, as published)
gets `tools` and tool turns as transformers passes them; the bundled SmolLM2 template, which has none, gets Kiln's
documented preamble and tool turns as text."""
from __future__ import annotations

import json

import pytest

from kiln.server.tool_parsers import parse_hermes
from kiln.tokenizer import TOOL_PREAMBLE, Tokenizer

# Qwen2.5-Instruct's chat template (tool part as published; the default system line shortened).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]


@pytest.fixture(scope="module")
def smol(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def qwen(default_model_dir):
    tok = Tokenizer.from_dir(default_model_dir)
    tok.hf.chat_template = QWEN25_TEMPLATE
    return tok


def test_qwen_template_renders_tools_and_tool_turns(qwen):
    assert qwen.template_supports_tools
    text = qwen.render_chat_template(HISTORY, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(TOOLS[0]) in text  # the template's own `tool | tojson`
    # arguments arrive at the template as a dict (its `| tojson` would quote a string)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")
    # the rendered call is what the hermes parser reads back
    turn = text.index("<|im_start|>assistant")
    call_block = text[turn:text.index("<|im_end|>", turn)]
    assert [(c.name, json.loads(c.arguments)) for c in parse_hermes(call_block).tool_calls] == \
        [("get_weather", {"city": "Paris"})]


def test_qwen_template_without_tools_is_unchanged(qwen):
    msgs = [{"role": "user", "content": "hi"}]
    assert qwen.render_chat_template(msgs) == qwen.hf.apply_chat_template(msgs, tokenize=False,
                                                                           add_generation_prompt=True)


def test_smollm2_template_has_no_tool_support_and_gets_the_preamble(smol):
    assert not smol.template_supports_tools
    text = smol.render_chat_template(HISTORY, tools=TOOLS)
    preamble = TOOL_PREAMBLE.format(tools=json.dumps(TOOLS[0]))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n" + preamble + "<|im_end|>\n")
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>') in text
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>' in text
    assert "tool_call_id" not in text and "<|im_start|>tool" not in text


def test_smollm2_preamble_without_a_system_message(smol):
    text = smol.render_chat_template([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools\n")  # replaces the template's default system line
    assert "You are a helpful AI assistant named SmolLM" not in text
    ids = smol.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS)
    assert smol.decode(ids, skip_special_tokens=False) == text


def test_bad_tool_call_arguments_in_history(smol):
    bad = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}]}]
    with pytest.raises(ValueError, match="not valid JSON"):
        smol.render_chat_template(bad)


# The end of Qwen3's chat template, as published: enable_thinking=false writes an empty think block
THINKING_TEMPLATE = """{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""


def test_chat_template_kwargs_and_continue_final_message_reach_the_template(default_model_dir):
    """vLLM's chat_template_kwargs (Qwen3's enable_thinking) and continue_final_message, from a request's body
    to the rendered prompt, and the 400s for what cannot work."""
    import asyncio
    from types import SimpleNamespace

    from kiln.errors import RequestError
    from kiln.server import openai_schema as oai

    tok = Tokenizer.from_dir(default_model_dir)
    tok.hf.chat_template = THINKING_TEMPLATE

    async def run_tokenizer(fn, *args, size=0):
        return fn(*args)
    frontend = SimpleNamespace(tokenizer=tok, max_seq_len=4096, run_tokenizer=run_tokenizer,
                               cfg=SimpleNamespace(tool_call_parser="auto", model_path=str(default_model_dir)))

    def prompt(**body) -> str:
        req = oai._parse(oai.ChatCompletionRequest, {"messages": [{"role": "user", "content": "Hi"}], **body})
        ids, _ = asyncio.run(oai._chat_prompt(req, frontend))
        return tok.decode(ids, skip_special_tokens=False)

    assert prompt().endswith("<|im_start|>assistant\n")
    no_thinking = prompt(chat_template_kwargs={"enable_thinking": False})
    assert no_thinking.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt(chat_template_kwargs={"enable_thinking": True}) == prompt()
    cont = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How"}]
    assert prompt(messages=cont, add_generation_prompt=False, continue_final_message=True).endswith("Hello! How")
    assert prompt(messages=cont, add_generation_prompt=False).endswith("Hello! How<|im_end|>\n")
    own_field = {"chat_template_kwargs": {"add_generation_prompt": False}}
    for body, param in ((own_field, "chat_template_kwargs"),
                        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
                        ({"messages": cont, "continue_final_message": True}, "continue_final_message"),
                        ({"add_generation_prompt": False, "continue_final_message": True}, "continue_final_message")):
        with pytest.raises(RequestError) as e:
            prompt(**body)
        assert e.value.param == param and e.value.http_status == 400
