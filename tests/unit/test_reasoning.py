"""Reasoning apart from the answer (kiln/server/reasoning.py, KILN_REASONING_PARSER): the two formats, a stream cut
anywhere giving what the whole output gives, and the chat API's message and deltas, tool calls after the
reasoning included."""
from __future__ import annotations

import json
import random

import pytest

from kiln.server import openai_schema as oai
from kiln.server import tool_parsers as tp
from kiln.server.reasoning import ReasoningParser

QWEN3, R1 = ReasoningParser("qwen3"), ReasoningParser("deepseek_r1")


@pytest.mark.parametrize("parser,text,reasoning,content", [
    (QWEN3, "<think>\nLet me see.\n</think>\n\nParis.", "\nLet me see.\n", "\n\nParis."),
    (QWEN3, "Paris.", None, "Paris."),                              # thinking off: no block in the output
    (QWEN3, "<think>\nstill thinking when max_tokens", "\nstill thinking when max_tokens", ""),
    (QWEN3, "<think>a</think>b<think>c", "a", "b<think>c"),         # one block: later tags are content
    (R1, "Let me see.\n</think>\n\nParis.", "Let me see.\n", "\n\nParis."),   # the prompt opened the block
    (R1, "<think>Let me see.</think>Paris.", "Let me see.", "Paris."),        # a <think> it writes anyway
    (R1, "cut off", "cut off", ""),
])
def test_split(parser, text, reasoning, content):
    got = parser.split(text)
    assert (got.reasoning, got.content) == (reasoning, content)


@pytest.mark.parametrize("parser", [QWEN3, R1], ids=["qwen3", "deepseek_r1"])
def test_a_stream_cut_anywhere_gives_the_whole_outputs_split(parser):
    texts = ["<think>\nhmm, 2 < 3\n</think>\n\nYes.", "No tags at all <thi", "<think>x</thi", "a</think>b",
             "<think><think>x</think></think>"]
    rnd = random.Random(0)
    for text in texts:
        whole = parser.split(text)
        for _ in range(40):
            cuts = sorted(rnd.sample(range(len(text) + 1), rnd.randrange(0, min(6, len(text) + 1))))
            stream = parser.stream()
            pieces = [p for a, b in zip([0, *cuts], [*cuts, len(text)]) for p in stream.feed(text[a:b])]
            pieces += stream.finish()
            assert "".join(t for k, t in pieces if k == "reasoning") == (whole.reasoning or "")
            assert "".join(t for k, t in pieces if k == "content") == whole.content, (text, cuts)


def _job(parser, tool_plan=None) -> oai.OpenAIJob:
    return oai.OpenAIJob(kind="chat", id="c", model="m", created=0, prompts=[[1]], prompt_texts=[""], params=[],
                         n=1, stream=True, include_usage=False, continuous_usage=False, tool_plan=tool_plan,
                         reasoning=parser)


TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALLING = ('<think>\nThe user wants the time.\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": '
           '{"city": "Paris"}}\n</tool_call>')


def test_chat_message_and_deltas_with_a_tool_call_after_the_reasoning():
    job = _job(QWEN3, tp.plan_tools(TOOLS, None, None, "hermes"))
    message, finish = oai.chat_message(job, CALLING, "stop")
    assert message["reasoning_content"] == "\nThe user wants the time.\n" and finish == "tool_calls"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert not (message["content"] or "").strip()

    stream = oai.ChatChoiceStream(job)
    pieces = [CALLING[i:i + 5] for i in range(0, len(CALLING), 5)]
    deltas = []
    for i, piece in enumerate(pieces):
        d, finish = stream.deltas(piece, i == len(pieces) - 1, "stop")
        deltas += d
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls and calls[0]["function"]["name"] == "get_time" and finish == "tool_calls"
    assert not any("<think>" in (d.get("content") or "") or "</think>" in (d.get("content") or "") for d in deltas)


def test_without_a_parser_the_reasoning_stays_in_the_content():
    message, _ = oai.chat_message(_job(None), "<think>x</think>y", "stop")
    assert message == {"role": "assistant", "content": "<think>x</think>y"}
    message, _ = oai.chat_message(_job(QWEN3), "<think>x</think>y", "stop")
    assert message == {"role": "assistant", "reasoning_content": "x", "content": "y"}


def test_a_stream_cut_off_while_thinking_ends_on_a_reasoning_delta():
    stream = oai.ChatChoiceStream(_job(R1))
    assert stream.deltas("thinking", False, None) == ([{"reasoning_content": "thinking"}], None)
    assert stream.deltas(" more", True, "length") == ([{"reasoning_content": " more"}], "length")
