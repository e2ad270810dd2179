"""End-to-end fixtures: real `kiln serve` processes (helpers in kiln_e2e.py).

A module that needs the default settings (kiln_e2e.SMALL) uses the one server shared by the whole session:

    @pytest.fixture(scope="module")
    def server(default_server):
        return default_server

A module that needs other settings starts its own:

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
def _default_server_process(tmp_path_factory):
    s = KilnServer(tmp_path_factory.mktemp("kiln-default"))
    try:
        s.start()
    except Exception:
        s.kill()
        raise
    yield s
    try:
        s.stop(timeout=60)
    finally:
        s.kill()


@pytest.fixture(scope="module")
def default_server(_default_server_process):
    """The session's shared server with the default settings, started on first use (one boot instead of one
    per module). Its modules must leave it as they found it: at the end of each, it must still be serving and
    its engine idle with every KV block free, or the module fails here rather than the next one."""
    s = _default_server_process
    yield s
    assert s.proc.poll() is None, f"the shared server died during this module:\n{s.tail()}"
    s.wait_idle(60)


@pytest.fixture(scope="session")
def tokenizer():
    from kiln.models.default_model import default_model_dir
    from kiln.tokenizer import Tokenizer

    return Tokenizer.from_dir(default_model_dir())
