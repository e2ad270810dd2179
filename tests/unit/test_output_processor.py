"""kiln.engine.output_processor: engine outputs of one request -> text deltas, stop-string cut, finish reason,
logprobs (the one processor LLM and the server front ends share)."""

from __future__ import annotations

import pytest

from kiln.engine.output_processor import OutputProcessor
from kiln.engine.request import EngineOutput, SamplingParams
from kiln.tokenizer import Tokenizer

TEXT = "The capital of France is Paris. It is a big city."


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return Tokenizer.from_dir(default_model_dir)


def out(ids, finished=False, reason=None, logprobs=None, **kw):
    return EngineOutput("r", list(ids), finished, reason, logprobs=logprobs, **kw)


def run(proc, chunks, finish_reason="length"):
    """Feed the ids in chunks (one engine output each, the last one finished); return all events."""
    events = []
    for k, chunk in enumerate(chunks):
        last = k == len(chunks) - 1
        events += proc.process(out(chunk, last, finish_reason if last else None))
    return events


def test_whole_text_in_token_events(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    proc = OutputProcessor(tok, [1, 2], SamplingParams())
    events = run(proc, [ids[:3], ids[3:4], ids[4:]])
    assert [e.token_ids for e in events] == [[i] for i in ids]  # one event per token
    assert "".join(e.text for e in events) == TEXT == proc.text
    assert [e.num_output_tokens for e in events] == list(range(1, len(ids) + 1))
    assert all(not e.finished for e in events[:-1])
    last = events[-1]
    assert last.finished and last.finish_reason == "length" and last.stop_reason is None
    assert last.num_prompt_tokens == 2
    assert proc.finished and proc.token_ids == ids and proc.logprobs is None


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_and_finishes_before_the_engine(tok, include):
    ids = tok.encode(TEXT, add_special_tokens=False)
    proc = OutputProcessor(tok, [], SamplingParams(stop=["Paris"]), include_stop_str_in_output=include)
    events = []
    for tid in ids:  # the engine never finishes: the processor does
        events += proc.process(out([tid]))
        if proc.finished:
            break
    want = "The capital of France is Paris" if include else "The capital of France is "
    assert "".join(e.text for e in events) == want == proc.text
    assert events[-1].finished and events[-1].finish_reason == "stop" and events[-1].stop_reason == "Paris"
    assert proc.token_ids == ids[: len(events)]  # up to the token that completed the stop string
    # what the engine still sends afterwards (its abort) changes nothing
    assert proc.process(out(ids[len(events):len(events) + 1], True, "abort")) == []
    assert proc.finish_reason == "stop" and proc.text == want


def test_stop_string_inside_a_multi_token_output(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    proc = OutputProcessor(tok, [], SamplingParams(stop=["France"]))
    events = proc.process(out(ids, True, "length"))
    assert events[-1].finish_reason == "stop" and proc.text == "The capital of "
    assert len(events) < len(ids) and proc.token_ids == ids[: len(events)]


def test_engine_stop_names_the_token(tok):
    ids = tok.encode("Hi there", add_special_tokens=False) + [tok.eos_token_id]
    proc = OutputProcessor(tok, [], SamplingParams())
    events = run(proc, [ids], "stop")
    assert proc.text == "Hi there"  # the EOS is a special token: skipped
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason == tok.eos_token_id


def test_skip_special_tokens_off_keeps_them(tok):
    ids = tok.encode("Hi", add_special_tokens=False) + [tok.eos_token_id]
    proc = OutputProcessor(tok, [], SamplingParams(), skip_special_tokens=False)
    run(proc, [ids], "stop")
    assert proc.text == "Hi" + tok.decode([tok.eos_token_id], skip_special_tokens=False)


def test_logprobs_per_token(tok):
    ids = tok.encode("one two three", add_special_tokens=False)
    lps = [(-0.5 * (k + 1), [(t, -0.5 * (k + 1))]) for k, t in enumerate(ids)]
    proc = OutputProcessor(tok, [], SamplingParams(logprobs=1))
    events = proc.process(out(ids[:1], logprobs=lps[:1])) + proc.process(out(ids[1:], True, "length", lps[1:]))
    assert [e.logprobs for e in events] == [[lp] for lp in lps]
    assert proc.logprobs == lps


def test_end_without_a_token_flushes_and_reports(tok):
    # a token that ends mid-character is held back until the end: the tokenless abort releases it
    ids = tok.encode("ok 😀", add_special_tokens=False)
    proc = OutputProcessor(tok, [], SamplingParams())
    events = proc.process(out(ids[:-1]))
    partial = tok.decode(ids[:-1])
    assert partial.endswith("\ufffd")  # the emoji's first bytes alone
    assert "".join(e.text for e in events) == "ok"  # " 😀" is byte tokens (the space in the first): held back
    end = proc.process(out([], True, "abort"))
    assert len(end) == 1 and end[0].finished and end[0].finish_reason == "abort" and end[0].token_ids == []
    assert end[0].text and proc.text == partial


def test_engine_error_is_kept(tok):
    proc = OutputProcessor(tok, [], SamplingParams())
    events = proc.process(out([], True, "error", error="the engine failed"))
    assert events[-1].finish_reason == "error" and proc.error == "the engine failed" and proc.text == ""
