"""compressed-tensors checkpoints: hand-made tiny ones of each scheme load and agree with the reference path;
`kiln quantize` output loads; bad configs and bad `kiln quantize` input get one-line errors, nothing written."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.entrypoints.cli import main
from kiln.models.loader import load_model
from kiln.quantization import ops as qops
from kiln.quantization.calibration import sequence_forward
from kiln.quantization.checkpoint import QuantizationConfigError, compress_weight, quantization_config
from tests.helpers.tiny_models import write_tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _hand_made(src, out, scheme, per_tensor=False, static_fp8=False):
    """A compressed-tensors checkpoint written tensor by tensor (as llm-compressor lays it out)."""
    out.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    new = {}
    for name, t in tensors.items():
        if name.endswith("_proj.weight"):
            base = name[: -len(".weight")]
            dtype = qops.code_dtype(scheme)
            scale = qops.channel_scales(t, dtype)
            if per_tensor:
                scale = scale.amax().expand_as(scale)
            packed = compress_weight(t, scale, scheme)
            if per_tensor:
                packed["weight_scale"] = packed["weight_scale"][:1, 0].clone()
            new.update({f"{base}.{k}": v for k, v in packed.items()})
            if static_fp8:
                new[f"{base}.input_scale"] = torch.tensor([0.05])
        else:
            new[name] = t
    save_file(new, str(out / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(scheme, None)
    if static_fp8 or per_tensor:
        g = cfg["quantization_config"]["config_groups"]["group_0"]
        g["weights"]["strategy"] = "tensor"
        if static_fp8:
            g["input_activations"].update(strategy="tensor", dynamic=False)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _reference(src, scheme, static_scale=None):
    """The float model with each projection's weight replaced by its dequantized codes; activations quantized
    the same way (per token, or with the static scale) through forward pre-hooks."""
    from kiln.layers.linear import Linear
    m = load_model(src, torch.float32, CPU)
    dtype = qops.code_dtype(scheme)
    for mod in m.modules():
        if isinstance(mod, Linear):
            w = mod.weight.data
            n = 0
            parts = []
            for size in getattr(mod, "output_sizes", [w.shape[0]]):  # each sub-projection quantized alone
                c, s = qops.quantize_weight(w[n:n + size], dtype)
                parts.append(c.float() * s[:, None])
                n += size
            mod.weight.data = torch.cat(parts)
            if scheme != qops.W8A16:
                def hook(_m, inp, st=static_scale):
                    x = inp[0]
                    c, s = qops.quantize_activation(x.reshape(-1, x.shape[-1]), dtype, st)
                    return ((c.float() * s).reshape(x.shape),)
                mod.register_forward_pre_hook(hook)
    return m


@pytest.mark.parametrize("scheme", qops.SCHEMES)
def test_hand_made_checkpoint_loads_and_agrees_with_reference(tiny, tmp_path, scheme):
    ckpt = _hand_made(tiny, tmp_path / scheme, scheme)
    m = load_model(ckpt, torch.float32, CPU)
    assert m.quantization.scheme == scheme
    assert m.model.layers[0].self_attn.qkv_proj.qweight.dtype == qops.code_dtype(scheme)
    ids = torch.arange(3, 40)
    got = sequence_forward(m, ids)
    want = sequence_forward(_reference(tiny, scheme), ids)
    assert torch.allclose(got, want, atol=2e-3, rtol=2e-3), (got - want).abs().max()
    full = sequence_forward(load_model(tiny, torch.float32, CPU), ids)
    # and near the unquantized model (E4M3's relative step is 1/16: a random 2-layer model drifts ~15%)
    assert (got - full).norm() / full.norm() < (0.25 if scheme == qops.W8A8_FP8 else 0.05)


def test_per_tensor_static_fp8_checkpoint(tiny, tmp_path):
    ckpt = _hand_made(tiny, tmp_path / "fp8-static", qops.W8A8_FP8, per_tensor=True, static_fp8=True)
    m = load_model(ckpt, torch.float32, CPU)
    assert m.quantization.static_activations
    assert float(m.model.layers[0].mlp.down_proj.input_scale) == pytest.approx(0.05)
    ids = torch.arange(3, 40)
    got = sequence_forward(m, ids)
    full = sequence_forward(load_model(tiny, torch.float32, CPU), ids)
    assert torch.isfinite(got).all() and (got - full).norm() / full.norm() < 0.25  # E4M3 drift, as above


@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(quant_method="gptq"), "quant_method 'gptq' is not supported"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4, strategy="group", group_size=128),
     "int4 group group_size=128"),
    (lambda q: q["config_groups"]["group_0"].update(weights="nonsense"), "malformed"),
])
def test_unsupported_or_corrupt_config_is_one_line(tiny, tmp_path, edit, message):
    ckpt = _hand_made(tiny, tmp_path / "bad", qops.W8A8_INT8)
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationConfigError) as e:
        load_model(ckpt, torch.float32, CPU)
    assert message in str(e.value) and "\n" not in str(e.value)
    if "malformed" not in message:
        assert "Kiln supports" in str(e.value) or "Kiln loads" in str(e.value)


def test_kiln_quantize_output_loads_and_bad_input_errors(tiny, tmp_path, capsys):
    from transformers import AutoTokenizer  # noqa: F401 - the tiny model has no tokenizer: no calibration here
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny), "--scheme", "w8a8-fp8", "--output", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "float-quantized"
    assert cfg["kiln_quantization"]["scheme"] == "w8a8-fp8"
    m = load_model(out, torch.float32, CPU)
    assert m.model.layers[1].mlp.gate_up_proj.qweight.dtype == torch.float8_e4m3fn
    # bad input: one line, nothing written
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for argv, msg in [
        (["--model", str(tmp_path / "nope"), "--scheme", "w8a16", "--output", str(tmp_path / "o1")], "no such file"),
        (["--model", str(tiny), "--scheme", "w8a16", "--output", str(out)], "already exists"),
        (["--model", str(tiny), "--scheme", "w8a16", "--output", str(tmp_path / "o2"), "--calib-file", str(empty)],
         "holds no text"),
        (["--model", str(out), "--scheme", "w8a16", "--output", str(tmp_path / "o3")], "already quantized"),
    ]:
        capsys.readouterr()
        assert main(["quantize", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and err.count("\n") == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "q"]  # no half-written output


@pytest.mark.parametrize("fast", [True, False], ids=["int_mm", "float-chunks"])
def test_cpu_int8_matmul_is_exact(monkeypatch, fast):
    """The CPU's int8 GEMM, through torch._int_mm or (CPUs without AVX-512) float32 matmuls over chunks of K: the
    same int32 sums, bit for bit, with the extreme codes and a K over two chunks (1024 each)."""
    from kiln.quantization import ops
    monkeypatch.setattr(ops, "cpu_int8_gemm_is_fast", lambda: fast)
    g = torch.Generator().manual_seed(0)
    k = 2 * ops.EXACT_FLOAT_K + 300
    x = torch.randint(-127, 128, (11, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (40, k), generator=g, dtype=torch.int8)
    x[0], w[0] = 127, -128  # every product at its largest
    # odd, positive, uneven products: a float32 sum of more than ~1,040 of them passes 2^24 and rounds
    x[1], w[1] = torch.randint(48, 64, (k,), generator=g, dtype=torch.int8) * 2 + 1, 127
    got = ops.int8_matmul_cpu(x, w)
    assert got.dtype == torch.int32 and torch.equal(got, torch._int_mm(x, w.t()))
    assert got[0, 0].item() == -127 * 128 * k and got[1, 1].item() > 2 ** 24
