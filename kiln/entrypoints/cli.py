"""The `kiln` command.

    kiln serve [flags]      the whole service in the foreground (env vars of the seed + equivalent flags)
    kiln generate ...       offline generation (kiln.entrypoints.generate)
    kiln bench ...          latency / throughput / serve benchmarks (kiln.entrypoints.bench)
    kiln quantize ...       post-training quantization into a compressed-tensors checkpoint (kiln.entrypoints.quantize)

A subcommand = one `sub.add_parser(...)` with `set_defaults(func=...)` below; `func(args)` returns the exit code.
"""
from __future__ import annotations

import argparse
import os
import sys


def _version() -> str:
    try:
        from kiln import __version__
        return __version__
    except Exception:  # noqa: BLE001
        return "unknown"


# -- serve ---------------------------------------------------------------------------------------------

SERVE_EPILOG = """\
Every setting is read from its environment variable (the seed's names, as in the deploy guide) and can be
overridden by its flag. Examples:
  kiln serve                                      # bundled default model, HTTP API on :9965
  MODEL_DIR=/models PUSH_MODE_HTTP_PORT=9965 BATCH_SIZE=48 kiln serve
  kiln serve --model-dir /models --port 8000 --workers 2 --grpc-port -1 --metrics-port -1
CUDA_VISIBLE_DEVICES selects the GPUs as usual. See docs/configuration.md for the full table."""


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from kiln.config import add_arguments

    add_arguments(p)


def cmd_serve(args: argparse.Namespace) -> int:
    from kiln.config import ConfigError, KilnConfig
    from kiln.entrypoints.serve import serve

    try:
        cfg = KilnConfig.load(os.environ, args)
        return serve(cfg)
    except ConfigError as e:
        print(f"kiln serve: error: {e}", file=sys.stderr)
        return 2


# -- generate / bench: their arguments live beside their code ------------------------------------------

# -- main ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln: a fast LLM inference server.")
    parser.add_argument("--version", action="version", version=f"kiln {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the inference service in the foreground",
                       description="Run the inference service (HTTP native + OpenAI API, gRPC, health, metrics) "
                                   "in the foreground. Ctrl-C / SIGTERM stops it gracefully.",
                       epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    from kiln.entrypoints.bench import add_bench_parser
    from kiln.entrypoints.generate import add_generate_args, cmd_generate

    p = sub.add_parser("generate", help="generate text offline (no server)")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)

    add_bench_parser(sub)

    from kiln.entrypoints.quantize import add_quantize_args, cmd_quantize

    p = sub.add_parser("quantize", help="quantize a checkpoint (w8a8-int8, w8a8-fp8, w8a16; 8-bit KV scales)",
                       description="Post-training quantization of a Hugging Face checkpoint into a new "
                                   "compressed-tensors checkpoint that kiln serve (and vLLM) load as is.")
    add_quantize_args(p)
    p.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
