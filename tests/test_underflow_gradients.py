"""SPEC "Zero versus underflow": d = (p - y) p^(t2 - t1) is zero only where p is exactly zero.

A confidently wrong row (the target logit far below the maximum) has a target probability that
underflows the floating-point range, yet its exact gradient is far from zero: -y_target at t1 = t2
(cross-entropy's -1 / +1), and larger still at t2 < t1. Every backend is checked against the
float64 log-space reference (tests/reference.py) on rows that merely underflow (gaps 90-250 in
float32, 800 in float64) next to rows with classes that are truly outside the finite support
(t2 < 1) or at a -inf logit, where the gradient must be exactly 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference as ref
from bitempered import jax as bj
from bitempered import torch as bt
from bitempered.kernels import launch_config
from interpreter_warnings import EXPECTED
from test_jax_triton import triton_backend  # noqa: F401  (fixture: real jax-triton or the interpreter stand-in)

pytestmark = EXPECTED  # the interpreter's expected warnings (tests/interpreter_warnings.py)

# (t1, t2): equal temperatures at and away from 1, t2 < t1 and t2 > t1 near 1 (where p still
# underflows: heavy tails at t2 > 1 decay like a power, not exponentially).
TEMPERATURES = [(1.0, 1.0), (0.999, 0.999), (1.2, 1.2), (1.0, 0.999), (1.2, 0.999), (0.999, 1.0)]
GAPS_FLOAT32 = [90.0, 110.0, 250.0]
GAP_FLOAT64 = 800.0
NUM_CLASSES = 7
TARGETS = np.array([0, 3, 0, 0])


def _rows(gap: float, t2: float, seed: int = 0) -> np.ndarray:
    """Four rows of C = 7 logits:
    0: confidently wrong (target class 0, class 1 is `gap` above it);
    1: an ordinary row (nothing underflows);
    2: exact zeros only: a -inf logit, and for t2 < 1 a class outside the finite support;
    3: confidently wrong next to exact zeros.
    """
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((4, NUM_CLASSES))
    outside = 2.0 / (1.0 - t2) if t2 < 1.0 else np.inf  # below the support boundary -1/(1-t2)
    a[0, 1] = gap
    a[2, 3] = -np.inf
    a[2, 5] = -outside
    a[3, 1] = gap
    a[3, 2] = -np.inf
    a[3, 5] = gap - outside
    return a


def _truth(a: np.ndarray, t1: float, t2: float, smoothing: float = 0.0):
    dense, _ = ref.one_hot(TARGETS, NUM_CLASSES)
    return ref.loss(a, dense, t1, t2, smoothing), ref.loss_grad(a, dense, t1, t2, smoothing)


def _check(loss, grad, a, t1, t2, smoothing=0.0, rtol=2e-4):
    truth_loss, truth_grad = _truth(a, t1, t2, smoothing)
    loss, grad = np.asarray(loss, np.float64), np.asarray(grad, np.float64)
    assert np.isfinite(grad).all()
    # the loss is finite except where smoothing puts label mass on an exact zero (SPEC: +inf)
    np.testing.assert_array_equal(np.isinf(loss), np.isinf(truth_loss))
    # the confidently wrong rows' target gradient is far from 0 (the bug gave exactly 0)
    assert np.abs(truth_grad[[0, 3], 0]).min() > 0.3
    finite = np.isfinite(truth_loss)
    np.testing.assert_allclose(loss[finite], truth_loss[finite], rtol=rtol,
                               atol=1e-6 * max(1.0, np.abs(truth_loss[finite]).max()))
    np.testing.assert_allclose(grad, truth_grad, rtol=rtol, atol=rtol * np.abs(truth_grad).max())
    # exact zeros: a -inf logit (and, for t2 < 1, a class outside the support) has gradient 0
    exact_zero = np.isneginf(a) | (ref.log_tempered_softmax(a, t2) == -np.inf)
    assert exact_zero[2].any() and exact_zero[3].any()
    np.testing.assert_array_equal(grad[exact_zero], 0.0)


def test_reference_knows_underflow_from_zero():
    """The oracle itself: at t1 = t2 the underflowed target gets -1 and the maximum +1."""
    a = _rows(GAP_FLOAT64, 1.0)
    _, grad = _truth(a, 1.0, 1.0)
    assert np.exp(ref.log_tempered_softmax(a, 1.0))[0, 0] == 0.0  # p underflows float64 ...
    np.testing.assert_allclose(grad[0, [0, 1]], [-1.0, 1.0], rtol=1e-12)  # ... d does not


def _torch_loss_and_grad(a, dtype, t1, t2, backend, smoothing=0.0, dense=False):
    logits = torch.tensor(a, dtype=dtype, requires_grad=True)
    labels = torch.tensor(TARGETS)
    if dense:
        labels = torch.nn.functional.one_hot(labels, NUM_CLASSES).to(dtype)
    loss = bt.bi_tempered_logistic_loss(logits, labels, t1, t2, label_smoothing=smoothing,
                                        reduction="none", backend=backend)
    loss.backward(torch.ones_like(loss))
    return loss.detach().double().numpy(), logits.grad.double().numpy()


@pytest.mark.parametrize("t1,t2", TEMPERATURES)
@pytest.mark.parametrize("gap", GAPS_FLOAT32)
def test_torch_native_float32(gap, t1, t2):
    a = _rows(gap, t2).astype(np.float32).astype(np.float64)
    loss, grad = _torch_loss_and_grad(a, torch.float32, t1, t2, "torch")
    _check(loss, grad, a, t1, t2)


@pytest.mark.parametrize("t1,t2", TEMPERATURES)
@pytest.mark.parametrize("smoothing,dense", [(0.0, False), (0.1, False), (0.1, True)])
def test_torch_native_float64(t1, t2, smoothing, dense):
    a = _rows(GAP_FLOAT64, t2)
    loss, grad = _torch_loss_and_grad(a, torch.float64, t1, t2, "torch", smoothing, dense)
    _check(loss, grad, a, t1, t2, smoothing, rtol=1e-9)


def test_torch_issue_repro_matches_cross_entropy():
    """The reported case: C = 5, t1 = t2 = 1, target 0, logit 110 on class 1."""
    x = torch.zeros(1, 5)
    x[0, 1] = 110.0
    x.requires_grad_(True)
    bt.bi_tempered_logistic_loss(x, torch.tensor([0]), 1.0, 1.0, backend="torch").backward()
    y = x.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(y, torch.tensor([0])).backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert x.grad[0, 0] == -1.0


@pytest.mark.parametrize("t1,t2", TEMPERATURES)
@pytest.mark.parametrize("path", ["on_chip", "chunked"])
@pytest.mark.parametrize("dense", [False, True])
def test_triton_kernel(t1, t2, path, dense):
    a = _rows(110.0, t2).astype(np.float32).astype(np.float64)
    limit = 4 if path == "chunked" else launch_config.on_chip_limit(4)
    with launch_config.override_on_chip_limit(limit):
        from bitempered.bindings.torch import launchers as torch_triton

        assert torch_triton.loss_path(NUM_CLASSES, torch.float32) == path
        loss, grad = _torch_loss_and_grad(a, torch.float32, t1, t2, "triton", 0.1, dense)
    _check(loss, grad, a, t1, t2, 0.1)


@pytest.mark.parametrize("t1,t2", TEMPERATURES)
def test_jax_xla_float32(t1, t2):
    a = _rows(110.0, t2).astype(np.float32)
    value, vjp = jax.vjp(lambda x: bj.bi_tempered_logistic_loss(x, TARGETS, t1, t2, backend="xla"), a)
    _check(value, vjp(jnp.ones(4, jnp.float32))[0], a.astype(np.float64), t1, t2)


@pytest.mark.parametrize("t1,t2", TEMPERATURES)
def test_jax_xla_float64_traced_temperatures(t1, t2):
    a = _rows(GAP_FLOAT64, t2)
    with jax.enable_x64(True):
        fn = jax.jit(lambda x, t1, t2: bj.bi_tempered_logistic_loss(x, TARGETS, t1, t2, 0.1, backend="xla"))
        value, vjp = jax.vjp(lambda x: fn(x, t1, t2), jnp.asarray(a))
        grad = vjp(jnp.ones(4, jnp.float64))[0]
        assert grad.dtype == jnp.float64
    _check(value, grad, a, t1, t2, 0.1, rtol=1e-9)


def test_jax_triton(triton_backend):
    for t1, t2 in [(1.0, 1.0), (1.0, 0.999), (0.999, 1.0)]:
        a = _rows(110.0, t2).astype(np.float32)
        value, vjp = jax.vjp(lambda x: bj.bi_tempered_logistic_loss(x, TARGETS, t1, t2, backend="triton"), a)
        _check(value, vjp(jnp.ones(4, jnp.float32))[0], a.astype(np.float64), t1, t2)


# ------------------------------------------------------------------------------------------
# Binary variants: logits [0, x], labels [1 - y, y]; a confidently wrong x = +gap with y = 0.
# ------------------------------------------------------------------------------------------

BINARY_X = np.array([110.0, -250.0, 1.5, 90.0])
BINARY_Y = np.array([0.0, 1.0, 1.0, 0.0])


def _binary_truth(t1, t2):
    rows = np.stack([np.zeros_like(BINARY_X), BINARY_X], axis=-1)
    labels = np.stack([1.0 - BINARY_Y, BINARY_Y], axis=-1)
    return ref.loss(rows, labels, t1, t2), ref.loss_grad(rows, labels, t1, t2)[:, 1]


@pytest.mark.parametrize("t1,t2", [(1.0, 1.0), (1.0, 0.999), (0.999, 1.0), (1.2, 1.2)])
@pytest.mark.parametrize("backend", ["torch", "triton", "xla"])
def test_binary_loss(backend, t1, t2):
    truth_loss, truth_grad = _binary_truth(t1, t2)
    if backend == "xla":
        fn = lambda x: bj.bi_tempered_binary_logistic_loss(x, BINARY_Y.astype(np.float32), t1, t2, backend="xla")
        value, vjp = jax.vjp(fn, BINARY_X.astype(np.float32))
        loss, grad = np.asarray(value), np.asarray(vjp(jnp.ones(4, jnp.float32))[0])
    else:
        x = torch.tensor(BINARY_X, dtype=torch.float32, requires_grad=True)
        value = bt.bi_tempered_binary_logistic_loss(x, torch.tensor(BINARY_Y, dtype=torch.float32), t1, t2,
                                                    reduction="none", backend=backend)
        value.sum().backward()
        loss, grad = value.detach().numpy(), x.grad.numpy()
    assert np.abs(truth_grad[[0, 1, 3]]).min() > 0.3
    np.testing.assert_allclose(loss, truth_loss, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(grad, truth_grad, rtol=2e-4, atol=1e-6)


# t2 < t1 by more than a rounding: p^(t2 - t1) of an underflowed p overflows (here exp(90) in
# float32) where the true p^(1 + t2 - t1) is tiny; a product p x p^(t2 - t1) would give 0 x inf = NaN
CONFIDENT = np.array([[180.0, 0.0, 0.0, -3.0], [0.0, 95.0, 1.0, 0.0]])
CONFIDENT_TARGETS = np.array([0, 1])


@pytest.mark.parametrize("t1, t2", [(1.5, 1.0), (1.9, 0.5), (1.2, 0.7)])
def test_confident_rows_at_t2_below_t1_have_finite_gradients(t1, t2, triton_backend):
    want = ref.loss_grad(CONFIDENT, ref.one_hot(CONFIDENT_TARGETS, 4)[0], t1, t2)
    assert np.isfinite(want).all()
    labels = torch.from_numpy(CONFIDENT_TARGETS)
    for backend in ("torch", "triton"):
        x = torch.tensor(CONFIDENT, dtype=torch.float32, requires_grad=True)
        bt.bi_tempered_logistic_loss(x, labels, t1, t2, reduction="sum", backend=backend).backward()
        np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-4, atol=1e-30, err_msg=backend)
    for backend in ("xla", "triton"):
        grad = jax.grad(lambda a: bj.bi_tempered_logistic_loss(a, jnp.asarray(CONFIDENT_TARGETS), t1, t2,
                                                               backend=backend).sum())(
            jnp.asarray(CONFIDENT, jnp.float32))
        np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-30, err_msg=backend)
