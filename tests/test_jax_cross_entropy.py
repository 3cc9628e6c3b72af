"""The XLA loss's t1 = t2 = 1 fast paths (bindings/jax/native/loss.py: ``_index_fast``, the loss of
class indices without the gradient; ``_index_fast_with_gradient``, optax's max-shift arithmetic;
``_dense_fast``, dense labels) and their exact fallback, against the float64 reference.

The fast paths are select-free and stand for every row only where their per-row values are finite
(``_fast_path_ok``); otherwise the whole batch is computed by the exact branch. So the tests put
the rows that need the fallback (NaN, +-inf logits, label mass on a -inf logit, a target so far
below the max that the fast sum overflows) in one batch with ordinary rows, one kind at a time and
all together, and check the rows the fast paths must get right by themselves (large offsets, a
-inf logit off the target, underflowing classes and labels) with the fallback switched off.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from cross_entropy_rows import C, TARGETS
from cross_entropy_rows import logits as _logits
from bitempered import jax as bj
from bitempered.bindings.jax.native import loss as jax_native_loss

TOL = {jnp.float64: 1e-10, jnp.float32: 2e-5}
ORDINARY = [0, 1, 2, 3, 9, 11]  # the fast paths stand for these rows (every logit finite)
SPECIAL = [4, 5, 6, 7, 8, 10]    # rows that need (or, 10 with class indices, may take) the fallback


def _dense_labels(a: np.ndarray) -> np.ndarray:
    """Soft labels, some exactly 0, one below the normal range; row 10 has no mass on its -inf
    logit (a finite loss, but 0 * -inf in the fast path); row 7 has mass there (+inf)."""
    y = np.random.default_rng(1).random(a.shape) ** 4
    y[:, 0] = 0.0                      # exact zeros: y log y = 0
    y[0, 4] = 1e-39                    # a label below float32's normal range
    y[10, 6] = 0.0
    y /= y.sum(-1, keepdims=True)
    y[3] *= 0.7                        # rows need not sum to 1
    return y


def _run(a, labels, smoothing, dtype, ignore_index=-100, grad=True):
    """(losses, gradient of their sum) with traced temperatures = 1; the gradient None with
    grad=False (the loss alone: the forward without the gradient's residual)."""
    a = jnp.asarray(a, dtype)
    t = jnp.asarray(1.0, dtype)  # traced: the one program of every temperature

    def losses(a_, t1, t2):
        return bj.bi_tempered_logistic_loss(a_, labels, t1, t2, smoothing, ignore_index=ignore_index)

    if not grad:
        return np.asarray(jax.jit(losses)(a, t, t), np.float64), None
    loss, vjp = jax.vjp(lambda a_: losses(a_, t, t), a)
    return np.asarray(loss, np.float64), np.asarray(vjp(jnp.ones_like(loss))[0], np.float64)


def _want(a, labels, smoothing, ignore_index=-100):
    a = np.asarray(a, np.float64)
    if np.issubdtype(np.asarray(labels).dtype, np.integer):
        y, kept = ref.one_hot(np.asarray(labels), C, ignore_index)
        loss = ref.loss(a, y, 1.0, 1.0, smoothing)
        grad = ref.loss_grad(a, y, 1.0, 1.0, smoothing)
        return np.where(kept, loss, 0.0), np.where(kept[..., None], grad, 0.0)
    y = np.asarray(labels, np.float64)
    return ref.loss(a, y, 1.0, 1.0, smoothing), ref.loss_grad(a, y, 1.0, 1.0, smoothing)


def _check(got, want, dtype):
    (loss, grad), (want_loss, want_grad) = got, want
    tol = TOL[dtype]
    assert np.array_equal(np.isnan(loss), np.isnan(want_loss)), (loss, want_loss)
    assert np.array_equal(np.isposinf(loss), np.isposinf(want_loss)), (loss, want_loss)
    finite = np.isfinite(want_loss)
    np.testing.assert_allclose(loss[finite], want_loss[finite], rtol=tol, atol=tol)
    if grad is None:
        return
    rows = ~np.isnan(want_grad).any(-1)
    assert np.isnan(grad[~rows]).all()
    np.testing.assert_allclose(grad[rows], want_grad[rows], rtol=tol, atol=tol)


@pytest.fixture
def fallback(monkeypatch):
    """fallback(on): on=False makes the fast paths stand for every row (no exact recompute)."""
    def set_(on: bool):
        jax.clear_caches()
        if on:
            monkeypatch.undo()
        else:
            monkeypatch.setattr(jax_native_loss, "_fast_path_ok", lambda values: jnp.bool_(True))

    yield set_
    monkeypatch.undo()
    jax.clear_caches()


DTYPES = [jnp.float32, jnp.float64]


def _x64(dtype):
    return jax.enable_x64(dtype == jnp.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("labels", ["indices", "dense"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_special_rows_next_to_ordinary_rows(dtype, labels, smoothing):
    """Each row that needs the exact branch, in one batch with the ordinary rows; then all of them."""
    a = _logits()
    y_all = TARGETS.astype(np.int32) if labels == "indices" else _dense_labels(a)
    with _x64(dtype):
        batches = [ORDINARY] + [ORDINARY[:3] + [row] + ORDINARY[3:] for row in SPECIAL] + [list(range(12))]
        for rows in batches:
            y = y_all[rows] if labels == "indices" else jnp.asarray(y_all[rows], dtype)
            want = _want(a[rows], y_all[rows], smoothing)
            _check(_run(a[rows], y, smoothing, dtype), want, dtype)
            _check(_run(a[rows], y, smoothing, dtype, grad=False), want, dtype)


def _fast_rows(a, labels, dtype, grad):
    """The rows a fast path stands for (no smoothing). Dense labels: every logit finite. Class
    indices, with the gradient (the max shift): a finite max and target, so a -inf logit off the
    target is fine; the loss alone (the target-logit shift): also no logit so far above the
    target's that exp(a - a_target) overflows (float32: rows 8 and 11)."""
    finite = np.isfinite(a).all(-1)
    if labels == "dense":
        return finite
    if grad:
        return finite | (np.arange(len(a)) == 10)
    with np.errstate(invalid="ignore"):
        gap = a.max(-1) - a[np.arange(len(a)), TARGETS]
    return finite & (gap < np.log(np.finfo(dtype).max)) | (np.arange(len(a)) == 10)


CASES = [("indices", False), ("indices", True), ("dense", False), ("dense", True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("labels,grad", CASES)
def test_fast_paths_alone_are_exact_where_they_are_finite(fallback, dtype, labels, grad):
    """With the fallback switched off: the rows the fast path stands for are exact, and every
    other row comes out non-finite there, so the predicate sees it (a finite fast value is always
    the exact one). The dense path decides from sum y (log y - a0), whose finiteness is the loss's."""
    a = _logits()
    y_all = TARGETS.astype(np.int32) if labels == "indices" else _dense_labels(a)
    fast = _fast_rows(a, labels, dtype, grad)
    assert 6 <= fast.sum() < len(a)
    fallback(False)
    with _x64(dtype):
        y = y_all if labels == "indices" else jnp.asarray(y_all, dtype)
        loss, g = _run(a, y, 0.0, dtype, grad=grad)
        want_loss, want_grad = _want(a, y_all, 0.0)
        _check((loss[fast], None if g is None else g[fast]), (want_loss[fast], want_grad[fast]), dtype)
        assert not np.isfinite(loss[~fast]).any(), loss[~fast]
    fallback(True)
    with _x64(dtype):  # and with the fallback, every row
        _check(_run(a, y, 0.0, dtype, grad=grad), (want_loss, want_grad), dtype)


def test_ignored_and_out_of_range_rows():
    """Ignored rows (0) and an invalid class index (NaN; traced labels are not checked) next to
    ordinary rows."""
    a = _logits()[ORDINARY]
    y = TARGETS[ORDINARY].astype(np.int32)
    y[1] = -100
    want_loss, want_grad = _want(a, y, 0.0)
    y[2] = C + 3
    loss, grad = _run_traced(a, y)
    assert loss[1] == 0 and np.all(grad[1] == 0)
    assert np.isnan(loss[2]) and np.isnan(grad[2]).all()
    keep = [0, 1, 3, 4, 5]
    _check((loss[keep], grad[keep]), (want_loss[keep], want_grad[keep]), jnp.float32)


def _run_traced(a, y):
    @jax.jit
    def step(a_, y_, t):
        loss, vjp = jax.vjp(lambda x: bj.bi_tempered_logistic_loss(x, y_, t, t), a_)
        return loss, vjp(jnp.ones_like(loss))[0]

    loss, grad = step(jnp.asarray(a, jnp.float32), jnp.asarray(y), jnp.float32(1.0))
    return np.asarray(loss, np.float64), np.asarray(grad, np.float64)


@pytest.mark.parametrize("labels", ["indices", "dense"])
def test_vmap_folds_the_fallback_decision(labels):
    """vmap (and vmap of grad) of a batch whose examples need different branches: folded into
    rows, one decision for all; the values are those of each example alone."""
    a = _logits()[:8].reshape(2, 4, C)  # example 1 holds the NaN, +-inf and overflowing rows
    y_all = TARGETS[:8].reshape(2, 4).astype(np.int32) if labels == "indices" \
        else _dense_labels(_logits())[:8].reshape(2, 4, C).astype(np.float32)
    a = jnp.asarray(a, jnp.float32)

    def loss_and_grad(a_, y_):
        return jax.value_and_grad(lambda x: bj.bi_tempered_logistic_loss(x, y_, 1.0, 1.0).sum())(a_)

    batched = jax.jit(jax.vmap(loss_and_grad))(a, jnp.asarray(y_all))
    for i in range(2):
        alone = loss_and_grad(a[i], jnp.asarray(y_all[i]))
        for got, want in zip(batched, alone):
            np.testing.assert_array_equal(np.isnan(got[i]), np.isnan(want))
            np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-7)
