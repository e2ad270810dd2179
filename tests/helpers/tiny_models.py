"""Tiny random Hugging Face checkpoints of each supported architecture, written with transformers itself."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.15, rms_norm_eps=1e-6)


def tiny_config(arch: str, vocab_size: int):
    import transformers as tf
    if arch == "llama":
        # llama3-style rope scaling, as in Llama 3.1/3.2
        return tf.LlamaConfig(vocab_size=vocab_size, **COMMON, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, rope_theta=500000.0)
    if arch == "mistral":
        return tf.MistralConfig(vocab_size=vocab_size, **COMMON, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(vocab_size=vocab_size, **COMMON, tie_word_embeddings=True)
    if arch == "qwen3":
        return tf.Qwen3Config(vocab_size=vocab_size, **{**COMMON, "num_attention_heads": 4}, head_dim=32,
                              tie_word_embeddings=False)
    if arch == "qwen3_moe":  # 8 experts, 3 per token, layer 1 dense (mlp_only_layers), weights renormalized
        return tf.Qwen3MoeConfig(vocab_size=vocab_size, **COMMON, head_dim=16, num_experts=8, num_experts_per_tok=3,
                                 moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1],
                                 tie_word_embeddings=False)
    if arch == "qwen2_moe":  # 8 experts, 2 per token, a shared expert, top-k weights as the softmax gives them
        return tf.Qwen2MoeConfig(vocab_size=vocab_size, **COMMON, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=48, shared_expert_intermediate_size=80, norm_topk_prob=False,
                                 tie_word_embeddings=False)
    if arch == "mixtral":
        return tf.MixtralConfig(vocab_size=vocab_size, **COMMON, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=None)
    raise ValueError(arch)


def write_tiny_model(arch: str, out: Path, tokenizer_dir: Path | None = None, vocab_size: int = 512,
                     seed: int = 0, num_layers: int | None = None) -> Path:
    """A random checkpoint in HF format; with tokenizer_dir, its tokenizer files are copied in and the
    vocabulary sized to match, so the text APIs work on it too. num_layers overrides the default 2."""
    import transformers as tf
    if tokenizer_dir is not None:
        import json
        vocab_size = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
        vocab_size = max(vocab_size, 1 + max(
            [t["id"] for t in json.loads((tokenizer_dir / "tokenizer.json").read_text()).get("added_tokens", [])] + [0]))
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size)
    if num_layers is not None:
        cfg.num_hidden_layers = num_layers
    cfg.architectures = [type(tf.AutoModelForCausalLM.from_config(cfg)).__name__]
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (tokenizer_dir / f).exists():
                shutil.copy(tokenizer_dir / f, out / f)
    return out


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    import transformers as tf
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        with torch.no_grad():
            g = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(g[0, len(p):].tolist())
    return outs
