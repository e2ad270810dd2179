"""End-to-end fixtures: a real `kiln serve` per test module (helpers in kiln_e2e.py).

    @pytest.fixture(scope="module")
    def server(kiln_server_factory):
        return kiln_server_factory(BATCH_SIZE="4")        # env overrides; started and ready
"""
from __future__ import annotations

import pytest

from kiln_e2e import KilnServer


@pytest.fixture(scope="module")
def kiln_server_factory(tmp_path_factory):
    """Start real servers for a module: factory(**env_overrides) -> a ready KilnServer; all are stopped at the
    end of the module."""
    servers: list[KilnServer] = []

    def factory(_args: tuple[str, ...] = (), _wait: bool = True, **env: str) -> KilnServer:
        s = KilnServer(tmp_path_factory.mktemp("kiln"), env, _args)
        servers.append(s)
        try:
            return s.start(wait=_wait)
        except Exception:
            s.kill()
            raise

    yield factory
    for s in servers:
        try:
            s.stop(timeout=60)
        finally:
            s.kill()


@pytest.fixture(scope="session")
def tokenizer():
    from kiln.models.default_model import default_model_dir
    from kiln.tokenizer import Tokenizer

    return Tokenizer.from_dir(default_model_dir())
