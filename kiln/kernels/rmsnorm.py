"""rmsnorm and fused_add_rmsnorm: one row per program, the whole row in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import gdc_enter, launch, next_pow2
from .quant import quant_constants, codes_and_scales, store_row_codes


# T (the live rows) changes with traffic: not specialized on, so no variant compiles after warm-up (docs/kernels.md)
@triton.jit(do_not_specialize=['T'])
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, static_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    T, H, eps,
    BLOCK: tl.constexpr, ADD: tl.constexpr,
    QUANT: tl.constexpr = False, INT8: tl.constexpr = False, QMAX: tl.constexpr = 0.0, STATIC: tl.constexpr = False,
    USE_GDC: tl.constexpr = False,
):
    # QUANT: out is a W8A8 layer's input, 8-bit codes + a scale per row (scale_ptr); rows T.. of the grid are its
    # padding: zero codes, nothing else written
    gdc_enter(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    live = offs < tl.where(row < T, H, 0)  # padding rows load nothing
    x = tl.load(x_ptr + row * stride_x + offs, mask=live, other=0.0).to(tl.float32)
    if ADD:
        r = tl.load(res_ptr + row * stride_r + offs, mask=live, other=0.0).to(tl.float32)
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, s, mask=live)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    if QUANT:
        # rounded to the activation dtype first, as the unfused norm's output is (a GPU may round a few values one
        # ulp apart from the plain kernel: tests/kernels/test_w8a8.py)
        y = tl.where(live, y.to(x_ptr.dtype.element_ty).to(tl.float32), 0.0)  # padding: +0, not 0 * -w
        store_row_codes(y, offs, mask, out_ptr + row * stride_o, scale_ptr, static_ptr, row, INT8, QMAX, STATIC)
    else:
        tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, out, res_out, quant=None):
    """quant: None, or (scales, static scale or None, dtype, rows of the grid) with out the codes"""
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    T = x2.shape[0]
    grid_rows = T if quant is None else quant[3]
    if grid_rows == 0:
        return
    o2 = out.view(-1, H)
    block = next_pow2(H)
    assert block <= 65536, "rmsnorm: hidden size too large for one tile"
    warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    if residual is not None:
        r2 = residual.reshape(-1, H)
        ro2 = res_out.view(-1, H)
        assert r2.stride(-1) == 1 and ro2.stride(-1) == 1
        rs, ros = r2.stride(0), ro2.stride(0)
    else:
        r2 = ro2 = x2
        rs = ros = 0
    assert x2.stride(-1) == 1 and o2.stride(-1) == 1 and weight.is_contiguous()
    extra, scales, static = {}, weight, weight
    if quant is not None:
        scales, static_scale, dtype, _ = quant
        consts, static = quant_constants(dtype, static_scale, x.device)
        extra = dict(QUANT=True, **consts)
        static = scales if static is None else static
    launch(_rmsnorm_kernel, (grid_rows,),
        x2, r2, weight, o2, ro2, scales, static,
        x2.stride(0), rs, o2.stride(0), ros,
        T, H, float(eps),
        BLOCK=block, ADD=residual is not None, num_warps=warps, **extra,
    )


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """out = x * rsqrt(mean(x^2) + eps) * weight over the last dim (float32 math)."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual (float32 sum, cast to the residual dtype);
    out = rmsnorm(new_residual) * weight. Returns (out, new_residual). With inplace=True,
    out is written into x and new_residual into residual (each row is read before it is
    written, by the same program)."""
    assert x.shape == residual.shape
    if inplace:
        out, res_out = x, residual
    else:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res_out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    _launch(x, residual, weight, eps, out, res_out)
    return out, res_out


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype,
                  static_scale: torch.Tensor | None = None, pad_rows: int = 0,
                  residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """rmsnorm (fused_add_rmsnorm with residual) whose output is a W8A8 layer's input: returns (codes
    [max(T, pad_rows), H] of dtype, scales [same rows, 1] float32, new_residual or None), quantize_activation's
    arithmetic on the norm's output rounded to x's dtype, rows past T zero codes. One kernel instead of two."""
    H = x.shape[-1]
    T = x.numel() // H
    codes, scales = codes_and_scales(max(T, pad_rows), H, dtype, x.device)
    res_out = None
    if residual is not None:
        assert x.shape == residual.shape
        res_out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    _launch(x, residual, weight, eps, codes, res_out, quant=(scales, static_scale, dtype, codes.shape[0]))
    return codes, scales, res_out
