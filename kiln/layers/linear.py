"""Linear layers: tensor-parallel sharding on load, fused projections, weight-only int8 (W8A16).

Each weight parameter carries a `weight_loader(param, tensor, shard_id)` so the model loader can hand it
a full Hugging Face tensor and the layer takes its rank's slice (and, for fused projections, places it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln import distributed as tpd
from kiln.quantization import ops as qops


def _dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.is_cuda:
        from kiln.kernels import skinny_matmul, use_skinny
        if use_skinny(x, weight):  # a few rows: a weight read, faster through the split-K kernel than cuBLAS
            return skinny_matmul(x, weight, bias)
    return F.linear(x, weight, bias)


# torch's CPU int8pack matmul has a fast path for bf16 activations only: with float32 ones its time grows with the
# rows (SmolLM2's 1536 x 576, 2 cores: 0.3 ms at 1 row, 220 ms at 396 against 7 ms dequantized; bf16: 2 ms at 396),
# so a float32 prefill dequantizes the weight once instead
INT8PACK_MAX_FLOAT32_ROWS = 4


def _w8a16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.is_cuda:
        from kiln.kernels import w8a16_matmul
        return w8a16_matmul(x, qweight, scale, bias)
    fast = x.dtype == torch.bfloat16 or (x.dtype == torch.float32
                                         and x.numel() // x.shape[-1] <= INT8PACK_MAX_FLOAT32_ROWS)
    if fast and hasattr(torch, "_weight_int8pack_mm"):
        # PyTorch's CPU int8-weight matmul (what gpt-fast uses): no dequantized copy of the weight
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), qweight, scale.to(x.dtype))
        y = y.reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    return F.linear(x, qweight.to(x.dtype) * scale.to(x.dtype)[:, None], bias)


INT4_GROUP = 32  # GGUF's Q4_0/Q4_1 block size


def int4_groups_if_lossless(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor] | None:
    """If every group of `group` input weights of w [N, K] lies on a 16-level grid (a Q4 GGUF checkpoint
    dequantized to float32), return its 4-bit codes [N, K] (int32, 0..15) and per-group (scale, zero)
    [K/group, N, 2] with w = (code - 8) * scale + zero, the layout of torch's CPU int4 matmul; else None."""
    n, k = w.shape
    if k % group:
        return None
    wg = w.float().view(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    step = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((wg - lo) / step).clamp(0, 15)
    # float32 round-off of the dequantization is ~1e-6 of a step; a weight off the grid is off by up to half
    if not bool(((codes * step + lo - wg).abs() <= 1e-3 * step).all()):
        return None
    scale_zero = torch.cat([step, lo + 8 * step], -1).transpose(0, 1).contiguous()
    return codes.view(n, k).to(torch.int32), scale_zero


def _w4a16(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), packed, INT4_GROUP, scale_zero)
    y = y.reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


class Linear(nn.Module):
    """y = x W^T (+ b), W stored [out, in]. Subclasses decide how a checkpoint tensor is sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.load_weight
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
            self.bias.weight_loader = self.load_weight
        self.qweight: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.int4 = False  # qweight holds torch's packed CPU int4 layout, scale the per-group (scale, zero)
        self.act_quant = False  # W8A8: activations quantized too (per token, or with the static input_scale)
        self.input_scale: torch.Tensor | None = None
        self.lora = None  # kiln.layers.lora.LoRABinding where LoRA adapters change this projection

    @property
    def lora_active(self) -> bool:
        """Some rows of this step take a LoRA adapter's delta here (only forward() adds it)."""
        return self.lora is not None and self.lora.state.active

    def load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.shape != loaded.shape:
            raise ValueError(f"shape mismatch: checkpoint {tuple(loaded.shape)} vs model {tuple(param.shape)}")
        param.data.copy_(loaded)

    def quantize_int8(self) -> None:
        """Per-output-channel symmetric int8; the bf16 weight is dropped (half the bytes per decode step)."""
        self.quantize_weights(qops.W8A16)

    def quantize_weights(self, scheme: str) -> None:
        """Per-output-channel symmetric 8-bit weights (int8, or E4M3 for w8a8-fp8); the float weight is dropped.
        The w8a8 schemes quantize activations per token as well (kiln/quantization/ops.py)."""
        dtype = qops.code_dtype(scheme)
        w = self.weight.data.float()
        self.qweight, self.scale = qops.quantize_weight(w, dtype, qops.channel_scales(w, dtype, self._channel_absmax(w)))
        self.act_quant = scheme != qops.W8A16
        self.weight = None

    def prepare_quantized(self, scheme: str) -> None:
        """Empty 8-bit weights and per-channel scales for a quantized checkpoint's tensors to be loaded into."""
        dev = self.weight.device
        self.qweight = torch.zeros(self.out_features, self.in_features, dtype=qops.code_dtype(scheme), device=dev)
        self.scale = torch.zeros(self.out_features, dtype=torch.float32, device=dev)
        self.act_quant = scheme != qops.W8A16
        self.weight = None

    def _channel_absmax(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs().amax(dim=1)

    def pack_int4_if_lossless(self, dtype: torch.dtype) -> bool:
        """CPU only: store a weight that is exactly 4-bit per group of 32 (a Q4 GGUF's blocks) as torch's packed
        int4 (a quarter of bf16's bytes per decode step, no accuracy lost); activations must be bfloat16."""
        if self.weight is None or self.weight.device.type != "cpu" or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            return False
        found = int4_groups_if_lossless(self.weight.data)
        if found is None:
            return False
        codes, scale_zero = found
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        except RuntimeError:  # a shape the kernel does not take: stay dense
            return False
        self.qweight, self.scale, self.int4 = packed, scale_zero.to(dtype), True
        self.weight = None
        if self.bias is not None:
            self.bias.data = self.bias.data.to(dtype)
        return True

    def input_quant(self, x: torch.Tensor | qops.QuantizedRows) -> qops.InputQuant | None:
        """How this layer wants an input of x's rows quantized by the kernel that produces it (W8A8 on CUDA), or
        None: pass it as is."""
        if not self.act_quant or self.int4:
            return None
        rows = x.rows if isinstance(x, qops.QuantizedRows) else x.numel() // x.shape[-1]
        return qops.input_quant(rows, self.qweight, self.input_scale)

    def forward(self, x: torch.Tensor | qops.QuantizedRows) -> torch.Tensor:
        y = self._project(x)
        if self.lora_active:
            self.lora.apply(x, y)
        return y

    def _project(self, x: torch.Tensor | qops.QuantizedRows) -> torch.Tensor:
        if isinstance(x, qops.QuantizedRows):  # quantized by its producer, as input_quant asked
            return qops.w8a8_gemm(x, self.qweight, self.scale, self.bias)
        if self.qweight is not None:
            if self.int4:
                return _w4a16(x, self.qweight, self.scale, self.bias)
            if self.act_quant:
                return qops.w8a8_linear(x, self.qweight, self.scale, self.bias, self.input_scale)
            return _w8a16(x, self.qweight, self.scale, self.bias)
        return _dense(x, self.weight, self.bias)

    def silu_and_mul(self, x: torch.Tensor | qops.QuantizedRows, out_quant: qops.InputQuant | None = None
                     ) -> torch.Tensor | qops.QuantizedRows:
        """CUDA: silu(first half) * second half of forward(x), the SwiGLU of a fused gate/up projection. With 8-bit
        weights at one row (where the w8a8 schemes too leave activations unquantized), one kernel for both.
        out_quant (the next layer's input_quant): the result as that layer's 8-bit input, in the same kernel."""
        from kiln.kernels import silu_and_mul, silu_and_mul_quant, w8a16_silu_and_mul
        one_row_weight_only = not self.act_quant or qops.WEIGHT_ONLY_MAX_T >= 1
        if (not isinstance(x, qops.QuantizedRows) and self.qweight is not None and not self.int4
                and x.numel() == x.shape[-1] and one_row_weight_only and out_quant is None):
            return w8a16_silu_and_mul(x, self.qweight, self.scale, self.bias)
        q = out_quant
        if (q is not None and isinstance(x, qops.QuantizedRows) and self.qweight.dtype == torch.int8
                and self.bias is None):  # int8: the GEMM's scale epilogue goes into the same kernel
            codes, scales = silu_and_mul_quant(qops.int8_gemm(x, self.qweight), q.dtype, q.static_scale, q.pad_rows,
                                               rows=x.rows, int32_scales=(x.scales, self.scale, x.out_dtype))
            return qops.QuantizedRows(codes, scales, q.rows, x.out_dtype)
        gate_up = self.forward(x)
        if q is None:
            return silu_and_mul(gate_up)
        codes, scales = silu_and_mul_quant(gate_up, q.dtype, q.static_scale, q.pad_rows)
        return qops.QuantizedRows(codes, scales, q.rows, gate_up.dtype)


class ColumnParallelLinear(Linear):
    """Output features split across ranks. `output_sizes` lists fused sub-projections (e.g. q, k, v);
    `replicas[i]` ranks hold the same slice of sub-projection i (1: split over all ranks)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 replicas: list[int] | None = None):
        tp = tpd.tp_size()
        self.replicas = replicas or [1] * len(output_sizes)
        for s, r in zip(output_sizes, self.replicas):
            if s % (tp // r):
                raise ValueError(f"output size {s} is not divisible by the tensor-parallel size {tp}")
        self.full_sizes = list(output_sizes)
        self.output_sizes = [s // (tp // r) for s, r in zip(output_sizes, self.replicas)]
        super().__init__(in_features, sum(self.output_sizes), bias)

    def load_weight(self, param, loaded, shard_id=None):
        idx = 0 if shard_id is None else shard_id
        size = self.output_sizes[idx]
        offset = sum(self.output_sizes[:idx])
        full = self.full_sizes[idx]
        if loaded.shape[0] != full or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(f"shape mismatch: checkpoint {tuple(loaded.shape)}, expected ({full}, "
                             f"{', '.join(map(str, param.shape[1:]))})")
        shard = loaded.narrow(0, tpd.tp_rank() // self.replicas[idx] * size, size)
        param.data.narrow(0, offset, size).copy_(shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v fused and split by heads. KV heads fewer than the ranks are replicated, as in vLLM: rank r
    holds KV head r // (ranks / KV heads), the one its query heads read."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False):
        kv_replicas = max(1, tpd.tp_size() // num_kv_heads)
        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], bias,
                         replicas=[1, kv_replicas, kv_replicas])


class RowParallelLinear(Linear):
    """Input features split across ranks; partial outputs summed with an all-reduce (reduce=False: left to the
    caller, which sums them with other partials first)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce: bool = True):
        tp = tpd.tp_size()
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by the tensor-parallel size {tp}")
        super().__init__(in_features // tp, out_features, bias)
        self.reduce = reduce

    def load_weight(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: added once, on rank 0
            data = loaded if tpd.tp_rank() == 0 else torch.zeros_like(loaded)
            return super().load_weight(param, data)
        size = self.in_features
        if loaded.shape[0] != param.shape[0] or loaded.shape[1] != size * tpd.tp_size():
            raise ValueError(f"shape mismatch: checkpoint {tuple(loaded.shape)}, expected "
                             f"({param.shape[0]}, {size * tpd.tp_size()})")
        param.data.copy_(loaded.narrow(1, tpd.tp_rank() * size, size))

    def _channel_absmax(self, w: torch.Tensor) -> torch.Tensor:
        # int8 scales over the whole row, not this rank's part: the same weights as on one rank
        return tpd.all_reduce_max(super()._channel_absmax(w))

    def forward(self, x):
        y = super().forward(x)
        return tpd.all_reduce(y) if self.reduce else y


class VocabEmbedding(nn.Module):
    """Embedding (and LM head) split along the vocabulary across ranks."""

    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        tp = tpd.tp_size()
        self.vocab_size = vocab_size
        self.shard = (vocab_size + tp - 1) // tp
        self.start = tpd.tp_rank() * self.shard
        self.weight = nn.Parameter(torch.zeros(self.shard, hidden), requires_grad=False)
        self.weight.weight_loader = self.load_weight
        self.head_qweight: torch.Tensor | None = None  # int8 codes of the LM head (quantize_head), and their scales
        self.head_scale: torch.Tensor | None = None

    def load_weight(self, param, loaded, shard_id=None):
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"shape mismatch: checkpoint {tuple(loaded.shape)}, expected "
                             f"({self.vocab_size}, {param.shape[1]})")
        part = loaded[self.start:self.start + self.shard]
        param.data[: part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tpd.tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        valid = (local >= 0) & (local < self.shard)
        out = F.embedding(local.clamp(0, self.shard - 1), self.weight) * valid[:, None].to(self.weight.dtype)
        return tpd.all_reduce(out)

    def quantize_head(self, keep_float: bool) -> None:
        """The LM head in per-row symmetric int8 (weight-only: a decode step reads half its bytes). keep_float: the
        weight also embeds tokens (tied embeddings), so the float copy stays for that."""
        self.head_qweight, self.head_scale = qops.quantize_weight(self.weight.data.float(), torch.int8)
        if not keep_float:
            self.weight = None

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [rows, vocab]; out: a buffer of that shape to write them into, in its own dtype (decode
        graphs share one across their batch sizes, in the model's dtype)."""
        if self.head_qweight is not None:
            raw = _w8a16(hidden, self.head_qweight, self.head_scale, None)
        else:
            raw = _dense(hidden, self.weight, None)
        if out is not None and tpd.tp_size() == 1:
            return out.copy_(raw[:, : self.vocab_size])  # straight into the buffer (converted if its dtype asks)
        logits = raw.float()
        if tpd.tp_size() > 1:
            logits = tpd.all_gather_last_dim(logits)
        logits = logits[:, : self.vocab_size]
        return logits if out is None else out.copy_(logits)
