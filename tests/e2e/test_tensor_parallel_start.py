"""`kiln serve` with an MP_NUM the model's heads cannot be split over: it exits non-zero at start with one line
that names the numbers and the MP_NUM values that would work (no worker rank is started)."""
from __future__ import annotations

from tests.e2e.kiln_e2e import KilnServer
from tests.helpers.tiny_models import write_tiny_model


def test_serve_refuses_mp_num_that_does_not_split_the_heads(tmp_path):
    model = write_tiny_model("llama", tmp_path / "llama")  # 4 heads, 2 KV heads
    srv = KilnServer(tmp_path / "srv", env={"MODEL_DIR": str(model), "MP_NUM": "3"})
    srv.start(wait=False)
    try:
        code = srv.proc.wait(timeout=180)
    finally:
        srv.kill()
    assert code != 0
    console = srv.console.read_text()
    assert "kiln serve: error: the engine core exited (exit code 3)" in console, console[-3000:]
    assert ("engine failed to start: MP_NUM=3 does not fit the model: 4 attention heads cannot be split over 3 "
            "ranks (4 heads, 2 KV heads, intermediate size 128); MP_NUM=1 or 2 or 4 would work") in console
    assert "kiln-tp-rank" not in console and "init_process_group" not in console  # refused before any rank
