"""LoRA adapters (PEFT's format), several served beside the base model, chosen per request.

An adapter adds scale * B(A x) to the output of some of the decoder's projections (q, k, v, o, gate, up, down;
scale = lora_alpha / r, or / sqrt(r) with rsLoRA). Adapters are loaded at start (KILN_LORA_MODULES name=path,...),
or while serving (POST /v1/load_lora_adapter, where KILN_ALLOW_RUNTIME_LORA_UPDATING allows it), and numbered from
1 (0: the base model; a number is never reused, since prefix-cache keys hold it). Each step the runner gives every
input token its request's adapter number (`LoRAState.set_step`); each projection with adapters adds, for every
adapter the step uses, its delta to the rows of that adapter's tokens: two small matmuls per adapter over its rows
only (plain PyTorch: on a GPU such steps run eagerly, outside the decode CUDA graphs, and without the fused 8-bit
input paths).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: the front ends read the settings without it
    import torch

# PEFT's module names -> (Kiln's projection, slice of its fused output)
TARGETS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "o_proj": ("o_proj", None), "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
           "down_proj": ("down_proj", None)}


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int
    scale: float
    # (layer, Kiln projection, output slice or None) -> (A [r, in], B [out, r]) on the model's device and dtype
    weights: dict[tuple[int, str, int | None], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # (layer, Kiln projection) -> (A^T [in, R], scale * B^T [R, out]) of all its slices at once (LoRAState.add packs
    # them: the slices' A side by side, their B block-diagonal), so a projection costs two matmuls per adapter
    packed: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def parse_lora_modules(value: str | dict | None) -> dict[str, str]:
    """"name=path,name2=path2" (or a JSON object {name: path}) -> {name: path}; ValueError naming what to fix."""
    if not value:
        return {}
    if isinstance(value, dict):
        pairs = list(value.items())
    elif value.lstrip().startswith("{"):
        try:
            pairs = list(json.loads(value).items())
        except (ValueError, AttributeError) as e:
            raise ValueError(f"LoRA modules: not a JSON object of name: path ({e})") from None
    else:
        pairs = []
        for part in value.replace(" ", ",").split(","):
            if not part:
                continue
            name, sep, path = part.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"LoRA modules: {part!r} is not name=path (e.g. sql=/models/sql-lora)")
            pairs.append((name, path))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"LoRA modules: a name appears twice in {names}")
    return {str(n): str(p) for n, p in pairs}


def read_adapter(name: str, path: str, layers: list, dtype: torch.dtype, device: torch.device) -> LoRAAdapter:
    """One PEFT adapter directory (adapter_config.json, adapter_model.safetensors) checked against the model's
    projections `layers` (the decoder layers). ValueError says what does not fit."""
    from safetensors.torch import load_file

    from kiln import distributed as tpd

    d = Path(path)
    cfg_path, weights_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise ValueError(f"LoRA adapter {name!r}: {d} needs adapter_config.json and adapter_model.safetensors "
                         f"(PEFT's format)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"LoRA adapter {name!r}: {cfg_path} is not JSON ({e})") from None
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"LoRA adapter {name!r}: adapter_config.json needs an int r >= 1 and a lora_alpha")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save") or cfg.get("fan_in_fan_out"):
        raise ValueError(f"LoRA adapter {name!r}: bias, modules_to_save and fan_in_fan_out are not supported")
    scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
    adapter = LoRAAdapter(name, str(d), rank, float(scale))
    tensors = load_file(str(weights_path))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        parts = key.split(".")
        try:
            i = parts.index("layers")
            layer, module, which = int(parts[i + 1]), parts[i + 3], parts[i + 4]
        except (ValueError, IndexError):
            raise ValueError(f"LoRA adapter {name!r}: tensor {key} is not a decoder projection's lora_A / lora_B "
                             f"(supported: {', '.join(TARGETS)})") from None
        if module not in TARGETS or which not in ("lora_A", "lora_B"):
            raise ValueError(f"LoRA adapter {name!r}: tensor {key}: only {', '.join(TARGETS)} take LoRA here")
        pairs.setdefault((layer, module), {})[which] = t
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"} or not 0 <= layer < len(layers):
            raise ValueError(f"LoRA adapter {name!r}: layer {layer} {module}: needs lora_A and lora_B of a layer "
                             f"in [0, {len(layers)})")
        proj_name, sl = TARGETS[module]
        if proj_name in ("gate_up_proj", "down_proj") and not hasattr(layers[layer].mlp, proj_name):
            raise ValueError(f"LoRA adapter {name!r}: layer {layer} {module}: that layer's feed-forward is a mixture "
                             f"of experts, which takes no LoRA here (adapters of the attention projections work)")
        proj = getattr(layers[layer].self_attn if proj_name in ("qkv_proj", "o_proj") else layers[layer].mlp,
                       proj_name)
        a, b = ab["lora_A"], ab["lora_B"]
        # tensor parallelism: a rank's share as its projection's weight is shared (B by output rows where the
        # outputs are split, A by input columns where the inputs are: the partial deltas are summed with the
        # projection's own all-reduce)
        column = sl is not None
        full_in = proj.in_features if column else proj.in_features * tpd.tp_size()
        full_out = proj.full_sizes[sl] if column else proj.out_features
        if a.shape != (rank, full_in) or b.shape != (full_out, rank):
            raise ValueError(f"LoRA adapter {name!r}: layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B "
                             f"{tuple(b.shape)}, expected ({rank}, {full_in}) / ({full_out}, {rank})")
        if column:
            size = proj.output_sizes[sl]
            b = b.narrow(0, tpd.tp_rank() // proj.replicas[sl] * size, size)
        else:
            a = a.narrow(1, tpd.tp_rank() * proj.in_features, proj.in_features)
        adapter.weights[(layer, proj_name, sl)] = (a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous())
    if not adapter.weights:
        raise ValueError(f"LoRA adapter {name!r}: no lora_A / lora_B tensors in {weights_path}")
    return adapter


class LoRAState:
    """The adapters of a model, and this step's rows of each (set by the runner before the forward, cleared
    after)."""

    def __init__(self, model):
        self.model = model
        self.adapters: dict[int, LoRAAdapter] = {}   # number -> adapter
        self.index: dict[str, int] = {}              # name -> number
        self.next_number = 1
        # (adapter, its token rows, or None where every row of the step is its) this step
        self.step_rows: list[tuple[LoRAAdapter, torch.Tensor | None]] = []

    def add(self, adapter: LoRAAdapter, number: int | None = None) -> int:
        """Bind the projections the adapter changes and pack its weights; returns its number (`number`: the one
        rank 0 gave it, under tensor parallelism)."""
        if adapter.name in self.index:
            raise ValueError(f"LoRA adapter {adapter.name!r} is already loaded")
        used = sorted({(layer, name) for layer, name, _ in adapter.weights})
        projs = []
        for i, name in used:
            layer = self.model.model.layers[i]
            proj = getattr(layer.self_attn if name in ("qkv_proj", "o_proj") else layer.mlp, name)
            if proj.act_quant:
                raise ValueError("LoRA adapters need float or weight-only int8 (w8a16) projections: not with "
                                 "w8a8 quantization")
            projs.append((i, name, proj))
        for i, name, proj in projs:
            if proj.lora is None:
                proj.lora = LoRABinding(self, i, name)
            _pack(adapter, i, name, proj.output_sizes if name in ("qkv_proj", "gate_up_proj")
                  else [proj.out_features])
        number = number or self.next_number
        self.next_number = max(self.next_number, number + 1)
        self.adapters[number] = adapter
        self.index[adapter.name] = number
        return number

    def remove(self, name: str) -> None:
        """Forget an adapter (no request may be using it). Its projections stay bound: with no rows, a no-op."""
        del self.adapters[self.index.pop(name)]

    @property
    def active(self) -> bool:
        return bool(self.step_rows)

    def set_step(self, token_adapters: list[int], device: torch.device) -> None:
        """token_adapters: each input token's adapter number (0: none)."""
        self.step_rows = []
        if not any(token_adapters):
            return
        used = set(token_adapters)
        if len(used) == 1:  # one adapter for the whole step (batch 1, say): no row selection
            self.step_rows = [(self.adapters[used.pop()], None)]
            return
        import torch
        ids = torch.tensor(token_adapters, dtype=torch.long)
        for n in sorted(used - {0}):
            self.step_rows.append((self.adapters[n], torch.nonzero(ids == n)[:, 0].to(device)))

    def clear(self) -> None:
        self.step_rows = []

    def apply(self, layer: int, proj_name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += each active adapter's delta on its rows."""
        for adapter, rows in self.step_rows:
            ab = adapter.packed.get((layer, proj_name))
            if ab is None:
                continue
            a_t, b_t = ab
            if rows is None:
                y += ((x.to(a_t.dtype) @ a_t) @ b_t).to(y.dtype)
            else:
                y.index_add_(0, rows, ((x.index_select(0, rows).to(a_t.dtype) @ a_t) @ b_t).to(y.dtype))


class LoRABinding:
    """A projection's place among the adapters' weights (Linear.lora)."""

    def __init__(self, state: LoRAState, layer: int, name: str):
        self.state, self.layer, self.name = state, layer, name

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.state.apply(self.layer, self.name, x, y)


def _pack(adapter: LoRAAdapter, layer: int, name: str, slices: list[int]) -> None:
    """adapter.packed[(layer, name)]: its slices' A stacked and B block-diagonal (zeros for slices it leaves
    alone), the scale folded into B."""
    fused = name in ("qkv_proj", "gate_up_proj")
    parts = [(i, adapter.weights.get((layer, name, i if fused else None))) for i in range(len(slices))]
    parts = [(i, ab) for i, ab in parts if ab is not None]
    if not parts:
        return
    import torch
    a0 = parts[0][1][0]
    # float32 on a CPU: its bf16 matmuls of a few rows by a rank take ~6x the time of float32 ones
    dtype = a0.dtype if a0.is_cuda else torch.float32
    a_t = a0.new_zeros(a0.shape[1], sum(ab[0].shape[0] for _, ab in parts), dtype=dtype)
    b_t = a_t.new_zeros(a_t.shape[1], sum(slices))
    r = 0
    for i, (a, b) in parts:
        lo = sum(slices[:i])
        a_t[:, r:r + a.shape[0]] = a.t()
        b_t[r:r + a.shape[0], lo:lo + slices[i]] = b.t() * adapter.scale
        r += a.shape[0]
    adapter.packed[(layer, name)] = a_t, b_t
