"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import functools
import os

import torch
import triton
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


@functools.lru_cache(maxsize=None)
def _max_shared(index: int) -> int:
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def max_shared_mem(device: torch.device) -> int:
    """Bytes of shared memory a program may use (Triton's own limit; H100/H200 227 KiB, A100 163 KiB)."""
    if device.type != "cuda":
        return 227 * 1024
    return _max_shared(device.index if device.index is not None else torch.cuda.current_device())


_counters: dict[torch.device, torch.Tensor] = {}


def zeroed_counters(n: int, device: torch.device) -> torch.Tensor:
    """int32 zeros, at least n, one buffer per device: the arrival counters of kernels whose last program to finish
    a tile sums its partners' partial results (the split-K GEMV, decode attention's partitions). Each such kernel
    leaves its counters at zero, and kernels on a stream run one after another (under programmatic dependent launch
    too: they wait before touching them), so all share the buffer. Sized for the largest grids up front: a CUDA
    graph keeps the address it captured."""
    c = _counters.get(device)
    if c is None or c.numel() < n:
        c = _counters[device] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return c


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


# ---- launching, and the compiled variants a launch selects ------------------------------------------------------
#
# Triton compiles one binary per *variant* of a kernel: its constexpr values, its options (num_warps, num_stages),
# and for each other argument not in the kernel's do_not_specialize: a tensor's dtype and whether its address is
# 16-byte aligned, an int's width and whether it == 1 or is divisible by 16. A variant first met after ready compiles
# in the request's path. Every Kiln kernel launch goes through `launch`, so that a KernelVariants recorder sees the
# variant key of each launch, computed as Triton's JIT computes it and the same under TRITON_INTERPRET=1 (where
# nothing compiles): CI sees what a GPU would compile.

_recorders: list["KernelVariants"] = []


# ---- programmatic dependent launch (Hopper and later; on by default, KILN_PDL=0 turns it off) --------------------
#
# Every Kiln kernel takes a USE_GDC constexpr and starts with gdc_enter(USE_GDC). On an sm_90+ GPU, `launch` sets it
# and launches with Triton's launch_pdl: the kernel may then be scheduled while the one before it in the stream
# still runs (its launch and set-up overlap that kernel's tail: a batch-1 decode step is ~450 short kernels), and it
# waits for that kernel's results (griddepcontrol.wait) before touching any memory. Kernels that are not Kiln's
# (torch ops, cuBLAS) launch as always and wait for everything before them. Measured (H100, run O): batch 1
# W8A16 238.5 -> 247.8 tok/s, bf16 160.5 -> 166.4; the engine's GPU parity checks unchanged. Starting the weight
# GEMVs' first lines toward L2 before the wait made W8A16 slower (232.5) and was dropped.

@triton.jit
def gdc_enter(USE_GDC: tl.constexpr):
    """A kernel's first statement: under programmatic dependent launch, wait until the previous kernel's writes are
    visible, then let the next kernel be scheduled (it waits in turn). Nothing when USE_GDC is off."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def pdl_enabled() -> bool:
    """On a GPU of compute capability 9.0+ (not under the interpreter), with a Triton that has it (gdc_wait and
    launch_pdl: 3.6 has them), unless KILN_PDL=0. Read once per process, at the first launch (a launch's host cost
    stays one cached call)."""
    return (os.environ.get("KILN_PDL", "1") != "0" and not interpreting() and hasattr(tl.extra.cuda, "gdc_wait")
            and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), telling any active KernelVariants which variant it selects (one list check
    when none is active); with programmatic dependent launch on (pdl_enabled), kernels that take USE_GDC get it."""
    if pdl_enabled() and "USE_GDC" in _kernel_params(kernel)[2]:
        kwargs = {**kwargs, "USE_GDC": True, "launch_pdl": True}
    if _recorders:
        key = variant_key(kernel, args, kwargs)
        for rec in _recorders:
            rec.keys.add(key)
    return kernel[grid](*args, **kwargs)


class KernelVariants:
    """Records the variant key (`variant_key`) of every Kiln kernel launch while started: `with KernelVariants() as
    v: ...; v.keys`, or start() / stop() around a longer span."""

    def __init__(self):
        self.keys: set[tuple] = set()

    def start(self) -> "KernelVariants":
        if self not in _recorders:
            _recorders.append(self)
        return self

    def stop(self) -> None:
        if self in _recorders:
            _recorders.remove(self)

    def __enter__(self) -> "KernelVariants":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_params: dict[int, tuple] = {}


def _kernel_params(kernel) -> tuple:
    """(name, signature, {param: (is_constexpr, specialize, align)}) of a @triton.jit kernel, compiled (JITFunction)
    or interpreted (InterpretedFunction, which keeps the jit arguments in .kwargs)."""
    got = _params.get(id(kernel))
    if got is None:
        import inspect
        opts = getattr(kernel, "kwargs", None) or {}
        dns = getattr(kernel, "do_not_specialize", None) or opts.get("do_not_specialize") or ()
        dns_align = (getattr(kernel, "do_not_specialize_on_alignment", None)
                     or opts.get("do_not_specialize_on_alignment") or ())
        sig = inspect.signature(kernel.fn)
        kinds = {}
        for i, (name, p) in enumerate(sig.parameters.items()):
            ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            kinds[name] = ("constexpr" in ann, not (i in dns or name in dns), not (i in dns_align or name in dns_align))
        got = _params[id(kernel)] = (kernel.fn.__name__, sig, kinds)
    return got


def variant_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """(kernel name, ((constexpr, value), ...), ((argument, specialization), ...), ((option, value), ...)): what
    selects the compiled binary of this launch (Triton's JITFunction.run key). A non-constexpr argument's
    specialization is Triton's own (native_specialize_impl): "*fp16:D" (a 16-byte aligned fp16 tensor), "i32:D"
    (divisible by 16), "i32", "=1" (an int equal to 1 becomes a constant); none for do_not_specialize arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    name, sig, kinds = _kernel_params(kernel)
    params = {k: v for k, v in kwargs.items() if k in kinds}
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in kinds))
    bound = sig.bind(*args, **params)
    bound.apply_defaults()
    constexprs, specs = [], []
    for arg, value in bound.arguments.items():
        is_constexpr, specialize, align = kinds[arg]
        if is_constexpr:
            constexprs.append((arg, value))
            continue
        ty, attr = native_specialize_impl(BaseBackend, value, False, specialize, align)
        specs.append((arg, f"={attr}" if ty == "constexpr" else ty + (":D" if attr == "D" else "")))
    return name, tuple(constexprs), tuple(specs), options


def describe_variant(key: tuple, like: tuple | None = None) -> str:
    """A variant key as text; with `like` (another variant of the same kernel), only what differs from it."""
    name, constexprs, specs, options = key
    fields = [f"{k}={v}" for k, v in constexprs] + [f"{k}: {v}" for k, v in specs] + [f"{k}={v}" for k, v in options]
    if like is not None:
        _, c2, s2, o2 = like
        old = set(f"{k}={v}" for k, v in c2) | set(f"{k}: {v}" for k, v in s2) | set(f"{k}={v}" for k, v in o2)
        fields = [f for f in fields if f not in old]
    return f"{name}({', '.join(fields)})"
