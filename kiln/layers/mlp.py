"""The dense SwiGLU feed-forward: a Llama-family layer's MLP, and a Qwen2-MoE layer's shared expert."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from kiln import distributed as tpd
from kiln.layers.linear import ColumnParallelLinear, RowParallelLinear
from kiln.quantization.ops import QuantizedRows


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), the intermediate size split over the tensor-parallel ranks. reduce=False leaves
    the rank's partial sum for the caller to all-reduce with other partials (one all-reduce instead of two)."""

    def __init__(self, hidden: int, intermediate: int, reduce: bool = True):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [intermediate] * 2)
        self.down_proj = RowParallelLinear(intermediate, hidden, reduce=reduce)
        self.inter = intermediate // tpd.tp_size()

    def forward(self, x):
        """x: the normed hidden states, or already quantized for gate_up_proj (its input_quant)."""
        if (isinstance(x, QuantizedRows) or x.is_cuda) and not self.gate_up_proj.lora_active:  # down_proj's rows: x's
            return self.down_proj(self.gate_up_proj.silu_and_mul(x, self.down_proj.input_quant(x)))
        gu = self.gate_up_proj(x)
        return self.down_proj(F.silu(gu[:, :self.inter]) * gu[:, self.inter:])
