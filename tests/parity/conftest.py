"""Fixtures of the parity tests."""
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def transformers_gguf_model():
    """transformers' own GGUF loading of the bundled SmolLM2 file, in float32: loaded once (~15 s, a Python
    dequantization) for every test that compares Kiln with it."""
    from kiln.models.default_model import default_gguf_path
    return _load_reference_from_gguf(default_gguf_path())


def _load_reference_from_gguf(gguf_path: Path):
    """transformers' own GGUF loading of the same file, in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    folder, name = str(gguf_path.parent), gguf_path.name
    if is_accelerate_available():
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    # from_pretrained(gguf_file=...) insists on accelerate, which Kiln does not need; do what it does without it.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    try:
        from transformers.initialization import no_init_weights  # skip the random init every weight overwrites
    except ImportError:  # pragma: no cover - other transformers versions
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()
