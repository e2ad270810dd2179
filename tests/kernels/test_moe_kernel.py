"""fused_moe (kiln/kernels/moe.py) against the PyTorch experts (kiln.layers.moe.experts_reference), and its pairs'
alignment. On a GPU, also Qwen3-30B-A3B's and Mixtral's shapes."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kernel_env import DEVICE, DOT_DTYPES, gpu_only  # skips where no kernels run

from kiln.kernels.moe import align_pairs, fused_moe  # noqa: E402
from kiln.layers.moe import experts_reference, route  # noqa: E402


@pytest.mark.parametrize("t,k,e,block", [(1, 2, 8, 16), (5, 3, 8, 16), (40, 2, 4, 16), (3, 8, 128, 16),
                                         (300, 8, 16, 64)])
@pytest.mark.parametrize("use_kernel", [False, True])
def test_pairs_are_grouped_by_expert_in_whole_blocks(t, k, e, block, use_kernel):
    """The torch ops and the one-program kernel (decode steps on a GPU) give the same arrangement."""
    g = torch.Generator().manual_seed(t)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(DEVICE, torch.int32)  # moe_route's
    pairs, block_expert = align_pairs(ids, e, block, use_kernel=use_kernel)
    if use_kernel:
        want = align_pairs(ids.cpu(), e, block)
        assert pairs.cpu().tolist() == want[0].tolist() and block_expert.cpu().tolist() == want[1].tolist()
    n = t * k
    assert pairs.numel() == block_expert.numel() * block
    real = pairs[pairs < n]
    assert sorted(real.tolist()) == list(range(n))  # every pair once, the rest sentinels
    flat = ids.reshape(-1)
    for b, expert in enumerate(block_expert.tolist()):
        rows = pairs[b * block:(b + 1) * block]
        rows = rows[rows < n]
        if expert == e:
            assert rows.numel() == 0  # past the last run
        else:
            assert rows.numel() > 0 and (flat[rows.long()] == expert).all()
    assert block_expert.tolist() == sorted(block_expert.tolist())


CASES = [  # T, hidden, I, experts, k
    (1, 64, 48, 8, 2),
    (7, 96, 40, 8, 3),       # ragged N and K
    (33, 64, 32, 4, 2),      # experts with many rows
    pytest.param(1, 2048, 768, 128, 8, marks=gpu_only),     # Qwen3-30B-A3B, decode batch 1
    pytest.param(64, 2048, 768, 128, 8, marks=gpu_only),
    pytest.param(700, 2048, 768, 128, 8, marks=gpu_only),   # a prefill chunk: 64-row blocks
    pytest.param(16, 4096, 14336, 8, 2, marks=gpu_only),    # Mixtral 8x7B
]


@pytest.mark.parametrize("t,h,inter,e,k", CASES)
@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_fused_moe_equals_the_pytorch_experts(t, h, inter, e, k, dtype):
    g = torch.Generator().manual_seed(t * 31 + h)
    x = torch.randn(t, h, generator=g).to(DEVICE, dtype)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) * h ** -0.5).to(DEVICE, dtype)
    w2 = (torch.randn(e, h, inter, generator=g) * inter ** -0.5).to(DEVICE, dtype)
    weights, ids = route(torch.randn(t, e, generator=g).to(DEVICE), k, renormalize=True)
    got = fused_moe(x, w13, w2, weights, ids)
    ref = experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    assert got.dtype == dtype and got.shape == (t, h)
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}[dtype], err


@pytest.mark.parametrize("t,h,inter,e,k", CASES)
def test_fused_moe_with_int8_experts_equals_the_dequantized_experts(t, h, inter, e, k):
    """w8a16: int8 codes widened in the kernel, each expert's channel scales applied after its K loop."""
    from kiln.quantization import ops as qops
    dtype = torch.float16
    g = torch.Generator().manual_seed(t * 7 + h)
    x = torch.randn(t, h, generator=g).to(DEVICE, dtype)
    w13 = torch.randn(e * 2 * inter, h, generator=g) * h ** -0.5
    w2 = torch.randn(e * h, inter, generator=g) * inter ** -0.5
    (c13, s13), (c2, s2) = qops.quantize_weight(w13, torch.int8), qops.quantize_weight(w2, torch.int8)
    c13, c2 = c13.view(e, 2 * inter, h).to(DEVICE), c2.view(e, h, inter).to(DEVICE)
    scales = (s13.view(e, -1).to(DEVICE), s2.view(e, -1).to(DEVICE))
    weights, ids = route(torch.randn(t, e, generator=g).to(DEVICE), k, renormalize=False)
    got = fused_moe(x, c13, c2, weights, ids, scales=scales)
    ref = experts_reference(x.float(), c13, c2, weights, ids, scales)
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 4e-3, err


@pytest.mark.parametrize("t,e,k,renormalize", [(1, 8, 2, True), (5, 128, 8, True), (9, 60, 3, False),
                                              (4, 4, 4, False)])
def test_route_kernel_takes_the_top_k_of_the_softmax(t, e, k, renormalize):
    from kiln.kernels.moe import moe_route
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(e)).to(DEVICE)
    weights, ids = moe_route(logits, k, renormalize)
    want_w, want_i = route(logits, k, renormalize)
    assert ids.tolist() == want_i.tolist()
    assert torch.allclose(weights, want_w, atol=1e-6)


PADDED_CASES = [(4, 2, 8, 16, [3]), (8, 8, 128, 16, [5, 6, 7]), (600, 8, 16, 64, list(range(550, 600)))]


@pytest.mark.parametrize("t,k,e,block,padded", PADDED_CASES)
@pytest.mark.parametrize("use_kernel", [False, True])
def test_padded_rows_pairs_are_left_out(t, k, e, block, padded, use_kernel):
    """A CUDA graph's padded rows (expert id E): none of their pairs is placed, the others as without them."""
    g = torch.Generator().manual_seed(t)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    ids[padded] = e
    pairs, block_expert = align_pairs(ids.to(DEVICE), e, block, use_kernel=use_kernel)
    n = t * k
    dead = {r * k + j for r in padded for j in range(k)}
    assert sorted(pairs[pairs < n].tolist()) == sorted(set(range(n)) - dead)
    flat = ids.reshape(-1)
    for b, expert in enumerate(block_expert.tolist()):
        rows = pairs[b * block:(b + 1) * block].cpu()
        rows = rows[rows < n]
        assert (flat[rows.long()] == expert).all() and (expert < e or rows.numel() == 0)
    if use_kernel:
        want = align_pairs(ids, e, block)
        assert pairs.cpu().tolist() == want[0].tolist() and block_expert.cpu().tolist() == want[1].tolist()


@pytest.mark.parametrize("t,e,k,padded", [(4, 8, 2, [3]), (16, 128, 8, [9, 10, 15])])
def test_padded_rows_route_to_no_expert_and_sum_to_zero(t, e, k, padded):
    """Rows of slot -1 get id E and weight 0 from both routers, and fused_moe neither reads them (NaN there stays
    out) nor writes them anything but zeros; the other rows are what they are without the padding."""
    from kiln.kernels.moe import moe_route
    g = torch.Generator().manual_seed(t)
    h, inter = 64, 32
    slots = torch.arange(t)
    slots[padded] = -1
    logits = torch.randn(t, e, generator=g).to(DEVICE)
    weights, ids = moe_route(logits, k, True, slots.to(DEVICE))
    want_w, want_i = route(logits, k, True, slots.to(DEVICE))
    assert ids.tolist() == want_i.tolist() and torch.allclose(weights, want_w, atol=1e-6)
    assert (ids[padded] == e).all() and (weights[padded] == 0).all()
    live = [i for i in range(t) if i not in padded]
    assert ids[live].tolist() == route(logits, k, True)[1][live].tolist()
    # expert parallelism: the second half of the experts is this rank's; the rest (and the padded rows) map to none
    half = (e // 2, e // 2)
    w_ep, ids_ep = moe_route(logits, k, True, slots.to(DEVICE), half)
    want_ep = route(logits, k, True, slots.to(DEVICE), half)[1]
    glob = want_i.cpu()
    assert ids_ep.tolist() == want_ep.tolist() and torch.equal(w_ep, weights)
    assert ids_ep.cpu().tolist() == torch.where((glob >= e // 2) & (glob < e), glob - e // 2, e // 2).tolist()
    x = torch.randn(t, h, generator=g).to(DEVICE)
    x[padded] = float("nan")
    w13 = (torch.randn(e, 2 * inter, h, generator=g) * h ** -0.5).to(DEVICE)
    w2 = (torch.randn(e, h, inter, generator=g) * inter ** -0.5).to(DEVICE)
    got = fused_moe(x, w13, w2, weights, ids)
    ref = experts_reference(x, w13, w2, weights, ids)
    assert (got[padded] == 0).all() and (ref[padded] == 0).all()
    alone = experts_reference(x[live], w13, w2, weights[live], ids[live])
    assert torch.allclose(got[live], alone, atol=1e-5) and torch.allclose(ref[live], alone, atol=1e-5)
    # a shared expert's output and gate (Qwen2-MoE) join in the final sum: + sigmoid(gate) * output
    shared_out, shared_gate = torch.randn(t, h, generator=g).to(DEVICE), torch.randn(t, 1, generator=g).to(DEVICE)
    with_shared = fused_moe(x, w13, w2, weights, ids, shared=(shared_out, shared_gate))
    assert torch.allclose(with_shared, got + torch.sigmoid(shared_gate) * shared_out, atol=1e-5)
