"""PyTorch API of bitempered: the public functions and modules. They check their arguments
(``args``), reshape to rows and call the custom ops (``ops``); DTensor logits sharded on the classes
go to the vocab-parallel path (``dtensor``).

Classes are on ``dim`` (keyword, default -1: the LAST axis), any number of other axes; ``dim=1``
takes F.cross_entropy's (N, C, d1, ..., dk) logits with class indices (N, d1, ..., dk). The rows
are the logits' entries with the class axis removed, in row-major order; per-row results
(reduction="none") have that shape. On the Triton backend the kernels read such logits in place,
in any layout (NCHW, channels_last, a cropped view); the native backend moves the class axis last
(one copy of the logits, none for channels_last). The gradient keeps the logits' strides (dense
layouts). Temperatures and ``label_smoothing`` may be Python floats or 0-d tensors (a tensor never
triggers a recompile under ``torch.compile``); temperatures may also hold one value per row (the
logits' shape without the class axis).

Learnable temperatures: a temperature tensor that requires grad (an ``nn.Parameter``) gets the exact
gradient through the converged normalization (docs/math.md, "Temperature gradients"), computed in
the same pass as the loss, and only when one requires grad (``num_iters`` must then be None). The
native backend solves per-row temperatures in groups of equal values (one solve per distinct
value: many distinct values are slow there); the kernels take them per row.

Validation: bad input raises ValueError/TypeError naming the argument. Values held in CUDA tensors
(reading them would need a host sync) and values traced by ``torch.compile`` are NOT checked (CPU
dense labels at t1 = t2 = 1 excepted: the native backend checks them as it runs, compiled too):
there an out-of-range temperature or smoothing gives meaningless or NaN values, a dense/binary
label outside [0, 1] gives a NaN or meaningless loss for its row (a negative label away from
t1 = t2 = 1: NaN loss, finite gradient), and a bad class index gives a NaN row. Under
``torch.func.vmap`` the values are checked.

Autograd: the forward pass stores the gradient (in the logits' dtype; float32 for float16 logits,
whose range cannot hold it x 1/N under a loss scale); in eager mode the backward scales that buffer
in place (no second N x C buffer). Compiled graphs (torch.compile, torch.export), torch.func
transforms and retained graphs (``retain_graph=True``, ``torch.autograd.gradcheck``) compute the
product out of place (one more N x C buffer, unless the compiler reuses the stored one).

Mixed precision: inside ``torch.autocast`` the losses upcast float16/bfloat16 logits to float32, as
``F.cross_entropy`` does (the fused linear loss runs its matmuls in autocast's dtype, as
``F.linear``); ``tempered_softmax`` and ``tempered_sigmoid`` keep their input's dtype (they compute in
float32 inside). ``torch.func.grad``/``vmap``/``vjp``/``jacrev`` work (vmap folds the batch into rows).
The losses have no second derivative (``create_graph=True`` raises); ``tempered_softmax`` and
``tempered_sigmoid`` support double backward. Forward-mode AD (jvp, jacfwd, hessian) is not supported.
"""

from __future__ import annotations

import math

import torch

from bitempered.bindings.common import validation as check
from bitempered.bindings.torch import args, dtensor
from bitempered.bindings.torch import func as torch_func
from bitempered.bindings.torch.native import loss as native_loss
from bitempered.bindings.torch.native import math as native
from bitempered.bindings.torch.ops import (
    InplaceBackwardLoss, binary_loss_op, check_temperature_grad_iterations, loss_op, sigmoid_op, softmax_op,
)
from bitempered.bindings.torch.rows import kept_rows, with_weight_gradient


def needs_temperature_grad(*temperatures: torch.Tensor) -> bool:
    """Whether autograd wants the gradient of a temperature: grad mode on and one of them requires
    grad (at any torch.func level, as for the logits)."""
    return torch.is_grad_enabled() and any(torch_func.requires_grad(t) for t in temperatures)


def tempered_softmax(logits, t, num_iters=None, backend="auto", *, dim=-1):
    """SPEC's tempered softmax over the class axis ``dim``, in the logits' dtype.

    Args:
        logits: float16/bfloat16/float32/float64 tensor with C >= 1 classes on ``dim``.
        t: temperature, finite and > 0 (t = 1: the ordinary softmax; t > 1: heavy tails); a float,
            a 0-d floating tensor (then a changing temperature never recompiles), or a floating
            tensor of the logits' shape without the class axis (one temperature per row). A tensor
            that requires grad gets its exact gradient (through the converged normalization).
        num_iters: None (default: the normalization solved to convergence) or an int >= 1: the
            original algorithm with exactly that many steps (not with a ``t`` that requires grad).
        backend: "auto" (default: Triton kernels for CUDA tensors below float64, native ops
            otherwise), "torch" (native ops) or "triton" (CPU tensors only under TRITON_INTERPRET=1).
        dim: the class axis (keyword only; an int in [-ndim, ndim), default -1: the last axis), as
            ``torch.softmax``'s ``dim``.

    Returns the probabilities, the logits' shape and dtype. Differentiable twice (double backward;
    the gradient of ``t`` itself once). A DTensor sharded on the class dimension (``Shard(dim)``)
    takes the vocab-parallel path.
    """
    if dtensor.is_dtensor(logits):  # a DTensor sharded on the classes: the vocab-parallel path
        return dtensor.dtensor_softmax(logits, t, num_iters, backend, dim=dim)
    dim = args.class_logits(logits, dim)
    iters = args.iterations(num_iters)
    backend = args.resolve_backend(backend, logits.device, logits.dtype)
    t = args.temperature(t, "t", logits.device, check.without_axis(logits.shape, dim))
    check_temperature_grad_iterations(iters, needs_temperature_grad(t))
    if logits.numel() == 0:
        return torch.empty_like(logits)
    return torch_func.call(softmax_op, args.as_rows(logits, dim), t, iters, backend, dim).reshape(logits.shape)


def tempered_sigmoid(logits, t, num_iters=None, backend="auto"):
    """Elementwise tempered sigmoid: ``tempered_softmax([0, x], t)[1]``.

    Args:
        logits: floating tensor of any shape (float16/bfloat16/float32/float64).
        t: temperature, finite and > 0 (t = 1: the ordinary sigmoid); a float, a 0-d floating tensor
            or a floating tensor of the logits' shape (one per element); learnable as in
            :func:`tempered_softmax`.
        num_iters: None (default: converged) or an int >= 1 (the original algorithm's step count;
            not with a ``t`` that requires grad).
        backend: "auto" (default), "torch" or "triton", as in :func:`tempered_softmax`.

    Returns the probabilities, the logits' shape and dtype. Differentiable twice (double backward).
    """
    args.check_floating(logits)
    iters = args.iterations(num_iters)
    backend = args.resolve_backend(backend, logits.device, logits.dtype)
    t = args.temperature(t, "t", logits.device, logits.shape)
    check_temperature_grad_iterations(iters, needs_temperature_grad(t))
    if logits.numel() == 0:
        return torch.empty_like(logits)
    return torch_func.call(sigmoid_op, logits.reshape(-1), t, iters, backend).reshape(logits.shape)


def bi_tempered_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None,
                              reduction="mean", ignore_index=-100, backend="auto", inplace_backward=False, *,
                              weight=None, sample_weight=None, dim=-1):
    """Bi-tempered logistic loss (Amid et al., 2019) over the class axis ``dim``.

    Args:
        logits: float16/bfloat16/float32/float64 tensor with C >= 1 classes on ``dim`` ([..., C] by
            default; (N, C, d1, ..., dk) with ``dim=1``).
        labels: dense floating labels of the logits' shape, values in [0, 1] (checked on CPU, see
            the module docstring), or integer class indices of the logits' shape without the class
            axis (``logits.shape[:-1]`` by default; (N, d1, ..., dk) with ``dim=1``; rows equal to
            ``ignore_index`` are skipped).
        t1: 0 <= t1 < 2 (t1 < 1 bounds the loss); a float, a 0-d floating tensor, or a floating
            tensor of the logits' shape without the class axis (one temperature per row; each value
            checked on CPU). A tensor that requires grad gets its exact gradient dL/dt1 (computed in
            the same pass as the loss, through the converged normalization; per row for a per-row
            tensor); a tensor never triggers a recompile under torch.compile.
        t2: finite and > 0 (t2 > 1 gives heavy tails); as ``t1`` (float, 0-d or per-row tensor,
            learnable).
        label_smoothing: in [0, 1), default 0; the reference convention (target 1 - s, others
            s/(C-1); needs C >= 2 when > 0); a float or a 0-d tensor (a smoothing schedule then
            never recompiles).
        num_iters: None (converged, default) or an int >= 1, the original algorithm's step count
            (the temperatures' gradients need None: ValueError when t1 or t2 requires grad).
        reduction: "mean" (default, over non-ignored rows; with weights, divided by the sum of the
            non-ignored rows' weights), "sum" or "none" (per-row losses, times their weights).
        ignore_index: int (default -100): class-index rows equal to it get loss 0 and no gradient;
            None: no row is ignored.
        backend: "auto" (default: Triton kernels for CUDA tensors below float64, native ops
            otherwise), "torch" (native ops) or "triton" (CPU tensors only under TRITON_INTERPRET=1).
        weight: None (default) or a 1-D floating tensor of the C per-class weights (finite, >= 0),
            as ``F.cross_entropy(weight=...)``: each row's loss and gradient are multiplied by
            ``weight[target]``, and "mean" divides by the sum of ``weight[target]`` over the rows
            that are not ignored (equal to F.cross_entropy at t1 = t2 = 1). With label smoothing the
            whole smoothed row term is weighted by its target's weight. Class-index labels only:
            with dense labels F.cross_entropy's per-class weighting is not a proper loss (see the
            ValueError). Weights that require grad get their exact gradient (one more forward
            pass, without gradient, gives the unweighted row losses); others get none.
        sample_weight: None (default) or a floating tensor of the logits' shape without the class
            axis (finite, >= 0): each row's loss and gradient times its weight; "mean" =
            sum(w L) / sum(w) over the rows that are not ignored (w = weight[target] x sample_weight
            with both). Weight values are data: changing them never recompiles.
        dim: the class axis (keyword only; an int in [-ndim, ndim), default -1: the last axis), as
            ``F.cross_entropy``'s class dimension (``dim=1`` for segmentation logits).
        inplace_backward: bool (default False): write the gradient into the logits' own buffer in
            the forward pass (no N x C allocation with the kernels). The logits' values are
            destroyed: use it only when nothing else reads them (e.g. the output of the last Linear
            layer). Eager mode only: ignored while torch.compile traces the call. float16 logits:
            the buffer holds the gradient before the reduction's 1/N, which the backward applies in
            float32 (entries below float16's normal range, |dL/da| < 6.1e-5 before the 1/N, keep
            float16's subnormal precision there; without in-place mode float16 gradients are stored
            in float32 and never lose precision to the range).

    Returns the loss in float32 (float64 for float64 logits). The gradient flows to ``logits``.
    A DTensor sharded on the class dimension (``Shard(dim)``) takes the vocab-parallel path.
    """
    if dtensor.is_dtensor(logits):
        return dtensor.dtensor_loss(logits, labels, t1, t2, label_smoothing, num_iters, reduction, ignore_index,
                                    backend, inplace_backward, weight=weight, sample_weight=sample_weight, dim=dim)
    dim = args.class_logits(logits, dim)
    logits = args.autocast_float32(logits)
    num_classes, rows_shape = logits.shape[dim], check.without_axis(logits.shape, dim)
    checked = args.loss_args(logits.shape, logits.device, logits.dtype, labels, t1, t2, label_smoothing, num_iters,
                             reduction, ignore_index, backend, dim=dim, per_row_temperatures=True)
    check.check_smoothing_classes(checked.smoothing_value, num_classes)
    args.check_inplace_backward(inplace_backward)
    need_temperature_grad = needs_temperature_grad(checked.t1, checked.t2)
    check_temperature_grad_iterations(checked.num_iters, need_temperature_grad)
    if logits.numel() == 0:
        return args.empty_loss(logits, rows_shape, reduction)
    rows = args.as_rows(logits, dim)
    label_rows = args.label_rows(labels, checked.indices, dim)
    # the native t1 = t2 = 1 path reads them anyway (not where it computes temperature gradients)
    checked_by_backend = not checked.indices and checked.backend == "torch" and not need_temperature_grad and \
        native_loss.checks_dense_labels(rows.device, checked.t1_value, checked.t2_value)
    if not checked_by_backend:
        args.check_label_values(label_rows, checked.indices, num_classes, ignore_index)
    weights = args.row_weights(weight, sample_weight, label_rows, checked.indices, rows_shape, num_classes,
                               logits.device, native.compute_dtype(logits.dtype))
    label_rows, op_ignore_index = args.op_labels(label_rows, checked.indices, ignore_index, num_classes)
    settings = (checked.t1, checked.t2, checked.smoothing, checked.num_iters, op_ignore_index, reduction,
                checked.backend)
    need_grad = torch.is_grad_enabled() and torch_func.requires_grad(logits)
    eager = not torch.compiler.is_compiling() and not torch_func.transforms_active()
    op_weights = None if weights is None else weights.detach()  # their gradient: with_weight_gradient
    if need_grad and inplace_backward and eager:
        loss = InplaceBackwardLoss.apply(logits, rows, label_rows, op_weights, *settings, dim)
    else:
        loss, *_ = torch_func.call(loss_op, rows, label_rows, op_weights, *settings, need_grad, dim,
                                   need_temperature_grad)

    def unweighted_rows():
        loss_rows, *_ = loss_op(rows.detach(), label_rows, None, *settings[:5], "none", checked.backend, False, dim)
        return loss_rows, kept_rows(label_rows, op_ignore_index, dim).reshape(-1)

    loss = with_weight_gradient(loss, weights, reduction, unweighted_rows)
    return loss.reshape(rows_shape) if reduction == "none" else loss


def bi_tempered_binary_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None,
                                     reduction="mean", ignore_index=None, backend="auto", *, sample_weight=None):
    """Binary bi-tempered loss: the 2-class loss of logits [0, x] and labels [1 - y, y], elementwise.

    ``logits`` and ``labels`` (floating, in [0, 1], on the logits' device) share one shape; "mean"
    averages the elements that are not ignored.

    Args (the others are those of :func:`bi_tempered_logistic_loss`):
        t1, t2: as there (floats, 0-d tensors, learnable tensors), or one per element: tensors of
            the logits' shape.
        ignore_index: None (default: every element counts) or an int: elements whose label equals
            it (e.g. 255 or -100 in a segmentation mask) get loss 0 and gradient 0 and are not
            counted by "mean"; their labels are exempt from the [0, 1] check.
        sample_weight: None or a floating tensor of the logits' shape (finite, >= 0): each
            element's loss and gradient times its weight; "mean" = sum(w L) / sum(w) over the
            elements that are not ignored.
    """
    args.check_floating(logits)
    args.check_floating(labels, "labels")  # binary targets in [0, 1], of the logits' shape
    logits = args.autocast_float32(logits)
    check.check_binary_shapes(logits.shape, labels.shape)
    check.check_reduction(reduction)
    check.check_ignore_index(ignore_index)
    iters = args.iterations(num_iters)
    smoothing, _ = args.smoothing_and_value(label_smoothing, logits.device)
    backend = args.resolve_backend(backend, logits.device, logits.dtype)
    t1_ = args.temperature(t1, "t1", logits.device, logits.shape)
    t2_ = args.temperature(t2, "t2", logits.device, logits.shape)
    need_temperature_grad = needs_temperature_grad(t1_, t2_)
    check_temperature_grad_iterations(iters, need_temperature_grad)
    args.check_same_device(labels, logits.device, "logits")
    args.check_dense_labels(labels if ignore_index is None else labels.masked_fill(labels == ignore_index, 0.0))
    weights = args.row_weights(None, sample_weight, None, False, logits.shape, 0, logits.device,
                               native.compute_dtype(logits.dtype), rows_name="logits' shape")
    if logits.numel() == 0:
        return args.empty_loss(logits, logits.shape, reduction)
    need_grad = torch.is_grad_enabled() and torch_func.requires_grad(logits)
    labels_rows = labels.reshape(-1).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    ignored = math.nan if ignore_index is None else float(ignore_index)
    x = logits.reshape(-1)
    loss, *_ = torch_func.call(binary_loss_op, x, labels_rows, None if weights is None else weights.detach(), t1_,
                               t2_, smoothing, iters, ignored, reduction, backend, need_grad, need_temperature_grad)

    def unweighted_rows():
        loss_rows, *_ = binary_loss_op(x.detach(), labels_rows, None, t1_, t2_, smoothing, iters, ignored, "none",
                                      backend, False)
        return loss_rows, labels_rows != ignored  # (a NaN ignore_index: every element)

    loss = with_weight_gradient(loss, weights, reduction, unweighted_rows)
    return loss.reshape(logits.shape) if reduction == "none" else loss


class BiTemperedLogisticLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`bi_tempered_logistic_loss` (call it as ``loss(logits, labels)``, or
    ``loss(logits, labels, sample_weight)``).

    Args (checked here, with the function's checks; temperatures held as tensors at each call):
        t1: 0 <= t1 < 2 (t1 < 1 bounds the loss); a float, a 0-d floating tensor or an
            ``nn.Parameter`` (learnable: it gets dL/dt1, moves with ``.to(device)`` and is saved in
            the state dict), or a tensor of the rows' shape (one per row).
        t2: finite and > 0 (t2 > 1 gives heavy tails); as ``t1``.
        label_smoothing: in [0, 1), default 0 (target 1 - s, others s/(C-1)).
        num_iters: None (converged, default) or an int >= 1, the original algorithm's step count.
        reduction: "mean" (default, over non-ignored rows), "sum" or "none" (per-row losses).
        ignore_index: int (default -100) or None: class-index rows equal to it are skipped.
        weight: None or the C per-class weights (a registered buffer, as ``nn.CrossEntropyLoss``'s).
        backend: "auto" (default), "torch" or "triton", as in :func:`bi_tempered_logistic_loss`.
        inplace_backward: bool (default False): the gradient overwrites the logits (see
            :func:`bi_tempered_logistic_loss`).
        dim: the class axis (keyword only, default -1: the last axis; ``dim=1`` as
            ``nn.CrossEntropyLoss`` takes (N, C, d1, ..., dk) logits); its range is checked against
            the logits at each call.

    ``t1``/``t2`` may be changed between steps (``module.t1 = 0.7``) without recompiling when they
    are held as 0-d tensors. Learnable temperatures: ``BiTemperedLogisticLoss(torch.nn.Parameter(
    torch.tensor(0.8)), torch.nn.Parameter(torch.tensor(1.2)))`` registers them as the module's
    parameters (``module.parameters()`` gives them to an optimizer; keep them in range, e.g. by
    clamping after each step: values are checked at each call on CPU); ``num_iters`` must be None.
    """

    def __init__(self, t1, t2, label_smoothing=0.0, num_iters=None, reduction="mean", ignore_index=-100,
                 backend="auto", inplace_backward=False, *, weight=None, dim=-1):
        super().__init__()
        args.check_loss_settings(t1, t2, label_smoothing, num_iters, reduction, ignore_index, backend)
        args.check_inplace_backward(inplace_backward)
        args.check_dim_type(dim)
        self.t1, self.t2 = t1, t2
        self.label_smoothing, self.num_iters = label_smoothing, num_iters
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend
        self.inplace_backward, self.dim = inplace_backward, dim
        # a buffer, as nn.CrossEntropyLoss's: it moves with .to(device) and is saved in the state dict
        self.register_buffer("weight", weight)

    def forward(self, logits, labels, sample_weight=None):
        return bi_tempered_logistic_loss(logits, labels, self.t1, self.t2, self.label_smoothing,
                                         self.num_iters, self.reduction, self.ignore_index, self.backend,
                                         self.inplace_backward, weight=self.weight, sample_weight=sample_weight,
                                         dim=self.dim)

    def extra_repr(self) -> str:
        return (f"t1={self.t1}, t2={self.t2}, label_smoothing={self.label_smoothing}, "
                f"num_iters={self.num_iters}, reduction={self.reduction!r}, dim={self.dim}")
