"""Run AE (debug, H100, 2026-12-07): the float32 decode case that runs AB-AD found with NaN heads (B=2, Hq=16, Hkv=2,
D=128, block size 16, contexts 30-140), at 128-token tiles (the default before run AE; float32 now takes 64):
which heads, at which partition sizes and dtypes. Run AE: float32 heads 1-3 and 9-11 NaN at partitions of 128 for
contexts 114-125, right at 256 and 64; bf16 right everywhere."""
import torch
import sys
sys.path.insert(0, ".")
from kiln import kernels as K
from kiln.kernels import reference as R
from kiln.kernels.decode_attention import choose_partition
from tests.kernels.test_kernels import make_paged, rand

for dtype in (torch.float32, torch.bfloat16):
    for seed in range(4):
        torch.manual_seed(seed)
        lens = torch.randint(30, 141, (2,)).tolist()
        (kc, vc, ks, vs), tables, sl = make_paged(lens, 2, 128, 16, dtype)
        q = rand(2, 16, 128, dtype=dtype)
        ref = R.paged_decode_attention(q.float(), kc, vc, tables, sl, 128 ** -0.5)
        for part in (None, 128, 256, 64):
            out = torch.full_like(q, float("nan"))
            K.paged_decode_attention(q, kc, vc, tables, sl, 128 ** -0.5, partition_size=part, out=out,
                                   config=(min(128, part or 128), 4, 2))
            nan = out.isnan().any(-1).nonzero().tolist()
            err = ((out.float() - ref).nan_to_num().norm() / ref.norm()).item()
            chosen = choose_partition(2, 2, tables.shape[1] * 16, q.device, 128) if part is None else part
            print(f"{dtype} seed {seed} lens {lens} part {part} ({chosen}): NaN (b, head) {nan[:10]} err {err:.1e}",
                  flush=True)
