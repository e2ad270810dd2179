"""What LoRA adapters cost a step (CPU or GPU): the bundled model (or --model) with random PEFT adapters of rank
--rank on every projection, greedy, 128 in / 64 out: batch 1 without and with an adapter, and a batch of 8 split
over no adapter and --adapters adapters. Prints tok/s and the engine's decode ms a step.
Run: .venv/bin/python benchmarks/lora_cost.py [--model DIR] [--rank 16] [--adapters 2]"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_adapter(model_dir: Path, out: Path, rank: int, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file
    cfg = json.loads((model_dir / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or h // cfg["num_attention_heads"])
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (inter, h),
              "up_proj": (inter, h), "down_proj": (h, inter)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name, (o, n) in shapes.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            p = f"base_model.model.model.layers.{i}.{part}.{name}"
            tensors[f"{p}.lora_A.weight"] = torch.randn(rank, n, generator=g) * 0.01
            tensors[f"{p}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.01
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank,
                                                         "target_modules": list(shapes)}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    from kiln import LLM, SamplingParams
    from kiln.models.default_model import resolve_model_path
    model_dir = Path(resolve_model_path(args.model))
    tmp = Path(tempfile.mkdtemp())
    modules = {f"a{i}": str(write_adapter(model_dir, tmp / f"a{i}", args.rank, i)) for i in range(args.adapters)}
    llm = LLM(args.model, lora_modules=modules, max_num_seqs=16)
    prompt = list(range(1000, 1128))

    def timed(batch: list[str | None]) -> tuple[float, float]:
        sps = [SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True, lora_name=a) for a in batch]
        llm.generate([prompt] * len(batch), sps)  # warm
        steps0 = llm.engine.num_steps
        t = time.perf_counter()
        outs = llm.generate([prompt] * len(batch), sps)
        dt = time.perf_counter() - t
        return sum(len(o.token_ids) for o in outs) / dt, 1000 * dt / (llm.engine.num_steps - steps0)
    names = list(modules)
    cases = {"batch 1, no adapter": [None], "batch 1, one adapter": [names[0]],
             "batch 8, no adapter": [None] * 8,
             f"batch 8, {len(names)} adapters + none": [([None] + names)[i % (len(names) + 1)] for i in range(8)]}
    print(f"rank {args.rank}, {len(names)} adapters, every projection; {args.output_len} tokens out, 128 in")
    for name, batch in cases.items():
        tok_s, ms = timed(batch)
        print(f"{name:32} {tok_s:8.1f} tok/s  {ms:7.2f} ms a step")


if __name__ == "__main__":
    main()
