"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

from kiln.quantization import ops as qops


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessor count of the device (a small stand-in under the interpreter)."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def patch_interpreter() -> None:
    """Make Triton's CPU interpreter work with NumPy >= 2.3 (interpreter mode only).

    Triton 3.6's interpreter turns a scalar tensor into a Python int with
    int(ndarray), which NumPy 2.3+ refuses for arrays of one element but one dimension
    (a loaded scalar is one): `range(start, end)` over loaded bounds then fails. This
    swaps in `.item()`. A no-op outside interpreter mode or if the hook is gone.
    """
    if not interpreting():
        return
    try:
        from triton.runtime import interpreter as _interp
    except ImportError:  # pragma: no cover
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_kiln_patched", False):
        return

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    _patch_lang_tensor._kiln_patched = True
    _interp._patch_lang_tensor = _patch_lang_tensor
    _patch_fp8_downcast(_interp)


def _patch_fp8_downcast(_interp) -> None:
    """The interpreter's float -> float8e4nv cast (seen with Triton 3.9) rounds half up and drops the carry when
    rounding overflows the mantissa (124.8 becomes 64, not 128). This casts through torch instead: round to
    nearest even, saturated to +-448 as the GPU's cvt.rn.satfinite does. Other casts are left to the interpreter."""
    import numpy as np

    builder = _interp.InterpreterBuilder
    orig = builder.create_fp_to_fp
    if getattr(orig, "_kiln_patched", False):
        return
    wide = {tl.float32: np.float32, tl.float16: np.float16}

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        src_ty = src.dtype.scalar
        if dst_type.scalar != tl.float8e4nv or rounding_mode == _interp._ir.ROUNDING_MODE.RTZ:
            return orig(self, src, dst_type, rounding_mode)
        if src_ty == tl.bfloat16:  # stored as uint16: widen exactly first
            src = self.cast_impl(src, tl.float32)
            src_ty = tl.float32
        if src_ty not in wide:
            return orig(self, src, dst_type, rounding_mode)
        x = torch.from_numpy(np.ascontiguousarray(src.data.astype(np.float32)))
        codes = x.clamp(-FP8_MAX.value, FP8_MAX.value).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return _interp.TensorHandle(codes, dst_type.scalar)

    create_fp_to_fp._kiln_patched = True
    builder.create_fp_to_fp = create_fp_to_fp


# The KV cache kinds a kernel's KV_KIND constexpr takes (one home: kv_scale_args decides which a cache is);
# constexpr globals, so the kernels can compare against them by name
KV_FLOAT = tl.constexpr(0)  # compute dtype (bf16/fp16/fp32): no scales
KV_INT8 = tl.constexpr(1)   # int8 codes, float32 scales [num_blocks, block_size, kv_heads]: one per token and head
KV_FP8 = tl.constexpr(2)    # float8_e4m3fn codes, static float32 scales [kv_heads]: one per head (per layer)
FP8_MAX = tl.constexpr(qops.FP8_MAX)  # 448: largest finite E4M3 value


def kv_scale_args(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
    """(kind, k_scale, v_scale, scale strides (block, token, head)) for a kernel over the KV cache.

    int8: per-token-head float32 scales (same layout for K and V). fp8 (E4M3): static per-head float32 scales
    [kv_heads], so only the head stride is non-zero. A float cache passes the cache itself as an unused pointer."""
    if k_cache.dtype not in (torch.int8, torch.float8_e4m3fn):
        return KV_FLOAT.value, k_cache, k_cache, (0, 0, 0)
    name = "an int8" if k_cache.dtype == torch.int8 else "an fp8"
    assert k_scale is not None and v_scale is not None, f"{name} KV cache needs k_scale and v_scale"
    assert k_scale.dtype == torch.float32 and v_scale.dtype == torch.float32, f"{name} KV cache's scales are float32"
    assert k_scale.stride() == v_scale.stride()
    if k_cache.dtype == torch.int8:
        assert k_scale.shape == k_cache.shape[:3], "int8 KV scales are [num_blocks, block_size, kv_heads]"
        return KV_INT8.value, k_scale, v_scale, k_scale.stride()
    assert k_scale.shape == (k_cache.shape[2],) == v_scale.shape, "fp8 KV scales are [kv_heads]"
    return KV_FP8.value, k_scale, v_scale, (0, 0, k_scale.stride(0))
