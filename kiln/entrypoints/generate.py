"""`kiln generate`: one prompt through the offline engine, text printed as it streams."""
from __future__ import annotations

import argparse
import sys


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model dir or .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt as a user turn with the model's chat template (default: on when it has one)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"])
    p.add_argument("--quantization", default=None, choices=[None, "w8a16"])
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='draft tokens from the prompt\'s and output\'s own earlier ones, e.g. '
                        '\'{"method": "ngram", "num_speculative_tokens": 5}\'')


def cmd_generate(args: argparse.Namespace) -> int:
    from kiln import LLM, SamplingParams

    from kiln.engine.speculative import SpeculativeConfig
    try:
        spec = SpeculativeConfig.parse(args.speculative_config)
    except ValueError as e:
        print(f"kiln generate: --speculative-config: {e}", file=sys.stderr)
        return 2
    # one sequence; each draft token takes a batch row of its own
    llm = LLM(args.model, dtype=args.dtype, device=args.device, kv_cache_dtype=args.kv_cache_dtype,
              quantization=args.quantization, max_num_seqs=1 + (spec.num_speculative_tokens if spec else 0),
              speculative_config=spec)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed)

    def show(_i: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    if args.chat and llm.tokenizer.has_chat_template:
        out = llm.chat([{"role": "user", "content": args.prompt}], sp, on_text=show)[0]
    else:
        out = llm.generate(args.prompt, sp, on_text=show)[0]
    sys.stdout.write("\n")
    print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)
    return 0
