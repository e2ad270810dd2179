"""The split-K tile's configuration rules for GPUs (kiln/kernels/skinny.py for bf16 weights, w8a16.py's _config for
8-bit ones), checked without one: the swapped tile up to 64 rows with run AU's shapes, its stages cut to what the
GPU's shared memory holds, and the plain tile where even two stages would not fit or past 64 rows."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from kiln.kernels import skinny, w8a16  # noqa: E402

KIB = 1024
LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def config(monkeypatch, m, n, k, smem, sms=132):
    monkeypatch.setattr(skinny, "interpreting", lambda: False)
    monkeypatch.setattr(skinny, "num_sms", lambda device: sms)
    monkeypatch.setattr(w8a16, "num_sms", lambda device: sms)
    monkeypatch.setattr(w8a16, "max_shared_mem", lambda device: smem)
    monkeypatch.setattr(skinny, "SWAP", True)
    return skinny.skinny_config(m, n, k, torch.device("cuda", 0))


def smem_bytes(cfg):
    bm, bn, bk, _split, _warps, stages, _swap = cfg
    return stages * (bm + bn) * bk * 2


@pytest.mark.parametrize("rows", [1, 16, 32, 48, 64])
@pytest.mark.parametrize("proj", sorted(LLAMA3_8B))
@pytest.mark.parametrize("smem", [227 * KIB, 163 * KIB, 99 * KIB])  # H100/H200, A100, Ada
def test_swapped_tile_up_to_64_rows_fits_shared_memory(monkeypatch, rows, proj, smem):
    n, k = LLAMA3_8B[proj]
    cfg = config(monkeypatch, rows, n, k, smem)
    bm, bn, bk, split, warps, stages, swap = cfg
    assert swap and bm >= rows and bm == max(16, 1 << (rows - 1).bit_length())
    assert 2 <= stages <= 4 and smem_bytes(cfg) <= smem
    assert (stages, bk) == (4, 128) if smem >= 227 * KIB else stages >= 3
    assert bn == (128 if proj == "gate_up" else 64)  # 128-wide only where those tiles alone fill 132 SMs
    assert k % (split * bk) == 0


def test_run_au_tiles_on_hopper(monkeypatch):
    # the tiles run AU timed on the H100 (docs/kernels.md): 4 stages; o and down split in two, qkv and gate_up not
    assert config(monkeypatch, 16, 6144, 4096, 227 * KIB) == (16, 64, 128, 1, 4, 4, True)
    assert config(monkeypatch, 16, 4096, 4096, 227 * KIB) == (16, 64, 128, 2, 4, 4, True)
    assert config(monkeypatch, 32, 28672, 4096, 227 * KIB) == (32, 128, 128, 1, 4, 4, True)
    assert config(monkeypatch, 64, 28672, 4096, 227 * KIB)[4] == 8  # 64 x 128 tiles: 8 warps


def test_plain_tile_where_swapped_does_not_fit_or_past_64_rows(monkeypatch):
    # 16 KiB: two stages of a 64-row swapped tile with the shortest K tile need 24 KiB
    bm, bn, bk, split, warps, stages, swap = config(monkeypatch, 64, 28672, 4096, 16 * KIB)
    assert not swap and bn == 32
    assert not config(monkeypatch, 65, 4096, 4096, 227 * KIB)[6]
    assert not config(monkeypatch, 128, 4096, 4096, 227 * KIB)[6]


def test_switch_off_keeps_the_plain_tile(monkeypatch):
    monkeypatch.setattr(skinny, "interpreting", lambda: False)
    monkeypatch.setattr(skinny, "num_sms", lambda device: 132)
    monkeypatch.setattr(skinny, "SWAP", False)
    assert skinny.skinny_config(16, 6144, 4096, torch.device("cuda", 0))[6] is False


def test_fallback_keeps_the_plain_tiles_k(monkeypatch):
    assert config(monkeypatch, 64, 28672, 4096, 16 * KIB)[2] == 128


def w8_config(monkeypatch, m, n, k, smem, swap=True):
    monkeypatch.setattr(w8a16, "interpreting", lambda: False)
    monkeypatch.setattr(w8a16, "num_sms", lambda device: 132)
    monkeypatch.setattr(w8a16, "max_shared_mem", lambda device: smem)
    return w8a16._config(m, n, k, torch.device("cuda", 0), swap=swap)


@pytest.mark.parametrize("rows", [2, 16, 32, 64])
@pytest.mark.parametrize("proj", sorted(LLAMA3_8B))
@pytest.mark.parametrize("smem", [227 * KIB, 163 * KIB, 99 * KIB])
def test_8bit_swapped_tile_fits_shared_memory(monkeypatch, rows, proj, smem):
    n, k = LLAMA3_8B[proj]
    bm, bn, bk, split, warps, stages, swap = w8_config(monkeypatch, rows, n, k, smem)
    assert swap and bm == max(16, 1 << (rows - 1).bit_length()) and bn == (128 if proj == "gate_up" else 64)
    # bf16 activations, 8-bit weights: a stage is 2 bytes a row of x and 1 a weight row, K tiles of 256 on Hopper
    assert 2 <= stages <= 4 and stages * (2 * bm + bn) * bk <= smem
    assert bk == 256 if smem >= 227 * KIB else stages >= 3
    assert k % (split * bk) == 0


def test_8bit_plain_tile_without_the_switch_or_past_64_rows(monkeypatch):
    assert len(w8_config(monkeypatch, 32, 4096, 4096, 227 * KIB, swap=False)) == 6
    assert len(w8_config(monkeypatch, 128, 4096, 4096, 227 * KIB)) == 6  # 64 < T <= 256: the larger plain tiles
