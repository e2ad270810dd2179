"""The OpenAI streams' pre-serialized text events (openai_schema.TextDeltaEvent) are byte for byte the events the
general path builds (completion_chunk / chat_chunk through one dumps), whatever the text holds."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from kiln.server import openai_schema as oai
from kiln.server.http_common import dumps

TEXTS = ["hello", " Paris", 'a "quoted" \\ back\\slash', "line\nbreak\ttab", "\x00nul", "日本語 ✓ 🙂", "",
         "\x00kiln-text\x00", "</script>"]


@pytest.mark.parametrize("kind", ["completions", "chat"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_text_events_equal_the_general_chunks(kind, include_usage):
    job = SimpleNamespace(id="cmpl-1", created=1700000000, model="m\"odel", include_usage=include_usage, kind=kind)
    for index in (0, 3):
        ev = oai.TextDeltaEvent(job, index, dumps)
        for text in TEXTS:
            general = (oai.chat_chunk(job, index, {"content": text}, None) if kind == "chat"
                       else oai.completion_chunk(job, index, text, None))
            assert ev.sse(text) == f"data: {dumps(general)}\n\n"
            assert json.loads(ev.sse(text)[len("data: "):]) == general


@pytest.mark.parametrize("include_usage", [False, True])
def test_reasoning_events_equal_the_general_chunks(include_usage):
    job = SimpleNamespace(id="chatcmpl-1", created=1700000000, model="m", include_usage=include_usage, kind="chat")
    ev = oai.TextDeltaEvent(job, 1, dumps, "reasoning_content")
    for text in TEXTS:
        assert ev.sse(text) == f"data: {dumps(oai.chat_chunk(job, 1, {'reasoning_content': text}, None))}\n\n"
