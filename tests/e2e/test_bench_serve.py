"""`kiln bench serve` over the seed's native streaming API and gRPC streaming, against the session's shared
server (its --cold start is tests/unit/test_bench.py's): the client's figures and the server's split of the same
requests, read from that server's requests.log."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("api", ["native", "grpc"])
def test_bench_serve_over_each_streaming_api(default_server, tmp_path, api):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "kiln.entrypoints.bench", "serve", "--api", api,
                        "--base-url", default_server.url,
                        "--grpc-url", f"127.0.0.1:{default_server.ports['GRPC_PORT']}",
                        "--request-log", str(default_server.log_dir / "requests.log"),
                        "--num-prompts", "3", "--input-len", "16", "--output-len", "6", "--vocab-limit", "2000",
                        "--output-json", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["api"] == api and r["completed"] == 3 and r["failed"] == 0, r["errors"]
    assert r["output_tok_s"] * r["duration_s"] == pytest.approx(3 * 6)   # every token counted once
    server = r["server"]
    assert server["matched"] == 3  # its own three requests among the shared server's others
    for part in ("queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "tpot_ms"):
        assert server[part]["median"] is not None and server[part]["median"] >= 0
    assert server["ttft_ms"]["median"] <= r["ttft_ms"]["median"] + 1.0
