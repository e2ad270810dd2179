"""Ports for the tests' servers and engine processes, a block of them per pytest-xdist worker.

A port from bind(0) comes from the kernel's ephemeral range, which every process shares: between the test closing
its probe socket and the server binding the port, another worker's test (or any process's outgoing connection)
can take it. Each worker draws from its own block below that range instead (Linux's default starts at 32768),
each port checked free by a bind, so two workers never hand out the same one.
"""
from __future__ import annotations

import itertools
import os
import socket

BASE = 20000
PER_WORKER = 1000
MAX_BLOCKS = 12  # 20000 + 12 x 1000 stays below 32768

_counter = itertools.count()


def _block() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw0", "gw1", ...; unset without xdist
    return int(worker[2:]) % MAX_BLOCKS if worker[2:].isdigit() else 0


def free_ports(n: int) -> list[int]:
    """n distinct ports on 127.0.0.1 that nothing holds now, from this worker's block."""
    start = BASE + _block() * PER_WORKER
    ports: list[int] = []
    for _ in range(PER_WORKER):
        if len(ports) == n:
            break
        port = start + next(_counter) % PER_WORKER
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # held, or in TIME_WAIT after an earlier server: the next one
                continue
        if port not in ports:
            ports.append(port)
    if len(ports) < n:
        raise RuntimeError(f"no {n} free ports in {start}-{start + PER_WORKER - 1}")
    return ports


def free_port() -> int:
    return free_ports(1)[0]
