"""Where the kernel tests run, shared by every module here: on a CUDA GPU, or on CPU through Triton's interpreter
(TRITON_INTERPRET=1). Importing it skips the importing module where neither is there."""
from __future__ import annotations

import os

import pytest
import torch

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

if not INTERP and not HAS_CUDA:
    pytest.skip("kernel tests need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

DEVICE = "cpu" if INTERP else "cuda"
gpu_only = pytest.mark.skipif(INTERP, reason="large shape: GPU only (too slow for the interpreter)")
# the interpreter's tl.dot on bfloat16 multiplies the raw storage (docs/kernels.md): bf16 dots on the GPU only
DOT_DTYPES = [torch.float16, torch.float32] if INTERP else [torch.bfloat16, torch.float16, torch.float32]
