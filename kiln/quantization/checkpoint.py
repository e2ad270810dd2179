"""Quantized checkpoints in the compressed-tensors format (what llm-compressor writes and vLLM loads).

The config (config.json's `quantization_config`) is built and parsed with the `compressed-tensors` package;
tensors are packed and named by its compressors:
  - w8a8-int8: format "int-quantized"; `weight` int8 [N, K], `weight_scale` [N, 1] (channel) or [1] (tensor),
    `input_scale` [1] when activations are static.
  - w8a8-fp8: format "float-quantized"; `weight` float8_e4m3fn, the same scales.
  - w8a16: format "pack-quantized"; `weight_packed` int32 [N, K/4], `weight_scale` [N, 1], `weight_shape` [2].
  - the KV cache: `kv_cache_scheme` (int8 or fp8, per attention head or per tensor) and `self_attn.k_scale` /
    `self_attn.v_scale` tensors [num_kv_heads] (or [1]).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.quantization import ops as qops

SUPPORTED = ("W8A8 int8 (int8 channel/tensor weights, int8 token-dynamic or tensor-static activations), "
             "FP8 W8A8 (E4M3 channel/tensor weights, E4M3 token-dynamic or tensor-static activations), "
             "W8A16 int8 (int8 channel weights, no activation quantization); KV cache int8 or fp8 "
             "(tensor or attn_head scales)")

_FORMAT = {qops.W8A8_INT8: "int-quantized", qops.W8A8_FP8: "float-quantized", qops.W8A16: "pack-quantized"}
_PRESET = {qops.W8A8_INT8: "W8A8", qops.W8A8_FP8: "FP8_DYNAMIC", qops.W8A16: "W8A16"}
KV_SCHEMES = ("int8", "fp8")
# the checkpoint's Linear projections, by their Hugging Face names (lm_head and embeddings stay unquantized)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")  # Qwen's and Mixtral's names
# a mixture of experts' routers stay in float (Linear modules in transformers: named so the others skip them)
MOE_IGNORE = ["re:.*mlp.gate$", "re:.*block_sparse_moe.gate$", "re:.*shared_expert_gate$"]


class QuantizationConfigError(ValueError):
    """A checkpoint's quantization_config that Kiln cannot serve; the message is one line."""


def _scheme(scheme: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme
    s = preset_name_to_scheme(_PRESET[scheme], ["Linear"])
    if scheme == qops.W8A16:  # the preset is grouped (128); Kiln's W8A16 is per channel
        s = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False))
    s.format = _FORMAT[scheme]
    return s


def kv_cache_args(kind: str):
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(num_bits=8, type="int" if kind == "int8" else "float", strategy="attn_head",
                            symmetric=True, dynamic=False)


def _is_router(ignored: str) -> bool:
    """An `ignore` entry naming a mixture of experts' router (`mlp.gate`, `block_sparse_moe.gate`,
    `shared_expert_gate`, as a name or a re: pattern), which Kiln keeps in float in any case."""
    last = re.split(r"[.*]", ignored.removeprefix("re:").rstrip("$"))[-1]
    return last in ("gate", "shared_expert_gate")


def quantization_config(scheme: str, kv_cache: str | None, moe: bool = False) -> dict:
    """config.json's `quantization_config` of a checkpoint written by `kiln quantize` (moe: the routers ignored)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    qc = QuantizationConfig(config_groups={"group_0": _scheme(scheme)}, format=_FORMAT[scheme],
                            kv_cache_scheme=kv_cache_args(kv_cache) if kv_cache else None,
                            quantization_status=QuantizationStatus.COMPRESSED,
                            ignore=["lm_head"] + (MOE_IGNORE if moe else []))
    return json.loads(qc.model_dump_json(exclude_none=False))


def compress_weight(weight: torch.Tensor, scale: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """One projection's float weight [N, K] and per-channel scales [N] -> its checkpoint tensors (local names),
    through the compressed-tensors compressor of the scheme's format."""
    from compressed_tensors.compressors import BaseCompressor
    compressor = BaseCompressor.load_from_registry(_FORMAT[scheme])
    out = compressor.compress({"weight": weight.float(), "weight_scale": scale.float()[:, None]}, _scheme(scheme))
    return {k: v.contiguous() for k, v in out.items()}


@dataclass
class CheckpointQuant:
    """What a checkpoint's quantization_config asks of Kiln."""
    scheme: str                    # w8a8-int8 | w8a8-fp8 | w8a16
    static_activations: bool       # input_scale tensors (per tensor) instead of per-token scales
    kv_cache: str | None           # int8 | fp8 | None
    description: str


def _describe(args) -> str:
    if args is None:
        return "none"
    extra = f" group_size={args.group_size}" if args.group_size else ""
    return (f"{args.type}{args.num_bits} {args.strategy}{extra} {'dynamic' if args.dynamic else 'static'}"
            f"{'' if args.symmetric else ' asymmetric'}")


def read_quantization(model_dir: str | Path) -> CheckpointQuant | None:
    """Parse config.json's quantization_config; None for an unquantized checkpoint. Anything Kiln cannot serve
    is a QuantizationConfigError naming the scheme and what Kiln supports."""
    cfg_path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(cfg_path.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # the model config's own reader reports an unreadable config.json
    if raw is None:
        return None
    where = f"{cfg_path}: quantization_config"
    if not isinstance(raw, dict):
        raise QuantizationConfigError(f"{where} is not a JSON object")
    method = raw.get("quant_method", "compressed-tensors")
    if method != "compressed-tensors":
        raise QuantizationConfigError(f"{where}: quant_method {method!r} is not supported; Kiln loads "
                                      f"compressed-tensors checkpoints: {SUPPORTED}")
    from compressed_tensors.quantization import QuantizationConfig
    try:
        qc = QuantizationConfig.model_validate(raw)
    except Exception as e:  # noqa: BLE001 - pydantic's message, squeezed to one line
        first = " ".join(str(e).split())[:300]
        raise QuantizationConfigError(f"{where} is malformed: {first}") from None
    found = set()
    desc = ""
    for name, s in qc.config_groups.items():
        w, a = s.weights, s.input_activations
        desc = f"weights {_describe(w)}, input activations {_describe(a)}"
        found.add((_kiln_scheme(w, a, where, name, desc), a is not None and not a.dynamic))
        if s.output_activations is not None:
            raise QuantizationConfigError(f"{where}: group {name!r} quantizes output activations, which Kiln "
                                          f"does not support; Kiln supports {SUPPORTED}")
    if len(found) != 1:
        raise QuantizationConfigError(f"{where}: {len(found)} different schemes in config_groups; Kiln supports "
                                      f"one scheme for all linear layers: {SUPPORTED}")
    partial = [i for i in (qc.ignore or []) if "lm_head" not in i and not _is_router(i)]
    if partial:
        raise QuantizationConfigError(f"{where}: layers left unquantized ({', '.join(partial[:3])}) are not "
                                      f"supported; Kiln quantizes every decoder linear layer")
    (scheme, static), = found
    kv = None
    if qc.kv_cache_scheme is not None:
        k = qc.kv_cache_scheme
        if k.num_bits != 8 or k.type not in ("int", "float") or k.strategy not in ("tensor", "attn_head") \
                or not k.symmetric or k.dynamic is True:
            raise QuantizationConfigError(f"{where}: kv_cache_scheme {_describe(k)} is not supported; Kiln "
                                          f"supports {SUPPORTED}")
        kv = "int8" if k.type == "int" else "fp8"
    return CheckpointQuant(scheme, static, kv, desc)


def _kiln_scheme(w, a, where, name, desc) -> str:
    bad = QuantizationConfigError(f"{where}: group {name!r} ({desc}) is not supported; Kiln supports {SUPPORTED}")
    if w is None or w.num_bits != 8 or not w.symmetric or w.strategy not in ("channel", "tensor"):
        raise bad
    if a is None:
        if w.type != "int" or w.strategy != "channel":
            raise bad
        return qops.W8A16
    if a.num_bits != 8 or a.type != w.type or not a.symmetric or (a.dynamic and a.strategy != "token") \
            or (not a.dynamic and a.strategy != "tensor"):
        raise bad
    return qops.W8A8_INT8 if w.type == "int" else qops.W8A8_FP8


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """pack-quantized 8-bit weights (int32 [N, K/4]) -> int8 codes [N, K]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    n, cols = packed.shape
    return unpack_from_int32(packed, 8, torch.Size([n, cols * 4])).to(torch.int8)


def resolve_kv_cache_dtype(setting: str, quant: CheckpointQuant | None) -> str:
    """The KV cache's storage: the setting (auto | int8 | fp8), where auto follows the checkpoint's
    kv_cache_scheme (a model directory with one needs no other setting), else the model dtype."""
    if setting not in ("auto", "int8", "fp8"):
        raise ValueError(f"unknown KV cache dtype {setting!r} (auto | int8 | fp8)")
    if setting == "auto" and quant is not None and quant.kv_cache:
        return quant.kv_cache
    return setting


def rank_kv_scales(scale: torch.Tensor | None, num_kv_heads: int, rank: int, tp: int) -> torch.Tensor:
    """A layer's static K or V scales [kv heads of this rank] (float32): the checkpoint's per-head or per-tensor
    scales, sharded as QKVParallelLinear shards the heads; 1.0 where the checkpoint has none (vLLM's default)."""
    kvh = max(1, num_kv_heads // tp)
    if scale is None:
        return torch.ones(kvh)
    scale = scale.float().reshape(-1)
    if scale.numel() == 1:
        return scale.expand(kvh).clone()
    if scale.numel() != num_kv_heads:
        raise ValueError(f"KV cache scales of {scale.numel()} heads for a model of {num_kv_heads} KV heads")
    if num_kv_heads >= tp:
        return scale[rank * kvh:(rank + 1) * kvh].clone()
    return scale[rank // (tp // num_kv_heads)].reshape(1).clone()
