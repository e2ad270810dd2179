"""Every serving setting in one table: the seed's environment variable, its default, the `kiln serve` flag,
the help text and the validation rule.

Precedence: built-in default < environment variable (Gen-A name, or its Gen-B alias) < command-line flag.
`KilnConfig.load(env, argv_namespace)` builds a validated config; `to_engine_config()` maps it onto the
engine core's EngineConfig. A KilnConfig is a plain dataclass: it pickles, so it is handed as is to every
process the supervisor starts (HTTP workers, gRPC server, metrics server).

Adding a setting = one `setting(...)` line below; `kiln serve --help`, the env lookup, validation and
docs/configuration.md's table (`python -m kiln.config --markdown`) all follow from it.
"""
from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import socket
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from kiln.engine.config import EngineConfig


# What one HTTP worker streams per second of its CPU (benchmarks/frontend_bench.py, docs/benchmarks.md: 25,000 to
# 36,000 events per CPU-second on a shared 2-core CPU; taken lower, as prompts must be tokenized too and a GPU
# host's core may be slower or busier) and how often a GPU emits a token per running stream (~8 ms a decode step
# at batch 256): PUSH_MODE_HTTP_WORKERS' effective default on a GPU.
HTTP_WORKER_EVENTS_PER_S = 20_000
GPU_TOKEN_INTERVAL_S = 0.008


class ConfigError(ValueError):
    """A setting is wrong; the message is one line that says what to fix."""


# ----------------------------------------------------------------------------------------------------
# value parsers and checks
# ----------------------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def _parse(kind: str, raw: Any) -> Any:
    """Convert an env string (or a flag value) to the setting's type; ValueError with a short reason."""
    if raw is None:
        return None
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ValueError("expected a boolean (1/0, true/false)")
    if kind in ("int", "port"):
        if isinstance(raw, bool):
            raise ValueError("expected an integer")
        if isinstance(raw, int):
            return raw
        s = str(raw).strip()
        try:
            return int(s)
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                raise ValueError("expected an integer") from None
            if f.is_integer():
                return int(f)
            raise ValueError("expected an integer") from None
    if kind == "float":
        try:
            return float(str(raw).strip())
        except ValueError:
            raise ValueError("expected a number") from None
    if kind == "optfloat":  # empty -> None
        s = str(raw).strip()
        if s == "" or s.lower() in ("none", "auto"):
            return None
        try:
            return float(s)
        except ValueError:
            raise ValueError("expected a number") from None
    if kind == "optbool":  # empty / auto -> None (the default decides)
        s = str(raw).strip().lower()
        if s in ("", "none", "auto"):
            return None
        return _parse("bool", raw)
    if kind == "optint":
        s = str(raw).strip()
        if s == "" or s.lower() in ("none", "auto", "0"):
            return None
        return _parse("int", s)
    if kind == "optstr":
        s = str(raw).strip()
        return s or None
    return str(raw)


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, allow: tuple = ()):
    def check(v):
        if v is None or v in allow:
            return None
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        return None
    return check


def _port(optional: bool):
    def check(v):
        if optional and v is not None and v <= 0:
            return None  # -1 (or 0): switched off
        if v is None or not (1 <= v <= 65535):
            return "must be a TCP port in 1..65535" + (" (or -1 to switch it off)" if optional else "")
        return None
    return check


def _lora_modules(v):
    from kiln.layers.lora import parse_lora_modules
    try:
        parse_lora_modules(v)
    except ValueError as e:
        return str(e)
    return None


def _speculative(v):
    from kiln.engine.speculative import SpeculativeConfig
    try:
        SpeculativeConfig.parse(v)
    except ValueError as e:
        return str(e)
    return None


def _choice(*choices: str):
    def check(v):
        if v not in choices:
            return f"must be one of {', '.join(choices)}"
        return None
    return check


# ----------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------

def setting(default: Any, env: str, help: str, *, kind: str, flags: tuple[str, ...] = (),
            aliases: tuple[str, ...] = (), check: Callable[[Any], str | None] | None = None,
            group: str = "service", seed_default: str | None = None, secret: bool = False) -> Any:
    """One row of the table, stored in the dataclass field's metadata (secret: never logged)."""
    return field(default=default, metadata=dict(env=env, help=help, kind=kind, flags=flags, aliases=aliases,
                                                check=check, group=group, seed_default=seed_default,
                                                secret=secret))


def derived(default: Any = None) -> Any:
    """A value Kiln works out at start-up (not a setting)."""
    return field(default=default, metadata=dict(derived=True))


@dataclass
class KilnConfig:
    # --- model ---------------------------------------------------------------------------------------
    model_dir: str | None = setting(
        None, "MODEL_DIR", "Model: a Hugging Face directory (config.json + safetensors + tokenizer) or a .gguf file. "
        "Unset: the bundled default model (SmolLM2-135M-Instruct).", kind="optstr", flags=("--model-dir", "--model"),
        group="model", seed_default="/models/")
    model_config_path: str | None = setting(
        None, "FD_MODEL_CONFIG_PATH", "Model config file (default ${MODEL_DIR}/config.json); its "
        "max_position_embeddings caps the sequence length.", kind="optstr", flags=("--model-config-path",),
        group="model", seed_default="${MODEL_DIR}/config.json")
    distributed_config: str | None = setting(
        None, "DISTRIBUTED_CONFIG", "The seed's rank_mapping.csv. Accepted and ignored: Kiln shards a Hugging "
        "Face checkpoint across MP_NUM ranks at load time.", kind="optstr", flags=("--distributed-config",),
        group="model", seed_default="${MODEL_DIR}/rank_mapping.csv")
    served_model_name: str | None = setting(
        None, "KILN_SERVED_MODEL_NAME", "Model name shown by /v1/models and in OpenAI responses (default: the "
        "model directory's name). Requests may name any model.", kind="optstr", flags=("--served-model-name",),
        group="model")
    dtype: str = setting(
        "auto", "DTYPE", "Compute and KV-cache dtype: auto (bfloat16 on GPU and on CPUs with native bf16, where Q4 "
        "GGUF weights stay int4; else float32), bfloat16, float16, float32.", kind="str", flags=("--dtype",),
        check=_choice("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32", "half", "float"),
        group="model", seed_default="bfloat16")
    quantization: str | None = setting(
        None, "KILN_QUANTIZATION", "Quantize a float checkpoint while loading: none, w8a16 (weight-only int8), "
        "w8a8-int8 or w8a8-fp8 (per-channel weights, per-token activations). A quantized (compressed-tensors) "
        "checkpoint needs no setting. Mixture-of-experts models (Qwen2-MoE, Qwen3-MoE, Mixtral) take w8a16 only "
        "(their experts too), at load or from a w8a16 checkpoint.", kind="optstr", flags=("--quantization",),
        check=lambda v: None if v in (None, "none", "w8a16", "w8a8-int8", "w8a8-fp8")
        else "must be none, w8a16, w8a8-int8 or w8a8-fp8",
        group="model")
    lora_modules: str | None = setting(
        None, "KILN_LORA_MODULES", "LoRA adapters (PEFT's adapter_config.json + adapter_model.safetensors) served "
        "beside the base model: name=path,name2=path2 (or a JSON object). A request picks one by its name as the "
        "OpenAI `model`; /v1/models lists them. Not with w8a8 quantization.", kind="optstr",
        flags=("--lora-modules",), check=_lora_modules, group="model")
    allow_runtime_lora_updating: bool = setting(
        False, "KILN_ALLOW_RUNTIME_LORA_UPDATING", "Let clients load and unload LoRA adapters while the server runs "
        "(POST /v1/load_lora_adapter {lora_name, lora_path}, /v1/unload_lora_adapter {lora_name}, as vLLM's "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING): a path on the server's disk is read, so only where the API's clients "
        "are trusted (KILN_API_KEY).", kind="bool", flags=("--allow-runtime-lora-updating",), group="model")
    quantize_lm_head: bool = setting(
        False, "KILN_QUANTIZE_LM_HEAD", "Hold the LM head in weight-only int8 (per-row scales) too: at batch 1 an "
        "8B model's step reads ~0.5 GB less. Off: the head stays in the model's dtype, as vLLM keeps it.",
        kind="bool", flags=("--quantize-lm-head",), group="model")
    load_format: str = setting(
        "auto", "KILN_LOAD_FORMAT", "auto: read the weights; dummy: random weights of config.json's shape (benchmarks "
        "without a checkpoint; the directory still needs the tokenizer files).", kind="str",
        flags=("--load-format",), check=lambda v: None if v in ("auto", "dummy") else "must be auto or dummy",
        group="model")
    mp_num: int = setting(
        1, "MP_NUM", "Tensor-parallel degree (GPUs per model); CUDA_VISIBLE_DEVICES must list at least this many.",
        kind="int", flags=("--mp-num", "--tensor-parallel-size"), check=_range(1, 64), group="model",
        seed_default="8 (start script: 1)")
    enable_expert_parallel: bool = setting(
        False, "KILN_ENABLE_EXPERT_PARALLEL", "Mixture-of-experts models under MP_NUM > 1: each rank holds whole "
        "experts (E / MP_NUM of them) instead of a slice of every expert, as vLLM's --enable-expert-parallel: "
        "larger expert GEMMs where experts are small; the experts must divide by MP_NUM.", kind="bool",
        flags=("--enable-expert-parallel",), group="model")
    device: str = setting(
        "auto", "KILN_DEVICE", "auto (cuda when available), cuda or cpu.", kind="str", flags=("--device",),
        check=_choice("auto", "cuda", "cpu"), group="model")

    # --- ports and processes -------------------------------------------------------------------------
    host: str = setting(
        "0.0.0.0", "KILN_HOST", "Address the public ports (HTTP, gRPC, health, metrics) listen on.", kind="str",
        flags=("--host",))
    push_mode_http_port: int = setting(
        9965, "PUSH_MODE_HTTP_PORT", "Port of the HTTP API (native seed API + OpenAI API); -1 switches HTTP off.",
        kind="port", flags=("--push-mode-http-port", "--port"), aliases=("SERVICE_HTTP_PORT",), check=_port(True),
        seed_default="-1 (start script: 9965)")
    push_mode_http_workers: int | None = setting(
        None, "PUSH_MODE_HTTP_WORKERS", "HTTP worker processes (tokenize, detokenize, stream). Unset: 1 on CPU; "
        "on a GPU enough that the front end is never the bottleneck: BATCH_SIZE streams at one token per 8 ms, "
        "twice over, at 20,000 streamed events/s a worker (measured: benchmarks/frontend_bench.py), between 2 and "
        "8 and at most half the usable cores (BATCH_SIZE=256: 4; 50: 2). An explicit value always wins.",
        kind="optint", flags=("--push-mode-http-workers", "--workers"), check=_range(1, 64),
        seed_default="1 (start script: 4)")
    engine_threads: int | None = setting(
        None, "KILN_ENGINE_THREADS", "CPU threads of the engine process (torch/OpenMP); auto: the cores of its "
        "CPU affinity that other processes leave free (checked every second), one thread for one-token steps. "
        "HTTP workers, gRPC and metrics always use one thread each.",
        kind="optint", flags=("--engine-threads",), check=_range(1, 1024))
    http_port: int = setting(
        8110, "HTTP_PORT", "Health port: /v2/health/live and /v2/health/ready.", kind="port",
        flags=("--http-port", "--health-port"), aliases=("HEALTH_HTTP_PORT",), check=_port(False),
        seed_default="required (start script: 8110)")
    grpc_port: int = setting(
        8811, "GRPC_PORT", "KServe v2 (Triton) gRPC port, model `model`; -1 switches gRPC off.", kind="port",
        flags=("--grpc-port",), aliases=("SERVICE_GRPC_PORT",), check=_port(True),
        seed_default="required (start script: 8811)")
    metrics_port: int = setting(
        8722, "METRICS_PORT", "Prometheus /metrics port; -1 switches metrics off.", kind="port",
        flags=("--metrics-port",), aliases=("METRICS_HTTP_PORT",), check=_port(True),
        seed_default="required (start script: 8722)")
    infer_queue_port: int = setting(
        8813, "INFER_QUEUE_PORT", "Internal port of the engine core (ZMQ on 127.0.0.1).", kind="port",
        flags=("--infer-queue-port",), aliases=("INTER_PROC_PORT",), check=_port(False),
        seed_default="56666 (start script: 8813)")
    api_key: str | None = setting(
        None, "KILN_API_KEY", "API key(s), comma-separated: HTTP (OpenAI, native, KServe routes) and gRPC then "
        "need `Authorization: Bearer <key>` (or `X-API-Key: <key>`); health probes stay open. Prefer the env "
        "var: a flag is visible to local users. Unset: no key.", kind="optstr", flags=("--api-key",), secret=True)
    metrics_api_key: str | None = setting(
        None, "KILN_METRICS_API_KEY", "API key(s) for /metrics, comma-separated, or `same` for KILN_API_KEY's. "
        "Unset: /metrics is open.", kind="optstr", flags=("--metrics-api-key",), secret=True)
    engine_restart: bool = setting(
        False, "KILN_ENGINE_RESTART", "When the engine core process dies, start it again in place (requests in "
        "flight get an error; new ones are served once it is ready). Off: `kiln serve` exits non-zero within "
        "5 s, for a process manager to restart it.", kind="bool", flags=("--engine-restart",))

    # --- lengths and batching ------------------------------------------------------------------------
    max_seq_len: int = setting(
        8192, "MAX_SEQ_LEN", "Longest prompt in tokens; longer prompts are rejected.", kind="int",
        flags=("--max-seq-len",), check=_range(1), group="limits")
    max_dec_len: int = setting(
        1024, "MAX_DEC_LEN", "Largest max_dec_len / min_dec_len a request may ask for; the default max_dec_len is "
        "min(MAX_SEQ_LEN - prompt length, MAX_DEC_LEN).", kind="int", flags=("--max-dec-len",), check=_range(1),
        group="limits")
    batch_size: int = setting(
        50, "BATCH_SIZE", "Most sequences decoded at once (continuous batching). Up to 1024: an 8-bit KV cache holds "
        "twice the sequences of a 16-bit one, and the start-up line 'KV cache: ... fits N sequences' says how many "
        "fit; CUDA graphs cover every batch size.", kind="int",
        flags=("--batch-size", "--max-num-seqs"), check=_range(1, 1024), group="limits")
    max_cached_task_num: int = setting(
        128, "MAX_CACHED_TASK_NUM", "Most requests waiting for a batch slot; more are rejected (HTTP 429).",
        kind="int", flags=("--max-cached-task-num",), check=_range(1), group="limits")
    disable_streaming: bool = setting(
        False, "DISABLE_STREAMING", "Send each request's result in one final packet instead of token by token.",
        kind="bool", flags=("--disable-streaming",), group="limits")
    max_num_batched_tokens: int | None = setting(
        None, "KILN_MAX_NUM_BATCHED_TOKENS", "Tokens one engine step computes, decodes and prefill chunks together; "
        "unset: max(2048, BATCH_SIZE).", kind="optint", flags=("--max-num-batched-tokens",), check=_range(1),
        group="limits")
    max_prefill_tokens: int | None = setting(
        None, "KILN_MAX_PREFILL_TOKENS_PER_STEP", "Prefill tokens (prompts, prompt chunks) one step may carry within "
        "KILN_MAX_NUM_BATCHED_TOKENS, after every running decode has its token: lower it to bound the time per "
        "output token under mixed load, longer prompts are prefilled in chunks; unset: the whole step budget.",
        kind="optint", flags=("--max-prefill-tokens",), check=_range(1), group="limits")
    kv_reserve_ratio: float | None = setting(
        None, "KILN_KV_RESERVE_RATIO", "Admission keeps free this share (0-1) of the KV blocks the running requests "
        "may still take up to their max_tokens: 0 admits while blocks are free and preempts (recomputes) the "
        "newest request when they run out; 1 admits only what can run to max_tokens without a preemption (where "
        "requests end early it leaves the cache emptier); auto (unset): the share of max_tokens that finished "
        "requests used, starting at 1.", kind="optfloat",
        flags=("--kv-reserve-ratio",), check=_range(0, 1), group="limits")

    # --- KV cache --------------------------------------------------------------------------------------
    block_size: int = setting(
        64, "BLOCK_SIZE", "Tokens per KV-cache block.", kind="int", flags=("--block-size",),
        check=_range(1, 1024), group="cache")
    block_bs: float | None = setting(
        None, "BLOCK_BS", "Size the KV cache the seed's way: room for this many sequences of MAX_SEQ_LEN + "
        "MAX_DEC_LEN tokens. Unset: size it from GPU_MEMORY_UTILIZATION (GPU) or KILN_CPU_KV_CACHE_GIB (CPU).",
        kind="optfloat", flags=("--block-bs",), check=_range(0, lo_open=True), group="cache", seed_default="50")
    num_gpu_blocks: int | None = setting(
        None, "KILN_NUM_BLOCKS", "Exact number of KV-cache blocks (overrides BLOCK_BS and GPU_MEMORY_UTILIZATION).",
        kind="optint", flags=("--num-gpu-blocks", "--num-blocks"), check=_range(1), group="cache")
    gpu_memory_utilization: float = setting(
        0.9, "GPU_MEMORY_UTILIZATION", "Share of GPU memory for weights + activations + KV cache, when neither "
        "BLOCK_BS nor KILN_NUM_BLOCKS is set.", kind="float", flags=("--gpu-memory-utilization",),
        check=_range(0, 1, lo_open=True), group="cache")
    cpu_kv_cache_gib: float = setting(
        1.0, "KILN_CPU_KV_CACHE_GIB", "KV-cache size on CPU (GiB) when neither BLOCK_BS nor KILN_NUM_BLOCKS is set.",
        kind="float", flags=("--cpu-kv-cache-gib",), check=_range(0, lo_open=True), group="cache")
    block_ratio: float = setting(
        0.75, "BLOCK_RATIO", "The seed's prompt/decode block split. Accepted for compatibility; Kiln's scheduler "
        "shares one block pool and preempts when decode runs out.", kind="float", flags=("--block-ratio",),
        check=_range(0, 1, lo_open=True), group="cache")
    enc_dec_block_num: int = setting(
        2, "ENC_DEC_BLOCK_NUM", "The seed's decode blocks reserved at admission (passed to the engine).",
        kind="int", flags=("--enc-dec-block-num",), check=_range(0), group="cache")
    max_prefill_batch: int = setting(
        1, "MAX_PREFILL_BATCH", "The seed's new requests admitted per step. Accepted for compatibility; Kiln "
        "admits as many as the token budget allows.", kind="int", flags=("--max-prefill-batch",), check=_range(1),
        group="cache")
    use_cache_kv_int8: bool = setting(
        False, "USE_CACHE_KV_INT8", "Store the KV cache in int8.", kind="bool", flags=("--use-cache-kv-int8",),
        group="cache")
    kv_cache_dtype: str = setting(
        "auto", "KILN_KV_CACHE_DTYPE", "KV-cache storage: auto (the checkpoint's kv_cache_scheme, else the model "
        "dtype), int8, or fp8 (E4M3 with the checkpoint's static per-head scales, else 1.0; on a GPU needs compute "
        "capability 8.9+). USE_CACHE_KV_INT8=1 means int8.", kind="str", flags=("--kv-cache-dtype",),
        check=lambda v: None if v in ("auto", "int8", "fp8") else "must be auto, int8 or fp8", group="cache")
    enable_prefix_caching: bool = setting(
        True, "KILN_ENABLE_PREFIX_CACHING", "Reuse the KV blocks of identical prompt prefixes.", kind="bool",
        flags=("--enable-prefix-caching",), group="cache")

    async_scheduling: str = setting(
        "auto", "KILN_ASYNC_SCHEDULING", "Queue the next step on the GPU before the current one's tokens reach the "
        "host, hiding the host's work: auto (on with CUDA), on, off.", kind="str",
        flags=("--async-scheduling",), check=_choice("auto", "on", "off"), group="runtime")
    scheduling_policy: str = setting(
        "fcfs", "KILN_SCHEDULING_POLICY", "Which waiting request runs first: fcfs (arrival order), or priority (the "
        "OpenAI API's `priority` field, vLLM's: lower first, 0 by default, ties by arrival; a preemption takes the "
        "running request that comes last). Under fcfs a request with a priority other than 0 gets a 400.",
        kind="str", flags=("--scheduling-policy",), check=_choice("fcfs", "priority"), group="limits")
    speculative_config: str | None = setting(
        None, "KILN_SPECULATIVE_CONFIG", "Speculative decoding, vLLM's JSON: '{\"method\": \"ngram\", "
        "\"num_speculative_tokens\": 5}' drafts up to 5 tokens a step from the request's own earlier tokens "
        "(prompt_lookup_max 4 / prompt_lookup_min 2 tokens matched; disable_by_batch_size N: off while more than N "
        "requests run). The output is what it would be without (greedy: the same tokens); steps that may "
        "draft run synchronously. Unset: off.", kind="optstr", flags=("--speculative-config",), check=_speculative,
        group="runtime")

    # --- behaviour -------------------------------------------------------------------------------------
    use_warmup: bool | None = setting(
        None, "USE_WARMUP", "Before reporting ready, run every kind of step traffic can produce (prefill, chunked "
        "and mixed steps, each decode batch size, each sampler path, long contexts), so that no kernel compiles "
        "after ready. Unset: on with a GPU, off on CPU (nothing compiles there). 1 / 0 force it.",
        kind="optbool", flags=("--use-warmup",), group="runtime")
    use_hf_tokenizer: bool = setting(
        False, "USE_HF_TOKENIZER", "Accepted for compatibility; Kiln always uses the model's Hugging Face tokenizer.",
        kind="bool", flags=("--use-hf-tokenizer",), group="runtime")
    check_health_interval: float = setting(
        10.0, "CHECK_HEALTH_INTERVAL", "Seconds without an engine heartbeat after which /v2/health/ready reports "
        "the engine as hung.", kind="float", flags=("--check-health-interval",), check=_range(0, lo_open=True),
        group="runtime")
    shutdown_timeout: float = setting(
        300.0, "KILN_SHUTDOWN_TIMEOUT", "On SIGTERM/Ctrl-C, how long running requests may take to finish before "
        "they are cut.", kind="float", flags=("--shutdown-timeout",), check=_range(0), group="runtime")
    grammar_compile_timeout: float = setting(
        10.0, "KILN_GRAMMAR_COMPILE_TIMEOUT", "Seconds a structured-output request (response_format, "
        "structured_outputs) may wait for its grammar to compile; past that it fails alone with a 400, while "
        "other requests run on.", kind="float", flags=("--grammar-compile-timeout",), check=_range(0, lo_open=True),
        group="runtime")
    request_timeout: float = setting(
        300.0, "KILN_REQUEST_TIMEOUT", "Default whole-request timeout in seconds (the native `timeout` field "
        "overrides it per request).", kind="float", flags=("--request-timeout",), check=_range(0, lo_open=True),
        group="runtime")
    max_request_bytes: int = setting(
        16 * 1024 * 1024, "KILN_MAX_REQUEST_BYTES", "Largest request body (HTTP) or message (gRPC) in bytes; a "
        "larger one gets 413 (RESOURCE_EXHAUSTED on gRPC) before it is read whole.", kind="int",
        flags=("--max-request-bytes",), check=_range(1024), group="runtime")
    http_read_timeout: float = setting(
        30.0, "KILN_HTTP_READ_TIMEOUT", "Seconds a client may take to send a request's headers, and at most "
        "between two pieces of its body; a slower connection is closed (headers) or answered 408 (body).",
        kind="float", flags=("--http-read-timeout",), check=_range(0, lo_open=True), group="runtime")
    tool_call_parser: str = setting(
        "auto", "KILN_TOOL_CALL_PARSER", "How the OpenAI API reads tool calls in the model's output: auto (by model "
        "family and chat template), llama3_json, hermes (also Qwen2.5/Qwen3), none (left as text).", kind="str",
        flags=("--tool-call-parser",), check=_choice("auto", "llama3_json", "hermes", "none"), group="runtime")
    reasoning_parser: str = setting(
        "none", "KILN_REASONING_PARSER", "How the OpenAI chat API splits the model's reasoning (<think> ... </think>) "
        "from its answer into `reasoning_content`: qwen3 (the model opens the block), deepseek_r1 (the template "
        "opens it in the prompt), none (left in the content).", kind="str", flags=("--reasoning-parser",),
        check=_choice("none", "qwen3", "deepseek_r1"), group="runtime")
    seed: int = setting(
        0, "KILN_SEED", "Engine random seed (requests without `seed`).", kind="int", flags=("--seed",),
        group="runtime")
    fd_log_dir: str = setting(
        "log", "FD_LOG_DIR", "Log directory: server.log (every process), requests.log (one line per request).",
        kind="str", flags=("--log-dir", "--fd-log-dir"), group="runtime")
    fd_debug: bool = setting(
        False, "FD_DEBUG", "Debug logging (also HTTP access logs).", kind="bool", flags=("--debug", "--fd-debug"),
        group="runtime")

    # --- worked out at start-up (KilnConfig.resolve) ---------------------------------------------------
    model_path: str | None = derived()      # the resolved Hugging Face model directory
    engine_secret: str | None = derived()   # per start, set by the supervisor: admits front ends to the engine

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def settings(cls) -> list:
        return [f for f in fields(cls) if "env" in f.metadata]

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, args: argparse.Namespace | None = None) -> "KilnConfig":
        """Defaults < env (Gen-A name, then Gen-B alias) < flags; validated. Raises ConfigError."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in cls.settings():
            m = f.metadata
            raw, source = None, None
            names = (m["env"],) + tuple(m["aliases"])
            given = [(n, env[n]) for n in names if n in env and str(env[n]).strip() != ""]
            if given:
                source, raw = given[0]
                for other, oraw in given[1:]:
                    try:
                        same = _parse(m["kind"], oraw) == _parse(m["kind"], raw)
                    except ValueError:
                        same = False
                    if not same:
                        raise ConfigError(f"{source}={raw!r} and {other}={oraw!r} disagree; set only one of them")
            flag_val = getattr(args, f.name, None) if args is not None else None
            if flag_val is not None:
                raw, source = flag_val, m["flags"][0] if m["flags"] else f.name
            if source is None:
                continue
            try:
                values[f.name] = _parse(m["kind"], raw)
            except ValueError as e:
                raise ConfigError(f"{_describe(source, m)}={raw!r}: {e}") from None
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for f in self.settings():
            m = f.metadata
            check = m["check"]
            if check is not None:
                problem = check(getattr(self, f.name))
                if problem:
                    raise ConfigError(f"{_describe(m['env'], m)}={getattr(self, f.name)!r}: {problem}")
        ports = {"PUSH_MODE_HTTP_PORT": self.push_mode_http_port, "HTTP_PORT": self.http_port,
                 "GRPC_PORT": self.grpc_port, "METRICS_PORT": self.metrics_port,
                 "INFER_QUEUE_PORT": self.infer_queue_port}
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port is None or port <= 0:
                continue
            if port in seen:
                raise ConfigError(f"{seen[port]} and {name} are both {port}; give each service its own port")
            seen[port] = name
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        if self.mp_num > 1 and cvd:
            n = len([d for d in cvd.split(",") if d.strip()])
            if n < self.mp_num:
                raise ConfigError(f"MP_NUM={self.mp_num} but CUDA_VISIBLE_DEVICES={cvd!r} lists only {n} GPU(s)")

    # ------------------------------------------------------------------------------------------------
    @property
    def engine_address(self) -> str:
        return f"tcp://127.0.0.1:{self.infer_queue_port}"

    def http_workers(self, on_gpu: bool) -> int:
        """PUSH_MODE_HTTP_WORKERS, or its effective default (see its help): one worker carries about
        HTTP_WORKER_EVENTS_PER_S streamed events a second, a GPU emits BATCH_SIZE / GPU_TOKEN_INTERVAL_S."""
        if self.push_mode_http_workers is not None:
            return self.push_mode_http_workers
        if not on_gpu:
            return 1
        need = -(-2 * self.batch_size // int(GPU_TOKEN_INTERVAL_S * HTTP_WORKER_EVENTS_PER_S))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        return max(1, min(max(2, need), 8, cores // 2))

    @property
    def http_enabled(self) -> bool:
        return self.push_mode_http_port > 0

    @property
    def grpc_enabled(self) -> bool:
        return self.grpc_port > 0

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_port > 0

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        src = self.model_dir or "SmolLM2-135M-Instruct"
        name = Path(src.rstrip("/")).name
        if name.lower().endswith(".gguf"):
            name = name[:-5]
        return name or "default"

    @property
    def log_dir(self) -> Path:
        return Path(self.fd_log_dir)

    def resolve(self) -> "KilnConfig":
        """Find the model (converting the bundled/GGUF one once) and check its config.json (the length limit is
        the engine's to work out: EngineStats.max_model_len). Raises ConfigError with one line when the model is
        missing or unusable."""
        from kiln.models.default_model import resolve_model_path

        if self.model_dir is not None and not Path(self.model_dir).expanduser().exists():
            raise ConfigError(f"MODEL_DIR={self.model_dir!r}: no such file or directory; point MODEL_DIR (or "
                              f"--model-dir) at a Hugging Face model directory or a .gguf file, or unset it for "
                              f"the bundled default model")
        try:
            path = resolve_model_path(self.model_dir)
        except (ValueError, OSError) as e:
            raise ConfigError(f"MODEL_DIR={self.model_dir!r}: {e}") from None
        self.model_path = str(path)
        cfg_path = Path(self.model_config_path) if self.model_config_path else path / "config.json"
        try:
            mc = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"FD_MODEL_CONFIG_PATH={str(cfg_path)!r}: no such file") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"FD_MODEL_CONFIG_PATH={str(cfg_path)!r}: cannot read it ({e})") from None
        if not isinstance(mc, dict):
            raise ConfigError(f"FD_MODEL_CONFIG_PATH={str(cfg_path)!r}: not a JSON object")
        return self

    def to_engine_config(self) -> EngineConfig:
        dtype = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32"}.get(self.dtype, self.dtype)
        return EngineConfig(
            model=self.model_path or self.model_dir,
            dtype=dtype,
            load_format=self.load_format,
            device=self.device,
            seed=self.seed,
            # the engine caps it by the model's own length and publishes the result (EngineStats.max_model_len)
            max_model_len=self.max_seq_len + self.max_dec_len,
            max_num_seqs=self.batch_size,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_prefill_tokens=self.max_prefill_tokens,
            kv_reserve_ratio=self.kv_reserve_ratio,
            max_waiting=self.max_cached_task_num,
            scheduling_policy=self.scheduling_policy,
            block_size=self.block_size,
            num_gpu_blocks=self.num_gpu_blocks,
            block_bs=self.block_bs,
            gpu_memory_utilization=self.gpu_memory_utilization,
            cpu_kv_cache_gib=self.cpu_kv_cache_gib,
            kv_cache_dtype="int8" if self.use_cache_kv_int8 else self.kv_cache_dtype,
            quantization=None if self.quantization in (None, "none") else self.quantization,
            quantize_lm_head=self.quantize_lm_head,
            tensor_parallel_size=self.mp_num,
            enable_expert_parallel=self.enable_expert_parallel,
            enable_prefix_caching=self.enable_prefix_caching,
            warmup=self.use_warmup,
            grammar_compile_timeout=self.grammar_compile_timeout,
            async_scheduling={"auto": None, "on": True, "off": False}[self.async_scheduling],
            speculative_config=self.speculative_config,
            lora_modules=self.lora_modules,
            extra={"max_seq_len": self.max_seq_len, "max_dec_len": self.max_dec_len,
                   "block_ratio": self.block_ratio, "enc_dec_block_num": self.enc_dec_block_num,
                   "max_prefill_batch": self.max_prefill_batch},
        )

    # ------------------------------------------------------------------------------------------------
    def ports_in_use(self) -> list[tuple[str, int, str]]:
        """(setting, port, host) of every port the service will listen on."""
        out = []
        if self.http_enabled:
            out.append(("PUSH_MODE_HTTP_PORT", self.push_mode_http_port, self.host))
        out.append(("HTTP_PORT", self.http_port, self.host))
        if self.grpc_enabled:
            out.append(("GRPC_PORT", self.grpc_port, self.host))
        if self.metrics_enabled:
            out.append(("METRICS_PORT", self.metrics_port, self.host))
        out.append(("INFER_QUEUE_PORT", self.infer_queue_port, "127.0.0.1"))
        return out

    def check_ports_free(self, skip: tuple[str, ...] = ()) -> None:
        """ConfigError naming the first busy port."""
        for name, port, host in self.ports_in_use():
            if name in skip:
                continue
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
            except OSError as e:
                raise ConfigError(port_busy_message(name, port, host, e)) from None
            finally:
                s.close()

    def summary(self) -> str:
        parts = []
        for f in self.settings():
            value = getattr(self, f.name)
            parts.append(f"{f.metadata['env']}={'***' if f.metadata['secret'] and value else value}")
        return " ".join(parts)


def port_busy_message(name: str, port: int, host: str, err: OSError) -> str:
    why = "already in use" if getattr(err, "errno", None) in (98, 48) else str(err.strerror or err)
    return f"{name}={port}: cannot listen on {host}:{port} ({why}); stop what uses it or choose another port"


def _describe(source: str, meta: Mapping[str, Any]) -> str:
    return source


# ----------------------------------------------------------------------------------------------------
# argparse
# ----------------------------------------------------------------------------------------------------

_GROUPS = {"model": "model", "service": "ports and processes", "limits": "lengths and batching",
           "cache": "KV cache", "runtime": "behaviour and logs"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (default None, so that an unset flag leaves the env value alone)."""
    groups = {k: parser.add_argument_group(v) for k, v in _GROUPS.items()}
    for f in KilnConfig.settings():
        m = f.metadata
        if not m["flags"]:
            continue
        names = [m["env"]] + list(m["aliases"])
        default = f.default
        shown = "unset" if default is None else (int(default) if m["kind"] == "bool" else default)
        text = f"{m['help']} [env {' / '.join(names)}; default {shown}]"
        g = groups[m["group"]]
        if m["kind"] in ("bool", "optbool"):
            g.add_argument(*m["flags"], dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                           help=text)
        else:
            metavar = {"int": "N", "port": "PORT", "float": "X", "optfloat": "X", "optint": "N"}.get(m["kind"], "VALUE")
            g.add_argument(*m["flags"], dest=f.name, default=None, metavar=metavar, help=text)


def markdown_table() -> str:
    """The settings table for docs/configuration.md."""
    rows = ["| env var | flag | default | seed default | meaning |", "|---|---|---|---|---|"]
    for f in KilnConfig.settings():
        m = f.metadata
        env = " / ".join(f"`{n}`" for n in (m["env"],) + tuple(m["aliases"]))
        flag = ", ".join(f"`{x}`" for x in m["flags"])
        d = f.default
        d = "unset" if d is None else (str(int(d)) if m["kind"] == "bool" else str(d))
        rows.append(f"| {env} | {flag} | {d} | {m['seed_default'] or ''} | {m['help']} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------------------

LOG_FORMAT = "%(asctime)s %(levelname)s [%(processName)s %(process)d] %(name)s: %(message)s"


def setup_logging(cfg: KilnConfig, process_name: str | None = None, *, console: bool = True,
                  file_name: str = "server.log") -> None:
    """Root logging of a Kiln process: console (stderr) + FD_LOG_DIR/<file_name>; per-request lines go to
    FD_LOG_DIR/requests.log through the `kiln.requests` logger."""
    import multiprocessing

    if process_name:
        multiprocessing.current_process().name = process_name
    level = logging.DEBUG if cfg.fd_debug else logging.INFO
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    fmt = logging.Formatter(LOG_FORMAT)
    if console:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)
    log_dir = cfg.log_dir
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_dir / file_name, encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)
        rl = logging.getLogger("kiln.requests")
        for h in list(rl.handlers):
            rl.removeHandler(h)
        rh = logging.FileHandler(log_dir / "requests.log", encoding="utf-8")
        rh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        rl.addHandler(rh)
        rl.propagate = cfg.fd_debug
        rl.setLevel(logging.INFO)
    except OSError as e:
        root.warning("cannot write logs under FD_LOG_DIR=%s: %s", log_dir, e)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("uvicorn.access").setLevel(logging.INFO if cfg.fd_debug else logging.WARNING)


if __name__ == "__main__":  # python -m kiln.config --markdown
    if "--markdown" in sys.argv:
        print(markdown_table())
