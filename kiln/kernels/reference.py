"""Plain PyTorch reference implementations of the fast-path kernels.

Every function here does its arithmetic in float32 (or float64 where noted) and
is written for clarity, not speed. The Triton kernels in this package are tested
against these functions (tests/kernels/test_kernels.py), and the engine may fall
back to them where Triton is not available (CPU).

Data layouts (shared with the Triton kernels):
- k_cache / v_cache: [num_blocks, block_size, num_kv_heads, head_dim], dtype =
  compute dtype, or int8 with k_scale / v_scale float32 [num_blocks, block_size,
  num_kv_heads] (symmetric, x ~= q * scale, scale = absmax / 127), or float8_e4m3fn
  with static k_scale / v_scale float32 [num_kv_heads] (x ~= code * scale[head]; codes
  as kiln.quantization.ops.to_codes writes them: x / scale clamped to +-448, cast).
- slot = block_id * block_size + offset; slot -1 = padding (skipped).
- block_tables int32 [B, max_blocks_per_seq]; seq_lens int32 [B] (context length
  including this step's tokens); query_start_loc int32 [B + 1].
"""

from __future__ import annotations

import torch

from kiln.quantization import ops as qops

__all__ = [
    "quantize_int8",
    "reshape_and_cache",
    "rope_and_cache",
    "gather_kv",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rmsnorm",
    "fused_add_rmsnorm",
    "rotary_embedding",
    "silu_and_mul",
    "w8a16_matmul",
]


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row (last dim) int8 quantization: x ~= q * scale.

    scale = absmax / 127 (0 for an all-zero row); q = floor(x * 127 / absmax + 0.5)
    clamped to [-127, 127] (the same rounding the Triton kernel uses).
    """
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    scale = absmax / 127.0
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    q = torch.floor(xf * inv.unsqueeze(-1) + 0.5).clamp_(-127, 127).to(torch.int8)
    return q, scale


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """Write key/value [T, Hkv, D] into the paged caches at slot_mapping (in place)."""
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    valid = slots >= 0
    slots = slots[valid]
    blk = slots // block_size
    off = slots % block_size
    key = key[valid]
    value = value[valid]
    if k_cache.dtype == torch.int8:
        kq, ks = quantize_int8(key)
        vq, vs = quantize_int8(value)
        k_cache[blk, off] = kq
        v_cache[blk, off] = vq
        k_scale[blk, off] = ks
        v_scale[blk, off] = vs
    elif k_cache.dtype == torch.float8_e4m3fn:
        k_cache[blk, off] = qops.to_codes(key, k_scale[:, None], k_cache.dtype)
        v_cache[blk, off] = qops.to_codes(value, v_scale[:, None], v_cache.dtype)
    else:
        k_cache[blk, off] = key.to(k_cache.dtype)
        v_cache[blk, off] = value.to(v_cache.dtype)


def gather_kv(cache, scale, block_table_row, seq_len):
    """Contiguous float32 [seq_len, Hkv, D] view of one sequence's cached K or V."""
    block_size = cache.shape[1]
    nblk = (seq_len + block_size - 1) // block_size
    blocks = block_table_row[:nblk].long()
    x = cache[blocks].reshape(-1, cache.shape[2], cache.shape[3])[:seq_len].float()
    if cache.dtype == torch.int8:
        s = scale[blocks].reshape(-1, cache.shape[2])[:seq_len].float()
        x = x * s.unsqueeze(-1)
    elif cache.dtype == torch.float8_e4m3fn:
        x = x * scale.float()[:, None]
    return x


def _attend(q, k, v, scale, q_pos):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] float32; causal by absolute positions q_pos [Lq]."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    k_pos = torch.arange(k.shape[0], device=q.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                           k_scale=None, v_scale=None, **_):
    """q [B, Hq, D] (one token per sequence, at position seq_len - 1) -> [B, Hq, D]."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        L = int(seq_lens[b])
        k = gather_kv(k_cache, k_scale, block_tables[b], L)
        v = gather_kv(v_cache, v_scale, block_tables[b], L)
        pos = torch.tensor([L - 1], device=q.device)
        out[b] = _attend(q[b:b + 1], k, v, scale, pos)[0].to(q.dtype)
    return out


def paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                            max_query_len=None, k_scale=None, v_scale=None, **_):
    """Varlen causal attention with a cached prefix; q [T, Hq, D] -> [T, Hq, D]."""
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    for b in range(len(qsl) - 1):
        s, e = qsl[b], qsl[b + 1]
        if e == s:
            continue
        L = int(seq_lens[b])
        k = gather_kv(k_cache, k_scale, block_tables[b], L)
        v = gather_kv(v_cache, v_scale, block_tables[b], L)
        pos = torch.arange(L - (e - s), L, device=q.device)
        out[s:e] = _attend(q[s:e], k, v, scale, pos).to(q.dtype)
    return out


def rmsnorm(x, weight, eps):
    xf = x.float()
    var = xf.pow(2).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps) * weight.float()).to(x.dtype)


def fused_add_rmsnorm(x, residual, weight, eps):
    """new_residual = x + residual (float32 sum, cast to x.dtype);
    out = rmsnorm(new_residual) * weight. Returns (out, new_residual)."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rmsnorm(new_residual, weight, eps), new_residual


def rotary_embedding(positions, q, k, cos_sin_cache):
    """Neox / HF rotate_half style RoPE, in place on q [T, Hq, D] and k [T, Hkv, D]."""
    d = q.shape[-1]
    cs = cos_sin_cache[positions.long()].float()
    cos = cs[:, None, : d // 2]
    sin = cs[:, None, d // 2:]
    for x in (q, k):
        xf = x.float()
        x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
        x.copy_(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype))
    return q, k


def rope_and_cache(positions, q, key, value, k_cache, v_cache, slot_mapping, cos_sin_cache, k_scale=None,
                   v_scale=None):
    """RoPE on q (in place) and on a copy of key, which is written to the cache with value."""
    k = key.clone()
    rotary_embedding(positions, q, k, cos_sin_cache)
    reshape_and_cache(k, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def silu_and_mul(x):
    i = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :i]) * xf[..., i:]).to(x.dtype)


def w8a16_matmul(x, w_int8, w_scale, bias=None):
    y = (x.float() @ w_int8.float().t()) * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def skinny_matmul(x, w, bias=None):
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def top_p_threshold(logits, top_p, floor):
    """Each row's top-p cut by sorting (kiln.kernels.sampling's definition): its logits >= the returned value are
    the smallest set of its highest logits (those >= floor) whose probability reaches top_p, ties kept."""
    x = logits.float().masked_fill(logits < floor[:, None], float("-inf"))
    vals = x.sort(dim=-1, descending=True).values
    e = (vals - vals[:, :1]).exp()
    before = e.cumsum(dim=-1) - e                       # mass above each sorted position
    kept = (before < top_p[:, None] * e.sum(dim=-1, keepdim=True)).sum(dim=-1).clamp(min=1)
    return vals.gather(1, (kept - 1)[:, None])[:, 0]
