"""The bf16 split-K tile's configuration rule (kiln/kernels/skinny.py) for GPUs, checked without one: the swapped
tile up to 64 rows with run AU's shapes, its stages cut to what the GPU's shared memory holds, and the plain tile
where even two stages would not fit, past 64 rows or for fp32 (also cut to fit)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from kiln.kernels import skinny  # noqa: E402

KIB = 1024
LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def config(monkeypatch, m, n, k, smem, sms=132):
    monkeypatch.setattr(skinny, "interpreting", lambda: False)
    monkeypatch.setattr(skinny, "num_sms", lambda device: sms)
    monkeypatch.setattr(skinny, "max_shared_mem", lambda device: smem)
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
    # 16 KiB: two stages of a 64-row swapped tile with the shortest K tile need 24 KiB; the plain tile's 2 x 12 KiB
    # (K tiles of 32) fit
    bm, bn, bk, split, warps, stages, swap = config(monkeypatch, 64, 28672, 4096, 16 * KIB)
    assert not swap and bn == 32 and (stages, bk) == (2, 32)
    assert not config(monkeypatch, 65, 4096, 4096, 227 * KIB)[6]
    assert not config(monkeypatch, 128, 4096, 4096, 227 * KIB)[6]


def test_switch_off_keeps_the_plain_tile(monkeypatch):
    monkeypatch.setattr(skinny, "interpreting", lambda: False)
    monkeypatch.setattr(skinny, "num_sms", lambda device: 132)
    monkeypatch.setattr(skinny, "max_shared_mem", lambda device: 227 * KIB)
    monkeypatch.setattr(skinny, "SWAP", False)
    assert skinny.skinny_config(16, 6144, 4096, torch.device("cuda", 0))[6] is False



@pytest.mark.parametrize("rows", [16, 48, 64, 65, 128])
@pytest.mark.parametrize("smem", [227 * KIB, 163 * KIB, 99 * KIB])
def test_fp32_and_past_64_rows_plain_tile_fits_shared_memory(monkeypatch, rows, smem):
    # fp32 operands never swap (the kernel swaps bf16/fp16 only); run AW's GPU tests found fp32 at 48 rows taking
    # the swapped tile's 64 x 128 tiles (384 KiB) and at 65 the plain tile's 4 stages of 128 rows (320 KiB)
    for n, k in LLAMA3_8B.values():
        for elem in (2, 4):
            cfg = config(monkeypatch, rows, n, k, smem) if elem == 2 else None
            if elem == 4:
                monkeypatch.setattr(skinny, "SWAP", True)
                cfg = skinny.skinny_config(rows, n, k, torch.device("cuda", 0), elem_bytes=4)
                assert cfg[6] is False
            bm, bn, bk, _split, _warps, stages, swap = cfg
            assert stages >= 2 and stages * (bm + bn) * bk * elem <= smem
