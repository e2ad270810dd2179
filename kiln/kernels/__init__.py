"""Triton GPU kernels of Kiln's fast path, and their plain PyTorch references.

Kernels (each in its own module, each a Python function on torch tensors):
    reshape_and_cache (and rope_and_cache: RoPE as well), paged_decode_attention, paged_prefill_attention,
    rmsnorm, fused_add_rmsnorm (and rmsnorm_quant: the output as a W8A8 layer's 8-bit input), rotary_embedding,
    silu_and_mul (and silu_and_mul_quant), w8a16_matmul (and w8a16_silu_and_mul, the
    two at once), skinny_matmul,
    quantize_activation and scale_int32 (W8A8), top_p_threshold (the sampler's nucleus cut), fused_moe and moe_route (a
    mixture of experts' feed-forward and its router's top k).

`kiln.kernels.reference` holds float32 PyTorch versions of all of them and needs no
Triton. When Triton is not installed, HAS_TRITON is False and the kernel names here are
bound to the references, so callers keep working (slowly) on CPU-only installs.

Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is first imported) runs
the kernels on CPU tensors; the tests use it to cover the kernels without a GPU.
"""

from . import reference

try:  # pragma: no cover - depends on the install
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

if HAS_TRITON:
    from ._utils import patch_interpreter

    patch_interpreter()

    from .activation import silu_and_mul, silu_and_mul_quant
    from .cache import reshape_and_cache, rope_and_cache
    from .decode_attention import paged_decode_attention
    from .moe import fused_moe, moe_route
    from .prefill_attention import paged_prefill_attention
    from .quant import quantize_activation, scale_int32
    from .rmsnorm import fused_add_rmsnorm, rmsnorm, rmsnorm_quant
    from .rotary import rotary_embedding
    from .sampling import top_p_threshold
    from .skinny import skinny_matmul, use_skinny
    from .w8a16 import dequantize_int8_weight, w8a16_matmul, w8a16_silu_and_mul
else:  # pragma: no cover
    from .reference import (  # noqa: F401
        fused_add_rmsnorm,
        paged_decode_attention,
        paged_prefill_attention,
        reshape_and_cache,
        rmsnorm,
        rope_and_cache,
        rotary_embedding,
        silu_and_mul,
        skinny_matmul,
        top_p_threshold,
        w8a16_matmul,
    )

    def use_skinny(x, w):
        return False

    def moe_route(logits, top_k, renormalize, slot_mapping=None, experts=None):
        from kiln.layers.moe import route
        return route(logits, top_k, renormalize, slot_mapping, experts)

    def fused_moe(x, w13, w2, weights, ids, config=None, scales=None, shared=None):
        from kiln.layers.moe import experts_reference
        out = experts_reference(x, w13, w2, weights, ids, scales)
        return out if shared is None else out + shared[1].sigmoid() * shared[0]

    def w8a16_silu_and_mul(x, w_int8, w_scale, bias=None, config=None):
        return silu_and_mul(w8a16_matmul(x, w_int8, w_scale, bias))

    def dequantize_int8_weight(w_int8, w_scale, dtype):
        return (w_int8.float() * w_scale.float()[:, None]).to(dtype)

    def quantize_activation(x, dtype, static_scale=None, pad_rows=0):
        import torch

        from kiln.quantization.ops import quantize_activation as quantize
        codes, scales = quantize(x, dtype, static_scale)
        pad = max(0, pad_rows - x.shape[0])
        return (torch.cat([codes, torch.zeros(pad, x.shape[1], device=x.device).to(dtype)]),
                torch.cat([scales, torch.ones(pad, 1, device=x.device)]))

    def rmsnorm_quant(x, weight, eps, dtype, static_scale=None, pad_rows=0, residual=None):
        y, res = (rmsnorm(x, weight, eps), None) if residual is None else fused_add_rmsnorm(x, residual, weight, eps)
        return (*quantize_activation(y.reshape(-1, x.shape[-1]), dtype, static_scale, pad_rows), res)

    def silu_and_mul_quant(x, dtype, static_scale=None, pad_rows=0, rows=None, int32_scales=None):
        x = x[:rows] if rows is not None else x
        if int32_scales is not None:
            x = scale_int32(x, int32_scales[0], int32_scales[1], None, int32_scales[2])
        y = silu_and_mul(x)
        return quantize_activation(y.reshape(-1, y.shape[-1]), dtype, static_scale, pad_rows)

    def scale_int32(acc, row_scale, channel_scale, bias, out_dtype, rows=None):
        rows = acc.shape[0] if rows is None else rows
        y = acc[:rows].float() * row_scale[:rows] * channel_scale.float()[None, :]
        return (y if bias is None else y + bias.float()).to(out_dtype)

__all__ = [
    "HAS_TRITON",
    "reference",
    "reshape_and_cache",
    "rope_and_cache",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rmsnorm",
    "fused_add_rmsnorm",
    "rmsnorm_quant",
    "rotary_embedding",
    "silu_and_mul",
    "silu_and_mul_quant",
    "w8a16_matmul",
    "w8a16_silu_and_mul",
    "skinny_matmul",
    "use_skinny",
    "dequantize_int8_weight",
    "quantize_activation",
    "scale_int32",
    "top_p_threshold",
]
