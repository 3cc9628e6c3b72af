"""Keras 3 API of bitempered: the bi-tempered losses as ``keras.losses.Loss`` subclasses, and the
tempered softmax / sigmoid, on Keras' ``jax``, ``torch`` and ``tensorflow`` backends.

What runs where (decided at call time from ``keras.backend.backend()``):

- ``jax``: ``bitempered.jax`` (XLA, or the Triton kernels through jax-triton on a CUDA GPU);
- ``torch``: ``bitempered.torch`` (the Triton kernels on CUDA tensors, native torch ops on CPU);
- ``tensorflow``: ``bitempered.bindings.tensorflow``, SPEC in TF ops (the same solver and
  closed-form gradient as the JAX native backend, ``tf.custom_gradient``), which runs eagerly, in
  Keras' ``tf.function`` and under XLA (``jit_compile=True``).

Every backend gives the same converged values (float32 rounding). Bad settings raise at
construction with bitempered.jax's ValueError/TypeError messages; bad labels raise at an eager
call, in the backend library's words (bitempered.torch words an out-of-range class index its own
way); inside a compiled train step labels are not checked (an out-of-range index gives a NaN
loss). The losses return one value per example (``reduction="none"``) to Keras, which applies
``sample_weight``, masks and the reduction itself.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

from bitempered.extras import require

keras = require("keras", "keras", "bitempered.keras")  # without keras: an ImportError naming the extra

# Keras' own losses attach their ignored-class mask with this helper (sparse_categorical_crossentropy
# with ignore_class=...); it has no public alias in Keras 3.15. It keeps masks on JAX tracers too.
from keras.src.backend import set_keras_mask  # noqa: E402

from bitempered.bindings.common import validation as check  # noqa: E402

__all__ = ["BiTemperedLogisticLoss", "BinaryBiTemperedLogisticLoss", "tempered_sigmoid", "tempered_softmax"]

BACKENDS = ("jax", "torch", "tensorflow")


class _Functions(NamedTuple):
    """The running backend's functions, taking bitempered.jax's arguments by keyword and returning
    unreduced values (per row / per element)."""
    loss: Callable
    binary_loss: Callable
    softmax: Callable
    sigmoid: Callable


def _implementation() -> _Functions:
    backend = keras.backend.backend()
    if backend == "tensorflow":  # per-row values only: no reduction argument
        from bitempered.bindings.tensorflow import api
        return _Functions(api.bi_tempered_logistic_loss, api.bi_tempered_binary_logistic_loss, api.tempered_softmax,
                          api.tempered_sigmoid)
    if backend == "jax":
        from bitempered import jax as library
    elif backend == "torch":
        from bitempered import torch as library
    else:
        raise ValueError(f"bitempered.keras runs on the Keras backends {BACKENDS}, got {backend!r}")
    return _Functions(functools.partial(library.bi_tempered_logistic_loss, reduction="none"),
                      functools.partial(library.bi_tempered_binary_logistic_loss, reduction="none"),
                      library.tempered_softmax, library.tempered_sigmoid)


def _check_as_computed(value, name: str, check_value, dtype: str) -> None:
    """``check_value`` on ``value`` as given and as rounded to the compute dtype (float32 rounds
    t1 = 1.99999999 to 2.0), with bitempered.jax's messages, whatever the backend: bitempered.torch
    keeps Python temperatures in float64 and would accept it."""
    concrete = check.concrete_float(value, name)  # TypeError for bool, str, None, complex
    if concrete is None:  # a tensor: the settings are Python numbers (get_config saves them)
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    check.check_as_computed(concrete, name, check_value, dtype)


def _check_settings(t1, t2, label_smoothing, num_iters, loss_dtype) -> None:
    """The loss's settings, at construction: Python numbers in their domain, also as computed
    (float64 for a float64 loss, float32 otherwise, as every backend computes)."""
    dtype = "float64" if loss_dtype == "float64" else "float32"
    _check_as_computed(t1, "t1", check.check_t1, dtype)
    _check_as_computed(t2, "t2", lambda value: check.check_t(value, "t2"), dtype)
    _check_as_computed(label_smoothing, "label_smoothing", check.check_label_smoothing, dtype)
    check.check_num_iters(num_iters)


def tempered_softmax(x, t, num_iters=None):
    """SPEC's tempered softmax over the last axis of ``x`` (a tensor of the Keras backend, or an
    array), in x's dtype; rows sum to 1. ``t``: finite and > 0 (t = 1: ``keras.ops.softmax``).
    ``num_iters``: None (converged) or the original algorithm's step count k >= 1.

    A function, as ``keras.ops.softmax``: the losses take logits, so the probabilities are for
    predictions (``tempered_softmax(model.predict(x), t2)``) or inside a custom layer's ``call``;
    it has no weights, and a function needs no registration to save and load a model."""
    return _implementation().softmax(keras.ops.convert_to_tensor(x), t, num_iters=num_iters)


def tempered_sigmoid(x, t, num_iters=None):
    """Elementwise tempered sigmoid ``tempered_softmax([0, x], t)[1]`` of ``x``, in x's dtype."""
    return _implementation().sigmoid(keras.ops.convert_to_tensor(x), t, num_iters=num_iters)


@keras.saving.register_keras_serializable(package="bitempered")
class BiTemperedLogisticLoss(keras.losses.Loss):
    """Bi-tempered logistic loss (Amid et al., 2019) of logits, for ``model.compile(loss=...)``.

    ``y_pred`` are LOGITS (the model ends with a linear layer, as ``from_logits=True`` in Keras'
    cross-entropies); classes are the last axis. ``y_true`` are class indices (as
    ``SparseCategoricalCrossentropy``: shape ``y_pred.shape[:-1]``, or with a trailing axis of
    size 1) or dense labels of ``y_pred``'s shape (as ``CategoricalCrossentropy``: one-hot or any
    values in [0, 1]).

    Args:
        t1: 0 <= t1 < 2 (t1 < 1 bounds the loss). t2: finite, > 0 (t2 > 1: heavy tails). t1 = t2 = 1
            is the cross-entropy.
        label_smoothing: in [0, 1): the target gets 1 - s, every other class s/(C-1) (the original
            package's rule; Keras' cross-entropies give the target 1 - s + s/C).
        num_iters: None (default: the normalization solved to convergence) or the original
            algorithm's step count k >= 1.
        from_indices: None (default): decided from the shapes (``y_true`` of ``y_pred``'s shape:
            dense labels; one axis fewer, or a trailing axis of size 1 where ``y_pred`` has more
            than one class: class indices). True / False: class indices / dense labels. Keras
            casts ``y_true`` to the loss's dtype (float32) before ``call``, as it does for its own
            sparse losses, so indices are exact below 2**24 classes.
        ignore_class: None (default) or a class index (as Keras' ``ignore_class``, e.g. 255 in a
            segmentation map): those examples get loss 0, gradient 0, and are masked out of the
            reduction (not counted by the mean). Class indices only.
        reduction: Keras' reduction of the per-example losses ``L`` with ``sample_weight`` ``w``
            (and the ignored examples' mask, w = 0 there). Default ``"mean_with_sample_weight"``:
            sum(w L) / sum(w) (sum(L) / #examples without weights), which is
            ``bitempered.jax``'s ``reduction="mean"`` with ``sample_weight=w`` (except that Keras
            returns 0, not NaN, when sum(w) = 0). ``"sum_over_batch_size"`` (Keras' default for
            its own losses) divides sum(w L) by the number of examples instead; also ``"sum"``,
            ``"none"``/None.
        name, dtype: as ``keras.losses.Loss``.
    """

    def __init__(self, t1, t2, label_smoothing=0.0, num_iters=None, from_indices=None, ignore_class=None,
                 reduction="mean_with_sample_weight", name="bi_tempered_logistic_loss", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        _check_settings(t1, t2, label_smoothing, num_iters, self.dtype)
        if from_indices not in (None, True, False):
            raise TypeError(f"from_indices must be None, True or False, got {from_indices!r}")
        check.check_ignore_index(ignore_class)
        if ignore_class is not None and from_indices is False:
            raise ValueError("ignore_class needs class-index labels, got from_indices=False")
        self.t1, self.t2, self.label_smoothing, self.num_iters = t1, t2, label_smoothing, num_iters
        self.from_indices, self.ignore_class = from_indices, ignore_class

    def _indices(self, y_true, y_pred) -> bool:
        if self.from_indices is not None:
            return self.from_indices
        rank_true, rank_pred = len(y_true.shape), len(y_pred.shape)
        trailing_one = rank_true == rank_pred and y_true.shape[-1] == 1 and y_pred.shape[-1] != 1
        return rank_true == rank_pred - 1 or trailing_one

    def call(self, y_true, y_pred):
        loss_fn = _implementation().loss
        if not self._indices(y_true, y_pred):
            if self.ignore_class is not None:
                raise ValueError("ignore_class needs class-index labels, got dense labels of the logits' shape "
                                 f"{tuple(y_true.shape)}")
            return loss_fn(y_pred, y_true, self.t1, self.t2, label_smoothing=self.label_smoothing,
                           num_iters=self.num_iters, ignore_index=None)
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == 1:
            y_true = keras.ops.squeeze(y_true, axis=-1)
        indices = keras.ops.cast(y_true, "int32")
        losses = loss_fn(y_pred, indices, self.t1, self.t2, label_smoothing=self.label_smoothing,
                         num_iters=self.num_iters, ignore_index=self.ignore_class)
        if self.ignore_class is not None:
            set_keras_mask(losses, keras.ops.not_equal(indices, self.ignore_class))
        return losses

    def get_config(self):
        return {**super().get_config(), "t1": self.t1, "t2": self.t2, "label_smoothing": self.label_smoothing,
                "num_iters": self.num_iters, "from_indices": self.from_indices, "ignore_class": self.ignore_class}


@keras.saving.register_keras_serializable(package="bitempered")
class BinaryBiTemperedLogisticLoss(keras.losses.Loss):
    """Binary bi-tempered loss of logits: per element the 2-class loss of logits [0, x] and labels
    [1 - y, y], averaged over the last axis as ``keras.losses.BinaryCrossentropy`` does (so a
    model output of shape (N, 1) or (N, K) gets one loss per example, and ``sample_weight`` one
    weight per example).

    ``y_pred`` are LOGITS (no sigmoid layer); ``y_true`` (values in [0, 1]) has ``y_pred``'s shape.
    ``t1``, ``t2``, ``num_iters``, ``reduction``, ``name``, ``dtype``: as
    :class:`BiTemperedLogisticLoss` (default reduction ``"mean_with_sample_weight"``: sum(w L) /
    sum(w) of the per-example losses). ``label_smoothing`` in [0, 1) uses C = 2 (label y becomes
    y (1 - 2s) + s, as the original package; Keras' BinaryCrossentropy: y (1 - s) + s/2).
    """

    def __init__(self, t1, t2, label_smoothing=0.0, num_iters=None, reduction="mean_with_sample_weight",
                 name="binary_bi_tempered_logistic_loss", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        _check_settings(t1, t2, label_smoothing, num_iters, self.dtype)
        self.t1, self.t2, self.label_smoothing, self.num_iters = t1, t2, label_smoothing, num_iters

    def call(self, y_true, y_pred):
        losses = _implementation().binary_loss(y_pred, y_true, self.t1, self.t2, label_smoothing=self.label_smoothing,
                                      num_iters=self.num_iters)
        return keras.ops.mean(losses, axis=-1)

    def get_config(self):
        return {**super().get_config(), "t1": self.t1, "t2": self.t2, "label_smoothing": self.label_smoothing,
                "num_iters": self.num_iters}
