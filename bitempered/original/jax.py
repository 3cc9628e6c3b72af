"""Drop-in for jax-bitempered-loss 0.0.2: ``from bitempered.original import jax as loss`` replaces
``from jax_bitempered_loss import loss``.

The original's public names, argument names (``activations``, ``labels``, ``t``, ``t1``, ``t2``,
``label_smoothing``, ``num_iters``) and defaults (``num_iters=5``; 10 for the bisection), with the
TensorFlow original's ``sparse_bi_tempered_logistic_loss`` (class-index labels), computed by
:mod:`bitempered.jax`. As in the original, the losses return one value per example (this
library's ``reduction="none"``), float32 (float64 for float64 activations), and differentiate
with the closed-form gradient; temperatures may be traced (``jax.jit``) without recompiling.

``num_iters=k`` runs the original algorithm with exactly k steps (fixed point for t > 1,
bisection for t < 1, logsumexp at t = 1): the original's numbers at the same k, to rounding.
``num_iters=None`` solves the normalization to convergence, which the original's 5 steps often
miss (|sum p - 1| up to 0.47 on ordinary logits).

Where the original is wrong, this module gives SPEC's value (``docs/math.md``) instead:

- Probabilities that are exactly 0 (t2 < 1, classes outside the finite support): the original's
  loss is NaN there at t1 >= 1 (0 * log 0; e.g. (t1, t2) = (1.0, 0.8) with one-hot labels), and its
  gradient row NaN/inf wherever an unconverged t2 < 1 normalizer leaves some p = 0 (0 * inf in
  p^(t2 - t1)). SPEC: the limit, a zero label contributes 0 (loss and gradient), a positive label at
  t1 >= 1 gives +inf loss; the gradient is NaN-free for finite activations.
- At t1 = t2 = 1 the TensorFlow original returns the cross-entropy ``-sum y log p``, dropping the
  labels' entropy ``sum y log y`` (its published value 1.6583576 for soft labels where the JAX
  original and this module give the KL divergence 0.628705; the same with label smoothing). SPEC
  is the KL divergence, continuous in (t1, t2).
- Bad input (temperatures outside t1 in [0, 2), t2 > 0; smoothing outside [0, 1); shapes; labels
  outside [0, 1]; class indices outside [0, C)) raises ValueError/TypeError naming the argument
  where the original returns NaN or meaningless values (traced values are not checked, as in the
  rest of :mod:`bitempered.jax`).
- ``compute_normalization_fixed_point`` and ``compute_normalization_binary_search`` are
  :func:`compute_normalization` (keeping their own default ``num_iters``): the method follows t,
  so outside its stated domain (fixed point for t >= 1, bisection for t <= 1) the result is still
  the normalization, where the original's is meaningless.

Not provided: the original's ``compute_tempered_normalization`` (the t != 1 dispatcher) and
``bi_tempered_logistic_loss_fwd``/``_bwd`` (the internals of its ``jax.custom_vjp``).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

from bitempered import jax as bitempered_jax

__all__ = [
    "bi_tempered_binary_logistic_loss",
    "bi_tempered_logistic_loss",
    "compute_normalization",
    "compute_normalization_binary_search",
    "compute_normalization_fixed_point",
    "exp_t",
    "log_t",
    "sparse_bi_tempered_logistic_loss",
    "tempered_sigmoid",
    "tempered_softmax",
]


def log_t(u, t):
    """Tempered logarithm of ``u`` (see :func:`bitempered.jax.log_t`)."""
    return bitempered_jax.log_t(u, t)


def exp_t(u, t):
    """Tempered exponential of ``u`` (see :func:`bitempered.jax.exp_t`)."""
    return bitempered_jax.exp_t(u, t)


def compute_normalization(activations, t, num_iters=5):
    """The normalization of each row of ``activations`` [..., C], shape [..., 1] (see
    :func:`bitempered.jax.compute_normalization`; ``num_iters=None``: converged)."""
    return bitempered_jax.compute_normalization(activations, t, num_iters)


def compute_normalization_fixed_point(activations, t, num_iters=5):
    """The original's method for t > 1: :func:`compute_normalization` (the method follows t)."""
    return compute_normalization(activations, t, num_iters)


def compute_normalization_binary_search(activations, t, num_iters=10):
    """The original's method for t < 1: :func:`compute_normalization` (the method follows t)."""
    return compute_normalization(activations, t, num_iters)


def tempered_softmax(activations, t, num_iters=5):
    """Tempered softmax over the last axis (see :func:`bitempered.jax.tempered_softmax`)."""
    return bitempered_jax.tempered_softmax(activations, t, num_iters)


def tempered_sigmoid(activations, t, num_iters=5):
    """Elementwise tempered sigmoid (see :func:`bitempered.jax.tempered_sigmoid`)."""
    return bitempered_jax.tempered_sigmoid(activations, t, num_iters)


def bi_tempered_logistic_loss(activations, labels, t1, t2, label_smoothing=0.0, num_iters=5):
    """Per-example loss of activations [..., C] and dense labels of the same shape, shape [...]
    (see :func:`bitempered.jax.bi_tempered_logistic_loss`)."""
    return bitempered_jax.bi_tempered_logistic_loss(activations, labels, t1, t2, label_smoothing, num_iters,
                                                    ignore_index=None)


def sparse_bi_tempered_logistic_loss(activations, labels, t1, t2, num_iters=5):
    """Per-example loss of activations [..., C] and integer class indices ``labels`` [...]: the
    dense loss of their one-hot rows (the TensorFlow original's function)."""
    labels_dtype = labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype
    if not jnp.issubdtype(labels_dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {labels_dtype}")
    return bitempered_jax.bi_tempered_logistic_loss(activations, labels, t1, t2, 0.0, num_iters, ignore_index=None)


def bi_tempered_binary_logistic_loss(activations, labels, t1, t2, label_smoothing=0.0, num_iters=5):
    """Elementwise binary loss of activations and labels of one shape (see
    :func:`bitempered.jax.bi_tempered_binary_logistic_loss`)."""
    return bitempered_jax.bi_tempered_binary_logistic_loss(activations, labels, t1, t2, label_smoothing, num_iters)


def _cross_entropy_loss(logits, labels):
    """KL(labels || softmax(logits)) per row: the original's private helper, kept because its
    published test file calls it (plain ``jax.nn``, independent of this library)."""
    return jnp.sum(xlogy(labels, labels) - labels * jax.nn.log_softmax(logits), axis=-1)
