"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, and the mixtures of experts Qwen2-MoE, Qwen3-MoE and
Mixtral):
they differ by a few flags of ModelConfig.

The batch is flattened: input_ids/positions are [T] over all sequences of the step; attention metadata says
where each sequence's tokens start and how long its context is.
"""
from __future__ import annotations

import torch
from torch import nn

from kiln import distributed as tpd
from kiln.layers.attention import AttentionMetadata, LayerKVCache
from kiln.layers.linear import QKVParallelLinear, RowParallelLinear, VocabEmbedding
from kiln.layers.mlp import MLP
from kiln.layers.moe import SparseMoE
from kiln.layers.norm import RMSNorm
from kiln.layers.rope import RotaryEmbedding
from kiln.models.config import ModelConfig
from kiln.quantization.ops import QuantizedRows


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        tp = tpd.tp_size()
        if cfg.num_heads % tp or (cfg.num_kv_heads % tp and tp % cfg.num_kv_heads):
            raise ValueError(f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads cannot be split over {tp} ranks")
        self.num_heads = cfg.num_heads // tp
        self.num_kv_heads = max(1, cfg.num_kv_heads // tp)  # fewer KV heads than ranks: one replicated head
        self.head_dim = cfg.head_dim
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, d, bias=cfg.qkv_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rope = rope
        self.scale = d ** -0.5
        self.backend = None  # set by the runner

    def forward(self, positions, x, cache: LayerKVCache, meta: AttentionMetadata):
        """x: the normed hidden states [t, hidden], or already quantized for qkv_proj (its input_quant)."""
        t = x.rows if isinstance(x, QuantizedRows) else x.shape[0]
        qkv = self.qkv_proj(x)
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q = qkv[:, :nq].view(t, self.num_heads, self.head_dim)
        k = qkv[:, nq:nq + nkv].view(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, nq + nkv:].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = None
        if qkv.is_cuda:  # the backend rotates q and k (the Triton one as it writes the cache)
            rope = (self.rope, positions)
        elif self.q_norm is not None:
            q, k = self.rope(positions, q, k)
        else:  # CPU: q and k side by side in qkv, rotated in one pass (half the small ops of the step's rope)
            qk = self.rope.rotate(positions, qkv[:, :nq + nkv].view(t, self.num_heads + self.num_kv_heads, -1))
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        # views of qkv: the cache write takes strides
        o = self.backend.forward(q, k, v, cache, meta, self.scale, rope=rope)
        return self.o_proj(o.reshape(t, nq))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, index: int):
        super().__init__()
        self.self_attn = Attention(cfg, rope)
        self.mlp = (SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                              cfg.norm_topk_prob, cfg.shared_expert_intermediate_size, cfg.expert_parallel)
                    if cfg.is_moe_layer(index)
                    else MLP(cfg.hidden_size, cfg.intermediate_size))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, cache, meta):
        # W8A8 on CUDA: each norm writes its projection's 8-bit input (one kernel instead of norm + quantize)
        if residual is None:
            residual = x
            x = self.input_layernorm(x, out_quant=self.self_attn.qkv_proj.input_quant(x))
        else:
            x, residual = self.input_layernorm(x, residual, out_quant=self.self_attn.qkv_proj.input_quant(x))
        x = self.self_attn(positions, x, cache, meta)
        if isinstance(self.mlp, SparseMoE):
            x, residual = self.post_attention_layernorm(x, residual)
            return self.mlp(x, meta.slot_mapping), residual
        x, residual = self.post_attention_layernorm(x, residual, out_quant=self.mlp.gate_up_proj.input_quant(x))
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.rope, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, caches: list[LayerKVCache], meta: AttentionMetadata):
        x = self.embed_tokens(input_ids)
        residual = None
        for layer, cache in zip(self.layers, caches):
            x, residual = layer(positions, x, residual, cache, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our fragment, shard id within the fused projection)
    fused = {
        ".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
        ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
    }
    # an expert's projection -> (its stacked parameter, gate | up | down)
    expert_parts = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None),
                    "w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", None)}  # Mixtral's names

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = self.model.embed_tokens if cfg.tie_word_embeddings else VocabEmbedding(cfg.vocab_size,
                                                                                              cfg.hidden_size)

    def forward(self, input_ids, positions, caches, meta):
        return self.model(input_ids, positions, caches, meta)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head.logits(hidden, out)

    def map_checkpoint_name(self, name: str) -> tuple[str, int | None] | None:
        """HF tensor name -> (our parameter name, shard id), or None for tensors we do not use."""
        if "rotary_emb.inv_freq" in name:
            return None
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral
        if ".mlp.experts." in name:  # model.layers.{i}.mlp.experts.{e}.{proj}.weight
            head, tail = name.split(".mlp.experts.")
            expert, proj, _ = tail.split(".", 2)
            if proj not in self.expert_parts:
                return name, None  # no place in the model: the loader names it
            param, which = self.expert_parts[proj]
            return f"{head}.mlp.{param}", (int(expert), which)
        for frag, (ours, shard) in self.fused.items():
            if frag in name:
                return name.replace(frag, ours), shard
        return name, None
