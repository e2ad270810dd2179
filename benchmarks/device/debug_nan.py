"""Run AE (debug): the float32 decode case that runs AB-AD found with a NaN head (B=2, Hq=16, Hkv=2, D=128, block
size 16, contexts 30-140, partition by the heuristic): which heads, at which partition sizes and dtypes."""
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
            K.paged_decode_attention(q, kc, vc, tables, sl, 128 ** -0.5, partition_size=part, out=out)
            nan = out.isnan().any(-1).nonzero().tolist()
            err = ((out.float() - ref).nan_to_num().norm() / ref.norm()).item()
            chosen = choose_partition(2, 2, tables.shape[1] * 16, q.device, 128) if part is None else part
            print(f"{dtype} seed {seed} lens {lens} part {part} ({chosen}): NaN (b, head) {nan[:10]} err {err:.1e}",
                  flush=True)
