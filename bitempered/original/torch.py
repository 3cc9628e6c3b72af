"""The original Bi-Tempered Logistic Loss API for torch tensors: ``from bitempered.original import
torch as loss`` gives the functions of jax-bitempered-loss 0.0.2 and of the TensorFlow original
(google/bi-tempered-loss ``tensorflow/loss.py``, whose ``sparse_bi_tempered_logistic_loss`` takes
class indices), with their names, argument names (``activations``, ``labels``, ``t``, ``t1``,
``t2``, ``label_smoothing``, ``num_iters``) and defaults (``num_iters=5``; 10 for the bisection).

Computed by :mod:`bitempered.torch` (Triton kernels for CUDA tensors, native torch ops otherwise;
:func:`compute_normalization`, :func:`log_t`, :func:`exp_t` always native). The losses return one
value per example (this library's ``reduction="none"``), float32 (float64 for float64
activations), and autograd uses the closed-form gradient. Temperatures may be floats or 0-d
tensors.

``num_iters=k`` runs the original algorithm with exactly k steps (fixed point for t > 1,
bisection for t < 1, logsumexp at t = 1): the originals' numbers at the same k, to rounding.
``num_iters=None`` solves the normalization to convergence, which the original's 5 steps often
miss (|sum p - 1| up to 0.47 on ordinary logits).

Where the originals are wrong, this module gives SPEC's value (``docs/math.md``) instead:

- Probabilities that are exactly 0 (t2 < 1, classes outside the finite support): the originals'
  loss is NaN there at t1 >= 1 (0 * log 0; e.g. (t1, t2) = (1.0, 0.8) with one-hot labels), and
  their gradient row NaN/inf wherever an unconverged t2 < 1 normalizer leaves some p = 0 (0 * inf
  in p^(t2 - t1)). SPEC: the limit, a zero label contributes 0 (loss and gradient), a positive
  label at t1 >= 1 gives +inf loss; the gradient is NaN-free for finite activations.
- At t1 = t2 = 1 the TensorFlow original returns the cross-entropy ``-sum y log p``, dropping the
  labels' entropy ``sum y log y`` (its published value 1.6583576 for soft labels where the JAX
  original and this module give the KL divergence 0.628705; the same with label smoothing). SPEC
  is the KL divergence, continuous in (t1, t2).
- Bad input (temperatures outside t1 in [0, 2), t2 > 0; smoothing outside [0, 1); shapes; labels
  outside [0, 1]; class indices outside [0, C)) raises ValueError/TypeError naming the argument
  where the originals return NaN or meaningless values (values in CUDA tensors are not checked,
  as in the rest of :mod:`bitempered.torch`).
- ``compute_normalization_fixed_point`` and ``compute_normalization_binary_search`` are
  :func:`compute_normalization` (keeping their own default ``num_iters``): the method follows t,
  so outside its stated domain (fixed point for t >= 1, bisection for t <= 1) the result is still
  the normalization, where the originals' is meaningless.
- Arguments are tensors (the TensorFlow original also converts nested lists).
"""

import torch

from bitempered import torch as bitempered_torch

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
    """Tempered logarithm of the tensor ``u`` (see :func:`bitempered.torch.log_t`)."""
    return bitempered_torch.log_t(u, t)


def exp_t(u, t):
    """Tempered exponential of the tensor ``u`` (see :func:`bitempered.torch.exp_t`)."""
    return bitempered_torch.exp_t(u, t)


def compute_normalization(activations, t, num_iters=5):
    """The normalization of each row of ``activations`` [..., C], shape [..., 1] (see
    :func:`bitempered.torch.compute_normalization`; ``num_iters=None``: converged)."""
    return bitempered_torch.compute_normalization(activations, t, num_iters)


def compute_normalization_fixed_point(activations, t, num_iters=5):
    """The original's method for t > 1: :func:`compute_normalization` (the method follows t)."""
    return compute_normalization(activations, t, num_iters)


def compute_normalization_binary_search(activations, t, num_iters=10):
    """The original's method for t < 1: :func:`compute_normalization` (the method follows t)."""
    return compute_normalization(activations, t, num_iters)


def tempered_softmax(activations, t, num_iters=5):
    """Tempered softmax over the last axis (see :func:`bitempered.torch.tempered_softmax`)."""
    return bitempered_torch.tempered_softmax(activations, t, num_iters)


def tempered_sigmoid(activations, t, num_iters=5):
    """Elementwise tempered sigmoid (see :func:`bitempered.torch.tempered_sigmoid`)."""
    return bitempered_torch.tempered_sigmoid(activations, t, num_iters)


def bi_tempered_logistic_loss(activations, labels, t1, t2, label_smoothing=0.0, num_iters=5):
    """Per-example loss of activations [..., C] and dense labels of the same shape, shape [...]
    (see :func:`bitempered.torch.bi_tempered_logistic_loss`)."""
    return bitempered_torch.bi_tempered_logistic_loss(activations, labels, t1, t2, label_smoothing, num_iters,
                                                      reduction="none", ignore_index=None)


def sparse_bi_tempered_logistic_loss(activations, labels, t1, t2, num_iters=5):
    """Per-example loss of activations [..., C] and integer class indices ``labels`` [...]: the
    dense loss of their one-hot rows (the TensorFlow original's function)."""
    if isinstance(labels, torch.Tensor) and (labels.is_floating_point() or labels.is_complex()):
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    return bitempered_torch.bi_tempered_logistic_loss(activations, labels, t1, t2, 0.0, num_iters, reduction="none",
                                                      ignore_index=None)


def bi_tempered_binary_logistic_loss(activations, labels, t1, t2, label_smoothing=0.0, num_iters=5):
    """Elementwise binary loss of activations and labels of one shape (see
    :func:`bitempered.torch.bi_tempered_binary_logistic_loss`)."""
    return bitempered_torch.bi_tempered_binary_logistic_loss(activations, labels, t1, t2, label_smoothing, num_iters,
                                                             reduction="none")
