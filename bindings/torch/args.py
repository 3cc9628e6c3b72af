"""Argument checks and conversions of the PyTorch binding, shared by the plain (``api``), fused
linear (``linear``) and vocab-parallel (``vocab_parallel``) losses, so that each check and its
message is written once. Bad input raises ValueError/TypeError naming the argument
(``bindings/common/validation.py`` holds the framework-free rules).

Values held in CUDA tensors (reading them would cost a host sync) and values traced by
``torch.compile`` are not read here (``checkable``); under ``torch.func.vmap`` every sample's values
are.
"""

from __future__ import annotations

import numbers
import os
from typing import NamedTuple

import torch

from bitempered.bindings.common import validation as check
from bitempered.bindings.torch.native import math as native

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"torch" or "triton": ``backend`` checked against the tensors' device and dtype ("auto":
    the Triton kernels for CUDA tensors below float64, native ops otherwise)."""
    check.check_backend(backend, BACKENDS)
    if backend == "auto":
        use_kernels = device.type == "cuda" and dtype != torch.float64 and triton_available()
        return "triton" if use_kernels else "torch"
    if backend == "triton":
        if dtype == torch.float64:
            raise ValueError("backend='triton' computes in float32; float64 logits need backend='torch' or 'auto'")
        if not triton_available():
            raise RuntimeError("backend='triton' needs the `triton` package (pip install triton)")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' on CPU tensors runs Triton's interpreter, which must be switched on "
                "with TRITON_INTERPRET=1 before triton is imported; use backend='torch' on CPU instead")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports CUDA (and interpreted CPU) tensors, got {device}")
    return backend


def checkable(tensor: torch.Tensor):
    """The concrete values behind ``tensor`` (unwrapped from torch.func transforms), or None where
    reading them would cost a host sync (CUDA) or a graph break (torch.compile)."""
    if tensor.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    while torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)  # vmap: every sample's values
    return tensor.detach()


def scalar_tensor(value, name: str, device: torch.device, check_value):
    """(0-d float64 tensor, its concrete value or None) of a temperature-like argument, checked with
    ``check_value`` where that costs no sync."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float or a 0-d floating tensor, got {value.dtype} of shape "
                            f"{tuple(value.shape)}")
        values = checkable(value)
        concrete = None
        if values is not None:
            for v in values.reshape(-1).tolist():  # one value, or one per vmapped sample
                check_value(v)
            concrete = float(values.reshape(-1)[0]) if values.numel() == 1 else None
        tensor = value.reshape(())
    else:
        concrete = check.concrete_float(value, name)
        check_value(concrete)
        tensor = torch.tensor(concrete, dtype=torch.float64)
    return (tensor if tensor.device == device or tensor.device.type == "cpu" else tensor.to(device)), concrete


class TemperatureShapeError(ValueError, TypeError):
    """A temperature tensor of neither one value nor the rows' shape. A ValueError (it names both
    shapes); also a TypeError, which such a tensor raised when only 0-d ones were accepted."""


def _temperature_check(name: str):
    """The range check of a temperature: ``name`` "t1" in [0, 2), any other name > 0 and finite."""
    return check.check_t1 if name == "t1" else (lambda v: check.check_t(v, name))


def per_row_temperature(value: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """A temperature of one value per row, flattened to [R] in row order on ``device`` (differentiable:
    a tensor that requires grad gets its gradient), every value checked where that costs no sync."""
    values = checkable(value)
    if values is not None and values.numel() > 0:
        low, high = torch.aminmax(values.double())  # (NaN propagates to both, and fails the check)
        for extreme in (float(low), float(high)):
            _temperature_check(name)(extreme)
    flat = value.reshape(-1)
    return flat if flat.device == device else flat.to(device)


def temperature_and_value(value, name: str, device: torch.device, rows_shape=None):
    """(temperature tensor, its concrete value or None where reading it would cost a sync or a graph
    break, or where it holds one value per row); ``name`` "t1" is checked in [0, 2), any other
    name > 0. A float or one-value tensor gives a 0-d tensor; with ``rows_shape`` (the logits'
    shape without the class axis) a floating tensor of that shape gives one value per row [R]."""
    if (rows_shape is not None and isinstance(value, torch.Tensor) and value.dtype.is_floating_point
            and value.numel() != 1):
        if tuple(value.shape) != tuple(rows_shape):
            raise TemperatureShapeError(
                f"{name} must be a float, a 0-d tensor or a tensor of the rows' shape {tuple(rows_shape)} (the "
                f"logits' shape without the class axis), got shape {tuple(value.shape)}")
        return per_row_temperature(value, name, device), None
    return scalar_tensor(value, name, device, _temperature_check(name))


def temperature(value, name: str, device: torch.device, rows_shape=None) -> torch.Tensor:
    """The tensor of ``temperature_and_value``: 0-d, or [R] (one per row) where ``rows_shape`` allows."""
    return temperature_and_value(value, name, device, rows_shape)[0]


def smoothing_and_value(value, device: torch.device):
    """(0-d tensor, concrete value or None) of ``label_smoothing``: a tensor keeps a smoothing
    schedule from recompiling."""
    return scalar_tensor(value, "label_smoothing", device, check.check_label_smoothing)


def iterations(num_iters) -> int:
    """``num_iters`` as the ops take it: 0 for None (converged), else the original algorithm's steps."""
    check.check_num_iters(num_iters)
    return 0 if num_iters is None else int(num_iters)


def check_floating(value, name: str = "logits") -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")


def check_logits(logits) -> None:
    """Floating logits with a class axis."""
    check_floating(logits)
    check.check_logits_shape(logits.shape)


def class_logits(logits, dim) -> int:
    """Floating logits with at least one class on ``dim`` (the public class axis, F.cross_entropy's
    ``dim``); returns it as a NEGATIVE int (``check.check_class_axis``), so that a vmapped batch
    folded in front never moves it."""
    check_floating(logits)
    if logits.dim() == 0:
        check.check_logits_shape(logits.shape)  # raises: a scalar has no class axis
    dim = check.check_class_axis(dim, logits.dim(), "dim")
    if dim == -1:
        check.check_logits_shape(logits.shape)
    elif logits.shape[dim] < 1:
        raise ValueError(f"logits must have at least one class (size >= 1 on the class axis dim={dim % logits.dim()}), "
                         f"got shape {tuple(logits.shape)}")
    return dim


def check_dim_type(dim) -> None:
    """The type check of ``check.check_class_axis`` alone, for a module that learns the logits' rank
    at each call (any int is in range for some rank)."""
    rank = abs(int(dim)) + 1 if isinstance(dim, numbers.Integral) and not isinstance(dim, bool) else 1
    check.check_class_axis(dim, rank, "dim")


LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_float32(x: torch.Tensor) -> torch.Tensor:
    """The logits a loss computes from inside ``torch.autocast`` (for their device): float16 and
    bfloat16 upcast to float32, as autocast does for ``F.cross_entropy`` (the cast is in the graph:
    the gradient comes back in the logits' dtype); unchanged outside autocast."""
    if x.dtype in LOW_PRECISION and torch.is_autocast_enabled(x.device.type):
        return x.to(torch.float32)
    return x


def autocast_operands(*tensors):
    """Matmul operands inside ``torch.autocast`` (for their device): cast to autocast's dtype, as
    ``F.linear`` does (None stays None); unchanged outside autocast."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def as_rows(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """What the ops take of a tensor with classes on ``dim`` (negative): for the last axis, rows
    [..., C] -> [N, C] with unit stride on the classes (a view when possible); for another axis,
    the tensor itself (the ops take the class axis and read it in place)."""
    if dim != -1:
        return x
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def label_rows(labels: torch.Tensor, indices: bool, dim: int = -1) -> torch.Tensor:
    """Class indices [...] -> [N] (row order); dense labels as ``as_rows`` (classes on ``dim``)."""
    return labels.reshape(-1) if indices else as_rows(labels, dim)


# torch has almost no ops for these (comparisons raise NotImplementedError): refused up front
UNSUPPORTED_INDEX_DTYPES = (torch.uint16, torch.uint32, torch.uint64)


def is_class_indices(logits_shape, labels, dim: int = -1) -> bool:
    """True for class indices (the logits' shape without the class axis ``dim``, a negative int),
    False for dense labels (the logits' shape); TypeError/ValueError for anything else."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be floating (dense) or integer (class indices), got {labels.dtype}")
    if labels.dtype in UNSUPPORTED_INDEX_DTYPES:
        raise TypeError(f"labels (class indices) must be int64, int32, int16, int8 or uint8, got {labels.dtype} "
                        "(convert them with labels.long())")
    return check.labels_are_indices(logits_shape, labels.shape, not labels.dtype.is_floating_point, dim,
                                    f"dim={dim % len(logits_shape)}")


# The ops' ignore_index for ``ignore_index=None``: no label can equal it (``op_labels``)
NO_IGNORED_INDEX = -2


def op_labels(label_rows: torch.Tensor, indices: bool, ignore_index: int | None, num_classes: int):
    """(labels, ignore_index) as the ops take them. ``ignore_index=None`` (no row ignored) becomes
    ``NO_IGNORED_INDEX`` with the class indices clamped to [-1, C] (one more N-element pass): an index
    outside [0, C) stays outside (a NaN row where it was not range-checked), and none equals -2."""
    if ignore_index is not None:
        return label_rows, ignore_index
    return (label_rows.clamp(-1, num_classes) if indices else label_rows), NO_IGNORED_INDEX


def check_inplace_backward(inplace_backward) -> None:
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")


def check_same_device(labels: torch.Tensor, device: torch.device, holder: str) -> None:
    """``labels`` on ``device``, the device of the tensor named ``holder`` (logits, hidden)."""
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {holder} on {device}")


def check_dense_labels(labels: torch.Tensor) -> None:
    """SPEC's dense labels lie in [0, 1]; CUDA and traced values stay unchecked."""
    values = checkable(labels)
    if values is not None and values.numel() > 0:
        native.check_dense_label_values(values)


def check_indices(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Class indices outside [0, C) (other than ignore_index) raise where that needs no sync."""
    values = checkable(labels)
    if values is None:
        return  # CUDA/traced: the backends turn such a row into NaN instead (never read out of bounds)
    bad = (values < 0) | (values >= num_classes)
    if ignore_index is not None:
        bad &= values != ignore_index
    if bool(bad.any()):
        raise ValueError(f"labels hold class indices outside [0, {num_classes}) that are not ignore_index "
                         f"({ignore_index}): {values[bad][:5].tolist()}")


def check_label_values(rows: torch.Tensor, indices: bool, num_classes: int, ignore_index: int) -> None:
    """``check_indices`` of class indices (against the GLOBAL class count) or ``check_dense_labels``."""
    if indices:
        check_indices(rows, num_classes, ignore_index)
    else:
        check_dense_labels(rows)


def empty_loss(logits: torch.Tensor, shape, reduction: str) -> torch.Tensor:
    """The loss of an empty batch (NaN for "mean", as F.cross_entropy), still connected to autograd."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    zero = logits.sum() * 0  # keeps the autograd connection for an empty batch
    if reduction == "none":
        return torch.zeros(shape, dtype=dtype, device=logits.device) + zero.to(dtype)
    if reduction == "sum":
        return zero.to(dtype)
    return zero.to(dtype) / 0.0


class LossArgs(NamedTuple):
    """The checked arguments of a multi-class loss, converted as the ops take them."""

    indices: bool                 # class indices (else dense labels)
    num_iters: int                # 0: converged
    smoothing: torch.Tensor       # 0-d
    smoothing_value: float | None  # None where reading it would cost a sync or a graph break
    backend: str                  # "torch" or "triton"
    t1: torch.Tensor              # 0-d (float64 from a float), or [R] (one per row)
    t1_value: float | None
    t2: torch.Tensor
    t2_value: float | None


def loss_args(logits_shape, device: torch.device, dtype: torch.dtype, labels, t1, t2, label_smoothing,
              num_iters, reduction, ignore_index, backend, holder: str = "logits", dim: int = -1,
              per_row_temperatures: bool = False) -> LossArgs:
    """The checks every multi-class loss makes, in one order (so one bad argument gives the same
    error from each). ``holder``: the name of the tensor the labels go with (logits, hidden);
    ``dim``: the checked class axis (``class_logits``); ``per_row_temperatures``: the loss takes
    temperatures of the rows' shape too (then [R]). Not here: smoothing's class count
    (``check.check_smoothing_classes``; the vocab-parallel loss knows its global C only after its
    group check)."""
    indices = is_class_indices(logits_shape, labels, dim)
    check.check_reduction(reduction)
    iters = iterations(num_iters)
    smoothing, smoothing_value = smoothing_and_value(label_smoothing, device)
    check.check_ignore_index(ignore_index)
    backend = resolve_backend(backend, device, dtype)
    rows_shape = check.without_axis(logits_shape, dim) if per_row_temperatures else None
    t1_, t1_value = temperature_and_value(t1, "t1", device, rows_shape)
    t2_, t2_value = temperature_and_value(t2, "t2", device, rows_shape)
    check_same_device(labels, device, holder)
    return LossArgs(indices, iters, smoothing, smoothing_value, backend, t1_, t1_value, t2_, t2_value)


def check_loss_settings(t1, t2, label_smoothing, num_iters, reduction, ignore_index, backend) -> None:
    """The settings an ``nn.Module`` loss stores, checked when it is built with the functions'
    checks (temperatures held as tensors: at call time)."""
    check.check_t1(check.concrete_float(t1, "t1") if not isinstance(t1, torch.Tensor) else None)
    check.check_t(check.concrete_float(t2, "t2") if not isinstance(t2, torch.Tensor) else None, "t2")
    check.check_label_smoothing(check.concrete_float(label_smoothing, "label_smoothing"))
    check.check_num_iters(num_iters)
    check.check_reduction(reduction)
    check.check_ignore_index(ignore_index)
    check.check_backend(backend, BACKENDS)


def _weight_tensor(value, name: str, device: torch.device) -> torch.Tensor:
    """A floating weight tensor on ``device`` with finite values >= 0 (read where that costs no sync)."""
    check_floating(value, name)
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the logits on {device}")
    values = checkable(value)
    if values is not None and values.numel() > 0:
        low, high = torch.aminmax(values.double())
        check.check_weight_values(float(low), float(high), bool(values.isnan().any()), name)
    return value


def row_weights(weight, sample_weight, labels: torch.Tensor, indices: bool, rows_shape, num_classes: int,
                device: torch.device, dtype: torch.dtype, weight_name: str = "weight",
                rows_name: str = "logits' shape without the class axis") -> torch.Tensor | None:
    """Each row's weight [N] in ``dtype`` (None: no weights): ``weight[target]`` for per-class weights
    (class indices only; ``labels`` the class-index rows [N], GLOBAL indices) times ``sample_weight``
    (``rows_shape``, named ``rows_name`` in errors). Ignored rows keep a weight the reductions never
    count; a bad index's row is NaN anyway (its weight is that of a clamped index)."""
    rows = None
    if weight is not None:
        check.check_class_weight_labels(indices, weight_name)
        _weight_tensor(weight, weight_name, device)
        check.check_class_weight_shape(weight.shape, num_classes, weight_name)
        rows = weight.to(dtype)[labels.clamp(0, num_classes - 1)]
    if sample_weight is not None:
        _weight_tensor(sample_weight, "sample_weight", device)
        check.check_sample_weight_shape(sample_weight.shape, rows_shape, rows_name)
        per_row = sample_weight.reshape(-1).to(dtype)
        rows = per_row if rows is None else rows * per_row
    return rows

