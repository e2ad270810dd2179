"""The whole engine on the Triton attention backend gives the PyTorch backend's greedy tokens (float32),
with chunked prefill, an int8 or fp8 (E4M3) KV cache and Qwen3's q/k norm. On CPU this runs under TRITON_INTERPRET=1."""
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
    return core.run_to_completion(PROMPTS, sp)


@pytest.mark.parametrize("kv", ["auto", "int8", "fp8"])
def test_triton_backend_matches_torch_backend(tmp_path, kv):
    d = write_tiny_model("qwen3", tmp_path / "q3")
    assert greedy(d, "triton", kv) == greedy(d, "torch", kv)


@pytest.mark.parametrize("rope", [False, True], ids=["rotated", "rope"])
@pytest.mark.parametrize("kv", ["auto", "int8", "fp8"])
def test_mixed_step_splits_decode_rows_and_matches_torch(kv, rope):
    """A mixed step (three one-token rows, then a fresh prompt and a prompt chunk with a cached prefix): the
    Triton backend routes the leading rows to the decode kernel and gives the torch backend's output; with q and k
    still to be rotated (as the model hands them over on CUDA) too, where RoPE goes with the cache write."""
    from kiln.layers.attention import AttentionMetadata, LayerKVCache, TorchAttention, TritonAttention
    from kiln.layers.rope import RotaryEmbedding

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    bs, nblocks, hq, hkv, d = 16, 24, 4, 2, 32
    query_lens, seq_lens = [1, 1, 1, 9, 5], [20, 33, 7, 9, 40]
    tables = [[0, 1], [2, 3, 4], [5], [6], [7, 8, 9]]
    t = sum(query_lens)
    slots = [tables[b][p // bs] * bs + p % bs for b in range(5) for p in range(seq_lens[b] - query_lens[b], seq_lens[b])]
    width = max(map(len, tables))
    bt = torch.tensor([r + [0] * (width - len(r)) for r in tables], dtype=torch.int32, device=dev)
    qsl = torch.tensor([0, 1, 2, 3, 12, 17], dtype=torch.int32, device=dev)

    def meta(num_decode_rows):
        return AttentionMetadata(torch.tensor(slots, device=dev), bt, torch.tensor(seq_lens, dtype=torch.int32,
                                 device=dev), qsl, seq_lens, query_lens, max(query_lens), max(seq_lens),
                                 num_decode_rows=num_decode_rows)

    def cache():
        dt = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}.get(kv, torch.float32)
        k = (torch.randn(nblocks, bs, hkv, d, generator=g) * (1 if kv == "auto" else 40)).to(dt).to(dev)
        v = (torch.randn(nblocks, bs, hkv, d, generator=g) * (1 if kv == "auto" else 40)).to(dt).to(dev)
        if kv == "int8":
            scales = [torch.rand(nblocks, bs, hkv, generator=g).to(dev) / 40 for _ in range(2)]
        elif kv == "fp8":  # static per-head scales, as the runner allocates them
            scales = [(torch.rand(hkv, generator=g) / 40 + 0.01).to(dev) for _ in range(2)]
        else:
            scales = [None, None]
        return LayerKVCache(k, v, *scales)

    c = cache()  # the cached prefixes: same random contents for both backends
    c2 = LayerKVCache(c.k.clone(), c.v.clone(), *(None if s is None else s.clone() for s in (c.k_scale, c.v_scale)))
    q = torch.randn(t, hq, d, generator=g).to(dev)
    k = torch.randn(t, hkv, d, generator=g).to(dev)
    v = torch.randn(t, hkv, d, generator=g).to(dev)
    rotary = None
    if rope:  # every row at its own position
        positions = torch.tensor([p for b in range(5) for p in range(seq_lens[b] - query_lens[b], seq_lens[b])],
                                 device=dev)
        rotary = (RotaryEmbedding(d, 64, 10000.0).to(dev), positions)
    ref = TorchAttention().forward(q.clone(), k.clone(), v, c, meta(0), d ** -0.5, rope=rotary)

    calls = []
    backend = TritonAttention()
    real_decode = backend.k.paged_decode_attention

    class Spy:  # records the rows each kernel got; the kernels themselves run unchanged
        def __getattr__(self, name):
            return getattr(backend.__dict__["_real"], name)

        def paged_decode_attention(self, q, *a, **kw):
            calls.append(("decode", q.shape[0]))
            return real_decode(q, *a, **kw)

    backend.__dict__["_real"] = backend.k
    backend.k = Spy()
    out = backend.forward(q, k, v, c2, meta(3), d ** -0.5, rope=rotary)
    assert calls == [("decode", 3)]
    assert torch.allclose(out, ref, atol=1e-4 if kv == "auto" else 2e-3, rtol=1e-3)
