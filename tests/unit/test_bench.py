"""The benchmark tooling on CPU: random checkpoints of a preset shape, the synthetic tokenizer that lets a
random model be served, dummy loading from the server's settings, and the offline benchmarks' token counts."""
from __future__ import annotations

import json
import subprocess
import sys

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
    # the synthetic tokenizer spells every id, so the text is exactly the ids
    assert out.text.split() == [f"w{i}" for i in out.token_ids]


def test_synthetic_tokenizer_covers_the_whole_vocabulary(tmp_path):
    d = write_checkpoint("tiny", str(tmp_path / "t"), weights=False)
    assert not list(d.glob("*.safetensors"))
    tok = Tokenizer.from_dir(d)
    vocab = PRESETS["tiny"]["vocab_size"]
    assert tok.eos_token_ids == [PRESETS["tiny"]["eos_token_id"]]
    assert tok.decode([0, vocab // 2, vocab - 1]) == f"w0 w{vocab // 2} w{vocab - 1}"
    assert tok.encode("w3 w17", add_special_tokens=False) == [3, 17]


def test_load_format_setting_reaches_the_engine(tmp_path):
    d = write_checkpoint("tiny", str(tmp_path / "t"), weights=False)
    cfg = KilnConfig.load({"MODEL_DIR": str(d), "KILN_LOAD_FORMAT": "dummy"})
    assert cfg.to_engine_config().load_format == "dummy"
    with pytest.raises(ConfigError, match="KILN_LOAD_FORMAT"):
        KilnConfig.load({"MODEL_DIR": str(d), "KILN_LOAD_FORMAT": "random"})


def test_offline_benchmarks_count_the_tokens_they_ran():
    def bench(*args):
        p = subprocess.run([sys.executable, "-m", "kiln.entrypoints.bench", *args, "--preset", "tiny",
                            "--device", "cpu", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout)

    t = bench("throughput", "--num-prompts", "6", "--input-len", "12", "--output-len", "5")
    assert t["output_tok_s"] * t["total_s"] == pytest.approx(6 * 5)
    assert t["total_tok_s"] * t["total_s"] == pytest.approx(6 * (12 + 5))
    lat = bench("latency", "--batch-size", "3", "--input-len", "10", "--output-len", "7", "--iters", "1")
    assert lat["decode_steps"] == 6 and lat["decode_mean_batch"] == pytest.approx(3)
    assert lat["total_s"] == pytest.approx(lat["prefill_s"] + lat["decode_s"])
