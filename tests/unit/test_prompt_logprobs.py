"""Prompt logprobs (SamplingParams.prompt_logprobs, what OpenAI's echo with logprobs returns): at every prompt
position the model's log-softmax, equal to transformers' on the same weights, through chunked prefill, prefix-cache
hits that would skip positions, preemptions that compute positions again, and async scheduling."""
from __future__ import annotations

import random

import pytest
import torch

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import Request, SamplingParams
from kiln.engine.scheduler import Scheduler
from tests.helpers.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def reference(model_dir):
    import transformers as tf
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logprobs(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    return logprobs


def make_core(model_dir, **kw) -> EngineCore:
    cfg = dict(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=256, max_num_seqs=8,
               async_scheduling=False) | kw
    return EngineCore(EngineConfig(**cfg))


def drain(core: EngineCore, work: list[tuple[str, list[int], SamplingParams]]) -> dict[str, list]:
    """Every request's outputs, in order."""
    for rid, prompt, sp in work:
        assert core.add_request(rid, prompt, sp) is None
    outs: dict[str, list] = {rid: [] for rid, _, _ in work}
    while core.has_unfinished():
        for o in core.step():
            outs[o.request_id].append(o)
    assert core.kv.num_free_blocks == core.kv.num_blocks or core.cfg.enable_prefix_caching
    return outs


def check_against_reference(outs, prompt: list[int], top_k: int, reference) -> None:
    """The prompt logprobs come once, with the first token, and equal transformers' at every position."""
    carrying = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(carrying) == 1 and outs[0].prompt_logprobs is not None
    got = carrying[0]
    assert len(got) == len(prompt) and got[0] is None
    ref = reference(prompt)
    for pos in range(1, len(prompt)):
        chosen, top = got[pos]
        assert chosen == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4), pos
        assert len(top) == top_k
        want = ref[pos - 1].topk(top_k) if top_k else None
        if top_k:
            assert [t for t, _ in top] == want.indices.tolist(), pos
            assert [v for _, v in top] == pytest.approx(want.values.tolist(), abs=1e-4)


PROMPTS = [list(range(3, 43)), [7] * 5 + list(range(100, 133)), [9, 8]]


@pytest.mark.parametrize("cfg", [dict(), dict(max_num_batched_tokens=8), dict(async_scheduling=True,
                                                                               max_num_batched_tokens=12)],
                         ids=["one-step-prefill", "chunked", "async-chunked"])
def test_prompt_logprobs_equal_transformers(model_dir, reference, cfg):
    core = make_core(model_dir, **cfg)
    work = [(f"r{i}", p, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=k))
            for i, (p, k) in enumerate(zip(PROMPTS, (0, 3, 5)))]
    work.append(("plain", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
    outs = drain(core, work)
    for (rid, prompt, sp) in work[:3]:
        check_against_reference(outs[rid], prompt, sp.prompt_logprobs, reference)
        assert sum(len(o.new_token_ids) for o in outs[rid]) == 3
    assert all(o.prompt_logprobs is None for o in outs["plain"])
    # the same greedy tokens as the request that asked for nothing
    assert [o.new_token_ids for o in outs["r0"]] == [o.new_token_ids for o in outs["plain"]]


def test_a_cached_prefix_is_computed_again_for_prompt_logprobs(model_dir, reference):
    core = make_core(model_dir, enable_prefix_caching=True, max_num_batched_tokens=16)
    prompt = PROMPTS[0]
    drain(core, [("warm", prompt, SamplingParams(max_tokens=2, temperature=0))])
    assert core.kv.match_prefix(Request("probe", prompt, SamplingParams())), "the first run left no cached prefix"
    outs = drain(core, [("scored", prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))])
    check_against_reference(outs["scored"], prompt, 1, reference)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preempted_requests_send_each_position_once(model_dir, reference, async_scheduling, monkeypatch):
    # 10 blocks of 16 tokens, 16 tokens a step, for five requests of 20-70 prompt + 30 new tokens: requests are
    # preempted in the middle of their prompts, whose scored positions then come again
    mid_prompt = []
    preempt = Scheduler._preempt

    def recording_preempt(self, req, batch):
        if req.needs_prompt_logprobs:
            mid_prompt.append(req.request_id)
        return preempt(self, req, batch)
    monkeypatch.setattr(Scheduler, "_preempt", recording_preempt)
    core = make_core(model_dir, num_gpu_blocks=10, kv_reserve_ratio=0.0, max_num_batched_tokens=16, max_num_seqs=4,
                     async_scheduling=async_scheduling)
    rnd = random.Random(1)
    work = [(f"r{i}", [rnd.randrange(3, 500) for _ in range(rnd.randrange(20, 70))],
             SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, prompt_logprobs=2)) for i in range(5)]
    outs = drain(core, work)
    assert mid_prompt, "no request was preempted before its prompt was scored: the case is not exercised"
    for rid, prompt, _ in work:
        check_against_reference(outs[rid], prompt, 2, reference)
        assert sum(len(o.new_token_ids) for o in outs[rid]) == 30


def test_prompt_logprobs_are_checked_at_admission(model_dir):
    core = make_core(model_dir)
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    sp = SamplingParams(max_tokens=2)
    sp.prompt_logprobs = 99  # a wire message that skipped the constructor's check
    err = core.add_request("bad", [3, 4, 5], sp)
    assert err is not None and err.finish_reason == "error" and "prompt_logprobs" in err.error


@pytest.mark.parametrize("seed", range(6))
def test_random_engines_score_every_prompt_exactly(model_dir, reference, seed):
    """Random engine shapes (blocks of 4 or 16, 12-64 of them, 2-40 tokens a step, 1-7 sequences, async on or off,
    prefix caching on or off) and random requests that share a prefix, some scoring their prompts: every request
    gets all its tokens, those that asked get each prompt position's logprob once and exactly, every block comes
    back."""
    rnd = random.Random(seed)
    block = rnd.choice([4, 16])
    seqs = rnd.randrange(1, 8)
    core = make_core(model_dir, block_size=block, num_gpu_blocks=rnd.randrange(12, 64), max_num_seqs=seqs,
                     max_num_batched_tokens=max(seqs, rnd.randrange(2, 40)), async_scheduling=rnd.random() < 0.5,
                     enable_prefix_caching=rnd.random() < 0.5, kv_reserve_ratio=rnd.choice([0.0, None]))
    shared = [rnd.randrange(3, 500) for _ in range(rnd.randrange(0, 30))]
    work = []
    for i in range(rnd.randrange(2, 7)):
        prompt = shared + [rnd.randrange(3, 500) for _ in range(rnd.randrange(1, 40))]
        room = core.kv.num_blocks * block - len(prompt) - 1
        if room >= 2:
            work.append((f"r{i}", prompt, SamplingParams(max_tokens=rnd.randrange(1, min(room, 30)), temperature=0,
                                                         ignore_eos=True, prompt_logprobs=rnd.choice([None, 0, 1, 3]))))
    outs = drain(core, work)
    for rid, prompt, sp in work:
        assert sum(len(o.new_token_ids) for o in outs[rid]) == sp.max_tokens
        if sp.prompt_logprobs is None:
            assert all(o.prompt_logprobs is None for o in outs[rid])
        else:
            check_against_reference(outs[rid], prompt, sp.prompt_logprobs, reference)
    core.kv.reset_prefix_cache()
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_scored_rows_are_taken_in_order_once():
    """The engine's bookkeeping alone: rows already held are skipped, a gap ends its request alone."""
    from kiln.engine.runner import PromptLogprobs
    from kiln.engine.sampler import PendingSample

    def step(*spans):
        n = sum(c for _, _, c in spans)
        chosen = -torch.arange(n, dtype=torch.float32)  # row i's logprob: -i
        return PromptLogprobs(list(spans), PendingSample(torch.zeros(n, dtype=torch.long), [0] * n, chosen, None, None))
    a, b = (Request(rid, list(range(3, 13)), SamplingParams(prompt_logprobs=0)) for rid in "ab")
    assert EngineCore._take_prompt_logprobs(step((a, 0, 3), (b, 0, 2))) == []
    assert [c for c, _ in a.prompt_logprobs] == [0, -1, -2] and [c for c, _ in b.prompt_logprobs] == [-3, -4]
    # a's positions 1-4 again (computed once more after a preemption): only 3 and 4 are new; b's 4-5 leave a gap
    assert EngineCore._take_prompt_logprobs(step((a, 1, 4), (b, 4, 2))) == [b]
    assert [c for c, _ in a.prompt_logprobs] == [0, -1, -2, -2, -3] and len(b.prompt_logprobs) == 2
