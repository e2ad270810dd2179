"""`kiln bench latency | throughput | serve | write-checkpoint`.

latency / throughput run the engine in this process on random token ids (ignore_eos, fixed lengths), optionally
the same workload through transformers in the same process for a side-by-side ratio. serve is a client for a
running server over the OpenAI streaming API with vLLM's metric definitions: TTFT (request sent -> first token),
TPOT ((e2e - TTFT) / (output tokens - 1)), ITL (gaps between streamed chunks), E2E latency; beside them the
server's split of the same requests from its FD_LOG_DIR/requests.log (queue, prefill, decode, server TTFT and
TPOT). `serve --cold` starts the server itself on an empty compile cache and measures from the first request
after ready, so a cold figure is one command.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Real model shapes for runs with random weights (no checkpoint needed: --load-format dummy).
PRESETS = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                      bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False, torch_dtype="bfloat16"),
    "llama3-70b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=8192,
                       intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False, torch_dtype="bfloat16"),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False, torch_dtype="bfloat16"),
    # mixtures of experts: Qwen3-30B-A3B (128 experts, 8 a token, ~3.3B active), Qwen1.5-MoE-A2.7B (4 of 60 and a
    # shared expert) and Mixtral 8x7B (2 of 8)
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                          hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                          bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False, torch_dtype="bfloat16"),
    "qwen1.5-moe-a2.7b": dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=151936,
                              hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408, num_experts=60,
                              num_experts_per_tok=4, shared_expert_intermediate_size=5632, norm_topk_prob=False,
                              decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=24, num_attention_heads=16,
                              num_key_value_heads=16, max_position_embeddings=8192, rms_norm_eps=1e-6,
                              rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645,
                              tie_word_embeddings=False, torch_dtype="bfloat16"),
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, rope_theta=1000000.0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, torch_dtype="bfloat16"),
    "tiny": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=1024, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, torch_dtype="float32"),
}


def resolve_model(model: str | None, preset: str | None, tokenizer: bool = False) -> str | None:
    """A preset becomes a directory holding its config.json (for --load-format dummy), and with `tokenizer` the
    synthetic tokenizer (structured outputs compile against it)."""
    if preset is None:
        return model
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    d = Path(tempfile.mkdtemp(prefix=f"kiln-{preset}-"))
    cfg = PRESETS[preset]
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    if tokenizer:
        write_synthetic_tokenizer(d, cfg["vocab_size"], cfg["eos_token_id"], cfg.get("bos_token_id"))
    return str(d)


SYNTHETIC_EOS, SYNTHETIC_BOS = "<|end_of_text|>", "<|begin_of_text|>"


def write_synthetic_tokenizer(out_dir: Path, vocab_size: int, eos_token_id: int, bos_token_id: int | None = None,
                              seed: int = 0) -> None:
    """A byte-level BPE tokenizer (no merges) of exactly `vocab_size` ids, like a real model's: the 256 byte
    tokens, end/begin-of-text specials at the model's ids, and random printable-ASCII strings of 2-8 characters for
    every other id. Every id decodes to text (a serving benchmark sees a chunk per token), any text encodes (byte
    by byte), and JSON's `{`, `"`, `,` appear inside tokens as in a real vocabulary, so a grammar can advance on
    it and xgrammar's token masks cost what they cost with a real tokenizer of that size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # byte -> the ByteLevel symbol of it

    special = {eos_token_id: SYNTHETIC_EOS}
    if bos_token_id is not None and bos_token_id != eos_token_id:
        special[bos_token_id] = SYNTHETIC_BOS
    if vocab_size < 256 + len(special):
        raise ValueError(f"a byte-level vocabulary needs at least {256 + len(special)} ids, got {vocab_size}")
    free = (i for i in range(vocab_size) if i not in special)
    symbols = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {sym: next(free) for sym in symbols}
    rnd = random.Random(seed)
    printable = symbols[32:127]
    for i in free:
        while True:
            s = "".join(rnd.choices(printable, k=rnd.randint(2, 8)))
            if s not in vocab:
                break
        vocab[s] = i
    vocab.update({text: i for i, text in special.items()})
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(text, special=True) for text in special.values()])
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SYNTHETIC_EOS, "model_max_length": 1 << 20,
              "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}
    if SYNTHETIC_BOS in special.values():
        config["bos_token"] = SYNTHETIC_BOS
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))


def write_checkpoint(preset: str, out: str, dtype: str = "bfloat16", seed: int = 0, weights: bool = True) -> Path:
    """A random Hugging Face checkpoint of a real shape, sharded safetensors + index, as a hub model ships, with
    a synthetic tokenizer of the right vocabulary. weights=False writes only config and tokenizer (for serving
    with --load-format dummy)."""
    import torch
    from safetensors.torch import save_file

    from kiln.models.config import DTYPES

    cfg = PRESETS[preset]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # as a hub checkpoint: the transformers version that wrote it (without one, transformers 5.x tokenizer loading
    # warns of a Mistral "incorrect regex pattern" in every process)
    from importlib.metadata import version
    (out_dir / "config.json").write_text(json.dumps({**cfg, "transformers_version": version("transformers")}, indent=1))
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg["eos_token_id"]}))
    write_synthetic_tokenizer(out_dir, cfg["vocab_size"], cfg["eos_token_id"], cfg.get("bos_token_id"))
    if not weights:
        return out_dir
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    bias = cfg["model_type"] in ("qwen2", "qwen2_moe")
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dt)

    shards: list[dict] = [{"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h, dtype=dt)}]
    if not cfg["tie_word_embeddings"]:
        shards[0]["lm_head.weight"] = rnd(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
             p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
             p + "input_layernorm.weight": torch.ones(h, dtype=dt),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=dt)}
        if cfg["model_type"] in ("qwen3", "qwen3_moe"):  # per-head q/k norms
            t.update({p + "self_attn.q_norm.weight": torch.ones(hd, dtype=dt),
                      p + "self_attn.k_norm.weight": torch.ones(hd, dtype=dt)})
        if cfg["model_type"] == "mixtral":
            t[p + "block_sparse_moe.gate.weight"] = rnd(cfg["num_local_experts"], h)
            for e in range(cfg["num_local_experts"]):
                x = f"{p}block_sparse_moe.experts.{e}."
                t.update({x + "w1.weight": rnd(inter, h), x + "w3.weight": rnd(inter, h), x + "w2.weight": rnd(h, inter)})
        elif cfg["model_type"] in ("qwen2_moe", "qwen3_moe"):
            t[p + "mlp.gate.weight"] = rnd(cfg["num_experts"], h)
            mi = cfg["moe_intermediate_size"]
            for e in range(cfg["num_experts"]):
                x = f"{p}mlp.experts.{e}."
                t.update({x + "gate_proj.weight": rnd(mi, h), x + "up_proj.weight": rnd(mi, h),
                          x + "down_proj.weight": rnd(h, mi)})
            si = cfg.get("shared_expert_intermediate_size")
            if si:
                x = f"{p}mlp.shared_expert."
                t.update({x + "gate_proj.weight": rnd(si, h), x + "up_proj.weight": rnd(si, h),
                          x + "down_proj.weight": rnd(h, si), p + "mlp.shared_expert_gate.weight": rnd(1, h)})
        else:
            t.update({p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
                      p + "mlp.down_proj.weight": rnd(h, inter)})
        if bias:
            t.update({p + "self_attn.q_proj.bias": rnd(q), p + "self_attn.k_proj.bias": rnd(kv),
                      p + "self_attn.v_proj.bias": rnd(kv)})
        shards.append(t)
    # group layers into ~4 files
    per = max(1, len(shards) // 4)
    files = [dict(kv for s in shards[i:i + per] for kv in s.items()) for i in range(0, len(shards), per)]
    weight_map = {}
    for n, tensors in enumerate(files):
        name = f"model-{n + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out_dir


# -- offline benchmarks ---------------------------------------------------------------------------------

def _engine(args):
    from kiln.engine.config import EngineConfig
    from kiln.engine.core import EngineCore
    cfg = EngineConfig(model=resolve_model(args.model, args.preset, tokenizer=bool(args.json_schema)), dtype=args.dtype, load_format=args.load_format,
                       max_num_seqs=args.max_num_seqs, max_model_len=args.input_len + args.output_len + 8,
                       max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                       kv_reserve_ratio=args.kv_reserve_ratio, kv_cache_dtype=args.kv_cache_dtype,
                       quantization=args.quantization, quantize_lm_head=args.quantize_lm_head,
                       gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=False,
                       use_cuda_graph=not args.enforce_eager, attention_backend=args.attention_backend,
                       device=args.device, max_waiting=1 << 30, tensor_parallel_size=args.tensor_parallel_size,
                       enable_expert_parallel=args.enable_expert_parallel,
                       async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
                       speculative_config=args.speculative_config,
                       # the server's warm-up (on with CUDA): without it, runs K-M's offline benches compiled
                       # W8A16 and prefill variants inside their timed runs (up to 1.8 s each)
                       warmup=None)
    return EngineCore(cfg)


def _random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rnd = random.Random(seed)
    hi = min(vocab, 32000)
    return [[rnd.randrange(100, hi) for _ in range(length)] for _ in range(n)]


def _sync(core):
    if core.runner.device.type == "cuda":
        import torch
        torch.cuda.synchronize()


def _structured(args):
    """--json-schema FILE as the constraint of every request, or None."""
    if not getattr(args, "json_schema", None):
        return None
    from kiln.engine.structured import StructuredSpec
    return StructuredSpec.json_schema(Path(args.json_schema).read_text())


def run_batch(core, prompts, output_len: int, structured=None, profile: tuple[int, int, str] | None = None,
              prompt_logprobs: int | None = None, bias_token: int | None = None) -> dict:
    """All prompts at once, ignore_eos (a `structured` constraint may still end a request early: ended_early
    counts those). prefill_s: until every request has its first token (prefill chunks of the later requests run
    beside the decodes of the earlier ones); decode_s: the rest. Where the time went by step kind: mixed_* for the
    steps that carried prefill tokens, decode_only_* for the others (with their mean batch), each step timed by the
    step() call that returned its tokens (with async scheduling, the call that waited for it). profile = (first
    step, steps, file): those steps under torch.profiler, their table written to file (and printed).
    prompt_logprobs: every request also scores its prompt (lm-evaluation-harness's loglikelihood work).
    bias_token: every request's logits favour this token by +100, so its output repeats it (what n-gram drafts of
    speculative decoding then always guess: its best case)."""
    from kiln.engine.request import SamplingParams
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, structured=structured,
                        prompt_logprobs=prompt_logprobs,
                        logit_bias=[(bias_token, 100.0)] if bias_token is not None else [])
    base = f"b{time.monotonic_ns()}-"
    _sync(core)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        err = core.add_request(f"{base}{i}", p, sp)
        if err is not None:
            raise SystemExit(err.error)
    prefill_steps = prefill_tokens = 0
    first_token_at = None  # when the last request got its first token: the end of the prefill phase
    started: set[str] = set()
    n_out = 0
    steps = 0
    ended_early = 0
    kinds = {"mixed": [0, 0.0], "decode_only": [0, 0.0]}  # steps, seconds
    decode_only_rows = 0
    last = None
    prof = None
    while core.has_unfinished():
        if profile and steps == profile[0]:
            from torch.profiler import ProfilerActivity, profile as torch_profile
            prof = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.__enter__()
            prof_kinds = {k: list(v) for k, v in kinds.items()}
        t = time.perf_counter()
        outs = core.step()
        dt = time.perf_counter() - t
        b = core.last_collected
        if b is not None and b is not last:
            kind = kinds["mixed" if b.num_prefill_tokens else "decode_only"]
            kind[0] += 1
            kind[1] += dt
            decode_only_rows += 0 if b.num_prefill_tokens else b.num_decode_rows
            last = b
        steps += 1
        if prof is not None and steps == profile[0] + profile[1]:
            _sync(core)
            prof.__exit__(None, None, None)
            split = ", ".join(f"{kinds[k][0] - prof_kinds[k][0]} {k.replace('_', '-')}" for k in kinds)
            _write_profile(prof, profile[1], profile[2], f"steps {profile[0]}..{steps - 1} ({split}, the last "
                           f"with {b.num_prefill_tokens if b else 0} prefill tokens and "
                           f"{b.num_decode_rows if b else 0} decode rows): ")
            prof = None
        n_out += sum(len(o.new_token_ids) for o in outs)
        ended_early += sum(1 for o in outs if o.finished and o.finish_reason != "length")
        if first_token_at is None:
            started.update(o.request_id for o in outs if o.new_token_ids)
            if len(started) == len(prompts):
                first_token_at = time.perf_counter()
                prefill_steps, prefill_tokens = steps, n_out
    _sync(core)
    t1 = time.perf_counter()
    return dict(total_s=t1 - t0, prefill_s=(first_token_at or t1) - t0, output_tokens=n_out, steps=steps,
                ended_early=ended_early,
                decode_s=t1 - (first_token_at or t1), decode_steps=steps - prefill_steps,
                decode_tokens=n_out - prefill_tokens, mixed_steps=kinds["mixed"][0], mixed_s=kinds["mixed"][1],
                decode_only_steps=kinds["decode_only"][0], decode_only_s=kinds["decode_only"][1],
                decode_only_mean_batch=decode_only_rows / max(1, kinds["decode_only"][0]))


def hf_generate(model_dir: str | None, preset: str | None, prompts, output_len: int, dtype: str,
                batch_size: int) -> dict:
    """The same workload through transformers' generate (padded static batches), same process, same GPU."""
    import torch
    import transformers as tf
    cfg_dict = PRESETS[preset] if preset else json.loads((Path(model_dir) / "config.json").read_text())
    cfg = tf.AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype, torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dt).eval()
    dev = next(model.parameters()).device
    gen = tf.GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    n_out = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = torch.tensor(prompts[i:i + batch_size], device=dev)  # equal lengths: no padding needed
        with torch.no_grad():
            out = model.generate(chunk, attention_mask=torch.ones_like(chunk), generation_config=gen)
        n_out += (out.shape[1] - chunk.shape[1]) * chunk.shape[0]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter() - t0
    del model
    return dict(total_s=t, output_tokens=n_out, output_tok_s=n_out / t)


def hf_generate_batch(preset, model_dir, prompts, output_len, dtype) -> dict:
    """transformers' own continuous batching (paged cache), when this transformers has it."""
    import torch
    import transformers as tf
    cfg_dict = PRESETS[preset] if preset else json.loads((Path(model_dir) / "config.json").read_text())
    cfg = tf.AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.bfloat16)
    model, last_err = None, None
    for impl in ("paged|sdpa", "sdpa_paged", "paged|eager"):  # the name changed across transformers releases
        try:
            with torch.device("cuda"):
                model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dt, attn_implementation=impl).eval()
            break
        except (ValueError, ImportError) as e:
            last_err = e
    if model is None:
        raise last_err
    gen = tf.GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    t0 = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=gen)
    torch.cuda.synchronize()
    t = time.perf_counter() - t0
    n_out = sum(len(r.generated_tokens) for r in res.values())
    del model
    return dict(total_s=t, output_tokens=n_out, output_tok_s=n_out / t)


def cmd_latency(args) -> dict:
    core = _engine(args)
    vocab = core.runner.model_config.vocab_size
    prompts = _random_prompts(args.batch_size, args.input_len, vocab)
    structured = _structured(args)
    for _ in range(args.warmup_iters):
        run_batch(core, _random_prompts(args.batch_size, args.input_len, vocab, seed=99), min(8, args.output_len),
                  structured)
    spec0 = dict(vars(core.spec_stats))
    runs = [run_batch(core, prompts, args.output_len, structured, bias_token=args.bias_token)
            for _ in range(args.iters)]
    spec = {k: (v - spec0[k]) / args.iters for k, v in vars(core.spec_stats).items()}
    runs.sort(key=lambda r: r["total_s"])
    r = runs[len(runs) // 2]
    decode_steps = max(1, r["decode_steps"])
    res = dict(bench="latency", batch_size=args.batch_size, input_len=args.input_len, output_len=args.output_len,
               total_s=r["total_s"], prefill_s=r["prefill_s"], decode_s=r["decode_s"],
               output_tok_s=r["output_tokens"] / r["total_s"],
               decode_steps=r["decode_steps"],
               decode_ms_per_step=1000 * r["decode_s"] / decode_steps,
               decode_tok_s=r["decode_tokens"] / r["decode_s"] if r["decode_s"] else None,
               decode_mean_batch=r["decode_tokens"] / decode_steps, ended_early=r["ended_early"],
               json_schema=args.json_schema, overlapped_steps=core.num_overlapped_steps, steps=core.num_steps,
               bias_token=args.bias_token, speculative_config=args.speculative_config)
    if core.speculative:  # per run: decode rows with drafts, draft tokens, confirmed drafts
        res.update({f"spec_{k}": v for k, v in spec.items()})
    if args.profile:
        _profile_decode(core, prompts, args.profile)
    if args.compare_hf:
        del core
        _free_cuda()
        hf = hf_generate(args.model, args.preset, prompts, args.output_len, args.dtype, args.batch_size)
        res["hf_generate_output_tok_s"] = hf["output_tok_s"]
        res["speedup_vs_hf"] = res["output_tok_s"] / hf["output_tok_s"]
    return res


def _profile_decode(core, prompts, path: str, steps: int = 16) -> None:
    """Where a decode step's time goes: prefill first (not profiled), then `steps` decode steps timed on the
    host (schedule / prepare+launch / sync) and under torch.profiler (GPU kernel time). Printed and saved."""
    from torch.profiler import ProfilerActivity, profile

    from kiln.engine.request import SamplingParams
    # long enough that no request ends before the profiled steps (a long prefill phase lets the first requests
    # decode many tokens before the last one starts); the rest is aborted afterwards
    for i, p in enumerate(prompts):
        sp = SamplingParams(max_tokens=core.max_model_len - len(p) - 1, temperature=0.0, ignore_eos=True)
        core.add_request(f"profile-{i}", p, sp)
    while any(not r.output_token_ids for r in core.requests.values()):
        core.step()
    _sync(core)
    # host-side split of a step, without the profiler's overhead ("collect" includes waiting for the GPU)
    acc: dict[str, float] = {}
    patched = [(core.scheduler, "schedule"), (core.runner, "launch"), (core.runner, "prepare"),
               (core.runner, "to_device"), (core, "_collect")]

    def timed(name, fn):
        acc[name] = 0.0

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t
        return wrapper
    for obj, name in patched:
        setattr(obj, name, timed(name.lstrip("_"), getattr(obj, name)))
    batch = len(core.scheduler.running)  # smaller than len(prompts) if some already ended: raise --output-len
    overlapped0 = core.num_overlapped_steps
    t0 = time.perf_counter()
    for _ in range(steps):
        core.step()
    _sync(core)
    wall = (time.perf_counter() - t0) / steps
    overlapped = core.num_overlapped_steps - overlapped0
    for obj, name in patched:
        delattr(obj, name)  # the instance attribute goes, the method shows through again
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            core.step()
        _sync(core)
    core.abort(list(core.requests))
    while core.has_unfinished():
        core.step()
    _write_profile(prof, steps, path, f"decode step, batch {batch}: wall {wall * 1e3:.2f} ms; ",
                   f"; {overlapped}/{steps} steps queued while the previous one ran; host per step: " +
                   ", ".join(f"{k} {v / steps * 1e3:.2f} ms" for k, v in acc.items()))


def _write_profile(prof, steps: int, path: str, head: str, tail: str = "") -> None:
    """The profiler's kernel-time table of `steps` steps (GPU time a step in the first line), printed and written
    to path, and its trace beside it (each kernel's start and end: the gaps)."""
    from torch.autograd import DeviceType
    events = prof.key_averages()
    # the kernels' own rows only: an operator's row repeats the time of the kernels it launched (run AM', H100:
    # 67.4 ms a mixed step counted with them, 42.7 in the trace)
    gpu_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                 for e in events if e.device_type == DeviceType.CUDA) / steps
    table = (f"{head}GPU kernels {gpu_us / 1e3:.2f} ms/step (under the profiler){tail}\n"
             + events.table(sort_by="self_cuda_time_total", row_limit=30) + "\nby host time:\n"
             + events.table(sort_by="self_cpu_time_total", row_limit=25))
    print(table, file=sys.stderr)
    Path(path).write_text(table)
    prof.export_chrome_trace(str(Path(path).with_suffix(".trace.json")))


def cmd_throughput(args) -> dict:
    core = _engine(args)
    vocab = core.runner.model_config.vocab_size
    run_batch(core, _random_prompts(min(args.num_prompts, 8), args.input_len, vocab, seed=99), 4,
              prompt_logprobs=args.prompt_logprobs)  # warm-up
    prompts = _random_prompts(args.num_prompts, args.input_len, vocab)
    profile = None
    if args.profile_steps:
        if not args.profile:
            raise SystemExit("--profile-steps needs --profile FILE")
        first, n = (int(v) for v in args.profile_steps.split(","))
        profile = (first, n, args.profile)
    r = run_batch(core, prompts, args.output_len, _structured(args), profile, args.prompt_logprobs)
    res = dict(bench="throughput", num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
               prompt_logprobs=args.prompt_logprobs, total_s=r["total_s"],
               output_tok_s=r["output_tokens"] / r["total_s"], input_tok_s=args.num_prompts * args.input_len / r["total_s"],
               total_tok_s=(r["output_tokens"] + args.num_prompts * args.input_len) / r["total_s"],
               req_s=args.num_prompts / r["total_s"], preemptions=core.scheduler.num_preemptions,
               kv_blocks=core.kv.num_blocks, steps=r["steps"],
               **{k: r[k] for k in ("mixed_steps", "mixed_s", "decode_only_steps", "decode_only_s",
                                    "decode_only_mean_batch")})
    if args.compare_hf:
        del core
        _free_cuda()
        try:
            hf = hf_generate_batch(args.preset, args.model, prompts, args.output_len, args.dtype)
            res["hf_generate_batch_output_tok_s"] = hf["output_tok_s"]
            res["speedup_vs_hf_generate_batch"] = res["output_tok_s"] / hf["output_tok_s"]
        except Exception as e:  # noqa: BLE001 - report, do not hide
            res["hf_generate_batch_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def _free_cuda():
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- serving benchmark ----------------------------------------------------------------------------------

_LOG_FIELD = re.compile(r"(\w+)=(\S+)")


def parse_request_log(text: str) -> dict[str, dict[str, float | str]]:
    """req_id -> the fields of its FD_LOG_DIR/requests.log line (kiln.server.frontend.RequestLogObserver):
    numbers as floats, "-" (unknown) left out, anything else as text."""
    out: dict[str, dict[str, float | str]] = {}
    for line in text.splitlines():
        start = line.find("req_id=")
        if start < 0:
            continue
        fields: dict[str, float | str] = {}
        for key, value in _LOG_FIELD.findall(line[start:].split(" error=", 1)[0]):
            if value == "-":
                continue
            try:
                fields[key] = float(value)
            except ValueError:
                fields[key] = value
        rid = fields.pop("req_id", None)
        if rid is not None:  # "-": refused before it had an id (e.g. a bad prompt): no split to report
            out[str(rid)] = fields
    return out


def server_split(records: dict[str, dict], request_ids: list[str]) -> dict[str, list[float]]:
    """Seconds per request of the server's side of each request: queue (the engine's arrival to first
    scheduling), prefill (the rest of the server's TTFT), decode (first token to the end), the server's TTFT and
    TPOT; only requests that have the field."""
    split: dict[str, list[float]] = {"queue": [], "prefill": [], "decode": [], "ttft": [], "tpot": []}
    for rid in request_ids:
        r = records.get(rid)
        if r is None:
            continue
        for name, key in (("queue", "queue_s"), ("prefill", "prefill_s"), ("decode", "decode_s"), ("ttft", "ttft_s")):
            if isinstance(r.get(key), float):
                split[name].append(r[key])
        n = r.get("output_tokens")
        if isinstance(r.get("decode_s"), float) and isinstance(n, float) and n > 1:
            split["tpot"].append(r["decode_s"] / (n - 1))
    return split


def _read_request_log(path: Path, request_ids: list[str], wait_s: float = 10.0) -> dict[str, dict]:
    """The log lines of these requests (a worker writes a line as its request ends, just after the client has
    the last byte: wait up to wait_s for all of them)."""
    deadline = time.monotonic() + wait_s
    while True:
        records = parse_request_log(path.read_text(errors="replace")) if path.exists() else {}
        if all(r in records for r in request_ids) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


class ColdServer:
    """`kiln serve` started by the benchmark on free ports with an empty Triton compile cache and its own log
    directory (both in a temp dir), the rest of its settings from this environment (MODEL_DIR, BATCH_SIZE, ...)
    and --server-env. start() returns the seconds from launch to ready."""

    def __init__(self, server_env: list[str]):
        import socket

        self.tmp = tempfile.TemporaryDirectory(prefix="kiln-cold-")
        root = Path(self.tmp.name)
        socks = [socket.socket() for _ in range(5)]
        for sk in socks:
            sk.bind(("127.0.0.1", 0))
        http, health, metrics, engine, grpc = (sk.getsockname()[1] for sk in socks)
        for sk in socks:
            sk.close()
        self.env = dict(os.environ)
        self.env.update({"PUSH_MODE_HTTP_PORT": str(http), "HTTP_PORT": str(health), "METRICS_PORT": str(metrics),
                         "INFER_QUEUE_PORT": str(engine), "GRPC_PORT": str(grpc), "FD_LOG_DIR": str(root / "log"),
                         "TRITON_CACHE_DIR": str(root / "triton-cache"), "KILN_HOST": "127.0.0.1"})
        for kv in server_env:
            key, sep, value = kv.partition("=")
            if not sep:
                raise SystemExit(f"--server-env {kv!r}: expected KEY=VALUE")
            self.env[key] = value
        self.url = f"http://127.0.0.1:{self.env['PUSH_MODE_HTTP_PORT']}"
        self.grpc_url = f"127.0.0.1:{self.env['GRPC_PORT']}"
        self.health_url = f"http://127.0.0.1:{self.env['HTTP_PORT']}/v2/health/ready"
        self.log_path = Path(self.env["FD_LOG_DIR"]) / "requests.log"
        self.console = root / "console.log"
        self.keep_console: str | None = None  # where stop() copies the server's console log, if set
        self.proc = None

    def start(self, timeout: float) -> float:
        import subprocess
        import urllib.error
        import urllib.request

        t0 = time.perf_counter()
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "kiln.entrypoints.cli", "serve"], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                tail = self.console.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"kiln serve exited ({self.proc.returncode}) during start-up:\n{tail}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"kiln serve was not ready within {timeout:.0f} s (console: {self.console})")

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.keep_console and self.console.exists():  # the server's own log outlives its temp dir
            import shutil
            shutil.copyfile(self.console, self.keep_console)
        self.tmp.cleanup()


def cmd_serve(args) -> dict:
    cold = None
    if args.cold:
        cold = ColdServer(args.server_env)
        if args.output_json:
            cold.keep_console = args.output_json + ".server.log"
        try:
            start_to_ready = cold.start(args.timeout)
            args.base_url, args.grpc_url = cold.url, cold.grpc_url
            args.request_log = str(cold.log_path)
            res = _run_serve(args)
            res["cold"] = {"start_to_ready_s": start_to_ready,
                           "note": "kiln serve started on an empty Triton compile cache (a temp dir, removed); "
                                   "measured from the first request after ready"}
            return res
        finally:
            cold.stop()
    return _run_serve(args)


def _run_serve(args) -> dict:
    import asyncio

    import httpx
    import numpy as np

    url = args.base_url.rstrip("/") + "/v1/completions"
    native_url = args.base_url.rstrip("/") + "/v1/chat/completions"
    rnd = random.Random(args.seed)
    prompts = [[rnd.randrange(100, args.vocab_limit) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    response_format = None
    if args.json_schema:
        if args.api != "openai":
            raise SystemExit("--json-schema: only with --api openai")
        response_format = {"type": "json_schema",
                           "json_schema": {"name": "bench", "schema": json.loads(Path(args.json_schema).read_text())}}

    async def openai_tokens(client, prompt):
        """(new tokens, final count or None) per streamed chunk; the first item is the server's log id."""
        body = {"model": args.served_model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        if response_format is not None:
            body["response_format"] = response_format
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            rid = None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if rid is None:
                    rid = chunk.get("id")
                    yield f"{rid}-0"  # the engine id of choice 0 (openai_schema.request_ids)
                if chunk.get("usage"):
                    yield 0, chunk["usage"].get("completion_tokens")
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    yield 1, None

    async def native_tokens(client, prompt):
        rid = f"bench-{uuid.uuid4().hex}"
        yield rid
        body = {"req_id": rid, "input_ids": prompt, "max_dec_len": args.output_len, "min_dec_len": args.output_len,
                "temperature": 0, "stream": True}
        async with client.stream("POST", native_url, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if line.strip():
                    packet = json.loads(line)
                    if packet.get("error_code"):
                        raise RuntimeError(f"error packet: {packet}")
                    yield len(packet.get("token_ids") or []), None

    async def grpc_tokens(client, prompt):
        import numpy as np_
        import tritonclient.grpc.aio as grpcclient

        rid = f"bench-{uuid.uuid4().hex}"
        yield rid
        inp = grpcclient.InferInput("IN", [1], "BYTES")
        req = {"req_id": rid, "input_ids": prompt, "max_dec_len": args.output_len, "min_dec_len": args.output_len,
               "temperature": 0}
        inp.set_data_from_numpy(np_.array([json.dumps([req]).encode()], dtype=np_.object_))
        done = asyncio.Event()

        async def requests():
            yield {"model_name": "model", "inputs": [inp], "request_id": rid,
                   "outputs": [grpcclient.InferRequestedOutput("OUT")]}
            await done.wait()  # the stream stays open until the final response

        try:
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    raise RuntimeError(str(error))
                msg = json.loads(result.as_numpy("OUT")[0])
                packet = msg[0] if isinstance(msg, list) else msg
                if packet.get("error_code"):
                    raise RuntimeError(f"error packet: {packet}")
                yield len(packet.get("token_ids") or []), None
                if packet.get("is_end"):
                    break
        finally:
            done.set()

    stream_of = {"openai": openai_tokens, "native": native_tokens, "grpc": grpc_tokens}[args.api]

    async def one(client, prompt, sem):
        async with sem:
            t0 = time.perf_counter()
            ttft, times, n_tok, final_n, err, rid = None, [], 0, None, None, None
            try:
                async for item in stream_of(client, prompt):
                    if isinstance(item, str):
                        rid = item
                        continue
                    n, final = item
                    final_n = final if final is not None else final_n
                    if n:
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - t0
                        times.append(now)
                        n_tok += n
            except Exception as e:  # noqa: BLE001
                err = str(e) or type(e).__name__
            e2e = time.perf_counter() - t0
            if err or ttft is None:
                return dict(ok=False, error=err or "no tokens")
            n_tok = final_n or n_tok
            return dict(ok=True, ttft=ttft, e2e=e2e, n=n_tok, itl=list(np.diff(times)), request_id=rid,
                        tpot=(e2e - ttft) / (n_tok - 1) if n_tok > 1 else None)

    async def warm_client(client):
        """This client's own first-use costs (httpx's connection pool and its lazy imports, a gRPC channel's
        connect: tens of ms) paid before the clock starts, so that the first timed request measures the server.
        It asks for nothing the engine does: the model list, or gRPC readiness."""
        if args.api == "grpc":
            await client.is_server_ready()
            return
        async with client.stream("GET", args.base_url.rstrip("/") + "/v1/models") as r:
            async for _ in r.aiter_lines():
                pass

    async def main():
        sem = asyncio.Semaphore(args.max_concurrency or len(prompts))
        # idle connections dropped before the server's 5 s keep-alive closes them: reusing one that the server is closing
        # fails the request with a ReadError (seen at 8 req/s, 7 of 400)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=2.0)
        if args.api == "grpc":
            import tritonclient.grpc.aio as grpcclient
            client = grpcclient.InferenceServerClient(args.grpc_url)
        else:
            client = httpx.AsyncClient(timeout=args.timeout, limits=limits)
        async with client:
            await warm_client(client)
            tasks = []
            t0 = time.perf_counter()
            for p in prompts:
                tasks.append(asyncio.create_task(one(client, p, sem)))
                if args.request_rate != float("inf"):
                    await asyncio.sleep(rnd.expovariate(args.request_rate))
            results = await asyncio.gather(*tasks)
            return results, time.perf_counter() - t0

    results, dur = asyncio.run(main())
    ok = [r for r in results if r["ok"]]

    def stats(xs, scale=1000.0):
        if not xs:
            return {"mean": None, "median": None, "p99": None}
        a = np.array(xs) * scale
        return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}

    out_tokens = sum(r["n"] for r in ok)
    server = None
    log_path = Path(args.request_log) if args.request_log else Path(os.environ.get("FD_LOG_DIR", "log")) / "requests.log"
    if log_path.exists():
        ids = [r["request_id"] for r in ok]
        split = server_split(_read_request_log(log_path, ids), ids)
        server = {"request_log": str(log_path), "matched": len(split["ttft"]),
                  **{f"{k}_ms": stats(v) for k, v in split.items()}}
    return dict(bench="serve", api=args.api, completed=len(ok), failed=len(results) - len(ok), duration_s=dur,
                request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                req_s=len(ok) / dur, output_tok_s=out_tokens / dur,
                total_tok_s=(out_tokens + len(ok) * args.input_len) / dur,
                ttft_ms=stats([r["ttft"] for r in ok]), tpot_ms=stats([r["tpot"] for r in ok if r["tpot"]]),
                itl_ms=stats([x for r in ok for x in r["itl"]]), e2e_ms=stats([r["e2e"] for r in ok]),
                server=server, errors=[r["error"] for r in results if not r["ok"]][:5])


# -- argument parsing -----------------------------------------------------------------------------------

def _engine_args(p):
    p.add_argument("--model", default=None, help="model dir / .gguf (default: the bundled model)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="a real model shape with random weights")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-reserve-ratio", type=lambda v: None if v == "auto" else float(v), default=None,
                   help="admission keeps this share of the running requests' future KV blocks free (1: no "
                        "preemption when every request runs to max_tokens; auto, the default: the share that "
                        "finished requests used)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"])
    p.add_argument("--quantization", default=None, choices=[None, "w8a16", "w8a8-int8", "w8a8-fp8"],
                   help="quantize the weights while loading (dummy weights too)")
    p.add_argument("--quantize-lm-head", action="store_true", help="the LM head in weight-only int8 too")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--tensor-parallel-size", "--mp-num", type=int, default=1, help="GPUs per model (MP_NUM)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE models under MP_NUM > 1: whole experts per GPU (KILN_ENABLE_EXPERT_PARALLEL)")
    p.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="queue step N+1 before step N's ids reach the host (auto: on with CUDA)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 5}\'')
    p.add_argument("--compare-hf", action="store_true", help="run the same workload through transformers too")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="every request's output follows this JSON schema (structured outputs; e.g. "
                        "benchmarks/json_schema_long.json, which a random model does not finish early)")
    p.add_argument("--output-json", default=None)


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: latency, throughput, serve, write-checkpoint")
    bench.set_defaults(func=cmd_bench)
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    lat = bsub.add_parser("latency", help="fixed batch, input and output lengths")
    _engine_args(lat)
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--iters", type=int, default=3)
    lat.add_argument("--warmup-iters", type=int, default=1)
    lat.add_argument("--bias-token", type=int, default=None, metavar="ID",
                     help="every request's output repeats this token (a +100 logit bias): speculative decoding's "
                          "best case, every n-gram draft confirmed")
    lat.add_argument("--profile", default=None,
                     help="write a kernel-time table of 16 decode steps to this file (and their trace beside it)")
    thr = bsub.add_parser("throughput", help="offline: N requests of random token ids, ignore_eos")
    _engine_args(thr)
    thr.add_argument("--num-prompts", type=int, default=256)
    thr.add_argument("--prompt-logprobs", type=int, default=None, metavar="N",
                     help="every request scores its prompt too, with N top logprobs a position (as echo + logprobs)")
    thr.add_argument("--profile-steps", default=None, metavar="FIRST,N",
                     help="profile steps FIRST..FIRST+N-1 of the run (e.g. mixed steps of prefill and decode) and "
                          "write their kernel-time table to --profile FILE")
    thr.add_argument("--profile", default=None, help="the table's file (with --profile-steps)")
    srv = bsub.add_parser("serve", help="client for a running server (OpenAI streaming API)")
    srv.add_argument("--base-url", default="http://127.0.0.1:9965")
    srv.add_argument("--served-model", default="default")
    srv.add_argument("--api", default="openai", choices=["openai", "native", "grpc"],
                     help="streamed over the OpenAI completions API, the seed's native HTTP API (NDJSON) or KServe "
                          "v2 gRPC ModelStreamInfer; native and grpc force the output length with min_dec_len")
    srv.add_argument("--grpc-url", default="127.0.0.1:8811", help="the gRPC server (--api grpc)")
    srv.add_argument("--num-prompts", type=int, default=100)
    srv.add_argument("--input-len", type=int, default=128)
    srv.add_argument("--output-len", type=int, default=128)
    srv.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    srv.add_argument("--max-concurrency", type=int, default=None)
    srv.add_argument("--vocab-limit", type=int, default=30000, help="random prompt ids are drawn in [100, this)")
    srv.add_argument("--timeout", type=float, default=600)
    srv.add_argument("--seed", type=int, default=0)
    srv.add_argument("--json-schema", default=None, metavar="FILE",
                     help="add response_format json_schema (this file) to every request (--api openai)")
    srv.add_argument("--output-json", default=None)
    srv.add_argument("--request-log", default=None,
                     help="the server's requests.log for its queue/prefill/decode split (default: "
                          "$FD_LOG_DIR/requests.log, ./log/requests.log; skipped if absent)")
    srv.add_argument("--cold", action="store_true",
                     help="start `kiln serve` here on free ports with an empty Triton compile cache (temp dir), its "
                          "settings from the environment and --server-env, measure from the first request after "
                          "ready, then stop it")
    srv.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                     help="a setting of the --cold server (repeatable), e.g. BATCH_SIZE=256")
    wc = bsub.add_parser("write-checkpoint", help="write a random HF checkpoint of a real model shape")
    wc.add_argument("--preset", required=True, choices=sorted(PRESETS))
    wc.add_argument("--out", required=True)
    wc.add_argument("--dtype", default="bfloat16")
    wc.add_argument("--no-weights", action="store_true",
                    help="only config.json + tokenizer: serve it with --load-format dummy")


def cmd_bench(args) -> int:
    if args.bench_cmd == "write-checkpoint":
        print(write_checkpoint(args.preset, args.out, args.dtype, weights=not args.no_weights))
        return 0
    fn = {"latency": cmd_latency, "throughput": cmd_throughput, "serve": cmd_serve}[args.bench_cmd]
    if getattr(args, "preset", None) and args.load_format == "auto":
        args.load_format = "dummy"
    res = fn(args)
    text = json.dumps(res, indent=1)
    print(text)
    if args.output_json:
        Path(args.output_json).write_text(text)
    return 0


def main(argv=None) -> int:  # `python -m kiln.entrypoints.bench latency ...` without the CLI
    p = argparse.ArgumentParser(prog="kiln")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_bench_parser(sub)
    return cmd_bench(p.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
