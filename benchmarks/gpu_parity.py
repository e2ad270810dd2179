"""GPU checks of the whole engine (run on the device machine):

1. the same random bf16 weights through transformers, Kiln's PyTorch path (eager) and Kiln's fast path (Triton
   kernels + CUDA graphs): greedy tokens compared position by position;
2. int8 KV cache and W8A16 weights against the bf16 fast path (first tokens agreement);
3. a mixed batch with chunked prefill and preemption on the fast path against the same requests run alone.

Usage: PYTHONPATH=. python benchmarks/gpu_parity.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def make_model(path: Path) -> Path:
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         initializer_range=0.05, rope_theta=500000.0)
    cfg.architectures = ["LlamaForCausalLM"]
    m = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path)
    return path


def kiln_greedy(path, prompts, n, **kw):
    from kiln.engine.config import EngineConfig
    from kiln.engine.core import EngineCore
    from kiln.engine.request import SamplingParams
    core = EngineCore(EngineConfig(model=str(path), dtype="bfloat16", device="cuda", block_size=kw.pop("block_size", 64),
                                   gpu_memory_utilization=0.5, max_num_seqs=kw.pop("max_num_seqs", 16), **kw))
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    res = core.run_to_completion(prompts, sp)
    pre = core.scheduler.num_preemptions
    graphs = core.runner.graphs is not None
    del core
    torch.cuda.empty_cache()
    return res, pre, graphs


def kiln_prompt_logprobs(path, prompts, n, **kw):
    """Each prompt's prompt logprobs (top 1) through the engine, run together with n new tokens each."""
    from kiln.engine.config import EngineConfig
    from kiln.engine.core import EngineCore
    from kiln.engine.request import SamplingParams
    core = EngineCore(EngineConfig(model=str(path), dtype="bfloat16", device="cuda", block_size=64,
                                   gpu_memory_utilization=0.5, max_num_seqs=16, **kw))
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, prompt_logprobs=1)
    for i, p in enumerate(prompts):
        assert core.add_request(str(i), p, sp) is None
    got = {}
    while core.has_unfinished():
        for o in core.step():
            if o.prompt_logprobs is not None:
                got[int(o.request_id)] = o.prompt_logprobs
    del core
    torch.cuda.empty_cache()
    return [got[i] for i in range(len(prompts))]


def prompt_logprob_errors(got, prompts, ref_logits) -> dict:
    """Against transformers' log-softmax (ref_logits: the prompts' rows, concatenated): the mean and largest
    absolute error of the prompt tokens' logprobs, and how often the top token agrees."""
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    errs, agree, row = [], [], 0
    for lps, p in zip(got, prompts):
        for pos in range(1, len(p)):
            errs.append(abs(lps[pos][0] - ref[row + pos - 1, p[pos]].item()))
            agree.append(lps[pos][1][0][0] == int(ref[row + pos - 1].argmax()))
        row += len(p)
    return {"mean_abs_err": sum(errs) / len(errs), "max_abs_err": max(errs), "top1_agree": sum(agree) / len(agree)}


def hf_greedy(path, prompts, n):
    import transformers as tf
    m = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    outs = []
    for p in prompts:
        with torch.no_grad():
            g = m.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
        outs.append(g[0, len(p):].tolist())
    del m
    torch.cuda.empty_cache()
    return outs


def prefill_logits(path, prompts, backend):
    """Logits at every prompt position, one batched prefill, through Kiln's runner."""
    from kiln.engine.config import EngineConfig
    from kiln.engine.kv_cache import KVCacheManager
    from kiln.engine.request import Request, SamplingParams
    from kiln.engine.runner import ModelRunner
    from kiln.engine.scheduler import ScheduledBatch
    r = ModelRunner(EngineConfig(model=str(path), dtype="bfloat16", device="cuda", attention_backend=backend,
                                 block_size=64), str(path))
    r.allocate_kv_cache(128)
    kv = KVCacheManager(128, 64)
    reqs = [Request(str(i), p, SamplingParams()) for i, p in enumerate(prompts)]
    for q in reqs:
        kv.allocate_slots(q, q.num_tokens)
    inputs, _ = r.prepare(ScheduledBatch(reqs, [q.num_tokens for q in reqs]))
    inputs.logits_indices = list(range(len(inputs.input_ids)))
    with torch.inference_mode():
        out = r.forward(inputs).float().cpu()
    del r
    torch.cuda.empty_cache()
    return out


def hf_logits(path, prompts):
    import transformers as tf
    m = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        out = torch.cat([m(torch.tensor([p], device="cuda")).logits[0].float().cpu() for p in prompts])
    del m
    torch.cuda.empty_cache()
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm())


def agreement(a, b):
    """Per sequence: how many leading tokens agree."""
    res = []
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        res.append(k)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    d = make_model(Path(tempfile.mkdtemp()) / "m")
    g = torch.Generator().manual_seed(1)
    lens = [1, 7, 64, 65, 300, 1000, 2047]
    prompts = [torch.randint(100, 32000, (n,), generator=g).tolist() for n in lens]
    lp = prompts[:6]
    ref_logits = hf_logits(d, lp)
    fast_logits = prefill_logits(d, lp, "triton")
    torch_logits = prefill_logits(d, lp, "torch")
    logits_res = {"logits_rel_err_fast_vs_hf": rel(fast_logits, ref_logits),
                  "logits_rel_err_torch_vs_hf": rel(torch_logits, ref_logits),
                  "logits_rel_err_fast_vs_torch": rel(fast_logits, torch_logits),
                  "argmax_agree_fast_vs_hf": float((fast_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())}
    print(json.dumps(logits_res))
    n = 32
    ref_hf = hf_greedy(d, prompts, n)
    torch_path, _, _ = kiln_greedy(d, prompts, n, attention_backend="torch", use_cuda_graph=False)
    fast, _, graphs = kiln_greedy(d, prompts, n, attention_backend="triton")  # async scheduling on (auto)
    fast_sync, _, _ = kiln_greedy(d, prompts, n, attention_backend="triton", async_scheduling=False)
    import kiln.kernels.skinny as skinny
    max_t, skinny.MAX_T = skinny.MAX_T, 0  # dense projections through cuBLAS at every batch size
    fast_cublas, _, _ = kiln_greedy(d, prompts, n, attention_backend="triton")
    skinny.MAX_T = max_t
    fast16, _, _ = kiln_greedy(d, prompts, n, attention_backend="triton", block_size=16)
    kv8, _, _ = kiln_greedy(d, prompts, n, attention_backend="triton", kv_cache_dtype="int8")
    w8, _, _ = kiln_greedy(d, prompts, n, attention_backend="triton", quantization="w8a16")
    # small cache + small token budget: chunked prefill and preemption on the fast path
    tight, pre, _ = kiln_greedy(d, prompts, n, attention_backend="triton", num_gpu_blocks=60,
                                max_num_batched_tokens=512)
    tight_sync, pre_sync, _ = kiln_greedy(d, prompts, n, attention_backend="triton", num_gpu_blocks=60,
                                          max_num_batched_tokens=512, async_scheduling=False)
    # prompt logprobs: in 512-token chunks; and in one-token chunks beside six decodes (budget 7: decode-only steps
    # with a prompt row, on the decode CUDA graphs)
    scored = {f"prompt_logprobs_budget{b}_vs_hf": prompt_logprob_errors(
        kiln_prompt_logprobs(d, lp, n, attention_backend="triton", max_num_batched_tokens=b), lp, ref_logits)
        for b in (512, 7)}
    res = {
        **logits_res, **scored,
        "prompt_lens": lens, "new_tokens": n, "cuda_graphs": graphs,
        "fast_vs_torch_path": agreement(fast, torch_path),
        "fast_vs_transformers": agreement(fast, ref_hf),
        "torch_path_vs_transformers": agreement(torch_path, ref_hf),
        "fast_block16_vs_fast": agreement(fast16, fast),
        "int8_kv_vs_fast": agreement(kv8, fast),
        "w8a16_vs_fast": agreement(w8, fast),
        "tight_cache_vs_fast": agreement(tight, fast), "tight_cache_preemptions": pre,
        # async scheduling must not change a single token (same kernels, same batches)
        "async_identical_to_sync": fast == fast_sync, "tight_async_identical_to_sync": tight == tight_sync,
        "tight_sync_preemptions": pre_sync,
        "skinny_vs_cublas_projections": agreement(fast, fast_cublas),
    }
    text = json.dumps(res)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
