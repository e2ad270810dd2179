"""Quantization: 8-bit weight/activation math, compressed-tensors checkpoints, post-training quantization."""
