"""SPEC's closed-form gradient against float64 central finite differences of the converged loss.

Runs in float64 (x64), where the converged solver is exact to a few ulp, so the finite differences
resolve the gradient to ~1e-9 and the bar is 1e-6 relative. All perturbed copies of the logits go
through one batched call (the leading axes), so the whole grid costs four compiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitempered import jax as bj

T1S = [0.0, 0.5, 0.8, 1.0, 1.5]
T2S = [0.3, 0.8, 1.0, 1.2, 2.0, 4.0]
ROWS, C = 3, 5
STEP = 1e-5


@jax.jit
def loss_grad_and_differences(a, labels, t1, t2, label_smoothing):
    """(analytic gradient of the summed loss, its central finite differences), both [ROWS, C]."""
    def loss(a):
        y = jnp.broadcast_to(labels, a.shape[:-2] + labels.shape)
        return bj.bi_tempered_logistic_loss(a, y, t1, t2, label_smoothing=label_smoothing).sum(-1)

    grad = jax.grad(loss)(a)
    steps = STEP * jnp.eye(ROWS * C, dtype=a.dtype).reshape(ROWS * C, ROWS, C)
    differences = (loss(a + steps) - loss(a - steps)) / (2 * STEP)  # loss of each perturbed copy
    return grad, differences.reshape(ROWS, C)


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("labels_kind", ["dense", "indices"])
def test_gradient_matches_finite_differences(labels_kind, smoothing):
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        if labels_kind == "dense":
            labels = jnp.asarray(rng.random((ROWS, C)), jnp.float64)  # need not sum to 1
        else:
            labels = jnp.asarray([0, 3, 4], jnp.int32)
        for t2 in T2S:
            # For t2 < 1 every class stays inside the support (p_i > 0 iff a_i - lam > -1/(1-t2),
            # lam <= -log_t2(1/C)): a class on the support boundary is a kink that finite
            # differences cannot resolve. Spread 0.3 is safe down to t2 = 0.3 at C = 5.
            a = jnp.asarray(rng.uniform(-0.5, 0.5, (ROWS, C)) * (0.3 if t2 < 1 else 4.0), jnp.float64)
            for t1 in T1S:
                grad, differences = loss_grad_and_differences(a, labels, t1, t2, smoothing)
                error = np.abs(np.asarray(grad) - np.asarray(differences)).max() / np.abs(differences).max()
                assert error <= 1e-6, (t1, t2, error)


@pytest.mark.parametrize("t1,t2", [(1.5, 0.5), (1.2, 0.3), (0.5, 0.2)])
def test_finite_gradient_below_and_above_one(t1, t2):
    """t2 < 1 < t1 (and t2 < t1) with classes outside the support: no 0 * inf, no NaN."""
    a = jnp.asarray([[4.0, 0.0, -10.0, 3.9, -30.0], [0.0, -8.0, -9.0, 0.1, 0.2], [1.0, 1.0, 1.0, 1.0, -50.0]],
                    jnp.float32)
    grad = jax.grad(lambda a: bj.bi_tempered_logistic_loss(a, jnp.asarray([0, 1, 2]), t1, t2,
                                                           label_smoothing=0.1).sum())(a)
    assert np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[0, [2, 4]] == 0)  # p = 0 classes get no gradient
