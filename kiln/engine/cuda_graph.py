"""CUDA graphs for decode steps: one graph per batch size of a ladder, inputs in persistent buffers.

A decode step of batch n replays the graph of the smallest captured size >= n; the padded rows write no KV
(slot -1) and their logits are dropped. Prefill and mixed steps, and batches above the ladder, run eagerly.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import time

import torch

from kiln.layers.attention import AttentionMetadata

log = logging.getLogger("kiln.cuda_graph")


def batch_size_ladder(max_bs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s < max_bs] + [max_bs]


@contextlib.contextmanager
def _allocator_cache_kept():
    """torch.cuda.graph empties the allocator's cache on entering each capture (some torch versions also run
    gc.collect there): the next size's eager warm-up then goes back to cudaMalloc. Over a ladder of 20-40 graphs that
    is start-up time for nothing, since every graph shares one pool (vLLM skips both the same way)."""
    saved = torch.cuda.empty_cache, gc.collect
    torch.cuda.empty_cache, gc.collect = (lambda: None), (lambda generation=2: 0)
    try:
        yield
    finally:
        torch.cuda.empty_cache, gc.collect = saved


class DecodeGraphs:
    def __init__(self, model, kv_caches, device, max_bs: int, max_blocks_per_seq: int,
                 logits_dtype: torch.dtype = torch.float32):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = batch_size_ladder(max_bs)
        self.max_bs = max_bs
        self.ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.pos = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slots = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.qsl = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # one logits buffer for every graph: each graph's own output would stay allocated in the pool, and over a
        # ladder to 1,024 those are ~18k rows of float32 logits (9.2 GB at a 128k vocabulary; run AB, H100: out
        # of memory in the capture after the cache had taken its share). In the LM head's own dtype: the sampler
        # converts to float32 only for rows that need more than an argmax.
        self.logits_buf = torch.empty(max_bs, model.config.vocab_size, dtype=logits_dtype, device=device)
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(self.slots[:bs], self.block_tables[:bs], self.seq_lens[:bs], self.qsl[:bs + 1],
                                 seq_lens_list=None, query_lens_list=[1] * bs, max_query_len=1, max_seq_len=None)

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.ids[:bs], self.pos[:bs], self.kv_caches, self._meta(bs))
        return self.model.compute_logits(hidden, out=self.logits_buf[:bs])

    @torch.inference_mode()
    def capture(self) -> float:
        t0 = time.monotonic()
        mem0 = torch.cuda.memory_allocated()
        eager_s = 0.0  # of which the eager runs before each capture (the split says where start-up time goes)
        with _allocator_cache_kept():
            for bs in reversed(self.sizes):  # largest first: the smaller ones reuse its memory pool
                t1 = time.monotonic()
                self._forward(bs)            # warm-up: Triton compiles / autotunes outside the capture
                torch.cuda.synchronize()
                eager_s += time.monotonic() - t1
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    self.logits[bs] = self._forward(bs)
                if self.pool is None:
                    self.pool = g.pool()
                self.graphs[bs] = g
        torch.cuda.synchronize()
        self.graph_bytes = torch.cuda.memory_allocated() - mem0
        secs = time.monotonic() - t0
        log.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s (eager runs before the captures %.1f s)",
                 len(self.sizes), self.sizes[0], self.sizes[-1], secs, eager_s)
        return secs

    def fits(self, n: int, max_blocks: int) -> bool:
        return n <= self.max_bs and max_blocks <= self.block_tables.shape[1]

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        self.ids[:n].copy_(ids)
        self.pos[:n].copy_(pos)
        self.slots[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        w = meta.block_tables.shape[1]
        self.block_tables[:n, :w].copy_(meta.block_tables)
        if n < bs:
            self.slots[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(1)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
