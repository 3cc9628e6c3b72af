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


def labels_are_indices(logits_shape, labels_shape, labels_is_integer: bool) -> bool:
    """True for integer class indices, False for dense labels; raises on a shape mismatch."""
    logits_shape, labels_shape = tuple(logits_shape), tuple(labels_shape)
    if labels_is_integer:
        if labels_shape != logits_shape[:-1]:
            raise ValueError(
                "integer labels (class indices) must have the logits' shape without the last axis: "
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
