"""``reduction=`` of the JAX ``bi_tempered_logistic_loss`` (issue 26 item 5): "none" (the default,
per-row losses like optax), "sum", and "mean" over the rows not ignored, the reductions of the fused
linear loss (``bindings/jax/reductions.py``, written once). Each is checked against the "none"
result reduced by hand, for values and gradients, under jit, grad and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitempered import jax as bj

C = 6
LOGITS = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, C)) * 2.0, jnp.float32)
INDICES = jnp.asarray([[0, 5, -100, 2], [1, -100, 3, 4]], jnp.int32)  # 6 rows kept of 8
DENSE = jnp.asarray(np.random.default_rng(1).dirichlet(np.ones(C), size=(2, 4)), jnp.float32)
LABELS = {"indices": INDICES, "dense": DENSE}


def _loss(logits, labels, t1, t2, reduction):
    return bj.bi_tempered_logistic_loss(logits, labels, t1, t2, label_smoothing=0.1, reduction=reduction)


def _by_hand(per_row, labels, reduction):
    """The "none" losses reduced as documented: the sum, or the mean over the kept rows."""
    kept = labels != -100 if jnp.issubdtype(labels.dtype, jnp.integer) else jnp.ones(per_row.shape, bool)
    total = jnp.sum(per_row)
    return total if reduction == "sum" else total / jnp.sum(kept)


@pytest.mark.parametrize("kind", ["indices", "dense"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_values_and_gradients_equal_the_reduced_per_row_losses(kind, reduction):
    labels = LABELS[kind]
    for t1, t2 in [(0.8, 1.2), (0.5, 0.7), (1.0, 1.0)]:
        value, grad = jax.value_and_grad(_loss)(LOGITS, labels, t1, t2, reduction)
        want, want_grad = jax.value_and_grad(lambda a: _by_hand(_loss(a, labels, t1, t2, "none"), labels,
                                                                reduction))(LOGITS)
        assert value.shape == () and value.dtype == jnp.float32
        np.testing.assert_allclose(value, want, rtol=1e-6)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_jit_with_traced_temperatures_grad_and_vmap(reduction):
    step = jax.jit(jax.value_and_grad(_loss) if reduction != "none" else _loss, static_argnums=4)
    eager = (jax.value_and_grad(_loss) if reduction != "none" else _loss)(LOGITS, INDICES, 0.7, 1.3, reduction)
    compiled = step(LOGITS, INDICES, jnp.float32(0.7), jnp.float32(1.3), reduction)
    for got, want in zip(jax.tree.leaves(compiled), jax.tree.leaves(eager)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    # vmap over the leading axis: each example reduces its own rows
    batched = jax.vmap(lambda a, y: _loss(a, y, 0.7, 1.3, reduction))(LOGITS, INDICES)
    for k in range(LOGITS.shape[0]):
        np.testing.assert_allclose(batched[k], _loss(LOGITS[k], INDICES[k], 0.7, 1.3, reduction), rtol=1e-6)


def test_default_is_none():
    default = bj.bi_tempered_logistic_loss(LOGITS, INDICES, 0.8, 1.2)
    assert default.shape == (2, 4)
    np.testing.assert_array_equal(default, bj.bi_tempered_logistic_loss(LOGITS, INDICES, 0.8, 1.2, reduction="none"))


def test_every_row_ignored_and_empty_input():
    """"mean" of no kept row is NaN (as torch's cross_entropy) with a zero gradient (as the linear
    loss); "sum" is 0. Empty input likewise."""
    ignored = jnp.full((2, 4), -100, jnp.int32)
    value, grad = jax.value_and_grad(_loss)(LOGITS, ignored, 0.8, 1.2, "mean")
    assert np.isnan(value) and not np.any(np.asarray(grad))
    assert float(_loss(LOGITS, ignored, 0.8, 1.2, "sum")) == 0.0
    empty = jnp.zeros((0, C), jnp.float32)
    assert float(_loss(empty, jnp.zeros((0,), jnp.int32), 0.8, 1.2, "sum")) == 0.0
    assert np.isnan(_loss(empty, jnp.zeros((0,), jnp.int32), 0.8, 1.2, "mean"))
    assert _loss(empty, jnp.zeros((0,), jnp.int32), 0.8, 1.2, "none").shape == (0,)


def test_matches_the_linear_loss_reduction():
    hidden = jnp.asarray(np.random.default_rng(2).standard_normal((8, 5)), jnp.float32)
    weight = jnp.asarray(np.random.default_rng(3).standard_normal((C, 5)), jnp.float32)
    labels = INDICES.reshape(-1)
    for reduction in ("sum", "mean"):
        linear = bj.linear_bi_tempered_logistic_loss(hidden, weight, labels, 0.8, 1.2, reduction=reduction)
        plain = bj.bi_tempered_logistic_loss(hidden @ weight.T, labels, 0.8, 1.2, reduction=reduction)
        np.testing.assert_allclose(linear, plain, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["avg", None, "Mean"])
def test_bad_reduction_names_the_argument(reduction):
    with pytest.raises(ValueError, match="reduction must be one of"):
        bj.bi_tempered_logistic_loss(LOGITS, INDICES, 0.8, 1.2, reduction=reduction)
