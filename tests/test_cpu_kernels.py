"""The CPU C kernel (kernels/cross_entropy_cpu.c, built by bindings/torch/native/cpu_kernel.py) against the
float64 reference, through its ctypes entry point and through the public API, and every way it
falls back to the eager torch path."""

import os
import platform
import shutil
import sys

import numpy as np
import pytest
import torch

import reference as ref
from cross_entropy_rows import logits as _logits
from bitempered import torch as bt
from bitempered.bindings.torch.native import cpu_kernel as cpu_kernels
from bitempered.bindings.torch.native import math as native
from bitempered.bindings.torch.native import loss as native_loss

BUILDABLE = (sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")
             and shutil.which((os.environ.get("CC") or "cc").split()[0]) is not None)
TOL = 2e-5


def test_built_and_used_where_a_compiler_is():
    if not BUILDABLE:
        pytest.skip(f"no C compiler or not x86-64 Linux: {cpu_kernels.status()}")
    assert cpu_kernels.status().startswith("in use"), cpu_kernels.status()


@pytest.fixture
def kernel():
    function = cpu_kernels.dense_cross_entropy()
    if function is None:
        pytest.skip(cpu_kernels.status())
    return function


def _run(function, a, y, smoothing=0.0, scale=1.0, threads=1, need_grad=True):
    """The C entry point on torch views (row strides as they are): (loss [N], grad or None, #bad)."""
    n, c = a.shape
    on, off = native.smoothing_coefficients(smoothing, c)
    loss = torch.empty(n)
    grad = torch.full((n, c), 7.0) if need_grad else None
    bad = function(a.data_ptr(), a.stride(0), y.data_ptr(), y.stride(0), None if grad is None else grad.data_ptr(),
                   0 if grad is None else grad.stride(0), loss.data_ptr(), n, c, on, off, scale, threads)
    return loss, grad, bad


def _soft_labels(shape, seed):
    y = np.random.default_rng(seed).random(shape) ** 6
    y[:, ::3] = 0.0  # exact zeros (0 log 0 = 0)
    y /= np.maximum(y.sum(-1, keepdims=True), 1e-30)
    return y


SHAPES = [(1, 1), (3, 2), (5, 7), (17, 1000), (3, 4097), (40, 1500)]  # the last: threaded (>= 32768 elements)


@pytest.mark.parametrize("n,c,smoothing", [(n, c, s) for n, c in SHAPES for s in (0.0, 0.1) if c > 1 or s == 0.0])
@pytest.mark.parametrize("threads", [1, 2])
def test_random_rows_against_float64(kernel, n, c, smoothing, threads):
    rng = np.random.default_rng(n * c)
    a64 = rng.standard_normal((n, c)) * 4.0 + rng.standard_normal((n, 1)) * 100.0  # large row offsets
    y64 = _soft_labels((n, c), n + c)
    a, y = torch.tensor(a64, dtype=torch.float32), torch.tensor(y64, dtype=torch.float32)
    a64, y64 = a.double().numpy(), y.double().numpy()  # what the kernel saw
    loss, grad, bad = _run(kernel, a, y, smoothing, scale=0.375, threads=threads)
    assert bad == 0
    np.testing.assert_allclose(loss.numpy(), ref.loss(a64, y64, 1.0, 1.0, smoothing), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grad.numpy(), 0.375 * ref.loss_grad(a64, y64, 1.0, 1.0, smoothing), rtol=TOL, atol=1e-7)
    no_grad, _, _ = _run(kernel, a, y, smoothing, threads=threads, need_grad=False)
    assert torch.equal(no_grad, loss)


def test_same_bits_with_any_thread_count(kernel):
    """Each row is reduced by one thread in a fixed order: results do not depend on the thread count."""
    a, y = torch.randn(64, 999) * 3, torch.tensor(_soft_labels((64, 999), 9), dtype=torch.float32)
    one, two, eight = (_run(kernel, a, y, 0.05, 0.5, threads) for threads in (1, 2, 8))
    for got in (two, eight):
        assert torch.equal(got[0], one[0]) and torch.equal(got[1], one[1])


def test_extreme_rows(kernel):
    """Rows it gets by itself (large offsets, an underflowing target, a 0 label at a -inf logit, a
    subnormal label) and rows it must hand back non-finite (NaN, +inf, label mass on a -inf logit,
    all -inf), none of them disturbing the others."""
    a64 = _logits()  # see tests/cross_entropy_rows.py
    a64 = np.vstack([a64, np.full((1, a64.shape[1]), -np.inf)])  # row 12: every logit -inf
    y64 = _soft_labels(a64.shape, 3)
    y64[:, 1] = 0.2           # mass on row 7's -inf logit and on the underflowing targets of rows 8, 11
    y64[0, 2] = 1e-39         # a subnormal label
    y64[10, 6] = 0.0          # no mass on row 10's -inf logit: exact by itself
    a, y = torch.tensor(a64, dtype=torch.float32), torch.tensor(y64, dtype=torch.float32)
    loss, grad, bad = _run(kernel, a, y)
    assert bad == 0
    handed_back = [4, 5, 6, 7, 12]
    assert not torch.isfinite(loss[handed_back]).any()
    kept = [r for r in range(len(a64)) if r not in handed_back]
    a_in, y_in = a.double().numpy()[kept], y.double().numpy()[kept]
    np.testing.assert_allclose(loss[kept].numpy(), ref.loss(a_in, y_in, 1.0, 1.0), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grad[kept].numpy(), ref.loss_grad(a_in, y_in, 1.0, 1.0), rtol=TOL, atol=1e-7)


def test_row_strides_and_views(kernel):
    """Logits, labels and gradient as row-strided views of wider buffers; rows past n untouched."""
    wide_a, wide_y = torch.randn(9, 50), torch.rand(9, 64)
    a, y = wide_a[:6, 3:40], wide_y[:6, 10:47]
    n, c = a.shape
    grad = torch.full((8, 45), 7.0)
    loss = torch.empty(n)
    bad = kernel(a.data_ptr(), a.stride(0), y.data_ptr(), y.stride(0), grad.data_ptr(), grad.stride(0),
                 loss.data_ptr(), n, c, 1.0, 0.0, 1.0, 2)
    assert bad == 0
    a64, y64 = a.double().numpy(), y.double().numpy()
    np.testing.assert_allclose(loss.numpy(), ref.loss(a64, y64, 1.0, 1.0), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grad[:n, :c].numpy(), ref.loss_grad(a64, y64, 1.0, 1.0), rtol=TOL, atol=1e-7)
    assert (grad[:n, c:] == 7.0).all() and (grad[n:] == 7.0).all()


@pytest.mark.parametrize("values,count", [([-0.25], 1), ([1.5, 2.0], 2), ([float("nan")], 1),
                                          ([-1e-40, 1.0 + 1e-6, float("inf")], 3), ([-0.0, 1.0, 0.0], 0)])
def test_labels_outside_the_unit_interval_are_counted(kernel, values, count):
    y = torch.full((4, 33), 1.0 / 33)
    y.view(-1)[torch.arange(len(values)) * 29 + 5] = torch.tensor(values)
    _, _, bad = _run(kernel, torch.randn(4, 33), y, smoothing=0.1)  # counted as given, not smoothed
    assert bad == count


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_public_api_same_as_the_eager_path(kernel, reduction, smoothing, monkeypatch):
    used = []
    fused = native_loss._fused_dense_cross_entropy
    monkeypatch.setattr(native_loss, "_fused_dense_cross_entropy",
                        lambda *args: used.append(1) or fused(*args))
    a = torch.randn(300, 257) * 3
    y = torch.tensor(_soft_labels((300, 257), 5), dtype=torch.float32)

    def loss_and_grad():
        leaf = a.clone().requires_grad_()
        loss = bt.bi_tempered_logistic_loss(leaf, y, 1.0, 1.0, label_smoothing=smoothing, reduction=reduction)
        loss.sum().backward()
        return loss.detach(), leaf.grad

    with_kernel = loss_and_grad()
    with cpu_kernels.switched_off():
        eager = loss_and_grad()
    assert len(used) == 2 and cpu_kernels.dense_cross_entropy() is not None
    for got, want in zip(with_kernel, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_labels_raise_through_the_api(kernel):
    y = torch.full((5, 40), 1.0 / 40)
    y[4, 7] = 1.25
    with pytest.raises(ValueError, match="labels") as fused:
        bt.bi_tempered_logistic_loss(torch.randn(5, 40, requires_grad=True), y, 1.0, 1.0)
    with cpu_kernels.switched_off(), pytest.raises(ValueError, match="labels") as eager:
        bt.bi_tempered_logistic_loss(torch.randn(5, 40, requires_grad=True), y, 1.0, 1.0)
    assert str(fused.value) == str(eager.value)


# ---- fallbacks: each leaves the eager path running ------------------------------------------

@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A process that has not loaded the kernel yet, with an empty cache directory."""
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("BITEMPERED_CACHE_DIR", str(tmp_path))
    return tmp_path


def _loss_still_computed():
    a, y = torch.randn(6, 30), torch.softmax(torch.randn(6, 30), -1)
    with cpu_kernels.switched_off():
        want = bt.bi_tempered_logistic_loss(a, y, 1.0, 1.0, reduction="none")
    torch.testing.assert_close(bt.bi_tempered_logistic_loss(a, y, 1.0, 1.0, reduction="none"), want, rtol=0, atol=0)


def test_no_compiler(fresh_state, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_state / "no-such-compiler"))
    assert cpu_kernels.dense_cross_entropy() is None
    assert "no C compiler" in cpu_kernels.status()
    _loss_still_computed()


def _fake_compiler(directory, version):
    """A "compiler" that prints ``version`` for --version and fails to compile anything."""
    script = directory / "fake-cc"
    script.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "{version}"; exit 0; fi\n'
                      'echo "fake-cc: cannot compile" >&2; exit 1\n')
    script.chmod(0o755)
    return str(script)


def test_failed_build(fresh_state, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("CC", _fake_compiler(tmp_path_factory.mktemp("bin"), "gcc (fake) 12.2.0"))
    assert cpu_kernels.dense_cross_entropy() is None
    assert "cannot compile" in cpu_kernels.status() and not list(fresh_state.iterdir())  # no partial file left
    _loss_still_computed()


def test_only_gcc(fresh_state, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("CC", _fake_compiler(tmp_path_factory.mktemp("bin"), "clang version 17.0.6"))
    assert cpu_kernels.dense_cross_entropy() is None
    assert "GCC only" in cpu_kernels.status()


def test_failed_self_check(fresh_state, monkeypatch):
    if not BUILDABLE:
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu_kernels, "_self_check", lambda function: "row 0 loss 1.0 != 2.0")
    assert cpu_kernels.dense_cross_entropy() is None
    assert "self-check" in cpu_kernels.status()
    _loss_still_computed()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("BITEMPERED_CPU_KERNELS", "0")
    assert cpu_kernels.dense_cross_entropy() is None
    assert cpu_kernels.status() == "off: BITEMPERED_CPU_KERNELS=0"
    _loss_still_computed()


def test_built_once_then_loaded_from_the_cache(fresh_state, monkeypatch):
    if not BUILDABLE:
        pytest.skip("no C compiler")
    builds = []
    run = cpu_kernels.subprocess.run
    monkeypatch.setattr(cpu_kernels.subprocess, "run",
                        lambda command, **kw: (builds.append(command) if "-o" in command else None) or run(command, **kw))
    assert cpu_kernels.dense_cross_entropy() is not None
    monkeypatch.setattr(cpu_kernels, "_state", {})  # a new process
    assert cpu_kernels.dense_cross_entropy() is not None
    assert len(builds) == 1 and len(list(fresh_state.glob("cross_entropy_cpu-*.so"))) == 1


def test_read_only_cache_directory_falls_back(fresh_state, monkeypatch):
    if not BUILDABLE:
        pytest.skip("no C compiler")
    read_only, temporary = fresh_state / "read-only", fresh_state / "temporary"
    monkeypatch.setattr(cpu_kernels, "_cache_dirs", lambda: [read_only, temporary])
    compile_into = cpu_kernels._compile

    def refusing_the_first(compiler, directory, key):
        if directory == read_only:
            raise PermissionError(f"{read_only} is read-only")
        return compile_into(compiler, directory, key)

    monkeypatch.setattr(cpu_kernels, "_compile", refusing_the_first)
    assert cpu_kernels.dense_cross_entropy() is not None
    assert str(temporary) in cpu_kernels.status()
