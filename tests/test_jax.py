"""JAX API against the float64 NumPy reference: values, gradients, dtypes, labels, edge cases,
bad input, and the JAX transformations (jit, grad, vmap) with no retrace per temperature.

Every new shape/dtype/static setting compiles (about a second on CPU), so the tests share a few
shapes and sweep temperatures, which are traced operands and cost no compile.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from bitempered import jax as bj
from bitempered.bindings.jax.native import math as jax_native
from bitempered.bindings.jax.native import loss as jax_native_loss

T1S = [0.0, 0.5, 0.8, 1.0, 1.5]
T2S = [0.3, 0.8, 1.0, 1.2, 2.0, 4.0]
C = 7                      # classes: not a power of two
ROWS = (5, C)              # the shape used with integer labels
DENSE = (2, 3, C)          # the shape used with dense labels (two leading axes)

# Error allowed against the float64 reference, per input dtype. float16/bfloat16 inputs are compared
# with the reference of the same rounded inputs; probabilities and gradients come back rounded to
# the input dtype, losses are float32.
TOLERANCES = {
    jnp.float32: dict(rtol=1e-4, atol=2e-5),
    jnp.bfloat16: dict(rtol=1e-2, atol=1e-3),
    jnp.float16: dict(rtol=2e-3, atol=2e-4),
}
F32 = TOLERANCES[jnp.float32]


def rng(seed):
    return np.random.default_rng(seed)


def logits_for(t2, shape, seed):
    """Normal logits, narrower for t2 < 1 so that most classes keep p > 0."""
    return (rng(seed).standard_normal(shape) * (0.3 if t2 < 1 else 2.0)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("num_iters", "ignore_index"))
def loss_and_grad(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None, ignore_index=-100):
    """Per-row losses and the gradient of their sum: one compile per shape/dtype/static setting."""
    losses, vjp = jax.vjp(lambda a: bj.bi_tempered_logistic_loss(
        a, labels, t1, t2, label_smoothing=label_smoothing, num_iters=num_iters, ignore_index=ignore_index), logits)
    return losses, vjp(jnp.ones_like(losses))[0]


def reference_loss_and_grad(logits, labels, t1, t2, label_smoothing=0.0, ignore_index=-100):
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    if np.issubdtype(labels.dtype, np.integer):
        y, kept = ref.one_hot(labels, logits.shape[-1], ignore_index)
        loss = ref.loss(logits, y, t1, t2, label_smoothing)
        grad = ref.loss_grad(logits, y, t1, t2, label_smoothing)
        return np.where(kept, loss, 0.0), np.where(kept[..., None], grad, 0.0)
    y = np.asarray(labels, np.float64)
    return ref.loss(logits, y, t1, t2, label_smoothing), ref.loss_grad(logits, y, t1, t2, label_smoothing)


# ------------------------------------------------------------------------------------------------
# Tempered softmax / sigmoid
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,leading", [
    (jnp.float32, ()), (jnp.float32, (5,)), (jnp.float32, (2, 3)), (jnp.bfloat16, (2, 3)), (jnp.float16, (2, 3))])
def test_tempered_softmax_matches_reference(dtype, leading):
    a = jnp.asarray(rng(1).standard_normal(leading + (C,)) * 2.0, dtype)
    a_rounded = np.asarray(a.astype(jnp.float32), np.float64)
    for t in [0.1, 0.5, 0.99, 1.0, 1.01, 1.5, 4.0]:
        p = bj.tempered_softmax(a, t)
        assert p.dtype == dtype and p.shape == a.shape
        np.testing.assert_allclose(np.asarray(p, np.float64), ref.tempered_softmax(a_rounded, t), **TOLERANCES[dtype])
        if dtype == jnp.float32:
            np.testing.assert_allclose(np.asarray(p, np.float64).sum(-1), 1.0, atol=5e-6)


@pytest.mark.parametrize("num_classes", [1, 1000])
def test_rows_sum_to_one_including_one_class(num_classes):
    a = jnp.asarray(rng(2).standard_normal((4, num_classes)) * 10.0, jnp.float32)
    for t in [0.1, 0.8, 1.0, 1.3, 3.0]:
        p = np.asarray(bj.tempered_softmax(a, t), np.float64)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(p, ref.tempered_softmax(np.asarray(a, np.float64), t), rtol=1e-4, atol=1e-6)


def test_converged_solver_mirrors_torch_native():
    torch = pytest.importorskip("torch")
    from bitempered.bindings.torch.native import math as torch_native
    a = rng(3).standard_normal((64, 300)) * 3.0
    solve = jax.jit(lambda a, t: jax_native.solve_converged(jax_native.shift_by_max(a), t))
    for t in [0.1, 0.5, 0.99, 1.0, 1.2, 2.0]:
        log_p, passes = solve(jnp.asarray(a, jnp.float32), jnp.float32(t))
        log_p_t, passes_t = torch_native.solve_converged(
            torch_native.shift_by_max(torch.tensor(a, dtype=torch.float32)), torch.tensor(t))
        np.testing.assert_allclose(np.exp(np.asarray(log_p)), np.exp(log_p_t.numpy()), atol=2e-6)
        assert abs(int(passes.max()) - int(passes_t.max())) <= 1
        assert int(passes.max()) <= 8  # kernels/README.md: worst 8 passes in float32


def test_tempered_sigmoid_matches_reference_and_its_gradient():
    x = jnp.asarray(rng(4).standard_normal((2, 3)) * 3.0, jnp.float32)
    for t in [0.5, 1.0, 2.0]:
        np.testing.assert_allclose(bj.tempered_sigmoid(x, t), ref.tempered_sigmoid(np.asarray(x, np.float64), t),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bj.tempered_sigmoid(x, 1.0), jax.nn.sigmoid(x), rtol=1e-6)
    grad = jax.grad(lambda x: bj.tempered_sigmoid(x, 1.0).sum())(x)
    np.testing.assert_allclose(grad, jax.nn.sigmoid(x) * jax.nn.sigmoid(-x), rtol=1e-5, atol=1e-7)


def test_tempered_softmax_vjp_matches_reference_jacobian():
    a = jnp.asarray(rng(5).standard_normal((3, 5)), jnp.float32)
    w = jnp.asarray(rng(6).standard_normal((3, 5)), jnp.float32)
    vjp = jax.jit(jax.grad(lambda a, t: (bj.tempered_softmax(a, t) * w).sum()))
    a64, w64, h = np.asarray(a, np.float64), np.asarray(w, np.float64), 1e-6
    for t in [0.5, 1.0, 1.7]:
        expected = np.zeros_like(a64)
        for j in range(5):
            step = np.zeros_like(a64)
            step[:, j] = h
            expected[:, j] = ((ref.tempered_softmax(a64 + step, t) - ref.tempered_softmax(a64 - step, t))
                              * w64).sum(-1) / (2 * h)
        np.testing.assert_allclose(vjp(a, t), expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Loss and gradient against the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("t1", T1S)
def test_loss_and_grad_dense_labels(t1, smoothing):
    labels = rng(7).random(DENSE).astype(np.float32)  # rows need not sum to 1
    for i, t2 in enumerate(T2S):
        a = logits_for(t2, DENSE, seed=10 + i)
        loss, grad = loss_and_grad(jnp.asarray(a), jnp.asarray(labels), t1, t2, smoothing)
        assert loss.shape == DENSE[:-1] and loss.dtype == jnp.float32 and grad.dtype == jnp.float32
        ref_loss, ref_grad = reference_loss_and_grad(a, labels, t1, t2, smoothing)
        np.testing.assert_allclose(loss, ref_loss, **F32, err_msg=f"t2={t2}")
        np.testing.assert_allclose(grad, ref_grad, **F32, err_msg=f"t2={t2}")


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("t1", T1S)
def test_loss_and_grad_integer_labels_with_ignore_index(t1, smoothing):
    indices = np.array([0, 6, -100, 3, 3], np.int32)
    for i, t2 in enumerate(T2S):
        a = logits_for(t2, ROWS, seed=20 + i)
        loss, grad = loss_and_grad(jnp.asarray(a), jnp.asarray(indices), t1, t2, smoothing)
        ref_loss, ref_grad = reference_loss_and_grad(a, indices, t1, t2, smoothing)
        np.testing.assert_allclose(loss, ref_loss, **F32, err_msg=f"t2={t2}")
        np.testing.assert_allclose(grad, ref_grad, **F32, err_msg=f"t2={t2}")
        assert loss[2] == 0.0 and not np.any(np.asarray(grad[2]))


@pytest.mark.parametrize("dtype,indices", [(np.int16, [1, -1, 0, 2, -1]), (np.uint8, [1, 255, 0, 6, 2])])
def test_custom_ignore_index_and_narrow_integer_labels(dtype, indices):
    a = logits_for(1.2, ROWS, seed=30)
    indices = np.array(indices, dtype)
    loss, grad = loss_and_grad(jnp.asarray(a), jnp.asarray(indices), 0.7, 1.2, ignore_index=int(indices[1]))
    ref_loss, ref_grad = reference_loss_and_grad(a, indices.astype(np.int64), 0.7, 1.2, 0.0, int(indices[1]))
    np.testing.assert_allclose(loss, ref_loss, **F32)
    np.testing.assert_allclose(grad, ref_grad, **F32)
    assert loss[1] == 0.0


@pytest.mark.parametrize("dtype,labels_kind", [(jnp.bfloat16, "dense"), (jnp.float16, "indices")])
def test_low_precision_logits_compute_in_float32(dtype, labels_kind):
    a = jnp.asarray(rng(31).standard_normal(ROWS) * 2.0, dtype)
    if labels_kind == "dense":
        labels = jnp.asarray(rng(32).dirichlet(np.ones(C), ROWS[0]), dtype)
        labels_ref = np.asarray(labels.astype(jnp.float32))
    else:
        labels = labels_ref = np.array([0, 1, 2, 3, 6], np.int32)
    a_rounded = np.asarray(a.astype(jnp.float32), np.float64)
    for t1, t2 in [(0.5, 0.8), (1.0, 1.0), (0.8, 2.0)]:
        loss, grad = loss_and_grad(a, jnp.asarray(labels), t1, t2)
        assert loss.dtype == jnp.float32 and grad.dtype == dtype
        ref_loss, ref_grad = reference_loss_and_grad(a_rounded, labels_ref, t1, t2)
        np.testing.assert_allclose(loss, ref_loss, **F32)  # float32 compute of the rounded inputs
        np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, **TOLERANCES[dtype])


def test_float64_under_x64():
    with jax.enable_x64(True):
        indices = jnp.asarray(rng(34).integers(0, C, ROWS[:1]))
        for i, (t1, t2) in enumerate([(0.5, 0.3), (1.0, 1.0), (0.8, 1.5), (1.5, 4.0)]):
            a = jnp.asarray(logits_for(t2, ROWS, seed=33 + i), jnp.float64)
            loss, grad = loss_and_grad(a, indices, t1, t2, 0.05)
            assert loss.dtype == jnp.float64 and grad.dtype == jnp.float64
            ref_loss, ref_grad = reference_loss_and_grad(a, indices, t1, t2, 0.05)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-11, atol=1e-13)
            np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-12)
            p = bj.tempered_softmax(a, t2)
            assert p.dtype == jnp.float64
            np.testing.assert_allclose(p, ref.tempered_softmax(np.asarray(a), t2), rtol=1e-12, atol=1e-15)


def test_t1_equal_t2_equal_1_is_kl_divergence():
    a = jnp.asarray(rng(35).standard_normal(DENSE), jnp.float32)
    y = jnp.asarray(rng(36).dirichlet(np.ones(C), DENSE[:-1]), jnp.float32)
    loss, grad = loss_and_grad(a, y, 1.0, 1.0)
    np.testing.assert_allclose(loss, jnp.sum(y * (jnp.log(y) - jax.nn.log_softmax(a)), -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, jax.nn.softmax(a) - y, atol=1e-6)


def test_loss_is_continuous_across_t_equal_1():
    a = jnp.asarray(rng(37).standard_normal(ROWS), jnp.float32)
    idx = jnp.asarray([0, 1, 2, 3, 4], jnp.int32)
    at_one, grad_at_one = loss_and_grad(a, idx, 1.0, 1.0)
    for eps in [1e-3, 1e-5]:
        for t1, t2 in [(1 + eps, 1 + eps), (1 - eps, 1 - eps), (1 - eps, 1 + eps)]:
            loss, grad = loss_and_grad(a, idx, t1, t2)
            np.testing.assert_allclose(loss, at_one, atol=10 * eps)
            np.testing.assert_allclose(grad, grad_at_one, atol=10 * eps)


# ------------------------------------------------------------------------------------------------
# Edge cases: support, infinities, NaN, out-of-range indices, empty batch, binary
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t1,t2", [(1.5, 0.5), (1.0, 0.3), (0.5, 0.5), (0.0, 0.8)])
def test_zero_probabilities_give_finite_gradient_and_limit_loss(t1, t2):
    """t2 < 1 with classes outside the support (p = 0); t2 < 1 < t1 is where 0 * inf lurks."""
    a = np.zeros(ROWS, np.float32)
    a[0] = [5.0, 0.0, -10.0, 4.5, 4.9, -3.0, 1.0]
    a[1] = [0.0, -8.0, -9.0, 0.1, 0.2, -20.0, 0.0]
    a[2:] = rng(38).standard_normal((3, C)) * 4.0
    indices = np.array([0, 1, 2, 3, 4], np.int32)  # row 1's target has p = 0
    loss, grad = loss_and_grad(jnp.asarray(a), jnp.asarray(indices), t1, t2, 0.1)
    ref_loss, ref_grad = reference_loss_and_grad(a, indices, t1, t2, 0.1)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, ref_grad, **F32)
    np.testing.assert_allclose(loss, ref_loss, **F32)  # +inf where t1 >= 1 and some p = 0
    assert np.isinf(loss[1]) == (t1 >= 1)


def test_nan_row_is_isolated_and_infinities_follow_limits():
    clean = rng(39).standard_normal(ROWS).astype(np.float32)
    clean[3, [0, 5]] = -np.inf                      # classes with p = 0
    a = clean.copy()
    a[1, 3] = np.nan
    a[2, 4] = np.inf                               # p = one-hot at class 4
    indices = jnp.asarray([0, 1, 4, 2, 6], jnp.int32)
    others = np.array([0, 3, 4])
    for t1, t2 in [(0.5, 0.8), (0.8, 1.2), (1.0, 1.0)]:
        for num_iters in [None, 5]:
            loss, grad = loss_and_grad(jnp.asarray(a), indices, t1, t2, num_iters=num_iters)
            loss_c, grad_c = loss_and_grad(jnp.asarray(clean), indices, t1, t2, num_iters=num_iters)
            assert np.isnan(loss[1]) and np.all(np.isnan(grad[1]))
            assert loss[2] == 0 and not np.any(np.asarray(grad[2]))  # label 4 = the +inf class
            np.testing.assert_allclose(loss[others], loss_c[others], rtol=1e-6)
            np.testing.assert_allclose(grad[others], grad_c[others], rtol=1e-6, atol=1e-8)
            assert np.all(np.isfinite(grad_c))
            if num_iters is None:
                ref_loss, ref_grad = reference_loss_and_grad(clean[others], np.asarray(indices)[others], t1, t2)
                np.testing.assert_allclose(loss[others], ref_loss, **F32)
                np.testing.assert_allclose(grad[others], ref_grad, **F32)
        p = bj.tempered_softmax(jnp.asarray(a), t2)
        np.testing.assert_array_equal(p[2], np.eye(C)[4])
        assert p[3, 0] == 0 and p[3, 5] == 0 and np.all(np.isnan(p[1]))


def test_out_of_range_index_raises_when_concrete_and_gives_nan_when_traced():
    a = jnp.asarray(rng(40).standard_normal(ROWS), jnp.float32)
    bad = jnp.asarray([0, C, -3, 2, -100], jnp.int32)
    with pytest.raises(ValueError, match="labels"):
        bj.bi_tempered_logistic_loss(a, bad, 0.5, 1.5)
    with pytest.raises(ValueError, match="labels"):
        bj.bi_tempered_logistic_loss(a, np.array([0, 1, 2, -1, 1]), 0.5, 1.5)
    loss, grad = loss_and_grad(a, bad, 0.5, 1.5)  # traced inside jit: no check, NaN rows
    good_loss, good_grad = loss_and_grad(a, jnp.asarray([0, 1, 1, 2, -100], jnp.int32), 0.5, 1.5)
    assert np.isnan(loss[1]) and np.isnan(loss[2]) and np.all(np.isnan(grad[1:3]))
    np.testing.assert_array_equal(loss[np.array([0, 3, 4])], good_loss[np.array([0, 3, 4])])
    np.testing.assert_array_equal(grad[np.array([0, 3, 4])], good_grad[np.array([0, 3, 4])])


def test_empty_batch():
    a = jnp.zeros((0, C), jnp.float32)
    assert bj.bi_tempered_logistic_loss(a, jnp.zeros((0,), jnp.int32), 0.5, 1.5).shape == (0,)
    assert bj.bi_tempered_logistic_loss(a, a, 0.5, 1.5).shape == (0,)
    assert bj.bi_tempered_logistic_loss(jnp.zeros((2, 0, 3)), jnp.zeros((2, 0, 3)), 0.5, 1.5).shape == (2, 0)
    grad = jax.grad(lambda a: bj.bi_tempered_logistic_loss(a, jnp.zeros((0,), jnp.int32), 0.5, 1.5).sum())(a)
    assert grad.shape == (0, C)
    assert bj.tempered_softmax(a.astype(jnp.bfloat16), 1.5).dtype == jnp.bfloat16
    assert bj.tempered_softmax(a, 1.5).shape == (0, C)
    assert bj.tempered_sigmoid(jnp.zeros((0,)), 1.5).shape == (0,)
    assert bj.bi_tempered_binary_logistic_loss(jnp.zeros((0,)), jnp.zeros((0,)), 0.5, 1.5).shape == (0,)


@jax.jit
def binary_loss_and_grad(x, y, t1, t2, label_smoothing):
    losses, vjp = jax.vjp(lambda x: bj.bi_tempered_binary_logistic_loss(x, y, t1, t2, label_smoothing), x)
    return losses, vjp(jnp.ones_like(losses))[0]


@pytest.mark.parametrize("shape", [(), (2, 3)])
def test_binary_loss_matches_reference(shape):
    x = rng(41).standard_normal(shape).astype(np.float32) * 3.0
    y = rng(42).random(shape).astype(np.float32)
    for t1, t2, s in [(0.5, 1.5, 0.0), (1.0, 1.0, 0.1), (0.8, 0.6, 0.0)]:
        loss, grad = binary_loss_and_grad(jnp.asarray(x), jnp.asarray(y), t1, t2, s)
        assert loss.shape == shape and loss.dtype == jnp.float32
        np.testing.assert_allclose(loss, ref.binary_loss(x, y, t1, t2, s), **F32)
        two = np.stack([np.zeros_like(x), x], -1).astype(np.float64)
        labels = np.stack([1 - y, y], -1).astype(np.float64)
        np.testing.assert_allclose(grad, ref.loss_grad(two, labels, t1, t2, s)[..., 1], **F32)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

A = jnp.asarray(rng(43).standard_normal((4, 5)), jnp.float32)
IDX = jnp.asarray([0, 1, 2, 3])


def _loss(**overrides):
    args = dict(logits=A, labels=IDX, t1=0.8, t2=1.2)
    args.update(overrides)
    return bj.bi_tempered_logistic_loss(**args)


@pytest.mark.parametrize("overrides,error,name", [
    (dict(t1=-0.1), ValueError, "t1"),
    (dict(t1=2.0), ValueError, "t1"),
    (dict(t1=np.float32(2.5)), ValueError, "t1"),
    (dict(t1=np.array(2.5)), ValueError, "t1"),
    (dict(t1=jnp.array(2.5)), ValueError, "t1"),
    (dict(t2=0.0), ValueError, "t2"),
    (dict(t2=float("nan")), ValueError, "t2"),
    (dict(t2=jnp.array(-1.0)), ValueError, "t2"),
    (dict(t2="1.2"), TypeError, "t2"),
    (dict(t2=None), TypeError, "t2"),
    (dict(t2=True), TypeError, "t2"),
    (dict(t2=jnp.array([1.1, 1.2])), ValueError, "t2"),  # neither a scalar nor one per row (4)
    (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=jnp.array(1.5)), ValueError, "label_smoothing"),
    (dict(num_iters=0), ValueError, "num_iters"),
    (dict(num_iters=2.5), TypeError, "num_iters"),
    (dict(num_iters=True), TypeError, "num_iters"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(labels=jnp.asarray([0, 1, 2])), ValueError, "labels shape"),
    (dict(labels=jnp.ones((4, 6))), ValueError, "labels shape"),
    (dict(labels=jnp.asarray([0, 1, 2, 5])), ValueError, "labels"),
    (dict(labels=jnp.ones(4, dtype=bool)), TypeError, "labels"),
    (dict(logits=jnp.ones((4, 5), jnp.int32)), TypeError, "logits"),
    (dict(logits=jnp.float32(1.0), labels=jnp.float32(1.0)), ValueError, "logits"),
    (dict(logits=jnp.ones((4, 0)), labels=jnp.ones((4, 0))), ValueError, "logits"),
    (dict(logits=jnp.ones((4, 1)), labels=jnp.zeros(4, jnp.int32), label_smoothing=0.1),
     ValueError, "label_smoothing"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
])
def test_bad_input_names_the_argument(overrides, error, name):
    with pytest.raises(error, match=name):
        _loss(**overrides)


def test_bad_input_of_the_other_functions():
    with pytest.raises(ValueError, match="t must be > 0"):
        bj.tempered_softmax(A, 0.0)
    with pytest.raises(TypeError, match="logits"):
        bj.tempered_softmax(jnp.ones((2, 3), jnp.int32), 1.0)
    with pytest.raises(ValueError, match="num_iters"):
        bj.tempered_sigmoid(A, 1.5, num_iters=-1)
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="backend='triton' needs a CUDA GPU"):
            bj.tempered_sigmoid(A, 1.5, backend="triton")
    with pytest.raises(ValueError, match="labels shape"):
        bj.bi_tempered_binary_logistic_loss(A, jnp.ones(4), 0.5, 1.5)
    with pytest.raises(ValueError, match="t1"):
        bj.bi_tempered_binary_logistic_loss(A, A, 2.5, 1.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        bj.bi_tempered_binary_logistic_loss(A, A, 0.5, 1.5, label_smoothing=1.0)


def test_traced_temperatures_are_not_checked():
    """Documented: under jit the values are unknown, so an invalid t2 does not raise."""
    loss, _ = loss_and_grad(jnp.asarray(logits_for(1.2, ROWS, 44)), jnp.zeros(5, jnp.int32), 0.5, -1.0)
    assert loss.shape == (5,)


# ------------------------------------------------------------------------------------------------
# Transformations: jit, grad, vmap, no retrace
# ------------------------------------------------------------------------------------------------

def test_eager_value_and_grad_agrees_with_jit():
    a = jnp.asarray(logits_for(1.3, ROWS, 45))
    idx = jnp.asarray([0, 1, 2, 3, -100], jnp.int32)
    f = lambda a, t1, t2: bj.bi_tempered_logistic_loss(a, idx, t1, t2, label_smoothing=0.1).mean()
    value, grad = jax.value_and_grad(f)(a, 0.7, 1.3)
    losses, grad_jit = loss_and_grad(a, idx, 0.7, 1.3, 0.1)
    np.testing.assert_allclose(value, losses.mean(), rtol=1e-6)
    np.testing.assert_allclose(grad, grad_jit / 5, rtol=1e-6, atol=1e-8)


def test_labels_get_no_gradient():
    y = jnp.asarray(rng(46).random((4, 5)), jnp.float32)
    grad_y = jax.grad(lambda y: bj.bi_tempered_logistic_loss(A, y, 0.5, 1.5).sum())(y)
    assert not np.any(np.asarray(grad_y))
    grad_idx = jax.grad(lambda a, i: bj.bi_tempered_logistic_loss(a, i, 0.5, 1.5).sum(),
                        argnums=1, allow_int=True)(A, IDX)
    assert grad_idx.dtype == jax.dtypes.float0 and grad_idx.shape == IDX.shape


def test_vmap_over_batch_and_over_temperatures():
    a = jnp.asarray(rng(47).standard_normal((2,) + ROWS), jnp.float32)
    idx = jnp.asarray(rng(48).integers(0, C, (2, ROWS[0])), jnp.int32)
    loss, grad = jax.vmap(lambda a, i: loss_and_grad(a, i, 0.6, 1.4))(a, idx)
    for k in range(2):
        loss_k, grad_k = loss_and_grad(a[k], idx[k], 0.6, 1.4)
        np.testing.assert_allclose(loss[k], loss_k, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(grad[k], grad_k, rtol=1e-6, atol=1e-7)
    t2s = jnp.asarray([0.5, 1.0, 2.0])
    for num_iters in [None, 5]:  # the original algorithm switches method on the batched t2
        loss, grad = jax.vmap(lambda t2: loss_and_grad(a[0], idx[0], 0.8, t2, num_iters=num_iters))(t2s)
        for k, t2 in enumerate(t2s):
            loss_k, grad_k = loss_and_grad(a[0], idx[0], 0.8, float(t2), num_iters=num_iters)
            np.testing.assert_allclose(loss[k], loss_k, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(grad[k], grad_k, rtol=1e-5, atol=1e-7)


def test_new_temperature_values_never_retrace(monkeypatch):
    traces = []
    original = jax_native_loss.forward  # the XLA loss's forward: called once per trace

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(jax_native_loss, "forward", counting)
    a = jnp.asarray(rng(49).standard_normal((3, 13)), jnp.float32)  # a shape no other test uses
    idx = jnp.asarray([0, 5, 12], jnp.int32)
    for t1, t2, s in [(0.5, 1.5, 0.0), (0.9, 0.7, 0.1), (1.0, 1.0, 0.2), (0.2, 3.0, 0.0)]:
        bj.bi_tempered_logistic_loss(a, idx, t1, t2, label_smoothing=s)  # eager: the internal jit
        bj.bi_tempered_logistic_loss(a, idx, jnp.float32(t1), np.float64(t2), label_smoothing=jnp.array(s))
    assert len(traces) == 1
    user_fn = jax.jit(jax.value_and_grad(lambda a, t1, t2, s: bj.bi_tempered_logistic_loss(
        a, idx, t1, t2, label_smoothing=s, num_iters=4).sum()))
    user_fn(a, 0.5, 1.5, 0.0)
    traced_once = len(traces)
    for t1, t2, s in [(0.9, 0.7, 0.1), (1.0, 1.0, 0.2), (0.3, 2.5, 0.05)]:
        user_fn(a, t1, t2, s)
    assert user_fn._cache_size() == 1 and len(traces) == traced_once


def test_auto_backend_never_imports_triton_jax_triton_or_torch():
    code = (
        "import sys, jax.numpy as jnp\n"
        "import bitempered.jax as bj\n"
        "bj.bi_tempered_logistic_loss(jnp.zeros((2, 3)), jnp.asarray([0, 1]), 0.5, 1.5).block_until_ready()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'jax_triton', 'torch')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_import_without_jax_names_the_extra():
    """Without jax, ``import bitempered.jax`` raises an ImportError naming the 'jax' extra (issue 26
    item 4), not a raw traceback from inside the binding."""
    code = (
        "import sys\n"
        "sys.modules['jax'] = None  # as if jax were not installed\n"
        "try:\n"
        "    import bitempered.jax\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "bitempered.jax needs the `jax` package" in out.stdout and '".[jax]"' in out.stdout, out.stdout + out.stderr
