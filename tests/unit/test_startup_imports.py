"""Start to ready (issue 11): the processes that need no torch import none. torch takes seconds to import (more with
CUDA); the supervisor parses its command line before it starts anything, and each front end (HTTP workers, gRPC)
loads its tokenizer beside the engine's start, on the same cores."""
from __future__ import annotations

import subprocess
import sys


def imported(code: str, *args: str) -> list[str]:
    """Which of torch / transformers' auto classes a fresh interpreter holds after `code`."""
    code += "; print(sorted(m for m in ('torch', 'transformers.models.auto') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", "import sys; " + code, *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])


def test_the_command_line_parser_imports_no_torch():
    assert imported("from kiln.entrypoints.cli import build_parser; build_parser().parse_args(['serve'])") == []


def test_a_front_end_loads_its_tokenizer_without_torch(default_model_dir):
    """AutoTokenizer imports torch on its way to the model's config class (2-3 s in every HTTP worker)."""
    code = "from kiln.tokenizer import Tokenizer; assert Tokenizer.from_dir(sys.argv[1]).encode('Paris')"
    assert imported(code, str(default_model_dir)) == []
