"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import functools
import os

import torch


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


def kv_scale_args(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
    """(quant, k_scale, v_scale, scale strides) for a kernel over the KV cache: an int8 cache needs its float32
    per-token-head scales (same layout for K and V); a float cache passes the cache itself as an unused pointer."""
    if k_cache.dtype != torch.int8:
        return False, k_cache, k_cache, (0, 0, 0)
    assert k_scale is not None and v_scale is not None, "an int8 KV cache needs k_scale and v_scale"
    assert k_scale.dtype == torch.float32 and k_scale.stride() == v_scale.stride()
    return True, k_scale, v_scale, k_scale.stride()
