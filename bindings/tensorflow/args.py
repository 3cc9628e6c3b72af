"""Argument checks and conversions of the TensorFlow binding (``bindings/jax/args.py``'s rules).

Concrete values (Python/NumPy numbers and arrays, eager tensors, graph constants) are checked and
bad input raises ValueError/TypeError naming the argument, with the messages of
``bindings/common/validation.py`` that every binding shares. Symbolic tensors inside a
``tf.function`` (Keras' ``fit``) are not checked: as traced JAX values, an out-of-range class index
then gives a NaN row loss. The class axis must have a static size (``tf.one_hot`` needs it).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from bitempered.bindings.common import validation as check


def _as_tensor(value):
    return value if isinstance(value, (tf.Tensor, tf.Variable)) else tf.convert_to_tensor(value)


def as_floating(value, name: str) -> tf.Tensor:
    """``value`` as a tensor; TypeError naming ``name`` unless it is floating."""
    value = _as_tensor(value)
    if not value.dtype.is_floating:
        raise TypeError(f"{name} must be a floating array, got dtype {value.dtype.name}")
    return value


def as_logits(logits, class_axis: bool = True) -> tf.Tensor:
    """Floating logits; with ``class_axis``, at least one axis and a static class count >= 1."""
    logits = as_floating(logits, "logits")
    if class_axis:
        if logits.shape.rank is None or (logits.shape.rank > 0 and logits.shape[-1] is None):
            raise ValueError(f"logits must have a known rank and class count (last axis), got shape {logits.shape}")
        check.check_logits_shape(tuple(logits.shape))
    return logits


def as_labels(labels) -> tf.Tensor:
    """Floating (dense) or integer (class indices) labels."""
    labels = _as_tensor(labels)
    if not (labels.dtype.is_floating or labels.dtype.is_integer):
        raise TypeError(f"labels must be floating (dense) or integer (class indices), got dtype {labels.dtype.name}")
    return labels


def _static_pair(shape_a: tf.TensorShape, shape_b: tf.TensorShape):
    """Two shapes as tuples for the shared shape checks: one merged tuple twice when they are
    compatible (unknown batch sizes inside ``fit``), else as they are (the check then raises)."""
    if shape_a.is_compatible_with(shape_b):
        merged = tuple(shape_a.merge_with(shape_b))
        return merged, merged
    return tuple(shape_a), tuple(shape_b)


def labels_are_indices(labels: tf.Tensor, logits_shape: tf.TensorShape) -> bool:
    """The label kind: True for class indices, False for dense labels (shapes checked)."""
    indices = labels.dtype.is_integer
    expected = logits_shape[:-1] if indices else logits_shape
    expected, got = _static_pair(expected, labels.shape)
    check.labels_are_indices(expected + (logits_shape[-1],) if indices else expected, got, indices)
    return indices


def check_binary_shapes(logits: tf.Tensor, labels: tf.Tensor) -> None:
    check.check_binary_shapes(*_static_pair(logits.shape, labels.shape))


def scalar(value, name: str, dtype: tf.DType, check_value) -> tuple[tf.Tensor, float | None]:
    """(0-d tensor in ``dtype``, its value in ``dtype`` if concrete else None) of a temperature-like
    argument; ``check_value`` runs on the value as given and as rounded to ``dtype`` (float32
    rounds t1 = 1.99999999 to 2.0), with the JAX binding's messages."""
    concrete = check.concrete_float(value, name)  # TypeError for bool, str, None, complex
    if concrete is None:
        value = _as_tensor(value)
        if value.shape.num_elements() != 1:
            raise TypeError(f"{name} must be a scalar (0-d array), got shape {tuple(value.shape)}")
        if not (value.dtype.is_floating or value.dtype.is_integer):
            raise TypeError(f"{name} must be a real number, got an array of dtype {value.dtype.name}")
        static = tf.get_static_value(value)
        if static is None:
            return tf.reshape(tf.cast(value, dtype), ()), None
        concrete = float(np.asarray(static).reshape(()))
    rounded = check.check_as_computed(concrete, name, check_value, dtype.name)
    # the number itself, rounded once to dtype (a Python 0.8 through float32 would be 0.800000011920929
    # in float64); a concrete tensor's value is the same number
    return tf.constant(concrete, dtype), rounded


def temperatures(t1, t2, label_smoothing, dtype):
    """(t1, t2, label_smoothing as 0-d tensors in ``dtype``, the smoothing's value or None)."""
    t1_, _ = scalar(t1, "t1", dtype, check.check_t1)
    t2_, _ = scalar(t2, "t2", dtype, lambda value: check.check_t(value, "t2"))
    s_, s_value = scalar(label_smoothing, "label_smoothing", dtype, check.check_label_smoothing)
    return t1_, t2_, s_, s_value


def check_labels(labels: tf.Tensor, indices: bool, num_classes: int, ignore_index: int | None) -> None:
    """Concrete labels' values: class indices in [0, C) or ``ignore_index``; dense labels in [0, 1]."""
    values = tf.get_static_value(labels)
    if values is None or not np.size(values):
        return
    if indices:
        check.check_index_values(values, num_classes, ignore_index)
        return
    check_dense_labels(labels, ignore_index=None, values=values)


def check_dense_labels(labels: tf.Tensor, ignore_index: int | None, values=None) -> None:
    """Dense/binary labels in [0, 1] when concrete; labels equal to ``ignore_index`` are exempt."""
    values = tf.get_static_value(labels) if values is None else values
    if values is None or not np.size(values):
        return
    if ignore_index is not None:
        values = np.where(values == ignore_index, 0, values)
    low, high = float(np.min(values)), float(np.max(values))
    check.check_dense_label_range(low, high, np.isnan(low) or np.isnan(high), "labels")
