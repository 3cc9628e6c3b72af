"""TensorFlow functions of bitempered: what ``bitempered.keras`` runs on Keras' tensorflow backend.

Each checks its arguments (``args.py``) and runs the native math (``native/``) under
``tf.custom_gradient``: the forward makes the loss and SPEC's closed-form gradient together, the
backward multiplies that by the upstream gradient. Classes are the last axis (any leading axes).
They work eagerly, in ``tf.function`` and in ``tf.function(jit_compile=True)``; temperatures are
operands (Python numbers or 0-d tensors), constants for differentiation (gradients flow to the
logits only). Losses are per row (per element for the binary loss), ``reduction="none"`` of
``bitempered.jax``: Keras applies its own reduction and sample weights. float16/bfloat16/float32
compute in float32 (float64 in float64); the loss is returned in the compute dtype, the gradient
and the probabilities in the logits' dtype.
"""

from __future__ import annotations

import tensorflow as tf

from bitempered.bindings.common import validation as check
from bitempered.bindings.tensorflow import args
from bitempered.bindings.tensorflow.native import loss as native_loss
from bitempered.bindings.tensorflow.native import math as native

__all__ = ["bi_tempered_binary_logistic_loss", "bi_tempered_logistic_loss", "tempered_sigmoid", "tempered_softmax"]


def _softmax_with_gradient(logits, t, num_iters):
    """Tempered softmax over the last axis with the closed-form vector-Jacobian product."""
    @tf.custom_gradient
    def softmax(x):
        p = tf.exp(native.tempered_log_softmax_rows(tf.cast(x, t.dtype), t, num_iters))

        def backward(grad_p):
            return tf.cast(native.tempered_softmax_vjp_rows(p, tf.cast(grad_p, p.dtype), t), x.dtype)

        return tf.cast(p, x.dtype), backward

    return softmax(logits)


def _probability_args(logits, t, num_iters, class_axis: bool):
    logits = args.as_logits(logits, class_axis=class_axis)
    check.check_num_iters(num_iters)
    t_, _ = args.scalar(t, "t", native.compute_dtype(logits.dtype), lambda value: check.check_t(value, "t"))
    return logits, t_


def tempered_softmax(logits, t, num_iters=None):
    """SPEC's tempered softmax over the last axis, in the logits' dtype (``bitempered.jax``'s).

    Args:
        logits: [..., C] floating tensor, C >= 1 and static.
        t: temperature, finite and > 0 (a float or a 0-d tensor; symbolic values are not checked).
        num_iters: None (default: converged) or the original algorithm's step count k >= 1.
    """
    logits, t_ = _probability_args(logits, t, num_iters, class_axis=True)
    return _softmax_with_gradient(logits, t_, num_iters)


def tempered_sigmoid(logits, t, num_iters=None):
    """Elementwise tempered sigmoid ``tempered_softmax([0, x], t)[1]``, in the logits' dtype."""
    logits, t_ = _probability_args(logits, t, num_iters, class_axis=False)
    rows = tf.stack([tf.zeros_like(logits), logits], axis=-1)
    return _softmax_with_gradient(rows, t_, num_iters)[..., 1]


def _loss_with_gradient(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index):
    """Per-row losses of ``logits`` [..., C] and integer or dense ``labels``, with their gradient."""
    num_classes = logits.shape[-1]
    dtype = t1.dtype

    @tf.custom_gradient
    def loss_of(x):
        rows = tf.reshape(tf.cast(x, dtype), (-1, num_classes))
        if labels.dtype.is_integer:
            y, kept, invalid = native_loss.class_index_labels(tf.reshape(labels, (-1,)), num_classes, dtype,
                                                              ignore_index, label_smoothing)
            loss, grad = native_loss.mask_rows(*native_loss.forward(rows, y, t1, t2, num_iters), kept, invalid)
        else:
            y = native.smooth_labels(tf.reshape(tf.cast(labels, dtype), (-1, num_classes)), label_smoothing)
            loss, grad = native_loss.forward(rows, y, t1, t2, num_iters)

        def backward(upstream):
            scaled = tf.reshape(tf.cast(upstream, dtype), (-1, 1)) * grad
            return tf.cast(tf.reshape(scaled, tf.shape(x)), x.dtype)

        return tf.reshape(loss, tf.shape(x)[:-1]), backward

    return loss_of(logits)


def bi_tempered_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None, ignore_index=-100):
    """Per-row bi-tempered logistic loss, ``bitempered.jax.bi_tempered_logistic_loss(...,
    reduction="none")`` in TensorFlow (its arguments and checks).

    Args:
        logits: [..., C] floating tensor (C static).
        labels: integer class indices of shape ``logits.shape[:-1]`` (rows equal to ``ignore_index``
            get loss 0 and gradient 0; concrete indices outside [0, C) raise, symbolic ones give a
            NaN row), or dense floating labels of the logits' shape, values in [0, 1].
        t1: 0 <= t1 < 2. t2: finite, > 0. label_smoothing: in [0, 1) (reference convention:
            target 1 - s, every other class s/(C-1); needs C >= 2 when > 0). Floats or 0-d tensors.
        num_iters: None (converged, default) or the original algorithm's step count k >= 1.
        ignore_index: int (default -100) or None (no row ignored).

    Returns:
        Losses of shape ``logits.shape[:-1]``, float32 (float64 for float64 logits).
    """
    logits = args.as_logits(logits)
    labels = args.as_labels(labels)
    indices = args.labels_are_indices(labels, logits.shape)
    check.check_num_iters(num_iters)
    check.check_ignore_index(ignore_index)
    t1_, t2_, s_, s_value = args.temperatures(t1, t2, label_smoothing, native.compute_dtype(logits.dtype))
    check.check_smoothing_classes(s_value, logits.shape[-1])
    args.check_labels(labels, indices, logits.shape[-1], ignore_index)
    return _loss_with_gradient(logits, labels, t1_, t2_, s_, num_iters, ignore_index)


def bi_tempered_binary_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None, ignore_index=None):
    """Elementwise binary bi-tempered loss: the 2-class loss of logits [0, x], labels [1 - y, y]
    (``bitempered.jax``'s with ``reduction="none"``). ``logits`` (floating) and ``labels`` (real,
    in [0, 1]) share one shape; elements whose label equals ``ignore_index`` (None: none) get
    loss 0 and gradient 0. Smoothing uses C = 2."""
    logits = args.as_logits(logits, class_axis=False)
    labels = args.as_labels(labels)
    args.check_binary_shapes(logits, labels)
    check.check_num_iters(num_iters)
    check.check_ignore_index(ignore_index)
    t1_, t2_, s_, _ = args.temperatures(t1, t2, label_smoothing, native.compute_dtype(logits.dtype))
    args.check_dense_labels(labels, ignore_index)
    labels = tf.cast(labels, t1_.dtype)
    if ignore_index is not None:  # skipped elements: logit and label 0 (no NaN from a 255 label), loss 0
        kept = labels != ignore_index
        logits, labels = tf.where(kept, logits, tf.zeros_like(logits)), tf.where(kept, labels, tf.zeros_like(labels))
    rows = tf.stack([tf.zeros_like(logits), logits], axis=-1)
    loss = _loss_with_gradient(rows, tf.stack([1.0 - labels, labels], axis=-1), t1_, t2_, s_, num_iters, None)
    return loss if ignore_index is None else tf.where(kept, loss, tf.zeros_like(loss))
