"""Mixtures of experts (Qwen3-MoE, Mixtral): the routing and expert math against plain per-token PyTorch, and what
a checkpoint or setting that Kiln cannot serve gets told. Parity with transformers: tests/parity/test_models.py."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.layers.moe import SparseMoE, experts_reference, route
from kiln.engine.request import SamplingParams
from kiln.models.loader import load_model
from tests.helpers.tiny_models import write_tiny_model
from tests.unit.test_lora import assert_same, make_core, params, run, write_adapter


def per_token(x, w13, w2, weights, ids):
    inter = w2.shape[2]
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            h = w13[e].double() @ x[t].double()
            out[t] += w * (w2[e].double() @ (F.silu(h[:inter]) * h[inter:]))
    return out


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_takes_the_top_k_of_the_softmax(renormalize):
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(0))
    weights, ids = route(logits, 2, renormalize)
    probs = torch.softmax(logits.double(), -1)
    for t in range(9):
        best = sorted(range(6), key=lambda e: -probs[t, e].item())[:2]
        assert ids[t].tolist() == best
        want = probs[t, best] / (probs[t, best].sum() if renormalize else 1)
        assert torch.allclose(weights[t].double(), want, atol=1e-6)


def test_experts_equal_each_tokens_own_sum():
    """Some experts chosen by many tokens, one by none; one token."""
    g = torch.Generator().manual_seed(1)
    e, h, inter, k = 5, 16, 12, 2
    w13, w2 = torch.randn(e, 2 * inter, h, generator=g), torch.randn(e, h, inter, generator=g)
    for t in (1, 7):
        x = torch.randn(t, h, generator=g)
        ids = torch.randint(0, e - 1, (t, k), generator=g)  # expert e-1 never chosen
        ids[:, 1] = (ids[:, 0] + 1) % (e - 1)  # distinct per token, as top-k gives
        weights = torch.rand(t, k, generator=g)
        got = experts_reference(x, w13, w2, weights, ids)
        assert torch.allclose(got.double(), per_token(x, w13, w2, weights, ids), atol=1e-4, rtol=1e-4)


def test_padded_rows_read_no_expert_and_the_layers_get_the_steps_slots(moe_dir):
    """A CUDA graph's padded rows (slot -1) come out of a MoE layer as zeros, whatever they hold, and the other
    rows as without them; the decoder layers hand each MoE layer its step's slot mapping."""
    core = make_core(moe_dir)
    model = core.runner.model
    moe = model.model.layers[0].mlp
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    x[3] = float("nan")
    out = moe(x, torch.tensor([7, 8, 9, -1, 10]))
    assert (out[3] == 0).all()
    assert torch.allclose(out[[0, 1, 2, 4]], moe(x[[0, 1, 2, 4]]), atol=1e-6)
    seen = []
    moes = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoE)]
    for m in moes:
        m.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    core.run_to_completion([list(range(5, 16))], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert moes and len(seen) == 2 * len(moes)  # a prefill and a decode step
    assert [s.numel() for s in seen[::len(moes)]] == [11, 1] and all((s >= 0).all() for s in seen)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return write_tiny_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))


def test_a_checkpoint_without_an_expert_is_named(moe_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((moe_dir / "config.json").read_text())
    tensors = load_file(str(moe_dir / "model.safetensors"))
    del tensors["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*model\.layers\.0\.mlp\.w13\[\(5, 1\)\]"):
        load_model(bad, torch.float32, torch.device("cpu"))


def test_the_dense_layers_of_a_moe_checkpoint_stay_dense(moe_dir):
    model = load_model(moe_dir, torch.float32, torch.device("cpu"))
    assert type(model.model.layers[0].mlp).__name__ == "SparseMoE"
    assert type(model.model.layers[1].mlp).__name__ == "MLP"  # mlp_only_layers: [1]
    assert model.model.layers[0].mlp.w13.shape == (8, 96, 64)


@pytest.mark.parametrize("scheme", ["w8a8-int8", "w8a8-fp8"])
def test_w8a8_experts_are_refused_with_what_works(moe_dir, scheme):
    with pytest.raises(ValueError, match=f"mixture of experts.*--quantization w8a16.*not {scheme}"):
        load_model(moe_dir, torch.float32, torch.device("cpu"), quantization=scheme)


def test_int8_experts_are_their_dequantized_weights(moe_dir):
    """w8a16: each expert's int8 codes times its per-channel scales stay within half a step of the float weight,
    and the layer computes with exactly those dequantized weights."""
    ref = load_model(moe_dir, torch.float32, torch.device("cpu")).model.layers[0].mlp
    moe = load_model(moe_dir, torch.float32, torch.device("cpu"), quantization="w8a16").model.layers[0].mlp
    assert moe.w13.dtype == torch.int8 and moe.w2.dtype == torch.int8
    assert "w13" not in dict(moe.named_parameters())  # plain tensors now: a model.to(dtype) leaves them int8
    d13 = moe.w13.float() * moe.scales[0][:, :, None]
    d2 = moe.w2.float() * moe.scales[1][:, :, None]
    assert ((d13 - ref.w13).abs() <= moe.scales[0][:, :, None] / 2 + 1e-7).all()
    assert ((d2 - ref.w2).abs() <= moe.scales[1][:, :, None] / 2 + 1e-7).all()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    dequantized = SparseMoE(64, 48, 8, 3, True)
    dequantized.gate.weight.data.copy_(moe.gate.weight)
    dequantized.w13.data.copy_(d13)
    dequantized.w2.data.copy_(d2)
    assert torch.allclose(moe(x), dequantized(x), atol=1e-5)


def test_int8_experts_generate_near_the_float_model(moe_dir):
    prompts = [list(range(5, 40)), [9, 8, 7] * 5]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = EngineCore(EngineConfig(model=str(moe_dir), dtype="float32", block_size=16, num_gpu_blocks=32))
    core = EngineCore(EngineConfig(model=str(moe_dir), dtype="float32", block_size=16, num_gpu_blocks=32,
                                   quantization="w8a16"))
    # what the start-up fit check predicts from the config is what the layers hold, float and int8
    from kiln.engine.tp import weight_bytes_per_rank
    for c, q in ((ref, None), (core, "w8a16")):
        assert c.runner.weight_bytes == weight_bytes_per_rank(c.runner.model_config, 1, torch.float32, q)
    assert core.runner.weight_bytes < 0.55 * ref.runner.weight_bytes
    got, want = core.run_to_completion(prompts, sp), ref.run_to_completion(prompts, sp)
    assert [g[:3] for g in got] == [w[:3] for w in want]  # int8 rounding may flip a near tie later on


def test_lora_on_attention_serves_a_moe_model_as_its_merged_checkpoint(moe_dir, tmp_path):
    adapter, merged = write_adapter(tmp_path / "a", moe_dir, ["q_proj", "v_proj", "o_proj"], rank=4, alpha=8, seed=3)
    prompts = [list(range(5, 40)), [9, 8, 7] * 5]
    got = run(make_core(moe_dir, lora_modules=f"a={adapter}"),
              [(f"a-{i}", p, params("a")) for i, p in enumerate(prompts)])
    ref = run(make_core(merged), [(f"a-{i}", p, params()) for i, p in enumerate(prompts)])
    for i in range(len(prompts)):
        assert_same(got[f"a-{i}"], ref[f"a-{i}"])


def test_lora_on_the_experts_is_refused_by_layer(moe_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    prefix = "base_model.model.model.layers.0.mlp.gate_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(4, 64), f"{prefix}.lora_B.weight": torch.zeros(48, 4)},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(ValueError, match="layer 0 gate_proj: that layer's feed-forward is a mixture of experts"):
        EngineCore(EngineConfig(model=str(moe_dir), dtype="float32", block_size=16, num_gpu_blocks=32,
                                lora_modules=f"a={adapter}"))


def test_more_experts_a_token_than_experts_is_named(moe_dir):
    from kiln.models.config import ModelConfig
    cfg = json.loads((moe_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"num_experts_per_tok 9 must be 1 to the number of experts \(8\)"):
        ModelConfig.from_dict({**cfg, "num_experts_per_tok": 9})


def test_kiln_quantize_refuses_w8a8_for_a_moe_model_in_one_line(moe_dir, tmp_path, capsys):
    from kiln.entrypoints.cli import main
    assert main(["quantize", "--model", str(moe_dir), "--scheme", "w8a8-int8", "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a mixture of experts: kiln quantize writes those as w8a16 only, not w8a8-int8" in err
    assert "\n" not in err and not (tmp_path / "q").exists()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_a_w8a16_moe_checkpoint_serves_as_quantizing_at_load(arch, tmp_path, capsys):
    """kiln quantize --scheme w8a16 writes every expert's (and a shared expert's) projections as compressed-tensors
    int8 codes and per-channel scales, the routers left in float and named in `ignore`; Kiln loads the codes as
    they are: the same codes and scales as --quantization w8a16 on the float checkpoint, so the same tokens, also
    on two tensor-parallel ranks with and without expert parallelism."""
    from kiln.entrypoints.cli import main
    from kiln.quantization.checkpoint import read_quantization
    from tests.parity.test_tensor_parallel import make_core as tp_core
    src = write_tiny_model(arch, tmp_path / "src")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), "--scheme", "w8a16", "--output", str(out)]) == 0
    said = capsys.readouterr()
    assert "layer 1/2: 4 projections and " in said.out + said.err  # q, k, v, o; then each expert's three
    written = load_file(str(out / "model.safetensors"))
    router = "block_sparse_moe.gate" if arch == "mixtral" else "mlp.gate"
    assert written[f"model.layers.0.{router}.weight"].dtype == torch.float32  # the router stays float
    assert any(".experts.3." in k and k.endswith("weight_packed") for k in written)
    cfg = json.loads((out / "config.json").read_text())
    assert any("gate$" in x for x in cfg["quantization_config"]["ignore"])
    assert read_quantization(out).scheme == "w8a16"
    prompts = [list(range(5, 40)), [9, 8, 7] * 5]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", block_size=16, num_gpu_blocks=32)
    at_load = EngineCore(EngineConfig(model=str(src), quantization="w8a16", **kw))
    from_ckpt = EngineCore(EngineConfig(model=str(out), **kw))
    moe = from_ckpt.runner.model.model.layers[0].mlp
    assert moe.w13.dtype == torch.int8 and torch.equal(moe.w13, at_load.runner.model.model.layers[0].mlp.w13)
    assert torch.equal(moe.scales[1], at_load.runner.model.model.layers[0].mlp.scales[1])
    want = at_load.run_to_completion(prompts, sp)
    assert from_ckpt.run_to_completion(prompts, sp) == want
    assert from_ckpt.runner.weight_bytes == at_load.runner.weight_bytes
    for ep in (False, True):
        core = tp_core(out, 2, enable_expert_parallel=ep)
        try:
            assert core.run_to_completion(prompts, sp) == want
        finally:
            core.close()
