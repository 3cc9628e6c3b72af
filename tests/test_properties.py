"""Property tests (hypothesis) of the PyTorch native backend in float64."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitempered import torch as bt

temperatures = st.floats(0.2, 4.0)
t1s = st.floats(0.0, 1.9)


@st.composite
def rows(draw, max_classes=12):
    num_rows = draw(st.integers(1, 4))
    num_classes = draw(st.integers(2, max_classes))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, num_classes, generator=gen, dtype=torch.float64) * scale


def normalized_labels(a, seed):
    y = torch.rand(a.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return y / y.sum(-1, keepdim=True)


@settings(max_examples=60, deadline=None)
@given(rows(), temperatures, st.floats(-50, 50))
def test_shift_invariance(a, t, shift):
    np.testing.assert_allclose(bt.tempered_softmax(a + shift, t), bt.tempered_softmax(a, t), atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(rows(max_classes=300), temperatures)
def test_probabilities_sum_to_one(a, t):
    p = bt.tempered_softmax(a, t)
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(rows(), t1s, temperatures, st.integers(0, 1000))
def test_loss_is_nonnegative_for_labels_summing_to_one(a, t1, t2, seed):
    loss = bt.bi_tempered_logistic_loss(a, normalized_labels(a, seed), t1, t2, reduction="none")
    assert (loss >= -1e-10).all()  # (+inf where a labelled class has p = 0 also passes)


@settings(max_examples=40, deadline=None)
@given(rows(), st.integers(0, 1000))
def test_t1_t2_one_is_kl_divergence(a, seed):
    y = normalized_labels(a, seed)
    kl = (y * (y.log() - torch.log_softmax(a, -1))).sum(-1)
    np.testing.assert_allclose(bt.bi_tempered_logistic_loss(a, y, 1.0, 1.0, reduction="none"), kl, rtol=1e-10,
                               atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(rows(), st.integers(0, 1000), st.sampled_from([1e-3, 1e-5, 1e-7]))
def test_continuity_near_one(a, seed, eps):
    y = normalized_labels(a, seed)
    at_one = bt.bi_tempered_logistic_loss(a, y, 1.0, 1.0, reduction="none")
    for t1, t2 in [(1 - eps, 1 + eps), (1 + eps, 1 - eps), (1 - eps, 1 - eps)]:
        near = bt.bi_tempered_logistic_loss(a, y, t1, t2, reduction="none")
        np.testing.assert_allclose(near, at_one, rtol=200 * eps, atol=200 * eps)
        np.testing.assert_allclose(bt.tempered_softmax(a, t2), torch.softmax(a, -1), atol=200 * eps)


@settings(max_examples=40, deadline=None)
@given(rows(), t1s, temperatures)
def test_loss_is_zero_when_labels_equal_probabilities(a, t1, t2):
    p = bt.tempered_softmax(a, t2)
    loss = bt.bi_tempered_logistic_loss(a, p, t1, t2, reduction="none")
    np.testing.assert_allclose(loss, 0.0, atol=1e-9)
