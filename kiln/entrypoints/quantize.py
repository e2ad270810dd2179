"""`kiln quantize`: post-training quantization of a Hugging Face checkpoint into a compressed-tensors one."""
from __future__ import annotations

import argparse
import sys

from kiln.quantization import SCHEMES


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory or .gguf file (default: the bundled "
                   "model)")
    p.add_argument("--scheme", required=True, choices=SCHEMES, help="w8a8-int8: int8 per-channel weights, "
                   "int8 per-token activations; w8a8-fp8: E4M3 per-channel weights, E4M3 per-token activations; "
                   "w8a16: int8 per-channel weights only")
    p.add_argument("--output", required=True, help="new directory to write (must not exist)")
    p.add_argument("--kv-cache-scheme", choices=("int8", "fp8"), default=None,
                   help="also calibrate static KV-cache scales (per layer and KV head) for this 8-bit cache")
    p.add_argument("--smoothquant-alpha", type=float, default=None,
                   help="w8a8-int8: SmoothQuant migration strength in [0, 1] (0.5 is usual); off by default")
    p.add_argument("--calib-file", default=None, help=".txt or .jsonl (\"text\" per line) calibration text "
                   "(default: a short English text that ships with Kiln)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--device", default="auto", help="where calibration runs: auto | cpu | cuda")


def cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kiln.models.default_model import resolve_model_path
    from kiln.quantization.ptq import QuantizeOptions, quantize_checkpoint

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.model is not None and not Path(args.model).expanduser().exists():
            raise ValueError(f"model {args.model}: no such file or directory")
        if Path(args.output).exists():  # before the (maybe long) GGUF conversion
            raise ValueError(f"output directory {args.output} already exists; choose a new path")
        model_dir = resolve_model_path(args.model)
        quantize_checkpoint(model_dir, args.output, QuantizeOptions(
            scheme=args.scheme, kv_cache_scheme=args.kv_cache_scheme, smoothquant_alpha=args.smoothquant_alpha,
            calib_file=args.calib_file, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
            device=args.device), progress)
    except (ValueError, OSError) as e:
        print(f"kiln quantize: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0
