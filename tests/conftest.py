"""Test set-up. Triton's interpreter must be switched on before any @triton.jit function is defined,
so it is set here, at import time, whenever no CUDA device is present."""

import os


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The slow tooling tests: the perf harness, the GPU session script, packaging (builds a wheel),
# the README's text and commands, the demo's CLI. `pytest -m "not tooling"` runs the core suite
# (the math, the bindings, the kernels) in a few minutes; CI runs everything.
TOOLING_FILES = {"test_perf.py", "test_gpu_session.py", "test_packaging.py", "test_readme_install.py",
                 "test_readme_snippets.py", "test_sdist.py",
                 "test_demo.py"}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.path.name in TOOLING_FILES:
            item.add_marker(pytest.mark.tooling)
