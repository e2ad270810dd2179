"""The few facts of a Hugging Face config.json that the Llama-family model needs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# architecture -> (qkv bias default, per-head q/k norm)
ARCHITECTURES = {
    "LlamaForCausalLM": (False, False),
    "MistralForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
    "Qwen2MoeForCausalLM": (True, False),
    "Qwen3MoeForCausalLM": (False, True),
    "MixtralForCausalLM": (False, False),
}

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "half": torch.float16,
          "float": torch.float32}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    torch_dtype: str | None
    eos_token_ids: list[int]
    # mixture of experts (Qwen2-MoE, Qwen3-MoE, Mixtral); num_experts 0: a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dense_layers: tuple[int, ...] = ()  # layers whose feed-forward is the dense MLP all the same
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a dense expert every token takes, behind a sigmoid gate
    # how the experts split over tensor-parallel ranks, a serving choice (not config.json's): whole experts per rank
    # (True: KILN_ENABLE_EXPERT_PARALLEL) or a slice of each expert's intermediate size (False)
    expert_parallel: bool = False
    sliding_window: int | None = None  # attention to the last N positions only (Mistral v0.1): see max_model_len

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in model directory {model_dir}")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, c: dict) -> "ModelConfig":
        archs = c.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or c.get('model_type')!r}; "
                             f"Kiln supports {', '.join(ARCHITECTURES)}")
        bias_default, qk_norm = ARCHITECTURES[arch]
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        rope_scaling = c.get("rope_scaling")
        rope_theta = c.get("rope_theta")
        rope_params = c.get("rope_parameters")  # transformers >= 5 folds theta and scaling in here
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        eos = c.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            architecture=arch,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta or 10000.0,
            rope_scaling=rope_scaling,
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=bool(c.get("attention_bias", c.get("qkv_bias", bias_default))),
            qk_norm=qk_norm,
            torch_dtype=c.get("torch_dtype") or c.get("dtype"),
            eos_token_ids=eos,
            sliding_window=_sliding_window(arch, c),
            **_moe_fields(arch, c),
        )


def _sliding_window(arch: str, c: dict) -> int | None:
    window = c.get("sliding_window")
    if arch.startswith("Qwen") and not c.get("use_sliding_window"):
        return None  # Qwen configs name a window that their layers do not use unless asked
    return int(window) if window else None


def _moe_fields(arch: str, c: dict) -> dict:
    fields = _moe_config(arch, c)
    if fields and not 0 < fields["num_experts_per_tok"] <= fields["num_experts"]:
        raise ValueError(f"config.json: num_experts_per_tok {fields['num_experts_per_tok']} must be 1 to the "
                         f"number of experts ({fields['num_experts']})")
    return fields


def _moe_config(arch: str, c: dict) -> dict:
    if arch == "MixtralForCausalLM":
        return dict(num_experts=c["num_local_experts"], num_experts_per_tok=c["num_experts_per_tok"],
                    moe_intermediate_size=c["intermediate_size"], norm_topk_prob=True)
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        experts = c.get("num_experts") or c.get("num_local_experts")
        step = c.get("decoder_sparse_step") or 1
        dense = set(c.get("mlp_only_layers") or []) | {i for i in range(c["num_hidden_layers"]) if (i + 1) % step}
        shared = (c.get("shared_expert_intermediate_size") or 0) if arch == "Qwen2MoeForCausalLM" else 0
        return dict(num_experts=experts, num_experts_per_tok=c["num_experts_per_tok"],
                    moe_intermediate_size=c["moe_intermediate_size"],
                    norm_topk_prob=bool(c.get("norm_topk_prob", False)), dense_layers=tuple(sorted(dense)),
                    shared_expert_intermediate_size=shared)
    return {}


def cpu_has_native_bf16() -> bool:
    """bf16 dot products in hardware (AVX512-BF16 or AMX): there bf16 (and int4/int8 weights with bf16
    activations) beat float32 on CPU; elsewhere bf16 is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_dtype(name: str, device: torch.device, config: ModelConfig | None = None) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_native_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, bfloat16, float16 or float32")
    return DTYPES[name]
