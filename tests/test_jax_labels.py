"""JAX: concrete dense and binary labels outside SPEC's [0, 1] raise ValueError naming `labels`;
traced labels are documented as unchecked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitempered import jax as bj

LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), dtype=jnp.float32)
BAD = [np.array([[0.5, -0.5, 1.0], [0.0, 0.0, 1.0]]), np.array([[0.5, 1.5, 0.0], [0.0, 0.0, 1.0]]),
       np.array([[0.5, np.nan, 0.5], [0.0, 0.0, 1.0]])]


@pytest.mark.parametrize("labels", BAD)
@pytest.mark.parametrize("as_jax", [False, True])
def test_concrete_dense_labels_outside_zero_one_raise(labels, as_jax):
    labels = jnp.asarray(labels, dtype=jnp.float32) if as_jax else labels
    with pytest.raises(ValueError, match="labels"):
        bj.bi_tempered_logistic_loss(LOGITS, labels, 0.8, 1.2)
    with pytest.raises(ValueError, match="labels"):
        bj.bi_tempered_binary_logistic_loss(LOGITS, labels, 0.8, 1.2)


def test_labels_in_zero_one_are_accepted_and_traced_ones_unchecked():
    good = np.array([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    assert np.isfinite(bj.bi_tempered_logistic_loss(LOGITS, good, 0.8, 1.2)).all()
    assert np.isfinite(bj.bi_tempered_binary_logistic_loss(LOGITS, good, 0.8, 1.2)).all()
    traced = jax.jit(lambda y: bj.bi_tempered_logistic_loss(LOGITS, y, 0.8, 1.2))(jnp.asarray(BAD[0]))
    assert np.isnan(traced[0]) and np.isfinite(traced[1])  # the bad row only, as documented
