"""Does a decode step gain from running two halves of its batch on two streams, one half's attention (bound by
the cache's bytes) beside the other half's GEMMs (bound by the tensor cores)? A question for the GPU before any
engine work (NanoFlow's nano-batching, SGLang's two-batch overlap): cuBLAS's FP8 kernels hold whole SMs, so the
overlap is whatever the two kernels' blocks leave each other.

Per layer of a Llama-3-8B shape, w8a8-fp8 with an fp8 cache (Kiln's paths: `torch._scaled_mm` with row-wise
scales and rows padded to a multiple of 128, `paged_decode_attention`), 32 layers in one CUDA graph:
  full        one stream, the whole batch: 4 GEMMs, then the attention
  halves      one stream, the batch in two halves one after the other
  overlap     two streams, one half each: stream 1 attention then GEMMs, stream 2 GEMMs then attention
  locked      as overlap, the streams waiting on each other at every layer, so that each attention meets the
              other half's GEMMs
and the attention and the GEMMs alone. GPU time of a graph replay (median of events), us per layer.

--mixed: a mixed step (run AM''s profile: 354 decode rows beside ~1,700 prefill tokens), whose kernels run one
after the other today, against its attention on two streams and against the decode rows and the prefill tokens
each on a stream of their own (mixed_step), in a CUDA graph and eagerly (mixed steps run eagerly), us per layer.

    PYTHONPATH=. python benchmarks/kernels/overlap_bench.py [--batches 324,512] [--ctx 1000,2000] [--mixed]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.kernels.bench_kernels import capture_graph
from kiln import kernels as K

HQ, HKV, D, HIDDEN, INTER, LAYERS, BS = 32, 8, 128, 4096, 14336, 32, 64
SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
FP8 = torch.float8_e4m3fn


def pad(m: int, k: int = 128) -> int:
    return -(-m // k) * k


class Gemms:
    """A layer's four FP8 GEMMs for `rows` rows (padded to a multiple of 128, as Kiln pads them)."""

    def __init__(self, rows: int, weights):
        mp = pad(rows)
        self.x = {name: (torch.randn(mp, k, device="cuda") * 0.05).to(FP8) for name, (n, k) in SHAPES.items()}
        self.xs = torch.rand(mp, 1, device="cuda") / 100
        self.weights = weights

    def __call__(self, layer: int):
        for name, (w, ws) in self.weights[layer % len(self.weights)].items():
            torch._scaled_mm(self.x[name], w.t(), scale_a=self.xs, scale_b=ws, out_dtype=torch.bfloat16)


class Half:
    """One part of the batch: its queries, block tables and lengths over the shared cache, its GEMM inputs."""

    def __init__(self, lens: list[int], first_block: int, weights):
        self.b = len(lens)
        nblk = [-(-n // BS) for n in lens]
        self.tables = torch.zeros(self.b, max(nblk), dtype=torch.int32, device="cuda")
        i = first_block
        for r, n in enumerate(nblk):
            self.tables[r, :n] = torch.arange(i, i + n, dtype=torch.int32)
            i += n
        self.blocks_end = i
        self.lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        self.max_len = max(lens)
        self.q = torch.randn(self.b, HQ, D, device="cuda", dtype=torch.bfloat16)
        self.out = torch.empty_like(self.q)
        self.gemms = Gemms(self.b, weights)

    def attention(self, cache):
        kc, vc, ks, vs = cache
        K.paged_decode_attention(self.q, kc, vc, self.tables, self.lens, D ** -0.5, ks, vs,
                                 max_seq_len=self.max_len, out=self.out)


def graph_us(body, reps: int = 20) -> float:
    """us per layer: body() (all layers) captured in one CUDA graph, replayed; median of event timings."""
    g = capture_graph(body, warmups=1)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / LAYERS)
    del g
    return sorted(times)[len(times) // 2]


def two_streams(first, second, locked: bool):
    """first's layers on the capturing stream (attention, then GEMMs), second's on a forked one (GEMMs, then
    attention); locked: the two wait for each other at every layer boundary."""
    side = torch.cuda.Stream()

    def body():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        for layer in range(LAYERS):
            first[0]()
            with torch.cuda.stream(side):
                second[0](layer)
            first[1](layer)
            with torch.cuda.stream(side):
                second[1]()
            if locked:
                side.wait_stream(main)
                main.wait_stream(side)
        main.wait_stream(side)
    return body


def eager_us(body, reps: int = 10) -> float:
    body()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        body()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / LAYERS)
    return sorted(times)[len(times) // 2]


def mixed_step(weights, decode_rows: int, ctx: tuple[int, int], prefill: list[int]) -> None:
    """One mixed step (decode rows with contexts in ctx beside whole-prompt prefills of the given token counts),
    fp8 cache, its GEMMs and attention, 32 layers:
      one stream           today: the GEMMs over all rows, then the decode and the prefill attention
      attention on two     the prefill attention on a side stream beside the decode attention (KILN_MIXED_ATTN_STREAMS,
                           removed after run AQ measured it)
      split                the decode rows' whole layers (GEMMs, attention) on one stream, the prefill tokens' on
                           another: the decode rows' memory-bound attention beside the prefill's compute-bound GEMMs,
                           for the price of reading the weights twice"""
    lens = torch.randint(ctx[0], ctx[1] + 1, (decode_rows,)).tolist()
    dec = Half(lens, 0, [])
    nblk = [-(-n // BS) for n in prefill]
    tables = torch.zeros(len(prefill), max(nblk), dtype=torch.int32, device="cuda")
    i = dec.blocks_end
    for r, n in enumerate(nblk):
        tables[r, :n] = torch.arange(i, i + n, dtype=torch.int32)
        i += n
    kc = (torch.randn(i, BS, HKV, D, device="cuda") * 50).clamp(-448, 448).to(FP8)
    vc = (torch.randn(i, BS, HKV, D, device="cuda") * 50).clamp(-448, 448).to(FP8)
    ks, vs = torch.rand(HKV, device="cuda") / 100 + 1e-3, torch.rand(HKV, device="cuda") / 100 + 1e-3
    qp = torch.randn(sum(prefill), HQ, D, device="cuda", dtype=torch.bfloat16)
    outp = torch.empty_like(qp)
    qsl = torch.tensor([0] + list(torch.tensor(prefill).cumsum(0)), dtype=torch.int32, device="cuda")
    plens = torch.tensor(prefill, dtype=torch.int32, device="cuda")
    g_all, g_dec, g_pre = Gemms(decode_rows + sum(prefill), weights), Gemms(decode_rows, weights), \
        Gemms(sum(prefill), weights)
    side = torch.cuda.Stream()

    def decode():
        dec.attention((kc, vc, ks, vs))

    def pre():
        K.paged_prefill_attention(qp, kc, vc, tables, qsl, plens, D ** -0.5, max(prefill), ks, vs, out=outp)

    def one_stream():
        for layer in range(LAYERS):
            g_all(layer)
            decode()
            pre()

    def attention_on_two():
        main = torch.cuda.current_stream()
        for layer in range(LAYERS):
            g_all(layer)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                pre()
            decode()
            main.wait_stream(side)

    def split():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        for layer in range(LAYERS):
            with torch.cuda.stream(side):
                g_pre(layer)
                pre()
            g_dec(layer)
            decode()
        main.wait_stream(side)

    res = {"decode attention": graph_us(lambda: [decode() for _ in range(LAYERS)]),
           "prefill attention": graph_us(lambda: [pre() for _ in range(LAYERS)]),
           "GEMMs, all rows": graph_us(lambda: [g_all(layer) for layer in range(LAYERS)]),
           "GEMMs, decode rows": graph_us(lambda: [g_dec(layer) for layer in range(LAYERS)]),
           "GEMMs, prefill rows": graph_us(lambda: [g_pre(layer) for layer in range(LAYERS)]),
           "one stream": graph_us(one_stream), "attention on two": graph_us(attention_on_two),
           "split": graph_us(split),
           "one stream, eager": eager_us(one_stream), "attention on two, eager": eager_us(attention_on_two),
           "split, eager": eager_us(split)}
    print(f"mixed step: {decode_rows} decode rows (contexts {ctx[0]}-{ctx[1]}), prefills {prefill}, fp8 cache:",
          flush=True)
    for k, v in res.items():
        print(f"  {k:26s} {v:8.1f} us a layer", flush=True)
    one = res["one stream"]
    print(f"  against one stream: attention on two {res['attention on two'] / one:.3f}, split {res['split'] / one:.3f}"
          f" (eager {res['attention on two, eager'] / res['one stream, eager']:.3f},"
          f" {res['split, eager'] / res['one stream, eager']:.3f})", flush=True)
    del kc, vc
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="324,512")
    ap.add_argument("--ctx", default="1000,2000", help="contexts drawn uniformly in this range")
    ap.add_argument("--mixed", action="store_true")
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.ctx.split(","))
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    # four layers' weights, cycled (218 MB a layer: more than L2, as in a model)
    weights = [{name: ((torch.randn(n, k, device="cuda") * 0.05).to(FP8), torch.rand(1, n, device="cuda") / 100)
                for name, (n, k) in SHAPES.items()} for _ in range(4)]
    if args.mixed:
        mixed_step(weights, 354, (lo, hi), [1000, 694])
        mixed_step(weights, 354, (lo, hi), [512, 512, 512, 158])
    for batch in (int(b) for b in args.batches.split(",") if b):
        lens = torch.randint(lo, hi + 1, (batch,)).tolist()
        nblocks = sum(-(-n // BS) for n in lens)
        # one layer's fp8 cache, shared by the layers (each layer's bytes still far exceed L2)
        kc = (torch.randn(nblocks, BS, HKV, D, device="cuda") * 50).clamp(-448, 448).to(FP8)
        vc = (torch.randn(nblocks, BS, HKV, D, device="cuda") * 50).clamp(-448, 448).to(FP8)
        cache = (kc, vc, torch.rand(HKV, device="cuda") / 100 + 1e-3, torch.rand(HKV, device="cuda") / 100 + 1e-3)
        whole = Half(lens, 0, weights)
        h = batch // 2
        a = Half(lens[:h], 0, weights)
        b = Half(lens[h:], a.blocks_end, weights)
        kv_gb = sum(lens) * HKV * D * 2 / 1e9

        def seq(*parts):
            def body():
                for layer in range(LAYERS):
                    for p in parts:
                        p.gemms(layer)
                        p.attention(cache)
            return body

        res = {
            "attention alone": graph_us(lambda: [whole.attention(cache) for _ in range(LAYERS)]),
            "GEMMs alone": graph_us(lambda: [whole.gemms(layer) for layer in range(LAYERS)]),
            "half attention alone": graph_us(lambda: [a.attention(cache) for _ in range(LAYERS)]),
            "half GEMMs alone": graph_us(lambda: [a.gemms(layer) for layer in range(LAYERS)]),
            "full": graph_us(seq(whole)),
            "halves": graph_us(seq(a, b)),
        }
        for locked in (False, True):
            res["locked" if locked else "overlap"] = graph_us(two_streams(
                (lambda: a.attention(cache), a.gemms), (b.gemms, lambda: b.attention(cache)), locked))
        print(f"batch {batch} (halves {a.b} + {b.b}, rows padded to {pad(batch)} / {pad(a.b)}), contexts {lo}-{hi},"
              f" {kv_gb:.2f} GB of K/V a layer:", flush=True)
        for k, v in res.items():
            extra = f" ({kv_gb / (v * 1e-6):,.0f} GB/s)" if "attention" in k else ""
            print(f"  {k:22s} {v:8.1f} us a layer{extra}", flush=True)
        print(f"  overlap / full {res['overlap'] / res['full']:.3f}, locked / full {res['locked'] / res['full']:.3f},"
              f" ideal (max of the halves' parts x 2) / full "
              f"{2 * max(res['half attention alone'], res['half GEMMs alone']) / res['full']:.3f}", flush=True)
        del kc, vc, cache, whole, a, b
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
