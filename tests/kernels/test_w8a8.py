"""The W8A8 GPU path (kiln/kernels/quant.py, E4M3 codes in w8a16.py, kiln.quantization.ops._w8a8_kernels) against
the CPU reference path of kiln.quantization.ops.

Runs on a CUDA GPU (all shapes), or on CPU under TRITON_INTERPRET=1 (small shapes; `gpu_only` ones skip), where
_w8a8_kernels runs on CPU tensors (torch._int_mm and torch._scaled_mm have CPU versions). Under the interpreter
tl.dot on bfloat16 is wrong, so the weight-only path is checked in fp16/fp32 there; its float -> E4M3 cast is
patched to torch's (kiln.kernels._utils), so codes are compared bit for bit everywhere.
"""

from __future__ import annotations


import pytest
import torch

from tests.kernels.kernel_env import DEVICE, DOT_DTYPES, INTERP, gpu_only  # skips where no kernels run

from kiln import kernels as K  # noqa: E402
from kiln.quantization import ops as qops  # noqa: E402

FP8 = torch.float8_e4m3fn
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def assert_codes_match(codes, ref):
    assert codes.dtype == ref.dtype and codes.shape == ref.shape
    assert torch.equal(codes.view(torch.uint8).cpu(), ref.view(torch.uint8).cpu())


# ----------------------------------------------------------------------------- per-token activation quantization

QUANT_CASES = [
    # M, K
    (1, 64),
    (7, 200),
    (33, 4096),
    (3, 20000),                                # longer than one tile: the two-loop path
    pytest.param(300, 4096, marks=gpu_only),
    pytest.param(64, 14336, marks=gpu_only),
    pytest.param(5, 28672, marks=gpu_only),
]


@pytest.mark.parametrize("M,Kd", QUANT_CASES)
@pytest.mark.parametrize("code", [torch.int8, FP8], ids=["int8", "e4m3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_quantize_activation_matches_reference(M, Kd, code, dtype, static):
    x = rand(M, Kd, dtype=dtype, scale=3.0)
    x[0, :5] = 0.0
    static_scale = torch.tensor([0.02], device=DEVICE) if static else None
    codes, scales = K.quantize_activation(x, code, static_scale)
    ref_codes, ref_scales = qops.quantize_activation(x, code, static_scale)
    assert scales.shape == (M, 1) and scales.dtype == torch.float32
    assert torch.equal(scales, ref_scales)
    assert_codes_match(codes, ref_codes)


def test_int8_rounds_half_to_even_like_torch_round():
    # absmax 127 makes the row scale exactly 1: every x / scale below is a tie or near one
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.4999998, 126.5, -126.5, 0.49999997, 0.0])
    x = row[None, :].to(DEVICE)
    codes, scales = K.quantize_activation(x, torch.int8)
    assert scales.item() == 1.0
    assert codes.cpu().tolist() == [[127, 0, 2, 2, 0, -2, -2, 3, 126, -126, 0, 0]]
    assert_codes_match(codes, qops.quantize_activation(x, torch.int8)[0])


@pytest.mark.parametrize("code", [torch.int8, FP8], ids=["int8", "e4m3"])
def test_padding_rows_are_zero_codes(code):
    x = rand(5, 96)
    codes, scales = K.quantize_activation(x, code, pad_rows=17)
    assert codes.shape == (17, 96) and scales.shape == (17, 1)
    assert not codes[5:].float().any()
    assert_codes_match(codes[:5], qops.quantize_activation(x, code)[0])


def test_all_zero_row_gets_the_floor_scale():
    x = torch.zeros(2, 64, device=DEVICE)
    codes, scales = K.quantize_activation(x, torch.int8)
    assert torch.equal(scales, qops.quantize_activation(x, torch.int8)[1]) and not codes.any()


# ----------------------------------------------------------------------------- producers that quantize as they write

# T rows, H features, pad_rows (what the GEMM after wants: 17 for int8, a multiple of 16 for FP8)
PRODUCER_CASES = [(5, 64, 0), (3, 200, 17), (20, 96, 32),
                  pytest.param(300, 4096, 304, marks=gpu_only), pytest.param(64, 14336, 64, marks=gpu_only)]
ACT_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("T,H,pad", PRODUCER_CASES)
@pytest.mark.parametrize("code", [torch.int8, FP8], ids=["int8", "e4m3"])
@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("add", [False, True], ids=["norm", "add-norm"])
def test_rmsnorm_quant_equals_norm_then_quantize(T, H, pad, code, dtype, static, add):
    x, w = rand(T, H, dtype=dtype, scale=3.0), rand(H, dtype=dtype)
    res = rand(T, H, dtype=dtype) if add else None
    static_scale = torch.tensor([0.02], device=DEVICE) if static else None
    codes, scales, res_out = K.rmsnorm_quant(x, w, 1e-6, code, static_scale, pad, residual=res)
    y, ref_res = K.fused_add_rmsnorm(x, res, w, 1e-6) if add else (K.rmsnorm(x, w, 1e-6), None)
    ref_codes, ref_scales = K.quantize_activation(y, code, static_scale, pad_rows=pad)
    assert codes.shape == (max(T, pad), H) and scales.shape == (max(T, pad), 1)
    assert not codes[T:].float().any()  # padding rows: zero codes
    _assert_same_quantization(codes[:T], scales[:T], ref_codes[:T], ref_scales[:T])
    assert (res_out is None) == (not add)
    if add:
        assert torch.equal(res_out, ref_res)


def _assert_same_quantization(codes, scales, ref_codes, ref_scales):
    """Under the interpreter, the fused kernel's codes and scales are the unfused pair's, bit for bit. On a GPU
    the norm compiled with its quantizing epilogue may round a few outputs one ulp apart from the plain norm
    (H100, run AF: 6 of 48 large cases): where such a value sits at a rounding boundary its code moves one step,
    and a row whose maximum moved gets a scale one ulp away. The dequantized rows then agree to well within one
    quantization step."""
    if INTERP:
        assert_codes_match(codes, ref_codes)
        assert torch.equal(scales, ref_scales)
        return
    assert codes.dtype == ref_codes.dtype and codes.shape == ref_codes.shape
    same = (codes.view(torch.uint8) == ref_codes.view(torch.uint8)).float().mean().item()
    assert same > 0.9, f"only {same:.3f} of the codes equal"
    assert torch.allclose(scales, ref_scales, rtol=2 ** -7, atol=0)
    deq, ref = codes.float() * scales, ref_codes.float() * ref_scales
    assert rel_err(deq, ref) < 5e-3


@pytest.mark.parametrize("T,I,pad", [(5, 64, 0), (3, 100, 17), (20, 96, 32),
                                     pytest.param(300, 14336, 304, marks=gpu_only)])
@pytest.mark.parametrize("code", [torch.int8, FP8], ids=["int8", "e4m3"])
@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_silu_and_mul_quant_equals_silu_and_mul_then_quantize(T, I, pad, code, dtype, static):
    x = rand(T, 2 * I, dtype=dtype, scale=2.0)
    static_scale = torch.tensor([0.02], device=DEVICE) if static else None
    codes, scales = K.silu_and_mul_quant(x, code, static_scale, pad)
    ref_codes, ref_scales = K.quantize_activation(K.silu_and_mul(x), code, static_scale, pad_rows=pad)
    assert codes.shape == (max(T, pad), I)
    assert not codes[T:].float().any()
    _assert_same_quantization(codes[:T], scales[:T], ref_codes[:T], ref_scales[:T])


@pytest.mark.parametrize("T,I,pad", [(17, 64, 17), (40, 100, 48), pytest.param(300, 14336, 304, marks=gpu_only)])
@pytest.mark.parametrize("code", [torch.int8, FP8], ids=["int8", "e4m3"])
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_silu_and_mul_quant_on_the_int8_gemms_accumulator(T, I, pad, code, dtype):
    # the int8 gate/up GEMM's int32 output, its scale epilogue done by the SwiGLU kernel: the codes of
    # scale_int32 then silu_and_mul_quant
    acc = torch.randint(-2 ** 17, 2 ** 17, (max(T, 17), 2 * I), dtype=torch.int32, device=DEVICE)
    xs = torch.rand(max(T, 17), 1, device=DEVICE) / 127
    ws = torch.rand(2 * I, device=DEVICE) / 127 / 2 ** 10
    codes, scales = K.silu_and_mul_quant(acc, code, None, pad, rows=T, int32_scales=(xs, ws, dtype))
    ref_codes, ref_scales = K.silu_and_mul_quant(K.scale_int32(acc, xs, ws, None, dtype, rows=T), code, None, pad)
    assert codes.shape == (max(T, pad), I)
    assert not codes[T:].float().any()
    _assert_same_quantization(codes[:T], scales[:T], ref_codes[:T], ref_scales[:T])


@pytest.mark.parametrize("code", [torch.int8, FP8], ids=["int8", "e4m3"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_on_rows_quantized_by_their_producer(code, bias):
    # what a decoder layer does on CUDA: the norm writes qkv_proj's 8-bit input, the layer runs only its GEMM
    from kiln.layers.linear import Linear
    T, H, N = 40, 128, 96
    lin = Linear(H, N, bias=bias)
    lin.weight.data.copy_(rand(N, H, scale=0.05))
    if bias:
        lin.bias.data.copy_(rand(N))
    lin.quantize_weights(qops.W8A8_INT8 if code == torch.int8 else qops.W8A8_FP8)
    lin.to(DEVICE)
    lin.qweight, lin.scale = lin.qweight.to(DEVICE), lin.scale.to(DEVICE)
    dtype = torch.float16
    lin.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.data.to(dtype), requires_grad=False)
    x, w = rand(T, H, dtype=dtype), rand(H, dtype=dtype)
    pad = 48 if code == FP8 else 17
    codes, scales, _ = K.rmsnorm_quant(x, w, 1e-6, code, None, pad)
    out = lin(qops.QuantizedRows(codes, scales, T, dtype))
    ref = qops._w8a8_kernels(K.rmsnorm(x, w, 1e-6), lin.qweight, lin.scale, lin.bias, None)
    assert out.shape == (T, N) and out.dtype == dtype
    assert torch.equal(out, ref)


def test_input_quant_only_where_the_layer_would_quantize_on_cuda():
    from kiln.layers.linear import Linear
    lin = Linear(128, 96)
    lin.weight.data.copy_(torch.randn(96, 128))
    assert lin.input_quant(torch.zeros(40, 128)) is None  # float weights
    lin.quantize_weights(qops.W8A8_FP8)
    assert lin.input_quant(torch.zeros(40, 128)) is None  # CPU: the reference path quantizes inside
    if torch.cuda.is_available():
        lin.qweight, lin.scale = lin.qweight.cuda(), lin.scale.cuda()
        assert lin.input_quant(torch.zeros(qops.WEIGHT_ONLY_MAX_T, 128)) is None  # the weight-only kernel's rows
        q = lin.input_quant(torch.zeros(40, 128))
        assert (q.rows, q.dtype, q.pad_rows, q.static_scale) == (40, FP8, qops.fp8_gemm_rows(40), None)
        assert qops.fp8_gemm_rows(40) % 16 == 0 and qops.fp8_gemm_rows(40) >= 40


# ----------------------------------------------------------------------------- int8 GEMM epilogue

@pytest.mark.parametrize("M,N,rows", [(17, 96, 5), (40, 300, 40), pytest.param(1024, 28672, 1000, marks=gpu_only)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_scale_int32_matches_float32_math(M, N, rows, dtype, bias):
    acc = torch.randint(-2 ** 20, 2 ** 20, (M, N), dtype=torch.int32, device=DEVICE)
    xs = torch.rand(M, 1, device=DEVICE) / 127
    ws = torch.rand(N, device=DEVICE) / 127
    b = rand(N, dtype=dtype) if bias else None
    out = K.scale_int32(acc, xs, ws, b, dtype, rows=rows)
    ref = acc[:rows].float() * xs[:rows] * ws[None, :]
    ref = (ref if b is None else ref + b.float()).to(dtype)
    assert out.shape == (rows, N) and out.dtype == dtype
    if dtype == torch.bfloat16 and INTERP:  # the interpreter truncates float32 -> bfloat16: one ulp
        assert torch.allclose(out.float(), ref.float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(out, ref)


# ----------------------------------------------------------------------------- weight-only path with E4M3 codes

GEMV_CASES = [
    # M, N, K, bias
    (1, 96, 160, False),
    (5, 64, 256, True),
    (16, 40, 64, False),
    pytest.param(1, 4096, 4096, False, marks=gpu_only),
    pytest.param(16, 6144, 4096, True, marks=gpu_only),
    pytest.param(7, 4096, 14336, False, marks=gpu_only),
    pytest.param(64, 28672, 4096, True, marks=gpu_only),
]


@pytest.mark.parametrize("M,N,Kd,bias", GEMV_CASES)
@pytest.mark.parametrize("code", [torch.int8, FP8], ids=["int8", "e4m3"])
@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_w8a16_matmul_takes_8bit_codes(M, N, Kd, bias, code, dtype):
    x = rand(M, Kd, dtype=dtype)
    wq, ws = qops.quantize_weight(rand(N, Kd, scale=0.05), code)
    b = rand(N, dtype=dtype) if bias else None
    out = K.w8a16_matmul(x, wq, ws, b)
    # float32 math on the exact weight values (E4M3 and int8 codes are exact in every compute dtype)
    ref = (x.float() @ (wq.float() * ws[:, None]).t() + (b.float() if bias else 0)).to(dtype)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    # and the weight-only reference of ops.py, which rounds the dequantized weight to x's dtype first
    assert rel_err(out, qops.w8a16_reference(x, wq, ws, b)) < max(TOL[dtype], 4e-3)


# ----------------------------------------------------------------------------- w8a8_linear's CUDA path

def _run_kernel_path(x, wq, ws, b, static):
    if x.is_cuda:
        return qops.w8a8_linear(x, wq, ws, b, static)
    return qops._w8a8_kernels(x, wq, ws, b, static)


W8A8_M = [1, 7, 16, 17, 64, 300]
W8A8_DTYPES = [torch.float16, torch.float32] if INTERP else [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("M", W8A8_M)
@pytest.mark.parametrize("code", [torch.int8, FP8], ids=["int8", "e4m3"])
@pytest.mark.parametrize("dtype", W8A8_DTYPES)
@pytest.mark.parametrize("bias,static", [(False, False), (True, False), (True, True)],
                         ids=["plain", "bias", "bias-static"])
def test_w8a8_kernel_path_matches_reference(M, code, dtype, bias, static):
    N, Kd = (96, 128) if INTERP else (1000, 4096)
    x = rand(M, Kd, dtype=dtype)
    wq, ws = qops.quantize_weight(rand(N, Kd, scale=0.05), code)
    b = rand(N, dtype=dtype) if bias else None
    static_scale = (x.float().abs().amax() / qops.qmax(code)).reshape(1) if static else None
    out = _run_kernel_path(x, wq, ws, b, static_scale)
    assert out.shape == (M, N) and out.dtype == dtype
    if M <= qops.WEIGHT_ONLY_MAX_T:  # the weight-only kernel: activations not quantized
        ref = (x.float() @ (wq.float() * ws[:, None]).t() + (b.float() if bias else 0)).to(dtype)
        tol = TOL[dtype]
    else:  # the CPU reference of the same W8A8 arithmetic
        ref = qops.w8a8_linear(x.cpu(), wq.cpu(), ws.cpu(), None if b is None else b.cpu(),
                               None if static_scale is None else static_scale.cpu())
        # int8: identical codes and exact int32 sums, only the bias rounding differs (the reference rounds
        # before adding); FP8: cuBLAS accumulates in its own order and rounds to bf16 first
        tol = 2e-3 if code == torch.int8 else 1e-2
    assert rel_err(out, ref) < tol


@pytest.mark.skipif(qops.WEIGHT_ONLY_MAX_T < 1, reason="KILN_W8A8_WEIGHT_ONLY_MAX_T=0: no weight-only path")
@pytest.mark.parametrize("code", [torch.int8, FP8], ids=["int8", "e4m3"])
def test_weight_only_path_is_more_accurate_than_w8a8(code):
    dtype = torch.float32 if INTERP else torch.bfloat16
    M, N, Kd = min(8, qops.WEIGHT_ONLY_MAX_T), 96, 256
    x = rand(M, Kd, dtype=dtype)
    x[:, :3] *= 20  # an outlier channel, as real activations have
    w = rand(N, Kd, scale=0.05)
    wq, ws = qops.quantize_weight(w, code)
    truth = x.double() @ w.double().t()
    fast = _run_kernel_path(x, wq, ws, None, None)
    w8a8 = qops.w8a8_linear(x.cpu(), wq.cpu(), ws.cpu(), None)
    assert rel_err(fast, truth) < rel_err(w8a8, truth)


@pytest.mark.parametrize("T", [1, 17, pytest.param(300, marks=gpu_only)])
@pytest.mark.parametrize("scheme", [qops.W8A8_INT8, qops.W8A8_FP8])
def test_decoder_layers_with_fused_input_quantization_equal_unfused(T, scheme, monkeypatch):
    """The norms and SwiGLU writing their projection's 8-bit input change no bit of the model's output on a GPU.
    Under the interpreter the producers are made to run on CPU tensors too (the layers' wiring: QuantizedRows
    through the attention's projections and the MLP); the unfused side there is the CPU reference path, whose
    norm rounds differently, so the two agree closely rather than to the bit."""
    from kiln.entrypoints.bench import PRESETS
    from kiln.layers.linear import Linear
    from kiln.models.config import ModelConfig
    from kiln.models.llama import LlamaModel
    cfg = ModelConfig.from_dict(PRESETS["tiny"])
    torch.manual_seed(0)
    model = LlamaModel(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    for mod in model.modules():
        if isinstance(mod, Linear):
            mod.quantize_weights(scheme)
    dtype = torch.float32 if INTERP else torch.bfloat16
    model = model.to(dtype).to(DEVICE)
    for mod in model.modules():
        if isinstance(mod, Linear):  # plain attributes: .to() leaves them
            mod.qweight, mod.scale = mod.qweight.to(DEVICE), mod.scale.to(DEVICE)
    if INTERP:
        monkeypatch.setattr(qops, "producers_quantize_on", lambda device: True)
    hidden = torch.randn(T, cfg.hidden_size, device=DEVICE, dtype=dtype)
    seen = []  # the row counts of GEMMs on producer-quantized rows (int8: the product before its scales)
    spied = "int8_gemm" if scheme == qops.W8A8_INT8 else "w8a8_gemm"
    gemm = getattr(qops, spied)
    monkeypatch.setattr(qops, spied, lambda xq, *a: seen.append(xq.rows) or gemm(xq, *a))
    outs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Linear, "input_quant", lambda self, x: None)
        x, residual = hidden, None
        for layer in model.layers:
            layer.self_attn.forward = lambda positions, x, cache, meta, a=layer.self_attn: a.o_proj(
                a.qkv_proj(x)[:, :a.num_heads * a.head_dim])  # attention aside: the projections only
            x, residual = layer(None, x, residual, None, None)
        outs.append((x, residual))
    if T > qops.WEIGHT_ONLY_MAX_T:  # the fused run's qkv, gate_up and down took producer-quantized rows
        assert len(seen) >= 3 * cfg.num_layers and set(seen) == {T}
    else:
        assert not seen
    if INTERP:
        assert rel_err(outs[0][0], outs[1][0]) < 2e-2 and rel_err(outs[0][1], outs[1][1]) < 2e-2
    else:
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@gpu_only
@pytest.mark.parametrize("M", [1, 16, 17, 256])
@pytest.mark.parametrize("code", [torch.int8, FP8], ids=["int8", "e4m3"])
def test_linear_layer_w8a8_on_cuda_matches_cpu(M, code):
    from kiln.layers.linear import Linear
    layer = Linear(4096, 6144)
    layer.weight.data.copy_(torch.randn(6144, 4096) * 0.02)
    cpu = Linear(4096, 6144)
    cpu.weight.data.copy_(layer.weight.data)
    scheme = qops.W8A8_INT8 if code == torch.int8 else qops.W8A8_FP8
    for lin in (layer, cpu):
        lin.quantize_weights(scheme)
    layer.qweight, layer.scale = layer.qweight.cuda(), layer.scale.cuda()
    x = torch.randn(M, 4096).to(torch.bfloat16)
    out = layer(x.cuda())
    truth = x.double() @ (cpu.qweight.double() * cpu.scale.double()[:, None]).t()
    assert out.dtype == torch.bfloat16
    assert rel_err(out, truth) < 4e-2
    assert rel_err(out, cpu(x)) < (TOL[torch.bfloat16] if M <= qops.WEIGHT_ONLY_MAX_T else 1e-2) * 4
