"""rmsnorm and fused_add_rmsnorm: one row per program, the whole row in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import gdc_enter, launch, next_pow2


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    H, eps,
    BLOCK: tl.constexpr, ADD: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    gdc_enter(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, out, res_out):
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    T = x2.shape[0]
    if T == 0:
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
    launch(_rmsnorm_kernel, (T,),
        x2, r2, weight, o2, ro2,
        x2.stride(0), rs, o2.stride(0), ros,
        H, float(eps),
        BLOCK=block, ADD=residual is not None, num_warps=warps,
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
