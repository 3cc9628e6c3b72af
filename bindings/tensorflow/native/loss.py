"""The TensorFlow loss: per-row loss and SPEC's closed-form gradient, made together in the forward.

The terms of ``bindings/jax/native/loss.py``'s tempered branch (which at t1 = t2 = 1 is the exact
cross-entropy): no separate cross-entropy fast paths, one formula for every temperature. The
binding (``bindings/tensorflow/api.py``) wraps it in ``tf.custom_gradient``: the backward only
multiplies the stored unit gradient by the upstream gradient.
"""

from __future__ import annotations

import tensorflow as tf

from bitempered.bindings.tensorflow.native import math as native


def forward(a, y, t1, t2, num_iters: int | None):
    """(loss [N], dL/da [N, C]) of logits ``a`` [N, C] and smoothed dense labels ``y`` [N, C], both
    in the compute dtype; t1, t2: 0-d temperatures of that dtype; ``num_iters``: None (converged)
    or the original algorithm's step count."""
    log_p = native.tempered_log_softmax_rows(a, t2, num_iters)
    two_minus_t1 = 2.0 - t1
    zero = tf.zeros_like(y)
    y_log_ratio = tf.where(y > 0, y * (native.log_t(y, t1) - native.log_t_from_log(log_p, t1)), zero)
    power_gap = (tf.pow(y, two_minus_t1) - tf.exp(two_minus_t1 * log_p)) / two_minus_t1
    loss = tf.reduce_sum(y_log_ratio - power_gap, axis=-1)
    # d = (p - y) p^(t2 - t1), 0 only where p is exactly 0 (log p = -inf); an underflowed p keeps
    # p^(t2 - t1) from its finite log p (SPEC "Zero versus underflow")
    p = tf.exp(log_p)
    positive = log_p > -float("inf")
    d = tf.where(positive, (p - y) * tf.exp((t2 - t1) * tf.where(positive, log_p, zero)), zero)
    escort = tf.exp(t2 * log_p)
    ratio = tf.reduce_sum(d, axis=-1, keepdims=True) / tf.reduce_sum(escort, axis=-1, keepdims=True)
    return loss, d - escort * ratio


def class_index_labels(indices, num_classes: int, dtype, ignore_index: int | None, label_smoothing):
    """(smoothed one-hot labels [N, C], kept rows [N], invalid rows [N]) of class indices [N]:
    kept = not ``ignore_index``; invalid = kept with an index outside [0, C) (NaN rows: a concrete
    one is rejected earlier). tf.one_hot of an out-of-range index is an all-zero row (no
    out-of-bounds read)."""
    kept = tf.ones_like(indices, tf.bool) if ignore_index is None else indices != ignore_index
    invalid = kept & ((indices < 0) | (indices >= num_classes))
    onehot = tf.one_hot(tf.where(kept & ~invalid, indices, tf.zeros_like(indices)), num_classes, dtype=dtype)
    return native.smooth_labels(onehot, label_smoothing), kept, invalid


def mask_rows(loss, grad, kept, invalid):
    """Ignored rows: loss 0, gradient 0; invalid class indices: NaN."""
    nan = tf.constant(float("nan"), loss.dtype)
    loss = tf.where(kept, tf.where(invalid, nan, loss), tf.zeros_like(loss))
    grad = tf.where(kept[:, None], tf.where(invalid[:, None], nan, grad), tf.zeros_like(grad))
    return loss, grad
