"""Every Triton kernel variant that a representative set of launches selects compiles for a Hopper GPU (sm_90),
here, without one.

Triton's interpreter (how CI runs the kernels) executes a kernel's Python and so accepts code that the compiler
rejects: run J (H100, 2026-12-06) failed 109 kernel tests on one such kernel (branches returning int8 and E4M3
from one function). So the launches below run under the interpreter with a KernelVariants recorder (the variant
keys that a GPU would compile: kiln/kernels/_utils.py), and a subprocess without the interpreter compiles each
distinct variant ahead of time, through ptxas, for sm_90 (Triton ships its own ptxas; no driver is needed), with
the GPUs' Triton 3.6 where scripts/setup.sh installed it (.venv/triton-gpu), else the Triton installed here (this
check caught run J's failure with 3.9). Takes ~20 s.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.kernels.kernel_env import INTERP

pytestmark = pytest.mark.skipif(not INTERP, reason="the GPU kernel tests compile every variant they launch")

from kiln import kernels as K  # noqa: E402
from kiln.kernels._utils import KernelVariants  # noqa: E402

FP8 = torch.float8_e4m3fn
# the Triton the GPU machines run (3.6), installed by scripts/setup.sh beside the local one where there is no GPU:
# the local Triton accepts code that 3.6 rejects (a float literal below float32's normal range is an fp64 constant
# to 3.6: the nucleus kernel, 2026-12-06), so the compiler runs with 3.6 where it is there
GPU_TRITON = Path(__file__).parents[2] / ".venv" / "triton-gpu"


def _launch_every_kernel():
    """Each kernel with each storage type a model can give it: bf16 / fp16 activations, bf16 / int8 / fp8 KV
    caches, int8 / E4M3 weights, int8 / E4M3 activation codes (static and dynamic, short and long rows)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype)

    for dt in (torch.bfloat16, torch.float16):
        x, w = rand(3, 64, dtype=dt), rand(64, dtype=dt)
        K.rmsnorm(x, w, 1e-6)
        K.fused_add_rmsnorm(x.clone(), x.clone(), w, 1e-6)
        K.silu_and_mul(rand(3, 128, dtype=dt))
        q, k = rand(3, 4, 64, dtype=dt), rand(3, 2, 64, dtype=dt)
        K.rotary_embedding(torch.arange(3), q, k, torch.randn(16, 64, generator=g))
        K.skinny_matmul(rand(2, 256, dtype=dt), rand(96, 256, dtype=dt))
        # the swapped tile (KILN_SKINNY_SWAP=1) at a GPU-sized config: W x^T, 64 weight rows a program
        K.skinny_matmul(rand(2, 256, dtype=dt), rand(96, 256, dtype=dt), config=(16, 64, 128, 1, 4, 4, True))
    # mixtures of experts: routing (with a padded row), the alignment program, both GEMM tiles, float and int8
    from kiln.kernels.moe import align_pairs, fused_moe, moe_route
    for dt in (torch.bfloat16, torch.float16):
        moe_route(rand(5, 8, dtype=dt), 2, False)
        weights, ids = moe_route(rand(5, 8, dtype=dt), 2, True, torch.tensor([0, 1, 2, 3, -1]))
        moe_route(rand(5, 8, dtype=dt), 2, True, torch.tensor([0, 1, 2, 3, -1]), (4, 4))  # an expert-parallel rank
        align_pairs(ids, 8, 16, use_kernel=True)
        x, w13, w2 = rand(5, 64, dtype=dt), rand(8, 96, 64, dtype=dt), rand(8, 64, 48, dtype=dt)
        c13, c2 = w13.clamp(-1, 1).mul(100).to(torch.int8), w2.clamp(-1, 1).mul(100).to(torch.int8)
        for tile in ((16, 64, 64, 4, 3), (64, 128, 64, 4, 3)):  # moe_config's on a GPU
            fused_moe(x, w13, w2, weights, ids, config=tile)
            fused_moe(x, w13, w2, weights, ids, config=tile, shared=(rand(5, 64, dtype=dt), rand(5, 1, dtype=dt)))
            fused_moe(x, c13, c2, weights, ids, config=tile, scales=(torch.rand(8, 96), torch.rand(8, 64)))
    blocks, bs, hkv, d, hq = 6, 16, 2, 64, 4
    for kv in (torch.bfloat16, torch.int8, FP8):
        kc = torch.zeros(blocks, bs, hkv, d).to(kv)
        vc = torch.zeros_like(kc)
        if kv == torch.int8:
            ks, vs = torch.ones(blocks, bs, hkv), torch.ones(blocks, bs, hkv)
        elif kv == FP8:
            ks, vs = torch.ones(hkv), torch.ones(hkv)
        else:
            ks = vs = None
        K.reshape_and_cache(rand(5, hkv, d), rand(5, hkv, d), kc, vc, torch.arange(5), ks, vs)
        for dt in (torch.bfloat16, torch.float16):  # with RoPE, from the model's activations
            cos_sin = torch.randn(16, d, generator=g)
            K.rope_and_cache(torch.arange(5), rand(5, hq, d, dtype=dt), rand(5, hkv, d, dtype=dt),
                             rand(5, hkv, d, dtype=dt), kc, vc, torch.arange(5), cos_sin, ks, vs)
        tables = torch.arange(blocks, dtype=torch.int32).reshape(2, 3)
        lens = torch.tensor([40, 7], dtype=torch.int32)
        for part in (None, 32):  # one pass, and flash-decoding partitions merged by the last program
            K.paged_decode_attention(rand(2, hq, d), kc, vc, tables, lens, 0.125, ks, vs, partition_size=part)
        if kv != torch.bfloat16:  # at the GPU's tile: int8 Q.K^T (config's 4th field), V widened as loaded (5th),
            # the products swapped (6th), each with partitions merged and not
            for qk8, wide, swap in ((True, False, False), (False, True, False), (True, True, False),
                                    (False, True, True), (False, False, True)):
                for part in (None, 32):
                    K.paged_decode_attention(rand(2, hq, d, dtype=torch.bfloat16), kc, vc, tables, lens, 0.125, ks,
                                             vs, partition_size=part, config=(128, 4, 3, qk8, wide, swap))
        K.paged_prefill_attention(rand(10, hq, d), kc, vc, tables, torch.tensor([0, 3, 10], dtype=torch.int32),
                                  lens, 0.125, 7, ks, vs)
    for code in (torch.int8, FP8):
        wq = rand(96, 256).clamp(-1, 1).mul(100).to(torch.int8) if code == torch.int8 else rand(96, 256).to(FP8)
        ws = torch.rand(96, generator=g)
        for m in (1, 5, 40):  # the GEMV (int16 activations for int8 codes, fp16 for E4M3), small-M, large-M
            K.w8a16_matmul(rand(m, 256), wq, ws, None)
        K.w8a16_silu_and_mul(rand(1, 256), wq, ws)  # the gate/up GEMV that applies SwiGLU
        for k_len in (200, 20000):  # one tile, and the two-loop path
            x = rand(3, k_len)
            K.quantize_activation(x, code)
            K.quantize_activation(x, code, torch.tensor([0.02]))
        for dt in (torch.bfloat16, torch.float16):  # the producers of a W8A8 layer's input, quantizing as they write
            for static in (None, torch.tensor([0.02])):
                x = rand(3, 64, dtype=dt)
                K.rmsnorm_quant(x, rand(64, dtype=dt), 1e-6, code, static, 17)
                K.rmsnorm_quant(x, rand(64, dtype=dt), 1e-6, code, static, 17, residual=x.clone())
                K.silu_and_mul_quant(rand(3, 256, dtype=dt), code, static, 16)
                acc = torch.randint(-100, 100, (17, 256), dtype=torch.int32)  # the int8 GEMM's, scaled in the kernel
                K.silu_and_mul_quant(acc, code, static, 17, rows=5,
                                     int32_scales=(torch.rand(17, 1, generator=g), torch.rand(256, generator=g), dt))
    x = torch.randn(3, 3000, generator=g)
    K.top_p_threshold(x, torch.tensor([0.5, 0.9, 1.0]), torch.tensor([float("-inf"), 0.0, float("-inf")]))
    acc = torch.randint(-100, 100, (17, 96), dtype=torch.int32)
    for bias in (None, rand(96)):
        K.scale_int32(acc, torch.rand(17, 1, generator=g), torch.rand(96, generator=g), bias, torch.bfloat16, 5)


_COMPILER = textwrap.dedent('''
    import importlib, pickle, pkgutil, sys
    import triton
    print("triton", triton.__version__)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import kiln.kernels
    kernels = {}
    for mod in pkgutil.iter_modules(kiln.kernels.__path__):
        m = importlib.import_module("kiln.kernels." + mod.name)
        for obj in vars(m).values():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                kernels[obj.fn.__name__] = obj
    failed = 0
    for name, constexprs, specs, options in pickle.load(open(sys.argv[1], "rb")):
        fn = kernels[name]
        signature, consts, attrs = {}, dict(constexprs), {}
        for arg, spec in specs:
            if spec.startswith("="):  # an int equal to 1: a constant
                consts[arg] = int(spec[1:])
                continue
            ty, _, aligned = spec.partition(":")
            signature[arg] = ty
            if aligned:
                attrs[(fn.arg_names.index(arg),)] = [["tt.divisibility", 16]]
        for arg in consts:
            signature[arg] = "constexpr"
        signature = {a: signature[a] for a in fn.arg_names}
        try:
            k = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options=dict(options))
            if consts.get("USE_GDC") and "griddepcontrol.wait" not in k.asm["ptx"]:
                raise AssertionError("USE_GDC=True compiled without griddepcontrol.wait")
            if name == "_decode_kernel":  # V's widening: E4M3 pairs by cvt, int8 by byte permutes
                want = consts.get("WIDE_V") and ("cvt.rn.f16x2.e4m3x2" if consts["KV_KIND"] == 2 else "prmt.b32")
            else:
                want = "cvt.rn.f16x2.e4m3x2" if consts.get("E4M3") else "dp2a"
            if consts.get("MAGIC") and want and want not in k.asm["ptx"]:
                raise AssertionError(f"{name} compiled without {want}")
        except Exception as e:
            failed += 1
            print(f"FAILED {name} {dict(constexprs)} {dict(options)}: {type(e).__name__}: {str(e)[:600]}")
    sys.exit(1 if failed else 0)
''')


def test_every_kernel_variant_compiles_for_hopper(tmp_path):
    with KernelVariants() as v:
        _launch_every_kernel()
    names = {k[0] for k in v.keys}
    assert {"_quant_rows_kernel", "_scale_int32_kernel", "_w8a16_kernel", "_decode_kernel",
            "_prefill_kernel", "_reshape_and_cache_kernel", "_rope_and_cache_kernel", "_rmsnorm_kernel",
            "_rope_kernel", "_top_p_threshold_kernel", "_route_kernel", "_align_kernel", "_moe_gemm_kernel",
            "_moe_sum_kernel"} <= names, names
    # and one variant of each kernel as a GPU launches it: programmatic dependent launch (KILN_PDL=1: USE_GDC,
    # launch_pdl), and the GEMV's inline PTX (MAGIC; plain operations under the interpreter)
    on_gpu = {"USE_GDC": True, "MAGIC": True}
    gdc = {}
    for name, constexprs, specs, options in sorted(v.keys, key=repr):
        # the GEMV's PTX differs by code type and SwiGLU epilogue: one of each
        key = (name, dict(constexprs).get("E4M3")) + (("glu",) if dict(constexprs).get("GLU") else ())
        if any(k == "USE_GDC" for k, _ in constexprs) and key not in gdc:
            gdc[key] = (name, tuple((k, on_gpu.get(k, x)) for k, x in constexprs), specs,
                        options + (("launch_pdl", True),))
    assert {("_w8_gemv_kernel", e4m3) + glu for e4m3 in (False, True) for glu in ((), ("glu",))} <= set(gdc), \
        sorted(gdc)
    for e4m3 in (False, True):  # and the GEMV that loads its first weights before the wait (KILN_W8_GEMV_EARLY=1)
        name, constexprs, specs, options = gdc[("_w8_gemv_kernel", e4m3)]
        gdc[("_w8_gemv_kernel", e4m3, "early")] = (
            name, tuple((k, True if k == "EARLY_W" else x) for k, x in constexprs), specs, options)
    assert {"_w8a16_kernel", "_decode_kernel", "_rmsnorm_kernel", "_rope_kernel"} <= {k[0] for k in gdc}, sorted(gdc)
    # the decode kernel's widened V as a GPU runs it: inline PTX (MAGIC; recorded here as byte operations), two
    # stages (the interpreter runs one)
    wide = [(name, tuple((k, True if k == "MAGIC" else x) for k, x in constexprs), specs,
             tuple((k, 2 if k == "num_stages" else x) for k, x in options))
            for name, constexprs, specs, options in sorted(v.keys, key=repr) if ("WIDE_V", True) in constexprs]
    assert len(wide) >= 3, wide
    variants = sorted(v.keys, key=repr) + list(gdc.values()) + wide
    env = {k: x for k, x in os.environ.items() if k != "TRITON_INTERPRET"}
    gpu_triton = (GPU_TRITON / "triton" / "__init__.py").exists()
    if gpu_triton:  # the GPUs' Triton, where scripts/setup.sh installed it
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GPU_TRITON), env.get("PYTHONPATH")) if p)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile every variant, cached or not
    procs = []  # two compilers, half the variants each: the CI machine's two cores (25 s in one, 2026-12-06)
    for half in (0, 1):
        keys = tmp_path / f"variants{half}.pkl"
        keys.write_bytes(pickle.dumps(variants[half::2]))
        procs.append(subprocess.Popen([sys.executable, "-c", _COMPILER, str(keys)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parents[2]))
    results = [(p.communicate(timeout=900), p.returncode) for p in procs]
    for (out, err), code in results:
        assert code == 0, f"{len(variants)} variants; failures:\n{out[-6000:]}\n{err[-3000:]}"
        if gpu_triton:
            assert out.startswith("triton 3.6."), out[:200]
