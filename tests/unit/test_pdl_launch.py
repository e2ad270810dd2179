"""KILN_PDL: with programmatic dependent launch on, `launch` gives a kernel that takes USE_GDC the flag and Triton's
launch_pdl (the kernel then waits for its predecessor in gdc_enter: tests/kernels/test_hopper_compile.py checks
that each such variant compiles with griddepcontrol.wait); other kernels launch as before; it is never on without
an sm_90+ GPU."""
from __future__ import annotations

import triton.language as tl

from kiln.kernels import _utils


class StubKernel:
    """Stands in for a @triton.jit kernel: `launch` reads its signature and calls kernel[grid](...)."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[dict] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


def _with_gdc(x_ptr, n, BLOCK: tl.constexpr, USE_GDC: tl.constexpr = False):
    pass


def _without_gdc(x_ptr, n, BLOCK: tl.constexpr):
    pass


def test_launch_sets_use_gdc_and_launch_pdl_only_when_on_and_taken(monkeypatch):
    with_gdc, without_gdc = StubKernel(_with_gdc), StubKernel(_without_gdc)
    monkeypatch.setattr(_utils, "pdl_enabled", lambda: True)
    _utils.launch(with_gdc, (1,), 0, 4, BLOCK=16, num_warps=4)
    _utils.launch(without_gdc, (1,), 0, 4, BLOCK=16, num_warps=4)
    assert with_gdc.calls == [{"BLOCK": 16, "num_warps": 4, "USE_GDC": True, "launch_pdl": True}]
    assert without_gdc.calls == [{"BLOCK": 16, "num_warps": 4}]
    monkeypatch.setattr(_utils, "pdl_enabled", lambda: False)
    _utils.launch(with_gdc, (1,), 0, 4, BLOCK=16)
    assert with_gdc.calls[-1] == {"BLOCK": 16}


def test_pdl_is_on_by_default_on_hopper_and_off_elsewhere(monkeypatch):
    monkeypatch.delenv("KILN_PDL", raising=False)
    _utils.pdl_enabled.cache_clear()
    try:
        import torch
        expected = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9 \
            and not _utils.interpreting()
        assert _utils.pdl_enabled() is bool(expected)
        monkeypatch.setenv("KILN_PDL", "1")
        _utils.pdl_enabled.cache_clear()
        assert _utils.pdl_enabled() is bool(expected)
        monkeypatch.setenv("KILN_PDL", "0")
        _utils.pdl_enabled.cache_clear()
        assert _utils.pdl_enabled() is False
    finally:
        _utils.pdl_enabled.cache_clear()
