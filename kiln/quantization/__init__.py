"""Quantization: 8-bit weight/activation math, compressed-tensors checkpoints, post-training quantization."""

# Kiln's names of the weight formats it runs (kiln.quantization.ops maps each to an 8-bit storage dtype). Here,
# free of torch, so that the command line's parser imports none (start to ready: torch takes seconds to import)
W8A16, W8A8_INT8, W8A8_FP8 = "w8a16", "w8a8-int8", "w8a8-fp8"
SCHEMES = (W8A16, W8A8_INT8, W8A8_FP8)
