"""Rotary position embedding (Hugging Face "rotate_half" layout), incl. llama3 / linear scaling."""
from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        # [max_pos, head_dim]: cos of the D/2 frequencies, then sin (the layout the Triton kernel reads)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, Hq, D], k [T, Hkv, D] -> rotated (in place on CUDA, copies on CPU)."""
        if q.is_cuda:
            from kiln.kernels import rotary_embedding
            rotary_embedding(positions, q, k, self.cos_sin_cache)
            return q, k
        return self.rotate(positions, q), self.rotate(positions, k)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """CPU: x [T, H, D] rotated, out of place, in x's dtype (as Hugging Face does). The cos/sin rows of a
        step's positions are gathered once and shared by every layer (they all get the same positions)."""
        if self._cos_sin_for is not positions or self._cos.dtype != x.dtype:
            cs = self.cos_sin_cache.index_select(0, positions).to(x.dtype)
            half = self.head_dim // 2
            self._cos = cs[:, None, :half].repeat(1, 1, 2)
            self._sin = cs[:, None, half:].repeat(1, 1, 2)
            self._cos_sin_for = positions
        half = x.shape[-1] // 2
        return torch.addcmul(x * self._cos, torch.cat([-x[..., half:], x[..., :half]], dim=-1), self._sin)

    _cos_sin_for = None
    _cos = torch.empty(0)
