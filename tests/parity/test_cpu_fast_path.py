"""The CPU fast path: DTYPE=auto (bf16 where the CPU has it, a Q4 GGUF's linear layers as int4), the batched
decode attention, against the float32 path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln import LLM, SamplingParams
from kiln.layers.attention import AttentionMetadata, LayerKVCache, TorchAttention
from kiln.layers.linear import INT4_GROUP, ColumnParallelLinear, int4_groups_if_lossless
from kiln.models.config import cpu_has_native_bf16

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [QUESTION, [{"role": "user", "content": "Write a haiku about the sea."}],
           [{"role": "user", "content": "Name three primary colors."}]]


@pytest.fixture(scope="module")
def default_llm(default_model_dir):
    return LLM(None, block_size=16, num_gpu_blocks=256)  # DTYPE=auto


@pytest.fixture(scope="module")
def fp32_llm(default_model_dir):
    return LLM(None, dtype="float32", block_size=16, num_gpu_blocks=256)


def test_default_cpu_dtype_follows_the_hardware(default_llm):
    runner = default_llm.engine.runner
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    if cpu_has_native_bf16():
        assert runner.dtype == torch.bfloat16
        assert qkv.int4 and qkv.weight is None  # the GGUF's Q4_1 blocks, kept 4-bit
        assert all(m.int4 for m in runner.model.modules() if isinstance(m, ColumnParallelLinear))
    else:
        assert runner.dtype == torch.float32 and qkv.qweight is None


def test_default_cpu_dtype_answers_paris(default_llm):
    out = default_llm.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_default_cpu_dtype_agrees_with_float32(default_llm, fp32_llm):
    """Same first tokens, and the chosen tokens' log-probabilities within bf16's error (8 mantissa bits on
    activations: a few hundredths of a nat here; a wrong weight would be off by whole nats)."""
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    for conv in PROMPTS:
        ids = fp32_llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True)
        ref, got = fp32_llm.generate([ids], sp)[0], default_llm.generate([ids], sp)[0]
        assert got.token_ids[:4] == ref.token_ids[:4], conv
        for (lp_ref, _), (lp_got, _) in zip(ref.logprobs[:4], got.logprobs[:4]):
            assert abs(lp_ref - lp_got) < 0.15, (conv, lp_ref, lp_got)


def test_int4_kept_only_when_lossless():
    torch.manual_seed(0)
    n, k = 64, 4 * INT4_GROUP
    step = torch.rand(n, k // INT4_GROUP, 1) * 0.01 + 1e-3
    lo = torch.randn(n, k // INT4_GROUP, 1) * 0.05
    codes = torch.randint(0, 16, (n, k // INT4_GROUP, INT4_GROUP)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # Q4_1 maps each group's min to code 0 and its max to 15
    w = (codes * step + lo).view(n, k)  # what a Q4_1 GGUF dequantizes to
    found = int4_groups_if_lossless(w)
    assert found is not None
    assert int4_groups_if_lossless(torch.randn(n, k)) is None      # ordinary weights: not on a grid
    assert int4_groups_if_lossless(torch.randn(n, k + 8)) is None  # not a whole number of groups

    lin = ColumnParallelLinear(k, [n])
    lin.weight.data.copy_(w)
    assert lin.pack_int4_if_lossless(torch.bfloat16)
    x = torch.randn(3, k)
    ref = F.linear(x.bfloat16().float(), w)
    got = lin(x.bfloat16()).float()
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()  # bf16 scales and activations, nothing more


def _reference_attention(q, ks, vs, scale):
    """Per sequence, plain softmax attention of one query over its whole context (GQA by repeating K/V)."""
    outs = []
    for b, (k, v) in enumerate(zip(ks, vs)):
        group = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)   # [S, Hq, D]
        p = torch.softmax(torch.einsum("hd,shd->hs", q[b], kk) * scale, -1)
        outs.append(torch.einsum("hs,shd->hd", p, vv))
    return torch.stack(outs)


@pytest.mark.parametrize("int8_kv", [False, True])
def test_batched_decode_attention_matches_reference(int8_kv):
    torch.manual_seed(0)
    nb, bs, hkv, hq, d = 12, 4, 2, 6, 16
    lens = [3, 9, 1]                       # contexts incl. this step's token; ragged, one within one block
    tables = [[5, 0, 0], [2, 7, 11], [9, 0, 0]]
    cache = LayerKVCache(torch.zeros(nb, bs, hkv, d), torch.zeros(nb, bs, hkv, d))
    if int8_kv:
        cache = LayerKVCache(torch.zeros(nb, bs, hkv, d, dtype=torch.int8),
                             torch.zeros(nb, bs, hkv, d, dtype=torch.int8),
                             torch.zeros(nb, bs, hkv), torch.zeros(nb, bs, hkv))
    be = TorchAttention()
    ks, vs = [], []
    for table, n in zip(tables, lens):     # fill each context but its last token through write_kv
        k, v = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(n)])
        be.write_kv(cache, k[:-1], v[:-1], slots[:-1])
        ks.append(k), vs.append(v)
    last_slots = torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)])
    meta = AttentionMetadata(last_slots, torch.tensor(tables, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                             torch.arange(len(lens) + 1, dtype=torch.int32), lens, [1] * len(lens), 1, max(lens),
                             num_decode_rows=len(lens))
    q = torch.randn(len(lens), hq, d)
    out = be.forward(q, torch.stack([k[-1] for k in ks]), torch.stack([v[-1] for v in vs]), cache, meta, d ** -0.5)
    ref = _reference_attention(q, ks, vs, d ** -0.5)
    assert torch.allclose(out, ref, atol=3e-2 if int8_kv else 1e-5)
