"""Shared fixtures for the whole test suite (keep this file small)."""

import pytest


@pytest.fixture(scope="session")
def default_model_dir():
    """The bundled SmolLM2-135M-Instruct, converted from its GGUF once into the normal cache
    ($KILN_CACHE_DIR or ~/.cache/kiln) and reused by later sessions."""
    from kiln.models.default_model import default_model_dir as _default_model_dir

    return _default_model_dir()
