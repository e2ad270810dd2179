"""KV block manager: a pool of fixed-size blocks, block tables per request, and prefix caching.

A block that is full is identified by the hash of its tokens chained with its parent's hash. When its last
user finishes, the block goes back to the free queue *keeping* its contents and hash: a later request with
the same prefix takes it back instead of recomputing, until the block is needed for something else (LRU).
"""
from __future__ import annotations

from collections import OrderedDict

from kiln.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        # free blocks in eviction order (oldest first); a dict keeps O(1) removal when a cached block is reused
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.num_cached_hits = 0       # tokens served from the prefix cache (for metrics)

    # -- queries -------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # -- prefix cache --------------------------------------------------------------------------------
    def _hashes(self, token_ids: list[int], num_full_blocks: int, salt: object = None) -> list[int]:
        out, parent = [], salt
        bs = self.block_size
        for i in range(num_full_blocks):
            parent = hash((parent, tuple(token_ids[i * bs:(i + 1) * bs])))
            out.append(parent)
        return out

    def match_prefix(self, req: Request) -> list[int]:
        """Cached blocks holding the longest prefix of req's tokens (never its last token: it must be computed
        so that the model produces logits for it)."""
        if not self.enable_prefix_caching:
            return []
        tokens = req.all_token_ids
        hits = []
        for h in self._hashes(tokens, (len(tokens) - 1) // self.block_size, req.cache_salt):
            b = self.hash_to_block.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    # -- allocation ----------------------------------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict its cached contents
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
        self.ref_cnt[block] = 1
        return block

    def can_admit(self, req: Request, cached: list[int], num_new_tokens: int, watermark: int = 0) -> bool:
        new_blocks = self.blocks_needed(len(cached) * self.block_size + num_new_tokens) - len(cached)
        # cached blocks that sit in the free queue are taken out of it, not allocated anew
        reused_free = sum(1 for b in cached if self.ref_cnt[b] == 0)
        return new_blocks + reused_free <= self.num_free_blocks - watermark

    def admit(self, req: Request, cached: list[int]) -> None:
        """Give a waiting request its cached prefix blocks (before allocate_slots)."""
        for b in cached:
            if self.ref_cnt[b] == 0:
                del self.free[b]
            self.ref_cnt[b] += 1
        req.block_ids = list(cached)
        req.num_computed_tokens = len(cached) * self.block_size
        self.num_cached_hits += req.num_computed_tokens

    def allocate_slots(self, req: Request, num_new_tokens: int) -> bool:
        """Make room for num_new_tokens more tokens of req; False (nothing changed) if blocks ran out."""
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        if need > self.num_free_blocks:
            return False
        for _ in range(max(0, need)):
            req.block_ids.append(self._take_free())
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the hashes of req's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        # only blocks of computed tokens whose ids are known (an in-flight token's id is not)
        n_full = min(req.num_computed_tokens, req.num_known_tokens) // self.block_size
        hashes = req.block_hashes
        if len(hashes) >= n_full:
            return
        bs = self.block_size
        tokens = req.all_token_ids
        parent = hashes[-1] if hashes else req.cache_salt
        for i in range(len(hashes), n_full):  # incremental: each block is hashed once per request
            parent = hash((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            hashes.append(parent)
            b = req.block_ids[i]
            if self.block_hash[b] is None and parent not in self.hash_to_block:
                self.block_hash[b] = parent
                self.hash_to_block[parent] = b

    def free_request(self, req: Request) -> None:
        # free the tail first so that, on eviction, a prefix's later blocks go before its first ones
        for b in reversed(req.block_ids):
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self.free[b] = None
        req.block_ids = []
        req.block_hashes = []
        req.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        for b in self.free:
            self.block_hash[b] = None
        self.hash_to_block = {h: b for h, b in self.hash_to_block.items() if self.ref_cnt[b] > 0}
