"""Kiln: a fast LLM inference server."""
from kiln.engine.request import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "LLM":  # lazy: `import kiln` should not load torch
        from kiln.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)
