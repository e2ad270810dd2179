"""Issue 12's GPU check: the decode step time of a batch with a json_schema on every request, against the same
batch without one (target: at most 10% more).

    PYTHONPATH=. python3 benchmarks/grammar_tpot.py --preset llama3-8b --tokenizer DIR [--batch 64] [--json OUT]

Random weights of the preset's shape (`--load-format dummy`). The synthetic tokenizer of `kiln bench
write-checkpoint` has no token that spells `{` or `"`, so --tokenizer copies a real one (tokenizer.json and its
config, e.g. the bundled SmolLM2's) into the checkpoint; the model's vocabulary stays the preset's (xgrammar pads
the mask). Each mode: `batch` requests of `input-len` random tokens, greedy, `output-len` new tokens; the step
times are host wall times of EngineCore.step() (what a client sees), median over the decode steps that ran the
whole batch. With a grammar a request ends when its JSON is complete, so the schema keeps one long free string
open and the report gives how many steps ran the whole batch.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# every request: an object whose one string field a random model keeps open (tokens that close it are rare)
SCHEMA = {"type": "object", "properties": {"notes": {"type": "string"}}, "required": ["notes"]}


def run_mode(core, prompts, params) -> dict:
    for i, p in enumerate(prompts):
        err = core.add_request(f"r{i}", p, params)
        assert err is None, err
    n = len(prompts)
    full, all_steps = [], []
    while core.has_unfinished():
        running = len(core.scheduler.running)
        decoding = running == n and all(len(r.output_token_ids) >= 1 for r in core.scheduler.running)
        t = time.perf_counter()
        core.step()
        dt = time.perf_counter() - t
        all_steps.append(dt)
        if decoding:
            full.append(dt)
    return {"steps": len(all_steps), "full_batch_steps": len(full),
            "step_ms_median": 1e3 * statistics.median(full) if full else None,
            "step_ms_mean": 1e3 * statistics.fmean(full) if full else None,
            "total_s": sum(all_steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--tokenizer", required=True, help="a directory holding tokenizer.json (+ tokenizer_config.json)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from kiln.engine.config import EngineConfig
    from kiln.engine.core import EngineCore
    from kiln.engine.request import SamplingParams
    from kiln.engine.structured import StructuredSpec
    from kiln.entrypoints.bench import write_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="kiln-grammar-"))
    model = write_checkpoint(args.preset, str(tmp / "m"), weights=False)
    for f in Path(args.tokenizer).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, Path(model) / f.name)
    core = EngineCore(EngineConfig(model=str(model), load_format="dummy", max_num_seqs=args.batch,
                                   max_model_len=args.input_len + args.output_len + 8, enable_prefix_caching=False,
                                   max_waiting=1 << 20))
    vocab = min(core.runner.model_config.vocab_size, 49152)
    rnd = random.Random(0)
    prompts = [[rnd.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(args.batch)]
    base = dict(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    spec = StructuredSpec.json_schema(SCHEMA)
    run_mode(core, prompts[:8], SamplingParams(**base, structured=spec))  # the grammar compiles; paths warm
    res = {"batch": args.batch, "input_len": args.input_len, "output_len": args.output_len, "schema": SCHEMA}
    for name, params in (("plain", SamplingParams(**base)), ("json_schema", SamplingParams(**base, structured=spec)),
                         ("plain_again", SamplingParams(**base))):
        res[name] = run_mode(core, prompts, params)
        print(name, json.dumps(res[name]), flush=True)
    plain = statistics.fmean([res["plain"]["step_ms_median"], res["plain_again"]["step_ms_median"]])
    res["json_schema_vs_plain"] = res["json_schema"]["step_ms_median"] / plain
    print(f"batch {args.batch}: decode step median plain {plain:.2f} ms, json_schema "
          f"{res['json_schema']['step_ms_median']:.2f} ms: x{res['json_schema_vs_plain']:.3f} "
          f"({res['json_schema']['full_batch_steps']} full-batch steps with the grammar)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
