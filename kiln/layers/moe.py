"""Mixture-of-experts feed-forward (Qwen2-MoE, Qwen3-MoE, Mixtral): a router picks each token's top-k of E SwiGLU
experts, whose outputs are summed with the router's weights; Qwen2-MoE adds a shared expert that every token takes,
scaled by sigmoid(shared_expert_gate(x)).

Tensor parallelism splits every expert's intermediate size over the ranks, as the dense MLP's: each rank holds
all experts' slices, the router is replicated, and one all-reduce sums the partial outputs (the shared expert's
with them). With expert parallelism (KILN_ENABLE_EXPERT_PARALLEL) a rank holds E / tp whole experts instead: the
pairs routed to other ranks' experts become "no expert" here (as a CUDA graph's padded rows), and the same one
all-reduce sums each token's experts from the ranks that hold them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln import distributed as tpd
from kiln.layers.mlp import MLP
from kiln.quantization import ops as qops


class Router(nn.Module):
    """The gate: logits [tokens, experts] (kept in the model's float dtype, never quantized)."""

    def __init__(self, num_experts: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden), requires_grad=False)


def route(logits: torch.Tensor, top_k: int, renormalize: bool, slot_mapping: torch.Tensor | None = None,
          experts: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int64): softmax over all experts in float32, the top k, their
    weights rescaled to sum to one where the model asks (Mixtral always, Qwen3-MoE by norm_topk_prob). Rows whose
    slot_mapping is < 0 (a CUDA graph's padding) route to no expert: id E, weight 0. experts (first, count):
    expert parallelism's local range; the ids come as local ones, `count` for another rank's expert or none."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if slot_mapping is not None:
        padded = (slot_mapping < 0)[:, None]
        weights = weights.masked_fill(padded, 0.0)
        ids = ids.masked_fill(padded, logits.shape[-1])
    if experts is not None:
        first, count = experts
        ids = ids - first
        ids = torch.where((ids >= 0) & (ids < count), ids, count)
    return weights, ids


def experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) in PyTorch: the (token, expert) pairs sorted by expert, one
    matmul pair per expert that some token chose. The CPU path, and the GPU kernel's reference. scales: int8
    weights' per-channel scales ([E, 2I], [E, hidden]), each chosen expert dequantized as it is used. Pairs of id
    E (padded rows) count for nothing."""
    t, k = ids.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()[:num_experts]
    order = torch.argsort(flat, stable=True)[:sum(counts)]  # id E sorts last
    tokens = order // k
    xs = x[tokens]
    rows = torch.empty(order.numel(), w2.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            a, b = (w13[e], w2[e]) if scales is None else (w13[e].to(x.dtype) * scales[0][e, :, None].to(x.dtype),
                                                          w2[e].to(x.dtype) * scales[1][e, :, None].to(x.dtype))
            h = F.linear(xs[start:start + n], a)
            rows[start:start + n] = F.linear(F.silu(h[:, :inter]) * h[:, inter:], b)
            start += n
    rows = rows.float() * weights.reshape(-1)[order, None]
    out = torch.zeros(t, w2.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tokens, rows)
    return out.to(x.dtype)


class SparseMoE(nn.Module):
    """The MoE block of one decoder layer. Parameters: the router `gate.weight` [E, hidden]; `w13` [E, 2 * I / tp,
    hidden], each expert's gate then up projection (this rank's slice); `w2` [E, hidden, I / tp], its down
    projection. Checkpoint tensors arrive per expert: shard (expert, 0 | 1) for gate | up, (expert, None) for down.
    shared_intermediate > 0 (Qwen2-MoE): `shared_expert`, a dense MLP, and its gate `shared_expert_gate.weight`
    [1, hidden]. expert_parallel: w13 / w2 hold this rank's E / tp experts whole (experts first..first + E / tp)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, renormalize: bool,
                 shared_intermediate: int = 0, expert_parallel: bool = False):
        super().__init__()
        tp = tpd.tp_size()
        self.expert_parallel = expert_parallel and tp > 1
        if self.expert_parallel and num_experts % tp:
            raise ValueError(f"{num_experts} experts cannot be dealt whole to {tp} tensor-parallel ranks")
        if not self.expert_parallel and intermediate % tp:
            raise ValueError(f"expert intermediate size {intermediate} is not divisible by the tensor-parallel "
                             f"size {tp}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.local_experts = num_experts // tp if self.expert_parallel else num_experts
        self.first_expert = tpd.tp_rank() * self.local_experts if self.expert_parallel else 0
        # expert parallelism: (first, count) of this rank's experts, the router's ids mapped to them as it routes
        self.local_range = (self.first_expert, self.local_experts) if self.expert_parallel else None
        self.hidden, self.full_inter = hidden, intermediate
        self.inter = intermediate if self.expert_parallel else intermediate // tp
        self.gate = Router(num_experts, hidden)
        self.w13 = nn.Parameter(torch.empty(self.local_experts, 2 * self.inter, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.local_experts, hidden, self.inter), requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self.load_weight
        self.scales: tuple[torch.Tensor, torch.Tensor] | None = None  # w8a16: w13's and w2's per-channel scales
        self.shared_expert = MLP(hidden, shared_intermediate, reduce=False) if shared_intermediate else None
        self.shared_expert_gate = Router(1, hidden) if shared_intermediate else None

    def quantize_weights(self, scheme: str) -> None:
        """Weight-only int8 experts (w8a16): per output channel of each expert, as the dense layers' (w2's over the
        whole row under tensor parallelism, as a row-parallel layer's). Half the bytes a decode step reads."""
        if scheme != qops.W8A16:
            raise ValueError(f"mixture-of-experts layers take w8a16 quantization only, not {scheme}")
        w13, w2 = self.w13.data.float(), self.w2.data.float()
        s13 = qops.channel_scales(w13.flatten(0, 1), torch.int8).view(self.local_experts, -1)
        # w2's rows are whole on a rank under expert parallelism; split over the ranks otherwise
        absmax = w2.abs().amax(dim=2) if self.expert_parallel else tpd.all_reduce_max(w2.abs().amax(dim=2))
        s2 = qops.channel_scales(w2.flatten(0, 1), torch.int8, absmax.flatten()).view(self.local_experts, -1)
        del self.w13, self.w2  # parameters become plain int8 tensors (a later .to(dtype) must not touch them)
        self.w13 = qops.to_codes(w13, s13[:, :, None], torch.int8)
        self.w2 = qops.to_codes(w2, s2[:, :, None], torch.int8)
        self.scales = (s13, s2)

    def prepare_quantized(self, scheme: str) -> None:
        """A w8a16 (compressed-tensors) checkpoint: int8 codes and per-channel scales are loaded as they are
        (load_quantized) instead of float weights quantized here."""
        if scheme != qops.W8A16:
            raise ValueError(f"mixture-of-experts layers take w8a16 checkpoints only, not {scheme}")
        (e, two_i, h), dev = self.w13.shape, self.w13.device
        del self.w13, self.w2  # plain int8 tensors, as quantize_weights leaves them
        self.w13 = torch.zeros(e, two_i, h, dtype=torch.int8, device=dev)
        self.w2 = torch.zeros(e, h, self.inter, dtype=torch.int8, device=dev)
        self.scales = (torch.zeros(e, two_i, device=dev), torch.zeros(e, h, device=dev))

    def quantized_shards(self) -> set[tuple[str, tuple]]:
        """Every (tensor, shard) a w8a16 checkpoint must fill: codes and scales of each expert."""
        return {(f"{kind}.{leaf}", shard) for kind, shards in self.checkpoint_shards().items() for shard in shards
                for leaf in ("codes", "scale")}

    def load_quantized(self, kind: str, leaf: str, loaded: torch.Tensor, shard_id) -> None:
        """One expert's int8 codes ([N, K] as the checkpoint has them) or per-channel scales ([N]) of w13 (gate or
        up) or w2, into this rank's part."""
        if leaf == "codes":
            return self.load_weight(self.w13 if kind == "w13" else self.w2, loaded, shard_id)
        (expert, start), which = self._local(shard_id[0]), shard_id[1]
        if expert is None:
            return
        scale = self.scales[0 if kind == "w13" else 1]
        want = self.full_inter if kind == "w13" else self.hidden
        if loaded.numel() == 1:  # per-tensor: the same scale for every channel
            loaded = loaded.reshape(1).expand(want)
        if loaded.numel() != want:
            raise ValueError(f"shape mismatch: checkpoint scales {tuple(loaded.shape)}, expected ({want},)")
        loaded = loaded.reshape(-1).float()
        if kind == "w13":  # this rank's output channels of gate or up
            scale[expert].narrow(0, which * self.inter, self.inter).copy_(loaded.narrow(0, start, self.inter))
        else:  # w2's rows are whole (row-parallel: the scale of the whole row)
            scale[expert].copy_(loaded)

    def _local(self, expert: int) -> tuple[int | None, int]:
        """(this rank's index of checkpoint expert `expert`, None where another rank holds it under expert
        parallelism; where this rank's part of the intermediate size starts: 0 for whole experts)."""
        local = expert - self.first_expert
        start = 0 if self.expert_parallel else tpd.tp_rank() * self.inter
        return (local if 0 <= local < self.local_experts else None), start

    def checkpoint_shards(self) -> dict[str, list]:
        """Every (parameter, shard) the checkpoint must fill: the loader's completeness check."""
        e = range(self.num_experts)
        return {"w13": [(i, j) for i in e for j in (0, 1)], "w2": [(i, None) for i in e]}

    def load_weight(self, param: torch.Tensor, loaded: torch.Tensor, shard_id) -> None:
        """One expert's gate, up (w13) or down (w2) projection, float or int8 codes, into this rank's part."""
        want = (self.full_inter, self.hidden) if param is self.w13 else (self.hidden, self.full_inter)
        if loaded.shape != want:
            raise ValueError(f"shape mismatch: checkpoint {tuple(loaded.shape)}, expected {want}")
        (expert, start), which = self._local(shard_id[0]), shard_id[1]
        if expert is None:
            return
        if param is self.w13:
            param.data[expert].narrow(0, which * self.inter, self.inter).copy_(loaded.narrow(0, start, self.inter))
        else:
            param.data[expert].copy_(loaded.narrow(1, start, self.inter))

    def forward(self, x: torch.Tensor, slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
        """slot_mapping: the step's KV slots; rows of slot < 0 (a CUDA graph's padding) read no expert."""
        logits = F.linear(x, self.gate.weight)
        # the shared expert (Qwen2-MoE): the gate is per token, so it scales each rank's partial sum alike
        shared = None if self.shared_expert is None else (self.shared_expert(x),
                                                          F.linear(x, self.shared_expert_gate.weight))
        if x.is_cuda:
            from kiln.kernels import fused_moe, moe_route
            weights, ids = moe_route(logits, self.top_k, self.renormalize, slot_mapping, self.local_range)
            out = fused_moe(x, self.w13, self.w2, weights, ids, scales=self.scales, shared=shared)
        else:
            weights, ids = route(logits, self.top_k, self.renormalize, slot_mapping, self.local_range)
            out = experts_reference(x, self.w13, self.w2, weights, ids, self.scales)
            if shared is not None:
                out = out + torch.sigmoid(shared[1]) * shared[0]
        return tpd.all_reduce(out)
