"""The capture loop keeps the allocator's cache and skips gc between graphs, and puts both back after, also when a
capture fails (kiln.engine.cuda_graph)."""
import gc

import pytest
import torch

from kiln.engine.cuda_graph import _allocator_cache_kept


def test_cache_kept_during_captures_and_restored_after_a_failure():
    empty_cache, collect = torch.cuda.empty_cache, gc.collect
    with pytest.raises(RuntimeError, match="capture failed"):
        with _allocator_cache_kept():
            assert torch.cuda.empty_cache is not empty_cache and torch.cuda.empty_cache() is None
            assert gc.collect is not collect and gc.collect() == 0
            raise RuntimeError("capture failed")
    assert torch.cuda.empty_cache is empty_cache and gc.collect is collect
