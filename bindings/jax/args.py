"""Argument checks and conversions of the JAX binding, outside any compiled program.

Concrete values (Python/NumPy numbers and arrays, JAX arrays outside a trace) are checked and bad
input raises ValueError/TypeError naming the argument (``bindings/common/validation.py`` holds
the framework-free rules). Traced values cannot be read without a host sync and pass unchecked.
Every public JAX function (``api``, ``linear``, ``vocab_parallel``) reads its arguments here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from bitempered.bindings.common import validation as check

BACKENDS = ("auto", "xla", "triton")


def jax_triton_available() -> bool:
    try:
        import jax_triton  # noqa: F401  (imported only here and in launchers, never at module import)
    except Exception:  # ImportError, or jaxlib without GPU support failing inside jax_triton
        return False
    return True


def resolve_backend(backend, dtype) -> str:
    """"xla" or "triton", decided at trace time from the default device's platform."""
    check.check_backend(backend, BACKENDS)
    on_gpu = jax.default_backend() == "gpu"
    if backend == "auto":
        use_kernels = on_gpu and jnp.dtype(dtype) != jnp.float64 and jax_triton_available()
        return "triton" if use_kernels else "xla"
    if backend == "triton":
        if jnp.dtype(dtype) == jnp.float64:
            raise ValueError("backend='triton' computes in float32; float64 logits need backend='xla' or 'auto'")
        if not on_gpu:
            raise RuntimeError(f"backend='triton' needs a CUDA GPU (jax default backend: {jax.default_backend()})")
        if not jax_triton_available():
            raise RuntimeError("backend='triton' needs the `jax-triton` package (pip install 'bitempered[jax-gpu]')")
    return backend


def is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def scalar(value, name: str, dtype, check_value) -> tuple[jax.Array, float | None]:
    """(0-d operand in ``dtype``, its value in ``dtype`` if concrete else None) of a temperature-like
    argument. ``check_value(v)`` (a ``validation`` check) runs on the value as given and again as
    rounded to ``dtype``, the compute dtype: float32 rounds t1 = 1.99999999 to 2.0, t2 = 1e-50 to 0
    and t2 = 1e39 to inf, values that pass the check as given but not as computed."""
    concrete = check.concrete_float(value, name)  # TypeError for bool, str, None, complex
    if concrete is None:
        shape = getattr(value, "shape", None)
        value_dtype = getattr(value, "dtype", None)
        if shape is None or value_dtype is None:
            raise TypeError(f"{name} must be a real number or a 0-d array, got {type(value).__name__}")
        if int(np.prod(shape)) != 1:
            raise TypeError(f"{name} must be a scalar (0-d array), got shape {tuple(shape)}")
        if not (jnp.issubdtype(value_dtype, jnp.floating) or jnp.issubdtype(value_dtype, jnp.integer)):
            raise TypeError(f"{name} must be a real number, got an array of dtype {value_dtype}")
        if not is_traced(value):
            concrete = float(np.asarray(value).reshape(()))
    if concrete is None:
        return jnp.asarray(value, dtype=dtype).reshape(()), None
    rounded = check.check_as_computed(concrete, name, check_value, np.dtype(dtype).name)
    return jnp.asarray(value, dtype=dtype).reshape(()), rounded


ROWS_NAME = "the logits' shape without the class axis"


def temperature(value, name: str, dtype, check_value, rows_shape=None, rows_name: str = ROWS_NAME) -> jax.Array:
    """A temperature as an operand in ``dtype``: 0-d (a number, or an array of one element, as
    :func:`scalar`), or, where ``rows_shape`` is given (None: scalars only), one per row: an array
    of exactly ``rows_shape`` (``rows_name`` says what that shape is, for the error).

    Any other shape raises ValueError naming ``name`` with both shapes. A concrete per-row array
    is range-checked as a scalar is (``check_value`` on its least and greatest entries, as given
    and as rounded to ``dtype``; a NaN entry fails); a traced one is not checked."""
    if isinstance(value, (list, tuple)):
        value = np.asarray(value)
    shape = getattr(value, "shape", None)
    if rows_shape is None or shape is None or int(np.prod(shape)) == 1:
        return scalar(value, name, dtype, check_value)[0]
    if tuple(shape) != tuple(rows_shape):
        raise ValueError(f"{name} must be a scalar or one value per row, an array of shape {tuple(rows_shape)} "
                         f"({rows_name}), got shape {tuple(shape)}")
    value_dtype = value.dtype
    if not (jnp.issubdtype(value_dtype, jnp.floating) or jnp.issubdtype(value_dtype, jnp.integer)):
        raise TypeError(f"{name} must be real (floating or integer), got an array of dtype {value_dtype}")
    if not is_traced(value) and np.size(value):
        low, high, _ = _extremes(value)
        for extreme in (low, high):  # NaN when any entry is NaN: every check rejects it
            check.check_as_computed(extreme, name, check_value, np.dtype(dtype).name)
    return jnp.asarray(value, dtype=dtype)


def temperatures(t1, t2, label_smoothing, dtype, rows_shape=None, rows_name: str = ROWS_NAME):
    """(t1, t2, label_smoothing as operands in ``dtype``, the smoothing's value or None): the
    smoothing 0-d, the temperatures 0-d or, where ``rows_shape`` is given, one per row
    (:func:`temperature`)."""
    t1_ = temperature(t1, "t1", dtype, check.check_t1, rows_shape, rows_name)
    t2_ = temperature(t2, "t2", dtype, lambda value: check.check_t(value, "t2"), rows_shape, rows_name)
    s_, s_value = scalar(label_smoothing, "label_smoothing", dtype, check.check_label_smoothing)
    return t1_, t2_, s_, s_value


def as_floating(value, name: str) -> jax.Array:
    """``value`` as a JAX array; TypeError naming ``name`` unless it is floating."""
    if not hasattr(value, "dtype"):
        value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {value.dtype}")
    return jnp.asarray(value)


def as_logits(logits, class_axis: bool = True) -> jax.Array:
    """Floating logits; with ``class_axis``, at least one axis and one class."""
    logits = as_floating(logits, "logits")
    if class_axis:
        check.check_logits_shape(logits.shape)
    return logits


def as_class_logits(logits, axis) -> tuple[jax.Array, int]:
    """(floating logits with at least one class on ``axis``, that class axis as a NEGATIVE int).

    ``axis`` is the public keyword (``check.check_class_axis``: TypeError/ValueError naming
    ``axis``); negative below the API, so that a vmapped batch folded in front never moves it.
    """
    logits = as_floating(logits, "logits")
    if logits.ndim == 0:
        check.check_logits_shape(logits.shape)  # raises: a scalar has no class axis
    axis = check.check_class_axis(axis, logits.ndim, "axis")
    if logits.shape[axis] < 1:
        raise ValueError(f"logits must have at least one class (size >= 1 on the class axis {axis % logits.ndim}), "
                         f"got shape {tuple(logits.shape)}")
    return logits, axis


def as_labels(labels):
    """Floating (dense) or integer (class indices) labels; concrete labels stay on the host."""
    if not hasattr(labels, "dtype"):
        labels = np.asarray(labels)
    if not (jnp.issubdtype(labels.dtype, jnp.floating) or jnp.issubdtype(labels.dtype, jnp.integer)):
        raise TypeError(f"labels must be floating (dense) or integer (class indices), got dtype {labels.dtype}")
    return labels


def labels_are_indices(labels, logits_shape, axis: int = -1) -> bool:
    """The label kind: True for class indices (the rows' shape: the logits' shape without the
    class axis ``axis``, a negative int), False for dense labels (the logits' shape); shapes checked."""
    return check.labels_are_indices(logits_shape, labels.shape, jnp.issubdtype(labels.dtype, jnp.integer), axis)


def as_num_iters(num_iters) -> int | None:
    """None (converged) or the original algorithm's step count, as a static int."""
    check.check_num_iters(num_iters)
    return None if num_iters is None else int(num_iters)


def as_ignore_index(ignore_index) -> int | None:
    """The static ``ignore_index``: None (no row ignored) or a Python int."""
    check.check_ignore_index(ignore_index)
    return None if ignore_index is None else int(ignore_index)


def check_indices(labels, num_classes: int, ignore_index: int | None) -> None:
    """Raises on an out-of-range class index when the labels are concrete (traced: NaN rows)."""
    if is_traced(labels):
        return
    check.check_index_values(np.asarray(labels), num_classes, ignore_index)


def _extremes(values, skip=None) -> tuple[float, float, bool]:
    """(min, max, whether any is NaN) of a concrete non-empty array, over the entries other than
    ``skip`` (None: all; an entry equal to it counts as 0). Reduced where the values live (a
    device array is not copied to the host); min and max propagate NaN, so two scalars say it all."""
    xp = jnp if isinstance(values, jax.Array) else np
    with jax.ensure_compile_time_eval():  # concrete values closed over inside a trace: run now
        if skip is not None:
            values = xp.where(values == skip, 0, values)
        low, high = float(xp.min(values)), float(xp.max(values))
    return low, high, math.isnan(low) or math.isnan(high)


def check_dense_labels(labels, ignore_index: int | None = None) -> None:
    """Dense/binary labels are SPEC's values in [0, 1] when concrete (traced: unchecked); labels
    equal to ``ignore_index`` (binary loss: skipped elements) are exempt."""
    if is_traced(labels) or not np.size(labels):
        return
    check.check_dense_label_range(*_extremes(labels, ignore_index), "labels")


def _as_weights(values, name: str, check_shape):
    """None, or ``values`` as an array after ``check_shape(shape)`` and, when concrete, the
    finite-and-non-negative check (traced weights are not checked)."""
    if values is None:
        return None
    if not hasattr(values, "dtype"):
        values = np.asarray(values)
    if values.dtype == bool or not (jnp.issubdtype(values.dtype, jnp.floating)
                                    or jnp.issubdtype(values.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real (floating or integer) array, got dtype {values.dtype}")
    check_shape(tuple(values.shape))
    if not is_traced(values) and np.size(values):
        check.check_weight_values(*_extremes(values), name)
    return jnp.asarray(values)


def as_class_weight(weight, indices: bool, num_classes: int, name: str = "weight"):
    """None, or the per-class weights [C] (class-index labels only; ``num_classes``: the GLOBAL C)."""
    if weight is None:
        return None
    check.check_class_weight_labels(indices, name)
    return _as_weights(weight, name, lambda shape: check.check_class_weight_shape(shape, num_classes, name))


def as_sample_weight(sample_weight, rows_shape, rows_name: str = "logits' shape without the class axis"):
    """None, or the per-example weights, of shape ``rows_shape`` (the logits' shape without the
    class axis; the binary loss: the logits' shape, ``rows_name``)."""
    return _as_weights(sample_weight, "sample_weight",
                       lambda shape: check.check_sample_weight_shape(shape, rows_shape, rows_name))


def check_labels(labels, indices: bool, num_classes: int, ignore_index: int | None) -> None:
    """The concrete labels' values, of either kind (``labels_are_indices``): class indices in
    range (:func:`check_indices`), dense labels in [0, 1] (:func:`check_dense_labels`)."""
    if indices:
        check_indices(labels, num_classes, ignore_index)
    else:
        check_dense_labels(labels)


def widen_indices(indices: jax.Array) -> jax.Array:
    """Class indices as a fresh 32-bit (64-bit for 64-bit input) signed array, made by a scatter.

    Not a plain convert: XLA fuses a convert (ours, or one the caller wrote before passing the
    labels) into the [N, C] consumers, where broadcasting a 16-bit row value crashes XLA:CPU's LLVM
    backend ("Cannot select: v16i16 X86ISD::SUBV_BROADCAST_LOAD", jax 0.10.2 on AVX-512). XLA
    does not fuse a scatter into its consumers, so the one-hot rows read a materialized 32-bit
    array. The [N]-sized scatter costs nothing next to the [N, C] work. (Called inside the
    compiled program, on the labels the checks above let through.)
    """
    dtype = jnp.int64 if jnp.dtype(indices.dtype).itemsize == 8 else jnp.int32
    flat = indices.reshape(-1)
    wide = jnp.zeros(flat.shape, dtype).at[jnp.arange(flat.size)].set(flat.astype(dtype))
    return wide.reshape(indices.shape)
