"""Shared fixtures for the whole test suite (keep this file small)."""

import os

import pytest


def pytest_configure(config):
    """Under pytest-xdist (scripts/test.sh), each worker's torch gets its share of the cores: two workers each
    running torch's default pool (a thread per core) make every parallel region of the in-process engines wait
    for a thread that the other worker has pre-empted (the structured-output engine tests ran 5x slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        from kiln.threads import usable_cores

        torch.set_num_threads(max(1, usable_cores() // workers))


@pytest.fixture(scope="session")
def default_model_dir():
    """The bundled SmolLM2-135M-Instruct, converted from its GGUF once into the normal cache
    ($KILN_CACHE_DIR or ~/.cache/kiln) and reused by later sessions."""
    from kiln.models.default_model import default_model_dir as _default_model_dir

    return _default_model_dir()
