"""kiln.models.loader.read_ahead: the checkpoint's tensors come in file order, read on a helper thread ahead of
the caller (start to ready: the reads overlap the copies to the GPU), and a caller that stops early leaves no read
running on a file that is closed."""
from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

from kiln.models.loader import read_ahead


@pytest.fixture
def files(tmp_path):
    out = []
    for f in range(3):
        tensors = {f"t{f}.{i}": torch.full((4, 3), float(10 * f + i)) for i in range(f + 2)}
        save_file(tensors, str(tmp_path / f"model-{f}.safetensors"))
        out.append(tmp_path / f"model-{f}.safetensors")
    return out


def test_every_tensor_in_order_and_read_on_another_thread(files, monkeypatch):
    import safetensors

    readers = set()
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            readers.add(threading.current_thread().name)
            return self.f.get_tensor(name)

    monkeypatch.setattr("kiln.models.loader.safe_open", Spy)
    got = [(p.name, n, t[0, 0].item()) for p, n, t in read_ahead(files, depth=2)]
    want = []
    for f, path in enumerate(files):
        with real(str(path), framework="pt") as h:
            want += [(path.name, name, float(10 * f + int(name.split(".")[1]))) for name in h.keys()]
    assert got == want and len(got) == 2 + 3 + 4
    assert readers and all(r.startswith("kiln-weights") for r in readers), readers


def test_a_caller_that_stops_early_leaves_no_read_behind(files):
    gen = read_ahead(files, depth=3)
    next(gen)
    gen.close()  # what an exception in the caller's loop does
    assert not [t for t in threading.enumerate() if t.name.startswith("kiln-weights")]
