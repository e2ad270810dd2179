"""Tensor parallelism (MP_NUM=2) over gloo on CPU: same greedy tokens as one rank, and as transformers."""
from __future__ import annotations

import pytest

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import SamplingParams
from tests.helpers.tiny_models import hf_greedy, write_tiny_model

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 47)), [100, 3, 100]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: qkv bias and tied (vocab-split) embeddings
def test_two_ranks_match_transformers(arch, tmp_path):
    d = write_tiny_model(arch, tmp_path / arch)
    ref = hf_greedy(d, PROMPTS, 16)
    core = EngineCore(EngineConfig(model=str(d), dtype="float32", block_size=16, num_gpu_blocks=32,
                                   tensor_parallel_size=2, device="cpu"))
    try:
        sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        for i, p in enumerate(PROMPTS):
            assert core.add_request(str(i), p, sp) is None
        outs = {str(i): [] for i in range(len(PROMPTS))}
        while core.has_unfinished():
            for o in core.step():
                outs[o.request_id] += o.new_token_ids
        assert [outs[str(i)] for i in range(len(PROMPTS))] == ref
        assert core.runner.model.model.layers[0].self_attn.num_heads == 2  # really sharded: 4 heads / 2 ranks
    finally:
        core.close()
