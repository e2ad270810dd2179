"""Post-training quantization: a Hugging Face checkpoint -> a compressed-tensors checkpoint (`kiln quantize`).

Weights: symmetric per-output-channel int8 or E4M3 (w8a8-int8, w8a8-fp8, w8a16); activations stay dynamic
(per token, at run time), so calibration is needed only for SmoothQuant (w8a8-int8, --smoothquant-alpha) and
for the static KV-cache scales (--kv-cache-scheme). Everything is written to a temporary directory beside
the output and renamed into place at the end: an error leaves nothing behind.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kiln.models.config import ModelConfig
from kiln.models.loader import load_model, safetensors_files
from kiln.quantization import ops as qops
from kiln.quantization.calibration import calibration_samples, collect_statistics, read_calibration_texts
from kiln.quantization.checkpoint import (EXPERT_PROJECTIONS, KV_SCHEMES, PROJECTIONS, compress_weight,
                                          quantization_config, read_quantization)


@dataclass
class QuantizeOptions:
    scheme: str
    kv_cache_scheme: str | None = None
    smoothquant_alpha: float | None = None
    calib_file: str | None = None
    calib_samples: int = 32
    calib_seq_len: int = 512
    device: str = "auto"


def check_options(model_dir: Path, output: Path, o: QuantizeOptions) -> None:
    """Every check that needs no model run, before anything is written (ValueError, one line)."""
    if o.scheme not in qops.SCHEMES:
        raise ValueError(f"unsupported scheme {o.scheme!r}; Kiln writes {', '.join(qops.SCHEMES)}")
    if o.kv_cache_scheme not in (None, *KV_SCHEMES):
        raise ValueError(f"unsupported KV cache scheme {o.kv_cache_scheme!r} ({' | '.join(KV_SCHEMES)})")
    if o.smoothquant_alpha is not None:
        if o.scheme != qops.W8A8_INT8:
            raise ValueError(f"--smoothquant-alpha applies to w8a8-int8 only, not {o.scheme}")
        if not 0 <= o.smoothquant_alpha <= 1:
            raise ValueError(f"--smoothquant-alpha must be within [0, 1], not {o.smoothquant_alpha}")
    if o.calib_samples < 1 or o.calib_seq_len < 2:
        raise ValueError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    if output.exists():
        raise ValueError(f"output directory {output} already exists; choose a new path")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model {model_dir}: no config.json (expected a Hugging Face model directory)")
    if ModelConfig.from_dir(model_dir).num_experts and o.scheme != qops.W8A16:  # (unsupported archs say so here)
        raise ValueError(f"model {model_dir} is a mixture of experts: kiln quantize writes those as w8a16 only, "
                         f"not {o.scheme}")
    safetensors_files(model_dir)
    if read_quantization(model_dir) is not None:
        raise ValueError(f"model {model_dir} is already quantized; start from an unquantized checkpoint")


def _smooth(weights: list[torch.Tensor], norm: torch.Tensor, act: torch.Tensor, alpha: float):
    """SmoothQuant: move activation outliers into the weights, s_j = max|X_j|^a / max|W_j|^(1-a); the
    norm's weight (the layers' only input) is divided by s, each weight's columns multiplied."""
    wmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    s = (act.clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
    return [w.float() * s[None, :] for w in weights], norm.float() / s


def quantize_checkpoint(model_dir: str | Path, output: str | Path, o: QuantizeOptions, progress=print) -> Path:
    model_dir, output = Path(model_dir), Path(output)
    check_options(model_dir, output, o)
    mc = ModelConfig.from_dir(model_dir)
    t0 = time.monotonic()
    needs_calib = o.kv_cache_scheme is not None or o.smoothquant_alpha is not None
    texts = read_calibration_texts(o.calib_file)  # read (and checked) even when unused: a bad file is an error
    act, kv, samples = {}, [], []
    if needs_calib:
        from kiln.tokenizer import load_hf_tokenizer
        tok = load_hf_tokenizer(Path(model_dir))
        samples = calibration_samples(texts, tok, o.calib_samples, o.calib_seq_len)
        if not samples:
            raise ValueError("the calibration text gives no sample of 2 or more tokens")
        device = torch.device("cuda" if o.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if o.device == "auto" else o.device))
        model = load_model(model_dir, torch.float32, device)
        act, kv = collect_statistics(model, samples, device, progress)
        del model

    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    out: dict[str, torch.Tensor] = {}
    dtype = qops.code_dtype(o.scheme)
    for i in range(mc.num_layers):
        pre = f"model.layers.{i}."
        if o.smoothquant_alpha is not None:
            for norm, projs, fused in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj",
                                                            "self_attn.v_proj"), "self_attn.qkv_proj"),
                                       ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"),
                                        "mlp.gate_up_proj")):
                names = [f"{pre}{p}.weight" for p in projs]
                smoothed, tensors[f"{pre}{norm}.weight"] = _smooth(
                    [tensors[n] for n in names], tensors[f"{pre}{norm}.weight"], act[pre + fused],
                    o.smoothquant_alpha)
                tensors.update(zip(names, smoothed))
        done = 0
        for proj in PROJECTIONS:
            for part in ("self_attn", "mlp"):
                name = f"{pre}{part}.{proj}.weight"
                if name in tensors:
                    done += 1
                    w = tensors.pop(name).float()
                    packed = compress_weight(w, qops.channel_scales(w, dtype), o.scheme)
                    out.update({f"{pre}{part}.{proj}.{k}": v for k, v in packed.items()})
        if o.kv_cache_scheme is not None:
            top = qops.qmax(qops.code_dtype("w8a8-fp8" if o.kv_cache_scheme == "fp8" else "w8a8-int8"))
            out[f"{pre}self_attn.k_scale"] = (kv[i][0].clamp(min=1e-8) / top).float().cpu()
            out[f"{pre}self_attn.v_scale"] = (kv[i][1].clamp(min=1e-8) / top).float().cpu()
        # a mixture of experts' projections (each expert's, a shared expert's): per output channel, as any
        experts = [n for n in tensors if n.startswith(pre) and (".experts." in n or ".shared_expert." in n)
                   and n.endswith(tuple(f".{p}.weight" for p in EXPERT_PROJECTIONS))]
        for name in experts:
            w = tensors.pop(name).float()
            packed = compress_weight(w, qops.channel_scales(w, dtype), o.scheme)
            out.update({f"{name[:-len('.weight')]}.{k}": v for k, v in packed.items()})
        progress(f"layer {i + 1}/{mc.num_layers}: {done} projections"
                 + (f" and {len(experts)} expert projections" if experts else "") + f" -> {o.scheme}"
                 + (f", SmoothQuant alpha {o.smoothquant_alpha}" if o.smoothquant_alpha is not None else "")
                 + (f", {o.kv_cache_scheme} K/V scales" if o.kv_cache_scheme else ""))
    out.update({k: v.contiguous() for k, v in tensors.items()})  # embeddings, norms, lm_head: as they were

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in model_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",
                                                                              "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg["quantization_config"] = quantization_config(o.scheme, o.kv_cache_scheme, moe=bool(mc.num_experts))
        cfg["kiln_quantization"] = {  # what `kiln quantize` did (vLLM and transformers ignore this key)
            "source": str(model_dir.resolve()), "scheme": o.scheme, "kv_cache_scheme": o.kv_cache_scheme,
            "smoothquant_alpha": o.smoothquant_alpha,
            "calibration": None if not needs_calib else {
                "file": o.calib_file or f"kiln default ({len(texts[0])} characters)",
                "samples": len(samples), "seq_len": o.calib_seq_len, "tokens": sum(map(len, samples))},
            "seconds": round(time.monotonic() - t0, 1)}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"wrote {output} ({o.scheme}{', KV ' + o.kv_cache_scheme if o.kv_cache_scheme else ''}) in "
             f"{time.monotonic() - t0:.1f} s")
    return output
