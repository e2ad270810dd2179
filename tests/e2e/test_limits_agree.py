"""The front ends and the engine agree on every length limit: on a model whose max_position_embeddings (300)
is below MAX_SEQ_LEN + MAX_DEC_LEN (512 + 128), the longest prompt each API allows runs and one token more
is refused, through the native API, the OpenAI API, gRPC and the engine itself. The limit they share is the
one the engine publishes (EngineStats.max_model_len, on /v1/models and /stats)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

MODEL_LEN = 300          # the model's own limit, under MAX_SEQ_LEN + MAX_DEC_LEN = 640
TOKEN = 1000             # any id inside SmolLM2's vocabulary


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """The bundled model with max_position_embeddings cut to MODEL_LEN (weights linked, not copied)."""
    from kiln.models.default_model import resolve_model_path

    src = resolve_model_path(None)
    dst = tmp_path_factory.mktemp("short-model")
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["max_position_embeddings"] = MODEL_LEN
    (dst / "config.json").write_text(json.dumps(cfg))
    yield dst
    shutil.rmtree(dst, ignore_errors=True)


@pytest.fixture(scope="module")
def server(kiln_server_factory, short_model):
    return kiln_server_factory(MODEL_DIR=str(short_model), MAX_SEQ_LEN="512", MAX_DEC_LEN="128")


def native(server, n: int) -> requests.Response:
    return requests.post(f"{server.url}/v1/chat/completions", timeout=120,
                         json={"input_ids": [TOKEN] * n, "max_dec_len": 1, "temperature": 0})


def openai(server, n: int) -> requests.Response:
    return requests.post(f"{server.url}/v1/completions", timeout=120,
                         json={"model": "m", "prompt": [TOKEN] * n, "max_tokens": 1, "temperature": 0})


def grpc(server, n: int) -> dict | str:
    """The final packet, or the gRPC error's status."""
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports['GRPC_PORT']}")
    inp = grpcclient.InferInput("IN", [1], "BYTES")
    inp.set_data_from_numpy(np.array([json.dumps([{"input_ids": [TOKEN] * n, "max_dec_len": 1}])],
                                     dtype=np.object_))
    try:
        msg = json.loads(c.infer("model", [inp], client_timeout=120).as_numpy("OUT")[0])
        return msg[0] if isinstance(msg, list) else msg
    except InferenceServerException as e:
        return f"{e.status()}: {e.message()}"
    finally:
        c.close()


def test_the_published_limit_is_the_models(server):
    models = requests.get(f"{server.url}/v1/models", timeout=30).json()
    assert models["data"][0]["max_model_len"] == MODEL_LEN
    assert requests.get(f"{server.health_url}/stats", timeout=30).json()["max_model_len"] == MODEL_LEN


def test_every_front_end_runs_the_longest_prompt_and_refuses_one_more(server):
    # OpenAI and the engine: prompt + max_tokens <= max_model_len. The seed's APIs (native, gRPC) keep its
    # step 7, prompt + min_dec_len (>= 1) < max_model_len, so their longest prompt is one token shorter.
    fits, over = MODEL_LEN - 1, MODEL_LEN
    r = openai(server, fits)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text
    r = openai(server, over)
    assert r.status_code == 400 and f"maximum context length is {MODEL_LEN}" in r.json()["error"]["message"], r.text
    # without max_tokens the default is what is left: exactly one token
    r = requests.post(f"{server.url}/v1/completions", timeout=120,
                      json={"model": "m", "prompt": [TOKEN] * fits, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text

    fits, over = MODEL_LEN - 2, MODEL_LEN - 1
    r = native(server, fits)
    assert r.status_code == 200 and r.json()["tokens_all_num"] == 1, r.text
    r = native(server, over)
    assert r.status_code == 400 and r.json()["error_msg"] == (
        f"Input text is too long, input_ids_len ({over}) + min_dec_len (1) >= max_seq_len ({MODEL_LEN})"), r.text

    ok = grpc(server, fits)
    assert isinstance(ok, dict) and ok["is_end"] == 1 and ok["tokens_all_num"] == 1, ok
    refused = grpc(server, over)
    assert isinstance(refused, str) and refused.startswith("StatusCode.INVALID_ARGUMENT"), refused
    assert f"max_seq_len ({MODEL_LEN})" in refused


def test_the_engine_itself_draws_the_same_line(short_model):
    from kiln.engine.config import EngineConfig
    from kiln.engine.core import EngineCore
    from kiln.engine.request import SamplingParams

    core = EngineCore(EngineConfig(model=str(short_model), dtype="float32", device="cpu", num_gpu_blocks=64,
                                   max_model_len=512 + 128, warmup=False))
    try:
        assert core.max_model_len == MODEL_LEN == core.stats().max_model_len
        sp = SamplingParams(max_tokens=1, temperature=0.0)
        assert core.add_request("fits", [TOKEN] * (MODEL_LEN - 1), sp) is None
        over = core.add_request("over", [TOKEN] * MODEL_LEN, sp)
        assert over is not None and over.error_type == "too_long", over
        outs = []
        while core.has_unfinished():
            outs += core.step()
        assert [o.new_token_ids for o in outs if o.request_id == "fits"][-1] and outs[-1].finished
    finally:
        core.close()
