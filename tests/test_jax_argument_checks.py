"""Argument checks of the JAX API that adversarial testing found missing (issue 28 item 4).

- Temperatures and smoothing are checked as given AND as rounded to the compute dtype: float32
  turns t1 = 1.99999999 into 2, t2 = 1e-50 into 0, t2 = 1e39 into inf and label_smoothing =
  0.99999999 into 1, each of which gave NaN on every row.
- Non-finite temperatures (t2 = inf gave all-NaN) raise (``bindings/common/validation.py``).
- The fused linear loss checks its dense labels' range as the plain loss does.
Every public JAX function that takes the argument is checked, the vocab-parallel ones outside
``shard_map`` (their temperatures are checked before the mesh axis).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitempered import jax as bj

A = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)
IDX = jnp.asarray([0, 1, 2, 3], jnp.int32)
Y = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 5)), jnp.float32)


def _losses(logits):
    """Each loss as a function of (t1, t2, label_smoothing) on ``logits`` (4 x 5)."""
    hidden, weight = logits, jnp.eye(5, dtype=logits.dtype)  # the linear head's logits are ``logits``
    return {
        "plain": lambda t1, t2, s: bj.bi_tempered_logistic_loss(logits, IDX, t1, t2, label_smoothing=s),
        "binary": lambda t1, t2, s: bj.bi_tempered_binary_logistic_loss(logits, Y.astype(logits.dtype), t1, t2,
                                                                          label_smoothing=s),
        "linear": lambda t1, t2, s: bj.linear_bi_tempered_logistic_loss(hidden, weight, IDX, t1, t2,
                                                                         label_smoothing=s),
        "vocab_parallel": lambda t1, t2, s: bj.vocab_parallel_bi_tempered_logistic_loss(
            logits, IDX, t1, t2, "model", label_smoothing=s),
    }


def _probabilities(logits):
    """Each probability function as a function of t."""
    return {
        "softmax": lambda t: bj.tempered_softmax(logits, t),
        "sigmoid": lambda t: bj.tempered_sigmoid(logits, t),
        "vocab_parallel_softmax": lambda t: bj.vocab_parallel_tempered_softmax(logits, t, "model"),
    }


ROUNDED_OUT_OF_RANGE = [  # (t1, t2, label_smoothing), the message
    ((1.99999999, 1.2, 0.0), r"t1 = 1.99999999 is 2.0 in float32 \(the compute dtype\): t1 must be in \[0, 2\)"),
    ((np.float64(1.99999999), 1.2, 0.0), "t1 = 1.99999999 is 2.0 in float32"),
    ((0.8, 1e-50, 0.0), r"t2 = 1e-50 is 0.0 in float32 .*t2 must be > 0"),
    ((0.8, 1e39, 0.0), r"t2 = 1e\+39 is inf in float32 .*t2 must be > 0 and finite"),
    ((0.8, 1.2, 0.99999999), r"label_smoothing = 0.99999999 is 1.0 in float32 .*label_smoothing must be in \[0, 1\)"),
]
NON_FINITE = [
    ((0.8, float("inf"), 0.0), "t2 must be > 0 and finite, got inf"),
    ((0.8, jnp.asarray(jnp.inf), 0.0), "t2 must be > 0 and finite, got inf"),
    ((0.8, -float("inf"), 0.0), "t2 must be > 0 and finite"),
    ((0.8, float("nan"), 0.0), "t2 must be > 0 and finite"),
    ((float("inf"), 1.2, 0.0), "t1 must be in"),
    ((float("nan"), 1.2, 0.0), "t1 must be in"),
    ((0.8, 1.2, float("nan")), "label_smoothing must be in"),
]


@pytest.mark.parametrize("loss", list(_losses(A)))
@pytest.mark.parametrize("temperatures,message", ROUNDED_OUT_OF_RANGE + NON_FINITE)
def test_losses_check_temperatures_as_computed(loss, temperatures, message):
    with pytest.raises(ValueError, match=message):
        _losses(A)[loss](*temperatures)


@pytest.mark.parametrize("function", list(_probabilities(A)))
@pytest.mark.parametrize("t,message", [
    (1e-50, r"t = 1e-50 is 0.0 in float32 .*t must be > 0"),
    (1e39, r"t = 1e\+39 is inf in float32"),
    (float("inf"), "t must be > 0 and finite, got inf"),
    (float("nan"), "t must be > 0 and finite"),
])
def test_probabilities_check_t_as_computed(function, t, message):
    with pytest.raises(ValueError, match=message):
        _probabilities(A)[function](t)


@pytest.mark.parametrize("loss", ["plain", "binary", "linear"])
def test_values_just_inside_the_range_in_float32_give_finite_losses(loss):
    t1 = float(np.nextafter(np.float32(2.0), np.float32(0.0)))  # the largest float32 below 2
    s = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
    assert np.isfinite(np.asarray(_losses(A)[loss](t1, 1.2, 0.0))).all()
    assert np.isfinite(np.asarray(_losses(A)[loss](0.8, 1e-30, 0.0))).all()  # a tiny t2 that float32 holds
    assert np.isfinite(np.asarray(_losses(A)[loss](0.8, 1.2, s))).all()


def test_float64_logits_keep_what_float64_holds():
    """The bound is the compute dtype's: float64 holds 1.99999999 < 2, so float64 logits accept it."""
    with jax.enable_x64(True):
        logits = A.astype(jnp.float64)
        for loss in ("plain", "binary", "linear"):
            assert np.isfinite(np.asarray(_losses(logits)[loss](1.99999999, 1.2, 0.99999999))).all(), loss
            assert np.isfinite(np.asarray(_losses(logits)[loss](0.8, 1e-50, 0.0))).all(), loss
        with pytest.raises(ValueError, match="t2 must be > 0 and finite"):
            _losses(logits)["plain"](0.8, float("inf"), 0.0)


def test_traced_temperatures_stay_unchecked():
    """Documented: traced values are not read (no host sync), so the rounding check skips them."""
    loss = jax.jit(lambda t1: bj.bi_tempered_logistic_loss(A, IDX, t1, 1.2))(1.99999999)
    assert loss.shape == (4,)


@pytest.mark.parametrize("labels,message", [
    (np.full((4, 5), 1.5, np.float32), "values from 1.5 to 1.5"),
    (np.full((4, 5), -0.25, np.float32), "values from -0.25 to -0.25"),
    (np.where(np.eye(4, 5) > 0, np.nan, 0.2).astype(np.float32), "got NaN"),
])
def test_linear_loss_checks_dense_labels_as_the_plain_loss(labels, message):
    with pytest.raises(ValueError, match=message) as linear_error:
        bj.linear_bi_tempered_logistic_loss(A, jnp.eye(5, dtype=A.dtype), labels, 0.8, 1.2)
    with pytest.raises(ValueError) as plain_error:
        bj.bi_tempered_logistic_loss(A, labels, 0.8, 1.2)
    assert str(linear_error.value) == str(plain_error.value)
    assert "labels" in str(linear_error.value)


def test_linear_loss_accepts_dense_labels_in_range():
    labels = np.asarray(Y) / np.asarray(Y).sum(-1, keepdims=True)
    got = bj.linear_bi_tempered_logistic_loss(A, jnp.eye(5, dtype=A.dtype), labels, 0.8, 1.2)
    np.testing.assert_allclose(got, bj.bi_tempered_logistic_loss(A, labels, 0.8, 1.2), rtol=1e-5, atol=1e-6)
