"""The kinds of work the engine has run: what a warm-up must reach so that nothing new runs (or compiles) after
ready.

Each engine step reports keys (family, value) to the core's VariantLog:
  ("step", kind)            decode | prefill | mixed, with "+chunk" when a prefill row samples nothing (a middle
                            chunk of a prompt longer than the step's prefill budget); "speculative" when decode
                            rows carried draft tokens (kiln/engine/speculative.py; each a decode row of its own)
  ("decode_batch", size)    the CUDA-graph ladder size a decode-only step of this batch replays (on CPU the same
                            ladder, so the CPU test checks what the GPU captures)
  ("prefill_tile", bucket)  the Triton prefill kernel's BLOCK_M class of the step's longest prefill row: 16, 32, 64
                            (next power of two of short rows) or "full" (docs/kernels.md)
  ("sampler", path)         each of the sampler's code paths the step's rows take (Sampler.paths)
and, once `watch_kernels()` is on, every Triton kernel launch reports its compiled variant:
  ("kernel", key)           kiln.kernels._utils.variant_key: the kernel, its constexprs and options, and the
                            specialization of each other argument (what Triton compiles one binary for). It works
                            the same under TRITON_INTERPRET=1, so a CPU test sees what a GPU would compile.
The warm-up (EngineCore.warmup) drives the engine until it has seen every key traffic can reach; a test runs a
mixed load after it and checks the load reached none it did not.
"""
from __future__ import annotations

import logging
import time

from kiln.engine.cuda_graph import batch_size_ladder

log = logging.getLogger("kiln.engine")


def prefill_tile(max_query_len: int) -> int | str:
    """The prefill kernel's tile class for a step whose longest prefill row has max_query_len tokens."""
    if max_query_len > 64:
        return "full"
    return max(16, 1 << (max_query_len - 1).bit_length())


def ladder_size(n: int, max_num_seqs: int) -> int:
    return next(s for s in batch_size_ladder(max_num_seqs) if s >= n)


class VariantLog:
    def __init__(self, max_num_seqs: int):
        self.max_num_seqs = max_num_seqs
        self.seen: set[tuple[str, object]] = set()
        self.kernels = None  # a kiln.kernels._utils.KernelVariants while watch_kernels() is on

    def watch_kernels(self) -> None:
        """Record the variant key of every Triton kernel launch from now on (tests and diagnosis: it costs a few
        microseconds per launch, so a server leaves it off)."""
        from kiln.kernels._utils import KernelVariants
        if self.kernels is None:
            self.kernels = KernelVariants().start()

    def record_step(self, num_tokens: list[int], num_decode_rows: int, num_sampling: int,
                    sampler_paths: frozenset[str], num_draft_tokens: int = 0) -> None:
        """num_draft_tokens: speculative tokens of the step's decode rows; the runner gives each a decode row of its
        own (so the decode graphs of the larger batch run), and ("step", "speculative") says that drafts ran."""
        if num_draft_tokens:
            self.seen.add(("step", "speculative"))
            num_tokens = [1] * (num_decode_rows + num_draft_tokens) + list(num_tokens[num_decode_rows:])
            num_decode_rows += num_draft_tokens
            num_sampling += num_draft_tokens
        rows = len(num_tokens)
        prefill = rows - num_decode_rows
        kind = "decode" if not prefill else "prefill" if not num_decode_rows else "mixed"
        if num_sampling < rows:
            kind += "+chunk"
        self.seen.add(("step", kind))
        if not prefill:
            self.seen.add(("decode_batch", ladder_size(rows, self.max_num_seqs)))
        else:
            self.seen.add(("prefill_tile", prefill_tile(max(num_tokens[num_decode_rows:]))))
        self.seen.update(("sampler", p) for p in sampler_paths)

    def snapshot(self) -> set[tuple[str, object]]:
        kernels = self.kernels.keys if self.kernels is not None else ()
        return self.seen | {("kernel", k) for k in kernels}

    @staticmethod
    def describe(keys: set[tuple[str, object]]) -> str:
        by: dict[str, list[str]] = {}
        per_kernel: dict[str, int] = {}
        for fam, v in keys:
            if fam == "kernel":  # too long to list: variants per kernel
                per_kernel[v[0]] = per_kernel.get(v[0], 0) + 1
            else:
                by.setdefault(fam, []).append(str(v))
        by.update({"kernel variants": [f"{k} x{n}" for k, n in per_kernel.items()]} if per_kernel else {})
        return "; ".join(f"{fam}: {', '.join(sorted(vs, key=lambda s: (len(s), s)))}" for fam, vs in sorted(by.items()))


def compiled_triton_kernels() -> dict[str, int]:
    """Compiled specializations per Kiln Triton kernel in this process (GPU only; {} without Triton or in the
    interpreter). Compared before and after a load, it shows whether anything compiled after ready."""
    out: dict[str, int] = {}
    try:
        import importlib

        from triton.runtime.jit import JITFunction
    except Exception:  # noqa: BLE001 - no Triton: nothing compiles
        return out
    for mod in ("cache", "decode_attention", "prefill_attention", "rmsnorm", "rotary", "activation", "w8a16", "quant"):
        try:
            m = importlib.import_module(f"kiln.kernels.{mod}")
        except Exception:  # noqa: BLE001
            continue
        for name, fn in vars(m).items():
            if isinstance(fn, JITFunction):
                caches = getattr(fn, "device_caches", {}) or {}
                out[f"{mod}.{name}"] = sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in caches.values())
    return out


def describe_compile(hook_kwargs: dict) -> str:
    """A compile that Triton's JIT hook reports, in kiln.kernels._utils.describe_variant's terms: the kernel, its
    options, each argument's type (":D" where 16-byte aligned or divisible by 16) and the constexprs (an int equal
    to 1 among them). Triton's own `repr` is no use here: on Triton 3.6 it zips the names with a character of a
    string key."""
    c = hook_kwargs.get("compile") or {}
    fn = hook_kwargs.get("fn")
    name = getattr(fn, "name", None) or "?"
    sig = c.get("signature")
    if not isinstance(sig, dict):
        return " ".join(str(hook_kwargs.get("key", "?")).split())[:600]
    names = list(sig)

    def arg(k) -> str:
        i = k[0] if isinstance(k, tuple) and len(k) == 1 else k
        return names[i] if isinstance(i, int) and 0 <= i < len(names) else str(k)
    aligned = {arg(k) for k, attrs in ((c.get("configs") or [{}])[0] or {}).items()
               if any(a and a[0] == "tt.divisibility" for a in attrs)}
    fields = [f"{k}={c[k]}" for k in ("num_warps", "num_stages") if k in c]
    fields += [f"{n}: {t}{':D' if n in aligned else ''}" for n, t in sig.items() if t != "constexpr"]
    fields += [f"{arg(k)}={v}" for k, v in (c.get("constants") or {}).items()]
    return f"{name}({', '.join(fields)})"


class CompileWatch:
    """Names every Triton kernel this process compiles after ready: each such compile stalls the step that hit it
    for up to seconds, and is a variant the warm-up missed (or a value a kernel should not specialize on).
    Installed through Triton's JIT hooks (triton.knobs.runtime); a no-op where Triton has none (or interprets)."""

    def __init__(self):
        self.ready = False
        self.warmed_up = True  # False: the engine skipped its warm-up (USE_WARMUP=0), so every variant is new
        self.after_ready: list[tuple[str, float]] = []  # (kernel and specialization, compile seconds)
        self._started: dict[int, float] = {}
        self.installed = False

    def install(self) -> "CompileWatch":
        try:
            from triton import knobs
            rt = knobs.runtime
            prev_pre, prev_post = rt.jit_cache_hook, rt.jit_post_compile_hook
        except Exception:  # noqa: BLE001 - an older Triton or none: nothing to watch
            return self

        def pre(*args, **kwargs):
            self._started[id(kwargs.get("key"))] = time.perf_counter()
            return prev_pre(*args, **kwargs) if prev_pre else None

        def post(*args, **kwargs):
            self.compiled(describe_compile(kwargs), time.perf_counter() - self._started.pop(id(kwargs.get("key")),
                                                                                           time.perf_counter()))
            return prev_post(*args, **kwargs) if prev_post else None

        rt.jit_cache_hook, rt.jit_post_compile_hook = pre, post
        self.installed = True
        return self

    def compiled(self, what: str, seconds: float) -> None:
        if self.ready:
            self.after_ready.append((what, seconds))
            why = "a variant the warm-up did not reach" if self.warmed_up else "the warm-up was off (USE_WARMUP)"
            log.warning("Triton compiled a kernel after ready (%.0f ms, stalling the step that needed it; %s, "
                        "docs/kernels.md): %s", 1e3 * seconds, why, what[:900])
