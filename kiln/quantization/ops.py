"""The arithmetic of 8-bit weights and activations: per-channel weight quantization, per-token (or static
per-tensor) activation quantization, and the W8A8 matmul.

One home for these numbers: the linear layers (kiln/layers/linear.py), `kiln quantize` and the loader of
compressed-tensors checkpoints all quantize through here, so what is written is what is served.

The CPU path is the reference: int8 with exact int32 sums (`int8_matmul_cpu`), FP8 emulated (E4M3 codes cast to
float32, scaled fp32 matmul). On CUDA (docs/quantization.md, "GPU path"): up to
WEIGHT_ONLY_MAX_T rows the 8-bit weight goes through the weight-only kernel (kiln/kernels/w8a16.py) with the
activations unquantized; above, one Triton pass quantizes the activations (kiln/kernels/quant.py), then
`torch._int_mm` + a fused scale epilogue (int8) or `torch._scaled_mm` with row-wise scales (FP8).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from kiln.quantization import SCHEMES, W8A8_FP8, W8A8_INT8, W8A16  # noqa: F401 - the formats' names, re-exported

INT8_MAX = 127.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448



def code_dtype(scheme: str) -> torch.dtype:
    return FP8_DTYPE if scheme == W8A8_FP8 else torch.int8


def to_codes(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / scale as 8-bit codes (round-to-nearest for int8, the float8 cast's rounding for E4M3)."""
    y = x.float() / scale
    if dtype == torch.int8:
        return torch.round(y).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return y.clamp_(-FP8_MAX, FP8_MAX).to(dtype)


def qmax(dtype: torch.dtype) -> float:
    return INT8_MAX if dtype == torch.int8 else FP8_MAX


def channel_scales(w: torch.Tensor, dtype: torch.dtype, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric per-output-channel scales [N] (float32) of w [N, K]; `absmax` overrides the row maxima
    (row-parallel layers take them over the whole row)."""
    if absmax is None:
        absmax = w.float().abs().amax(dim=1)
    return absmax.float().clamp(min=1e-8) / qmax(dtype)


def quantize_weight(w: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (codes [N, K] of `dtype`, per-channel scales [N] float32) with w ~= codes * scale[:, None]."""
    if scale is None:
        scale = channel_scales(w, dtype)
    return to_codes(w, scale[:, None], dtype), scale


def quantize_activation(x: torch.Tensor, dtype: torch.dtype, static_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes, scales [M, 1] float32): dynamic per-token, or one static scale from the checkpoint."""
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1).expand(x.shape[0], 1)
    else:
        amax = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
        # a tensor divisor: CUDA torch turns division by a Python number into a multiply by its reciprocal (one
        # ulp off at times); the kernels (kiln/kernels/quant.py) divide, as the CPU does
        scale = amax / amax.new_tensor(qmax(dtype))
    return to_codes(x, scale, dtype), scale


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) with W = qweight * wscale[:, None] (int8 or E4M3 codes, [N, K]) and x quantized to the
    same 8-bit type per token (or with the static input_scale); accumulation in int32 / fp32, output x.dtype.
    On CUDA, at most WEIGHT_ONLY_MAX_T rows skip the activation quantization (see _w8a8_kernels)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x.is_cuda:
        return _w8a8_kernels(x2, qweight, wscale, bias, input_scale).reshape(*shape[:-1], -1)
    xq, xs = quantize_activation(x2, qweight.dtype, input_scale)
    if qweight.dtype == torch.int8:
        y = int8_matmul_cpu(xq, qweight).float() * xs * wscale[None, :]
    else:  # FP8 emulated: the E4M3 values are exact in float32
        y = (xq.float() @ qweight.float().t()) * xs * wscale[None, :]
    y = y.to(x.dtype).reshape(*shape[:-1], -1)
    return y if bias is None else y + bias


# torch's CPU int8 GEMM (`torch._int_mm`) is fast with AVX-512 (VNNI) and ~20x slower than a float32 matmul
# without it (2 AVX2 cores, 512 x 576 x 1536: 222 ms against 10; 2026-12-07). A float32 matmul of int8 codes is
# exact while every partial sum stays within 2^24: chunks of K of at most 1024 (1024 * 128^2 = 2^24), converted to
# int32 and added, give _int_mm's int32 sums bit for bit.
EXACT_FLOAT_K = 1024
FLOAT_INT8_MIN_ROWS = 8  # below, _int_mm wins even without VNNI (1 row: 0.55 ms against 1.2 with the conversion)


@functools.lru_cache(maxsize=None)
def cpu_int8_gemm_is_fast() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def int8_matmul_cpu(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[M, K] int8 @ [N, K] int8 .T -> [M, N] int32, exactly: torch._int_mm where the CPU has AVX-512 or at a few
    rows, else float32 matmuls over chunks of K in which no sum can round."""
    if xq.shape[0] < FLOAT_INT8_MIN_ROWS or cpu_int8_gemm_is_fast():
        return torch._int_mm(xq, w.t())
    out = None
    for k0 in range(0, xq.shape[1], EXACT_FLOAT_K):
        part = (xq[:, k0:k0 + EXACT_FLOAT_K].float() @ w[:, k0:k0 + EXACT_FLOAT_K].float().t()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


# At a few rows a linear layer is a read of its weight, and cuBLAS's FP8 GEMM streams it well below the copy rate
# (issue 10: 2.4 TB/s at M=64 on an H200, where bf16 reaches 3.4). Up to this many rows the 8-bit weight runs
# through the weight-only kernel instead: codes converted to the activation dtype in registers, times the channel
# scale, activations not quantized (so more accurate than W8A8, not less). 0 turns it off.
WEIGHT_ONLY_MAX_T = int(os.environ.get("KILN_W8A8_WEIGHT_ONLY_MAX_T", "16"))
INT_MM_MIN_ROWS = 17      # cuBLAS int8 (torch._int_mm) needs M > 16
# torch._scaled_mm wants M a multiple of 16 in some versions, and cuBLAS picks its FP8 kernel by M: at row counts
# off a multiple of 128 it often picks a slower one than for the padded count (H100, benchmarks/kernels/
# fp8_gemm_rows.py, Llama-3-8B's four projections: 135 rows 178 us, padded to 256 rows 134; 431: 262 against 204;
# never more than ~1% slower). So the codes are padded with zero rows to a multiple of 128.
SCALED_MM_ROW_MULTIPLE = int(os.environ.get("KILN_FP8_GEMM_ROW_MULTIPLE", "128"))


# The kernels that produce a W8A8 layer's input (the norms, SwiGLU) write it as 8-bit codes and scales themselves
# (one kernel instead of two; a decode step of batch 135 on an H100 spent 8% of its GPU time in the separate
# quantization kernel, run AF). 0: they write bf16 and the layer quantizes (the same codes; for A/B timing).
FUSE_INPUT_QUANT = os.environ.get("KILN_FUSE_INPUT_QUANT", "1") != "0"


@dataclass(frozen=True)
class InputQuant:
    """How a W8A8 layer on CUDA takes an input of `rows` rows that arrives already quantized: a producer kernel
    (rmsnorm_quant, silu_and_mul_quant) writes `dtype` codes and row scales (or uses `static_scale`), rows up to
    `pad_rows` as zero codes for the GEMM."""
    rows: int
    dtype: torch.dtype
    static_scale: torch.Tensor | None
    pad_rows: int


@dataclass(frozen=True)
class QuantizedRows:
    """A W8A8 layer's input as 8-bit codes [>= rows, K] and float32 scales [same, 1]; out_dtype is the dtype the
    unquantized activations had (the layer's output dtype)."""
    codes: torch.Tensor
    scales: torch.Tensor
    rows: int
    out_dtype: torch.dtype


def producers_quantize_on(device: torch.device) -> bool:
    """Whether the producer kernels quantize a W8A8 layer's input on this device: CUDA (where the layer's own path
    is the Triton one; on CPU the reference path quantizes inside the layer)."""
    return device.type == "cuda"


def input_quant(rows: int, qweight: torch.Tensor | None, input_scale: torch.Tensor | None) -> InputQuant | None:
    """The InputQuant of a W8A8 layer (weights `qweight`) for an input of `rows` rows, or None where that layer
    would not quantize the input itself on CUDA (CPU, few rows, a shape cuBLAS does not take, rows longer than a
    producer's one tile)."""
    from kiln.kernels import HAS_TRITON
    if (not FUSE_INPUT_QUANT or qweight is None or not producers_quantize_on(qweight.device) or not HAS_TRITON
            or rows <= WEIGHT_ONLY_MAX_T
            or qweight.shape[0] % 16 or qweight.shape[1] % 16):
        return None
    from kiln.kernels.quant import ONE_TILE_MAX_K
    if qweight.shape[1] > ONE_TILE_MAX_K:  # the producers hold a row in registers
        return None
    return InputQuant(rows, qweight.dtype, input_scale, gemm_pad_rows(qweight.dtype, rows))


def gemm_pad_rows(code_dtype: torch.dtype, rows: int) -> int:
    """The rows an 8-bit GEMM of this code dtype runs on (codes quantized for it are zero past `rows`)."""
    return INT_MM_MIN_ROWS if code_dtype == torch.int8 else fp8_gemm_rows(rows)


def fp8_gemm_rows(rows: int) -> int:
    """The rows the FP8 GEMM runs on for `rows` rows of activations (zero codes past them)."""
    return -(-rows // SCALED_MM_ROW_MULTIPLE) * SCALED_MM_ROW_MULTIPLE


def _w8a8_kernels(x2, qweight, wscale, bias, input_scale):
    """The CUDA path on rows x2 [M, K]. It also runs on CPU tensors under Triton's interpreter (the tests do)."""
    from kiln import kernels
    m = x2.shape[0]
    if m <= WEIGHT_ONLY_MAX_T:
        return kernels.w8a16_matmul(x2, qweight, wscale, bias)
    if qweight.shape[0] % 16 or qweight.shape[1] % 16:
        # cuBLAS's 8-bit GEMMs want N and K multiples of 16 (every model projection is): the same codes and
        # scales, the products summed in float32
        xq, xs = kernels.quantize_activation(x2, qweight.dtype, input_scale)
        y = (xq.float() @ qweight.float().t()) * xs * wscale.float()[None, :]
        y = y.to(x2.dtype)
        return y if bias is None else y + bias
    xq, xs = kernels.quantize_activation(x2, qweight.dtype, input_scale, pad_rows=gemm_pad_rows(qweight.dtype, m))
    return w8a8_gemm(QuantizedRows(xq, xs, m, x2.dtype), qweight, wscale, bias)


def int8_gemm(xq: QuantizedRows, qweight: torch.Tensor) -> torch.Tensor:
    """The int8 product before its scales: int32 [codes' rows (>= 17), N] (cuBLAS through torch._int_mm)."""
    return torch._int_mm(xq.codes, qweight.t())


def w8a8_gemm(xq: QuantizedRows, qweight: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None
              ) -> torch.Tensor:
    """The GEMM of the CUDA W8A8 path on rows already quantized (codes padded as InputQuant says): [rows, N]."""
    from kiln import kernels
    m = xq.rows
    if qweight.dtype == torch.int8:
        return kernels.scale_int32(int8_gemm(xq, qweight), xq.scales, wscale, bias, xq.out_dtype, rows=m)
    # row-wise scales in cuBLAS's epilogue (bf16 output only); qweight.t() of a row-major [N, K] tensor is the
    # column-major B it wants
    fused_bias = bias if bias is not None and bias.dtype == torch.bfloat16 else None
    y = torch._scaled_mm(xq.codes, qweight.t(), scale_a=xq.scales, scale_b=wscale.float().reshape(1, -1),
                         bias=fused_bias, out_dtype=torch.bfloat16)[:m].to(xq.out_dtype)
    return y if bias is None or fused_bias is not None else y + bias


def w8a16_reference(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, qweight.to(x.dtype) * wscale.to(x.dtype)[:, None], bias)
