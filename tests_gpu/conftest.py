"""Tests that need a CUDA GPU, run by ``scripts/gpu_check.sh`` (``python -m pytest -q
tests_gpu``). They live outside ``tests/`` so that a CPU-only CI never collects them; run
without a usable GPU they fail at once with one line, rather than skip.

The tiny offline models are those of ``tests/conftest.py``, loaded under another module name
(both files are called ``conftest``); its ``TRITON_INTERPRET=1`` is undone here, since these
tests run the compiled kernel.
"""
import importlib.util
import os

import pytest
import torch

_had_interpret = "TRITON_INTERPRET" in os.environ
_spec = importlib.util.spec_from_file_location(
    "distilkit_cpu_conftest", os.path.join(os.path.dirname(__file__), "..", "tests", "conftest.py"))
cpu_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_conftest)
if not _had_interpret:
    os.environ.pop("TRITON_INTERPRET", None)


def pytest_configure(config):
    if not torch.cuda.is_available():
        raise pytest.UsageError("tests_gpu need a CUDA GPU and a CUDA build of torch "
                                f"(torch {torch.__version__}, torch.cuda.is_available() is "
                                "False); run scripts/gpu_check.sh on a GPU machine")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise pytest.UsageError("tests_gpu measure the compiled Triton kernel: unset "
                                "TRITON_INTERPRET")
