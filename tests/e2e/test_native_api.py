"""The seed's native HTTP API on a real `kiln serve` (default model): the deploy guide's snippets as written,
curl, every validation rule of the seed (spec section 3), packets, unicode, health and the request log."""
from __future__ import annotations

import json
import subprocess
import uuid

import pytest
import requests


@pytest.fixture(scope="module")
def server(default_server):
    return default_server


@pytest.fixture(scope="module")
def url(server):
    return server.url + "/v1/chat/completions"


def post(url, body, **kw):
    return requests.post(url, json=body, timeout=120, **kw)


def stream_lines(url, body):
    res = requests.post(url, json=body, stream=True, timeout=120)
    assert res.status_code == 200, res.text
    return [json.loads(line) for line in res.iter_lines() if line]


# -- the deploy guide, as written ---------------------------------------------------------------------

def test_guide_python_snippets(server, capsys):
    push_mode_http_port = str(server.ports["PUSH_MODE_HTTP_PORT"])    # 服务配置的PUSH_MODE_HTTP_PORT
    url = f"http://127.0.0.1:{push_mode_http_port}/v1/chat/completions"
    req_id = str(uuid.uuid1())
    data_single = {
        "text": "Hello, how are you?",
        "req_id": req_id,
        "max_dec_len": 64,
        "stream": True,
    }
    # 逐token返回
    res = requests.post(url, json=data_single, stream=True)
    packets = []
    for line in res.iter_lines():
        print(json.loads(line))
        packets.append(json.loads(line))

    # 多轮对话
    data_multi = {
        "messages": [
            {"role": "user", "content": "Hello, who are you"},
            {"role": "system", "content": "I'm a helpful AI assistant."},
            {"role": "user", "content": "List 3 countries and their capitals."},
        ],
        "req_id": req_id,
        "max_dec_len": 64,
        "stream": True,
    }
    # 逐token返回
    res = requests.post(url, json=data_multi, stream=True)
    multi = []
    for line in res.iter_lines():
        print(json.loads(line))
        multi.append(json.loads(line))

    for ps in (packets, multi):
        assert ps and all(p["req_id"] == req_id and p["error_code"] == 0 and p["error_msg"] == "" for p in ps)
        assert [p["send_idx"] for p in ps] == list(range(len(ps)))
        assert [p["is_end"] for p in ps] == [0] * (len(ps) - 1) + [1]
        last = ps[-1]
        assert last["finish_reason"] in ("stop", "length")
        assert last["tokens_all"] == "".join(p["token"] for p in ps)
        assert last["tokens_all_num"] == len(last["tokens_all_ids"]) == len(ps) <= 64
        assert sum((p["token_ids"] for p in ps), []) == last["tokens_all_ids"]
    assert len(capsys.readouterr().out.splitlines()) == len(packets) + len(multi)


def test_guide_curl(server):
    port = server.ports["PUSH_MODE_HTTP_PORT"]
    out = subprocess.run(["curl", "-s", f"127.0.0.1:{port}/v1/chat/completions", "-H",
                          "Content-Type: application/json", "-d", '{"text": "hello, llm"}'],
                         capture_output=True, text=True, timeout=120)
    body = json.loads(out.stdout)
    assert body["error_code"] == 0 and body["error_msg"] == ""
    assert body["result"] == body["tokens_all"] and body["result"]
    assert body["finish_reason"] in ("stop", "length")
    assert 1 <= body["tokens_all_num"] <= 128      # default max_dec_len = min(room left, MAX_DEC_LEN)


def test_curl_stream(server):
    port = server.ports["PUSH_MODE_HTTP_PORT"]
    out = subprocess.run(["curl", "-sN", f"127.0.0.1:{port}/v1/chat/completions", "-d",
                          '{"text": "Count to five.", "stream": true, "max_dec_len": 8}'],
                         capture_output=True, text=True, timeout=120)
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
    assert lines[-1]["is_end"] == 1 and all(p["is_end"] == 0 for p in lines[:-1])


# -- answers ----------------------------------------------------------------------------------------------

def test_non_stream_result_and_usage(url):
    r = post(url, {"text": "Name a color.", "max_dec_len": 6, "min_dec_len": 6, "return_usage": True,
                   "req_id": "ns-1"})
    assert r.status_code == 200
    b = r.json()
    assert b["req_id"] == "ns-1" and b["error_code"] == 0 and b["error_msg"] == ""
    assert b["result"] == b["tokens_all"]
    assert b["tokens_all_num"] == 6 and len(b["tokens_all_ids"]) == 6 and b["finish_reason"] == "length"
    u = b["usage"]
    assert u["completion_tokens"] == 6 and u["prompt_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_stream_usage_and_seed_in_packets(url):
    ps = stream_lines(url, {"text": "Hi", "max_dec_len": 4, "min_dec_len": 4, "stream": True,
                            "return_usage": True, "seed": 7})
    assert [p["usage"]["completion_tokens"] for p in ps] == [1, 2, 3, 4]
    assert all(p["infer_seed"] == 7 for p in ps)
    assert all(p["inference_time_cost"] >= 0 for p in ps)


def test_greedy_is_deterministic_and_text_input_ids_messages_agree(url, tokenizer):
    body = {"text": "What is the capital of France?", "temperature": 0, "max_dec_len": 12}
    a, b = post(url, body).json(), post(url, body).json()
    assert a["tokens_all_ids"] == b["tokens_all_ids"]
    # text is wrapped in the chat template as one user turn: the same prompt as messages / input_ids
    m = post(url, {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                   "temperature": 0, "max_dec_len": 12}).json()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    i = post(url, {"input_ids": ids, "temperature": 0, "max_dec_len": 12, "return_usage": True}).json()
    assert m["tokens_all_ids"] == a["tokens_all_ids"] == i["tokens_all_ids"]
    assert i["usage"]["prompt_tokens"] == len(ids)


def test_seeded_sampling_is_reproducible(url):
    body = {"text": "Write a word.", "temperature": 1.0, "topp": 1.0, "seed": 1234, "max_dec_len": 10}
    assert post(url, body).json()["tokens_all_ids"] == post(url, body).json()["tokens_all_ids"]


def test_aliases_max_tokens_seq_len_top_p(url):
    b = post(url, {"text": "Hi", "max_tokens": 3, "min_dec_len": 3, "top_p": 0.5}).json()
    assert b["tokens_all_num"] == 3
    b = post(url, {"text": "Hi", "seq_len": 2, "min_dec_len": 2}).json()
    assert b["tokens_all_num"] == 2


def test_system_field(url, tokenizer):
    b = post(url, {"text": "Who are you?", "system": "You are a pirate.", "max_dec_len": 4,
                   "return_usage": True}).json()
    ids = tokenizer.apply_chat_template([{"role": "system", "content": "You are a pirate."},
                                         {"role": "user", "content": "Who are you?"}])
    assert b["error_code"] == 0 and b["usage"]["prompt_tokens"] == len(ids)


def test_stop_sequences_cut_the_text(url):
    base = post(url, {"text": "List three fruits.", "temperature": 0, "max_dec_len": 24}).json()
    text = base["tokens_all"]
    words = text.split()
    assert len(words) > 3, text
    stop = words[2]
    cut = post(url, {"text": "List three fruits.", "temperature": 0, "max_dec_len": 24,
                     "stop_sequences": [stop]}).json()
    assert cut["finish_reason"] == "stop"
    assert cut["tokens_all"] == text[:text.index(stop)]


def test_eos_token_ids_end_generation(url):
    base = post(url, {"text": "Say hello.", "temperature": 0, "max_dec_len": 10, "min_dec_len": 10}).json()
    third = base["tokens_all_ids"][2]
    b = post(url, {"text": "Say hello.", "temperature": 0, "max_dec_len": 10, "eos_token_ids": third}).json()
    assert b["finish_reason"] == "stop"
    assert b["tokens_all_ids"][-1] == third and len(b["tokens_all_ids"]) <= 3


def test_return_all_tokens_sends_one_packet(url):
    ps = stream_lines(url, {"text": "Hi", "max_dec_len": 5, "min_dec_len": 5, "stream": True,
                            "return_all_tokens": True})
    assert len(ps) == 1
    p = ps[0]
    assert p["is_end"] == 1 and p["token"] == p["tokens_all"] and p["tokens_all_num"] == 5


def test_benchmark_timestamps(url):
    ps = stream_lines(url, {"text": "Hi", "max_dec_len": 2, "stream": True, "benchmark": True})
    for k in ("preprocess_start_time", "preprocess_end_time", "schedule_start_time", "inference_start_time",
              "inference_current_step_time"):
        assert isinstance(ps[-1][k], float), k
    assert ps[-1]["preprocess_start_time"] <= ps[-1]["inference_current_step_time"]


def test_native_body_on_v1_completions(server):
    b = post(server.url + "/v1/completions", {"text": "Hi", "max_dec_len": 2}).json()
    assert b["error_code"] == 0 and "result" in b


def test_unicode_prompt_and_output_survive(url, tokenizer):
    text = "你好，世界！🌍 Ünïcödé — 请用中文介绍一下你自己，并加上表情符号。"
    ps = stream_lines(url, {"text": text, "max_dec_len": 40, "stream": True, "return_usage": True,
                            "temperature": 0})
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    assert ps[-1]["usage"]["prompt_tokens"] == len(ids)
    joined = "".join(p["token"] for p in ps)
    assert joined == ps[-1]["tokens_all"] == tokenizer.decode(ps[-1]["tokens_all_ids"])
    # no packet carries half a character (only a length-cut end may hold an unfinished one)
    for p in ps[:-1]:
        assert "\ufffd" not in p["token"]
    body = post(url, {"text": text, "max_dec_len": 40, "temperature": 0}).json()
    assert body["result"] == joined
    assert json.loads(json.dumps(body, ensure_ascii=False)) == body


# -- validation (spec section 3): HTTP status + the seed's body ---------------------------------------------

LONG_IDS_OVER_MAX_SEQ = [1000] * 600        # MAX_SEQ_LEN=512, max_model_len = 512 + 128 = 640
LONG_IDS_NO_ROOM = [1000] * 639

BAD = [
    ({}, "The input parameters should contain either `text`, `input_ids` or `messages`"),
    ({"req_id": "x"}, "The input parameters should contain either `text`, `input_ids` or `messages`"),
    ({"text": 123}, "The `text` in input parameters must be a string"),
    ({"text": ""}, "The `text` in input parameters cannot be empty"),
    ({"input_ids": "1 2 3"}, "The `input_ids` in input parameters must be a list"),
    ({"input_ids": [1, "a"]}, "The `input_ids` must be a list of non-negative integers"),
    ({"messages": "hi"}, "The `messages` in input parameters must be a list"),
    ({"messages": [{"role": "user"}]}, "The item in messages must include `content`"),
    ({"text": "hi", "min_dec_len": 0}, "The `min_dec_len` must be an integer and greater than 0"),
    ({"text": "hi", "min_dec_len": 1.5}, "The `min_dec_len` must be an integer and greater than 0"),
    ({"text": "hi", "max_dec_len": 0}, "The `max_dec_len` must be an integer and greater than 0"),
    ({"text": "hi", "max_dec_len": "8"}, "The `max_dec_len` must be an integer and greater than 0"),
    ({"text": "hi", "seq_len": -1}, "The `seq_len` must be an integer and greater than 0"),
    ({"text": "hi", "max_tokens": 2.5}, "The `max_tokens` must be an integer and greater than 0"),
    ({"text": "hi", "topp": 0.5, "top_p": 0.5}, "Only one of ('topp', 'top_p') should be set"),
    ({"text": "hi", "topp": 1.5}, "The `topp` must be in [0, 1]"),
    ({"text": "hi", "top_p": -0.1}, "The `top_p` must be in [0, 1]"),
    ({"text": "hi", "temperature": -0.5}, "The `temperature` must be >= 0"),
    ({"text": "hi", "temperature": "hot"}, "The `temperature` must be a number"),
    ({"text": "hi", "eos_token_ids": "2"}, "The `eos_token_ids` must be a list"),
    ({"text": "hi", "seed": 1, "infer_seed": 2}, "Only one of ('infer_seed', 'seed') should be set"),
    ({"text": "hi", "stream": "yes"}, "The `stream` must be a boolean"),
    ({"text": "hi", "timeout": 0}, "The `timeout` must be a number of seconds greater than 0"),
    ({"text": "hi", "penalty_score": 0}, "The `penalty_score` must be in (0"),
    ({"text": "hi", "frequency_score": 3}, "The `frequency_score` must be in [-2, 2]"),
    ({"text": "hi", "presence_score": -3}, "The `presence_score` must be in [-2, 2]"),
    ({"text": "hi", "max_dec_len": 200}, "The parameter max_dec_len(200) exceeds the limit MAX_DEC_LEN(128)."),
    ({"text": "hi", "min_dec_len": 129, "max_dec_len": 128},
     "The parameter min_dec_len(129) exceeds the limit MAX_DEC_LEN(128)."),
    ({"text": "hi", "min_dec_len": 9, "max_dec_len": 8}, "must not be greater than `max_dec_len`"),
    ({"input_ids": LONG_IDS_OVER_MAX_SEQ}, "Length of input token(600) exceeds the limit MAX_SEQ_LEN(512)."),
    ({"input_ids": LONG_IDS_NO_ROOM}, "Input text is too long, input_ids_len (639) + min_dec_len (1) >= "
                                      "max_seq_len (640)"),
    ({"input_ids": [10 ** 7]}, "outside the vocabulary"),
    ({"text": "hi", "req_id": ["a"]}, "The `req_id` must be a string"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m[:40] for _, m in BAD])
def test_validation(url, body, message):
    r = post(url, body)
    assert r.status_code == 400, r.text
    b = r.json()
    assert message in b["error_msg"]
    assert b["error_code"] == 200          # the seed's code for a rejected request
    if "req_id" in body and isinstance(body["req_id"], str):
        assert b["req_id"] == body["req_id"]


def test_validation_error_on_stream_request_is_one_json_line(url):
    res = requests.post(url, json={"text": "hi", "temperature": -1, "stream": True}, stream=True, timeout=30)
    assert res.status_code == 400
    lines = [json.loads(x) for x in res.iter_lines() if x]
    assert len(lines) == 1 and lines[0]["error_msg"] == "The `temperature` must be >= 0"


def test_accepted_edge_values(url):
    for body in ({"text": "hi", "temperature": 0, "max_dec_len": 2},
                 {"text": "hi", "topp": 0, "max_dec_len": 2},
                 {"text": "hi", "topp": 1, "max_dec_len": 2},
                 {"text": "hi", "eos_token_ids": [2], "max_dec_len": 2},
                 {"text": "hi", "unknown_field": 1, "max_dec_len": 2},
                 {"text": "hi", "max_dec_len": 2, "model": "anything"},
                 {"input_ids": [1, 2, 3], "text": "", "max_dec_len": 2}):
        r = post(url, body)
        assert r.status_code == 200 and r.json()["error_code"] == 0, (body, r.text)


@pytest.mark.parametrize("raw,ctype", [(b"{not json", "application/json"), (b"[1, 2]", "application/json"),
                                       (b"", "application/json"), ("\"text\"".encode(), "text/plain")])
def test_malformed_body(url, raw, ctype):
    r = requests.post(url, data=raw, headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 400
    b = r.json()
    assert b["error_code"] == 400 and b["error_msg"]


# -- health, logs --------------------------------------------------------------------------------------

def test_health(server):
    for base in (server.health_url, server.url):
        r = requests.get(base + "/v2/health/live", timeout=5)
        assert r.status_code == 200 and r.content == b""
        r = requests.get(base + "/v2/health/ready", timeout=5)
        assert r.status_code == 200 and r.content == b""


def test_request_log_line(server, url):
    rid = f"log-{uuid.uuid4().hex[:8]}"
    post(url, {"text": "Hi", "req_id": rid, "max_dec_len": 3, "min_dec_len": 3})
    post(url, {"text": "Hi", "req_id": rid + "-bad", "temperature": -1})
    lines = server.requests_log().splitlines()
    mine = [x for x in lines if f"req_id={rid} " in x]
    assert mine and "prompt_tokens=" in mine[0] and "output_tokens=3" in mine[0]
    assert "finish_reason=length" in mine[0] and "e2e_s=" in mine[0] and "ttft_s=" in mine[0]
    bad = [x for x in lines if f"req_id={rid}-bad " in x]
    assert bad and "finish_reason=error" in bad[0] and "error_type=invalid" in bad[0]
    assert (server.log_dir / "server.log").read_text().count("Kiln is ready") == 1
