"""skinny_matmul: y = x @ w.T (+ bias) for a bf16/fp16 weight and a few rows of x (decode at small batch).

With a few rows (T) a linear layer is a read of its weight. This runs the split-K tile kernel of w8a16.py on the
dense weight, K split until every SM has ~2 programs so that enough bytes are in flight. On an H200 it beats
cuBLAS by 2-7% on Llama-3-8B's projections and LM head at T=1 (qkv 18.4 vs 19.6 us, o 15.1 vs 16.2, LM head
240 vs 250; docs/kernels.md): ~0.13 ms of a 4.8 ms batch-1 step. The linear layers use it when `use_skinny`
says so.

Up to 64 rows the tile runs with its operands swapped (W x^T: 64 or 128 weight rows a program on the tensor
cores' wide side, the few activation rows on the narrow one, instead of rows padded to 64). On an H100 (runs AU and
AV, docs/kernels.md) that took the engine's bf16 decode step from 5.69 to 5.57 ms at batch 1 (against the plain
tile), and against cuBLAS from 7.05 to 6.65 ms at batch 16, 7.80 to 7.48 at 32, 8.46 to 8.18 at 48 and 9.09 to
8.89 at 64. Above 64 rows cuBLAS is as fast (run AU's sweep) and the 4-stage tiles outgrow shared memory.
KILN_SKINNY_SWAP=0 keeps the plain tile (the default up to run AV).

KILN_SKINNY_MAX_T sets the largest T it is used for (default 64; 0 turns it off).
"""

from __future__ import annotations

import os

import torch
import triton

from ._utils import interpreting, max_shared_mem, next_pow2, num_sms
from .w8a16 import SMALL_T, rows_and_out, small_m_matmul

MAX_T = int(os.environ.get("KILN_SKINNY_MAX_T", "64"))
# the swapped tile up to SMALL_T (64) rows, its narrow side: beyond, a 4-stage tile outgrows shared memory and
# cuBLAS is as fast (run AU); rows above it (with a larger KILN_SKINNY_MAX_T) take the plain tile
SWAP = os.environ.get("KILN_SKINNY_SWAP", "1") == "1"


def use_skinny(x: torch.Tensor, w: torch.Tensor) -> bool:
    t = x.numel() // max(1, x.shape[-1])
    return (0 < t <= MAX_T and x.is_cuda and w.dtype == x.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and w.stride(-1) == 1)


def swapped_config(M: int, N: int, K: int, device: torch.device) -> tuple | None:
    """The tile with its operands swapped (SWAP_AB: W x^T, 64 or 128 weight rows a program on the tensor cores' wide
    side, M <= SMALL_T activation rows padded to 16-64 on the narrow one), bf16/fp16 operands, or None where two
    stages do not fit the GPU's shared memory. Run AU's best tiles (H100, 16 and 32 rows) as a rule: 128 weight rows
    a program where those tiles alone fill the SMs (gate_up), else 64; K split while the grid covers under 70% of the
    SMs (o, down split in two; qkv's 96 tiles ran fastest unsplit); 4 stages where shared memory holds them (H100:
    192 KiB at 64 rows), fewer on smaller GPUs (A100: 3), then shorter K tiles. (8-bit weights lose on it: run AW,
    docs/kernels.md.)"""
    bm = max(16, next_pow2(M))
    sms = num_sms(device)
    bn = 128 if triton.cdiv(N, 128) >= sms else 64
    bk = min(128, max(32, next_pow2(K)))
    room = max_shared_mem(device) - 4096
    while room // ((bm + bn) * bk * 2) < 3 and bk > 32:
        bk //= 2
    stages = min(4, room // ((bm + bn) * bk * 2))
    if stages < 2:
        return None
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    split = 1
    while tiles * split < 0.7 * sms and K // (split * 2) >= 4 * bk:
        split *= 2
    return bm, bn, bk, split, 8 if bn * bm >= 128 * 64 else 4, stages, True


def skinny_config(M: int, N: int, K: int, device: torch.device, elem_bytes: int = 2) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, SWAP_AB) for operands of elem_bytes bytes (the
    kernel swaps bf16/fp16 ones only)."""
    bm = max(16, next_pow2(M))
    swap = SWAP and M <= SMALL_T and elem_bytes == 2
    if interpreting():
        return bm, 32, 32, (2 if K >= 128 else 1), 4, 1, swap
    if swap:
        cfg = swapped_config(M, N, K, device)
        if cfg:
            return cfg
    sms = num_sms(device)
    bk = min(128, max(32, next_pow2(K)))
    bn = 32
    tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
    split = 1
    # split K until each SM has ~2 programs (bytes in flight), none shorter than 4 tiles of K
    while tiles * split < 2 * sms and K // (split * 2) >= 4 * bk:
        split *= 2
    # H200 sweep (docs/kernels.md): unsplit wide weights (gate_up, LM head) want 3 stages (4: +26% on
    # gate_up), split ones 4-5; no more than shared memory holds (fp32, or rows past 64, on smaller GPUs)
    stages = 3 if split == 1 else 4
    room = max_shared_mem(device) - 4096
    while stages * (bm + bn) * bk * elem_bytes > room:
        if stages > 2:
            stages -= 1
        elif bk > 32:
            bk //= 2
        else:
            break
    return bm, bn, bk, split, 4, stages, False


def skinny_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  config: tuple | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K].T (+ bias [N]) -> [..., N], w in x's dtype. config overrides the tiles (tuning)."""
    K = x.shape[-1]
    N, Kw = w.shape
    assert Kw == K and w.dtype == x.dtype and w.stride(-1) == 1
    x2, out = rows_and_out(x, N)
    M = x2.shape[0]
    if M:
        small_m_matmul(x2, w, None, bias, out, config or skinny_config(M, N, K, x.device, x.element_size()))
    return out.view(*x.shape[:-1], N)
