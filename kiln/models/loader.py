"""Build a model from a Hugging Face directory (config.json + *.safetensors) or with random weights."""
from __future__ import annotations

import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from kiln.layers.linear import Linear
from kiln.layers.moe import SparseMoE
from kiln.models.config import ModelConfig
from kiln.models.llama import LlamaForCausalLM
from kiln.quantization import ops as qops
from kiln.quantization.checkpoint import CheckpointQuant, read_quantization, unpack_int8

log = logging.getLogger("kiln.loader")


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"model.safetensors.index.json names missing files: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def read_ahead(files: list[Path], depth: int = 4) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) of every tensor of the files in order, each read from the file on a helper thread up to
    `depth` tensors ahead of the caller: the reads (page-cache copies, or the disk) overlap the caller's copies to
    the GPU instead of taking turns with them."""
    with ThreadPoolExecutor(1, thread_name_prefix="kiln-weights") as pool:
        for path in files:
            with safe_open(str(path), framework="pt") as f:  # used by the helper thread alone once keys are read
                names = iter(list(f.keys()))
                pending: deque = deque()
                for name in names:
                    pending.append((name, pool.submit(f.get_tensor, name)))
                    if len(pending) >= depth:
                        break
                while pending:
                    name, tensor = pending.popleft()
                    nxt = next(names, None)
                    if nxt is not None:
                        pending.append((nxt, pool.submit(f.get_tensor, nxt)))
                    try:
                        yield path, name, tensor.result()
                    except BaseException:
                        for _, later in pending:
                            later.cancel()
                        for _, later in pending:  # none may still read from f once it closes
                            if not later.cancelled():
                                later.exception()
                        raise


def load_weights(model: LlamaForCausalLM, model_dir: Path, quant: CheckpointQuant | None = None) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[tuple[str, int | None]] = set()
    for path, name, tensor in read_ahead(safetensors_files(model_dir)):
        if quant is not None and _load_quantized(model, name, lambda: tensor, loaded):
            continue
        target = model.map_checkpoint_name(name)
        if target is None:
            continue
        pname, shard = target
        param = params.get(pname)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} ({path.name}) has no place in {model.config.architecture}")
        try:
            param.weight_loader(param, tensor.to(param.dtype), shard) if hasattr(param, "weight_loader") \
                else _copy(param, tensor)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        loaded.add((pname, shard))
    expected = _expected_loads(model) | (_expected_quantized(model, quant) if quant else set())
    missing = sorted(f"{p}" + ("" if s is None else f"[{s}]") for p, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {missing[:5]}")


_QUANT_LEAVES = ("weight", "weight_packed", "weight_scale", "weight_shape", "input_scale", "weight_zero_point")


def _load_quantized(model: LlamaForCausalLM, name: str, get, loaded: set) -> bool:
    """A compressed-tensors tensor (8-bit codes, scales, KV-cache scales) into its layer; False: not one."""
    base, leaf = name.rsplit(".", 1)
    if leaf in ("k_scale", "v_scale") or leaf == "output_scale" and base.rsplit(".", 1)[-1] in ("k_proj", "v_proj"):
        layer = int(name.split(".layers.")[1].split(".")[0])
        which = 0 if leaf == "k_scale" or base.endswith("k_proj") else 1
        model.kv_cache_scales[layer][which] = get().float().reshape(-1)
        loaded.add((f"kv_cache_scales.{layer}", which))
        return True
    if leaf not in _QUANT_LEAVES or base.rsplit(".", 1)[-1] not in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj",
                                                                    "w1", "w2", "w3"):  # Mixtral's experts
        return False
    pname, shard = model.map_checkpoint_name(base + ".weight")
    if pname.endswith((".w13", ".w2")):  # an expert's: its layer's stacked codes and scales
        mpath, kind = pname.rsplit(".", 1)
        if leaf == "weight_shape":  # pack-quantized's record of the unpacked shape: the codes say it
            return True
        if leaf not in ("weight", "weight_packed", "weight_scale"):
            raise ValueError(f"{name}: mixture-of-experts checkpoints take w8a16 codes and scales only")
        t = get()
        ours = "scale" if leaf == "weight_scale" else "codes"
        try:
            model.get_submodule(mpath).load_quantized(kind, ours, unpack_int8(t) if leaf == "weight_packed" else t,
                                                      shard)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        loaded.add((f"{mpath}.{kind}.{ours}", shard))
        return True
    mpath = pname[: -len(".weight")]
    m = model.get_submodule(mpath)
    t = get()
    try:
        if leaf == "weight_zero_point":
            raise ValueError("zero points (asymmetric weights) are not supported")
        if leaf in ("weight", "weight_packed"):
            codes = unpack_int8(t) if leaf == "weight_packed" else t
            if codes.dtype != m.qweight.dtype:
                raise ValueError(f"{codes.dtype} weights, expected {m.qweight.dtype} (quantization_config)")
            m.load_weight(m.qweight, codes, shard)
            loaded.add((mpath + ".qweight", shard))
        elif leaf == "weight_scale":
            s = t.float().reshape(-1)
            rows = m.full_sizes[shard] if hasattr(m, "full_sizes") else m.out_features
            if s.numel() == 1:  # per-tensor: the same scale for each of the sub-projection's channels
                s = s.expand(rows)
            if hasattr(m, "full_sizes"):
                m.load_weight(m.scale, s, shard)
            else:  # row-parallel: scales over whole rows, the same on every rank
                _copy(m.scale, s)
            loaded.add((mpath + ".scale", shard))
        elif leaf == "input_scale":  # fused q/k/v or gate/up: one activation, the largest of their scales
            s = t.float().reshape(-1).amax().reshape(1).to(m.scale.device)
            m.input_scale = s if m.input_scale is None else torch.maximum(m.input_scale, s)
            loaded.add((mpath + ".input_scale", shard))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return True


def _expected_quantized(model: LlamaForCausalLM, quant: CheckpointQuant) -> set[tuple[str, int | None]]:
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, SparseMoE):
            out |= {(f"{name}.{what}", shard) for what, shard in m.quantized_shards()}
        if isinstance(m, Linear) and m.qweight is not None:
            shards = range(len(m.output_sizes)) if hasattr(m, "output_sizes") else [None]
            leaves = ("qweight", "scale", "input_scale") if quant.static_activations else ("qweight", "scale")
            out |= {(f"{name}.{leaf}", s) for s in shards for leaf in leaves}
    if quant.kv_cache:
        out |= {(f"kv_cache_scales.{i}", w) for i in range(model.config.num_layers) for w in (0, 1)}
    return out


def _copy(param, tensor):
    if param.shape != tensor.shape:
        raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}")
    param.data.copy_(tensor)


def _expected_loads(model: LlamaForCausalLM) -> set[tuple[str, int | None]]:
    out = set()
    for name, module in model.named_modules():
        per_shard = module.checkpoint_shards() if hasattr(module, "checkpoint_shards") else {}
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if pname in per_shard:
                out |= {(full, s) for s in per_shard[pname]}
                continue
            n_shards = len(getattr(module, "output_sizes", [])) if pname == "weight" or pname == "bias" else 0
            if n_shards > 1:
                out |= {(full, i) for i in range(n_shards)}
            elif n_shards == 1:
                out.add((full, 0))
            else:
                out.add((full, None))
    if model.config.tie_word_embeddings:
        out = {x for x in out if not x[0].startswith("lm_head.")}
    return out


def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Random weights of the right shapes: for benchmarks of real model shapes with no checkpoint.
    Drawn on the parameters' device (an 8B model's worth of normal_ on a CPU takes minutes)."""
    gens: dict = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith("bias"):
            p.data.zero_()
        else:
            dev = p.device
            g = gens.get(dev) or gens.setdefault(dev, torch.Generator(device=dev).manual_seed(seed))
            p.data.normal_(0, 0.02, generator=g)


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device, load_format: str = "auto",
               quantization: str | None = None, seed: int = 0, quantize_lm_head: bool = False,
               expert_parallel: bool = False) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    cfg.expert_parallel = expert_parallel
    # a float32 checkpoint served in bfloat16 on CPU may be a dequantized Q4 GGUF: read it in float32 so that
    # linear layers whose weights lie on a 4-bit grid can be kept as int4 (bf16 rounding would hide the grid)
    quant = read_quantization(model_dir) if load_format != "dummy" else None
    if cfg.num_experts and (quant is not None and quant.scheme != qops.W8A16
                            or quant is None and quantization not in (None, "", "none", qops.W8A16)):
        raise ValueError(f"{cfg.architecture} is a mixture of experts: Kiln serves its experts in float, as "
                         f"--quantization w8a16, or from w8a16 checkpoints, not "
                         f"{quant.scheme + ' checkpoints' if quant else quantization}")
    if quant is not None and quantization not in (None, "", "none", quant.scheme):
        raise ValueError(f"{model_dir} holds a {quant.scheme} checkpoint; --quantization {quantization} cannot "
                         f"apply to it (leave it unset)")
    find_int4 = (device.type == "cpu" and dtype == torch.bfloat16 and quantization in (None, "", "none")
                 and load_format != "dummy" and cfg.torch_dtype in ("float32", None) and quant is None)
    model = build_model(cfg, torch.float32 if find_int4 else dtype, device)
    model.quantization = quant
    model.kv_cache_scales = [[None, None] for _ in range(cfg.num_layers)]  # static K/V scales [kv heads], if any
    if quant is not None:
        for m in model.modules():
            if isinstance(m, (Linear, SparseMoE)):
                m.prepare_quantized(quant.scheme)
        log.info("quantized checkpoint: %s (%s), KV cache scales: %s", quant.scheme, quant.description,
                 quant.kv_cache or "none")
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    elif load_format in ("auto", "safetensors"):
        load_weights(model, model_dir, quant)
    else:
        raise ValueError(f"unknown load format {load_format!r} (auto | safetensors | dummy)")
    if find_int4:
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        packed = sum(m.pack_int4_if_lossless(dtype) for m in linears)
        if packed:
            log.info("%d of %d linear layers hold 4-bit weights (a Q4 checkpoint): kept as int4", packed, len(linears))
        model.to(dtype)
    if quantization in qops.SCHEMES and quant is None:  # quantize at load: per-channel weights, dynamic activations
        for m in model.modules():
            if isinstance(m, (Linear, SparseMoE)):
                m.quantize_weights(quantization)
    elif quantization not in (None, "", "none") and quantization not in qops.SCHEMES:
        raise ValueError(f"unknown quantization {quantization!r} ({' | '.join(qops.SCHEMES)})")
    if quantize_lm_head:
        model.lm_head.quantize_head(keep_float=cfg.tie_word_embeddings)
    return model
