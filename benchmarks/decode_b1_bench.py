"""Decode attention at batch 1 as a decode step meets it (GPU): Llama-3-8B's heads (32 q, 8 kv, 128 wide), a bf16
cache in 64-token blocks, a block table as wide as an 8,192-token model (the bound a CUDA graph captures), LAYERS
layers of distinct caches in one CUDA graph (the KV comes from memory, as in a step that streams the weights
through L2). Per context length and (partition, config): microseconds a call (the partitions' merge included) and the
error against the reference on one layer.

    python benchmarks/decode_b1_bench.py [--layers 32] [--ctx 128 384 1024 4096]
"""
from __future__ import annotations

import argparse

import torch

from kiln import kernels as K
from kiln.kernels import reference as R

HQ, HKV, D, BS, MAX_LEN = 32, 8, 128, 64, 8192
DT = torch.bfloat16
# (partition_size, config): None = the engine's choice
CANDIDATES = [(None, None), (128, None), (64, None), (128, (64, 4, 2)), (64, (64, 4, 1)), (32, (32, 4, 1)),
              (256, (64, 4, 2)), (MAX_LEN, None)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ctx", type=int, nargs="*", default=[128, 384, 1024, 4096])
    args = ap.parse_args()
    cuda = torch.cuda.is_available()  # without: the interpreter's smoke run (TRITON_INTERPRET=1), errors only
    dev = torch.device("cuda" if cuda else "cpu")
    global DT
    DT = torch.bfloat16 if cuda else torch.float32  # the interpreter's dots are float32 only
    torch.manual_seed(0)
    print(torch.cuda.get_device_name() if cuda else "cpu", f"{args.layers} layers a graph")
    for ctx in args.ctx:
        nblk = -(-ctx // BS)
        layers = []
        for _ in range(args.layers):
            kc = torch.randn(nblk, BS, HKV, D, device=dev, dtype=DT)
            vc = torch.randn(nblk, BS, HKV, D, device=dev, dtype=DT)
            table = torch.zeros(1, MAX_LEN // BS, dtype=torch.int32, device=dev)
            table[0, :nblk] = torch.randperm(nblk, device=dev).to(torch.int32)
            layers.append((kc, vc, table))
        q = torch.randn(1, HQ, D, device=dev, dtype=DT)
        lens = torch.tensor([ctx], dtype=torch.int32, device=dev)
        out = torch.empty_like(q)
        line = []
        for part, cfg in CANDIDATES:
            def call(lay):
                return K.paged_decode_attention(q, lay[0], lay[1], lay[2], lens, D ** -0.5, partition_size=part,
                                                out=out, config=cfg)
            try:
                ref = R.paged_decode_attention(q.float(), *layers[0], lens, D ** -0.5)
                err = ((call(layers[0]).float() - ref).norm() / ref.norm()).item()
                if not cuda:
                    line.append(f"{part}/{cfg}: err {err:.0e}")
                    continue
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for lay in layers:
                        call(lay)
                g.replay(); torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(20):
                    g.replay()
                e.record(); torch.cuda.synchronize()
                us = s.elapsed_time(e) * 1e3 / 20 / args.layers
                line.append(f"{part}/{cfg and cfg[0]},{cfg and cfg[2]}: {us:.2f}" + (f" err {err:.0e}" if err > 1e-2 else ""))
            except Exception as ex:  # a candidate the kernel refuses: say so, go on
                line.append(f"{part}/{cfg}: {type(ex).__name__} {str(ex)[:80]}")
        print(f"ctx {ctx}: " + "; ".join(line), flush=True)


if __name__ == "__main__":
    main()
