"""``ignore_index`` of the JAX losses (issue 25 item 4).

- ``ignore_index=None`` (pytorch-toolbelt's default) in the multi-class losses: no row is ignored,
  every index is a target ("mean" over every row), out-of-range indices keep their rules (concrete:
  ValueError; traced: a NaN row, also -100 and -2, the value the Triton path passes the kernel).
- ``ignore_index=`` in the binary loss: elements whose label equals it are skipped (loss 0,
  gradient exactly 0, also for a NaN logit; "mean" over the kept ones, NaN when none), their labels
  exempt from the [0, 1] check; None (default) skips nothing.
Each against the float64 reference (tests/reference.py), on the XLA path and the Triton path
(real jax-triton on a GPU, else the interpreter stand-in of tests/test_jax_triton.py).
"""

import jax
import numpy as np
import pytest

import reference as ref
from bitempered import jax as bj
from interpreter_warnings import EXPECTED as pytestmark  # noqa: F401  (the interpreter's expected warnings)
from test_jax_triton import triton_backend  # noqa: F401  (the fixture: real jax-triton or the stand-in)

C = 11
TEMPERATURES = [(0.8, 1.2), (1.0, 1.0)]


@pytest.fixture(params=["xla", "triton"])
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    return request.param


def _rows(seed=0, shape=(2, 5)):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape + (C,)) * 2.0).astype(np.float32)
    return logits, rng.integers(0, C, shape).astype(np.int32)


def _reduced(per_row, kept, reduction):
    total = per_row.sum()
    return {"none": per_row, "sum": total, "mean": total / kept.sum()}[reduction]


def _value_and_grad_of_sum(loss):
    """jit((loss(a, t1, t2, s), d sum(loss) / da)), the temperatures and smoothing traced: one
    program serves every setting of a test."""
    return jax.jit(lambda a, *scalars: (loss(a, *scalars), jax.grad(lambda a: loss(a, *scalars).sum())(a)))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_none_counts_every_row(backend, reduction):
    logits, indices = _rows()
    indices[0, 0] = 0  # a few classes at the edges of [0, C)
    indices[1, 4] = C - 1
    dense = ref.one_hot(indices, C)[0]
    every_row = np.ones(indices.shape, bool)
    run = _value_and_grad_of_sum(lambda a, t1, t2, s: bj.bi_tempered_logistic_loss(
        a, indices, t1, t2, label_smoothing=s, ignore_index=None, backend=backend, reduction=reduction))
    for t1, t2 in TEMPERATURES:
        value, grad = run(logits, t1, t2, 0.1)
        truth_grad = ref.loss_grad(logits, dense, t1, t2, 0.1) / (indices.size if reduction == "mean" else 1)
        np.testing.assert_allclose(value, _reduced(ref.loss(logits, dense, t1, t2, 0.1), every_row, reduction),
                                   rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(grad, truth_grad, rtol=1e-4, atol=1e-7)


def test_none_traced_out_of_range_indices_are_nan_rows(backend):
    """-100 is a bad index, not an ignored one; -2 (the Triton path's kernel-side ignore_index for
    None) and C too; the other rows are exact and their gradients finite."""
    logits, indices = _rows(1)
    indices[0, 1], indices[1, 2], indices[1, 3] = -100, -2, C

    @jax.jit
    def loss_and_grad(a, y):
        return jax.value_and_grad(lambda a: bj.bi_tempered_logistic_loss(
            a, y, 0.8, 1.2, ignore_index=None, backend=backend).sum())(a), \
            bj.bi_tempered_logistic_loss(a, y, 0.8, 1.2, ignore_index=None, backend=backend)

    (_, grad), per_row = loss_and_grad(logits, indices)
    bad = np.zeros(indices.shape, bool)
    bad[0, 1] = bad[1, 2] = bad[1, 3] = True
    assert np.isnan(np.asarray(per_row)[bad]).all()
    good = np.clip(indices, 0, C - 1)
    truth = ref.loss(logits, ref.one_hot(good, C)[0], 0.8, 1.2)
    np.testing.assert_allclose(np.asarray(per_row)[~bad], truth[~bad], rtol=2e-5, atol=1e-6)
    assert np.isfinite(np.asarray(grad)[~bad]).all()
    # with the default ignore_index=-100 the -100 row is ignored instead (loss 0)
    default = jax.jit(lambda a, y: bj.bi_tempered_logistic_loss(a, y, 0.8, 1.2, backend=backend))(logits, indices)
    assert float(default[0, 1]) == 0.0 and np.isnan(np.asarray(default)[1, 2:4]).all()


def test_none_in_linear_and_concrete_checks():
    logits, indices = _rows(2)
    hidden, weight = logits.reshape(-1, C), np.eye(C, dtype=np.float32)
    for reduction in ("none", "mean"):
        got = bj.linear_bi_tempered_logistic_loss(hidden, weight, indices.reshape(-1), 0.8, 1.2, ignore_index=None,
                                                  reduction=reduction, chunk_size=3)
        want = bj.bi_tempered_logistic_loss(hidden, indices.reshape(-1), 0.8, 1.2, ignore_index=None,
                                            reduction=reduction)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    indices[0, 0] = -100
    with pytest.raises(ValueError, match=rf"labels \(class indices\) must be in \[0, {C}\), got -100"):
        bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2, ignore_index=None)
    with pytest.raises(ValueError, match=rf"must be in \[0, {C}\), got -100"):
        bj.linear_bi_tempered_logistic_loss(hidden, weight, indices.reshape(-1), 0.8, 1.2, ignore_index=None)


@pytest.mark.parametrize("bad,error,match", [
    (True, TypeError, "ignore_index must be None or an int, got True"),
    (1.0, TypeError, "ignore_index must be None or an int, got 1.0"),
    ("-100", TypeError, "ignore_index must be None or an int"),
    (2**63, ValueError, r"ignore_index must fit in int64"),
])
def test_bad_ignore_index(bad, error, match):
    logits, indices = _rows()
    x, y = logits[..., 0], np.full(logits.shape[:-1], 0.5, np.float32)
    for call in (lambda: bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2, ignore_index=bad),
                 lambda: bj.bi_tempered_binary_logistic_loss(x, y, 0.8, 1.2, ignore_index=bad),
                 lambda: bj.linear_bi_tempered_logistic_loss(logits, np.eye(C, dtype=np.float32), indices, 0.8, 1.2,
                                                             ignore_index=bad)):
        with pytest.raises(error, match=match):
            call()


# ---------------------------------------------------------------------------------------------
# binary loss
# ---------------------------------------------------------------------------------------------

def _binary_truth(x, y, t1, t2, s):
    """(per-element loss, dL/dx) of the float64 reference: the 2-class loss of [0, x], [1 - y, y]."""
    logits = np.stack([np.zeros_like(x), x], -1).astype(np.float64)
    labels = np.stack([1.0 - y, y], -1).astype(np.float64)
    return ref.loss(logits, labels, t1, t2, s), ref.loss_grad(logits, labels, t1, t2, s)[..., 1]


def _binary_data(seed, ignore):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, 13)) * 2.0).astype(np.float32)
    y = rng.uniform(size=x.shape).astype(np.float32)
    y[0, [1, 7]] = ignore
    y[2, 12] = ignore
    x[0, 7] = np.nan  # an ignored element's NaN logit: still loss 0, gradient 0
    return x, y, y != ignore


@pytest.mark.parametrize("ignore", [255, -100])
def test_binary_ignore_index_skips_elements(backend, ignore):
    x, y, kept = _binary_data(3, ignore)
    for reduction in ("none", "sum", "mean"):
        run = _value_and_grad_of_sum(lambda v, t1, t2, s: bj.bi_tempered_binary_logistic_loss(
            v, y, t1, t2, label_smoothing=s, backend=backend, ignore_index=ignore, reduction=reduction))
        for t1, t2, s in [(0.5, 1.5, 0.0), (0.8, 0.7, 0.1), (1.0, 1.0, 0.0)]:
            truth, truth_grad = _binary_truth(np.where(kept, x, 0.0), np.where(kept, y, 0.0), t1, t2, s)
            value, grad = run(x, t1, t2, s)
            where = f"{reduction} t1={t1} t2={t2} s={s}"
            np.testing.assert_allclose(value, _reduced(truth * kept, kept, reduction), rtol=2e-5, atol=1e-6,
                                       err_msg=where)
            factor = 1.0 / kept.sum() if reduction == "mean" else 1.0
            np.testing.assert_allclose(grad, truth_grad * kept * factor, rtol=1e-4, atol=1e-7, err_msg=where)
            assert (np.asarray(grad)[~kept] == 0).all() and np.isfinite(np.asarray(grad)).all(), where


def test_binary_ignore_index_traced_and_default(backend):
    x, y, kept = _binary_data(4, 255)
    x = np.where(kept, x, 1.5).astype(np.float32)

    @jax.jit
    def mean(v, labels):
        return bj.bi_tempered_binary_logistic_loss(v, labels, 0.8, 1.2, backend=backend, ignore_index=255,
                                                   reduction="mean")

    truth = _binary_truth(x, np.where(kept, y, 0.0), 0.8, 1.2, 0.0)[0]
    np.testing.assert_allclose(mean(x, y), (truth * kept).sum() / kept.sum(), rtol=2e-5)
    # default None: nothing skipped, today's elementwise result (labels in [0, 1])
    y_valid = np.where(kept, y, 0.25).astype(np.float32)
    default = bj.bi_tempered_binary_logistic_loss(x, y_valid, 0.8, 1.2, backend=backend)
    np.testing.assert_allclose(default, _binary_truth(x, y_valid, 0.8, 1.2, 0.0)[0], rtol=2e-5, atol=1e-7)
    # every element ignored: "mean" is NaN (as the multi-class mean), the gradient 0
    every = np.full(x.shape, 255.0, np.float32)
    assert np.isnan(float(mean(x, every)))
    assert (np.asarray(jax.grad(lambda v: bj.bi_tempered_binary_logistic_loss(
        v, every, 0.8, 1.2, backend=backend, ignore_index=255, reduction="sum"))(x)) == 0).all()


def test_binary_range_check_exempts_only_ignored_labels():
    x, y, _ = _binary_data(5, 255)
    with pytest.raises(ValueError, match=r"labels \(dense/binary\) must hold values in \[0, 1\], got values from"):
        bj.bi_tempered_binary_logistic_loss(x, y, 0.8, 1.2)  # 255 without ignore_index
    with pytest.raises(ValueError, match=r"must hold values in \[0, 1\]"):
        bj.bi_tempered_binary_logistic_loss(x, y, 0.8, 1.2, ignore_index=-100)  # 255 is not the ignored value
    y_nan = y.copy()
    y_nan[1, 0] = np.nan
    with pytest.raises(ValueError, match="got NaN"):
        bj.bi_tempered_binary_logistic_loss(x, y_nan, 0.8, 1.2, ignore_index=255)
    with pytest.raises(ValueError, match="reduction must be one of"):
        bj.bi_tempered_binary_logistic_loss(x, y, 0.8, 1.2, ignore_index=255, reduction="avg")
    # empty input: "sum" 0, "mean" NaN
    empty = np.zeros((0,), np.float32)
    assert float(bj.bi_tempered_binary_logistic_loss(empty, empty, 0.8, 1.2, reduction="sum")) == 0.0
    assert np.isnan(float(bj.bi_tempered_binary_logistic_loss(empty, empty, 0.8, 1.2, reduction="mean")))
