"""Convert a GGUF file (llama.cpp format) into a Hugging Face model directory.

Supported: Llama-family dense decoders -- GGUF architecture ``llama`` (also Mistral / SmolLM / Llama 2/3 files,
which llama.cpp stores as ``llama``), plus ``qwen2`` and ``qwen3`` (written as Qwen2/Qwen3ForCausalLM configs,
which use the same tensor names; Qwen2 adds q/k/v biases, Qwen3 adds q/k RMS norms), and the mixtures of experts
``qwen2moe`` (its shared expert too), ``qwen3moe`` and ``llama`` with an expert count (Mixtral): llama.cpp's stacked
expert tensors are written one per expert, under the names of the models' own checkpoints.

The output directory holds::

    config.json              LlamaForCausalLM (or Qwen2/Qwen3) config, torch_dtype float32
    model.safetensors        weights with HF tensor names: F16 tensors as they are (float16), the others dequantized
                             to float32 (exact for every GGUF type; float32 keeps Q4 grids visible, see loader)
                             (model-0000i-of-0000n.safetensors + index when larger than the shard limit)
    tokenizer.json           built by transformers' GGUF tokenizer converter
    tokenizer_config.json    with the GGUF chat_template and bos/eos/unk/pad tokens
    special_tokens_map.json
    generation_config.json   eos_token_id (eos plus eot/eom ids when the file has them)
    kiln_conversion.json     marker written last: source file, size, mtime, converter version

llama.cpp's converter permutes the rows of q_proj/k_proj (and their biases) of ``llama`` models so that its
rotary embedding can rotate adjacent pairs (GPT-J style); HF rotates the two halves of each head (NeoX style).
The permutation is undone here. Qwen2/Qwen3 are stored unpermuted by llama.cpp.

Conversion goes into a temporary sibling folder that is renamed into place at the end, so a crashed or concurrent
conversion never leaves a half-written model directory behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

CONVERTER_VERSION = 1
MARKER_FILE = "kiln_conversion.json"
# Shard limit for the safetensors output (bytes).
SHARD_BYTES = 4 * 1024**3

_ARCH_CONFIG = {
    # gguf arch -> (HF architectures, model_type, permute q/k)
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe", False),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe", False),
}
# llama.cpp stacks each layer's experts in one tensor [experts, out, in]: written out per expert, under the names of
# the model's own checkpoints (Mixtral: GGUF arch "llama" with an expert count)
_QWEN_EXPERTS = {"ffn_gate_exps.weight": "mlp.experts.{}.gate_proj.weight",
                 "ffn_up_exps.weight": "mlp.experts.{}.up_proj.weight",
                 "ffn_down_exps.weight": "mlp.experts.{}.down_proj.weight", "ffn_gate_inp.weight": "mlp.gate.weight"}
_EXPERT_TENSORS = {
    "qwen2moe": {**_QWEN_EXPERTS, "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
                 "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
                 "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
                 "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight"},
    "qwen3moe": _QWEN_EXPERTS,
    "llama": {"ffn_gate_exps.weight": "block_sparse_moe.experts.{}.w1.weight",
              "ffn_up_exps.weight": "block_sparse_moe.experts.{}.w3.weight",
              "ffn_down_exps.weight": "block_sparse_moe.experts.{}.w2.weight",
              "ffn_gate_inp.weight": "block_sparse_moe.gate.weight"},
}

# llama.cpp pre-tokenizer names that split every digit on its own (llama-vocab.cpp: "\p{N}" before the GPT-2
# regex). transformers' GGUF tokenizer converter does not know these and falls back to plain GPT-2 splitting.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}

_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# --------------------------------------------------------------------------------------------- public API


def default_cache_root() -> Path:
    """``$KILN_CACHE_DIR`` or ``~/.cache/kiln``."""
    env = os.environ.get("KILN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kiln"


def default_out_dir(gguf_path: str | os.PathLike) -> Path:
    """Cache folder for a GGUF file: ``<cache root>/<stem>-<hash of size, mtime and converter version>``."""
    path = Path(gguf_path)
    st = path.stat()
    key = f"{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}".encode()
    return default_cache_root() / f"{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def is_complete(model_dir: str | os.PathLike) -> bool:
    """True when ``model_dir`` holds a finished conversion (marker present and every file it lists exists)."""
    model_dir = Path(model_dir)
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("converter_version") == CONVERTER_VERSION and all(
        (model_dir / f).is_file() for f in marker.get("files", [])
    )


def gguf_to_hf_dir(gguf_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Convert ``gguf_path`` into a Hugging Face model directory and return its path.

    ``out_dir`` defaults to a cache folder (see :func:`default_out_dir`). Nothing is done when ``out_dir`` already
    holds a complete conversion. Raises ``ValueError`` for a missing file, an unsupported architecture or quant
    type, and ``FileExistsError`` when an explicit ``out_dir`` exists with unrelated content.
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file not found: {gguf_path}")
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(gguf_path)
    if is_complete(out):
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with _Progress(gguf_path) as progress:
            progress.say(f"converting to a Hugging Face model in {out} (first use only)", "reading the GGUF file")
            _convert(gguf_path, tmp, progress)
            _install(tmp, out, explicit=out_dir is not None)
            progress.say("conversion done", "")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------- internals


class _Progress:
    """Progress lines on stderr during a conversion (it takes 10-30 s on a small CPU, and runs inside
    `kiln serve`'s start-up): one line per phase, and a heartbeat line whenever a phase (say, transformers'
    tokenizer build, which gives no callback) has been silent for a few seconds."""

    INTERVAL_S = 3.0

    def __init__(self, gguf_path: Path):
        self.name = gguf_path.name
        self.t0 = self.last = time.monotonic()
        self.phase = ""
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.heartbeat = threading.Thread(target=self._beat, name="gguf-progress", daemon=True)

    def __enter__(self) -> "_Progress":
        self.heartbeat.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.heartbeat.join()

    def say(self, msg: str, phase: str | None = None) -> None:
        with self.lock:
            self.last = time.monotonic()
            if phase is not None:
                self.phase = phase
            print(f"[kiln] {self.name}: {msg} ({self.last - self.t0:.0f} s)", file=sys.stderr, flush=True)

    def _beat(self) -> None:
        while not self.done.wait(0.5):
            if time.monotonic() - self.last >= self.INTERVAL_S and self.phase:
                self.say(f"still {self.phase}")


def _install(tmp: Path, out: Path, explicit: bool) -> None:
    """Atomically move the finished ``tmp`` folder to ``out``."""
    if out.exists() and not is_complete(out):
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif explicit:
            raise FileExistsError(f"{out} exists and is not a complete GGUF conversion; remove it or pick another out_dir")
        else:  # stale cache entry (not written by us, since we always rename whole folders): replace it
            shutil.rmtree(out, ignore_errors=True)
    try:
        os.rename(tmp, out)
    except OSError:
        # Another process finished the same conversion first: keep theirs.
        if not is_complete(out):
            raise


class _Meta:
    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        return value


def _convert(gguf_path: Path, dst: Path, progress: _Progress) -> None:
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # noqa: BLE001 - report any parse failure the same way
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {e}") from e
    meta = _Meta(reader)
    arch = meta.get("general.architecture")
    if arch not in _ARCH_CONFIG:
        raise ValueError(
            f"Unsupported GGUF architecture {arch!r} in {gguf_path.name}; supported: {sorted(_ARCH_CONFIG)}"
        )
    if meta.get(f"{arch}.expert_count") and arch not in _EXPERT_TENSORS:
        raise ValueError(f"{gguf_path.name}: mixture-of-experts GGUF models of architecture {arch!r} are not "
                         f"supported (Qwen2-MoE, Qwen3-MoE and Mixtral are)")

    tensors = {t.name: t for t in reader.tensors}
    config = _build_config(meta, arch, tensors, gguf_path)
    files = _write_weights(tensors, config, arch, dst, gguf_path, progress)
    progress.say("building the tokenizer from the GGUF metadata", "building the tokenizer")
    files += _write_tokenizer(gguf_path, meta, config, dst)

    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos_ids = _eos_ids(meta)
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0]}
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        gen["pad_token_id"] = meta.get("tokenizer.ggml.padding_token_id")
    gen = {k: v for k, v in gen.items() if v is not None}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    files += ["config.json", "generation_config.json"]

    st = gguf_path.stat()
    marker = {
        "converter_version": CONVERTER_VERSION,
        "source": str(gguf_path.resolve()),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "files": sorted(files),
    }
    (dst / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _eos_ids(meta: _Meta) -> list[int]:
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    if not ids:
        raise ValueError("GGUF file has no tokenizer.ggml.eos_token_id")
    return ids


def _build_config(meta: _Meta, arch: str, tensors: dict, gguf_path: Path) -> dict:
    def req(key):
        v = meta.get(f"{arch}.{key}")
        if v is None:
            raise ValueError(f"{gguf_path.name}: missing GGUF metadata {arch}.{key}")
        return v

    hidden = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv = meta.get(f"{arch}.attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise ValueError(f"{gguf_path.name}: per-layer KV head counts are not supported")
    n_kv = int(n_kv)
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_heads))
    rope_dim = meta.get(f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"{gguf_path.name}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{gguf_path.name}: no token_embd.weight tensor")
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    tied = "output.weight" not in tensors
    hf_arch, model_type, _ = _ARCH_CONFIG[arch]
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    max_pos = int(meta.get(f"{arch}.context_length", 2048))

    experts = int(meta.get(f"{arch}.expert_count") or 0)
    if experts and arch == "llama":
        hf_arch, model_type = "MixtralForCausalLM", "mixtral"
    ffn = meta.get(f"{arch}.feed_forward_length") if experts else req("feed_forward_length")
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(ffn or req("expert_feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "vocab_size": int(vocab),
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
        config["pretraining_tp"] = 1
    elif arch in ("qwen2", "qwen2moe"):
        config["use_sliding_window"] = False
    elif arch in ("qwen3", "qwen3moe"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["use_sliding_window"] = False
    if experts:  # llama.cpp renormalizes the top-k weights of Mixtral and Qwen3-MoE, not Qwen2-MoE's
        config["num_experts_per_tok"] = int(req("expert_used_count"))
        if arch == "llama":
            config.update(num_local_experts=experts, sliding_window=None)
        else:
            dense = [i for i in range(config["num_hidden_layers"]) if f"blk.{i}.ffn_gate_exps.weight" not in tensors]
            config.update(num_experts=experts, moe_intermediate_size=int(req("expert_feed_forward_length")),
                          norm_topk_prob=arch == "qwen3moe", decoder_sparse_step=1, mlp_only_layers=dense)
        if arch == "qwen2moe":
            config["shared_expert_intermediate_size"] = int(req("expert_shared_feed_forward_length"))

    rope_scaling = _rope_scaling(meta, arch, tensors, head_dim, rope_theta, max_pos, gguf_path)
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
        rope_parameters.update(rope_scaling)
    config["rope_parameters"] = rope_parameters
    return {k: v for k, v in config.items() if v is not None}


def _rope_scaling(meta, arch, tensors, head_dim, theta, max_pos, gguf_path) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in tensors:  # llama 3.x: per-frequency divisors, derived from HF's "llama3" rope
        import gguf

        t = tensors["rope_freqs.weight"]
        freqs = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        for params in _llama3_candidates(float(freqs.max()), meta, arch):
            if np.allclose(_llama3_divisors(head_dim, theta, **params), freqs, rtol=1e-4, atol=1e-4):
                return {"rope_type": "llama3", **params}
        raise ValueError(f"{gguf_path.name}: rope_freqs tensor does not match any known llama3 rope scaling")
    if kind in (None, "none"):
        return None
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        orig = meta.get(f"{arch}.rope.scaling.original_context_length", max_pos)
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": int(orig)}
    raise ValueError(f"{gguf_path.name}: unsupported rope scaling type {kind!r}")


def _llama3_candidates(factor: float, meta, arch):
    origs = [8192]
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if orig:
        origs.insert(0, int(orig))
    for o in origs:
        yield {"factor": round(factor, 4), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": o}


def _llama3_divisors(head_dim, theta, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    # As llama.cpp's convert_hf_to_gguf.py LlamaModel.generate_extra_tensors.
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wl = original_max_position_embeddings / low_freq_factor
    high_wl = original_max_position_embeddings / high_freq_factor
    out = []
    for f in inv_freq:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wl - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def _hf_name(gguf_name: str, arch: str = "", experts: int = 0) -> str | list[str] | None:
    """The HF name of a GGUF tensor; for a stacked experts tensor, the names of its experts in order."""
    parts = gguf_name.split(".", 2)
    if experts and len(parts) == 3 and parts[0] == "blk" and parts[2] in _EXPERT_TENSORS[arch]:
        name = f"model.layers.{parts[1]}.{_EXPERT_TENSORS[arch][parts[2]]}"
        return [name.format(e) for e in range(experts)] if "{}" in name else name
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    if gguf_name == "rope_freqs.weight":
        return None  # folded into config.rope_scaling
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}"
    raise ValueError(f"Unsupported GGUF tensor {gguf_name!r}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute(w, n_head, n_head_kv)`` on the rows of q/k (weights or biases)."""
    # llama.cpp: w.reshape(n_head, 2, half, *rest).swapaxes(1, 2) -- HF's [2, half] rows per head become
    # interleaved [half, 2]. The inverse reads [half, 2] and swaps back to [2, half].
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t) -> np.ndarray:
    import gguf

    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"Unsupported GGUF quantization type {t.tensor_type.name} (tensor {t.name})") from e
    # GGUF lists dims fastest first; numpy/HF order is the reverse.
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    # float16 stays float16 (exact, half float32's disk and reading time); every other type is exact in float32
    return np.ascontiguousarray(arr.reshape(shape), dtype=np.float16 if _is_f16(t) else np.float32)


def _is_f16(t) -> bool:
    import gguf

    return t.tensor_type == gguf.GGMLQuantizationType.F16


def _write_weights(tensors: dict, config: dict, arch: str, dst: Path, gguf_path: Path, progress: _Progress) -> list[str]:
    from safetensors.numpy import save_file

    permute = _ARCH_CONFIG[arch][2]
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    plan = []  # (hf_name, or the names of a stacked tensor's experts, gguf tensor)
    for name, t in tensors.items():
        hf = _hf_name(name, arch, experts)
        if hf is not None:
            plan.append((hf, t))
    plan.sort(key=lambda x: _sort_key(x[0] if isinstance(x[0], str) else x[0][0]))

    # Validate quant types up front (before spending time on dequantization).
    import gguf

    supported = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16} | set(gguf.quants._type_traits)
    for _, t in plan:
        if t.tensor_type not in supported:
            raise ValueError(
                f"{gguf_path.name}: unsupported GGUF quantization type {t.tensor_type.name} (tensor {t.name})"
            )

    shards: list[list] = [[]]
    size = 0
    for hf, t in plan:
        nbytes = int(np.prod(t.shape.tolist())) * (2 if _is_f16(t) else 4)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((hf, t))
        size += nbytes

    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    total = 0
    done = 0
    progress.say(f"dequantizing {len(plan)} tensors (float16 ones stay float16, the rest to float32)", "dequantizing")
    for fname, shard in zip(names, shards):
        out = {}
        for hf, t in shard:
            progress.phase = f"dequantizing ({done}/{len(plan)} tensors)"
            done += 1
            w = _dequantize(t)
            if isinstance(hf, list):  # [experts, out, in]: one tensor each
                if w.shape[0] != len(hf):
                    raise ValueError(f"{gguf_path.name}: {t.name} holds {w.shape[0]} experts, the metadata says "
                                     f"{len(hf)}")
                for e, name in enumerate(hf):
                    out[name] = np.ascontiguousarray(w[e])
                    weight_map[name] = fname
                total += w.nbytes
                continue
            if permute and (".q_proj." in hf or ".k_proj." in hf):
                w = _unpermute(w, n_heads if ".q_proj." in hf else n_kv)
            if hf.endswith(".shared_expert_gate.weight"):
                w = w.reshape(1, -1)  # llama.cpp keeps the shared expert's gate as a vector
            out[hf] = w
            weight_map[hf] = fname
            total += w.nbytes
        progress.say(f"writing {fname}", f"writing {fname}")
        save_file(out, str(dst / fname), metadata={"format": "pt"})
        _fix_mode(dst / fname)
        del out
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        names.append("model.safetensors.index.json")
    return names


def _fix_mode(path: Path) -> None:
    """safetensors writes 0600 files; give them the usual umask-based mode like every other file we write."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _sort_key(hf_name: str):
    parts = hf_name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return (1, int(parts[2]), hf_name)
    return (0 if "embed" in hf_name else 2, 0, hf_name)


def _write_tokenizer(gguf_path: Path, meta: _Meta, config: dict, dst: Path) -> list[str]:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{gguf_path.name}: cannot build a tokenizer from the GGUF metadata: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)

    pre = meta.get("tokenizer.ggml.pre")
    if pre in _DIGIT_SPLIT_PRE:
        from tokenizers import pre_tokenizers

        backend = tok.backend_tokenizer
        current = backend.pre_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), current])

    tok.model_max_length = config["max_position_embeddings"]
    tok.save_pretrained(str(dst))

    tokens = meta.get("tokenizer.ggml.tokens")

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    specials = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    specials = {k: v for k, v in specials.items() if v is not None}

    cfg_path = dst / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    for k in ("is_local", "local_files_only", "name_or_path", "_commit_hash"):
        tcfg.pop(k, None)
    tcfg.update(specials)
    tcfg["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    tcfg["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tcfg["model_max_length"] = config["max_position_embeddings"]
    template = meta.get("tokenizer.chat_template")
    jinja = dst / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()  # keep one source of truth: tokenizer_config.json
    if template:
        tcfg["chat_template"] = template
    else:
        tcfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")

    files = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    for extra in sorted(p.name for p in dst.iterdir() if p.is_file()):
        if extra not in files and extra.startswith(("vocab", "merges", "added_tokens")):
            files.append(extra)
    return files


__all__ = ["gguf_to_hf_dir", "default_out_dir", "default_cache_root", "is_complete", "CONVERTER_VERSION"]
