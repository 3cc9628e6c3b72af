"""Triton's interpreter (``TRITON_INTERPRET=1``: kernels run as Python on CPU arrays) is not
thread-safe: it patches ``triton.language`` for the kernel it runs, so two threads launching at
once get intermittent ``InterpreterError``s. Every launcher runs its launches inside
``launch_scope()``: one process-wide lock while the interpreter is on, nothing at all otherwise
(compiled GPU launches stay concurrent and lock-free).
"""

from __future__ import annotations

import contextlib
import os
import threading

_LAUNCH_LOCK = threading.RLock()  # re-entrant: a nested launch scope never deadlocks its own thread


def interpreted() -> bool:
    """True when ``TRITON_INTERPRET`` switches Triton's interpreter on."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def launch_scope():
    """The context a kernel launch runs in: the interpreter's lock, or nothing on a GPU."""
    return _LAUNCH_LOCK if interpreted() else contextlib.nullcontext()
