"""Calibration: text -> token samples -> activation statistics of Kiln's own model (one sequence at a time).

`sequence_forward` runs one whole sequence through the model with a private paged cache and the PyTorch
attention backend; calibration and the perplexity tests both use it.
"""
from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import torch

from kiln import distributed as tpd
from kiln.layers.attention import AttentionMetadata, LayerKVCache, TorchAttention
from kiln.layers.linear import Linear
from kiln.quantization.checkpoint import rank_kv_scales

DEFAULT_CALIB_FILE = "calibration.txt"  # package data of kiln.quantization: plain English prose


def default_calibration_text() -> str:
    return resources.files("kiln.quantization").joinpath(DEFAULT_CALIB_FILE).read_text(encoding="utf-8")


def read_calibration_texts(path: str | Path | None) -> list[str]:
    """A .txt file (the whole text) or .jsonl (one JSON object with "text", or a JSON string, per line);
    None: the default text that ships with Kiln. An empty or unreadable file is a ValueError (one line)."""
    if path is None:
        return [default_calibration_text()]
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"calibration file {p}: no such file")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise ValueError(f"calibration file {p}, line {n}: not JSON") from None
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ValueError(f'calibration file {p}, line {n}: expected a string or an object with "text"')
            texts.append(text)
    elif p.suffix in (".txt", ""):
        texts = [raw]
    else:
        raise ValueError(f"calibration file {p}: expected a .txt or .jsonl file")
    if not any(t.strip() for t in texts):
        raise ValueError(f"calibration file {p} holds no text")
    return texts


def calibration_samples(texts: list[str], tokenizer, samples: int, seq_len: int) -> list[list[int]]:
    """Up to `samples` token sequences of up to `seq_len` tokens: each text tokenized, cut into pieces."""
    out: list[list[int]] = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.extend(ids[i:i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i:i + seq_len]) >= 2)
        if len(out) >= samples:
            break
    return out[:samples]


def sequence_forward(model, ids: torch.Tensor, kv_cache: str = "auto", block_size: int = 16,
                     backends: list | None = None) -> torch.Tensor:
    """Hidden states [T, hidden] of one sequence, run as a single prefill over a fresh paged cache of the
    given storage (auto: the model dtype, int8, fp8); `backends` optionally gives each layer its own."""
    mc = model.config
    t = ids.numel()
    dev = ids.device
    nblk = math.ceil(t / block_size)
    kvh = max(1, mc.num_kv_heads // tpd.tp_size())
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    shape = (nblk, block_size, kvh, mc.head_dim)
    caches = []
    for i in range(mc.num_layers):
        if kv_cache == "int8":
            caches.append(LayerKVCache(torch.zeros(shape, dtype=torch.int8, device=dev),
                                       torch.zeros(shape, dtype=torch.int8, device=dev),
                                       torch.zeros(shape[:-1], device=dev), torch.zeros(shape[:-1], device=dev)))
        elif kv_cache == "fp8":
            k_s, v_s = (rank_kv_scales(s, mc.num_kv_heads, tpd.tp_rank(), tpd.tp_size()).to(dev)
                        for s in model.kv_cache_scales[i])
            caches.append(LayerKVCache(torch.zeros(shape, dtype=torch.float8_e4m3fn, device=dev),
                                       torch.zeros(shape, dtype=torch.float8_e4m3fn, device=dev), k_s, v_s))
        else:
            caches.append(LayerKVCache(torch.zeros(shape, dtype=dtype, device=dev),
                                       torch.zeros(shape, dtype=dtype, device=dev)))
    meta = AttentionMetadata(
        slot_mapping=torch.arange(t, device=dev), block_tables=torch.arange(nblk, dtype=torch.int32, device=dev)[None],
        seq_lens=torch.tensor([t], dtype=torch.int32, device=dev),
        query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=dev),
        seq_lens_list=[t], query_lens_list=[t], max_query_len=t, max_seq_len=t)
    layers = model.model.layers
    saved = [layer.self_attn.backend for layer in layers]
    for i, layer in enumerate(layers):
        layer.self_attn.backend = backends[i] if backends else TorchAttention()
    try:
        with torch.inference_mode():
            return model(ids, torch.arange(t, device=dev), caches, meta)
    finally:
        for layer, b in zip(layers, saved):
            layer.self_attn.backend = b


def perplexity(model, ids: list[int], kv_cache: str = "auto", device: str | torch.device = "cpu") -> float:
    """exp(mean next-token cross-entropy) of one sequence."""
    x = torch.tensor(ids, device=device)
    with torch.inference_mode():
        h = sequence_forward(model, x, kv_cache)
        logits = model.compute_logits(h[:-1]).float()
        return math.exp(torch.nn.functional.cross_entropy(logits, x[1:]).item())


class _KVRecorder(TorchAttention):
    """The reference backend, recording the largest |K| and |V| of each KV head (what the cache stores)."""

    def __init__(self, stats: list):
        self.stats = stats  # [k_absmax [H], v_absmax [H]]

    def forward(self, q, k, v, cache, meta, scale, rope=None):
        if rope is not None:  # on CUDA the model leaves RoPE to the backend: record K as the cache gets it
            q, k = rope[0](rope[1], q, k)
        for j, x in enumerate((k, v)):
            m = x.float().abs().amax(dim=(0, 2))
            self.stats[j] = m if self.stats[j] is None else torch.maximum(self.stats[j], m)
        return super().forward(q, k, v, cache, meta, scale)


def collect_statistics(model, samples: list[list[int]], device, progress=print) -> tuple[dict, list]:
    """Per linear layer (Kiln's fused names) the largest |input| of each input channel [K], and per decoder
    layer the largest |K| and |V| per KV head; over all samples."""
    act: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, Linear):
            def hook(_mod, inputs, name=name):
                a = inputs[0].detach().float().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
                act[name] = a if name not in act else torch.maximum(act[name], a)
            hooks.append(m.register_forward_pre_hook(hook))
    kv = [[None, None] for _ in model.model.layers]
    backends = [_KVRecorder(kv[i]) for i in range(len(kv))]
    try:
        for n, ids in enumerate(samples, 1):
            sequence_forward(model, torch.tensor(ids, device=device), backends=backends)
            progress(f"calibration: sample {n}/{len(samples)} ({len(ids)} tokens)")
    finally:
        for h in hooks:
            h.remove()
    return act, kv
