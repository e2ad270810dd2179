"""Tensor parallelism (MP_NUM) over gloo on CPU: the same greedy tokens as one rank (and as transformers) for
every architecture, with async scheduling on and off, under preemption, with replicated KV heads (MP_NUM=4 over
2 KV heads) and with int8 weights; logits only for the rows that sample; clear errors when MP_NUM does not fit."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from kiln import distributed as tpd
from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import SamplingParams
from kiln.engine.tp import check_fit, weight_bytes_per_rank
from kiln.layers.linear import QKVParallelLinear
from kiln.models.config import ModelConfig
from tests.helpers.tiny_models import hf_greedy, write_tiny_model

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 47)), [100, 3, 100]]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def make_core(model_dir, tp: int, **kw) -> EngineCore:
    cfg = dict(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=32, device="cpu",
               tensor_parallel_size=tp)
    cfg.update(kw)
    return EngineCore(EngineConfig(**cfg))


def generate(core: EngineCore, prompts, sp=GREEDY, tag: str = "") -> list[list[int]]:
    for i, p in enumerate(prompts):
        assert core.add_request(f"{tag}{i}", p, sp) is None
    outs = {f"{tag}{i}": [] for i in range(len(prompts))}
    steps = 0
    while core.has_unfinished():
        steps += 1
        assert steps < 2000, "the engine did not finish"
        for o in core.step():
            outs[o.request_id] += o.new_token_ids
    assert core.kv.num_free_blocks == core.kv.num_blocks  # every block came back
    return [outs[f"{tag}{i}"] for i in range(len(prompts))]


def one_rank_then_two(model_dir, run, two: dict | None = None, **kw):
    """run(core)'s result on one rank (sync) and on two (async, with `two`'s settings too), each engine closed
    after."""
    results = []
    for tp, extra in ((1, dict(async_scheduling=False)), (2, dict(async_scheduling=True, **(two or {})))):
        core = make_core(model_dir, tp, **extra, **kw)
        try:
            results.append(run(core))
        finally:
            core.close()
    return results


# qwen2: qkv bias and tied (vocab-split) embeddings; qwen3_moe, mixtral: experts split by intermediate size;
# qwen2_moe: the shared expert's partial sum joins the experts' in one all-reduce
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen2_moe", "qwen3_moe", "mixtral"])
def test_two_ranks_match_transformers(arch, tmp_path):
    d = write_tiny_model(arch, tmp_path / arch)
    ref = hf_greedy(d, PROMPTS, 16)
    core = make_core(d, 2)
    try:
        assert generate(core, PROMPTS) == ref
        layer = core.runner.model.model.layers[0]
        assert layer.self_attn.num_heads == 2  # really sharded: 4 heads / 2 ranks
        if arch in ("qwen2_moe", "qwen3_moe", "mixtral"):
            assert layer.mlp.w13.shape[1] == layer.mlp.full_inter  # each rank: gate and up halves of each expert
        if arch == "qwen2_moe":
            assert layer.mlp.shared_expert.gate_up_proj.weight.shape[0] == 80  # half of 2 x 80 on each rank
        assert core.runner.weight_bytes == weight_bytes_per_rank(core.runner.model_config, 2, torch.float32, None)
    finally:
        core.close()


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_expert_parallel_ranks_match_transformers(arch, tmp_path):
    """KILN_ENABLE_EXPERT_PARALLEL: each of two ranks holds half the experts whole (and the shared expert's slice);
    the pairs routed to the other rank's experts count for nothing here, and the one all-reduce sums them: the
    greedy tokens of transformers, float and int8 (w8a16: per-expert scales, whole rows, as on one rank)."""
    d = write_tiny_model(arch, tmp_path / arch)
    ref = hf_greedy(d, PROMPTS, 16)
    core = make_core(d, 2, enable_expert_parallel=True)
    try:
        assert generate(core, PROMPTS) == ref
        moe = core.runner.model.model.layers[0].mlp
        assert moe.local_experts == moe.num_experts // 2 and moe.w13.shape[0] == moe.local_experts
        assert moe.w13.shape[1] == 2 * moe.full_inter  # whole experts
        mc = core.runner.model_config
        assert core.runner.weight_bytes == weight_bytes_per_rank(mc, 2, torch.float32, None)
        assert weight_bytes_per_rank(mc, 2, torch.float32, None) < weight_bytes_per_rank(mc, 1, torch.float32, None)
    finally:
        core.close()
    one = make_core(d, 1, quantization="w8a16", async_scheduling=False)
    try:
        ref8 = generate(one, PROMPTS)
    finally:
        one.close()
    core = make_core(d, 2, enable_expert_parallel=True, quantization="w8a16")
    try:
        assert generate(core, PROMPTS) == ref8
        assert core.runner.weight_bytes == weight_bytes_per_rank(core.runner.model_config, 2, torch.float32, "w8a16")
    finally:
        core.close()


def test_expert_parallelism_says_what_does_not_fit(tmp_path):
    cfg = ModelConfig.from_dir(write_tiny_model("qwen3_moe", tmp_path / "m"))
    cfg.expert_parallel = True
    with pytest.raises(ValueError, match=r"MP_NUM=4 does not fit the model: 6 experts .* cannot be split over 4 .* MP_NUM=1 or 2 would work"):
        check_fit(ModelConfig(**{**vars(cfg), "num_experts": 6, "num_heads": 4}), 4, torch.float32, None)
    with pytest.raises(ValueError, match="expert parallelism .* needs a mixture-of-experts model"):
        make_core(write_tiny_model("llama", tmp_path / "l"), 1, enable_expert_parallel=True)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_two_ranks_equal_one_rank_async_and_sync(arch, tmp_path, monkeypatch, caplog):
    """Chunked prefill (24 tokens a step) so that some steps sample nothing and some read in-flight tokens."""
    d = write_tiny_model(arch, tmp_path / arch)
    kw = dict(max_num_batched_tokens=24, max_num_seqs=4, enable_prefix_caching=False)
    one = make_core(d, 1, async_scheduling=False, **kw)
    try:
        ref = generate(one, PROMPTS)
    finally:
        one.close()
    caplog.set_level(logging.INFO, logger="kiln.tp")
    core = make_core(d, 2, async_scheduling=True, **kw)
    try:
        assert core.async_scheduling
        assert generate(core, PROMPTS, tag="async") == ref
        assert core.num_overlapped_steps > 0  # steps really were queued before the last one's ids were read

        # synchronous steps on the same ranks; and only the rows that sample reach the LM head's all-gather
        gathered = []
        gather = tpd.all_gather_last_dim

        def counting_gather(x):
            gathered.append(x.shape[0])
            return gather(x)
        monkeypatch.setattr(tpd, "all_gather_last_dim", counting_gather)
        core.async_scheduling = False
        out = generate(core, PROMPTS, tag="sync")
        assert out == ref
        assert sum(gathered) == sum(map(len, out))  # one row per sampled token: prefill chunks gather nothing
    finally:
        core.close()
    plans = [r.getMessage() for r in caplog.records if "memory plan" in r.getMessage()]
    assert [p.split(":")[0] for p in plans] == ["memory plan, rank 0 of 2", "memory plan, rank 1 of 2"]
    assert all("weights" in p and "KV cache" in p and "(32 blocks)" in p and "activations" in p for p in plans)


def test_two_ranks_under_preemption(tmp_path):
    """8 blocks of 16 tokens for four requests that grow to 3-4 blocks each: some are preempted and recomputed."""
    d = write_tiny_model("llama", tmp_path / "llama")
    prompts = PROMPTS + [list(range(200, 230))]
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    kw = dict(num_gpu_blocks=8, max_num_seqs=4, max_num_batched_tokens=64, enable_prefix_caching=False,
              kv_reserve_ratio=0.0)  # greedy admission: preemptions
    (ref, _), (got, preemptions) = one_rank_then_two(
        d, lambda core: (generate(core, prompts, sp), core.scheduler.num_preemptions), **kw)
    assert got == ref and preemptions > 0


def test_two_ranks_speculate_as_one_rank_decodes(tmp_path):
    """Speculative decoding: the draft tokens travel in the packed step, every rank computes their positions and
    the LM head over their rows, rank 0 confirms them; the greedy tokens equal one rank's without speculation."""
    d = write_tiny_model("llama", tmp_path / "llama")
    prompts = [[5, 6, 7, 8] * 6, [9, 10, 11] * 9 + [12], list(range(100, 140))]
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    (ref, _), (got, confirmed) = one_rank_then_two(
        d, lambda core: (generate(core, prompts, sp), core.spec_stats.num_accepted_tokens), num_gpu_blocks=64,
        two=dict(speculative_config={"method": "ngram", "num_speculative_tokens": 4}))
    assert got == ref and confirmed > 0


def test_two_ranks_serve_lora_adapters_as_one_rank(tmp_path):
    """LoRA: each rank holds its share of every adapter (B's rows of its q/k/v and gate/up outputs, A's columns of
    its o and down inputs, the partial deltas summed by the projection's all-reduce); each token's adapter follows
    the packed step. Base and adapter requests together: the tokens of one rank."""
    from tests.unit.test_lora import ALL, write_adapter
    d = write_tiny_model("llama", tmp_path / "llama")
    adapter, _ = write_adapter(tmp_path / "a", d, ALL, rank=4, alpha=8, seed=3)
    kw = dict(lora_modules={"a": str(adapter)}, max_num_batched_tokens=24)

    def run(core):
        work = [(f"{lora}{i}", p, lora) for i, p in enumerate(PROMPTS) for lora in ("", "a")]
        for rid, p, lora in work:
            assert core.add_request(rid, p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                           lora_name=lora or None)) is None
        got = {rid: [] for rid, _, _ in work}
        while core.has_unfinished():
            for o in core.step():
                got[o.request_id] += o.new_token_ids
        return got
    ref, got = one_rank_then_two(d, run, **kw)
    assert got == ref and ref["a0"] != ref["0"]

    # loaded while serving (two adapters, the first unloaded between): every rank loads each under rank 0's number
    other, _ = write_adapter(tmp_path / "b", d, ["q_proj", "down_proj"], rank=2, alpha=4, seed=4)

    def run_loaded(core):
        assert core.update_lora(True, "b", str(other)) is None and core.update_lora(False, "b") is None
        assert core.update_lora(True, "a", str(adapter)) is None
        return run(core)
    ref_loaded, got_loaded = one_rank_then_two(d, run_loaded, max_num_batched_tokens=24)
    assert got_loaded == ref_loaded == ref

    # a rank that cannot load it (its copy gone after rank 0 read it): refused, no rank keeps it, serving goes on
    core = make_core(d, 2)
    try:
        gone = tmp_path / "gone"
        shutil.copytree(adapter, gone)
        load = core.runner.load_lora

        def load_then_delete(*a, **k):
            number = load(*a, **k)
            shutil.rmtree(gone)
            return number
        core.runner.load_lora = load_then_delete
        kind, msg = core.update_lora(True, "g", str(gone))
        assert "a tensor-parallel rank could not load it" in msg and core.stats().lora_adapters == {}
        core.runner.load_lora = load
        assert core.update_lora(True, "a", str(adapter)) is None
        assert run(core) == got
    finally:
        core.close()


def test_two_ranks_score_prompts_as_one_rank(tmp_path):
    """Prompt logprobs: every rank runs the LM head over the scored prompt rows (its all-gather) in lockstep, in
    chunked steps, some of which sample nothing; the logprobs equal one rank's."""
    d = write_tiny_model("llama", tmp_path / "llama")
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=2)
    kw = dict(max_num_batched_tokens=24, max_num_seqs=4, enable_prefix_caching=False)

    def scored(core) -> dict[str, list]:
        for i, p in enumerate(PROMPTS):
            assert core.add_request(str(i), p, sp) is None
        got = {}
        for _ in range(2000):
            if not core.has_unfinished():
                return got
            for o in core.step():
                if o.prompt_logprobs is not None:
                    got[o.request_id] = o.prompt_logprobs
        raise AssertionError("the engine did not finish")
    ref, got = one_rank_then_two(d, scored, **kw)
    assert sorted(got) == sorted(ref) == ["0", "1", "2"]
    for rid, lps in ref.items():
        assert len(got[rid]) == len(lps) == len(PROMPTS[int(rid)]) and got[rid][0] is None
        for (c1, top1), (c2, top2) in zip(got[rid][1:], lps[1:]):
            assert c1 == pytest.approx(c2, abs=1e-4) and [t for t, _ in top1] == [t for t, _ in top2]


def test_four_ranks_replicate_two_kv_heads(tmp_path):
    d = write_tiny_model("qwen3", tmp_path / "qwen3")  # 4 heads, 2 KV heads, q/k norm
    one = make_core(d, 1, async_scheduling=False)
    try:
        ref = generate(one, PROMPTS)
    finally:
        one.close()
    core = make_core(d, 4, async_scheduling=True)
    try:
        attn = core.runner.model.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (1, 1)
        assert core.runner.kv_tensor.shape[-2] == 1  # one KV head's cache per rank
        # the start-up check's estimate of a rank's weights is what a rank really holds
        assert core.runner.weight_bytes == weight_bytes_per_rank(core.runner.model_config, 4, torch.float32, None)
        assert generate(core, PROMPTS) == ref
    finally:
        core.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_moe", "qwen3_moe"])
def test_two_ranks_int8_weights_equal_one_rank(arch, tmp_path):
    """w8a16: column shards keep their rows' scales; row-parallel shards take the whole row's scale (a MAX
    all-reduce), so the int8 weights are the ones a single rank holds (the experts' down projections too)."""
    d = write_tiny_model(arch, tmp_path / arch)

    def down_scale(core):
        mlp = core.runner.model.model.layers[0].mlp
        if arch == "qwen2_moe":  # the experts' and the shared expert's
            return torch.cat([mlp.scales[1].flatten(), mlp.shared_expert.down_proj.scale])
        return mlp.scales[1] if arch == "qwen3_moe" else mlp.down_proj.scale

    one = make_core(d, 1, quantization="w8a16", async_scheduling=False)
    try:
        ref = generate(one, PROMPTS)
        ref_scale = down_scale(one).clone()
    finally:
        one.close()
    core = make_core(d, 2, quantization="w8a16", async_scheduling=True)
    try:
        assert torch.equal(down_scale(core), ref_scale)
        assert core.runner.model.model.layers[0].self_attn.qkv_proj.qweight is not None
        assert core.runner.weight_bytes == weight_bytes_per_rank(core.runner.model_config, 2, torch.float32, "w8a16")
        assert generate(core, PROMPTS) == ref
    finally:
        core.close()


def test_two_ranks_int8_lm_head_equal_one_rank(tmp_path):
    """--quantize-lm-head under tensor parallelism: each rank's vocabulary shard has its own rows' scales, so the
    gathered logits, and the greedy outputs, are one rank's."""
    d = write_tiny_model("llama", tmp_path / "llama")  # its own LM head (not tied)
    one = make_core(d, 1, quantize_lm_head=True, async_scheduling=False)
    try:
        assert one.runner.model.lm_head.head_qweight is not None
        ref = generate(one, PROMPTS)
    finally:
        one.close()
    core = make_core(d, 2, quantize_lm_head=True, async_scheduling=False)
    try:
        assert generate(core, PROMPTS) == ref
    finally:
        core.close()


# -- sharding of q/k/v with replicated KV heads (no process group needed: loading is local) -------------------
@pytest.mark.parametrize("rank,kv_head", [(0, 0), (1, 0), (2, 1), (3, 1)])
def test_qkv_shard_takes_the_replicated_kv_head_of_its_query_heads(rank, kv_head, monkeypatch):
    monkeypatch.setattr(tpd, "_tp_rank", rank)
    monkeypatch.setattr(tpd, "_tp_size", 4)
    d, hidden = 2, 3
    layer = QKVParallelLinear(hidden, num_heads=4, num_kv_heads=2, head_dim=d, bias=True)
    q = torch.arange(4 * d * hidden, dtype=torch.float32).view(4 * d, hidden)
    k, v = q[:2 * d] + 1000, q[:2 * d] + 2000
    for shard, w in enumerate((q, k, v)):
        layer.load_weight(layer.weight, w, shard)
        layer.load_weight(layer.bias, w[:, 0], shard)
    rows = slice(rank * d, (rank + 1) * d), slice(kv_head * d, (kv_head + 1) * d)
    expect = torch.cat([q[rows[0]], k[rows[1]], v[rows[1]]])
    assert torch.equal(layer.weight.data, expect)
    assert torch.equal(layer.bias.data, expect[:, 0])


# -- start-up errors ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    d = write_tiny_model("llama", tmp_path_factory.mktemp("llama"))
    return d, ModelConfig.from_dir(d)  # 4 heads, 2 KV heads, intermediate 128


def test_heads_that_do_not_split_name_the_numbers_and_what_works(tiny_config):
    _, mc = tiny_config
    with pytest.raises(ValueError) as e:
        check_fit(mc, 3, torch.float32, None)
    assert str(e.value) == ("MP_NUM=3 does not fit the model: 4 attention heads cannot be split over 3 ranks (4 "
                            "heads, 2 KV heads, intermediate size 128); MP_NUM=1 or 2 or 4 would work")


def test_more_ranks_than_gpus(tiny_config):
    _, mc = tiny_config
    with pytest.raises(ValueError, match=r"^MP_NUM=4 needs 4 GPUs, 2 visible .*; MP_NUM=1 or 2 would work$"):
        check_fit(mc, 4, torch.bfloat16, None, visible_gpus=2, gpu_bytes=80 << 30)


def test_memory_split_that_cannot_hold_the_model():
    """A Llama-3-70B shape in bf16 on 40 GiB GPUs: about 66 GiB a rank over 2, 33 GiB over 4."""
    mc = ModelConfig("LlamaForCausalLM", 128256, 8192, 28672, 80, 64, 8, 128, 1e-5, 5e5, None, 8192, False,
                     False, False, "bfloat16", [])
    assert 130 << 30 < weight_bytes_per_rank(mc, 1, torch.bfloat16, None) < 132 << 30  # 70.6e9 parameters
    with pytest.raises(ValueError) as e:
        check_fit(mc, 2, torch.bfloat16, None, visible_gpus=8, gpu_bytes=40 << 30)
    msg = str(e.value)
    assert msg.startswith("MP_NUM=2 does not fit in GPU memory: each rank holds 65.")
    assert "MP_NUM=4 or 8 would work (or use w8a16 quantization)" in msg
    check_fit(mc, 4, torch.bfloat16, None, visible_gpus=8, gpu_bytes=40 << 30)  # fits: no error
    check_fit(mc, 2, torch.bfloat16, "w8a16", visible_gpus=8, gpu_bytes=40 << 30)  # int8: ~33 GiB a rank


def test_engine_refuses_mp_num_that_does_not_fit_before_starting_ranks(tiny_config, monkeypatch):
    d, _ = tiny_config
    import kiln.engine.tp as tp

    def no_ranks():
        raise AssertionError("worker ranks were started")
    monkeypatch.setattr(tp, "_free_port", no_ranks)  # the first step of starting them
    with pytest.raises(ValueError, match="MP_NUM=3 does not fit the model"):
        make_core(d, 3)
