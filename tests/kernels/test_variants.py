"""The variant keys kiln.kernels._utils.launch records (what Triton compiles one binary for), and the kernels'
launch parameters that must not select a new variant per request: the decode partition length and count, the
addresses of the index tensors a mixed step passes as row slices. On CPU under TRITON_INTERPRET=1 (the keys are
computed the same there); the last test compares the keys with the compiled-kernel cache of the real JIT (GPU)."""
from __future__ import annotations


import pytest
import torch

from tests.kernels.kernel_env import HAS_CUDA, INTERP  # skips where no kernels run

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kiln import kernels as K  # noqa: E402
from kiln.kernels._utils import KernelVariants, describe_variant, launch, variant_key  # noqa: E402

from tests.kernels.test_kernels import DEVICE, make_paged, rand  # noqa: E402


@triton.jit(do_not_specialize=["n_dns"])
def _probe_kernel(x_ptr, out_ptr, n, n_dns, scale, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs) * scale + n + n_dns)


def specs(key) -> dict:
    return dict(key[2])


def test_variant_key_follows_triton_specialization():
    """Constexprs and options by value; tensors by dtype and 16-byte alignment; ints by width, == 1 and % 16;
    do_not_specialize ints by width only; floats not at all."""
    x = torch.zeros(64, device=DEVICE)
    out = torch.zeros(64, device=DEVICE)
    a = variant_key(_probe_kernel, (x, out, 32, 5, 0.5), dict(BLOCK=16, num_warps=4))
    assert a[0] == "_probe_kernel" and a[1] == (("BLOCK", 16),) and a[3] == (("num_warps", 4),)
    assert specs(a) == {"x_ptr": "*fp32:D", "out_ptr": "*fp32:D", "n": "i32:D", "n_dns": "i32", "scale": "fp32"}
    b = variant_key(_probe_kernel, (x[1:], out, 1, 1, 2.0), dict(BLOCK=16, num_warps=4))
    assert specs(b) == {"x_ptr": "*fp32", "out_ptr": "*fp32:D", "n": "=1", "n_dns": "i32", "scale": "fp32"}
    c = variant_key(_probe_kernel, (x[4:].half(), out, 17, 2 ** 40, 2.0), dict(BLOCK=32, num_warps=4))
    assert specs(c)["x_ptr"] == "*fp16:D" and specs(c)["n"] == "i32" and specs(c)["n_dns"] == "i64"
    assert describe_variant(c, a) == "_probe_kernel(BLOCK=32, x_ptr: *fp16:D, n: i32, n_dns: i64)"
    # launch records while a recorder is active, and only then; the kernel runs either way
    with KernelVariants() as v:
        launch(_probe_kernel, (1,), x, out, 32, 5, 0.5, BLOCK=16, num_warps=4)
        launch(_probe_kernel, (1,), x, out, 48, 7, 1.5, BLOCK=16, num_warps=4)  # same variant
    launch(_probe_kernel, (1,), x[1:], out, 1, 1, 0.5, BLOCK=16, num_warps=4)
    assert v.keys == {a}
    assert torch.all(out[:16] == 2)  # the last launch (x * 0.5 + 1 + 1) ran


def test_decode_partitions_select_no_variant():
    """Contexts from 1 to 1100 tokens at batches 1 to 9, bounded by the block table or by max_seq_len, whole block
    tables or row slices of one (a mixed step's decode rows): two variants, DIRECT on and off."""
    lens = [1, 130, 300, 700, 1100, 64, 257, 999, 33]
    (kc, vc, _, _), tables, sl = make_paged(lens, 2, 32, 16, torch.float32)
    q = rand(len(lens), 4, 32)
    with KernelVariants() as v:
        for nd in (1, 2, 3, 5, 9):
            for lo in (0, 1):
                rows = slice(lo, lo + nd) if lo + nd <= len(lens) else slice(0, nd)
                for bound in (None, max(lens[rows])):
                    out = K.paged_decode_attention(q[rows], kc, vc, tables[rows], sl[rows], 0.2, max_seq_len=bound)
                    ref = K.reference.paged_decode_attention(q[rows], kc, vc, tables[rows], sl[rows], 0.2)
                    assert (out - ref).abs().max() < 1e-4
    decode = [k for k in v.keys if k[0] == "_decode_kernel"]
    assert sorted(dict(k[1])["DIRECT"] for k in decode) == [False, True], [describe_variant(k) for k in decode]


def test_mixed_step_slices_select_no_prefill_variant():
    """The prefill kernel of a mixed step gets block_tables[nd:], seq_lens[nd:], query_start_loc[nd:] - nd, q[nd:],
    out[nd:]: whatever nd, one variant per BLOCK_M class (here the 16 class)."""
    lens = [40, 9, 77, 23, 50, 61]
    (kc, vc, _, _), tables, sl = make_paged(lens, 2, 32, 16, torch.float32)
    qlen = torch.tensor([1, 1, 1, 12, 7, 5])
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), qlen.cumsum(0)]).to(torch.int32).to(DEVICE)
    q = rand(int(qlen.sum()), 4, 32)
    with KernelVariants() as v:
        for nd in (0, 1, 2, 3):
            out = torch.empty_like(q)
            K.paged_prefill_attention(q[nd:], kc, vc, tables[nd:], qsl[nd:] - nd, sl[nd:], 0.2, 12, out=out[nd:])
    assert len(v.keys) == 1, [describe_variant(k) for k in v.keys]
    assert dict(next(iter(v.keys))[1])["BLOCK_M"] == 16


@pytest.mark.skipif(INTERP or not HAS_CUDA, reason="the real JIT's cache: GPU only")
def test_recorded_keys_match_the_jits_compiled_variants():
    """On a GPU: the kernels' JIT caches, emptied first, hold one compiled binary per recorded variant key (the
    recorder computes what Triton computes; binaries come back from the on-disk cache, so this is quick)."""
    from kiln.kernels import decode_attention, prefill_attention

    fns = (decode_attention._decode_kernel, prefill_attention._prefill_kernel)
    for fn in fns:
        fn.device_caches.clear()
    with KernelVariants() as v:
        test_decode_partitions_select_no_variant()
        test_mixed_step_slices_select_no_prefill_variant()
    for fn in fns:
        compiled = sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in fn.device_caches.values())
        assert compiled == len([k for k in v.keys if k[0] == fn.fn.__name__]), fn.fn.__name__
