"""``num_iters=k`` reproduces the original jax-bitempered-loss package: same k, same numbers.

Compares against the installed package (skipped when it is missing) and against the values its
own test file publishes (``jax_bitempered_loss/loss_test.py``), which need no package.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitempered import jax as bj

C = 7
ACTIVATIONS = jnp.array([[-0.5, 0.1, 2.0], [0.1, 1.5, -5.0], [4.0, -3.0, -6.0]])


@pytest.fixture(scope="module")
def original():
    return pytest.importorskip("jax_bitempered_loss.loss")


def rng(seed):
    return np.random.default_rng(seed)


@functools.partial(jax.jit, static_argnames=("num_iters",))
def ours(a, y, t1, t2, s, num_iters):
    losses, vjp = jax.vjp(lambda a: bj.bi_tempered_logistic_loss(a, y, t1, t2, s, num_iters=num_iters), a)
    return losses, vjp(jnp.ones_like(losses))[0], bj.tempered_softmax(a, t2, num_iters=num_iters)


def theirs(module, a, y, t1, t2, s, num_iters):
    losses, vjp = jax.vjp(lambda a: module.bi_tempered_logistic_loss(a, y, t1, t2, s, num_iters), a)
    return losses, vjp(jnp.ones_like(losses))[0], module.tempered_softmax(a, t2, num_iters)


@pytest.mark.parametrize("num_iters", [2, 5])
def test_num_iters_matches_the_original_package(original, num_iters):
    """Every method of the original (bisection, logsumexp, fixed point), chosen at run time."""
    normal = rng(1).standard_normal((5, C))
    y = jnp.asarray(rng(2).dirichlet(np.ones(C), 5), jnp.float32)
    for t1, t2, s in [(0.5, 0.3, 0.0), (0.8, 0.8, 0.1), (1.0, 1.0, 0.0), (0.7, 1.0, 0.0), (0.5, 1.5, 0.1),
                      (0.8, 2.0, 0.0), (1.2, 4.0, 0.0)]:
        a = jnp.asarray(normal * (0.3 if t2 < 1 else 2.0), jnp.float32)
        loss, grad, p = ours(a, y, t1, t2, s, num_iters)
        loss_o, grad_o, p_o = theirs(original, a, y, t1, t2, s, num_iters)
        np.testing.assert_allclose(p, p_o, atol=1e-5, err_msg=f"t2={t2}")
        np.testing.assert_allclose(loss, loss_o, rtol=1e-5, atol=1e-5, err_msg=f"t1={t1} t2={t2}")
        # Where an unconverged t2 < 1 normalizer leaves some p = 0, the original's gradient row is
        # NaN/inf (0 * inf in p^(t2-t1)); SPEC's closed form stays finite there.
        finite = np.all(np.isfinite(grad_o), axis=-1)
        assert np.all(np.isfinite(grad)) and finite.sum() >= 2
        np.testing.assert_allclose(grad[finite], grad_o[finite], rtol=1e-5, atol=1e-5, err_msg=f"t1={t1} t2={t2}")


def test_published_loss_values():
    labels = jnp.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.2, 0.8, 0.0]])
    np.testing.assert_allclose(bj.bi_tempered_logistic_loss(ACTIVATIONS, labels, 0.5, 1.5, num_iters=5),
                               [0.02301914, 0.18972909, 0.93874922], atol=1e-4)
    np.testing.assert_allclose(bj.bi_tempered_logistic_loss(ACTIVATIONS, labels, 0.5, 0.8, num_iters=20),
                               [0.21646356, 0.41836615, 1.33997854], atol=1e-4)
    one_hot = jnp.eye(3)
    np.testing.assert_allclose(bj.bi_tempered_logistic_loss(ACTIVATIONS, one_hot, 0.5, 1.5, label_smoothing=0.1,
                                                            num_iters=5),
                               [0.76652711, 0.08627685, 1.35443510], atol=1e-5)
    # The same with class indices instead of one-hot rows.
    np.testing.assert_allclose(bj.bi_tempered_logistic_loss(ACTIVATIONS, jnp.arange(3), 0.5, 1.5, label_smoothing=0.1,
                                                            num_iters=5),
                               [0.76652711, 0.08627685, 1.35443510], atol=1e-5)
    np.testing.assert_allclose(bj.bi_tempered_binary_logistic_loss(jnp.zeros(2), jnp.array([1.0, 0.0]), 1.0, 1.0,
                                                                   num_iters=5),
                               [0.69314718, 0.69314718], atol=1e-5)


def test_published_dynamic_temperatures_without_recompiling():
    labels = jnp.array([[0.2, 0.5, 0.3]])
    activations = jnp.array([[-0.5, 0.1, 2.0]])
    loss = jax.jit(lambda t1, t2: bj.bi_tempered_logistic_loss(activations, labels, t1, t2, num_iters=5))
    for t1, t2, expected in [(1.0, 1.0, 0.628705), (0.9, 1.1, 0.45677936), (0.8, 1.2, 0.34298314),
                             (0.7, 1.3, 0.26295574)]:
        np.testing.assert_allclose(loss(t1, t2), [expected], atol=1e-5)
    assert loss._cache_size() == 1


def test_published_tempered_softmax_and_sigmoid():
    np.testing.assert_allclose(bj.tempered_softmax(ACTIVATIONS, 1.0, num_iters=5), jax.nn.softmax(ACTIVATIONS),
                               atol=1e-6)
    np.testing.assert_allclose(bj.tempered_softmax(ACTIVATIONS, 4.0, num_iters=5),
                               [[0.3205458, 0.32714278, 0.3523402], [0.3430056, 0.36491093, 0.29220778],
                                [0.41369352, 0.30534995, 0.28299212]], atol=1e-6)
    x = jnp.array([0.0, 3.0, 6.0])
    np.testing.assert_allclose(bj.tempered_sigmoid(x, 1.0, num_iters=5), jax.nn.sigmoid(x), atol=1e-6)
    np.testing.assert_allclose(bj.tempered_sigmoid(x, 4.0, num_iters=5), [0.5, 0.58516014, 0.6421035], atol=1e-6)


def test_published_normalization_converges_at_20_iterations():
    """The original's own check (|sum p - 1| <= 1e-5 at k = 20), on fewer rows and classes."""
    a = jax.random.normal(jax.random.PRNGKey(1335), (8, 5000))
    sums = jax.jit(lambda t: bj.tempered_softmax(a, t, num_iters=20).sum(-1))
    for t in [0.1, 0.99, 1.01, 2.0]:
        np.testing.assert_allclose(sums(t), 1.0, atol=1e-5)


def test_default_converges_where_the_original_default_does_not():
    a = jnp.asarray(rng(3).standard_normal((4, 1000)) * 10.0, jnp.float32)
    converged = bj.tempered_softmax(a, 1.5)
    original_default = bj.tempered_softmax(a, 1.5, num_iters=5)
    np.testing.assert_allclose(np.asarray(converged, np.float64).sum(-1), 1.0, atol=1e-5)
    assert np.abs(np.asarray(original_default, np.float64).sum(-1) - 1.0).max() > 0.1
