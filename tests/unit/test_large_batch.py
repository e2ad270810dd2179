"""BATCH_SIZE up to 1024 (issue 10's capacity: an 8-bit KV cache has room for twice the sequences)."""
from __future__ import annotations

import pytest

from kiln.config import ConfigError, KilnConfig
from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import SamplingParams
from tests.helpers.tiny_models import write_tiny_model


def test_batch_size_setting_reaches_1024():
    assert KilnConfig.load({"BATCH_SIZE": "1024"}).batch_size == 1024
    with pytest.raises(ConfigError, match="BATCH_SIZE.*1024"):
        KilnConfig.load({"BATCH_SIZE": "1025"})


def test_engine_decodes_more_than_256_sequences_at_once(tmp_path):
    """300 sequences in one decode batch, on an int8 cache, each with the same output as when run alone."""
    core = EngineCore(EngineConfig(model=str(write_tiny_model("llama", tmp_path)), dtype="float32", block_size=16,
                                   num_gpu_blocks=700, max_num_seqs=1024, max_num_batched_tokens=4096,
                                   kv_cache_dtype="int8", max_waiting=1024, warmup=False))
    prompts = [[(7 * i + j) % 200 + 3 for j in range(5 + i % 7)] for i in range(300)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    peak = 0
    for i, p in enumerate(prompts):
        assert core.add_request(str(i), p, params) is None
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while core.has_unfinished():
        for o in core.step():
            outs[o.request_id] += o.new_token_ids
        peak = max(peak, len(core.scheduler.running))
    assert peak == 300
    assert core.kv.num_free_blocks == core.kv.num_blocks
    for i in (0, 151, 299):
        alone = core.run_to_completion([prompts[i]], params)[0]
        assert outs[str(i)] == alone and len(alone) == 4


def test_gpu_cache_budget_counts_the_allocators_free_memory_as_room(monkeypatch):
    """The GPU cache size: memory this process's allocator holds but no tensor uses (a float checkpoint quantized
    at load leaves its float weights there) is room for the cache; what other processes hold is not. torch.cuda's
    memory queries are replaced by an 80 GiB card's numbers."""
    import types

    import torch

    from kiln.engine.runner import ModelRunner
    G = 1 << 30
    state = {"reserved": 30 * G, "allocated": 10 * G}  # 20 GiB cached by the allocator (freed float weights)
    others = 5 * G                                       # another process on the same card

    def empty_cache():
        state["reserved"] = state["allocated"]
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * G - others - state["reserved"], 80 * G))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: state["allocated"])
    runner = types.SimpleNamespace(
        cfg=EngineConfig(gpu_memory_utilization=0.9, block_size=64), device=torch.device("cuda", 0), weight_bytes=0,
        bytes_per_block=lambda: G // 8, profile_activation_bytes=lambda: 2 * G, graph_reserve_bytes=lambda: G)
    n, why = ModelRunner.decide_num_blocks(runner, 4096)
    # 0.9 x 80 - 10 of weights - 2 of activations - 5 of the other process - 1 for the decode graphs = 54 GiB,
    # 8 blocks a GiB
    assert n == 432 and "gpu_memory_utilization=0.9" in why


def test_decode_graph_reserve_is_the_shared_logits_buffer():
    """The decode graphs' share of the GPU: one logits buffer of max_num_seqs rows in the model's dtype (the graphs
    of every batch size write into it) and the largest graph's LM-head output; nothing where no graph is
    captured."""
    import types

    import torch

    from kiln.engine.runner import ModelRunner
    runner = types.SimpleNamespace(cfg=EngineConfig(max_num_seqs=1024), device=torch.device("cuda", 0),
                                   backend=types.SimpleNamespace(name="triton"),
                                   model_config=types.SimpleNamespace(vocab_size=128256), dtype=torch.bfloat16)
    assert ModelRunner.graph_reserve_bytes(runner) == 1024 * 128256 * 4  # 0.49 GiB, not 9.2 GiB of per-graph logits
    runner.backend.name = "torch"
    assert ModelRunner.graph_reserve_bytes(runner) == 0
    runner.backend.name, runner.device = "triton", torch.device("cpu")
    assert ModelRunner.graph_reserve_bytes(runner) == 0
