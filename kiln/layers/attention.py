"""Attention over the paged KV cache, behind a small backend interface.

Layout (shared with the Triton kernels): per layer K and V of [num_blocks, block_size, kv_heads, head_dim],
or int8 with float32 scales [num_blocks, block_size, kv_heads] (symmetric, per token and head),
or fp8 (E4M3) with static float32 scales [kv_heads] (per layer and head, from the checkpoint or 1.0).
A token's slot is block_id * block_size + offset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kiln.quantization import ops as qops


@dataclass
class AttentionMetadata:
    """What one step's attention needs; built by the model runner."""

    slot_mapping: torch.Tensor      # [T] int64: cache slot of each new token (-1: padding)
    block_tables: torch.Tensor      # [B, max_blocks] int32
    seq_lens: torch.Tensor          # [B] int32: context length incl. this step's tokens
    query_start_loc: torch.Tensor   # [B+1] int32
    seq_lens_list: list[int]
    query_lens_list: list[int]
    max_query_len: int
    max_seq_len: int
    # leading rows with one query token (decodes, or a last one-token prefill chunk): in a mixed step the
    # Triton backend runs them through the decode kernel, which reads each KV head once per GQA group
    num_decode_rows: int = 0

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


class LayerKVCache:
    """One layer's K/V blocks (views into the engine's single cache allocation)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None):
        self.k, self.v, self.k_scale, self.v_scale = k, v, k_scale, v_scale

    @property
    def is_int8(self) -> bool:
        return self.k.dtype == torch.int8

    @property
    def is_fp8(self) -> bool:
        return self.k.dtype == torch.float8_e4m3fn


def quantize_int8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H, D] -> int8 values and float32 scales [T, H]."""
    scale = x.float().abs().amax(dim=-1).clamp(min=1e-8) / 127.0
    q = torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class TorchAttention:
    """Reference backend in plain PyTorch: runs anywhere, the yardstick for the Triton kernels."""

    name = "torch"

    def write_kv(self, cache: LayerKVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        nb, bs, h, d = cache.k.shape
        valid = slot_mapping >= 0
        if not bool(valid.all()):
            k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
        kf, vf = cache.k.view(nb * bs, h, d), cache.v.view(nb * bs, h, d)
        if cache.is_int8:
            kq, ks = quantize_int8_per_head(k)
            vq, vs = quantize_int8_per_head(v)
            kf.index_copy_(0, slot_mapping, kq)
            vf.index_copy_(0, slot_mapping, vq)
            cache.k_scale.view(nb * bs, h).index_copy_(0, slot_mapping, ks)
            cache.v_scale.view(nb * bs, h).index_copy_(0, slot_mapping, vs)
        elif cache.is_fp8:
            # as bytes: index_copy_ has no float8 kernel on CPU
            kf.view(torch.uint8).index_copy_(0, slot_mapping, qops.to_codes(k, cache.k_scale[:, None], kf.dtype)
                                             .view(torch.uint8))
            vf.view(torch.uint8).index_copy_(0, slot_mapping, qops.to_codes(v, cache.v_scale[:, None], vf.dtype)
                                             .view(torch.uint8))
        else:
            kf.index_copy_(0, slot_mapping, k.to(kf.dtype))
            vf.index_copy_(0, slot_mapping, v.to(vf.dtype))

    def _gather(self, cache: LayerKVCache, block_row: torch.Tensor, n: int, dtype: torch.dtype):
        nb, bs, h, d = cache.k.shape
        nblk = (n + bs - 1) // bs
        blocks = block_row[:nblk].long()
        k = cache.k[blocks].reshape(nblk * bs, h, d)[:n]
        v = cache.v[blocks].reshape(nblk * bs, h, d)[:n]
        if cache.is_int8:
            k = k.float() * cache.k_scale[blocks].reshape(nblk * bs, h)[:n, :, None]
            v = v.float() * cache.v_scale[blocks].reshape(nblk * bs, h)[:n, :, None]
        elif cache.is_fp8:
            k, v = k.float() * cache.k_scale[:, None], v.float() * cache.v_scale[:, None]
        return k.float(), v.float()

    def _decode_slots(self, meta: AttentionMetadata, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache slots of every decode row's context [B, S] (padded with slot 0) and the padding mask [B, 1, 1, S];
        worked out once per step (every layer gets the same metadata object) and shared by all layers."""
        if self._slots_for is not meta:
            s = meta.max_seq_len
            pos = torch.arange(s, device=meta.block_tables.device)
            blocks = meta.block_tables.long().gather(1, (pos // block_size).expand(len(meta.seq_lens_list), -1))
            valid = pos[None, :] < meta.seq_lens.long()[:, None]
            self._slots = torch.where(valid, blocks * block_size + pos % block_size, 0)
            self._mask = valid[:, None, None, :]
            self._slots_for = meta
        return self._slots, self._mask

    _slots_for = None

    def _decode(self, q: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Every row one query token: one gather of all rows' K/V and one SDPA call (instead of a Python loop
        with per-row gathers and float32 copies: the CPU decode step's largest host cost)."""
        nb, bs, h, d = cache.k.shape
        slots, mask = self._decode_slots(meta, bs)
        k = cache.k.view(nb * bs, h, d)[slots]            # [B, S, Hkv, D]
        v = cache.v.view(nb * bs, h, d)[slots]
        if cache.is_int8:
            k = k.to(q.dtype) * cache.k_scale.view(nb * bs, h)[slots][..., None].to(q.dtype)
            v = v.to(q.dtype) * cache.v_scale.view(nb * bs, h)[slots][..., None].to(q.dtype)
        elif cache.is_fp8:
            k = k.to(q.dtype) * cache.k_scale[:, None].to(q.dtype)
            v = v.to(q.dtype) * cache.v_scale[:, None].to(q.dtype)
        o = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
            enable_gqa=q.shape[1] != h)                    # [B, Hq, 1, D]
        return o[:, :, 0, :]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
                meta: AttentionMetadata, scale: float, rope=None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (this step's tokens) -> [T, Hq, D]. rope: (a RotaryEmbedding, positions [T])
        where q and k are still to be rotated (the Triton backend does it as it writes the cache)."""
        if rope is not None:
            q, k = rope[0](rope[1], q, k)
        self.write_kv(cache, k, v, meta.slot_mapping)
        if meta.decode_only and not q.is_cuda:
            return self._decode(q, cache, meta, scale)
        out = torch.empty_like(q)
        start = 0
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            if qlen == 0:
                continue
            kb, vb = self._gather(cache, meta.block_tables[b], slen, q.dtype)      # [S, Hkv, D]
            # float32 SDPA (on CPU a fused kernel: a 1,600-token prefill of SmolLM2's 30 layers took ~4 s through
            # materialized scores and ~0.5 s here); the query rows are the context's last qlen positions
            causal = None
            if qlen > 1 and qlen != slen:
                causal = torch.arange(slen, device=q.device)[None, :] <= torch.arange(slen - qlen, slen,
                                                                                      device=q.device)[:, None]
            ob = torch.nn.functional.scaled_dot_product_attention(
                q[start:start + qlen].float().transpose(0, 1)[None], kb.transpose(0, 1)[None],
                vb.transpose(0, 1)[None], attn_mask=causal, is_causal=qlen > 1 and qlen == slen, scale=scale,
                enable_gqa=q.shape[1] != kb.shape[1])                                # [1, Hq, Q, D]
            out[start:start + qlen] = ob[0].transpose(0, 1).to(q.dtype)
            start += qlen
        return out


# RoPE in the cache write's kernel (one kernel a layer fewer; KILN_FUSED_ROPE=0: separate kernels, for A/B runs)
FUSED_ROPE = os.environ.get("KILN_FUSED_ROPE", "1") != "0"


class TritonAttention(TorchAttention):
    """GPU backend: the Triton kernels of kiln/kernels (same cache layout, same metadata)."""

    name = "triton"

    def __init__(self):
        from kiln import kernels
        self.k = kernels

    def write_kv(self, cache, k, v, slot_mapping):
        self.k.reshape_and_cache(k, v, cache.k, cache.v, slot_mapping, cache.k_scale, cache.v_scale)

    def forward(self, q, k, v, cache, meta, scale, rope=None):
        if rope is not None and not FUSED_ROPE:
            q, k = rope[0](rope[1], q, k)
            rope = None
        if rope is None:
            self.write_kv(cache, k, v, meta.slot_mapping)
        else:  # one kernel: RoPE on q, and on k as it goes into the cache
            self.k.rope_and_cache(rope[1], q, k, v, cache.k, cache.v, meta.slot_mapping, rope[0].cos_sin_cache,
                                  cache.k_scale, cache.v_scale)
        # max_seq_len (host-known, None in a CUDA graph: the table's width bounds it) sizes the decode partitions
        if meta.decode_only:
            return self.k.paged_decode_attention(q, cache.k, cache.v, meta.block_tables, meta.seq_lens, scale,
                                                 cache.k_scale, cache.v_scale, max_seq_len=meta.max_seq_len)
        nd = meta.num_decode_rows
        if nd == 0:
            return self.k.paged_prefill_attention(q, cache.k, cache.v, meta.block_tables, meta.query_start_loc,
                                                  meta.seq_lens, scale, meta.max_query_len,
                                                  cache.k_scale, cache.v_scale)
        # mixed step: the decode rows through the decode kernel (the prefill kernel's grid is per q head, so it
        # would read their KV once per q head), the rest through the prefill kernel
        out = torch.empty_like(q)
        self.k.paged_decode_attention(q[:nd], cache.k, cache.v, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                                      cache.k_scale, cache.v_scale, max_seq_len=max(meta.seq_lens_list[:nd]),
                                      out=out[:nd])
        self.k.paged_prefill_attention(q[nd:], cache.k, cache.v, meta.block_tables[nd:],
                                       meta.query_start_loc[nd:] - nd, meta.seq_lens[nd:], scale, meta.max_query_len,
                                       cache.k_scale, cache.v_scale, out=out[nd:])
        return out


def make_attention_backend(name: str, device: torch.device):
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttention()
    if name == "triton":
        return TritonAttention()
    raise ValueError(f"unknown attention backend {name!r} (torch | triton | auto)")
