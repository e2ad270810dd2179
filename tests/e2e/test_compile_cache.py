"""The persistent compile cache (issue 11): `kiln serve` points Triton's cache under Kiln's cache directory before
any child imports triton, so the engine process of the next start on this machine finds the kernels compiled."""
from __future__ import annotations

import os
from pathlib import Path

from kiln.entrypoints.serve import setup_compile_cache


def test_engine_process_has_the_persistent_triton_cache(default_server):
    # the test's server runs without KILN_* settings: the default root, unless the runner set its own cache
    expected = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".cache" / "kiln" / "triton")
    # the engine says what it found in its environment (its /proc environ is overwritten by its process title)
    lines = [ln for ln in default_server.tail(10_000).splitlines() if "engine: Triton compile cache" in ln]
    assert lines and all(ln.rstrip().endswith(f"compile cache {expected}") for ln in lines), lines
    assert "[kiln-engine " in lines[0]
    assert Path(expected).is_dir()


def test_cache_under_kiln_cache_dir_and_an_explicit_one_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln"))
    assert setup_compile_cache() == str(tmp_path / "kiln" / "triton")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "kiln" / "triton") and (tmp_path / "kiln" / "triton").is_dir()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert setup_compile_cache() == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()
