"""LoRA adapters (KILN_LORA_MODULES, PEFT's format): a request with an adapter gets the tokens and logprobs of the
model with that adapter merged into its weights (float32), beside base-model requests and other adapters' in the
same steps, chunked, speculated and from the prefix cache, which keeps each adapter's blocks apart; bad adapters
and unknown names get clear errors."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.config import KilnConfig
from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import SamplingParams
from kiln.errors import ErrorKind
from kiln.layers.lora import parse_lora_modules
from tests.helpers.tiny_models import write_tiny_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(out: Path, model_dir: Path, targets: list[str], rank: int, alpha: float, seed: int,
                  rslora: bool = False) -> tuple[Path, Path]:
    """A random PEFT adapter for the tiny model, and the model with it merged into the weights."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    g = torch.Generator().manual_seed(seed)
    scale = alpha / (rank ** 0.5 if rslora else rank)
    weights = load_file(str(model_dir / "model.safetensors"))
    tensors = {}
    for i in range(layers):
        for t in targets:
            out_f, in_f = shapes[t]
            a = torch.randn(rank, in_f, generator=g) * 0.2
            b = torch.randn(out_f, rank, generator=g) * 0.2
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{part}.{t}"
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
            key = f"model.layers.{i}.{part}.{t}.weight"
            weights[key] = weights[key] + scale * (b @ a)
    adapter = out / "adapter"
    adapter.mkdir(parents=True)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
        "use_rslora": rslora}))
    merged = out / "merged"
    shutil.copytree(model_dir, merged)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(merged / "model.safetensors"))
    return adapter, merged


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_model("llama", root / "base")
    a1, m1 = write_adapter(root / "one", base, ALL, rank=8, alpha=16, seed=1)
    a2, m2 = write_adapter(root / "two", base, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=4, seed=2,
                           rslora=True)
    return base, {"one": (a1, m1), "two": (a2, m2)}


def make_core(model_dir, **kw) -> EngineCore:
    cfg = dict(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=96, max_num_seqs=8,
               async_scheduling=False) | kw
    return EngineCore(EngineConfig(**cfg))


def run(core: EngineCore, work) -> dict[str, tuple[list[int], list]]:
    for rid, prompt, sp in work:
        err = core.add_request(rid, prompt, sp)
        assert err is None, err.error
    got = {rid: ([], []) for rid, _, _ in work}
    while core.has_unfinished():
        for o in core.step():
            assert o.error is None, o.error
            got[o.request_id][0].extend(o.new_token_ids)
            got[o.request_id][1].extend(o.logprobs or [])
    return got


def params(lora: str | None = None, **kw) -> SamplingParams:
    return SamplingParams(**({"max_tokens": 12, "temperature": 0.0, "ignore_eos": True, "logprobs": 2,
                              "lora_name": lora} | kw))


def assert_same(got, ref):
    assert got[0] == ref[0]
    for (c1, t1), (c2, t2) in zip(got[1], ref[1]):
        assert c1 == pytest.approx(c2, abs=1e-4) and [t for t, _ in t1] == [t for t, _ in t2]


PROMPTS = [list(range(5, 45)), [7, 8, 9] * 7, list(range(300, 317))]


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=16),
                                dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3})])
def test_each_request_gets_its_adapters_merged_model(dirs, kw):
    """Base, adapter one and adapter two requests run together (in 16-token chunks, or speculating); each equals the
    engine of its own merged checkpoint, and the adapters really change the output."""
    base, adapters = dirs
    modules = ",".join(f"{name}={a}" for name, (a, _) in adapters.items())
    core = make_core(base, lora_modules=modules, **kw)
    work = [(f"{lora}-{i}", p, params(lora)) for lora in (None, "one", "two") for i, p in enumerate(PROMPTS)]
    got = run(core, work)
    refs = {None: run(make_core(base, **kw), [(f"None-{i}", p, params()) for i, p in enumerate(PROMPTS)])}
    for name, (_, merged) in adapters.items():
        refs[name] = run(make_core(merged, **kw), [(f"{name}-{i}", p, params()) for i, p in enumerate(PROMPTS)])
    for lora, ref in refs.items():
        for i in range(len(PROMPTS)):
            assert_same(got[f"{lora}-{i}"], ref[f"{lora}-{i}"])
    assert got["one-0"][0] != got["None-0"][0] and got["two-0"][0] != got["None-0"][0]
    assert core.kv.num_free_blocks == core.kv.num_blocks or core.cfg.enable_prefix_caching


def test_the_prefix_cache_keeps_each_adapters_blocks_apart(dirs):
    base, adapters = dirs
    core = make_core(base, lora_modules={"one": str(adapters["one"][0])})
    prompt = list(range(10, 60))
    run(core, [("base", prompt, params())])
    hits = core.kv.num_cached_hits
    got = run(core, [("one", prompt, params("one"))])
    assert core.kv.num_cached_hits == hits  # the base model's blocks do not serve the adapter
    run(core, [("one-again", prompt, params("one"))])
    assert core.kv.num_cached_hits > hits   # the adapter's own blocks do
    assert_same(got["one"], run(make_core(adapters["one"][1]), [("r", prompt, params())])["r"])


def test_unknown_adapters_and_bad_adapter_directories_are_named(dirs, tmp_path):
    base, adapters = dirs
    core = make_core(base, lora_modules={"one": str(adapters["one"][0])})
    err = core.add_request("x", [1, 2, 3], params("nope"))
    assert err is not None and err.error_type is ErrorKind.INVALID and "'nope'" in err.error and "one" in err.error
    err = make_core(base).add_request("y", [1, 2, 3], params("one"))
    assert err is not None and "KILN_LORA_MODULES" in err.error
    with pytest.raises(ValueError, match="adapter_config.json and adapter_model.safetensors"):
        make_core(base, lora_modules={"gone": str(tmp_path / "missing")})
    bad = tmp_path / "bad"
    shutil.copytree(adapters["one"][0], bad)
    t = load_file(str(bad / "adapter_model.safetensors"))
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 7)
    save_file(t, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"layer 0 q_proj: lora_A \(8, 7\)"):
        make_core(base, lora_modules={"bad": str(bad)})
    with pytest.raises(ValueError, match="not with w8a8"):
        make_core(base, lora_modules={"one": str(adapters["one"][0])}, quantization="w8a8-int8")


def test_adapters_load_and_unload_while_serving(dirs, tmp_path):
    """update_lora on an engine started without adapters: a loaded adapter serves as its merged checkpoint and
    shows in the stats; one in use stays until its requests end; a name loaded twice, an unknown name and a bad
    directory get their errors; a name unloaded and loaded again with other weights never meets the old adapter's
    prefix-cache blocks (adapter numbers are not reused)."""
    base, adapters = dirs
    core = make_core(base)
    prompt = list(range(10, 60))
    assert core.update_lora(True, "x", str(adapters["one"][0])) is None
    assert core.stats().lora_adapters == {"x": str(adapters["one"][0])}
    assert_same(run(core, [("a", prompt, params("x"))])["a"],
                run(make_core(adapters["one"][1]), [("r", prompt, params())])["r"])
    kind, msg = core.update_lora(True, "x", str(adapters["two"][0]))
    assert kind is ErrorKind.INVALID and "already loaded" in msg
    assert core.add_request("busy", prompt, params("x")) is None
    kind, msg = core.update_lora(False, "x")
    assert kind is ErrorKind.INVALID and "in use by 1 request" in msg
    while core.has_unfinished():
        core.step()
    assert core.update_lora(False, "x") is None and core.stats().lora_adapters == {}
    err = core.add_request("gone", prompt, params("x"))
    assert err is not None and "unknown LoRA adapter 'x'" in err.error
    kind, msg = core.update_lora(False, "x")
    assert kind is ErrorKind.NOT_FOUND and "not loaded" in msg
    kind, msg = core.update_lora(True, "y", str(tmp_path / "missing"))
    assert kind is ErrorKind.INVALID and "adapter_config.json" in msg and core.stats().lora_adapters == {}
    # the same name, other weights, the same prompt: adapter two's tokens, not blocks cached under adapter one
    hits = core.kv.num_cached_hits
    assert core.update_lora(True, "x", str(adapters["two"][0])) is None
    got = run(core, [("b", prompt, params("x"))])["b"]
    assert core.kv.num_cached_hits == hits
    assert_same(got, run(make_core(adapters["two"][1]), [("r", prompt, params())])["r"])


def test_an_adapter_that_finds_no_gpu_memory_is_refused_and_the_engine_serves_on(dirs, monkeypatch):
    base, adapters = dirs
    core = make_core(base)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
    monkeypatch.setattr(core.runner, "load_lora", oom)
    kind, msg = core.update_lora(True, "x", str(adapters["one"][0]))
    assert kind is ErrorKind.INVALID and "not enough GPU memory" in msg and "GPU_MEMORY_UTILIZATION" in msg
    monkeypatch.undo()
    assert core.update_lora(True, "x", str(adapters["one"][0])) is None
    assert run(core, [("a", [5, 6, 7], params("x"))])["a"][0]


def test_the_offline_llm_loads_and_unloads_adapters(dirs, default_model_dir, tmp_path):
    from kiln import LLM
    from tests.helpers.tiny_models import TOKENIZER_FILES
    base, adapters = dirs
    with_tok = []
    for d in (base, adapters["one"][1]):  # the LLM wants a tokenizer (the prompts here are ids below 512)
        shutil.copytree(d, tmp_path / d.parent.name / d.name)
        for f in TOKENIZER_FILES:
            if (default_model_dir / f).exists():
                shutil.copy(default_model_dir / f, tmp_path / d.parent.name / d.name / f)
        with_tok.append(tmp_path / d.parent.name / d.name)
    llm = LLM(str(with_tok[0]), dtype="float32", device="cpu")
    prompt = list(range(10, 30))
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, lora_name="one")
    llm.load_lora("one", str(adapters["one"][0]))
    want = LLM(str(with_tok[1]), dtype="float32", device="cpu").generate([prompt], params(max_tokens=8))
    assert llm.generate([prompt], sp)[0].token_ids == want[0].token_ids
    with pytest.raises(ValueError, match="already loaded"):
        llm.load_lora("one", str(adapters["two"][0]))
    llm.unload_lora("one")
    with pytest.raises(ValueError, match="not loaded"):
        llm.unload_lora("one")


def test_lora_modules_parse_from_flags_and_json():
    assert parse_lora_modules("a=/x, b=/y") == {"a": "/x", "b": "/y"}
    assert parse_lora_modules('{"a": "/x"}') == {"a": "/x"}
    assert parse_lora_modules(None) == {}
    for bad in ("a", "a=/x,a=/y", "=x"):
        with pytest.raises(ValueError, match="LoRA modules"):
            parse_lora_modules(bad)
    cfg = KilnConfig.load({"KILN_LORA_MODULES": "sql=/models/sql"})
    assert cfg.to_engine_config().lora_modules == "sql=/models/sql"


def test_the_warmup_runs_each_adapter(dirs, monkeypatch):
    from kiln.layers.lora import LoRAState
    base, adapters = dirs
    modules = {name: str(a) for name, (a, _) in adapters.items()}
    seen = set()
    set_step = LoRAState.set_step

    def spy(self, token_adapters, device):
        seen.update(token_adapters)
        return set_step(self, token_adapters, device)
    monkeypatch.setattr(LoRAState, "set_step", spy)
    core = make_core(base, lora_modules=modules, warmup=True, max_num_seqs=4, max_num_batched_tokens=64)
    assert seen == {0, 1, 2}
    assert core.num_warmup_steps > 0 and not core.has_unfinished() and core.kv.num_free_blocks == core.kv.num_blocks
    got = run(core, [("one", PROMPTS[0], params("one"))])
    assert_same(got["one"], run(make_core(adapters["one"][1]), [("r", PROMPTS[0], params())])["r"])


# KILN_FUZZ_SEEDS=40: a longer run by hand
@pytest.mark.parametrize("seed", range(int(os.environ.get("KILN_FUZZ_SEEDS", 4))))
def test_random_engines_serve_adapters_as_their_merged_models(dirs, seed):
    """Random engine shapes (small caches that preempt, chunked steps, prefix caching, speculation on or off) and
    requests of each adapter and of the model that share prefixes: each request's tokens are those of its merged
    checkpoint's engine of the same shape; every block comes back."""
    import random
    rnd = random.Random(seed)
    base, adapters = dirs
    shape = dict(block_size=rnd.choice([4, 16]), num_gpu_blocks=rnd.randrange(24, 64), max_num_seqs=rnd.randrange(2, 9),
                 max_num_batched_tokens=rnd.randrange(8, 40), enable_prefix_caching=rnd.random() < 0.6,
                 kv_reserve_ratio=0.0, speculative_config=rnd.choice([None, {"method": "ngram",
                                                                           "num_speculative_tokens": 3}]))
    shared = [rnd.randrange(3, 500) for _ in range(rnd.randrange(0, 20))]
    work = []
    for i in range(rnd.randrange(3, 8)):
        prompt = shared + [rnd.randrange(3, 500) for _ in range(rnd.randrange(1, 30))]
        work.append((f"r{i}", prompt, rnd.choice([None, "one", "two"]), rnd.randrange(1, 16)))
    core = make_core(base, lora_modules={n: str(a) for n, (a, _) in adapters.items()}, **shape)
    got = run(core, [(rid, p, params(lora, max_tokens=n)) for rid, p, lora, n in work])
    core.kv.reset_prefix_cache()
    assert core.kv.num_free_blocks == core.kv.num_blocks
    for lora in (None, "one", "two"):
        mine = [(rid, p, params(max_tokens=n)) for rid, p, la, n in work if la == lora]
        if mine:
            ref = run(make_core(base if lora is None else adapters[lora][1], **shape), mine)
            for rid, _, _ in mine:
                assert_same(got[rid], ref[rid])
