"""PyTorch API of bitempered: the public functions and modules. They check their arguments
(``args``), reshape to rows and call the custom ops (``ops``); DTensor logits sharded on the classes
go to the vocab-parallel path (``dtensor``).

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

import torch

from bitempered.bindings.common import validation as check
from bitempered.bindings.torch import args, dtensor
from bitempered.bindings.torch import func as torch_func
from bitempered.bindings.torch.native import loss as native_loss
from bitempered.bindings.torch.ops import InplaceBackwardLoss, binary_loss_op, loss_op, sigmoid_op, softmax_op


def tempered_softmax(logits, t, num_iters=None, backend="auto"):
    """SPEC's tempered softmax over the last axis, in the logits' dtype.

    Args:
        logits: [..., C] float16/bfloat16/float32/float64 tensor, C >= 1 (classes on the last axis).
        t: temperature, finite and > 0 (t = 1: the ordinary softmax; t > 1: heavy tails); a float
            or a 0-d floating tensor (then a changing temperature never recompiles).
        num_iters: None (default: the normalization solved to convergence) or an int >= 1: the
            original algorithm with exactly that many steps.
        backend: "auto" (default: Triton kernels for CUDA tensors below float64, native ops
            otherwise), "torch" (native ops) or "triton" (CPU tensors only under TRITON_INTERPRET=1).

    Returns the probabilities, the logits' shape and dtype. Differentiable twice (double backward).
    A DTensor sharded on the class dimension (``Shard(-1)``) takes the vocab-parallel path.
    """
    if dtensor.is_dtensor(logits):  # a DTensor sharded on the classes: the vocab-parallel path
        return dtensor.dtensor_softmax(logits, t, num_iters, backend)
    args.check_logits(logits)
    iters = args.iterations(num_iters)
    backend = args.resolve_backend(backend, logits.device, logits.dtype)
    t = args.temperature(t, "t", logits.device)
    if logits.numel() == 0:
        return torch.empty_like(logits)
    return torch_func.call(softmax_op, args.as_rows(logits), t, iters, backend).reshape(logits.shape)


def tempered_sigmoid(logits, t, num_iters=None, backend="auto"):
    """Elementwise tempered sigmoid: ``tempered_softmax([0, x], t)[1]``.

    Args:
        logits: floating tensor of any shape (float16/bfloat16/float32/float64).
        t: temperature, finite and > 0 (t = 1: the ordinary sigmoid); a float or a 0-d floating tensor.
        num_iters: None (default: converged) or an int >= 1 (the original algorithm's step count).
        backend: "auto" (default), "torch" or "triton", as in :func:`tempered_softmax`.

    Returns the probabilities, the logits' shape and dtype. Differentiable twice (double backward).
    """
    args.check_floating(logits)
    iters = args.iterations(num_iters)
    backend = args.resolve_backend(backend, logits.device, logits.dtype)
    t = args.temperature(t, "t", logits.device)
    if logits.numel() == 0:
        return torch.empty_like(logits)
    return torch_func.call(sigmoid_op, logits.reshape(-1), t, iters, backend).reshape(logits.shape)


def bi_tempered_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None,
                              reduction="mean", ignore_index=-100, backend="auto", inplace_backward=False):
    """Bi-tempered logistic loss (Amid et al., 2019) over the last axis.

    Args:
        logits: [..., C] float16/bfloat16/float32/float64 tensor.
        labels: dense floating labels of the logits' shape, values in [0, 1] (checked on CPU, see
            the module docstring), or integer class indices of shape ``logits.shape[:-1]`` (rows
            equal to ``ignore_index`` are skipped).
        t1: 0 <= t1 < 2 (t1 < 1 bounds the loss); a float or a 0-d floating tensor.
        t2: finite and > 0 (t2 > 1 gives heavy tails); a float or a 0-d floating tensor.
        label_smoothing: in [0, 1), default 0; the reference convention (target 1 - s, others
            s/(C-1); needs C >= 2 when > 0); a float or a 0-d tensor (a smoothing schedule then
            never recompiles).
        num_iters: None (converged, default) or an int >= 1, the original algorithm's step count.
        reduction: "mean" (default, over non-ignored rows), "sum" or "none" (per-row losses).
        ignore_index: int (default -100): class-index rows equal to it get loss 0 and no gradient.
        backend: "auto" (default: Triton kernels for CUDA tensors below float64, native ops
            otherwise), "torch" (native ops) or "triton" (CPU tensors only under TRITON_INTERPRET=1).
        inplace_backward: bool (default False): write the gradient into the logits' own buffer in
            the forward pass (no N x C allocation with the kernels). The logits' values are
            destroyed: use it only when nothing else reads them (e.g. the output of the last Linear
            layer). Eager mode only: ignored while torch.compile traces the call.

    Returns the loss in float32 (float64 for float64 logits). The gradient flows to ``logits``.
    A DTensor sharded on the class dimension (``Shard(-1)``) takes the vocab-parallel path.
    """
    if dtensor.is_dtensor(logits):
        return dtensor.dtensor_loss(logits, labels, t1, t2, label_smoothing, num_iters, reduction, ignore_index,
                                    backend, inplace_backward)
    args.check_logits(logits)
    checked = args.loss_args(logits.shape, logits.device, logits.dtype, labels, t1, t2, label_smoothing, num_iters,
                             reduction, ignore_index, backend)
    check.check_smoothing_classes(checked.smoothing_value, logits.shape[-1])
    args.check_inplace_backward(inplace_backward)
    if logits.numel() == 0:
        return args.empty_loss(logits, logits.shape[:-1], reduction)
    rows = args.as_rows(logits)
    label_rows = args.label_rows(labels, checked.indices)
    checked_by_backend = not checked.indices and checked.backend == "torch" and native_loss.checks_dense_labels(
        rows.device, checked.t1_value, checked.t2_value)  # the native t1 = t2 = 1 path reads them anyway
    if not checked_by_backend:
        args.check_label_values(label_rows, checked.indices, logits.shape[-1], ignore_index)
    settings = (checked.t1, checked.t2, checked.smoothing, checked.num_iters, ignore_index, reduction,
                checked.backend)
    need_grad = torch.is_grad_enabled() and torch_func.requires_grad(logits)
    eager = not torch.compiler.is_compiling() and not torch_func.transforms_active()
    if need_grad and inplace_backward and eager:
        loss = InplaceBackwardLoss.apply(logits, rows, label_rows, *settings)
    else:
        loss, _ = torch_func.call(loss_op, rows, label_rows, *settings, need_grad)
    return loss.reshape(logits.shape[:-1]) if reduction == "none" else loss


def bi_tempered_binary_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None,
                                     reduction="mean", backend="auto"):
    """Binary bi-tempered loss: the 2-class loss of logits [0, x] and labels [1 - y, y], elementwise.

    ``logits`` and ``labels`` (floating, in [0, 1], on the logits' device) share one shape; "mean"
    averages all elements. The other arguments are those of :func:`bi_tempered_logistic_loss`.
    """
    args.check_floating(logits)
    args.check_floating(labels, "labels")  # binary targets in [0, 1], of the logits' shape
    check.check_binary_shapes(logits.shape, labels.shape)
    check.check_reduction(reduction)
    iters = args.iterations(num_iters)
    smoothing, _ = args.smoothing_and_value(label_smoothing, logits.device)
    backend = args.resolve_backend(backend, logits.device, logits.dtype)
    t1_ = args.temperature(t1, "t1", logits.device)
    t2_ = args.temperature(t2, "t2", logits.device)
    args.check_same_device(labels, logits.device, "logits")
    args.check_dense_labels(labels)
    if logits.numel() == 0:
        return args.empty_loss(logits, logits.shape, reduction)
    need_grad = torch.is_grad_enabled() and torch_func.requires_grad(logits)
    labels_rows = labels.reshape(-1).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    loss, _ = torch_func.call(binary_loss_op, logits.reshape(-1), labels_rows, t1_, t2_, smoothing,
                              iters, reduction, backend, need_grad)
    return loss.reshape(logits.shape) if reduction == "none" else loss


class BiTemperedLogisticLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`bi_tempered_logistic_loss` (call it as ``loss(logits, labels)``).

    Args (checked here, with the function's checks; temperatures held as tensors at each call):
        t1: 0 <= t1 < 2 (t1 < 1 bounds the loss); a float or a 0-d floating tensor.
        t2: finite and > 0 (t2 > 1 gives heavy tails); a float or a 0-d floating tensor.
        label_smoothing: in [0, 1), default 0 (target 1 - s, others s/(C-1)).
        num_iters: None (converged, default) or an int >= 1, the original algorithm's step count.
        reduction: "mean" (default, over non-ignored rows), "sum" or "none" (per-row losses).
        ignore_index: int (default -100): class-index rows equal to it are skipped.
        backend: "auto" (default), "torch" or "triton", as in :func:`bi_tempered_logistic_loss`.
        inplace_backward: bool (default False): the gradient overwrites the logits (see
            :func:`bi_tempered_logistic_loss`).

    ``t1``/``t2`` may be changed between steps (``module.t1 = 0.7``) without recompiling when they
    are held as 0-d tensors.
    """

    def __init__(self, t1, t2, label_smoothing=0.0, num_iters=None, reduction="mean", ignore_index=-100,
                 backend="auto", inplace_backward=False):
        super().__init__()
        args.check_loss_settings(t1, t2, label_smoothing, num_iters, reduction, ignore_index, backend)
        args.check_inplace_backward(inplace_backward)
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
