"""top_p_threshold: each row's top-p (nucleus) cut as a logit value, without sorting the vocabulary.

A row's nucleus is the smallest set of its highest logits whose probability reaches top_p (ties at the last one
kept). Sorting every row for it (torch.sort + cumsum) took 1.6 ms a step at 64 rows of Llama-3's 128,256 and
5.2 ms at 256 rows on an H100 (run Q): the seed's default sampling (temperature 0.95, top_p 0.7) paid it on every
step. The cut is the largest logit t whose mass at and above it, sum(exp(x - max) for x >= t), reaches
top_p * total. This kernel finds it by a search over the float's bits (mapped to integers that order as the floats
do): each pass over the row weighs PIVOTS candidate cuts at once and keeps the interval between the last one that
reaches the target and the first that does not, until it is one value wide (~8 passes at 16 pivots). One program
per row; rows are independent. `floor` restricts each row to logits >= it first (top-k's k-th value, or -inf).

kiln.kernels.reference.top_p_threshold is the same cut by sorting (CPU, and the tests' reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import gdc_enter, launch, num_sms

PIVOTS = 16
# (BLOCK, num_warps). Run U (H100, 128,256 columns): (512, 8) 0.800 / 1.352 ms at 64 / 256 rows, (2048, 16) 0.586 /
# 1.429: with fewer rows than SMs a program must keep more loads in flight itself.
MANY_ROWS_CONFIG = (512, 8)
FEW_ROWS_CONFIG = (2048, 16)


@triton.jit
def _flip(bits):
    """A float32's bits (as int32) <-> an int32 that orders as the floats do: negative floats' magnitude bits
    flipped. Its own inverse."""
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key(x):
    return _flip(x.to(tl.int32, bitcast=True))


@triton.jit
def _top_p_threshold_kernel(x_ptr, top_p_ptr, floor_ptr, out_ptr, V, stride_x,
                            BLOCK: tl.constexpr, PIVOTS: tl.constexpr, USE_GDC: tl.constexpr = False):
    gdc_enter(USE_GDC)
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    top_p = tl.load(top_p_ptr + row)
    floor = tl.load(floor_ptr + row)
    offs = tl.arange(0, BLOCK)
    # the row's largest allowed logit and its total mass in one pass, each lane keeping its own running max and
    # sum (one reduction at the end, not one per block: run R's per-block reductions made the search 1.3 ms at 64
    # rows on an H100)
    m_lane = tl.full([BLOCK], float("-inf"), tl.float32)
    z_lane = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):
        x = tl.load(base + v0 + offs, mask=v0 + offs < V, other=float("-inf"))
        x = tl.where(x >= floor, x, float("-inf"))
        m_new = tl.maximum(m_lane, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with nothing yet adds nothing
        z_lane = z_lane * tl.exp(m_lane - m_safe) + tl.exp(x - m_safe)
        m_lane = m_new
    m = tl.max(m_lane, axis=0)
    total = tl.sum(tl.where(m_lane == float("-inf"), 0.0, z_lane * tl.exp(m_lane - m)), axis=0)
    target = top_p * total
    # invariant: the mass at and above key `lo` reaches the target, at and above `hi` it does not. Below
    # t = m + log((1 - top_p) * total / V) lies at most V * e^(t - m) = (1 - top_p) * total of the mass, so the cut
    # is at or above t (one e lower, for rounding): the search starts a few units below the max, not at -inf
    bound = m + tl.log(tl.maximum((1.0 - top_p) * total / V, 1e-30)) - 1.0  # (1e-38 is an fp64 literal to Triton 3.6)
    lo = _key(tl.where(top_p < 1.0, tl.maximum(floor, bound), floor)).to(tl.int64)  # top_p 1: every logit
    hi = _key(m).to(tl.int64) + 1
    j = tl.arange(0, PIVOTS).to(tl.int64) + 1
    while hi - lo > 1:
        piv = lo + ((hi - lo) * j) // (PIVOTS + 1)  # the top one < hi; lo <= all
        piv32 = piv.to(tl.int32)  # keys fit int32; the width (hi - lo) * j does not
        acc = tl.zeros([BLOCK, PIVOTS], tl.float32)  # per lane and pivot, summed once after the pass
        for v0 in range(0, V, BLOCK):
            x = tl.load(base + v0 + offs, mask=v0 + offs < V, other=float("-inf"))
            e = tl.where(x >= floor, tl.exp(x - m), 0.0)
            acc += tl.where(_key(x)[:, None] >= piv32[None, :], e[:, None], 0.0)
        mass = tl.sum(acc, axis=0)
        ok = mass >= target  # a prefix of the pivots (mass only falls as the cut rises)
        lo = tl.max(tl.where(ok, piv, lo), axis=0)
        hi = tl.min(tl.where(ok, hi, piv), axis=0)
    tl.store(out_ptr + row, _flip(lo.to(tl.int32)).to(tl.float32, bitcast=True))


def top_p_threshold(logits: torch.Tensor, top_p: torch.Tensor, floor: torch.Tensor,
                    config: tuple | None = None) -> torch.Tensor:
    """logits [B, V] float32, top_p [B] float32 in (0, 1], floor [B] float32 (-inf: none) -> [B] float32: each
    row's nucleus is its logits >= the returned value (logits below its floor never count). config: (BLOCK,
    num_warps), for benchmarks (a wider block: more loads in flight a thread, more accumulator registers)."""
    assert logits.dtype == torch.float32 and logits.stride(-1) == 1
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B:
        if config is None:
            config = FEW_ROWS_CONFIG if B < num_sms(logits.device) else MANY_ROWS_CONFIG
        block, warps = config  # [BLOCK, PIVOTS] float32 accumulators: 32 or 64 registers a thread
        launch(_top_p_threshold_kernel, (B,), logits, top_p, floor, out, V, logits.stride(0),
               BLOCK=block, PIVOTS=PIVOTS, num_warps=warps)
    return out
