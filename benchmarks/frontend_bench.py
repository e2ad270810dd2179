"""How many streamed events one HTTP worker (or the gRPC front end) delivers per second, without the model.

Three processes: a fake engine core (the real wire protocol of kiln/engine/wire.py on a ZMQ ROUTER, admitting
front ends by the hello/secret handshake of kiln/engine/core.py, one Outputs message per client per "step" with
one token for every running request, every --step-ms), one real HTTP worker (kiln.server.http.run_worker with
the real tokenizer, so detokenization is paid), and this client: --streams concurrent streaming requests over raw
asyncio sockets (a minimal HTTP/1.1 client, so the client costs far less CPU than the worker it measures).

    .venv/bin/python benchmarks/frontend_bench.py --api openai --streams 256 --step-ms 8 --seconds 10

`--api grpc` measures the KServe v2 gRPC front end (its own process, as `kiln serve` runs it) under ModelStreamInfer
streams of a grpc.aio client, each response one event.

prints one JSON line: events/s delivered (SSE `data:` events for OpenAI, NDJSON lines for the native API), the
tokens/s the fake engine emitted, and events per second of the worker's own CPU time (`events_per_cpu_s`: its
capacity with a core to itself, the figure that holds on a shared machine). `--profile out.prof` runs the worker under cProfile.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------------------------------
# the fake engine core
# ----------------------------------------------------------------------------------------------------

def fake_engine(port_box, secret: str, step_s: float, token_ids: list[int], max_model_len: int, emitted) -> None:
    """Speaks kiln/engine/wire.py like run_engine_core: hello + secret first, stats every 0.25 s, and per step
    one Outputs per front end carrying one new token of each of its running requests. `emitted` (a shared
    counter) counts the tokens sent, so the client can tell a slow worker from a fake engine that fell behind."""
    import zmq

    from kiln.engine.core import FrontEnds
    from kiln.engine.request import EngineOutput, EngineStats
    from kiln.engine.wire import Abort, AddRequest, Hello, Outputs, Stats, WireError, decode, encode

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    for opt, v in ((zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.LINGER, 0)):
        sock.setsockopt(opt, v)
    port_box.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    fronts = FrontEnds(secret)
    running: dict[str, list] = {}      # request id -> [front end identity, tokens left, prompt length, tokens sent]
    stats = lambda: Stats(EngineStats(timestamp=time.time(), num_running=len(running), max_batch_size=1024,  # noqa: E731
                                      ready=True, max_model_len=max_model_len))
    next_step = time.monotonic() + step_s
    last_stats = 0.0
    while True:
        now = time.monotonic()
        if sock.poll(max(0, int((next_step - now) * 1000))):
            while True:
                try:
                    ident, raw = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = decode(raw)
                except WireError:
                    continue
                if not fronts.admit(ident, msg):
                    continue
                if isinstance(msg, Hello):
                    sock.send_multipart([ident, encode(stats())])
                elif isinstance(msg, AddRequest):
                    running[msg.request_id] = [ident, int(msg.params.get("max_tokens", 16)),
                                               len(msg.prompt_token_ids), 0]
                elif isinstance(msg, Abort):
                    for rid in msg.request_ids:
                        running.pop(rid, None)
        now = time.monotonic()
        if now >= next_step:
            next_step += step_s
            if next_step < now:          # fell behind (a loaded machine): never burst to catch up
                next_step = now + step_s
            per_client: dict[bytes, list] = {}
            for rid, r in list(running.items()):
                ident, left, n_prompt, sent = r
                r[1], r[3] = left - 1, sent + 1
                done = r[1] <= 0
                out = EngineOutput(rid, [token_ids[sent % len(token_ids)]], done, "length" if done else None,
                                   n_prompt, queue_time=0.0 if sent == 0 else None)
                per_client.setdefault(ident, []).append(out)
                if done:
                    del running[rid]
            for ident, batch in per_client.items():
                sock.send_multipart([ident, encode(Outputs(batch))])
                emitted.value += len(batch)
        if now - last_stats >= 0.25:
            last_stats = now
            for ident in list(fronts.pid):
                sock.send_multipart([ident, encode(stats())])


# ----------------------------------------------------------------------------------------------------
# the HTTP worker
# ----------------------------------------------------------------------------------------------------

def run_profiled(main, profile: str | None) -> None:
    """main(), under cProfile when `profile` names a file (SIGUSR1 dumps it; the process is ended afterwards)."""
    if not profile:
        main()
        return
    import cProfile
    import signal

    prof = cProfile.Profile()
    signal.signal(signal.SIGUSR1, lambda *_: prof.dump_stats(profile))
    prof.enable()
    main()


def worker(cfg, sock: socket.socket, started, profile: str | None) -> None:
    from kiln.server import http
    from kiln.threads import configure_threads

    configure_threads("http")
    run_profiled(lambda: http.run_worker(cfg, sock, 0, started), profile)


def grpc_front_end(cfg, profile: str | None) -> None:
    """The KServe v2 gRPC front end (kiln.server.grpc_server.run), as the supervisor starts it."""
    from kiln.server import grpc_server
    from kiln.threads import configure_threads

    configure_threads("grpc")
    run_profiled(lambda: grpc_server.run(cfg), profile)


# ----------------------------------------------------------------------------------------------------
# the client
# ----------------------------------------------------------------------------------------------------

def request_bytes(api: str, port: int, max_tokens: int) -> bytes:
    if api == "openai":
        path, body = "/v1/completions", {"model": "default", "prompt": "Hello there", "max_tokens": max_tokens,
                                         "stream": True, "ignore_eos": True}
    elif api == "chat":
        path, body = "/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "Hi"}],
                                              "max_tokens": max_tokens, "stream": True}
    else:
        path, body = "/v1/chat/completions", {"text": "Hello there", "max_dec_len": max_tokens, "stream": True}
    raw = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw


async def one_stream(port: int, req: bytes, marker: bytes, counter: list, stop_at: float) -> None:
    """Streams requests back to back until stop_at; counts events by their marker (a chunk boundary can split
    a marker, which at worst miscounts one event in a chunk's length: negligible)."""
    while time.monotonic() < stop_at:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"worker answered {head[:200]!r}")
        while True:
            data = await reader.read(65536)
            if not data:
                break
            counter[0] += data.count(marker)
            if data.endswith(b"0\r\n\r\n"):      # the chunked body's end
                break
            if time.monotonic() >= stop_at:
                break
        writer.close()


async def one_grpc_stream(port: int, max_tokens: int, counter: list, stop_at: float) -> None:
    """ModelStreamInfer requests back to back until stop_at, each on its own stream (as tritonclient's
    stream_infer does), counting responses. grpc.aio with prebuilt request messages: the lightest gRPC client
    Python has, still far heavier than the HTTP client above (the worker's CPU-second rate is the figure)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            body = json.dumps([{"req_id": f"g{n}-{os.urandom(6).hex()}", "text": "Hello there",
                                "max_dec_len": max_tokens, "min_dec_len": max_tokens}]).encode()
            req = pb.ModelInferRequest(model_name="model", id="r")
            req.inputs.add(name="IN", datatype="BYTES", shape=[1])
            req.raw_input_contents.append(len(body).to_bytes(4, "little") + body)
            call = stub.ModelStreamInfer(iter([req]))
            async for resp in call:
                if resp.error_message:
                    raise RuntimeError(f"front end answered {resp.error_message!r}")
                counter[0] += 1
                if resp.infer_response.parameters["triton_final_response"].bool_param:
                    break
                if time.monotonic() >= stop_at:
                    break
            call.cancel()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(port: int, api: str, streams: int, seconds: float, warmup: float, max_tokens: int, emitted,
                worker_pid: int) -> dict:
    counter = [0]
    start = time.monotonic()
    stop_at = start + warmup + seconds
    if api == "grpc":
        tasks = [asyncio.create_task(one_grpc_stream(port, max_tokens, counter, stop_at)) for _ in range(streams)]
    else:
        req = request_bytes(api, port, max_tokens)
        marker = b"data: {" if api in ("openai", "chat") else b"}\n"
        tasks = [asyncio.create_task(one_stream(port, req, marker, counter, stop_at)) for _ in range(streams)]
    await asyncio.sleep(warmup)
    c0, e0, cpu0, t0 = counter[0], emitted.value, cpu_seconds(worker_pid), time.monotonic()
    await asyncio.sleep(seconds)
    c1, e1, cpu1, t1 = counter[0], emitted.value, cpu_seconds(worker_pid), time.monotonic()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"events": c1 - c0, "seconds": round(t1 - t0, 2), "events_per_s": round((c1 - c0) / (t1 - t0), 1),
            "engine_tok_s": round((e1 - e0) / (t1 - t0), 1), "worker_cpu_s": round(cpu1 - cpu0, 2),
            # what one worker delivers per second of CPU: its capacity with a core to itself, whatever else ran
            "events_per_cpu_s": round((c1 - c0) / max(cpu1 - cpu0, 1e-9), 1)}


def wait_grpc_ready(port: int, timeout: float) -> None:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the gRPC front end was not ready within {timeout:.0f} s")


def run(api: str = "openai", streams: int = 256, step_ms: float = 8.0, seconds: float = 10.0, warmup: float = 3.0,
        max_tokens: int = 200, profile: str | None = None) -> dict:
    from kiln.config import KilnConfig
    from kiln.entrypoints.serve import bind_listen
    from kiln.tokenizer import Tokenizer

    ctx = mp.get_context("spawn")
    cfg = KilnConfig.load({"PUSH_MODE_HTTP_WORKERS": "1"}).resolve()
    cfg.engine_secret = secrets.token_hex(16)
    tok = Tokenizer.from_dir(cfg.model_path)
    token_ids = tok.encode(" the quick brown fox jumps over the lazy dog, and then it rests a while.",
                           add_special_tokens=False)
    port_box = ctx.Queue()
    emitted = ctx.Value("q", 0, lock=False)
    engine = ctx.Process(target=fake_engine, args=(port_box, cfg.engine_secret, step_ms / 1000, token_ids, 8192,
                                                   emitted), daemon=True)
    engine.start()
    cfg.infer_queue_port = port_box.get(timeout=60)
    started = ctx.Event()
    if api == "grpc":
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = cfg.grpc_port = free.getsockname()[1]
        cfg.host = "127.0.0.1"
        w = ctx.Process(target=grpc_front_end, args=(cfg, profile), daemon=True)
    else:
        http_sock = bind_listen("http", "127.0.0.1", 0)
        port = http_sock.getsockname()[1]
        w = ctx.Process(target=worker, args=(cfg, http_sock, started, profile), daemon=True)
    w.start()
    try:
        if api == "grpc":
            wait_grpc_ready(port, 120)
        elif not started.wait(120):
            raise RuntimeError("the HTTP worker did not start within 120 s")
        result = asyncio.run(drive(port, api, streams, seconds, warmup, max_tokens, emitted, w.pid))
        if profile:
            import signal
            os.kill(w.pid, signal.SIGUSR1)
            time.sleep(2)
    finally:
        for p in (w, engine):
            p.terminate()
        for p in (w, engine):
            p.join(10)
            if p.is_alive():
                p.kill()
    offered = streams * 1000 / step_ms
    return {"api": api, "streams": streams, "step_ms": step_ms, "offered_tok_s": round(offered, 1), **result,
            "cpu": os.cpu_count()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", default="openai", choices=["openai", "chat", "native", "grpc"])
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=8.0, help="the fake engine's step interval")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds before the window opens")
    ap.add_argument("--max-tokens", type=int, default=200, help="tokens per request (then a new request)")
    ap.add_argument("--profile", default=None, help="cProfile the worker into this file")
    a = ap.parse_args(argv)
    print(json.dumps(run(a.api, a.streams, a.step_ms, a.seconds, a.warmup, a.max_tokens, a.profile)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
