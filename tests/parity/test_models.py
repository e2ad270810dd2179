"""Kiln's model code and engine against transformers (float32, CPU) on tiny random checkpoints."""
from __future__ import annotations

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.kv_cache import KVCacheManager
from kiln.engine.request import Request
from kiln.engine.runner import ModelRunner
from kiln.engine.scheduler import ScheduledBatch
from tests.helpers.tiny_models import hf_greedy, write_tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"]
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 47)), [100, 3, 100], list(range(200, 290)), [7]]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    return write_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def test_forward_logits_match_transformers(tiny):
    import transformers as tf
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    runner = ModelRunner(EngineConfig(model=str(tiny), dtype="float32", block_size=16), str(tiny))
    runner.allocate_kv_cache(64)
    kv = KVCacheManager(64, 16)
    reqs = [Request(str(i), p, SamplingParams()) for i, p in enumerate(PROMPTS)]
    for r in reqs:
        assert kv.allocate_slots(r, r.num_tokens)
    batch = ScheduledBatch(reqs, [r.num_tokens for r in reqs])
    ids, pos, meta = runner.to_device(runner.prepare(batch)[0])[:3]
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(ids, pos, runner.kv_caches, meta))
        start = 0
        for p in PROMPTS:
            ref = hf(torch.tensor([p])).logits[0].float()
            got = logits[start:start + len(p)]
            start += len(p)
            assert got.shape == ref.shape
            assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_greedy_generation_matches_transformers(tiny):
    ref = hf_greedy(tiny, PROMPTS, 24)
    core = EngineCore(EngineConfig(model=str(tiny), dtype="float32", block_size=16, num_gpu_blocks=128))
    got = _run(core, PROMPTS, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert got == ref


def test_greedy_unchanged_under_preemption(tiny):
    ref = hf_greedy(tiny, PROMPTS, 40)
    # 10 blocks of 16 tokens: every request fits alone (<= 9 blocks) but not all together, so decode
    # growth forces preemptions (and, with a small token budget, chunked prefills)
    core = EngineCore(EngineConfig(model=str(tiny), dtype="float32", block_size=16, num_gpu_blocks=10,
                                   max_num_batched_tokens=48, kv_reserve_ratio=0.0))  # greedy admission
    got = _run(core, PROMPTS, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert core.scheduler.num_preemptions > 0
    assert got == ref
    assert core.kv.num_free_blocks == core.kv.num_blocks


def _run(core: EngineCore, prompts, sp):
    return core.run_to_completion(prompts, sp)


def test_llm_generate_batches_token_prompts_in_order(default_model_dir, tmp_path):
    """The offline API on a tiny model that carries the default model's tokenizer."""
    d = write_tiny_model("qwen2", tmp_path / "m", tokenizer_dir=default_model_dir)
    prompts = [[5, 6, 7], list(range(30, 60)), [9]]
    ref = hf_greedy(d, prompts, 12)
    llm = LLM(str(d), dtype="float32", block_size=16, num_gpu_blocks=64)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == ref
    assert all(o.finish_reason == "length" for o in outs)
    assert outs[1].text == llm.tokenizer.decode(ref[1])


def test_a_sliding_window_caps_the_model_length_where_attention_is_the_same(tmp_path, caplog):
    """Mistral v0.1's 4096-token window (here 40): Kiln attends to whole contexts, so it serves up to the window,
    with transformers' tokens there, says so at start, and refuses longer prompts by the length."""
    import json
    import logging
    d = write_tiny_model("mistral", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "sliding_window": 40}))
    with caplog.at_level(logging.WARNING, logger="kiln.runner"):
        core = EngineCore(EngineConfig(model=str(d), dtype="float32", block_size=16, num_gpu_blocks=32))
    assert core.max_model_len == 40
    assert any("sliding window of 40 tokens" in r.getMessage() for r in caplog.records)
    prompts = [list(range(10, 30))]
    assert _run(core, prompts, SamplingParams(max_tokens=19, temperature=0, ignore_eos=True)) == hf_greedy(d, prompts, 19)
    assert "the model length is 40" in core.add_request("long", list(range(10, 55)), SamplingParams()).error
