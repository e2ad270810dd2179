"""Settings of the engine core (the serving settings, env vars and flags live in kiln/config.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EngineConfig:
    model: str | None = None              # HF model dir or a .gguf file; None: the bundled default model
    dtype: str = "auto"                   # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32
    device: str = "auto"                  # auto | cuda | cpu
    load_format: str = "auto"             # auto | dummy (random weights of the config, no checkpoint read)
    seed: int = 0
    max_model_len: int | None = None      # prompt + output tokens per sequence; None: the model's limit
    max_num_seqs: int = 50                # BATCH_SIZE: concurrent sequences
    max_num_batched_tokens: int | None = None  # tokens per step, decodes + prefills; None: derived
    max_prefill_tokens: int | None = None  # prefill tokens per step within it; None: no separate bound
    kv_reserve_ratio: float | None = None  # admission keeps this share of running requests' future blocks free;
    #                                        None: the share finished requests used of their max_tokens
    scheduling_policy: str = "fcfs"       # fcfs | priority (SamplingParams.priority: lower first)
    max_waiting: int = 128                # MAX_CACHED_TASK_NUM: waiting-queue cap
    block_size: int = 64                  # BLOCK_SIZE
    num_gpu_blocks: int | None = None     # explicit KV block count (overrides the two below)
    block_bs: float | None = None         # BLOCK_BS: cache for this many max-length sequences (seed formula)
    gpu_memory_utilization: float = 0.9   # used when neither of the above is set (on GPU)
    cpu_kv_cache_gib: float = 1.0         # KV cache budget on CPU when nothing else is set
    kv_cache_dtype: str = "auto"          # auto (= model dtype) | int8 (USE_CACHE_KV_INT8)
    quantization: str | None = None       # None | "w8a16" (weight-only int8) | "w8a8-int8" | "w8a8-fp8"
    quantize_lm_head: bool = False        # the LM head in weight-only int8 too
    tensor_parallel_size: int = 1         # MP_NUM
    enable_expert_parallel: bool = False  # MoE under TP: whole experts per rank (kiln/layers/moe.py)
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"       # auto | torch | triton
    use_cuda_graph: bool = True
    # queue step N+1 before step N's ids reach the host; None: on with CUDA
    async_scheduling: bool | None = None
    warmup: bool | None = False           # USE_WARMUP; None: on with CUDA (where kernels compile), off on CPU
    # LoRA adapters: "name=path,..." or {name: path} (kiln/layers/lora.py); None: none
    lora_modules: str | dict[str, str] | None = None
    # speculative decoding: vLLM's JSON or dict (kiln/engine/speculative.py); None: off
    speculative_config: str | dict[str, Any] | None = None
    grammar_compile_timeout: float = 10.0  # s a structured-output request may wait for its grammar to compile
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
