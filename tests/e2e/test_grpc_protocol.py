"""The KServe v2 gRPC service driven by the real tritonclient.grpc, in-process, with a scripted request runner
in place of the engine: protocol framing, final flags, errors, several requests on one stream, cancellation.
Fast (no model); tests/e2e/test_grpc_server.py covers the real server end to end."""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from kiln.server import grpc_server as G
from tests.helpers.grpc_clients import run_dying_client
from tests.helpers.ports import free_port


class FakeRunner:
    """Streams `n` token packets per request (n = max_dec_len), or an error for `text == "bad"`; slow when
    `slow` is set, so that cancellation can be observed."""

    def __init__(self):
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []

    async def __call__(self, req: dict, final_only: bool):
        rid = req["req_id"]
        self.started.append(rid)
        if req.get("text") == "bad":
            yield {"req_id": rid, "error_msg": "The `temperature` must be >= 0", "error_code": 400,
                   "error_type": "invalid", "is_end": 1}
            return
        if req.get("text") == "busy":
            yield {"req_id": rid, "error_msg": "cached task num (4) exceeds the limit (4)", "error_code": 200,
                   "error_type": "queue_full", "is_end": 1}
            return
        n = int(req.get("max_dec_len", 3))
        toks = [f"t{i}" for i in range(n)]
        try:
            for i, t in enumerate(toks):
                await asyncio.sleep(req.get("slow", 0.0))
                last = i == n - 1
                if final_only and not last:
                    continue
                p = {"req_id": rid, "token": t, "token_ids": [i], "send_idx": i, "is_end": int(last),
                     "error_msg": "", "error_code": 0}
                if last:
                    p.update(tokens_all="".join(toks), finish_reason="length")
                    self.finished.append(rid)
                yield p
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(rid)
            raise


@pytest.fixture(scope="module")
def server():
    runner = FakeRunner()
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder = {}

    def main():
        asyncio.set_event_loop(loop)

        async def go():
            servicer = G.KServeServicer(runner, lambda: True, ("my-model",), "0.1.0")
            holder["stop"] = asyncio.Event()
            holder["server"] = await G.start_server(servicer, f"127.0.0.1:{port}")
            started.set()
            await holder["stop"].wait()
            await holder["server"].stop(0)

        loop.run_until_complete(go())

    th = threading.Thread(target=main, daemon=True)
    th.start()
    assert started.wait(10)
    yield f"127.0.0.1:{port}", runner
    loop.call_soon_threadsafe(holder["stop"].set)
    th.join(10)
    assert not th.is_alive()


def make_inputs(req) -> list:
    inp = grpcclient.InferInput("IN", [1], "BYTES")
    inp.set_data_from_numpy(np.array([json.dumps([req])], dtype=np.object_))
    return [inp]


def decode(result) -> dict:
    msg = json.loads(result.as_numpy("OUT")[0])
    return msg[0] if isinstance(msg, list) else msg


def stream(url, reqs, timeout=20):
    """The seed's client pattern; returns {req_id: [(msg, final_flag), ...]}."""
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
    for r in reqs:
        client.async_stream_infer(model_name="model", inputs=make_inputs(r), request_id=r["req_id"],
                                  outputs=[grpcclient.InferRequestedOutput("OUT")])
    got: dict[str, list] = {}
    done = 0
    try:
        while done < len(reqs):
            r = q.get(timeout=timeout)
            if isinstance(r, Exception):
                raise r
            msg = decode(r)
            final = r.get_response().parameters["triton_final_response"].bool_param
            got.setdefault(r.get_response().id, []).append((msg, final))
            if msg.get("is_end") == 1 or msg.get("error_msg"):
                done += 1
    finally:
        client.stop_stream()
        client.close()
    return got


def test_health_and_metadata(server):
    url, _ = server
    c = grpcclient.InferenceServerClient(url)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("model") and c.is_model_ready("model", "1") and c.is_model_ready("my-model")
    assert not c.is_model_ready("nope")
    md = c.get_server_metadata(as_json=True)
    assert md["name"] == "kiln" and md["version"] == "0.1.0"
    mm = c.get_model_metadata("model", as_json=True)
    assert mm["name"] == "model" and mm["versions"] == ["1"]
    assert mm["inputs"] == [{"name": "IN", "datatype": "BYTES", "shape": ["1"]}]
    assert mm["outputs"] == [{"name": "OUT", "datatype": "BYTES", "shape": ["1"]}]
    cfg = c.get_model_config("model", as_json=True)["config"]
    assert cfg["model_transaction_policy"] == {"decoupled": True}
    assert cfg["input"][0]["data_type"] == "TYPE_STRING" and cfg["input"][0]["dims"] == ["1"]
    assert cfg["output"][0]["name"] == "OUT"
    with pytest.raises(InferenceServerException, match="unknown model"):
        c.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="unknown model"):
        c.get_model_config("model", "7")
    c.close()


def test_stream_one_packet_per_token_last_is_final(server):
    url, _ = server
    got = stream(url, [{"req_id": "s1", "text": "hi", "max_dec_len": 4}])["s1"]
    assert [m["send_idx"] for m, _ in got] == [0, 1, 2, 3]
    assert [f for _, f in got] == [False, False, False, True]
    assert got[-1][0]["is_end"] == 1 and got[-1][0]["tokens_all"] == "t0t1t2t3"


def test_stream_several_requests_share_one_stream(server):
    url, _ = server
    got = stream(url, [{"req_id": f"m{i}", "text": "x", "max_dec_len": 2 + i, "slow": 0.01} for i in range(3)])
    assert sorted(got) == ["m0", "m1", "m2"]
    for i in range(3):
        assert len(got[f"m{i}"]) == 2 + i and got[f"m{i}"][-1][1] is True


def test_stream_errors_are_final_packets(server):
    url, _ = server
    got = stream(url, [{"req_id": "e1", "text": "bad"}])["e1"]
    assert len(got) == 1
    (msg, final), = got
    assert final and msg["error_code"] == 400 and "temperature" in msg["error_msg"]


def test_stream_protocol_errors(server):
    url, _ = server
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
    # not JSON in IN -> a final error packet in OUT
    inp = grpcclient.InferInput("IN", [1], "BYTES")
    inp.set_data_from_numpy(np.array(["{not json"], dtype=np.object_))
    c.async_stream_infer("model", [inp], request_id="p1")
    r = q.get(timeout=10)
    msg = decode(r)
    assert "not valid JSON" in msg["error_msg"] and msg["error_code"] == 400 and msg["req_id"] == "p1"
    assert r.get_response().parameters["triton_final_response"].bool_param
    # wrong input name
    inp = grpcclient.InferInput("TEXT", [1], "BYTES")
    inp.set_data_from_numpy(np.array([json.dumps([{"text": "x"}])], dtype=np.object_))
    c.async_stream_infer("model", [inp], request_id="p2")
    assert "'IN'" in decode(q.get(timeout=10))["error_msg"]
    # unknown model: an error response, as Triton sends it
    c.async_stream_infer("nope", make_inputs({"text": "x"}), request_id="p3")
    err = q.get(timeout=10)
    assert isinstance(err, InferenceServerException) and "unknown model" in str(err)
    # the stream still works afterwards
    c.async_stream_infer("model", make_inputs({"req_id": "p4", "text": "x", "max_dec_len": 1}), request_id="p4")
    assert decode(q.get(timeout=10))["is_end"] == 1
    c.stop_stream()
    c.close()


def test_unary_infer_whole_answer(server):
    url, _ = server
    c = grpcclient.InferenceServerClient(url)
    res = c.infer("model", make_inputs({"req_id": "u1", "text": "hi", "max_dec_len": 5}), request_id="u1")
    msg = decode(res)
    assert msg["is_end"] == 1 and msg["tokens_all"] == "t0t1t2t3t4" and msg["req_id"] == "u1"
    assert res.get_response().id == "u1"
    # req_id defaults to the gRPC request id
    msg = decode(c.infer("model", make_inputs({"text": "hi", "max_dec_len": 1}), request_id="grpc-id"))
    assert msg["req_id"] == "grpc-id"
    with pytest.raises(InferenceServerException, match="temperature") as ei:
        c.infer("model", make_inputs({"req_id": "u2", "text": "bad"}))
    assert ei.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match=r"exceeds the limit \(4\); retry after 1 s") as ei:
        c.infer("model", make_inputs({"req_id": "u3", "text": "busy"}))
    assert ei.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    with pytest.raises(InferenceServerException, match="unknown model") as ei:
        c.infer("nope", make_inputs({"text": "x"}))
    assert ei.value.status() == "StatusCode.NOT_FOUND"
    c.close()


def test_stream_cancel_aborts_running_requests(server):
    url, runner = server
    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
    c.async_stream_infer("model", make_inputs({"req_id": "c1", "text": "x", "max_dec_len": 1000, "slow": 0.02}),
                         request_id="c1")
    assert decode(q.get(timeout=10))["send_idx"] == 0
    c.stop_stream(cancel_requests=True)
    c.close()
    deadline = time.time() + 10
    while "c1" not in runner.cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert "c1" in runner.cancelled and "c1" not in runner.finished


def test_stream_client_disconnect_aborts(server):
    url, runner = server
    out = run_dying_client(url, {"req_id": "d1", "text": "x", "max_dec_len": 1000, "slow": 0.02})
    assert '"send_idx": 0' in out
    deadline = time.time() + 10
    while "d1" not in runner.cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert "d1" in runner.cancelled and "d1" not in runner.finished


def test_stream_responses_from_templates_match_whole_ones():
    request = G.pb.ModelInferRequest(model_name="model", id="abc")
    respond = G.StreamResponses(request)
    packets = [{"req_id": "r", "token": f"t{i}", "token_ids": [i], "send_idx": i, "is_end": int(i == 2)}
               for i in range(3)]
    for packet in packets:  # each response is its own copy: a later packet leaves earlier responses as they were
        final = packet["is_end"] == 1
        got = respond(packet, final)
        want = G.pb.ModelStreamInferResponse(infer_response=G.make_response(packet, request, final))
        assert got == want and got.SerializeToString() == want.SerializeToString()
        assert json.loads(G.deserialize_bytes_tensor(got.infer_response.raw_output_contents[0])[0]) == [packet]
    assert respond.templates[False].infer_response.raw_output_contents[0] == G.serialize_bytes_tensor([b"[{}]"])


def test_bytes_tensor_roundtrip():
    items = [b"", b"abc", "héllo".encode()]
    assert G.deserialize_bytes_tensor(G.serialize_bytes_tensor(items)) == items
    with pytest.raises(ValueError):
        G.deserialize_bytes_tensor(b"\x05\x00\x00\x00ab")


def test_shutdown_lets_running_requests_finish_and_ends_idle_streams():
    runner = FakeRunner()
    port = free_port()
    loop = asyncio.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    servicer = G.KServeServicer(runner, lambda: True)
    server = asyncio.run_coroutine_threadsafe(G.start_server(servicer, f"127.0.0.1:{port}"), loop).result(10)
    url = f"127.0.0.1:{port}"
    try:
        idle = grpcclient.InferenceServerClient(url)
        idle.start_stream(callback=lambda result, error: None)      # open, never used
        q: queue.Queue = queue.Queue()
        busy = grpcclient.InferenceServerClient(url)
        busy.start_stream(callback=partial(lambda q, result, error: q.put(error or result), q))
        busy.async_stream_infer("model", make_inputs({"req_id": "sd1", "text": "x", "max_dec_len": 20,
                                                      "slow": 0.05}), request_id="sd1")
        assert decode(q.get(timeout=10))["send_idx"] == 0

        async def stop():
            servicer.begin_shutdown()
            await server.stop(30)

        t0 = time.time()
        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        assert time.time() - t0 < 10            # not the 30 s grace: the idle stream did not hold it
        msgs = [{"is_end": 0}]
        while msgs[-1]["is_end"] != 1:
            msgs.append(decode(q.get(timeout=10)))
        assert msgs[-1]["send_idx"] == 19                  # the running request finished
        assert "sd1" in runner.finished
        idle.close()
        busy.close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)


def test_queue_full_carries_a_retry_hint_in_trailing_metadata(server):
    """RESOURCE_EXHAUSTED from a full queue says when to retry (trailing metadata `retry-after`, seconds); other
    errors carry none."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    url, _ = server

    def request(text: str):
        r = service_pb2.ModelInferRequest(model_name="model", id="rt")
        inp = r.inputs.add(name="IN", datatype="BYTES", shape=[1])
        inp.contents.bytes_contents.append(json.dumps([{"req_id": "rt", "text": text}]).encode())
        return r

    with grpc.insecure_channel(url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(request("busy"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(ei.value.trailing_metadata())["retry-after"] == "1"
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(request("bad"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "retry-after" not in dict(ei.value.trailing_metadata() or ())
