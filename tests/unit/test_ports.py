"""The tests' port blocks (tests/helpers/ports.py): distinct, free, below the ephemeral range, one block a worker."""
import socket

from tests.helpers import ports


def test_each_worker_draws_free_distinct_ports_from_its_own_block(monkeypatch):
    seen = {}
    for worker in ("gw0", "gw1", "gw3"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        got = ports.free_ports(5)
        assert len(set(got)) == 5
        start = ports.BASE + int(worker[2:]) * ports.PER_WORKER
        assert all(start <= p < start + ports.PER_WORKER for p in got)
        for p in got:  # free: a server can bind it
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))
        seen[worker] = set(got)
    assert not (seen["gw0"] & seen["gw1"]) and not (seen["gw1"] & seen["gw3"])
    assert max(ports.BASE + ports.MAX_BLOCKS * ports.PER_WORKER, *seen["gw3"]) <= 32768


def test_a_held_port_is_skipped(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
    first = ports.free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        # the counter comes round to `first` again after PER_WORKER draws: it must not be handed out while held
        got = [ports.free_port() for _ in range(ports.PER_WORKER)]
    assert first not in got
