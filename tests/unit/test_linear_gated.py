"""Linear.forward_gated (the MLP's down projection of silu(gate) * up): the same output as the layer applied to
the activation, and forward hooks (calibration collects its activation statistics through them) still see the
activation. The fused GPU kernels are tested in tests/kernels/test_kernels.py."""
import torch
import torch.nn.functional as F

from kiln.layers.linear import Linear


def test_forward_gated_is_the_layer_on_silu_gate_times_up_and_hooks_see_the_activation():
    torch.manual_seed(0)
    lin = Linear(32, 8, bias=True)
    lin.weight.data.normal_()
    lin.bias.data.normal_()
    gu = torch.randn(5, 64)
    act = F.silu(gu[:, :32]) * gu[:, 32:]
    seen = []
    handle = lin.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
    out = lin.forward_gated(gu)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], act)
    assert torch.allclose(out, act @ lin.weight.t() + lin.bias, atol=1e-5)
    lin.quantize_weights("w8a16")
    assert torch.allclose(lin.forward_gated(gu), lin(act), atol=1e-6)
