"""Fused linear + bi-tempered loss for PyTorch: the loss of ``hidden @ weight.T + bias`` without
ever holding the N x C logits (or their gradient) in memory.

It equals ``bi_tempered_logistic_loss(hidden @ weight.T + bias, labels, ...)`` up to rounding.
Rows are processed in chunks. Per chunk: one matmul for the logits (input dtype), the existing loss
machinery (the Triton kernel writing the gradient into the chunk's own logits buffer on CUDA, the
native backend on CPU), then ``grad_hidden[chunk] = dlogits @ weight`` and
``grad_weight += dlogits.T @ hidden[chunk]`` (``grad_bias += dlogits.sum(0)``), accumulated in fp32
(fp64 for fp64 weights). Peak extra memory: one chunk x C buffer (plus the native backend's
per-chunk temporaries), the accumulators and O(N); never N x C.

Default chunk size (``chunk_size=None``): ``clamp(64 MiB // (4 C), 1, N)`` rows, one fp32 chunk
x C buffer within 64 MiB (``bindings/common/linear_chunks.py`` says why).

"mean"/"sum": every gradient is computed in the forward pass (3 matmuls per chunk, no
recomputation); the backward only multiplies them by the upstream scalar. float16: grad_hidden is
held in float32 until then (``rows.stored_grad_dtype``: float16 cannot hold it x 1/N). "none": the forward
computes the per-row losses only; the backward recomputes each chunk's logits and gradient with the
upstream value of each row (exact for any upstream vector, grad_weight included).

Learnable temperatures (t1, t2 that require grad; 0-d or one per row): each row's (dL/dt1,
dL/dt2) comes from its chunk's one solve (``temperature_grads=`` of the per-chunk call: no extra
pass, O(N) values), times the row's factor; the backward multiplies them by the upstream gradient,
for "none" too (no recomputation for them). Nothing of it is computed when none requires grad.
"""

from __future__ import annotations

import torch

from bitempered.bindings.common import linear_chunks
from bitempered.bindings.common import validation as check
from bitempered.bindings.torch import args, ops
from bitempered.bindings.torch.native import loss as native_loss
from bitempered.bindings.torch.native import math as native
from bitempered.bindings.torch.native import temperature
from bitempered.bindings.torch.rows import (
    TemperatureInput, kept_rows, mean_factor, reduce, stored_grad_dtype, temperature_gradients, with_weight_gradient,
)

Tensor = torch.Tensor


def _accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, the running sum over chunks kept in acc's dtype (fp32), never rounded to bf16."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        try:
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))  # bf16 tensor cores with an fp32 output
        except (RuntimeError, TypeError):  # a torch without mm(out_dtype=): the chunk's product rounds once
            acc.add_(torch.mm(a, b))
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))  # CPU: no fast bf16 GEMM to keep anyway


def _chunk_gradient(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, backend, row_scale,
                    need_grad, temperature_grads=None):
    """(per-row losses, dL/dlogits x row_scale or None) of one chunk of logits.

    ``row_scale``: a 0-d tensor (the reduction's factor) or a [rows, 1] tensor (upstream values or
    the rows' factors). Triton: the gradient overwrites ``logits`` (in-place mode). Native: the
    gradient is the backend's fp32 buffer, scaled there before any rounding. ``t1``, ``t2``: 0-d or
    one per row of the chunk. ``temperature_grads``: None or the chunk's [rows, 2] output (compute
    dtype) of each row's (dL/dt1, dL/dt2) x row_scale, from the same solve.
    """
    if backend == "triton":
        scalar = row_scale is not None and row_scale.dim() == 0
        loss_rows, grad = ops.triton_launchers().loss_forward(logits, labels, t1, t2, label_smoothing, num_iters,
                                                             ignore_index, need_grad,
                                                             grad_out=logits if need_grad else None,
                                                             grad_scale=row_scale if scalar else None,
                                                             temperature_grads=temperature_grads)
        if need_grad and not scalar:
            grad.mul_(row_scale)
        if temperature_grads is not None:  # the kernel's are for unit upstream gradient
            temperature_grads.mul_(row_scale)
        return loss_rows, grad
    rows = logits.to(native.compute_dtype(logits.dtype))  # the native loss computes in this dtype anyway
    del logits
    # the driver applies the row scale as it writes each block's gradient (no second pass), and to
    # the temperature gradients; per-row temperatures are solved in groups of equal values
    scale = torch.ones((), dtype=rows.dtype) if row_scale is None else row_scale.reshape(row_scale.shape[:1])
    loss_rows, _, grad = native_loss.grouped_loss_and_grad(rows, labels, t1, t2, float(label_smoothing), num_iters,
                                                           ignore_index, need_grad, scale,
                                                           temperature_grads=temperature_grads)
    return loss_rows, grad


def _chunk_rows(values: Tensor, start: int, end: int) -> Tensor:
    """The rows [start, end) of a per-row value (a temperature [N]); a 0-d one as it is."""
    return values[start:end] if temperature.is_per_row(values) else values


def chunked_pass(hidden, weight, bias, labels, t1, t2, label_smoothing, num_iters, ignore_index, backend,
                 chunk_size, row_scale, need_hidden, need_weight, need_bias, temperature_grads=None):
    """One pass over the row chunks: (per-row losses [N], grad_hidden, grad_weight, grad_bias).

    ``row_scale`` multiplies each row's gradient: None (no gradient), a 0-d tensor or an [N] tensor.
    The weight and bias gradients come back in the accumulation dtype (fp32, fp64 for fp64).
    ``t1``, ``t2``: 0-d or one per row [N]. ``temperature_grads``: None or the [N, 2] output (compute
    dtype) that receives each row's (dL/dt1, dL/dt2) x ``row_scale`` (then not None), computed with
    the loss in each chunk's one solve.
    """
    num_rows, num_classes = hidden.shape[0], weight.shape[0]
    acc_dtype = native.compute_dtype(weight.dtype)
    need_grad = row_scale is not None and (need_hidden or need_weight or need_bias)
    loss_rows = torch.empty(num_rows, dtype=native.compute_dtype(hidden.dtype), device=hidden.device)
    # Outputs not asked for are fresh empty tensors (custom-op outputs may not alias each other).
    grad_hidden = torch.empty_like(hidden) if need_grad and need_hidden else hidden.new_empty(0)
    grad_weight = weight.new_zeros(weight.shape if need_grad and need_weight else (0,), dtype=acc_dtype)
    grad_bias = weight.new_zeros(num_classes if need_grad and need_bias else 0, dtype=acc_dtype)
    weight_t = weight.t()
    for start in range(0, num_rows, chunk_size):
        end = min(start + chunk_size, num_rows)
        x = hidden[start:end]
        logits = torch.addmm(bias, x, weight_t) if bias is not None else torch.mm(x, weight_t)
        scale = row_scale
        if row_scale is not None and row_scale.dim() == 1:
            scale = row_scale[start:end].to(torch.float32 if backend == "triton" else loss_rows.dtype).unsqueeze(-1)
        chunk_loss, dlogits = _chunk_gradient(logits, labels[start:end], _chunk_rows(t1, start, end),
                                              _chunk_rows(t2, start, end), label_smoothing, num_iters, ignore_index,
                                              backend, scale, need_grad,
                                              None if temperature_grads is None else temperature_grads[start:end])
        del logits
        loss_rows[start:end] = chunk_loss
        if not need_grad:
            continue
        if need_hidden:
            torch.mm(dlogits.to(weight.dtype), weight, out=grad_hidden[start:end])
        if need_weight:
            _accumulate_product(grad_weight, dlogits.t(), x)
        if need_bias:
            grad_bias.add_(dlogits.sum(dim=0, dtype=acc_dtype))
        del dlogits
    return loss_rows, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("bitempered::linear_loss", mutates_args=())
def linear_loss_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, weights: Tensor | None,
                   t1: Tensor, t2: Tensor, label_smoothing: Tensor, num_iters: int, ignore_index: int, reduction: str,
                   backend: str, chunk_size: int, need_hidden: bool, need_weight: bool, need_bias: bool,
                   need_temperature_grad: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [N, H], weight [C, H], bias [C] or None -> (loss reduced by ``reduction``, grad_hidden,
    grad_weight, grad_bias, temperature gradients), the gradients for unit upstream gradient (empty
    where not asked for, and grad_hidden/weight/bias always empty for "none", whose backward
    recomputes). ``weights``: None or each row's weight [N]. ``t1``, ``t2``: 0-d or one per row [N].
    ``num_iters`` 0 means converged. ``need_temperature_grad``: the last output, each row's
    (dL/dt1, dL/dt2) [N, 2] times the row's factor on its logits' gradient (the reduction's, its
    weight; 0 for ignored rows), as ``ops.loss_op``'s, from the chunks' one solve (for "none" too:
    its backward only multiplies them by the upstream values); converged only."""
    ops.check_temperature_grad_iterations(num_iters, need_temperature_grad)
    iters = num_iters or None
    dtype = native.compute_dtype(hidden.dtype)
    kept = kept_rows(labels, ignore_index)
    # float16 cannot hold the chunks' gradients x 1/N (rows.stored_grad_dtype): they keep only the
    # rows' weights, and "mean"'s factor multiplies the float32 results
    deferred = stored_grad_dtype(hidden.dtype) != hidden.dtype
    unit = torch.ones((), dtype=dtype, device=hidden.device)
    row_weights = unit if weights is None else weights.to(dtype)
    scale = factor = None
    if reduction != "none":
        factor = mean_factor(kept, dtype, weights) if reduction == "mean" else unit
        scale = row_weights * (unit if deferred else factor)
    elif need_temperature_grad:  # "none": the rows' weights, the upstream values come in the backward
        scale = row_weights
    if scale is not None and backend == "triton":
        scale = scale.to(torch.float32)
    temperature_grads = _temperature_grads_output(hidden, need_temperature_grad)
    in_forward = reduction != "none"
    loss_rows, grad_hidden, grad_weight, grad_bias = chunked_pass(
        hidden, weight, bias, labels, t1, t2, label_smoothing, iters, ignore_index, backend, chunk_size, scale,
        need_hidden and in_forward, need_weight and in_forward, need_bias and in_forward,
        temperature_grads if need_temperature_grad else None)
    if deferred and factor is not None:
        grad_hidden = grad_hidden.to(torch.float32).mul_(factor)
        grad_weight.mul_(factor)
        grad_bias.mul_(factor)
        temperature_grads.mul_(factor)
    loss_rows = torch.where(kept, loss_rows, 0.0)
    return reduce(loss_rows, kept, reduction, weights), grad_hidden, grad_weight, grad_bias, temperature_grads


def _temperature_grads_output(hidden: Tensor, need_temperature_grad: bool) -> Tensor:
    """The op's last output: [N, 2] in the compute dtype (float32 but for float64 hidden: what the
    kernels write), or empty when not asked for."""
    shape = (hidden.shape[0], 2) if need_temperature_grad else (0,)
    return hidden.new_empty(shape, dtype=native.compute_dtype(hidden.dtype))


@linear_loss_op.register_fake
def _(hidden, weight, bias, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction, backend,
      chunk_size, need_hidden, need_weight, need_bias, need_temperature_grad=False):
    dtype = native.compute_dtype(hidden.dtype)
    acc_dtype = native.compute_dtype(weight.dtype)
    in_forward = reduction != "none"
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=dtype)
    grad_hidden = hidden.new_empty(hidden.shape if in_forward and need_hidden else (0,),
                                   dtype=stored_grad_dtype(hidden.dtype))
    grad_weight = weight.new_empty(weight.shape if in_forward and need_weight else (0,), dtype=acc_dtype)
    grad_bias = weight.new_empty((weight.shape[0],) if in_forward and need_bias else (0,), dtype=acc_dtype)
    return loss, grad_hidden, grad_weight, grad_bias, _temperature_grads_output(hidden, need_temperature_grad)


@torch.library.custom_op("bitempered::linear_loss_backward", mutates_args=())
def linear_loss_backward_op(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                            labels: Tensor, weights: Tensor | None, t1: Tensor, t2: Tensor, label_smoothing: Tensor,
                            num_iters: int, ignore_index: int, backend: str, chunk_size: int, need_hidden: bool,
                            need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_loss_i * w_i * loss_i (reduction="none"), recomputed chunk by chunk;
    in the inputs' dtypes (empty where not asked for)."""
    kept = kept_rows(labels, ignore_index)
    upstream = torch.where(kept, grad_loss.to(native.compute_dtype(hidden.dtype)), 0.0)
    if weights is not None:
        upstream = upstream * weights.to(upstream.dtype)
    _, grad_hidden, grad_weight, grad_bias = chunked_pass(
        hidden, weight, bias, labels, t1, t2, label_smoothing, num_iters or None, ignore_index, backend,
        chunk_size, upstream, need_hidden, need_weight, need_bias)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@linear_loss_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, backend,
      chunk_size, need_hidden, need_weight, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty((weight.shape[0],) if need_bias else (0,)))


def _setup(ctx, inputs, output):
    (hidden, weight, bias, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction, backend,
     chunk_size, need_hidden, need_weight, need_bias) = inputs[:16]
    ctx.reduction = reduction
    ctx.config = (label_smoothing, num_iters, ignore_index, backend, chunk_size, need_hidden, need_weight,
                  need_bias)
    ctx.dtypes = (hidden.dtype, weight.dtype)
    ctx.has_bias = bias is not None
    ctx.need_temperature_grad = len(inputs) > 16 and bool(inputs[16])  # (a caller may leave it out)
    ctx.temperatures = [TemperatureInput.of(t) for t in (t1, t2)]
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, labels, weights, t1, t2, output[4])
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, _gh, _gw, _gb, _dt):
    (_, _, _, _, _, need_hidden, need_weight, need_bias) = ctx.config
    grads = [None] * len(ctx.needs_input_grad)
    if (ctx.needs_input_grad[5] or ctx.needs_input_grad[6]) and not ctx.need_temperature_grad:
        raise RuntimeError("bitempered: the loss was computed without temperature gradients "
                           "(need_temperature_grad=False)")
    if ctx.reduction == "none":
        hidden, weight, bias, labels, weights, t1, t2, temperature_grads = ctx.saved_tensors
        if need_hidden or need_weight or need_bias:
            grads[:3] = linear_loss_backward_op(grad_loss.contiguous(), hidden, weight, bias, labels, weights, t1, t2,
                                                *ctx.config)
    else:
        # Out of place: the saved tensors are forward outputs and stay untouched.
        *stored, temperature_grads = ctx.saved_tensors
        grads[:3] = (g * grad_loss.to(g.dtype) for g in stored)
        hidden_dtype, weight_dtype = ctx.dtypes
        grads[:3] = (grads[0].to(hidden_dtype), grads[1].to(weight_dtype), grads[2].to(weight_dtype))
    for i, need in enumerate((need_hidden, need_weight, need_bias and ctx.has_bias)):
        grads[i] = grads[i] if need else None
    if ctx.need_temperature_grad:
        grads[5:7] = temperature_gradients(temperature_grads, grad_loss, ctx.temperatures, ctx.needs_input_grad[5:7])
    return tuple(grads)


linear_loss_op.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------
# Public API: validation (the plain loss's checks and messages), then the op
# --------------------------------------------------------------------------------------------

def _check_operands(hidden, weight, bias) -> None:
    args.check_floating(hidden, "hidden")
    args.check_floating(weight, "weight")
    check.check_linear_shapes(hidden.shape, weight.shape)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden and weight must be on the same device, got {hidden.device} and {weight.device}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be None or a torch.Tensor, got {type(bias).__name__}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [C] = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias must have the weight's dtype {weight.dtype}, got {bias.dtype}")
    if bias.device != weight.device:
        raise ValueError(f"bias is on {bias.device} but weight on {weight.device}")


def linear_bi_tempered_logistic_loss(hidden, weight, labels, t1, t2, bias=None, label_smoothing=0.0,
                                     num_iters=None, reduction="mean", ignore_index=-100, chunk_size=None,
                                     backend="auto", *, class_weight=None, sample_weight=None):
    """Bi-tempered loss of the linear layer's logits, without materializing them:
    ``bi_tempered_logistic_loss(hidden @ weight.T + bias, labels, t1, t2, ...)`` up to rounding.

    Args:
        hidden: [..., H] floating tensor. weight: [C, H] (``nn.Linear`` layout), same dtype/device.
        labels: integer class indices of shape ``hidden.shape[:-1]`` (or dense [..., C] labels).
        bias: None or [C].
        chunk_size: rows per chunk; None: ``clamp(64 MiB // (4 C), 1, N)`` (one fp32 chunk x C
            buffer within 64 MiB).
        t1, t2, label_smoothing, num_iters, reduction, ignore_index, backend: as in
            :func:`bi_tempered_logistic_loss` (temperatures as 0-d tensors never recompile; or one
            per row, of shape ``hidden.shape[:-1]``). A temperature that requires grad gets its
            exact gradient, computed in the same chunked pass as the loss (``num_iters`` None).
        class_weight, sample_weight: the per-class and per-row weights of
            :func:`bi_tempered_logistic_loss` (its ``weight``; named ``class_weight`` here, where
            ``weight`` is the linear layer's).

    Gradients flow to whichever of hidden / weight / bias / t1 / t2 requires them; grad_weight and
    grad_bias are accumulated over the chunks in fp32 (fp64 for fp64) and rounded once. Inside
    ``torch.autocast`` the matmuls run in autocast's dtype (as ``F.linear``) and the loss in float32.
    """
    _check_operands(hidden, weight, bias)
    hidden, weight, bias = args.autocast_operands(hidden, weight, bias)
    num_classes = weight.shape[0]
    logits_shape = tuple(hidden.shape[:-1]) + (num_classes,)
    checked = args.loss_args(logits_shape, hidden.device, hidden.dtype, labels, t1, t2, label_smoothing, num_iters,
                             reduction, ignore_index, backend, holder="hidden", per_row_temperatures=True)
    check.check_smoothing_classes(checked.smoothing_value, num_classes)
    grad_on = torch.is_grad_enabled()
    need_temperature_grad = grad_on and (checked.t1.requires_grad or checked.t2.requires_grad)
    ops.check_temperature_grad_iterations(checked.num_iters, need_temperature_grad)
    x = hidden.reshape(-1, hidden.shape[-1])
    x = x if x.is_contiguous() else x.contiguous()
    label_rows = args.label_rows(labels, checked.indices)
    args.check_label_values(label_rows, checked.indices, num_classes, ignore_index)
    weights = args.row_weights(class_weight, sample_weight, label_rows, checked.indices, hidden.shape[:-1],
                               num_classes, hidden.device, native.compute_dtype(hidden.dtype), "class_weight")
    label_rows, op_ignore_index = args.op_labels(label_rows, checked.indices, ignore_index, num_classes)
    chunk = linear_chunks.chunk_size(chunk_size, x.shape[0], num_classes)
    need = [grad_on and v is not None and v.requires_grad for v in (hidden, weight, bias)]
    operands = (x, weight.contiguous(), None if bias is None else bias.contiguous(), label_rows)
    settings = (checked.t1, checked.t2, checked.smoothing, checked.num_iters, op_ignore_index)
    op_weights = None if weights is None else weights.detach()  # their gradient: with_weight_gradient
    loss, *_ = linear_loss_op(*operands, op_weights, *settings, reduction, checked.backend, chunk, *need,
                              need_temperature_grad)

    def unweighted_rows():
        loss_rows, *_ = linear_loss_op(*(None if t is None else t.detach() for t in operands[:3]), label_rows, None,
                                       *settings, "none", checked.backend, chunk, False, False, False)
        return loss_rows, kept_rows(label_rows, op_ignore_index)

    loss = with_weight_gradient(loss, weights, reduction, unweighted_rows)
    return loss.reshape(hidden.shape[:-1]) if reduction == "none" else loss


class LinearBiTemperedLogisticLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`linear_bi_tempered_logistic_loss`: ``loss(hidden, weight, labels,
    bias=None, sample_weight=None)``; ``class_weight`` (the C per-class weights) is a registered
    buffer. Temperatures held as 0-d tensors may change between steps without recompiling."""

    def __init__(self, t1, t2, label_smoothing=0.0, num_iters=None, reduction="mean", ignore_index=-100,
                 chunk_size=None, backend="auto", *, class_weight=None):
        super().__init__()
        args.check_loss_settings(t1, t2, label_smoothing, num_iters, reduction, ignore_index, backend)
        linear_chunks.chunk_size(chunk_size, 1, 1)
        self.t1, self.t2 = t1, t2
        self.label_smoothing, self.num_iters = label_smoothing, num_iters
        self.reduction, self.ignore_index = reduction, ignore_index
        self.chunk_size, self.backend = chunk_size, backend
        self.register_buffer("class_weight", class_weight)

    def forward(self, hidden, weight, labels, bias=None, sample_weight=None):
        return linear_bi_tempered_logistic_loss(hidden, weight, labels, self.t1, self.t2, bias,
                                                self.label_smoothing, self.num_iters, self.reduction,
                                                self.ignore_index, self.chunk_size, self.backend,
                                                class_weight=self.class_weight, sample_weight=sample_weight)

    def extra_repr(self) -> str:
        return (f"t1={self.t1}, t2={self.t2}, label_smoothing={self.label_smoothing}, "
                f"num_iters={self.num_iters}, reduction={self.reduction!r}, chunk_size={self.chunk_size}")
