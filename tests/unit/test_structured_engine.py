"""Structured outputs in the engine (kiln/engine/structured.py) on the bundled SmolLM2 model: outputs follow
their JSON schema / regex / choice, requests without a grammar are untouched, async scheduling and preemption
keep the grammar's state right, max_tokens gives "length", and a bad or slow grammar fails alone."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from kiln.engine.request import SamplingParams
from kiln.engine.structured import StructuredSpec
from kiln.entrypoints.llm import LLM
from tests.helpers.structured import ASK_PERSON, PERSON

PLAIN_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def greedy(max_tokens: int, spec: StructuredSpec | None = None, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured=spec, **kw)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")  # batch-invariant enough on CPU for exact greedy comparisons (bf16 is not)


@pytest.fixture(scope="module")
def plain_alone(llm):
    """Greedy outputs of the plain prompts, each run alone."""
    return [llm.generate(p, greedy(10, ignore_eos=True))[0].token_ids for p in PLAIN_PROMPTS]


def chat_ids(llm, messages):
    return llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def check_person(out):
    assert out.finish_reason == "stop", (out.finish_reason, out.text, out.error)
    jsonschema.validate(json.loads(out.text), PERSON)


def test_json_schema_output_validates(llm):
    check_person(llm.chat(ASK_PERSON, greedy(80, StructuredSpec.json_schema(PERSON)))[0])
    # sampled too: the mask holds whatever the draw
    out = llm.chat(ASK_PERSON, SamplingParams(max_tokens=80, temperature=1.0, seed=7,
                                              structured=StructuredSpec.json_schema(PERSON)))[0]
    check_person(out)


def test_json_object_regex_and_choice(llm):
    out = llm.chat([{"role": "user", "content": 'Reply with the JSON object {"answer": 42} and nothing else.'}],
                   greedy(40, StructuredSpec("json_object", "")))[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)
    out = llm.chat([{"role": "user", "content": "A phone number?"}], greedy(20, StructuredSpec("regex", r"\d{3}-\d{4}")))[0]
    assert out.finish_reason == "stop" and re.fullmatch(r"\d{3}-\d{4}", out.text), out.text
    out = llm.chat([{"role": "user", "content": "Is the sky blue?"}],
                   greedy(20, StructuredSpec.choice(["yes", "no", "maybe"])))[0]
    assert out.finish_reason == "stop" and out.text in ("yes", "no", "maybe")
    out = llm.chat([{"role": "user", "content": "Count."}],
                   greedy(20, StructuredSpec("grammar", 'root ::= "one, " ("two" | "three")')))[0]
    assert out.finish_reason == "stop" and out.text in ("one, two", "one, three")


def test_max_tokens_cut_is_length_not_stop(llm):
    out = llm.chat(ASK_PERSON, greedy(5, StructuredSpec.json_schema(PERSON)))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    with pytest.raises(ValueError):
        json.loads(out.text)  # cut: not a whole JSON value, and not claimed to be one


def test_grammar_requests_leave_plain_requests_unchanged(llm, plain_alone):
    prompts = [chat_ids(llm, ASK_PERSON), *PLAIN_PROMPTS, chat_ids(llm, [{"role": "user", "content": "yes?"}])]
    params = [greedy(80, StructuredSpec.json_schema(PERSON)), *[greedy(10, ignore_eos=True)] * len(PLAIN_PROMPTS),
              greedy(10, StructuredSpec.choice(["yes", "no"]))]
    outs = llm.generate(prompts, params)
    check_person(outs[0])
    assert [o.token_ids for o in outs[1:-1]] == plain_alone
    assert outs[-1].text in ("yes", "no")


def test_async_scheduling_with_grammar_rows(plain_alone):
    llm = LLM(dtype="float32", async_scheduling=True)
    assert llm.engine.async_scheduling
    prompts = [*PLAIN_PROMPTS, chat_ids(llm, ASK_PERSON)]
    params = [*[greedy(10, ignore_eos=True)] * len(PLAIN_PROMPTS), greedy(80, StructuredSpec.json_schema(PERSON))]
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs[:-1]] == plain_alone
    check_person(outs[-1])
    assert llm.engine.num_overlapped_steps > 0


def test_grammar_rows_overlap_and_match_sync(llm):
    """Under async scheduling a step with grammar rows is queued before the previous one's ids are read (its
    masks wait for them): grammar outputs are token-identical to synchronous steps, requests that end by their
    grammar deliver nothing past the end and give their blocks back, and steps overlap with only grammar rows."""
    spec = StructuredSpec.json_schema(PERSON)
    prompts = [chat_ids(llm, ASK_PERSON), chat_ids(llm, [{"role": "user", "content": "yes?"}])]
    params = [greedy(80, spec), greedy(10, StructuredSpec.choice(["yes", "no"]))]
    sync = llm.generate(prompts, params)
    asy = LLM(dtype="float32", async_scheduling=True)
    outs = asy.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in sync]
    assert [o.finish_reason for o in outs] == ["stop", "stop"]
    check_person(outs[0])
    steps = asy.engine.num_steps
    assert asy.engine.num_overlapped_steps >= steps // 2  # grammar-only steps overlapped (0 before)
    assert asy.engine.kv.num_free_blocks == asy.engine.kv.num_blocks and not asy.engine.requests


def test_preemption_keeps_the_grammar_state(llm):
    spec = StructuredSpec.json_schema(PERSON)
    alone = llm.chat(ASK_PERSON, greedy(80, spec))[0]
    check_person(alone)
    # a cache too small for all of them at once: the newest running requests are preempted and recomputed
    small = LLM(dtype="float32", block_size=16, num_gpu_blocks=14, max_num_seqs=4, kv_reserve_ratio=0.0)
    prompts = [chat_ids(small, ASK_PERSON)] * 3 + [small.tokenizer.encode(p) for p in PLAIN_PROMPTS[:1]]
    outs = small.generate(prompts, [greedy(80, spec)] * 3 + [greedy(40, ignore_eos=True)])
    assert small.engine.scheduler.num_preemptions > 0
    for o in outs[:3]:
        check_person(o)
        assert o.token_ids == alone.token_ids
    assert small.engine.kv.num_free_blocks == small.engine.kv.num_blocks


def drain(core, requests):
    """Submit (id, prompt, params); step until done; {id: (tokens, finish_reason, error, error_type)}."""
    for rid, prompt, sp in requests:
        assert core.add_request(rid, prompt, sp) is None
    res = {rid: [[], None, None, None] for rid, _, _ in requests}
    for _ in range(5000):
        if not core.has_unfinished():
            break
        for o in core.step():
            r = res[o.request_id]
            r[0] += o.new_token_ids
            if o.finished:
                r[1:] = [o.finish_reason, o.error, o.error_type]
    assert not core.has_unfinished() and not core.requests
    assert core.kv.num_free_blocks == core.kv.num_blocks
    return res


def test_invalid_schema_fails_alone(llm, plain_alone):
    core = llm.engine
    res = drain(core, [("bad", chat_ids(llm, ASK_PERSON), greedy(20, StructuredSpec("json_schema", '{"type": "objekt"}'))),
                       ("plain", llm.tokenizer.encode(PLAIN_PROMPTS[0]), greedy(10, ignore_eos=True))])
    toks, reason, error, kind = res["bad"]
    assert (toks, reason, kind) == ([], "error", "invalid")
    assert "JSON schema" in error and "objekt" in error
    assert res["plain"][0] == plain_alone[0] and res["plain"][1] == "length"


def test_compile_timeout_fails_alone_while_others_run(llm, plain_alone):
    core = llm.engine
    pending = core.grammars
    release = threading.Event()
    real_compile, real_timeout = pending.compiler._compile, pending.timeout_s

    def stuck_compile(spec):
        release.wait(60)  # a grammar that takes "forever" to compile
        return real_compile(spec)

    pending.compiler._compile, pending.timeout_s = stuck_compile, 1.0
    try:
        slow = StructuredSpec("regex", "slow-[a-z]{3}")  # not compiled before: goes to the stuck compile
        res = drain(core, [("slow", chat_ids(llm, ASK_PERSON), greedy(10, slow)),
                           ("plain", llm.tokenizer.encode(PLAIN_PROMPTS[1]), greedy(10, ignore_eos=True))])
    finally:
        pending.compiler._compile, pending.timeout_s = real_compile, real_timeout
        release.set()
    toks, reason, error, kind = res["slow"]
    assert (toks, reason, kind) == ([], "error", "invalid")
    assert "did not compile within the time limit" in error and "KILN_GRAMMAR_COMPILE_TIMEOUT" in error
    assert res["plain"][0] == plain_alone[1] and res["plain"][1] == "length"


def test_aborting_a_compiling_request(llm):
    core = llm.engine
    spec = StructuredSpec("regex", "abort-[0-9]{2}")
    assert core.add_request("x", chat_ids(llm, ASK_PERSON), greedy(10, spec)) is None
    assert core.stats().num_waiting == 1 and core.has_unfinished()
    [out] = core.abort(["x"])
    assert out.finish_reason == "abort" and not core.has_unfinished() and not core.requests


def test_many_grammar_rows_fill_on_threads_like_one(llm):
    """More grammar rows than GrammarMasks.batch_threshold go through xgrammar's BatchGrammarMatcher (reused
    host bitmask): each output is what it is alone."""
    spec = StructuredSpec.json_schema(PERSON)
    alone = llm.chat(ASK_PERSON, greedy(60, spec))[0]
    n = llm.engine.runner.sampler.grammar_masks.batch_threshold + 2
    outs = llm.generate([chat_ids(llm, ASK_PERSON)] * n, greedy(60, spec))
    assert llm.engine.runner.sampler.grammar_masks._batch_matcher is not None
    assert all(o.token_ids == alone.token_ids for o in outs)
    check_person(outs[0])
