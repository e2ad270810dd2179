"""Each sampling parameter changes what comes out, the way it says (engine level, tiny random Llama)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import Request, SamplingParams
from kiln.engine.sampler import Sampler
from tests.helpers.tiny_models import write_tiny_model

PROMPT = [11, 12, 13, 14, 15, 16]


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    d = write_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return EngineCore(EngineConfig(model=str(d), dtype="float32", block_size=16, num_gpu_blocks=256, max_num_seqs=16))


_n = iter(range(10**9))


def run(core, sp, prompt=PROMPT, eos=None, n=1):
    ids = [f"r{next(_n)}" for _ in range(n)]
    for rid in ids:
        assert core.add_request(rid, prompt, sp, eos) is None
    toks = {rid: [] for rid in ids}
    reasons = {}
    while core.has_unfinished():
        for o in core.step():
            toks[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    res = [(toks[r], reasons[r]) for r in ids]
    return res[0] if n == 1 else res


def greedy(core, max_tokens=16):
    return run(core, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]


def test_top_k_1_equals_greedy(core):
    assert run(core, SamplingParams(max_tokens=16, temperature=1.0, top_k=1, ignore_eos=True))[0] == greedy(core)


def test_tiny_top_p_and_full_min_p_equal_greedy(core):
    g = greedy(core)
    assert run(core, SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, ignore_eos=True))[0] == g
    assert run(core, SamplingParams(max_tokens=16, temperature=1.5, min_p=1.0, ignore_eos=True))[0] == g


def test_temperature_sampling_differs_from_greedy_and_seed_repeats(core):
    sp = SamplingParams(max_tokens=16, temperature=1.5, seed=1234, ignore_eos=True)
    a, b = run(core, sp)[0], run(core, sp)[0]
    assert a == b
    c = run(core, SamplingParams(max_tokens=16, temperature=1.5, seed=999, ignore_eos=True))[0]
    assert c != a
    assert a != greedy(core)


def test_seeded_output_is_independent_of_batch_mates(core):
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = run(core, sp)[0]
    others = [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)] * 3
    ids = ["mix0", "mix1", "mix2", "mix3"]
    core.add_request(ids[0], PROMPT, sp)
    for rid, p in zip(ids[1:], others):
        core.add_request(rid, [1, 2, 3], p)
    toks = {r: [] for r in ids}
    while core.has_unfinished():
        for o in core.step():
            toks[o.request_id] += o.new_token_ids
    assert toks["mix0"] == alone


def _repeats(tokens):
    return sum(c - 1 for c in Counter(tokens).values())


def test_frequency_and_presence_penalties_lower_repeats(core):
    base = greedy(core, 48)
    assert _repeats(base) > 5, "the tiny model should loop without penalties"
    freq = run(core, SamplingParams(max_tokens=48, temperature=0, frequency_penalty=2.0, ignore_eos=True))[0]
    pres = run(core, SamplingParams(max_tokens=48, temperature=0, presence_penalty=2.0, ignore_eos=True))[0]
    rep = run(core, SamplingParams(max_tokens=48, temperature=0, repetition_penalty=3.0, ignore_eos=True))[0]
    assert _repeats(freq) < _repeats(base)
    assert _repeats(pres) < _repeats(base)
    assert _repeats(rep) < _repeats(base)


def test_min_tokens_delays_eos_and_eos_stops(core):
    g = greedy(core, 16)
    eos = g[2]
    first = g.index(eos)
    toks, reason = run(core, SamplingParams(max_tokens=16, temperature=0), eos=[eos])
    assert reason == "stop" and toks == g[:first + 1]
    toks, reason = run(core, SamplingParams(max_tokens=16, temperature=0, min_tokens=first + 3), eos=[eos])
    assert eos not in toks[:first + 2]
    assert len(toks) >= first + 3


def test_ignore_eos_and_max_tokens(core):
    g = greedy(core, 10)
    toks, reason = run(core, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), eos=[g[0]])
    assert toks == g and reason == "length"


def test_stop_token_ids(core):
    g = greedy(core, 16)
    stop = g[4]
    toks, reason = run(core, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[stop]))
    assert reason == "stop" and toks == g[:g.index(stop) + 1]


def test_logprobs_are_the_model_distribution(core):
    from kiln.engine.request import EngineOutput  # noqa: F401
    core.add_request("lp", PROMPT, SamplingParams(max_tokens=3, temperature=0, logprobs=5, ignore_eos=True))
    outs = []
    while core.has_unfinished():
        outs += [o for o in core.step() if o.request_id == "lp"]
    for o in outs:
        chosen, top = o.logprobs[0]
        assert len(top) == 5
        assert top[0][0] == o.new_token_ids[0]          # greedy picks the most likely token
        assert abs(top[0][1] - chosen) < 1e-5
        assert all(top[i][1] >= top[i + 1][1] for i in range(4))
        assert chosen <= 0


# -- the sampler alone, on logits we control ------------------------------------------------------------

def _req(**kw):
    return Request("x", [1, 2, 3], SamplingParams(**kw))


def test_sampled_frequencies_follow_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]]))
    s = Sampler()
    counts = Counter()
    for _ in range(3000):
        counts[s(logits.clone(), [_req(temperature=1.0)]).token_ids[0]] += 1
    for tok, p in [(0, 0.5), (1, 0.3), (2, 0.2)]:
        assert abs(counts[tok] / 3000 - p) < 0.04
    assert counts[3] == 0
    hot = Counter(s(logits.clone(), [_req(temperature=5.0)]).token_ids[0] for _ in range(3000))
    assert hot[2] / 3000 > 0.25                           # flatter at high temperature


def test_min_tokens_masks_each_rows_stop_ids_in_one_copy(monkeypatch):
    from kiln.engine import sampler as S

    copies = []
    real = S.rows_to_device
    monkeypatch.setattr(S, "rows_to_device", lambda v, *a: copies.append(v) or real(v, *a))
    logits = torch.zeros(3, 6)
    logits[:, 0], logits[:, 2], logits[:, 1] = 3.0, 2.0, 1.0   # stop ids lead; token 1 comes next, then 3..5
    reqs = [Request("a", [1], SamplingParams(temperature=0, min_tokens=4, stop_token_ids=[0, 2])),
            Request("b", [1], SamplingParams(temperature=0, stop_token_ids=[0, 2])),     # no min_tokens: unmasked
            Request("c", [1], SamplingParams(temperature=0, min_tokens=4), eos_token_ids=frozenset({0}))]
    assert Sampler()(logits.clone(), reqs).token_ids == [1, 0, 2]
    assert copies == [[0 * 6 + 0, 0 * 6 + 2, 2 * 6 + 0]]   # flat (row, id) positions
    reqs[0].output_token_ids = [5, 5, 5, 5]   # min_tokens reached: its stop ids are allowed again
    copies.clear()
    assert Sampler()(logits.clone(), reqs).token_ids == [0, 0, 2]
    assert copies == [[2 * 6 + 0]]


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {Sampler()(logits.clone(), [_req(top_p=0.7)]).token_ids[0] for _ in range(500)}
    assert seen == {0, 1}


def test_top_k_limits_candidates():
    logits = torch.zeros(1, 10)
    logits[0, :3] = torch.tensor([1.2, 1.0, 1.1])
    seen = {Sampler()(logits.clone(), [_req(top_k=2)]).token_ids[0] for _ in range(500)}
    assert seen == {0, 2}


def test_top_k_keeps_ties_at_the_kth_logit():
    """The cut is the k-th highest logit: tokens tied with it stay (as in vLLM), so no tie is broken by position."""
    logits = torch.zeros(1, 10)
    logits[0, :3] = 1.0
    seen = {Sampler()(logits.clone(), [_req(top_k=2)]).token_ids[0] for _ in range(500)}
    assert seen == {0, 1, 2}


def test_top_k_and_top_p_per_row_in_one_batch():
    """Rows with different cuts in one batch each keep their own set: top-k then top-p over what top-k kept."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = torch.log(probs).repeat(4, 1)
    reqs = [_req(top_k=3), _req(top_p=0.6), _req(top_k=3, top_p=0.75), _req(temperature=1.0)]
    seen = [set() for _ in reqs]
    for _ in range(400):
        for i, t in enumerate(Sampler()(logits.clone(), reqs).token_ids):
            seen[i].add(t)
    # top_p 0.6: 0.4 + 0.25 reaches it; top-k 3 then top_p 0.75 of (0.4, 0.25, 0.15)/0.8: 0.5 + 0.3125 reaches it
    assert seen[:3] == [{0, 1, 2}, {0, 1}, {0, 1}]
    assert seen[3] == set(range(6))


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    r = _req(repetition_penalty=1.7, temperature=0)
    r.output_token_ids = [4, 9]
    ours = Sampler._apply_penalties(logits.clone(), [r], 50)
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[1, 2, 3, 4, 9]]), logits.clone())
    assert torch.allclose(ours, ref)


def test_penalties_of_a_batch_equal_each_row_alone():
    """Rows of different prompt and output lengths (and one with no output yet) in one batch: each row's logits
    are what the row gets alone."""
    torch.manual_seed(1)
    logits = torch.randn(4, 40)
    reqs = [Request("a", [1, 2, 3], SamplingParams(repetition_penalty=1.5, frequency_penalty=0.3)),
            Request("b", [7], SamplingParams(presence_penalty=0.8)),
            Request("c", [5, 5, 6, 30, 31, 32, 33], SamplingParams(repetition_penalty=0.7)),
            Request("d", [2, 9], SamplingParams(frequency_penalty=1.0, presence_penalty=0.5))]
    reqs[0].output_token_ids = [4, 4, 9]
    reqs[1].output_token_ids = [7, 8, 8, 8, 39]
    reqs[3].output_token_ids = [0]
    batch = Sampler._apply_penalties(logits.clone(), reqs, 40)
    for i, r in enumerate(reqs):
        assert torch.allclose(batch[i], Sampler._apply_penalties(logits[i:i + 1].clone(), [r], 40)[0])
    def rep(x, p):
        return x / p if x > 0 else x * p
    # token 4: twice in row a's output (repetition, then frequency x 2); row c: only its prompt's ids change
    assert torch.isclose(batch[0, 4], rep(logits[0, 4], 1.5) - 2 * 0.3)
    assert torch.isclose(batch[2, 5], rep(logits[2, 5], 0.7)) and batch[2, 4] == logits[2, 4]
    assert torch.isclose(batch[1, 8], logits[1, 8] - 0.8) and batch[1, 6] == logits[1, 6]


def test_presence_penalty_flips_a_close_call():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    r = _req(temperature=0, presence_penalty=0.5)
    r.output_token_ids = [0]
    assert Sampler()(logits, [r]).token_ids == [1]


def test_a_top_k_rows_cut_does_not_depend_on_a_top_p_row_beside_it():
    """top_p 1 keeps everything top-k kept, also when another row of the batch runs the top-p search (whose target,
    the whole mass, rounding can put out of reach of a far tail: 1 - 1e-10 of it here)."""
    from kiln.engine.sampler import Sampler as S, _Row
    logits = torch.full((2, 50), -60.0)
    logits[:, :3] = torch.tensor([20.0, 0.0, -3.0])
    rows = [_Row(False, 1.0, 3, 1.0, 0.0, [], None), _Row(False, 1.0, 50, 0.5, 0.0, [], None)]
    cut = S._top_k_top_p(logits.clone(), rows, 50)
    assert torch.isfinite(cut[0]).sum().item() == 3      # the top-k row: its 3, the tail included
    assert torch.isfinite(cut[1]).sum().item() == 1      # the top-p row: the argmax holds > 0.5 alone
    alone = S._top_k_top_p(logits[:1].clone(), rows[:1], 50)
    assert torch.equal(torch.isfinite(alone[0]), torch.isfinite(cut[0]))


def test_greedy_batches_take_the_argmax_of_bf16_logits_without_a_float32_copy(monkeypatch):
    """The decode graphs hand the sampler bf16 logits: a batch of plain greedy rows takes their argmax as they are
    (the same ids as float32's, ties to the first index), and a batch where some row needs more converts once."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 500, generator=g) * 4).to(torch.bfloat16)
    logits[2, 7] = logits[2, 400] = logits[2].max() + 1   # a tie: the first index wins, as in float32
    expected = logits.float().argmax(dim=-1).tolist()
    assert expected[2] == 7
    conversions = []
    real = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda t: conversions.append(t.dtype) or real(t))
    greedy_rows = [_req(temperature=0) for _ in range(6)]
    assert Sampler()(logits, greedy_rows).token_ids == expected
    assert conversions == []
    # a row with logprobs: one conversion, and every greedy row's id unchanged
    out = Sampler()(logits, greedy_rows[:5] + [_req(temperature=0, logprobs=2)])
    assert out.token_ids == expected and conversions == [torch.bfloat16]
    assert out.logprobs[5][0] == pytest.approx(torch.log_softmax(logits[5].float(), -1).max().item(), abs=1e-5)
    # a penalised greedy row: its logits change, so it takes the float32 path (the penalty must act)
    conversions.clear()
    pen = Request("p", [expected[0]], SamplingParams(temperature=0, repetition_penalty=1e9))
    out = Sampler()(logits, [pen] + greedy_rows[1:])
    assert conversions.count(torch.bfloat16) == 1
    assert out.token_ids[0] != expected[0] and out.token_ids[1:] == expected[1:]


def test_logit_bias_moves_greedy_and_sampled_choices_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]])).repeat(3, 1)
    reqs = [Request("a", [1], SamplingParams(temperature=0, logit_bias=[(0, -100.0)])),   # the top token banned
            Request("b", [1], SamplingParams(temperature=0, logit_bias=[(3, 30.0), (2, 5.0)])),
            Request("c", [1], SamplingParams(temperature=0))]                            # no bias: the argmax
    assert Sampler()(logits.clone(), reqs).token_ids == [1, 3, 0]
    # sampling: -100 on the two likeliest tokens leaves only token 2's mass (token 3 still ~0)
    s = Sampler()
    drawn = {s(logits[:1].clone(), [Request("d", [1], SamplingParams(temperature=1.0, logit_bias=[
        (0, -100.0), (1, -100.0)]))]).token_ids[0] for _ in range(200)}
    assert drawn == {2}
    # the logprobs returned are the model's, before the bias (as vLLM's and OpenAI's)
    out = Sampler()(logits[:1].clone(), [Request("e", [1], SamplingParams(temperature=0, logprobs=0,
                                                                           logit_bias=[(0, -100.0)]))])
    assert out.token_ids == [1] and out.logprobs[0][0] == pytest.approx(torch.log(torch.tensor(0.3)).item(), abs=1e-5)


def test_logit_bias_engine_end_to_end_and_its_checks(core):
    g = greedy(core, 8)
    banned = run(core, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                      logit_bias=[(t, -100.0) for t in set(g)]))[0]
    assert not set(banned) & set(g)
    forced = run(core, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logit_bias=[(7, 100.0)]))[0]
    assert forced == [7, 7, 7, 7]
    vocab = core.runner.model_config.vocab_size
    err = core.add_request("bad-id", PROMPT, SamplingParams(max_tokens=2, logit_bias=[(vocab, 1.0)]))
    assert err is not None and err.finish_reason == "error" and "logit_bias" in err.error
    for bad in ([(1, 101.0)], [(-1, 1.0)], [(1, float("nan"))], [(1,)]):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
    # its wire form (lists) comes back as pairs
    assert SamplingParams.from_dict(SamplingParams(logit_bias=[(3, 2.5)]).to_dict() | {"logit_bias": [[3, 2.5]]}
                                    ).logit_bias == [(3, 2.5)]
