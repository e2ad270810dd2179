"""CPU decode speed of Kiln beside llama.cpp on the bundled GGUF, idle and with one core busy.

    .venv/bin/python benchmarks/cpu_bench.py                 # the whole table (Kiln, and llama.cpp if installed)
    .venv/bin/python benchmarks/cpu_bench.py --repeats 5 --kiln-threads 1,2 --no-llama-cpp

Each cell: `LLM.generate` (or llama.cpp's llama_decode) of `--batch` copies of one chat prompt, greedy,
`--tokens` new tokens each (EOS ignored), prefill included; tok/s = new tokens / wall time. Every configuration
runs in a fresh process (thread pools are sized when torch / llama.cpp load), loads the model once, warms up
once, then repeats; the table shows the best and the median, and the 1-minute load average seen during the
cell's runs (other work on the machine skews the figures). "busy": a process spinning on one core runs during
the cell. llama.cpp is `llama-cpp-python` (pip install llama-cpp-python; a benchmark tool only, not a
dependency of Kiln); it is skipped with a note when it is not installed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = [{"role": "user", "content": "Write a short story about a dragon who learns to bake bread."}]


def _kiln_worker(args) -> dict:
    from kiln.threads import ENGINE, configure_threads
    threads = configure_threads(ENGINE, args.threads or None)  # before torch loads
    import torch

    from kiln import LLM, SamplingParams
    llm = LLM(None, dtype=args.dtype)
    prompt = llm.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    sp = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt] * args.batch, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))

    def run() -> int:
        return sum(len(o.token_ids) for o in llm.generate([prompt] * args.batch, sp))
    return _repeat(run, args.repeats) | {"threads": threads, "torch_threads": torch.get_num_threads(),
                                         "dtype": str(llm.engine.runner.dtype).replace("torch.", "")}


def _llama_cpp_worker(args) -> dict:
    import llama_cpp
    import numpy as np

    from kiln.models.default_model import default_gguf_path
    from kiln.threads import usable_cores
    threads = args.threads or usable_cores()
    llm = llama_cpp.Llama(str(default_gguf_path()), n_ctx=512, n_threads=threads, verbose=False)
    # the high-level Llama holds one sequence: a context of our own runs `batch` sequences side by side
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = args.batch * 512
    params.n_seq_max, params.n_threads, params.n_threads_batch = args.batch, threads, threads
    params.kv_unified = True  # one KV buffer for all sequences, as llama-server runs parallel slots
    ctx, vocab = llama_cpp.llama_init_from_model(llm._model.model, params), llm.n_vocab()
    prompt = llm.tokenize(_chat_text().encode(), add_bos=False, special=True)  # the same tokens Kiln gets
    batch = llama_cpp.llama_batch_init(max(len(prompt) * args.batch, args.batch), 0, args.batch)

    def add(i: int, tok: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits

    def greedy(rows: list[int]) -> list[int]:
        return [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, r), shape=(vocab,))))
                for r in rows]

    def run(tokens: int) -> int:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        n = 0
        for s in range(args.batch):  # every sequence's prompt in one prefill batch
            for p, tok in enumerate(prompt):
                add(n, tok, p, s, p == len(prompt) - 1)
                n += 1
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed (prefill): {rc}")
        last = greedy([(s + 1) * len(prompt) - 1 for s in range(args.batch)])
        made = args.batch
        for step in range(1, tokens):
            for s, tok in enumerate(last):
                add(s, tok, len(prompt) + step - 1, s, True)
            batch.n_tokens = args.batch
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed (decode)")
            last = greedy(list(range(args.batch)))
            made += args.batch
        return made

    run(8)
    out = _repeat(lambda: run(args.tokens), args.repeats) | {"threads": threads}
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    return out


def _chat_text() -> str:
    from kiln.models.default_model import default_model_dir
    from kiln.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(default_model_dir())
    return tok.decode(tok.apply_chat_template(PROMPT, add_generation_prompt=True))


def _repeat(run, repeats: int) -> dict:
    rates, loads = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t))
        loads.append(os.getloadavg()[0])
    return {"tok_s": rates, "load": loads}


# ----------------------------------------------------------------------------------------------------------

def _cell(engine: str, batch: int, threads: int, busy: bool, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--batch", str(batch), "--threads",
           str(threads), "--tokens", str(a.tokens), "--repeats", str(a.repeats), "--dtype", a.dtype]
    # one core busy until this cell ends (or this script dies: the spinner stops once its parent is gone)
    spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass"
    spinner = subprocess.Popen([sys.executable, "-c", spin]) if busy else None
    try:
        env = dict(os.environ, **({"OMP_WAIT_POLICY": a.wait_policy} if a.wait_policy else {}))
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per sequence (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell (default 3)")
    ap.add_argument("--kiln-threads", default="0", help="engine thread counts to try; 0 = auto (default 0)")
    ap.add_argument("--llama-threads", default="0", help="llama.cpp thread counts to try; 0 = all cores")
    ap.add_argument("--dtype", default="auto", help="Kiln's DTYPE (default auto)")
    ap.add_argument("--wait-policy", help="OMP_WAIT_POLICY for the workers (Kiln's engine default: PASSIVE)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="Kiln only")
    ap.add_argument("--no-kiln", action="store_true", help="llama.cpp only")
    ap.add_argument("--no-busy", action="store_true", help="idle cells only")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per cell")
    ap.add_argument("--json", help="also write every cell's raw figures to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        res = (_kiln_worker if a.worker == "kiln" else _llama_cpp_worker)(a)
        print(json.dumps(res))
        return 0

    import importlib.util
    engines = [] if a.no_kiln else [("kiln", [int(t) for t in a.kiln_threads.split(",")])]
    if not a.no_llama_cpp:
        if importlib.util.find_spec("llama_cpp") is None:
            print("llama.cpp: not installed (pip install llama-cpp-python); Kiln only", file=sys.stderr)
        else:
            engines.append(("llama.cpp", [int(t) for t in a.llama_threads.split(",")]))
    cells = []
    print(f"{'engine':<14} {'threads':>7} {'batch':>5} {'load':<5} {'tok/s best':>10} {'median':>8} "
          f"{'busy/idle':>9}  load avg")
    for engine, thread_list in engines:
        for threads in thread_list:
            for batch in [int(b) for b in a.batches.split(",")]:
                idle = None
                for busy in ([False] if a.no_busy else [False, True]):
                    r = _cell(engine if engine == "kiln" else "llama", batch, threads, busy, a)
                    r.update(engine=engine, batch=batch, busy=busy, threads_asked=threads)
                    cells.append(r)
                    name = f"{engine}{'/' + r['dtype'] if 'dtype' in r else ''}"
                    if "error" in r:
                        print(f"{name:<14} {threads or 'auto':>7} {batch:>5} {'busy' if busy else 'idle':<5} "
                              f"error: {r['error']}")
                        continue
                    best, med = max(r["tok_s"]), statistics.median(r["tok_s"])
                    ratio = f"{idle / med:.2f}x" if busy and idle else ""
                    idle = med if not busy else idle
                    print(f"{name:<14} {r['threads']:>7} {batch:>5} {'busy' if busy else 'idle':<5} {best:>10.1f} "
                          f"{med:>8.1f} {ratio:>9}  {min(r['load']):.1f}-{max(r['load']):.1f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(cells, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
