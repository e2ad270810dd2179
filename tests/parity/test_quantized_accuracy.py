"""Accuracy of the quantized paths on the bundled SmolLM2-135M (real weights): perplexity of a fixed text
(tests/data/perplexity.txt, ~400 tokens) within 2% of the unquantized float32 model, and a checkpoint made by
`kiln quantize` still answers "Paris". Every figure is printed (pytest -s)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.models.loader import load_model
from kiln.quantization.calibration import perplexity
from kiln.quantization.ptq import QuantizeOptions, quantize_checkpoint

TEXT = Path(__file__).parent.parent / "data" / "perplexity.txt"
BOUND = 1.02
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ids(default_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(default_model_dir)).encode(TEXT.read_text(), add_special_tokens=False)


@pytest.fixture(scope="module")
def base_ppl(default_model_dir, ids):
    ppl = perplexity(load_model(default_model_dir, torch.float32, CPU), ids)
    print(f"\nperplexity float32 (unquantized): {ppl:.3f} over {len(ids)} tokens")
    return ppl


@pytest.fixture(scope="module")
def smoothquant_checkpoint(default_model_dir, tmp_path_factory):
    """w8a8-int8 with SmoothQuant and calibrated fp8 KV scales, from Kiln's default calibration text (not the
    evaluation text); few samples keep it to seconds."""
    out = tmp_path_factory.mktemp("q") / "smol-w8a8-int8"
    return quantize_checkpoint(default_model_dir, out, QuantizeOptions(
        "w8a8-int8", kv_cache_scheme="fp8", smoothquant_alpha=0.8, calib_samples=8, calib_seq_len=256),
        progress=lambda line: None)


def _check(name, ppl, base):
    print(f"perplexity {name}: {ppl:.3f} ({(ppl / base - 1) * 100:+.2f}% vs float32 {base:.3f})")
    assert ppl <= base * BOUND, f"{name}: {ppl:.3f} is more than 2% above {base:.3f}"


@pytest.mark.parametrize("quantization,kv", [
    ("w8a16", "auto"), (None, "int8"), (None, "fp8"), ("w8a16", "int8"),
    # measured +6.0%: per-token int8 activations without SmoothQuant (SmolLM2's activation outliers); the
    # w8a8-int8 checkpoint of `kiln quantize --smoothquant-alpha` below is the scheme that holds the bound
    pytest.param("w8a8-int8", "auto", marks=pytest.mark.xfail(strict=True, reason="no SmoothQuant at load: +6%")),
    # measured +3.5%: E4M3's 3-bit mantissa on the weights (+3.5% alone, spread over all layers) and on the
    # activations (+2.4% alone); per-channel / per-token scales do not change a float format's relative step
    pytest.param("w8a8-fp8", "auto", marks=pytest.mark.xfail(strict=True, reason="E4M3 rounding: +3.5%")),
])
def test_perplexity_within_two_percent(default_model_dir, ids, base_ppl, quantization, kv):
    model = load_model(default_model_dir, torch.float32, CPU, quantization=quantization)
    _check(f"{quantization or 'float32'} weights, {kv} KV cache", perplexity(model, ids, kv), base_ppl)


def test_kiln_quantize_smoothquant_checkpoint(smoothquant_checkpoint, ids, base_ppl):
    model = load_model(smoothquant_checkpoint, torch.float32, CPU)
    assert model.quantization.scheme == "w8a8-int8" and model.quantization.kv_cache == "fp8"
    assert model.model.layers[0].mlp.down_proj.qweight.dtype == torch.int8
    assert all(s is not None for layer in model.kv_cache_scales for s in layer)
    _check("kiln quantize w8a8-int8 SmoothQuant 0.8", perplexity(model, ids), base_ppl)


# measured +2.02% (SmoothQuant W8A8 +1.75%, the fp8 cache alone +1.0%, they add up): open, see docs/quantization.md
@pytest.mark.xfail(strict=False, reason="W8A8 + fp8 KV together measured at +2.02%")
def test_kiln_quantize_checkpoint_with_fp8_kv_cache(smoothquant_checkpoint, ids, base_ppl):
    model = load_model(smoothquant_checkpoint, torch.float32, CPU)
    _check("kiln quantize w8a8-int8 SmoothQuant 0.8 + calibrated fp8 KV", perplexity(model, ids, "fp8"), base_ppl)


def test_kiln_quantize_checkpoint_answers_paris(smoothquant_checkpoint):
    from kiln import LLM, SamplingParams
    llm = LLM(str(smoothquant_checkpoint), dtype="float32", block_size=16, num_gpu_blocks=64)
    runner = llm.engine.runner
    assert runner.kv_cache_dtype == "fp8" and runner.kv_caches[0].k.dtype == torch.float8_e4m3fn  # no setting
    assert runner.model.model.layers[0].self_attn.qkv_proj.act_quant
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=12, temperature=0))[0]
    print("answer:", out.text)
    assert "Paris" in out.text
