"""A tritonclient stream client that dies with its stream open, in a process of its own (the e2e tests of the gRPC
front end, against the fake engine and the real one, check that the server aborts its request)."""
from __future__ import annotations

import json
import subprocess
import sys

_DYING_CLIENT = """
import json, os, queue, sys
from functools import partial
import numpy as np
import tritonclient.grpc as grpcclient
url, req, wait = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
q = queue.Queue()
c = grpcclient.InferenceServerClient(url)
c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
inp = grpcclient.InferInput("IN", [1], "BYTES")
inp.set_data_from_numpy(np.array([json.dumps([req])], dtype=np.object_))
c.async_stream_infer("model", [inp], request_id=req["req_id"])
print(q.get(timeout=wait).as_numpy("OUT")[0].decode(), flush=True)
os._exit(0)   # the process dies with its stream open
"""


def run_dying_client(url: str, req: dict, first_response_timeout: float = 30) -> str:
    """Streams `req` (a seed request dict) to the server at url, prints its first response and exits without closing
    the stream; returns that response's text."""
    p = subprocess.run([sys.executable, "-c", _DYING_CLIENT, url, json.dumps(req), str(first_response_timeout)],
                       capture_output=True, text=True, timeout=first_response_timeout + 60)
    assert p.returncode == 0, p.stderr
    return p.stdout
