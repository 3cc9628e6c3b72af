"""Properties of the JAX API on random inputs drawn by hypothesis (one fixed shape: one compile each)."""

import jax
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

from bitempered import jax as bj  # noqa: E402

SHAPE = (4, 6)
logits = arrays(np.float32, SHAPE, elements=st.floats(-10, 10, width=32))
temperatures = st.floats(0.1, 4.0)
t1s = st.floats(0.0, 1.9)
SETTINGS = settings(max_examples=30, deadline=None)

softmax = jax.jit(bj.tempered_softmax)
loss = jax.jit(bj.bi_tempered_logistic_loss)


@SETTINGS
@given(a=logits, t=temperatures, shift=arrays(np.float32, (SHAPE[0], 1), elements=st.floats(-20, 20, width=32)))
def test_rows_sum_to_one_and_shift_invariance(a, t, shift):
    p = np.asarray(softmax(a, t), np.float64)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    assert np.all(p >= 0)
    np.testing.assert_allclose(softmax(a + shift, t), p, atol=2e-5)


@SETTINGS
@given(a=logits, t1=t1s, t2=temperatures, weights=arrays(np.float32, SHAPE, elements=st.floats(0, 1, width=32)))
def test_loss_is_nonnegative_for_labels_summing_to_one(a, t1, t2, weights):
    weights = weights + 1e-3
    y = weights / weights.sum(-1, keepdims=True)
    value = np.asarray(loss(a, y, t1, t2))
    assert np.all(value >= -1e-5), value  # a Bregman divergence (rounding aside)
    # and zero at the minimum: the labels equal to the model's own probabilities
    p = softmax(a, t2)
    assert np.all(np.abs(np.asarray(loss(a, p, t1, t2))) <= 1e-4)


@SETTINGS
@given(a=logits, weights=arrays(np.float32, SHAPE, elements=st.floats(0, 1, width=32)))
def test_t1_t2_one_is_kl_divergence(a, weights):
    weights = weights + 1e-3
    y = weights / weights.sum(-1, keepdims=True)
    kl = np.sum(y * (np.log(y) - np.asarray(jax.nn.log_softmax(a.astype(np.float64)))), -1)
    np.testing.assert_allclose(loss(a, y, 1.0, 1.0), kl, rtol=1e-4, atol=1e-5)
