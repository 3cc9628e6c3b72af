"""Float64 NumPy reference of SPEC, written independently of every backend.

Deliberately simple and slow: the normalizer is found by plain bisection on lam (200 halvings of
a bracket that provably holds the root), the loss and gradient are SPEC's formulas term by term.
Rows are the last axis; any leading shape.
"""

from __future__ import annotations

import numpy as np


def exp_t(u, t):
    u = np.asarray(u, dtype=np.float64)
    if t == 1.0:
        return np.exp(u)
    # log1p form: accurate near t = 1 too (the temperature gradients are checked by finite
    # differences in t there)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        w = (1.0 - t) * u
        return np.where(w > -1.0, np.exp(np.log1p(np.maximum(w, -1.0)) / (1.0 - t)), 0.0)


def log_t(x, t):
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        if t == 1.0:
            return np.log(x)
        return np.expm1((1.0 - t) * np.log(x)) / (1.0 - t)


def shift_by_max(a):
    """a - max(a) per row; a +inf logit becomes 0 and the other classes -inf (the limit)."""
    a = np.asarray(a, dtype=np.float64)
    mu = a.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return np.where(a == mu, 0.0, a - mu)


def normalizer_of_shifted(a0, t, halvings=200):
    """lam with sum_i exp_t(a0_i - lam) = 1 per max-shifted row, by bisection (shape [..., 1])."""
    num_classes = a0.shape[-1]
    lo = np.zeros(a0.shape[:-1] + (1,))                   # exp_t(0) = 1: the sum is >= 1
    hi = np.full_like(lo, -log_t(1.0 / num_classes, t))  # every term <= 1/C: the sum is <= 1
    for _ in range(halvings):
        mid = 0.5 * (lo + hi)
        above = exp_t(a0 - mid, t).sum(axis=-1, keepdims=True) > 1.0
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    return 0.5 * (lo + hi)


def log_tempered_softmax(a, t):
    """log p, finite wherever p > 0 in exact arithmetic (also where p underflows float64), -inf
    exactly outside the finite support (t < 1) and at -inf logits."""
    a0 = shift_by_max(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        if t == 1.0:
            top = np.where(np.isneginf(a0), 0.0, np.exp(a0))
            return a0 - np.log(top.sum(axis=-1, keepdims=True))
        w = np.maximum((1.0 - t) * (a0 - normalizer_of_shifted(a0, t)), -1.0)
        return np.log1p(w) / (1.0 - t)


def tempered_softmax(a, t):
    return np.exp(log_tempered_softmax(a, t))


def tempered_sigmoid(x, t):
    x = np.asarray(x, dtype=np.float64)
    return tempered_softmax(np.stack([np.zeros_like(x), x], axis=-1), t)[..., 1]


def smooth(y, label_smoothing):
    y = np.asarray(y, dtype=np.float64)
    if label_smoothing == 0.0:
        return y
    c = y.shape[-1]
    return (1.0 - c / (c - 1) * label_smoothing) * y + label_smoothing / (c - 1)


def one_hot(indices, num_classes, ignore_index=-100):
    indices = np.asarray(indices)
    kept = indices != ignore_index
    y = np.zeros(indices.shape + (num_classes,))
    np.put_along_axis(y, np.where(kept, indices, 0)[..., None], 1.0, axis=-1)
    return y * kept[..., None], kept


def log_t_of_log(log_x, t):
    """log_t(x) from log x (finite for an x that underflows)."""
    if t == 1.0:
        return log_x
    with np.errstate(over="ignore"):
        return np.expm1((1.0 - t) * log_x) / (1.0 - t)


def loss(a, y, t1, t2, label_smoothing=0.0):
    """Per-row loss of dense labels y (shape of a); log_t1(p) from log p (SPEC: an underflowed p
    keeps its finite log_t1, only an exact zero gives +inf for t1 >= 1, y > 0)."""
    log_p = log_tempered_softmax(a, t2)
    y = smooth(y, label_smoothing)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.where(y > 0, y * (log_t(y, t1) - log_t_of_log(log_p, t1)), 0.0)
        power = (y ** (2.0 - t1) - np.exp((2.0 - t1) * log_p)) / (2.0 - t1)
    return (cross - power).sum(axis=-1)


def loss_grad(a, y, t1, t2, label_smoothing=0.0):
    """dL/da of the per-row loss for unit upstream gradient.

    d_i = (p_i - y_i) p_i^(t2 - t1) is 0 only where p_i is exactly 0 (log p = -inf); elsewhere
    p^(t2 - t1) = exp((t2 - t1) log p), also where p underflows (SPEC "Zero versus underflow").
    """
    log_p = log_tempered_softmax(a, t2)
    p = np.exp(log_p)
    y = smooth(y, label_smoothing)
    positive = log_p > -np.inf
    with np.errstate(over="ignore", invalid="ignore"):
        d = np.where(positive, (p - y) * np.exp((t2 - t1) * np.where(positive, log_p, 0.0)), 0.0)
    escort = np.exp(t2 * log_p)
    escort = escort / escort.sum(axis=-1, keepdims=True)
    return d - escort * d.sum(axis=-1, keepdims=True)


def binary_loss(x, y, t1, t2, label_smoothing=0.0):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    logits = np.stack([np.zeros_like(x), x], axis=-1)
    labels = np.stack([1.0 - y, y], axis=-1)
    return loss(logits, labels, t1, t2, label_smoothing)
