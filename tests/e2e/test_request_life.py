"""A request's life on a real `kiln serve` with one batch slot and a one-deep queue: duplicate req_id, queue
full (429), client disconnect (aborted at once, KV blocks back), whole-request timeout (cancelled in the
engine), and the engine staying healthy through all of it."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

LONG = 120     # tokens of a "long" request (min_dec_len = max_dec_len: it cannot stop early)
# tokens of a request that must outlast a timeout of a few seconds: the CPU path runs ~70 tok/s at batch 1,
# so LONG alone ends in under 2 s
SLOW = 1000


@pytest.fixture(scope="module")
def server(kiln_server_factory):
    return kiln_server_factory(BATCH_SIZE="1", MAX_CACHED_TASK_NUM="1", MAX_DEC_LEN=str(SLOW + 24))


@pytest.fixture(autouse=True)
def idle(server):
    server.wait_idle(60)
    yield
    server.wait_idle(60)


def url(server):
    return server.url + "/v1/chat/completions"


def long_body(req_id: str, **kw) -> dict:
    b = {"text": "Tell me a long story.", "req_id": req_id, "max_dec_len": LONG, "min_dec_len": LONG,
         "stream": True}
    b.update(kw)
    return b


def wait_for(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Streamer:
    """A streaming request read in a thread; `close()` drops the connection mid-stream."""

    def __init__(self, u, body):
        self.url, self.body = u, body
        self.lines: list[dict] = []
        self.error = None
        self.sock = None
        self.connected = threading.Event()
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()
        assert self.connected.wait(30)

    def _read(self):
        # a raw socket, so that the request is sent (and can be dropped) before any answer comes
        try:
            host, port = self.url.split("//")[1].split("/")[0].split(":")
            path = "/" + self.url.split("//")[1].split("/", 1)[1]
            data = json.dumps(self.body).encode()
            self.sock = socket.create_connection((host, int(port)), timeout=120)
            self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            self.connected.set()
            f = self.sock.makefile("rb")
            status = f.readline()
            assert b" 200 " in status, status
            while f.readline().strip():     # headers
                pass
            while True:                     # chunked body: size line, data, CRLF
                size = int(f.readline().strip() or b"0", 16)
                if size == 0:
                    break
                chunk = f.read(size)
                f.readline()
                for line in chunk.splitlines():
                    if line.strip():
                        self.lines.append(json.loads(line))
        except Exception as e:  # noqa: BLE001 - closed on purpose
            self.error = e
        finally:
            self.connected.set()

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def join(self, timeout=120):
        self.t.join(timeout)
        assert not self.t.is_alive()


def test_duplicate_req_id_rejected_while_in_flight(server):
    a = Streamer(url(server), long_body("dup-1"))
    wait_for(lambda: len(a.lines) >= 2, what="first tokens")
    r = requests.post(url(server), json={"text": "hi", "req_id": "dup-1", "max_dec_len": 2}, timeout=30)
    assert r.status_code == 409
    b = r.json()
    assert b["error_msg"] == ("The req_id dup-1 already exists in the current batch, the current request will "
                              "be ignored.")
    assert b["error_code"] == 200 and b["req_id"] == "dup-1"
    a.join()
    # the first request was not disturbed
    assert a.lines[-1]["is_end"] == 1 and a.lines[-1]["tokens_all_num"] == LONG
    assert all(p["error_code"] == 0 for p in a.lines)
    # once finished, the id can be used again
    r = requests.post(url(server), json={"text": "hi", "req_id": "dup-1", "max_dec_len": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["error_code"] == 0


def test_queue_full_gets_429(server):
    a = Streamer(url(server), long_body("q-running"))
    wait_for(lambda: a.lines, what="first token of the running request")
    b = Streamer(url(server), long_body("q-waiting"))
    wait_for(lambda: server.stats()["num_waiting"] == 1, what="a waiting request")
    r = requests.post(url(server), json={"text": "hi", "req_id": "q-rejected", "max_dec_len": 2}, timeout=30)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json() == {"req_id": "q-rejected", "error_msg": "cached task num (1) exceeds the limit (1)",
                        "error_code": 200}
    # OpenAI flavour of the same, streamed or not
    for stream in (False, True):
        r = requests.post(server.url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2,
                                                                 "stream": stream}, timeout=30)
        assert r.status_code == 429 and "exceeds the limit" in r.json()["error"]["message"]
        assert r.headers["Retry-After"] == "1"
    # other refusals say nothing about retrying
    r = requests.post(url(server), json={"text": "hi", "temperature": -1}, timeout=30)
    assert r.status_code == 400 and "Retry-After" not in r.headers
    a.close()
    b.close()
    server.wait_idle(30)
    assert "req_id=q-running " in server.requests_log() and "finish_reason=abort" in server.requests_log()


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    s = Streamer(url(server), long_body("gone-1"))
    wait_for(lambda: len(s.lines) >= 3, what="a few tokens")
    during = wait_for(lambda: (lambda st: st if st["num_running"] == 1 else None)(server.stats()),
                      what="engine stats showing the request")
    assert during["num_free_blocks"] < during["num_total_blocks"]
    t0 = time.monotonic()
    s.close()
    st = server.wait_idle(10)
    assert time.monotonic() - t0 < 5           # at once, not after the remaining ~100 tokens
    assert st["num_free_blocks"] == st["num_total_blocks"]
    line = wait_for(lambda: [x for x in server.requests_log().splitlines() if "req_id=gone-1 " in x],
                    what="request log line")[0]
    assert "finish_reason=abort" in line


def test_disconnect_non_stream_aborts(server):
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(url(server), json=long_body("gone-2", stream=False, max_dec_len=SLOW, min_dec_len=SLOW),
                      timeout=2)
    st = server.wait_idle(10)
    assert st["num_free_blocks"] == st["num_total_blocks"]


def test_disconnect_openai_stream_aborts(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": LONG,
            "min_tokens": LONG, "stream": True}
    res = requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=60)
    it = res.iter_lines()
    lines = [next(it) for _ in range(3)]
    chunks = [json.loads(line[len(b"data: "):]) for line in lines if line.startswith(b"data: {")]
    assert chunks, "no SSE data chunk among the first lines"
    during = wait_for(lambda: (lambda st: st if st["num_running"] == 1 else None)(server.stats()),
                      what="engine stats showing the request")
    assert during["num_free_blocks"] < during["num_total_blocks"]
    t0 = time.monotonic()
    res.raw._fp.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    res.close()
    st = server.wait_idle(10)
    assert time.monotonic() - t0 < 5           # at once, not after the remaining ~100 tokens
    assert st["num_free_blocks"] == st["num_total_blocks"]
    # the engine request of choice 0 is "<completion id>-0"
    rid = f"{chunks[0]['id']}-0"
    line = wait_for(lambda: [x for x in server.requests_log().splitlines() if f"req_id={rid} " in x],
                    what="request log line")[0]
    assert "finish_reason=abort" in line, line


def test_disconnect_while_waiting_in_queue(server):
    a = Streamer(url(server), long_body("wq-running"))
    wait_for(lambda: a.lines, what="running")
    b = Streamer(url(server), long_body("wq-waiting"))
    wait_for(lambda: server.stats()["num_waiting"] == 1, what="waiting")
    b.close()
    wait_for(lambda: server.stats()["num_waiting"] == 0, timeout=10, what="the waiting request dropped")
    a.close()


def test_timeout_non_stream(server):
    t0 = time.monotonic()
    r = requests.post(url(server), json=long_body("to-1", stream=False, timeout=1, max_dec_len=SLOW, min_dec_len=SLOW),
                      timeout=60)
    assert time.monotonic() - t0 < 10
    assert r.status_code == 504
    b = r.json()
    assert b["req_id"] == "to-1" and b["error_code"] == 501 and "Timeout" in b["error_msg"]
    st = server.wait_idle(10)        # cancelled in the engine: nothing left running
    assert st["num_free_blocks"] == st["num_total_blocks"]


def test_timeout_stream_ends_with_error_packet(server):
    res = requests.post(url(server), json=long_body("to-2", timeout=2.5, max_dec_len=SLOW, min_dec_len=SLOW),
                        stream=True, timeout=60)
    lines = [json.loads(x) for x in res.iter_lines() if x]
    if res.status_code == 504:       # a very busy machine: not even the first token within the timeout
        assert len(lines) == 1 and lines[0]["error_code"] == 501
    else:
        assert res.status_code == 200
        assert len(lines) >= 2 and all(p["is_end"] == 0 for p in lines[:-1])
        assert len(lines) - 1 < SLOW
    assert lines[-1]["error_code"] == 501 and "Timeout" in lines[-1]["error_msg"]
    server.wait_idle(10)


def test_timeout_openai(server):
    r = requests.post(server.url + "/v1/completions", json={"model": "m", "prompt": "Once", "max_tokens": SLOW,
                                                             "min_tokens": SLOW, "timeout": 1}, timeout=60)
    assert r.status_code == 504 and "Timeout" in r.json()["error"]["message"]


def test_serves_normally_afterwards(server):
    r = requests.post(url(server), json={"text": "hi", "max_dec_len": 3, "min_dec_len": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["tokens_all_num"] == 3
    assert requests.get(server.health_url + "/v2/health/ready", timeout=5).status_code == 200
