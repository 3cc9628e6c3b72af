"""Argument checks shared by every binding (framework-free: plain Python and NumPy scalars).

Each check raises ValueError/TypeError naming the argument and its allowed range, as
SPEC "Domain and bad input" asks. Values that are only known at run time (traced JAX scalars,
CUDA tensors) are passed as ``None`` by the bindings and skipped here: checking them would
need a host sync.
"""

from __future__ import annotations

import math
import numbers

REDUCTIONS = ("none", "sum", "mean")
INT64_MAX = 2**63 - 1  # the largest int a kernel or a torch op argument holds


def concrete_float(value, name: str):
    """Returns ``value`` as a Python float, or None if it is not a concrete host number."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got bool {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (str, bytes, complex)) or value is None:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return None


def check_as_computed(value: float, name: str, check_value, dtype_name: str) -> float:
    """``check_value`` (a check of this module) on a concrete ``value`` as given and again as rounded
    to the compute dtype ``dtype_name`` ("float32" or "float64"): float32 rounds t1 = 1.99999999 to
    2.0, t2 = 1e-50 to 0 and t2 = 1e39 to inf, values that pass as given but not as computed.
    Returns the rounded value."""
    import numpy as np  # (the only check that needs NumPy's rounding)

    check_value(value)
    with np.errstate(over="ignore"):  # 1e39 -> inf in float32: reported by the check below
        rounded = float(np.asarray(value, dtype=np.dtype(dtype_name)))
    try:
        check_value(rounded)
    except ValueError as error:
        raise ValueError(f"{name} = {value!r} is {rounded!r} in {dtype_name} (the compute dtype): {error}") from None
    return rounded


def check_index_values(indices, num_classes: int, ignore_index: int | None) -> None:
    """Concrete class indices (a NumPy array) lie in [0, C) or equal ``ignore_index`` (None: no
    exception); ValueError with the first bad one and their count."""
    bad = (indices < 0) | (indices >= num_classes)
    if ignore_index is not None:
        bad &= indices != ignore_index
    if bad.any():
        allowed = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
        raise ValueError(f"labels (class indices) must be in [0, {num_classes}){allowed}, "
                         f"got {indices[bad].reshape(-1)[0]} ({int(bad.sum())} bad entries)")


def check_t(value, name: str) -> None:
    """Tempered-softmax temperature: finite t > 0 (t2 of the loss; t = inf gave NaN everywhere)."""
    if value is not None and not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be > 0 and finite, got {value}")


def check_t1(value) -> None:
    if value is not None and not 0.0 <= value < 2.0:
        raise ValueError(f"t1 must be in [0, 2), got {value}")


def check_label_smoothing(value) -> None:
    if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {value}")


def check_num_iters(num_iters) -> None:
    if num_iters is None:
        return
    if isinstance(num_iters, bool) or not isinstance(num_iters, numbers.Integral):
        raise TypeError(f"num_iters must be None or an int >= 1, got {num_iters!r}")
    if not 1 <= num_iters <= INT64_MAX:
        raise ValueError(f"num_iters must be None or an int in [1, 2**63 - 1], got {num_iters}")


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_backend(backend, allowed: tuple[str, ...]) -> None:
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")


def check_logits_shape(shape) -> None:
    if len(shape) == 0:
        raise ValueError("logits must have at least one axis (classes are the last axis), got a scalar")
    if shape[-1] < 1:
        raise ValueError(f"logits must have at least one class (last axis >= 1), got shape {tuple(shape)}")


def check_class_axis(axis, ndim: int, name: str = "dim") -> int:
    """The class axis of ``ndim``-axis logits as a NEGATIVE index (-1 = the last axis).

    Negative because a leading axis added later (a vmapped batch folded into the rows) must not
    move it. ``name`` is the argument's name in the caller's API (torch ``dim``, JAX ``axis``).
    """
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int (the class axis of the logits), got {axis!r}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name} must be in [{-ndim}, {ndim}) for {ndim}-axis logits (the class axis), "
                         f"got {axis}")
    return axis - ndim if axis >= 0 else axis


def without_axis(shape, axis: int) -> tuple:
    """``shape`` without ``axis`` (the rows' shape of logits whose classes are on ``axis``)."""
    shape = tuple(shape)
    axis = axis % len(shape)
    return shape[:axis] + shape[axis + 1:]


def labels_are_indices(logits_shape, labels_shape, labels_is_integer: bool, axis: int = -1,
                       axis_label: str | None = None) -> bool:
    """True for integer class indices, False for dense labels; raises on a shape mismatch. ``axis``:
    the class axis (negative); ``axis_label``: how the message names it (e.g. "dim=1")."""
    logits_shape, labels_shape = tuple(logits_shape), tuple(labels_shape)
    if labels_is_integer:
        rows_shape = without_axis(logits_shape, axis)
        if labels_shape != rows_shape:
            where = ("the last axis:" if axis == -1 else
                     f"the class axis {axis_label or axis % len(logits_shape)}, {rows_shape}:")
            raise ValueError(
                f"integer labels (class indices) must have the logits' shape without {where} "
                f"labels shape {labels_shape}, logits shape {logits_shape}")
        return True
    if labels_shape != logits_shape:
        raise ValueError(
            "dense (floating) labels must have the logits' shape: "
            f"labels shape {labels_shape}, logits shape {logits_shape}")
    return False


def check_smoothing_classes(label_smoothing, num_classes: int) -> None:
    if label_smoothing is not None and label_smoothing > 0.0 and num_classes < 2:
        raise ValueError(
            f"label_smoothing > 0 needs at least 2 classes, got {num_classes} (label_smoothing="
            f"{label_smoothing})")


def check_dense_label_range(low: float, high: float, has_nan: bool, name: str = "labels") -> None:
    """Dense (and binary) labels are SPEC's values in [0, 1]; ``low``/``high`` are their extremes
    ignoring NaN."""
    if has_nan or not (0.0 <= low and high <= 1.0):
        raise ValueError(f"{name} (dense/binary) must hold values in [0, 1], got "
                         + ("NaN" if has_nan else f"values from {low} to {high}"))


def check_binary_shapes(logits_shape, labels_shape) -> None:
    if tuple(logits_shape) != tuple(labels_shape):
        raise ValueError(
            "binary labels must have the logits' shape: "
            f"labels shape {tuple(labels_shape)}, logits shape {tuple(logits_shape)}")


def check_linear_shapes(hidden_shape, weight_shape) -> None:
    """hidden [..., H] and weight [C, H] (the nn.Linear layout) of the fused linear losses."""
    hidden_shape, weight_shape = tuple(hidden_shape), tuple(weight_shape)
    if len(hidden_shape) < 1:
        raise ValueError("hidden must have at least one axis ([..., H]), got a scalar")
    if len(weight_shape) != 2:
        raise ValueError(f"weight must be [C, H] (the nn.Linear layout), got shape {weight_shape}")
    if weight_shape[0] < 1:
        raise ValueError(f"weight must have at least one class (C >= 1), got shape {weight_shape}")
    if hidden_shape[-1] < 1:
        raise ValueError(f"hidden must have at least one feature (H >= 1), got shape {hidden_shape}")
    if hidden_shape[-1] != weight_shape[1]:
        raise ValueError(f"hidden's last dim ({hidden_shape[-1]}) must equal weight's second dim "
                         f"(weight [C, H] = {weight_shape}); hidden shape {hidden_shape}")


def check_ignore_index(ignore_index) -> None:
    """None (no row is ignored: every class index is a target) or an int within int64."""
    if ignore_index is None:
        return
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be None or an int, got {ignore_index!r}")
    if not -INT64_MAX - 1 <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 ([-2**63, 2**63 - 1]), got {ignore_index}")


# Why per-class weights need class indices. Each class term of the loss (docs/math.md) is the
# scalar Bregman divergence D(y_i, p_i) of phi(u) = (u^(2-t1) / (2-t1) - u) / (1-t1), so weighting
# those terms would stay proper; but that is not F.cross_entropy's weighting of probability targets
# (which drops the -y_i + p_i terms, no longer cancelling once weighted), and F.cross_entropy's own
# is not proper. Class indices have one weight per row (weight[target]), which is both.
CLASS_WEIGHT_NEEDS_INDICES = (
    "{name}= (per-class weights) is supported with class-index labels only: with dense labels, "
    "F.cross_entropy's weighting sum_i w_i y_i log p_i is not a proper loss (minimized at p proportional "
    "to w * y, not at p = y), and weighting this loss's per-class Bregman terms instead would differ from "
    "F.cross_entropy(weight=...) at t1 = t2 = 1; weight rows with sample_weight= instead")


def check_class_weight_labels(labels_are_indices: bool, name: str = "weight") -> None:
    """Per-class weights (``name``) need class-index labels: :data:`CLASS_WEIGHT_NEEDS_INDICES`."""
    if not labels_are_indices:
        raise ValueError(CLASS_WEIGHT_NEEDS_INDICES.format(name=name))


def check_class_weight_shape(shape, num_classes: int, name: str = "weight") -> None:
    """Per-class weights: a 1-D array of the C (GLOBAL, when the classes are sharded) class weights."""
    if tuple(shape) != (num_classes,):
        raise ValueError(f"{name} must be a 1-D array of the {num_classes} class weights (shape "
                         f"({num_classes},)), got shape {tuple(shape)}")


def check_sample_weight_shape(shape, rows_shape, rows_name: str = "logits' shape without the class axis") -> None:
    """Per-example weights: one weight per row, ``rows_shape`` (the logits' shape without the class
    axis; the binary loss's elements: the logits' shape, ``rows_name``)."""
    if tuple(shape) != tuple(rows_shape):
        raise ValueError(f"sample_weight must have the {rows_name} {tuple(rows_shape)}, got shape {tuple(shape)}")


def check_weight_values(low: float, high: float, has_nan: bool, name: str) -> None:
    """Weights (per class or per example) are finite and >= 0; ``low``/``high``: their extremes."""
    if has_nan or not (0.0 <= low and math.isfinite(high)):
        raise ValueError(f"{name} must hold finite values >= 0, got "
                         + ("NaN" if has_nan else f"values from {low} to {high}"))
