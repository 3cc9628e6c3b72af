"""Threads calling backend="triton" under Triton's interpreter (not thread-safe by itself): the
launchers run one launch at a time there (``bindings/common/interpreter.py``), so every thread gets
the single-threaded results and no InterpreterError. Tiny shapes: the interpreter is slow."""

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bitempered import torch as bt
from bitempered.bindings.common import interpreter
from interpreter_warnings import EXPECTED as EXPECTED_INTERPRETER_WARNINGS

pytestmark = [
    *EXPECTED_INTERPRETER_WARNINGS,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton's interpreter (CPU)"),
]

THREADS, CALLS = 12, 3


def _work(seed: int):
    """A loss with its gradient (one loss launch) and a softmax forward and backward (two)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, generator=g).requires_grad_()
    labels = torch.randint(0, 5, (3,), generator=g)
    loss = bt.bi_tempered_logistic_loss(logits, labels, 0.8, 1.2, backend="triton")
    loss.backward()
    x = torch.randn(2, 4, generator=g).requires_grad_()
    probs = bt.tempered_softmax(x, 1.3, backend="triton")
    probs.square().sum().backward()
    return loss.detach(), logits.grad, probs.detach(), x.grad


def test_threads_get_the_single_threaded_results():
    seeds = [thread * CALLS + call for thread in range(THREADS) for call in range(CALLS)]
    want = [_work(seed) for seed in seeds]
    with ThreadPoolExecutor(THREADS) as pool:
        got = list(pool.map(_work, seeds))  # re-raises a thread's error here
    for seed, expected, result in zip(seeds, want, got):
        for e, r in zip(expected, result):
            assert torch.equal(e, r), seed


def test_the_lock_is_taken_only_under_the_interpreter(monkeypatch):
    assert interpreter.launch_scope() is interpreter.launch_scope()  # one process-wide lock
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert isinstance(interpreter.launch_scope(), contextlib.nullcontext)  # compiled launches: no lock
