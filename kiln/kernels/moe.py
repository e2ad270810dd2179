"""fused_moe: a mixture-of-experts feed-forward on the GPU, every expert of a step in two grouped GEMMs.

The step's (token, expert) pairs are sorted by expert and each expert's run padded to BLOCK_M rows (`align_pairs`,
torch ops of static shapes: no host sync, so decode steps stay inside CUDA graphs). A program of the GEMM takes one
block of rows, all of one expert, and multiplies them by that expert's weight: an expert's bytes are read once per
block of its tokens, the rows gathered from the activations by index on the way in (no permuted copy). First GEMM:
x rows by w13 (gate and up) into [pairs, 2I]; then silu_and_mul; second GEMM: by w2, each row scaled by its router
weight, into [pairs, hidden] float32; the k rows of each token summed.

A CUDA graph's padded rows (slot -1) route to no expert (id E, weight 0): they read no expert's weights and sum to
zero.

Blocks past the last expert's run load nothing (their K loop has no iterations).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._utils import interpreting, launch, next_pow2
from .activation import silu_and_mul


@triton.jit(do_not_specialize=["T"])
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, slots_ptr, T, E, FIRST, LOCAL, stride_l, TOP_K: tl.constexpr,
                  K_P2: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_SLOTS: tl.constexpr, BLOCK_E: tl.constexpr):
    # one token: softmax over its experts' logits in float32, then the top k one at a time (the lowest index
    # among equal probabilities), their weights rescaled to sum to one where asked; a padded row (slot < 0): no
    # expert. Ids are written as this rank's (experts FIRST..FIRST + LOCAL; another rank's or none: LOCAL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + row * stride_l + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = tl.where(offs < E, p / tl.sum(p, 0), -1.0)
    slots = tl.arange(0, K_P2)
    top_w = tl.zeros((K_P2,), dtype=tl.float32)
    top_i = tl.zeros((K_P2,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, offs, BLOCK_E), 0)
        top_w = tl.where(slots == j, best, top_w)
        top_i = tl.where(slots == j, idx, top_i)
        p = tl.where(offs == idx, -1.0, p)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, 0)
    if HAS_SLOTS:
        padded = tl.load(slots_ptr + row) < 0
        top_w = tl.where(padded, 0.0, top_w)
        top_i = tl.where(padded, E, top_i)
    top_i = top_i - FIRST
    top_i = tl.where((top_i >= 0) & (top_i < LOCAL), top_i, LOCAL)
    tl.store(weights_ptr + row * TOP_K + slots, top_w, mask=slots < TOP_K)
    tl.store(ids_ptr + row * TOP_K + slots, top_i, mask=slots < TOP_K)


def moe_route(logits: torch.Tensor, top_k: int, renormalize: bool, slot_mapping: torch.Tensor | None = None,
              experts: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """kiln.layers.moe.route in one kernel: (weights [T, k] float32, expert ids [T, k] int32). slot_mapping [T]
    (the step's KV slots): rows whose slot is < 0, a CUDA graph's padding, get no expert and weight 0. experts
    (first, count): expert parallelism's local range; ids come as local ones, count for another rank's or none
    (without: all E experts, E for none)."""
    t, e = logits.shape
    first, local = experts if experts is not None else (0, e)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    if t:
        launch(_route_kernel, (t,), logits, weights, ids, slot_mapping if slot_mapping is not None else ids, t, e,
               first, local, logits.stride(0), TOP_K=top_k, K_P2=next_pow2(top_k), RENORMALIZE=renormalize,
               HAS_SLOTS=slot_mapping is not None, BLOCK_E=next_pow2(e), num_warps=4)
    return weights, ids


def align_pairs(ids: torch.Tensor, num_experts: int, block_m: int, use_kernel: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs [P] int32, block_expert [P / block_m] int32) for expert ids [T, k]: pairs lists the flat pair indices
    (t * k + j) grouped by expert, each group padded with the sentinel T * k to a multiple of block_m; block_expert
    says each block's expert (num_experts: past the end). Pairs of id num_experts (padded rows) are left out. P is static in T: at most T * k pairs, and at most
    min(E, T * k) groups each padded by under block_m. On a GPU, up to ALIGN_KERNEL_MAX_PAIRS pairs, one Triton
    program computes the same (use_kernel: that program on any device, for the tests)."""
    flat = ids.reshape(-1)
    n = flat.numel()
    groups = min(num_experts, n)
    p = triton.cdiv(n + groups * (block_m - 1), block_m) * block_m
    if n <= ALIGN_KERNEL_MAX_PAIRS and ids.device.type != "cpu" or use_kernel:
        return _align_pairs_kernel(ids, num_experts, block_m, p)
    flat = flat.long()  # moe_route's ids are int32; scatter_add_ indexes with int64
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device).scatter_add_(0, flat,
                                                                                            torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts] = 0  # the padded rows' bin holds no run
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank_in_expert = torch.arange(n, device=ids.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    dest = torch.where(expert_of < num_experts, (ends - padded)[expert_of] + rank_in_expert, p)
    pairs = torch.full((p + 1,), n, dtype=torch.int32, device=ids.device)  # [p]: where the padded rows' pairs go
    pairs[dest] = order.to(torch.int32)
    pairs = pairs[:p]
    ends = ends[:num_experts]
    starts = torch.arange(0, p, block_m, device=ids.device)
    block_expert = torch.searchsorted(ends, starts, right=True).to(torch.int32)
    return pairs, block_expert


# up to this many pairs a step (decode, short prefills) the pairs are aligned by one Triton program instead of ~15
# torch ops: a CUDA graph's node costs ~1.5-2 us however small its kernel, and a MoE layer would otherwise spend
# more on those nodes than on reading its experts at batch 1 (KILN_MOE_ALIGN=torch keeps the torch ops everywhere)
ALIGN_KERNEL_MAX_PAIRS = 4096 if os.environ.get("KILN_MOE_ALIGN", "triton") == "triton" else 0
ALIGN_CHUNK = 64


@triton.jit(do_not_specialize=["n"])
def _align_kernel(ids_ptr, pairs_ptr, block_expert_ptr, n, P, E, BLOCK_M: tl.constexpr, BINS: tl.constexpr,
                  CHUNK: tl.constexpr):
    # one program: align_pairs' result for n pairs. BINS > E: masked lanes and padded rows' pairs (id E) count in
    # bin E, which is never used.
    bins = tl.arange(0, BINS)
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros((BINS,), dtype=tl.int32)
    for c in range(0, n, CHUNK):
        e = tl.load(ids_ptr + c + lanes, mask=c + lanes < n, other=E).to(tl.int32)
        counts += tl.histogram(e, BINS)
    counts = tl.where(bins < E, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    for b in range(0, P // BLOCK_M, CHUNK):  # a block's expert: how many experts' runs end at or before it
        first = (b + lanes) * BLOCK_M
        expert = tl.sum(((ends[None, :] <= first[:, None]) & (bins[None, :] < E)).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b + lanes, expert, mask=b + lanes < P // BLOCK_M)
    for c in range(0, P, CHUNK):
        tl.store(pairs_ptr + c + lanes, tl.full((CHUNK,), 0, tl.int32) + n, mask=c + lanes < P)
    tl.debug_barrier()  # the sentinels land before the pairs that overwrite some of them
    seen = tl.zeros((BINS,), dtype=tl.int32)  # pairs of each expert placed so far
    earlier = lanes[:, None] > lanes[None, :]
    for c in range(0, n, CHUNK):
        e = tl.load(ids_ptr + c + lanes, mask=c + lanes < n, other=E).to(tl.int32)
        live = e < E
        same = e[:, None] == bins[None, :]
        base = tl.sum(tl.where(same, (starts + seen)[None, :], 0), axis=1)
        before = tl.sum(((e[:, None] == e[None, :]) & earlier).to(tl.int32), axis=1)
        tl.store(pairs_ptr + base + before, c + lanes, mask=live)
        seen += tl.histogram(e, BINS)


def _align_pairs_kernel(ids: torch.Tensor, num_experts: int, block_m: int, p: int):
    n = ids.numel()
    pairs = torch.empty(p, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(p // block_m, dtype=torch.int32, device=ids.device)
    launch(_align_kernel, (1,), ids.reshape(-1), pairs, block_expert, n, p, num_experts, BLOCK_M=block_m,
           BINS=next_pow2(num_experts + 1), CHUNK=ALIGN_CHUNK, num_warps=4)
    return pairs, block_expert


# the pairs' count changes with traffic: not specialized on, so no variant compiles after warm-up (docs/kernels.md)
@triton.jit(do_not_specialize=["num_pairs"])
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, pairs_ptr, block_expert_ptr, weight_ptr, scale_ptr, num_pairs, N, K, E,
                     stride_am, stride_be, stride_bn, stride_cm, ROWS_PER_A: tl.constexpr, SCALE_ROWS: tl.constexpr,
                     INT8_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # c[pair] = a[pair // ROWS_PER_A] @ b[expert].T (* weight[pair]) for the pairs of this block; b [E, N, K];
    # INT8_B: b holds int8 codes, widened to a's dtype in registers, scale [E, N] applied after the K loop
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    pair = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    live = pair < num_pairs
    a_row = tl.where(live, pair // ROWS_PER_A, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + tl.minimum(expert, E - 1).to(tl.int64) * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    steps = tl.where(expert < E, tl.cdiv(K, BLOCK_K), 0)
    for i in range(0, steps):
        k_left = K - i * BLOCK_K
        a = tl.load(a_ptrs, mask=live[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        if INT8_B:
            b = b.to(a_ptr.dtype.element_ty)
        acc += tl.dot(a, b, input_precision="ieee")
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if INT8_B:
        acc *= tl.load(scale_ptr + tl.minimum(expert, E - 1) * N + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if SCALE_ROWS:
        acc *= tl.load(weight_ptr + pair, mask=live, other=0.0)[:, None]
    c_ptrs = c_ptr + tl.where(live, pair, 0).to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=live[:, None] & (offs_n[None, :] < N))


def moe_config(pairs: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): 16-row blocks while most experts get a few rows (decode),
    64 once a step's pairs are many per expert."""
    if interpreting():
        return 16, 32, 32, 4, 1
    bm = 16 if pairs <= 1024 else 64
    return bm, 64 if bm == 16 else 128, 64, 4, 3


def moe_gemm(a: torch.Tensor, w: torch.Tensor, pairs: torch.Tensor, block_expert: torch.Tensor, num_pairs: int,
             out: torch.Tensor, rows_per_a: int, weights: torch.Tensor | None, config: tuple,
             scale: torch.Tensor | None = None) -> torch.Tensor:
    bm, bn, bk, warps, stages = config
    e, n, k = w.shape
    assert w.stride(2) == 1 and a.stride(1) == 1 and out.stride(1) == 1
    assert (scale is not None) == (w.dtype == torch.int8)
    grid = (block_expert.numel(), triton.cdiv(n, bn))
    launch(_moe_gemm_kernel, grid, a, w, out, pairs, block_expert, weights if weights is not None else out,
           scale if scale is not None else out, num_pairs, n, k, e, a.stride(0), w.stride(0), w.stride(1),
           out.stride(0), ROWS_PER_A=rows_per_a, SCALE_ROWS=weights is not None, INT8_B=scale is not None,
           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _moe_sum_kernel(rows_ptr, ids_ptr, out_ptr, shared_ptr, shared_gate_ptr, H, E, TOP_K: tl.constexpr,
                    HAS_SHARED: tl.constexpr, BLOCK_H: tl.constexpr):
    # out[t] = sum_j rows[t * k + j] over the pairs routed to an expert (a padded row's: none, so zero), in out's
    # dtype: the pairs a GEMM never wrote are never read. HAS_SHARED (Qwen2-MoE): + sigmoid(gate[t]) * shared[t]
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    if HAS_SHARED:
        g = tl.sigmoid(tl.load(shared_gate_ptr + t).to(tl.float32))
        acc += g * tl.load(shared_ptr + t * H + offs, mask=offs < H, other=0.0).to(tl.float32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + t * TOP_K + j)
        acc += tl.load(rows_ptr + (t * TOP_K + j) * H + offs, mask=(offs < H) & (offs * 0 + expert < E), other=0.0)
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < H)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              config: tuple | None = None, scales: tuple[torch.Tensor, torch.Tensor] | None = None,
              shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) -> [T, hidden] in x's dtype. x [T, hidden]; w13 [E, 2I,
    hidden] (gate rows, then up rows); w2 [E, hidden, I]; weights [T, k] float32; ids [T, k] (E: no expert, a
    padded row's). scales: int8 weights' per-channel scales ([E, 2I], [E, hidden] float32). shared: a shared
    expert's output [T, hidden] and its gate's logits [T, 1], added as sigmoid(gate) * output in the final sum."""
    s13, s2 = scales if scales is not None else (None, None)
    t, k = ids.shape
    e, two_i, hidden = w13.shape
    n = t * k
    if n == 0:
        return x.new_zeros(t, hidden)
    if shared is not None:
        assert shared[0].is_contiguous() and shared[1].numel() == t
    cfg = config or moe_config(n, two_i, hidden)
    pairs, block_expert = align_pairs(ids, e, cfg[0])
    gate_up = moe_gemm(x, w13, pairs, block_expert, n, x.new_empty(n, two_i), k, None, cfg, s13)
    act = silu_and_mul(gate_up)
    rows = moe_gemm(act, w2, pairs, block_expert, n, torch.empty(n, hidden, dtype=torch.float32, device=x.device), 1,
                    weights.reshape(-1).float().contiguous(), cfg, s2)
    out = x.new_empty(t, hidden)
    block_h = min(1024, next_pow2(hidden))
    launch(_moe_sum_kernel, (t, triton.cdiv(hidden, block_h)), rows, ids.contiguous(), out,
           shared[0] if shared is not None else out, shared[1].contiguous() if shared is not None else out, hidden, e,
           TOP_K=k, HAS_SHARED=shared is not None, BLOCK_H=block_h, num_warps=4)
    return out
