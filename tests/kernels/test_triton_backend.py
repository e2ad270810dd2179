"""The whole engine on the Triton attention backend gives the PyTorch backend's greedy tokens (float32),
with chunked prefill, an int8 KV cache and Qwen3's q/k norm. On CPU this runs under TRITON_INTERPRET=1."""
from __future__ import annotations

import os

import pytest
import torch

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import SamplingParams
from tests.helpers.tiny_models import write_tiny_model

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs CUDA or TRITON_INTERPRET=1")

PROMPTS = [[5, 6, 7], list(range(10, 50)), [9] * 20]


def greedy(d, backend, kv):
    core = EngineCore(EngineConfig(model=str(d), dtype="float32", attention_backend=backend, block_size=16,
                                   num_gpu_blocks=64, kv_cache_dtype=kv, max_num_batched_tokens=32,
                                   use_cuda_graph=False))
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        core.add_request(str(i), p, sp)
    outs = {str(i): [] for i in range(len(PROMPTS))}
    while core.has_unfinished():
        for o in core.step():
            outs[o.request_id] += o.new_token_ids
    return [outs[str(i)] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_triton_backend_matches_torch_backend(tmp_path, kv):
    d = write_tiny_model("qwen3", tmp_path / "q3")
    assert greedy(d, "triton", kv) == greedy(d, "torch", kv)
