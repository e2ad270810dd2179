"""Speculative decoding on real text (the bundled SmolLM2-135M-Instruct, or --model): each prompt alone (batch 1),
greedy, without speculation and with n-gram drafts of 3 and 5 tokens; output tok/s, engine steps, drafts confirmed.
The answers must be equal (greedy). Run: .venv/bin/python benchmarks/spec_text.py [--model DIR] [--max-tokens N]"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARAGRAPH = ("The Rhine is a river that begins in the Swiss Alps, flows along the border between Germany and France, "
             "and then through the Netherlands before emptying into the North Sea. It is one of the longest rivers "
             "in Europe, about 1,230 kilometres, and it has been an important trade route since Roman times.")
CODE = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n\n"
        "def variance(values):\n    m = mean(values)\n    total = 0\n    for v in values:\n        total += (v - m) ** 2\n"
        "    return total / len(values)\n")
PROMPTS = {
    "copy a list": "Repeat this list exactly, twice: Apple, Banana, Cherry, Date, Elderberry, Fig, Grape, Honeydew, "
                   "Kiwi, Lemon, Mango, Nectarine, Orange.",
    "edit code": "Rename the function `mean` to `average` everywhere in this code and show the whole code:\n\n" + CODE,
    "quote and answer": PARAGRAPH + "\n\nQuote the sentence of the text above that gives the length of the river, "
                        "then say where the river ends.",
    "free text": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    from kiln import LLM, SamplingParams
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    rows = []
    for k in (None, 3, 5):
        cfg = None if k is None else {"method": "ngram", "num_speculative_tokens": k}
        llm = LLM(args.model, dtype=args.dtype, speculative_config=cfg)
        llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4))  # first-call costs
        for name, text in PROMPTS.items():
            s0, d0 = llm.engine.num_steps, dict(vars(llm.engine.spec_stats))
            t = time.perf_counter()
            out = llm.chat([{"role": "user", "content": text}], sp)[0]
            dt = time.perf_counter() - t
            spec = {key: v - d0[key] for key, v in vars(llm.engine.spec_stats).items()}
            rows.append(dict(k=k, prompt=name, tokens=len(out.token_ids), seconds=dt,
                             tok_s=len(out.token_ids) / dt, steps=llm.engine.num_steps - s0, text=out.text, **spec))
        del llm
    base = {r["prompt"]: r for r in rows if r["k"] is None}
    print(f"{'prompt':18} {'drafts':>6} {'tokens':>6} {'steps':>5} {'tok/s':>7} {'speed-up':>8} {'confirmed':>9} same")
    for r in rows:
        b = base[r["prompt"]]
        conf = f"{r['num_accepted_tokens']}/{r['num_draft_tokens']}" if r["k"] else ""
        print(f"{r['prompt']:18} {r['k'] or '-':>6} {r['tokens']:6d} {r['steps']:5d} {r['tok_s']:7.1f} "
              f"{r['tok_s'] / b['tok_s']:8.2f} {conf:>9} {r['text'] == b['text']}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
