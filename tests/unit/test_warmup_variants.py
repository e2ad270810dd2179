"""Nothing new runs after ready (issue 11): the warm-up reaches every kind of step the scheduler can produce
(prefill, mixed, chunked, every decode ladder size, each prefill tile class) and every sampler path; a mixed load
after it (different lengths, sampling parameters, chunked prefills, arrivals mid-decode) reaches none that the
warm-up did not."""
from __future__ import annotations

import logging
import os
import random

import pytest
import torch

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.cuda_graph import batch_size_ladder
from kiln.engine.request import SamplingParams
from kiln.engine.variants import VariantLog, prefill_tile
from tests.helpers.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama"))


CFG = dict(dtype="float32", block_size=16, num_gpu_blocks=96, max_num_seqs=6, max_num_batched_tokens=96,
           max_prefill_tokens=80, max_waiting=4)


def random_params(rnd: random.Random) -> SamplingParams:
    p = dict(max_tokens=rnd.randint(1, 12), ignore_eos=True)
    if rnd.random() < 0.5:
        p["temperature"] = 0.0
    else:
        p["temperature"] = rnd.choice([0.5, 1.0])
        p.update(rnd.choice([{}, {"top_k": 7}, {"top_p": 0.8}, {"min_p": 0.1}, {"seed": rnd.randint(0, 99)}]))
    p.update(rnd.choice([{}, {}, {"repetition_penalty": 1.2}, {"presence_penalty": 0.5}, {"min_tokens": 1},
                         {"logprobs": 0}, {"logprobs": 3}]))
    return SamplingParams(**p)


def test_mixed_load_after_warmup_reaches_nothing_new(model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="kiln.engine"):
        core = EngineCore(EngineConfig(model=str(model_dir), warmup=True, **CFG))
    warm = core.variants.snapshot()
    # what the warm-up must have reached, whatever the load below happens to do
    must = {("step", k) for k in ("prefill", "prefill+chunk", "mixed", "mixed+chunk", "decode")}
    must |= {("decode_batch", s) for s in batch_size_ladder(CFG["max_num_seqs"])}
    must |= {("prefill_tile", t) for t in (16, 32, 64, "full")}
    must |= {("sampler", p) for p in ("greedy", "random", "seeded", "top_k_top_p", "min_p", "penalties",
                                      "min_tokens", "logprobs", "top_logprobs", "logit_bias")}
    assert must <= warm, must - warm
    # start-up says what the warm-up did and how long it took
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("warm-up:"))
    assert " steps in " in line and "mixed+chunk" in line and "decode_batch: 1, 2, 4, 6" in line
    # and where start to ready went, phase by phase
    phases = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up: "))
    names = [p.rsplit(" ", 2)[0] for p in phases[len("start-up: "):].split(", ")]
    assert names == ["weights", "model runner (weights included)", "cache sizing (activation profile)",
                     "KV cache allocation", "CUDA graphs", "warm-up"], phases
    # the engine is as if fresh: no request, every block free, no step statistics from the warm-up
    assert not core.has_unfinished() and core.kv.num_free_blocks == core.kv.num_blocks
    assert core.scheduler.prefill_tokens_per_step.sum == 0 and core.stats().num_refused_total == 0
    assert core.cfg.max_waiting == CFG["max_waiting"]

    rnd = random.Random(11)
    n = 0
    for _ in range(120):  # arrivals between steps: idle, mid-decode, mid-chunk
        while len(core.scheduler.waiting) < 3 and rnd.random() < 0.4:
            n += 1
            core.add_request(f"r{n}", [rnd.randrange(1, 250) for _ in range(rnd.choice([1, 5, 17, 40, 70, 130]))],
                             random_params(rnd))
        if core.has_unfinished():
            core.step()
    while core.has_unfinished():
        core.step()
    load = core.variants.snapshot()
    assert n >= 30 and ("step", "mixed+chunk") in load and ("prefill_tile", "full") in load
    assert load - warm == set(), f"the load reached what the warm-up did not: {load - warm}"


def test_a_load_outside_the_warmup_is_caught(model_dir):
    """The check above can fail: a warm-up that skipped decodes at batch 6 shows up as a new key."""
    core = EngineCore(EngineConfig(model=str(model_dir), **CFG))
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    core.add_request("a", [1, 2, 3], p)
    while core.has_unfinished():
        core.step()
    before = core.variants.snapshot()
    for i in range(4):
        core.add_request(f"b{i}", [5 + i] * 3, p)
    while core.has_unfinished():
        core.step()
    assert core.variants.snapshot() - before == {("decode_batch", 4)}


def test_variant_keys():
    assert [prefill_tile(n) for n in (1, 16, 17, 33, 64, 65, 4000)] == [16, 16, 32, 64, 64, "full", "full"]
    log = VariantLog(max_num_seqs=50)
    log.record_step([1, 1, 1], 3, 3, frozenset({"greedy"}))
    log.record_step([1, 40, 48], 1, 2, frozenset({"greedy", "top_logprobs"}))
    assert log.seen == {("step", "decode"), ("decode_batch", 4), ("sampler", "greedy"), ("step", "mixed+chunk"),
                        ("prefill_tile", 64), ("sampler", "top_logprobs")}


def test_compile_watch_names_compiles_after_ready_only(caplog):
    """What the watch does when Triton reports a compile (the GPU's JIT calls the same hooks): compiles during the
    warm-up are quiet, one after ready is recorded and logged with its name and time."""
    from kiln.engine.variants import CompileWatch

    watch = CompileWatch()
    watch.compiled("_decode_kernel[num_warps=4](...)", 0.5)
    assert watch.after_ready == []
    watch.ready = True
    with caplog.at_level("WARNING", logger="kiln.engine"):
        watch.compiled("_prefill_kernel[num_warps=8](q_ptr: *bf16, ...)", 0.75)
    assert watch.after_ready == [("_prefill_kernel[num_warps=8](q_ptr: *bf16, ...)", 0.75)]
    assert "after ready (750 ms" in caplog.text and "_prefill_kernel" in caplog.text
    assert "the warm-up did not reach" in caplog.text
    watch.warmed_up = False  # USE_WARMUP=0 (the offline default): the warning says so instead
    with caplog.at_level("WARNING", logger="kiln.engine"):
        watch.compiled("_decode_kernel[num_warps=8](...)", 0.1)
    assert "the warm-up was off" in caplog.records[-1].getMessage()


def test_a_compile_is_named_by_its_arguments_specialization():
    """The hook's arguments as Triton's JIT passes them (jit.py _call_hook): the warning names each argument's type,
    its alignment, and the constexprs (an int that equals 1 becomes one), the terms of describe_variant."""
    from types import SimpleNamespace

    from kiln.engine.variants import describe_compile

    kw = {"key": "[('*bf16', 'D'), ...]", "repr": "_prefill_kernel[num_warps=4](q_ptr: ()",
          "fn": SimpleNamespace(name="_prefill_kernel"),
          "compile": {"signature": {"q_ptr": "*bf16", "out_ptr": "*bf16", "stride_qt": "i32", "stride_qh": "constexpr",
                                    "BLOCK_M": "constexpr"},
                      "constants": {(3,): 1, (4,): 64}, "configs": [{(0,): [["tt.divisibility", 16]],
                                                                      (2,): [["tt.divisibility", 16]]}],
                      "num_warps": 4, "num_stages": 2}}
    assert describe_compile(kw) == ("_prefill_kernel(num_warps=4, num_stages=2, q_ptr: *bf16:D, out_ptr: *bf16, "
                                    "stride_qt: i32:D, stride_qh=1, BLOCK_M=64)")
    assert describe_compile({"key": "[('*bf16',\n 'D')]"}) == "[('*bf16', 'D')]"


def test_compile_watch_chains_triton_hooks():
    """Installed through triton.knobs, the watch keeps any hook that was there before it."""
    knobs = pytest.importorskip("triton").knobs
    from kiln.engine.variants import CompileWatch

    rt = knobs.runtime
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook
    seen = []
    try:
        rt.jit_cache_hook, rt.jit_post_compile_hook = (lambda **kw: seen.append("pre")), (lambda **kw: seen.append("post"))
        watch = CompileWatch().install()
        assert watch.installed
        watch.ready = True
        key = "[('*bf16', 'D')]{}"
        rt.jit_cache_hook(key=key, repr="k")
        rt.jit_post_compile_hook(key=key, repr="k")
        assert seen == ["pre", "post"] and [w for w, _ in watch.after_ready] == ["[('*bf16', 'D')]{}"]
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = saved


# ------------------------------------------------------------------------------ the Triton kernels' own variants

needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                  reason="needs CUDA or TRITON_INTERPRET=1 (the Triton attention backend)")

# the Triton attention backend (reshape_and_cache, decode and prefill attention: the kernels a CPU engine runs);
# contexts up to max_model_len = 300 (decode partitions split above 256 tokens on the interpreter's 4 "SMs"), an odd
# batch cap, prompts longer than the per-step prefill budget
TRITON_CFG = dict(dtype="float32", attention_backend="triton", block_size=16, num_gpu_blocks=150, max_num_seqs=5,
                  max_num_batched_tokens=96, max_prefill_tokens=80, max_model_len=300, use_cuda_graph=False)


def new_kernel_variants(warm: set, load: set) -> list[str]:
    """Each kernel variant of the load that the warm-up did not launch, as what differs from its nearest warm-up
    variant of the same kernel."""
    from kiln.kernels._utils import describe_variant


    def distance(a, b):
        return sum(x != y for x, y in zip(a[1] + a[2] + a[3], b[1] + b[2] + b[3]))

    out = []
    for _, key in sorted(k for k in load - warm if k[0] == "kernel"):
        same = [w for fam, w in warm if fam == "kernel" and w[0] == key[0]]
        out.append(describe_variant(key, min(same, key=lambda w: distance(key, w)) if same else None))
    return out


@pytest.fixture(scope="module")
def one_layer_model_dir(tmp_path_factory):
    """The kernels' variants do not depend on the layer count; each layer costs the interpreter its launches."""
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama1"), num_layers=1)


@needs_triton
def test_mixed_load_launches_no_kernel_variant_the_warmup_did_not(one_layer_model_dir, caplog):
    """Issue 11's check, on the kernels themselves: every Triton kernel launch's variant key (what Triton compiles a
    binary for) during a warm-up, then during a mixed load: long contexts up to max_model_len, odd numbers of decode
    rows beside prefills, chunked prompts, every sampler path. The load launches no variant the warm-up did not."""
    from kiln.kernels._utils import KernelVariants

    core = EngineCore(EngineConfig(model=str(one_layer_model_dir), **TRITON_CFG))
    core.variants.watch_kernels()
    try:
        with caplog.at_level(logging.INFO, logger="kiln.engine"):
            core.warmup()
        warm = core.variants.snapshot()
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("warm-up:"))
        assert "kernel variants: " in line and "_decode_kernel x" in line
        kernels = {k[0] for fam, k in warm if fam == "kernel"}
        assert {"_reshape_and_cache_kernel", "_decode_kernel", "_prefill_kernel"} <= kernels

        mixed_decode_rows = set()  # decode rows of the load's mixed steps
        record_step = core.variants.record_step

        def spy(num_tokens, num_decode_rows, *rest):
            if num_decode_rows < len(num_tokens):
                mixed_decode_rows.add(num_decode_rows)
            record_step(num_tokens, num_decode_rows, *rest)

        core.variants.record_step = spy
        during_load = KernelVariants().start()
        rnd = random.Random(5)
        n = 0
        for _ in range(20):  # arrivals between steps: idle, mid-decode, mid-chunk
            while len(core.scheduler.waiting) < 2 and rnd.random() < 0.5:
                n += 1
                prompt_len = rnd.choice([1, 3, 17, 40, 70, 150, 270, core.max_model_len - 13])
                core.add_request(f"r{n}", [rnd.randrange(1, 250) for _ in range(prompt_len)], random_params(rnd))
            if core.has_unfinished():
                core.step()
        while core.has_unfinished():
            core.step()
        load = core.variants.snapshot()
        during_load.stop()
    finally:
        core.variants.kernels.stop()
    # the load did what it is for: chunked prompts beside decodes, odd numbers of decode rows in mixed steps, long
    # contexts (the decode kernel split into partitions, which its last programs merged)
    assert n >= 8 and ("step", "mixed+chunk") in load and ("step", "mixed") in load
    assert any(r % 2 for r in mixed_decode_rows), mixed_decode_rows
    assert any(k[0] == "_decode_kernel" and not dict(k[1])["DIRECT"] for k in during_load.keys)
    new = new_kernel_variants(warm, {("kernel", k) for k in during_load.keys})
    assert not new, "the load launched kernel variants the warm-up did not:\n" + "\n".join(new)
    assert load - warm == set(), load - warm


def test_server_warms_up_by_default_on_a_gpu_only():
    """USE_WARMUP unset: the engine warms up on CUDA (run F: without it the first request after ready spent 1.8 s
    compiling) and not on CPU; 1 / 0 and --use-warmup / --no-use-warmup force it either way."""
    from kiln.config import KilnConfig
    from kiln.engine.core import warmup_enabled

    assert KilnConfig.load({}).to_engine_config().warmup is None
    assert warmup_enabled(None, "cuda") and not warmup_enabled(None, "cpu")
    assert KilnConfig.load({"USE_WARMUP": "1"}).to_engine_config().warmup is True
    assert KilnConfig.load({"USE_WARMUP": "0"}).to_engine_config().warmup is False
    assert warmup_enabled(True, "cpu") and not warmup_enabled(False, "cuda")
    import argparse

    from kiln.config import add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert KilnConfig.load({}, parser.parse_args(["--no-use-warmup"])).use_warmup is False
    assert KilnConfig.load({"USE_WARMUP": "0"}, parser.parse_args(["--use-warmup"])).use_warmup is True
    assert KilnConfig.load({"USE_WARMUP": "0"}, parser.parse_args([])).use_warmup is False
