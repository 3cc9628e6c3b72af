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
