"""The benchmark tooling on CPU: random checkpoints of a preset shape, the synthetic tokenizer that lets a
random model be served, dummy loading from the server's settings, and the offline benchmarks' token counts."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.config import ConfigError, KilnConfig
from kiln.entrypoints.bench import PRESETS, write_checkpoint
from kiln.tokenizer import Tokenizer


def test_checkpoint_loads_and_generates(tmp_path):
    from kiln import LLM, SamplingParams
    d = write_checkpoint("tiny", str(tmp_path / "tiny"), dtype="float32")
    llm = LLM(str(d), dtype="float32", device="cpu")
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 6
    # the synthetic tokenizer spells every id: the text is the ids' text, and it encodes back
    assert out.text == llm.tokenizer.decode(out.token_ids) and out.text


def test_synthetic_tokenizer_covers_the_whole_vocabulary(tmp_path):
    d = write_checkpoint("tiny", str(tmp_path / "t"), weights=False)
    assert not list(d.glob("*.safetensors"))
    tok = Tokenizer.from_dir(d)
    vocab = PRESETS["tiny"]["vocab_size"]
    assert tok.eos_token_ids == [PRESETS["tiny"]["eos_token_id"]]
    specials = (PRESETS["tiny"]["eos_token_id"], PRESETS["tiny"]["bos_token_id"])  # decoded as nothing
    ids = [i for i in range(vocab) if i not in specials]
    # byte-level: every id decodes to text of its own; any text encodes (byte by byte) and decodes back
    assert all(tok.decode([i]) for i in ids)
    text = '{"a": [1, "b\u00e9"]}'
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # JSON's punctuation appears inside multi-character tokens, as in a real vocabulary
    assert sum(1 for i in ids if len(tok.decode([i])) > 1 and '"' in tok.decode([i])) > 10


def test_synthetic_tokenizer_lets_xgrammar_advance(tmp_path):
    """A JSON schema constrains a random model on the synthetic tokenizer: the output is a prefix of JSON that
    follows the schema (benchmarks/json_schema_long.json, which a random model does not finish early)."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from kiln import LLM, SamplingParams
    from kiln.engine.structured import StructuredSpec
    d = write_checkpoint("tiny", str(tmp_path / "tiny"), dtype="float32")
    info = xgr.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(d), vocab_size=PRESETS["tiny"]["vocab_size"])
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL
    llm = LLM(str(d), dtype="float32", device="cpu")
    schema = (Path(__file__).parents[2] / "benchmarks" / "json_schema_long.json").read_text()
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                      structured=StructuredSpec.json_schema(schema)))[0]
    assert out.finish_reason == "length" and out.text.startswith('{"title": "'), out.text


def test_load_format_setting_reaches_the_engine(tmp_path):
    d = write_checkpoint("tiny", str(tmp_path / "t"), weights=False)
    cfg = KilnConfig.load({"MODEL_DIR": str(d), "KILN_LOAD_FORMAT": "dummy"})
    assert cfg.to_engine_config().load_format == "dummy"
    with pytest.raises(ConfigError, match="KILN_LOAD_FORMAT"):
        KilnConfig.load({"MODEL_DIR": str(d), "KILN_LOAD_FORMAT": "random"})


def test_offline_benchmarks_count_the_tokens_they_ran(capsys):
    from kiln.entrypoints.bench import main

    def bench(*args):  # in this process: three interpreter starts fewer
        capsys.readouterr()
        assert main([*args, "--preset", "tiny", "--device", "cpu", "--dtype", "float32"]) == 0
        return json.loads(capsys.readouterr().out)

    t = bench("throughput", "--num-prompts", "6", "--input-len", "12", "--output-len", "5")
    assert t["output_tok_s"] * t["total_s"] == pytest.approx(6 * 5)
    assert t["total_tok_s"] * t["total_s"] == pytest.approx(6 * (12 + 5))
    # where the time went: one step of the six prefills, then four decode steps of all six
    assert (t["mixed_steps"], t["decode_only_steps"], t["decode_only_mean_batch"]) == (1, 4, 6)
    assert 0 < t["mixed_s"] and 0 < t["decode_only_s"] and t["mixed_s"] + t["decode_only_s"] <= t["total_s"]
    assert t["input_tok_s"] * t["total_s"] == pytest.approx(6 * 12) and t["prompt_logprobs"] is None
    scored = bench("throughput", "--num-prompts", "2", "--input-len", "12", "--output-len", "1", "--prompt-logprobs",
                   "1")
    assert scored["prompt_logprobs"] == 1 and scored["output_tok_s"] * scored["total_s"] == pytest.approx(2)
    lat = bench("latency", "--batch-size", "3", "--input-len", "10", "--output-len", "7", "--iters", "1")
    assert lat["decode_steps"] == 6 and lat["decode_mean_batch"] == pytest.approx(3)
    assert lat["total_s"] == pytest.approx(lat["prefill_s"] + lat["decode_s"])
    # every request under a JSON schema that keeps a random model going: nobody ends early
    js = bench("latency", "--batch-size", "3", "--input-len", "10", "--output-len", "12", "--iters", "1",
               "--json-schema", "benchmarks/json_schema_long.json")
    assert js["ended_early"] == 0 and js["decode_mean_batch"] == pytest.approx(3) and js["decode_steps"] == 11


def test_latency_profile_writes_the_kernel_table(tmp_path):
    """--profile: where a decode step's time goes (host split and the profiler's table), written to a file."""
    out = tmp_path / "prof.txt"
    p = subprocess.run([sys.executable, "-m", "kiln.entrypoints.bench", "latency", "--preset", "tiny", "--device",
                        "cpu", "--dtype", "float32", "--batch-size", "2", "--input-len", "8", "--output-len", "40",
                        "--iters", "1", "--profile", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    text = out.read_text()
    assert "decode step, batch 2" in text and "launch" in text and "Self CPU" in text, text[:2000]


def test_request_log_line_gives_the_server_split():
    """What the server writes (RequestLogObserver) is what `bench serve` reads back (parse_request_log)."""
    import logging

    from kiln.entrypoints.bench import parse_request_log, server_split
    from kiln.server.frontend import RequestLogObserver, RequestRecord

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = logging.getLogger("kiln.requests")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        obs = RequestLogObserver()
        # arrival at 100 s, engine queue 0.25 s, first token at 100.75 s, 11 tokens ending at 101.75 s
        obs.on_finish(RequestRecord("cmpl-a-0", "completions", 100.0, num_prompt_tokens=5, num_output_tokens=11,
                                    first_token_time=100.75, end_time=101.75, finish_reason="length",
                                    queue_time_s=0.25))
        obs.on_finish(RequestRecord("bad-1", "native", 100.0, end_time=100.0, finish_reason="error",
                                    error_type="invalid", error="a message with spaces and key=value"))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    # a request refused before it had an id is logged with req_id=-: skipped, not a crash (it was one)
    lines.append("req_id=- api=completions prompt_tokens=0 output_tokens=0 ttft_s=- e2e_s=0.000 decode_tok_s=- "
                 "finish_reason=error queue_s=- prefill_s=- decode_s=- error_type=invalid error='bad ids'")
    records = parse_request_log("\n".join(f"2026-01-01 00:00:00 INFO {ln}" for ln in lines))
    assert records["cmpl-a-0"]["queue_s"] == pytest.approx(0.25)
    assert records["cmpl-a-0"]["prefill_s"] == pytest.approx(0.5)
    assert records["cmpl-a-0"]["decode_s"] == pytest.approx(1.0)
    assert records["cmpl-a-0"]["finish_reason"] == "length"
    assert "queue_s" not in records["bad-1"] and records["bad-1"]["finish_reason"] == "error"
    split = server_split(records, ["cmpl-a-0", "bad-1", "never-logged"])
    assert split["queue"] == pytest.approx([0.25]) and split["prefill"] == pytest.approx([0.5])
    assert split["decode"] == pytest.approx([1.0]) and split["ttft"] == pytest.approx([0.75])
    assert split["tpot"] == pytest.approx([0.1])      # 1.0 s over the 10 tokens after the first
    assert set(records) == {"cmpl-a-0", "bad-1"}


def test_bench_serve_cold_starts_its_own_server(tmp_path):
    """--cold: kiln serve on the bundled model, an empty compile cache, its own ports and log dir; the client's
    figures and the server's split of the same requests in one report (the native and gRPC clients:
    tests/e2e/test_bench_serve.py, on the shared server)."""
    api = "openai"
    env = {"BATCH_SIZE": "8", "MAX_SEQ_LEN": "512", "MAX_DEC_LEN": "64", "KILN_NUM_BLOCKS": "160",
           "BLOCK_SIZE": "16", "USE_WARMUP": "0"}
    p = subprocess.run([sys.executable, "-m", "kiln.entrypoints.bench", "serve", "--cold", "--api", api,
                        "--num-prompts", "3",
                        "--input-len", "16", "--output-len", "6", "--vocab-limit", "2000",
                        "--output-json", str(tmp_path / "r.json"),
                        *[a for k, v in env.items() for a in ("--server-env", f"{k}={v}")]],
                       capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["api"] == api and r["completed"] == 3 and r["failed"] == 0, r["errors"]
    assert r["output_tok_s"] * r["duration_s"] == pytest.approx(3 * 6)   # every token counted once
    assert r["cold"]["start_to_ready_s"] > 0
    server = r["server"]
    assert server["matched"] == 3
    for part in ("queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "tpot_ms"):
        assert server[part]["median"] is not None and server[part]["median"] >= 0
    # the server's TTFT is inside the client's (the client also pays the connection and the HTTP round trip)
    assert server["ttft_ms"]["median"] <= r["ttft_ms"]["median"] + 1.0


def test_throughput_profiles_the_steps_asked_for(tmp_path):
    """--profile-steps FIRST,N: those steps of the run under the profiler (here mixed steps: chunked prefills beside
    decodes), their table written to --profile's file, and the run's figures unchanged in kind."""
    out = tmp_path / "mixed.txt"
    p = subprocess.run([sys.executable, "-m", "kiln.entrypoints.bench", "throughput", "--preset", "tiny", "--device",
                        "cpu", "--dtype", "float32", "--num-prompts", "4", "--input-len", "24", "--output-len", "6",
                        "--max-num-batched-tokens", "32", "--profile-steps", "1,3", "--profile", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    head = out.read_text().splitlines()[0]
    assert head.startswith("steps 1..3 (") and "GPU kernels" in head, head
    mixed = int(re.search(r"(\d+) mixed", head).group(1))
    assert mixed >= 2 and re.search(r"with \d+ prefill tokens and \d+ decode rows", head), head
    assert (tmp_path / "mixed.trace.json").exists()
    r = subprocess.run([sys.executable, "-m", "kiln.entrypoints.bench", "throughput", "--preset", "tiny", "--device",
                        "cpu", "--num-prompts", "1", "--profile-steps", "1,3"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "--profile-steps needs --profile FILE" in r.stderr


def test_profile_gpu_time_counts_each_kernel_once(tmp_path):
    """The table's GPU time a step sums the kernels' rows only: an operator's row (aten::_scaled_mm) repeats the
    time of the kernel it launched, and counting both doubled it (run AM', H100: 67.4 ms against the trace's
    42.7)."""
    import types

    from torch.autograd import DeviceType

    from kiln.entrypoints.bench import _write_profile

    rows = [types.SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=900.0),    # the operator
            types.SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=900.0),   # its kernel
            types.SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=300.0)]   # another kernel
    events = type("Events", (list,), {"table": lambda self, **kw: "table"})(rows)
    written = {}
    prof = types.SimpleNamespace(key_averages=lambda: events,
                                 export_chrome_trace=lambda path: written.setdefault("trace", path))
    _write_profile(prof, 2, str(tmp_path / "p.txt"), "head: ")
    assert (tmp_path / "p.txt").read_text().startswith("head: GPU kernels 0.60 ms/step")
    assert written["trace"].endswith("p.trace.json")


@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "mixtral-8x7b"])
def test_moe_presets_write_checkpoints_that_kiln_and_transformers_read_alike(preset, tmp_path, monkeypatch):
    """The preset's config keys and the writer's expert tensor names, at a small size: Kiln's greedy tokens equal
    transformers' on the written checkpoint."""
    from kiln import LLM, SamplingParams
    from tests.helpers.tiny_models import hf_greedy
    small = {**PRESETS[preset], "vocab_size": 320, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "torch_dtype": "float32", "bos_token_id": 1,
             "eos_token_id": 2, "num_experts_per_tok": 2}
    small.update({"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16} if "num_experts" in small
                 else {"num_local_experts": 4})
    if "shared_expert_intermediate_size" in small:
        small["shared_expert_intermediate_size"] = 48
    monkeypatch.setitem(PRESETS, "small-moe", small)
    d = write_checkpoint("small-moe", str(tmp_path / "m"), dtype="float32")
    llm = LLM(str(d), dtype="float32", device="cpu")
    assert type(llm.engine.runner.model.model.layers[0].mlp).__name__ == "SparseMoE"
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(d, [[5, 6, 7, 8]], 8)[0]
