"""torch.library custom ops of bitempered, with fake (meta) implementations and autograd.

Each op dispatches to the native backend (``torch_native.py``) or the Triton kernels
(``torch_triton.py``) by its ``backend`` argument. Being custom ops, they are opaque to
``torch.compile``: a model calling the loss compiles with ``fullgraph=True``, and temperatures and
label smoothing are 0-d tensors so a new value never recompiles. Every op passes
``torch.library.opcheck`` (tests/test_torch_opcheck.py); vmap rules and torch.func support are in
``torch_func.py``.

The loss op computes the gradient of the logits in its forward pass (while the row is on chip,
for the kernels), already multiplied by the reduction's scale (1/#kept rows for "mean"), so the
backward only multiplies by the upstream gradient: exact for the usual upstream of 1.0 (or any
power of two). For reduction="none" the backward rescales the stored gradient per row (one read and
one write of N x C, far cheaper than re-solving the rows; the stored gradient was rounded once
into the logits' dtype, so non-unit upstream gradients round twice). The multiply is in place in
eager mode (the returned gradient is the stored buffer) and out of place in functionalized graphs
(torch.compile, torch.export), which cannot mutate a forward output in the backward.
"""

from __future__ import annotations

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch._subclasses.functional_tensor import FunctionalTensor

from bitempered.bindings.torch.native import math as native
from bitempered.bindings.torch.native import loss as native_loss
from bitempered.bindings.torch import second_order

Tensor = torch.Tensor


def _triton():
    from bitempered.bindings.torch import launchers as torch_triton  # imported lazily: Triton may be missing on CPU-only machines

    return torch_triton


def _grad_scale(kept: Tensor, reduction: str, dtype) -> Tensor:
    """The reduction's factor on each row's gradient, as a 0-d device tensor (no host sync)."""
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=kept.device)
    count = kept.sum().to(dtype)
    return torch.where(count > 0, 1.0 / count, 0.0)


def _reduce(loss_rows: Tensor, kept: Tensor, reduction: str) -> Tensor:
    """Per-row losses reduced as F.cross_entropy does ("mean": over kept rows; NaN if none)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / kept.sum().to(loss_rows.dtype)


def _native_loss(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, reduction, need_grad):
    """The native backend over row blocks (bindings/torch/native/loss.py): the gradient, already
    scaled by the reduction and masked, is the only N x C buffer it allocates."""
    if labels.dtype.is_floating_point:
        kept = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    else:
        kept = labels != ignore_index
    scale = _grad_scale(kept, reduction, native.compute_dtype(logits.dtype))
    # host values (floats or 0-d tensors): free for CPU tensors, one sync on CUDA
    loss_rows, kept, grad = native_loss.loss_and_grad(
        logits, labels, float(t1), float(t2), float(label_smoothing), num_iters, ignore_index, need_grad, scale)
    loss = _reduce(loss_rows, kept, reduction)
    return loss, grad if need_grad else _no_grad(logits)


def _triton_loss(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, reduction, need_grad,
                 grad_out=None):
    """The kernels produce per-row losses and the gradient already scaled by the reduction
    (written into ``grad_out`` when given: the in-place mode)."""
    if labels.dtype.is_floating_point:
        kept = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    else:
        kept = labels != ignore_index
    scale = _grad_scale(kept, reduction, torch.float32)
    loss_rows, grad = _triton().loss_forward(logits, labels, t1, t2, label_smoothing, num_iters,
                                             ignore_index, need_grad, grad_out=grad_out, grad_scale=scale)
    loss = _reduce(loss_rows, kept, reduction)
    return loss, grad if grad is not None else _no_grad(logits)


def _no_grad(logits: Tensor) -> Tensor:
    """The op's second output when no gradient was asked for: empty, in the logits' dtype."""
    return logits.new_empty(0)


@torch.library.custom_op("bitempered::loss", mutates_args=())
def loss_op(logits: Tensor, labels: Tensor, t1: Tensor, t2: Tensor, label_smoothing: Tensor,
            num_iters: int, ignore_index: int, reduction: str, backend: str,
            need_grad: bool) -> tuple[Tensor, Tensor]:
    """Rows [N, C] -> (loss reduced by ``reduction``, scaled dL/dlogits or an empty tensor).

    ``num_iters`` 0 means converged (None in the public API).
    """
    iters = num_iters or None
    if backend == "triton":
        return _triton_loss(logits, labels, t1, t2, label_smoothing, iters, ignore_index, reduction, need_grad)
    return _native_loss(logits, labels, t1, t2, label_smoothing, iters, ignore_index, reduction, need_grad)


@loss_op.register_fake
def _(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, reduction, backend, need_grad):
    dtype = native.compute_dtype(logits.dtype)
    shape = (logits.shape[0],) if reduction == "none" else ()
    grad = logits.new_empty(logits.shape) if need_grad else logits.new_empty(0)
    return logits.new_empty(shape, dtype=dtype), grad


def _save_grad(ctx, inputs, output):
    ctx.need_grad = inputs[-1]
    # the gradient output is never differentiated: no N x C zeros for its (absent) upstream gradient
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


SECOND_DERIVATIVES = (
    "bitempered: the losses have no second derivative (backward with create_graph=True, double "
    "backward, torch.func.grad of a grad): their gradient is a closed form computed in the forward "
    "pass, not a differentiable graph. (tempered_softmax and tempered_sigmoid do support double "
    "backward.)")
FORWARD_MODE = ("bitempered: forward-mode AD (torch.func.jvp, jacfwd, hessian) is not supported; use "
                "reverse mode (torch.func.grad, vjp, jacrev)")


def _forbid_double_backward() -> None:
    """The gradient is a closed form computed in the forward pass, not a differentiable graph: raise
    where this backward is itself being differentiated."""
    if torch._C._are_functorch_transforms_active():
        differentiating = [i for i in retrieve_all_functorch_interpreters()
                           if i.key() in (TransformType.Grad, TransformType.Jvp)]
        nested = len(differentiating) >= 2  # this backward runs under another derivative transform
    else:
        nested = torch.is_grad_enabled()  # create_graph=True
    if nested:
        raise RuntimeError(SECOND_DERIVATIVES)


def _scale_in_place(grad: Tensor) -> bool:
    """Eager autograd scales the saved gradient in place (no second N x C buffer). A functionalized
    trace (torch.compile's AOT autograd, torch.export) cannot mutate a forward output in the
    backward and torch.func transforms may hold it at another level: there the product is a new
    tensor (the compiler may reuse the saved buffer for it)."""
    functional_trace = (isinstance(grad, FunctionalTensor) or torch.compiler.is_compiling()
                        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FUNCTIONAL) is not None)
    return not functional_trace and not torch._C._are_functorch_transforms_active()


def _scale_saved_grad(ctx, grad_loss, _unused):
    """dL/dlogits = stored gradient x upstream gradient, in place in eager mode (``_scale_in_place``).

    (The saved tensor changes, so a second backward through the same graph fails autograd's
    saved-tensor version check instead of silently scaling twice.)
    """
    _forbid_double_backward()
    (grad,) = ctx.saved_tensors
    if not ctx.need_grad:
        raise RuntimeError("bitempered: the loss was computed without gradient (need_grad=False)")
    upstream = grad_loss.unsqueeze(-1) if grad_loss.dim() == 1 and grad.dim() == 2 else grad_loss
    if not _scale_in_place(grad):
        scaled = grad * upstream
    elif _is_host_one(grad_loss):
        # the usual loss.backward() of a reduced loss: no pass over N x C; the version bump keeps
        # the second-backward check that mul_ would have triggered
        torch.autograd.graph.increment_version(grad)
        scaled = grad
    else:
        scaled = grad.mul_(upstream)
    return (scaled,) + (None,) * (len(ctx.needs_input_grad) - 1)


def _is_host_one(grad_loss: Tensor) -> bool:
    """A CPU scalar upstream gradient equal to 1 (reading it costs no device sync)."""
    return grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and float(grad_loss) == 1.0


loss_op.register_autograd(_scale_saved_grad, setup_context=_save_grad)


def _native_probs(logits, t, num_iters):
    dtype = native.compute_dtype(logits.dtype)
    a = logits.to(dtype)
    return native.tempered_log_softmax_rows(a, t, num_iters).exp().to(logits.dtype)


@torch.library.custom_op("bitempered::softmax", mutates_args=())
def softmax_op(logits: Tensor, t: Tensor, num_iters: int, backend: str) -> Tensor:
    """Tempered softmax of rows [N, C] in the logits' dtype."""
    if backend == "triton":
        return _triton().softmax_forward(logits, t, num_iters or None)
    return _native_probs(logits, t, num_iters or None)


@softmax_op.register_fake
def _(logits, t, num_iters, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("bitempered::softmax_backward", mutates_args=())
def softmax_backward_op(probs: Tensor, grad: Tensor, t: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        return _triton().softmax_backward(probs, grad, t)
    dtype = native.compute_dtype(probs.dtype)
    p = probs.to(dtype)
    return native.tempered_softmax_vjp_rows(p, grad.to(dtype), t).to(probs.dtype)


@softmax_backward_op.register_fake
def _(probs, grad, t, backend):
    return torch.empty_like(probs)


def _save_probs(ctx, inputs, output):
    ctx.backend = inputs[-1]
    ctx.save_for_backward(output, inputs[1])


def _direct(op, *args):
    return op(*args)


def _softmax_vjp(ctx, grad, invoke=_direct):
    """(``invoke`` calls the backward op: torch_func passes its transform-ready call.)"""
    probs, t = ctx.saved_tensors
    return invoke(softmax_backward_op, probs, grad.contiguous(), t, ctx.backend), None, None, None


softmax_op.register_autograd(_softmax_vjp, setup_context=_save_probs)


def _save_vjp_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])


def _softmax_vjp_vjp(ctx, upstream):
    probs, grad, t = ctx.saved_tensors
    return second_order.softmax_vjp_vjp_rows(probs, grad, upstream, t) + (None, None)


softmax_backward_op.register_autograd(_softmax_vjp_vjp, setup_context=_save_vjp_inputs)


def _second_class(rows: Tensor) -> Tensor:
    """Column 1 of [N, 2] rows as a new contiguous tensor (no view: offset 0, as the fake says)."""
    return rows[:, 1].clone(memory_format=torch.contiguous_format)


def _binary_rows(x: Tensor) -> Tensor:
    """Logits [0, x] of the 2-class problem behind the binary functions."""
    return torch.stack([torch.zeros_like(x), x], dim=-1)


@torch.library.custom_op("bitempered::binary_loss", mutates_args=())
def binary_loss_op(logits: Tensor, labels: Tensor, t1: Tensor, t2: Tensor, label_smoothing: Tensor,
                   num_iters: int, reduction: str, backend: str, need_grad: bool) -> tuple[Tensor, Tensor]:
    """Binary loss of 1-D logits x and labels y: the 2-class loss of [0, x] and [1 - y, y]."""
    if backend == "triton":
        kept = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        loss_rows, grad = _triton().binary_loss_forward(logits, labels, t1, t2, label_smoothing, num_iters or None,
                                                        need_grad, grad_scale=_grad_scale(kept, reduction, torch.float32))
        loss = _reduce(loss_rows, kept, reduction)
        return loss, grad if grad is not None else _no_grad(logits)
    dense = torch.stack([1.0 - labels, labels], dim=-1)
    loss, grad = _native_loss(_binary_rows(logits), dense, t1, t2, label_smoothing, num_iters or None,
                              -100, reduction, need_grad)
    return loss, _second_class(grad) if need_grad else grad


@binary_loss_op.register_fake
def _(logits, labels, t1, t2, label_smoothing, num_iters, reduction, backend, need_grad):
    dtype = native.compute_dtype(logits.dtype)
    shape = (logits.shape[0],) if reduction == "none" else ()
    grad = logits.new_empty(logits.shape) if need_grad else logits.new_empty(0)
    return logits.new_empty(shape, dtype=dtype), grad


binary_loss_op.register_autograd(_scale_saved_grad, setup_context=_save_grad)


@torch.library.custom_op("bitempered::sigmoid", mutates_args=())
def sigmoid_op(logits: Tensor, t: Tensor, num_iters: int, backend: str) -> Tensor:
    """Tempered sigmoid of 1-D logits: tempered_softmax([0, x])[1]."""
    if backend == "triton":
        return _triton().sigmoid_forward(logits, t, num_iters or None)
    return _second_class(_native_probs(_binary_rows(logits), t, num_iters or None))


@sigmoid_op.register_fake
def _(logits, t, num_iters, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("bitempered::sigmoid_backward", mutates_args=())
def sigmoid_backward_op(probs: Tensor, grad: Tensor, t: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        return _triton().sigmoid_backward(probs, grad, t)
    rows = torch.stack([1.0 - probs, probs], dim=-1)
    grad_rows = torch.stack([torch.zeros_like(grad), grad], dim=-1)
    return _second_class(softmax_backward_op(rows, grad_rows, t, backend))


@sigmoid_backward_op.register_fake
def _(probs, grad, t, backend):
    return torch.empty_like(probs)


def _sigmoid_vjp(ctx, grad, invoke=_direct):
    probs, t = ctx.saved_tensors
    return invoke(sigmoid_backward_op, probs, grad.contiguous(), t, ctx.backend), None, None, None


sigmoid_op.register_autograd(_sigmoid_vjp, setup_context=_save_probs)


def _sigmoid_vjp_vjp(ctx, upstream):
    probs, grad, t = ctx.saved_tensors
    return second_order.sigmoid_vjp_vjp(probs, grad, upstream, t) + (None, None)


sigmoid_backward_op.register_autograd(_sigmoid_vjp_vjp, setup_context=_save_vjp_inputs)


class InplaceBackwardLoss(torch.autograd.Function):
    """The loss with its gradient written into the logits' own buffer (opt-in ``inplace_backward``).

    No N x C allocation with the kernels (the native backend computes the gradient elsewhere and
    copies it in). The logits' values are destroyed: use it only when nothing else needs them.
    Eager only (the public API uses the custom op instead while torch.compile traces).
    """

    @staticmethod
    def forward(ctx, logits, rows, labels, t1, t2, label_smoothing, num_iters, ignore_index, reduction,
                backend):
        buffer = rows.detach()
        if backend == "triton":
            loss, grad = _triton_loss(buffer, labels, t1, t2, label_smoothing, num_iters or None, ignore_index,
                                      reduction, True, grad_out=buffer)
        else:
            loss, grad = _native_loss(buffer, labels, t1, t2, label_smoothing, num_iters or None, ignore_index,
                                      reduction, True)
            buffer.copy_(grad)
        ctx.save_for_backward(buffer)
        ctx.logits_shape = logits.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_loss.unsqueeze(-1) if grad_loss.dim() == 1 else grad_loss)
        return (grad.view(ctx.logits_shape),) + (None,) * 9
