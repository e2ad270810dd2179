"""Kernel tests run on a CUDA GPU, or on CPU through Triton's interpreter.

Interpreter mode: `TRITON_INTERPRET=1 pytest tests/kernels` (the variable must be set
before triton is first imported, so set it in the environment, not in a test). Without
CUDA and without TRITON_INTERPRET=1 the kernel tests skip. `--triton-interpret` does the
same as the variable when pytest is started on this folder alone and nothing imported
triton before this conftest loaded.
"""

import os
import sys


def pytest_addoption(parser):
    try:
        parser.addoption("--triton-interpret", action="store_true", default=False,
                         help="run the Triton kernel tests in Triton's CPU interpreter")
    except ValueError:  # already added by another conftest
        pass


def pytest_configure(config):
    if config.getoption("--triton-interpret", default=False):
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("--triton-interpret: triton was imported before the option was seen; "
                               "set TRITON_INTERPRET=1 in the environment instead")
        os.environ["TRITON_INTERPRET"] = "1"
