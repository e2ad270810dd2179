"""The decode kernel's main loop in sm_90 SASS, without a GPU: compiles _decode_kernel for Hopper at the decode8
shape (Llama-3-8B heads: GQA group 4, head 128; block size 64; one partition a sequence) with Triton's own ptxas and
nvdisasm, and prints the instruction count of the loop over 128-token tiles and its most frequent opcodes. The
8-bit decode kernel is bound by its instructions, not its bytes (it takes the same time on an H100 and an H200:
docs/kernels.md), so this count is a cheap first check of a kernel change.

    PYTHONPATH=.venv/triton-gpu:. .venv/bin/python benchmarks/kernels/sass_loop.py fp8 128,4,2,0,1
    PYTHONPATH=.venv/triton-gpu:. .venv/bin/python benchmarks/kernels/sass_loop.py prefill int8 64,128,4,2

(.venv/triton-gpu: the GPUs' Triton 3.6, which scripts/setup.sh installs beside the local one.) Config: BLOCK_N,
warps, stages, int8 Q.K^T (int8 only), V widened as loaded.
"""
from __future__ import annotations

import re
import sys
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kiln.kernels._utils import KV_FLOAT, KV_FP8, KV_INT8
from kiln.kernels.decode_attention import _decode_kernel


def compile_decode(kind: str, block_n: int, warps: int, stages: int, qk8: bool, wide: bool, swap: bool = False,
                   group_pad: int = 16):
    fn = _decode_kernel
    cache = {"fp8": "*fp8e4nv", "int8": "*i8", "bf16": "*bf16"}[kind]
    sig = dict(q_ptr="*bf16", k_cache_ptr=cache, v_cache_ptr=cache, k_scale_ptr="*fp32", v_scale_ptr="*fp32",
               block_tables_ptr="*i32", seq_lens_ptr="*i32", out_ptr="*bf16", part_out_ptr="*fp32",
               part_m_ptr="*fp32", part_l_ptr="*fp32", count_ptr="*i32", qk_scale="fp32")
    for a in fn.arg_names:
        if a.startswith("stride_") or a in ("num_partitions", "partition"):
            sig[a] = "i32"
    consts = dict(GROUP=4, GROUP_PAD=group_pad, HEAD_DIM=128, BLOCK_SIZE=64, BLOCK_N=block_n,
                  KV_KIND={"fp8": KV_FP8, "int8": KV_INT8, "bf16": KV_FLOAT}[kind].value, DIRECT=True, FP32=False,
                  INT8_QK=qk8 and kind == "int8", WIDE_V=wide and kind != "bf16", MAGIC=True, USE_GDC=False,
                  SWAP=swap)
    for c in consts:
        sig[c] = "constexpr"
    sig = {a: sig[a] for a in fn.arg_names}
    # what the launch's specialization gives: 16-byte-aligned pointers and strides divisible by 16
    aligned = [a for a in fn.arg_names if a.endswith("_ptr") and a not in ("block_tables_ptr", "seq_lens_ptr")]
    aligned += ["stride_qb", "stride_qh", "stride_cb", "stride_ct", "stride_ch", "stride_ob", "stride_oh"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def compile_prefill(kind: str, block_m: int, block_n: int, warps: int, stages: int):
    """The prefill kernel at Llama-3-8B heads, block size 64, bf16 q."""
    from kiln.kernels.prefill_attention import _prefill_kernel as fn
    cache = {"fp8": "*fp8e4nv", "int8": "*i8", "bf16": "*bf16"}[kind]
    sig = dict(q_ptr="*bf16", k_cache_ptr=cache, v_cache_ptr=cache, k_scale_ptr="*fp32", v_scale_ptr="*fp32",
               block_tables_ptr="*i32", query_start_loc_ptr="*i32", seq_lens_ptr="*i32", out_ptr="*bf16",
               qk_scale="fp32")
    for a in fn.arg_names:
        if a.startswith("stride_"):
            sig[a] = "i32"
    consts = dict(GROUP=4, HEAD_DIM=128, BLOCK_SIZE=64, BLOCK_M=block_m, BLOCK_N=block_n,
                  KV_KIND={"fp8": KV_FP8, "int8": KV_INT8, "bf16": KV_FLOAT}[kind].value, FP32=False,
                  USE_GDC=False)
    for c in consts:
        sig[c] = "constexpr"
    sig = {a: sig[a] for a in fn.arg_names}
    aligned = [a for a in fn.arg_names if a.endswith("_ptr") and a not in ("block_tables_ptr", "query_start_loc_ptr",
                                                                            "seq_lens_ptr")]
    aligned += ["stride_qt", "stride_qh", "stride_cb", "stride_ct", "stride_ch", "stride_ot", "stride_oh"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def main_loop(sass: str) -> Counter:
    """Opcodes of the longest backward branch's body (the K/V tile loop)."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        if m := re.match(r"^(\w+):\s*$", line.strip()):
            labels[m.group(1)] = len(instrs)
        elif m := re.match(r"^\S+\t(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)$", line):
            instrs.append((m.group(2), m.group(3)))
    loops = []
    for i, (op, rest) in enumerate(instrs):
        if op.startswith("BRA") and (t := re.search(r"(\w+);", rest)) and labels.get(t.group(1), i) < i:
            loops.append((i - labels[t.group(1)], labels[t.group(1)], i))
    _, a, b = max(loops)
    return Counter(op for op, _ in instrs[a:b + 1])


if __name__ == "__main__" and sys.argv[1:2] == ["prefill"]:  # prefill KIND BLOCK_M,BLOCK_N,warps,stages
    kind, cfg = sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
    k = compile_prefill(kind, *cfg[:4])
    ops = main_loop(k.asm["sass"])
    print(f"triton {triton.__version__}, prefill, {kind} cache, config {tuple(cfg)}: main loop {sum(ops.values())} "
          f"instructions, shared memory {k.metadata.shared} bytes, spill loads {ops['LDL']}")
    print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))
elif __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "fp8"
    cfg = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "128,4,2,1,0").split(",")]
    cfg += [0] * (5 - len(cfg)) + [0, 16][len(cfg) - 5:]
    k = compile_decode(kind, *cfg[:3], bool(cfg[3]), bool(cfg[4]), bool(cfg[5]), cfg[6])
    ops = main_loop(k.asm["sass"])
    print(f"triton {triton.__version__}, {kind} cache, config {tuple(cfg)}: main loop {sum(ops.values())} "
          f"instructions, shared memory {k.metadata.shared} bytes, spill loads {ops['LDL']}")
    print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))
