"""PyTorch API of bitempered: validation, backend choice, reshaping. The math is in the ops.

Classes are the LAST axis; any number of leading axes. Temperatures and ``label_smoothing`` may be
Python floats or 0-d tensors (a tensor never triggers a recompile under ``torch.compile``).

Validation: bad input raises ValueError/TypeError naming the argument. Values held in CUDA tensors
(reading them would need a host sync) and values traced by ``torch.compile`` are NOT checked (CPU
dense labels at t1 = t2 = 1 excepted: the native backend checks them as it runs, compiled too):
there an out-of-range temperature or smoothing gives meaningless or NaN values, a dense/binary
label outside [0, 1] gives a NaN or meaningless loss for its row (a negative label away from
t1 = t2 = 1: NaN loss, finite gradient), and a bad class index gives a NaN row. Under
``torch.func.vmap`` the values are checked.

Autograd: the forward pass stores the gradient; in eager mode the backward scales that buffer in
place (no second N x C buffer). Compiled graphs (torch.compile, torch.export) and torch.func
transforms compute the product out of place (one more N x C buffer, unless the compiler reuses the
stored one). ``torch.func.grad``/``vmap``/``vjp``/``jacrev`` work (vmap folds the batch into rows).
The losses have no second derivative (``create_graph=True`` raises); ``tempered_softmax`` and
``tempered_sigmoid`` support double backward. Forward-mode AD (jvp, jacfwd, hessian) is not supported.
"""

from __future__ import annotations

import os

import torch

from bitempered.bindings.torch import func as torch_func
from bitempered.bindings.torch.native import math as native
from bitempered.bindings.torch.native import loss as native_loss
from bitempered.bindings.torch import vocab_parallel
from bitempered.bindings.common import validation as check
from bitempered.bindings.torch.ops import InplaceBackwardLoss, binary_loss_op, loss_op, sigmoid_op, softmax_op

BACKENDS = ("auto", "torch", "triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    check.check_backend(backend, BACKENDS)
    if backend == "auto":
        use_kernels = device.type == "cuda" and dtype != torch.float64 and _triton_available()
        return "triton" if use_kernels else "torch"
    if backend == "triton":
        if dtype == torch.float64:
            raise ValueError("backend='triton' computes in float32; float64 logits need backend='torch' or 'auto'")
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the `triton` package (pip install triton)")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' on CPU tensors runs Triton's interpreter, which must be switched on "
                "with TRITON_INTERPRET=1 before triton is imported; use backend='torch' on CPU instead")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports CUDA (and interpreted CPU) tensors, got {device}")
    return backend


def _checkable(tensor: torch.Tensor):
    """The concrete values behind ``tensor`` (unwrapped from torch.func transforms), or None where
    reading them would cost a host sync (CUDA) or a graph break (torch.compile)."""
    if tensor.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    while torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)  # vmap: every sample's values
    return tensor.detach()


def _scalar_tensor(value, name: str, device: torch.device, check_value):
    """(0-d float64 tensor, its concrete value or None) of a temperature-like argument, checked with
    ``check_value`` where that costs no sync."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float or a 0-d floating tensor, got {value.dtype} of shape "
                            f"{tuple(value.shape)}")
        values = _checkable(value)
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


def _temperature(value, name: str, device: torch.device) -> torch.Tensor:
    """A 0-d float64 tensor of a temperature, checked where that costs no sync."""
    return _temperature_and_value(value, name, device)[0]


def _temperature_and_value(value, name: str, device: torch.device):
    """(``_temperature``, its concrete value or None where reading it would cost a sync or a graph break)."""
    check_value = check.check_t1 if name == "t1" else (lambda v: check.check_t(v, name))
    return _scalar_tensor(value, name, device, check_value)


def _label_smoothing(value, device: torch.device):
    """(0-d tensor, concrete value or None): a tensor keeps a smoothing schedule from recompiling."""
    return _scalar_tensor(value, "label_smoothing", device, check.check_label_smoothing)


def _check_dense_labels(labels: torch.Tensor) -> None:
    """SPEC's dense labels lie in [0, 1]; CUDA and traced values stay unchecked (see the docstring)."""
    values = _checkable(labels)
    if values is not None and values.numel() > 0:
        native.check_dense_label_values(values)


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    check.check_logits_shape(logits.shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [N, C] with unit stride on the classes (a view when possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _num_iters(num_iters) -> int:
    check.check_num_iters(num_iters)
    return 0 if num_iters is None else int(num_iters)


def tempered_softmax(logits, t, num_iters=None, backend="auto"):
    """SPEC's tempered softmax over the last axis, in the logits' dtype.

    ``num_iters=None`` solves the normalization to convergence (default); an int reproduces the
    original algorithm with exactly that many steps.
    """
    if vocab_parallel.is_dtensor(logits):  # a DTensor sharded on the classes: the vocab-parallel path
        return vocab_parallel.dtensor_softmax(logits, t, num_iters, backend)
    _check_logits(logits)
    iters = _num_iters(num_iters)
    backend = _resolve_backend(backend, logits.device, logits.dtype)
    t = _temperature(t, "t", logits.device)
    if logits.numel() == 0:
        return torch.empty_like(logits)
    return torch_func.call(softmax_op, _rows(logits), t, iters, backend).reshape(logits.shape)


def tempered_sigmoid(logits, t, num_iters=None, backend="auto"):
    """Elementwise tempered sigmoid: ``tempered_softmax([0, x], t)[1]``."""
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError("logits must be a floating torch.Tensor")
    iters = _num_iters(num_iters)
    backend = _resolve_backend(backend, logits.device, logits.dtype)
    t = _temperature(t, "t", logits.device)
    if logits.numel() == 0:
        return torch.empty_like(logits)
    return torch_func.call(sigmoid_op, logits.reshape(-1), t, iters, backend).reshape(logits.shape)


def _empty_loss(logits, shape, reduction):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    zero = logits.sum() * 0  # keeps the autograd connection for an empty batch
    if reduction == "none":
        return torch.zeros(shape, dtype=dtype, device=logits.device) + zero.to(dtype)
    if reduction == "sum":
        return zero.to(dtype)
    return zero.to(dtype) / 0.0


def _check_indices(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Class indices outside [0, C) (other than ignore_index) raise where that needs no sync."""
    values = _checkable(labels)
    if values is None:
        return  # CUDA/traced: the backends turn such a row into NaN instead (never read out of bounds)
    bad = (values != ignore_index) & ((values < 0) | (values >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels hold class indices outside [0, {num_classes}) that are not ignore_index "
                         f"({ignore_index}): {values[bad][:5].tolist()}")


def _label_kind(logits_shape, labels) -> bool:
    """True for class indices, False for dense labels; TypeError/ValueError for anything else
    (shared by the plain, fused-linear and vocab-parallel losses)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be floating (dense) or integer (class indices), got {labels.dtype}")
    return check.labels_are_indices(logits_shape, labels.shape, not labels.dtype.is_floating_point)


def bi_tempered_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None,
                              reduction="mean", ignore_index=-100, backend="auto", inplace_backward=False):
    """Bi-tempered logistic loss (Amid et al., 2019) over the last axis.

    Args:
        logits: [..., C] float16/bfloat16/float32/float64 tensor.
        labels: dense floating labels of the logits' shape, values in [0, 1] (checked on CPU, see
            the module docstring), or integer class indices of shape ``logits.shape[:-1]`` (rows
            equal to ``ignore_index`` are skipped).
        t1: 0 <= t1 < 2 (t1 < 1 bounds the loss). t2: > 0 (t2 > 1 gives heavy tails).
        label_smoothing: in [0, 1), the reference convention (target 1 - s, others s/(C-1)); a
            float or a 0-d tensor (a smoothing schedule then never recompiles).
        num_iters: None (converged, default) or the original algorithm's step count.
        reduction: "none" (per-row losses), "sum" or "mean" (over non-ignored rows).
        backend: "auto" (Triton kernels for CUDA tensors, native ops otherwise), "torch", "triton".
        inplace_backward: write the gradient into the logits' own buffer in the forward pass (no
            N x C allocation with the kernels). The logits' values are destroyed: use it only when
            nothing else reads them (e.g. the output of the last Linear layer). Eager mode only:
            ignored while torch.compile traces the call.

    Returns the loss in float32 (float64 for float64 logits). The gradient flows to ``logits``.
    A DTensor sharded on the class dimension (``Shard(-1)``) takes the vocab-parallel path.
    """
    if vocab_parallel.is_dtensor(logits):
        return vocab_parallel.dtensor_loss(logits, labels, t1, t2, label_smoothing, num_iters, reduction,
                                           ignore_index, backend, inplace_backward)
    _check_logits(logits)
    indices = _label_kind(logits.shape, labels)
    check.check_reduction(reduction)
    iters = _num_iters(num_iters)
    smoothing, concrete_smoothing = _label_smoothing(label_smoothing, logits.device)
    check.check_smoothing_classes(concrete_smoothing, logits.shape[-1])
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    backend = _resolve_backend(backend, logits.device, logits.dtype)
    t1_, t1_value = _temperature_and_value(t1, "t1", logits.device)
    t2_, t2_value = _temperature_and_value(t2, "t2", logits.device)
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    if logits.numel() == 0:
        return _empty_loss(logits, logits.shape[:-1], reduction)
    rows = _rows(logits)
    label_rows = labels.reshape(-1) if indices else _rows(labels)
    if indices:
        _check_indices(label_rows, logits.shape[-1], ignore_index)
    elif not (backend == "torch" and native_loss.checks_dense_labels(rows.device, t1_value, t2_value)):
        _check_dense_labels(label_rows)  # (else the native t1 = t2 = 1 path checks them itself)
    need_grad = torch.is_grad_enabled() and torch_func.requires_grad(logits)
    eager = not torch.compiler.is_compiling() and not torch_func.transforms_active()
    if need_grad and inplace_backward and eager:
        loss = InplaceBackwardLoss.apply(logits, rows, label_rows, t1_, t2_, smoothing, iters, ignore_index,
                                         reduction, backend)
        return loss.reshape(logits.shape[:-1]) if reduction == "none" else loss
    loss, _ = torch_func.call(loss_op, rows, label_rows, t1_, t2_, smoothing, iters, ignore_index, reduction,
                              backend, need_grad)
    return loss.reshape(logits.shape[:-1]) if reduction == "none" else loss


def bi_tempered_binary_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None,
                                     reduction="mean", backend="auto"):
    """Binary bi-tempered loss: the 2-class loss of logits [0, x] and labels [1 - y, y], elementwise.

    ``logits`` and ``labels`` (floating, in [0, 1]) share one shape; "mean" averages all elements.
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError("logits must be a floating torch.Tensor")
    if not isinstance(labels, torch.Tensor) or not labels.dtype.is_floating_point:
        raise TypeError("labels must be a floating torch.Tensor of the logits' shape (binary targets in [0, 1])")
    check.check_binary_shapes(logits.shape, labels.shape)
    check.check_reduction(reduction)
    iters = _num_iters(num_iters)
    smoothing, _ = _label_smoothing(label_smoothing, logits.device)
    backend = _resolve_backend(backend, logits.device, logits.dtype)
    t1_ = _temperature(t1, "t1", logits.device)
    t2_ = _temperature(t2, "t2", logits.device)
    _check_dense_labels(labels)
    if logits.numel() == 0:
        return _empty_loss(logits, logits.shape, reduction)
    need_grad = torch.is_grad_enabled() and torch_func.requires_grad(logits)
    labels_rows = labels.reshape(-1).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    loss, _ = torch_func.call(binary_loss_op, logits.reshape(-1), labels_rows, t1_, t2_, smoothing,
                              iters, reduction, backend, need_grad)
    return loss.reshape(logits.shape) if reduction == "none" else loss


class BiTemperedLogisticLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`bi_tempered_logistic_loss` (call it as ``loss(logits, labels)``).

    ``t1``/``t2`` may be changed between steps (``module.t1 = 0.7``) without recompiling when they
    are held as 0-d tensors.
    """

    def __init__(self, t1, t2, label_smoothing=0.0, num_iters=None, reduction="mean", ignore_index=-100,
                 backend="auto", inplace_backward=False):
        super().__init__()
        check.check_t1(check.concrete_float(t1, "t1") if not isinstance(t1, torch.Tensor) else None)
        check.check_t(check.concrete_float(t2, "t2") if not isinstance(t2, torch.Tensor) else None, "t2")
        check.check_label_smoothing(check.concrete_float(label_smoothing, "label_smoothing"))
        check.check_num_iters(num_iters)
        check.check_reduction(reduction)
        check.check_backend(backend, BACKENDS)
        self.t1, self.t2 = t1, t2
        self.label_smoothing, self.num_iters = label_smoothing, num_iters
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend
        self.inplace_backward = inplace_backward

    def forward(self, logits, labels):
        return bi_tempered_logistic_loss(logits, labels, self.t1, self.t2, self.label_smoothing,
                                         self.num_iters, self.reduction, self.ignore_index, self.backend,
                                         self.inplace_backward)

    def extra_repr(self) -> str:
        return (f"t1={self.t1}, t2={self.t2}, label_smoothing={self.label_smoothing}, "
                f"num_iters={self.num_iters}, reduction={self.reduction!r}")
