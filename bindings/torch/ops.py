"""torch.library custom ops of bitempered, with fake (meta) implementations and autograd.

Each op dispatches to the native backend (``native/``) or the Triton kernels (``launchers``) by its
``backend`` argument. Being custom ops, they are opaque to ``torch.compile``: a model calling the
loss compiles with ``fullgraph=True``, and temperatures and label smoothing are 0-d tensors so a
new value never recompiles. Every op passes ``torch.library.opcheck``
(tests/test_torch_opcheck.py); vmap rules and torch.func support are in ``func``, which rebuilds
each op's autograd from ``autograd_rules``.

Temperatures: the ops take t1/t2/t as 0-d tensors or one value per row [R] (row order). Where one
requires grad, the loss ops return each row's (dL/dt1, dL/dt2) as a third output from the same
solve (``need_temperature_grad``; already times the row's factor, as the logits' gradient), and
the softmax's backward computes the gradient of t in the same pass as the logits'
(``softmax_temperature_backward_op``); nothing of it is computed otherwise.

The loss op computes the gradient of the logits in its forward pass (while the row is on chip,
for the kernels), already multiplied by the reduction's scale (1/#kept rows for "mean"), so the
backward only multiplies by the upstream gradient (``rows.scale_stored_grad``: in place in eager
mode, out of place in functionalized or retained graphs). For reduction="none" that rescales the
stored gradient per row: one read and one write of N x C, far cheaper than re-solving the rows.
The stored gradient's dtype is ``rows.stored_grad_dtype`` (float32 for float16 logits).

Autocast: inside ``torch.autocast`` the loss ops take float32 logits (``register_autocast``), as
``F.cross_entropy`` does; the public functions upcast before calling them (``args.autocast_float32``).

The class axis: ``loss_op``, ``softmax_op`` and ``softmax_backward_op`` take rows [N, C] (the
default ``class_dim=-1``), or logits of any rank with the classes on ``class_dim`` (a NEGATIVE int:
a vmapped batch added in front never moves it); then the class-index labels, the row weights and
the "none" loss are one per row [R] in row order (the logits' entries with the class axis removed,
row-major), dense labels have the logits' shape. The Triton launchers read such logits in place (no
copy); the native backend moves the class axis last (a copy, unless the classes are innermost in
memory, as in channels_last). Per-class outputs are allocated ``torch.empty_like`` the logits (their
strides where those are dense), on both backends and in the fake implementations alike.
"""

from __future__ import annotations

import math

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from bitempered.bindings.common.validation import without_axis
from bitempered.bindings.torch import second_order
from bitempered.bindings.torch.rows import TemperatureInput as _TemperatureInput
from bitempered.bindings.torch.rows import (
    grad_scale, kept_rows, reduce, scale_half_stored_grad, scale_stored_grad, stored_grad_dtype,
)
from bitempered.bindings.torch.native import loss as native_loss
from bitempered.bindings.torch.native import math as native
from bitempered.bindings.torch.native import temperature

Tensor = torch.Tensor


def triton_launchers():
    """The Triton launchers module, imported on first use (Triton may be missing on CPU-only machines)."""
    from bitempered.bindings.torch import launchers

    return launchers


def class_rows(x: Tensor, class_dim: int) -> Tensor:
    """``x`` with its classes on ``class_dim`` as rows [R, C] in row order with unit class stride, for
    the native backend: the class axis moved last (a copy, unless the classes are innermost in
    memory, as in channels_last)."""
    rows = x.movedim(class_dim, -1).reshape(math.prod(without_axis(x.shape, class_dim)), x.shape[class_dim])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def from_class_rows(rows: Tensor, like: Tensor, class_dim: int) -> Tensor:
    """Rows [R, C] (``class_rows``) back in the shape of ``like`` (classes on ``class_dim``), in a
    tensor allocated ``torch.empty_like(like)`` in the rows' dtype: the fake implementations' layout."""
    out = torch.empty_like(like, dtype=rows.dtype)
    moved = out.movedim(class_dim, -1)
    moved.copy_(rows.reshape(moved.shape))
    return out


def _native_loss(logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction, need_grad,
                 class_dim=-1, need_temperature_grad=False):
    """The native loss driver (``native/loss.py``) with the op's outputs (an empty gradient when none
    was asked for): the gradient, already scaled by the reduction (and the rows' weights) and
    masked, is the only N x C buffer it allocates on rows [N, C]; classes on another axis cost two
    more (the moved rows, none for channels_last; the gradient's rows before their copy into the
    logits' layout). Temperatures: 0-d or one per row [R] (solved in groups of equal values)."""
    if class_dim != -1:
        dense = labels.dtype.is_floating_point
        loss, grad, dt = _native_loss(class_rows(logits, class_dim),
                                      class_rows(labels, class_dim) if dense else labels, weights, t1, t2,
                                      label_smoothing, num_iters, ignore_index, reduction, need_grad,
                                      need_temperature_grad=need_temperature_grad)
        return loss, from_class_rows(grad, logits, class_dim) if need_grad else grad, dt
    dt = _temperature_grads_output(logits, logits.shape[0], need_temperature_grad)
    loss, grad = native_loss.reduced_loss_and_grad(logits, labels, t1, t2, label_smoothing, num_iters,
                                                   ignore_index, reduction, need_grad, weights=weights,
                                                   temperature_grads=dt if need_temperature_grad else None)
    return loss, grad if need_grad else _no_grad(logits), dt


def _triton_loss(logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction, need_grad,
                 grad_out=None, class_dim=-1, need_temperature_grad=False):
    """The kernels produce per-row losses and the gradient already scaled by the reduction (a
    factor per row with ``weights``; written into ``grad_out`` when given: the in-place mode). They
    read logits with the classes on ``class_dim`` in place. The temperature gradients come unscaled
    from the same launch, and take the rows' factors here."""
    kept = kept_rows(labels, ignore_index, class_dim).reshape(-1)
    scale = grad_scale(kept, reduction, torch.float32, weights)
    dt = _temperature_grads_output(logits, kept.shape[0], need_temperature_grad)
    per_row, grad = triton_launchers().loss_forward(logits, labels, t1, t2, label_smoothing, num_iters,
                                                    ignore_index, need_grad, grad_out=grad_out, grad_scale=scale,
                                                    class_dim=class_dim,
                                                    temperature_grads=dt if need_temperature_grad else None)
    if need_temperature_grad:
        dt.mul_(scale.unsqueeze(-1) if scale.dim() else scale)
    return reduce(per_row, kept, reduction, weights), grad if grad is not None else _no_grad(logits), dt


def _no_grad(logits: Tensor) -> Tensor:
    """The op's second output when no gradient was asked for: empty, in the logits' dtype."""
    return logits.new_empty(0)


def _temperature_grads_output(logits: Tensor, num_rows: int, need_temperature_grad: bool) -> Tensor:
    """The loss ops' third output: [R, 2] for each row's (dL/dt1, dL/dt2), or empty when not asked
    for; in the compute dtype (float32 for the kernels, which take no float64)."""
    shape = (num_rows, 2) if need_temperature_grad else (0,)
    return logits.new_empty(shape, dtype=native.compute_dtype(logits.dtype))


TEMPERATURE_GRAD_ITERATIONS = (
    "bitempered: the gradient of a temperature is defined for the converged normalization only: "
    "num_iters must be None where t1, t2 or t requires grad, got num_iters={}")


def check_temperature_grad_iterations(num_iters: int, need_temperature_grad: bool) -> None:
    """ValueError naming num_iters: the temperature gradients hold for the converged solve only."""
    if need_temperature_grad and num_iters:
        raise ValueError(TEMPERATURE_GRAD_ITERATIONS.format(num_iters))


@torch.library.custom_op("bitempered::loss", mutates_args=())
def loss_op(logits: Tensor, labels: Tensor, weights: Tensor | None, t1: Tensor, t2: Tensor, label_smoothing: Tensor,
            num_iters: int, ignore_index: int, reduction: str, backend: str,
            need_grad: bool, class_dim: int = -1, need_temperature_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Rows [N, C] (or logits with the classes on ``class_dim``, see the module docstring) ->
    (loss reduced by ``reduction``, scaled dL/dlogits or an empty tensor, scaled per-row
    (dL/dt1, dL/dt2) [R, 2] or an empty tensor).

    ``weights``: None or each row's weight [R] (``args.row_weights``: weight[target] x sample_weight).
    ``t1``, ``t2``: 0-d, or one value per row [R] (row order). ``num_iters`` 0 means converged (None
    in the public API). ``need_temperature_grad``: the third output, each row's temperature
    gradients times the row's factor on its logits' gradient (the reduction's, its weight; 0 for
    ignored rows, NaN for bad class indices), from the same solve; converged only.
    """
    check_temperature_grad_iterations(num_iters, need_temperature_grad)
    iters = num_iters or None
    if backend == "triton":
        return _triton_loss(logits, labels, weights, t1, t2, label_smoothing, iters, ignore_index, reduction,
                            need_grad, class_dim=class_dim, need_temperature_grad=need_temperature_grad)
    return _native_loss(logits, labels, weights, t1, t2, label_smoothing, iters, ignore_index, reduction, need_grad,
                        class_dim, need_temperature_grad)


@loss_op.register_fake
def _(logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction, backend, need_grad,
      class_dim=-1, need_temperature_grad=False):
    return _fake_loss_outputs(logits, reduction, need_grad, math.prod(without_axis(logits.shape, class_dim)),
                              need_temperature_grad)


def _fake_loss_outputs(logits, reduction, need_grad, num_rows, need_temperature_grad=False):
    """The loss ops' outputs: the loss (compute dtype; one per row [R] for "none"), the stored
    gradient (allocated like the logits) and the temperature gradients."""
    dtype = native.compute_dtype(logits.dtype)
    shape = (num_rows,) if reduction == "none" else ()
    grad = torch.empty_like(logits, dtype=stored_grad_dtype(logits.dtype)) if need_grad else logits.new_empty(0)
    return (logits.new_empty(shape, dtype=dtype), grad,
            _temperature_grads_output(logits, num_rows, need_temperature_grad))


def _class_dim(inputs, position: int) -> int:
    """An op's ``class_dim`` input (-1 for the ops without one, and where a caller left it out)."""
    return inputs[position] if len(inputs) > position else -1


def _loss_setup_context(class_dim_position: int | None, need_temperature_grad_position: int):
    """The loss ops' setup_context, given the positions of their ``class_dim`` (None: the op has
    none) and ``need_temperature_grad`` inputs (either may be left out by a caller: the defaults)."""

    def setup_context(ctx, inputs, output):
        ctx.need_grad = inputs[10]
        ctx.class_dim = -1 if class_dim_position is None else _class_dim(inputs, class_dim_position)
        asked = len(inputs) > need_temperature_grad_position and inputs[need_temperature_grad_position]
        ctx.need_temperature_grad = bool(asked)
        ctx.logits_dtype = inputs[0].dtype
        ctx.temperatures = [_TemperatureInput.of(t) for t in inputs[3:5]]
        # the gradient outputs are never differentiated: no N x C zeros for their (absent) upstream gradient
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], output[2])

    return setup_context


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


def _scale_saved_grad(ctx, grad_loss, _unused_grad, _unused_temperature_grads):
    """dL/dlogits = the stored gradient x the upstream gradient (``rows.scale_stored_grad``), and the
    temperatures' gradients from the stored per-row values (``_temperature_grads``)."""
    _forbid_double_backward()
    grad, temperature_grads = ctx.saved_tensors
    grads = [None] * len(ctx.needs_input_grad)
    if ctx.needs_input_grad[0] and not ctx.need_grad:
        raise RuntimeError("bitempered: the loss was computed without gradient (need_grad=False)")
    if (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]) and not ctx.need_temperature_grad:
        raise RuntimeError("bitempered: the loss was computed without temperature gradients "
                           "(need_temperature_grad=False)")
    if grad_loss is None:  # no upstream gradient (grads are not materialized): none for the inputs
        return tuple(grads)
    if ctx.needs_input_grad[0]:
        # detached: the stored output is marked as requiring grad (the op's outputs are), its gradient is not
        grads[0] = scale_stored_grad(grad.detach(), grad_loss, ctx.logits_dtype, ctx.class_dim)
    if ctx.need_temperature_grad:
        grads[3], grads[4] = _temperature_grads(ctx, temperature_grads.detach(), grad_loss)
    return tuple(grads)


def _temperature_grads(ctx, per_row: Tensor, grad_loss: Tensor):
    """(dt1, dt2) of the loss ops' temperature inputs: each row's stored (scaled) values [R, 2] x the
    upstream gradient (0-d, or one per row for reduction="none"), summed over the rows for a 0-d
    temperature; None for one that needs none."""
    upstream = grad_loss.to(per_row.dtype)
    scaled = per_row * (upstream.unsqueeze(-1) if upstream.dim() else upstream)
    return tuple(t.gradient(scaled[:, column]) if ctx.needs_input_grad[3 + column] else None
                 for column, t in enumerate(ctx.temperatures))


def _native_probs(logits, t, num_iters):
    """Probabilities of rows [N, C] by the native solver; a per-row ``t`` [N] is solved in groups of
    rows with equal values (``temperature.temperature_groups``)."""
    a = logits.to(native.compute_dtype(logits.dtype))
    groups = temperature.temperature_groups(t)
    if len(groups) == 1:
        ((value,), _), = groups
        return native.tempered_log_softmax_rows(a, value, num_iters).exp().to(logits.dtype)
    probs = torch.empty_like(a)
    for (value,), rows in groups:
        probs[rows] = native.tempered_log_softmax_rows(a[rows], value, num_iters).exp()
    return probs.to(logits.dtype)


@torch.library.custom_op("bitempered::softmax", mutates_args=())
def softmax_op(logits: Tensor, t: Tensor, num_iters: int, backend: str, class_dim: int = -1) -> Tensor:
    """Tempered softmax of rows [N, C] (or over ``class_dim``) in the logits' dtype; ``t`` 0-d or one
    value per row [R] (row order)."""
    if backend == "triton":
        return triton_launchers().softmax_forward(logits, t, num_iters or None, class_dim=class_dim)
    if class_dim != -1:
        return from_class_rows(_native_probs(class_rows(logits, class_dim), t, num_iters or None), logits, class_dim)
    return _native_probs(logits, t, num_iters or None)


@softmax_op.register_fake
def _(logits, t, num_iters, backend, class_dim=-1):
    return torch.empty_like(logits)


def _native_temperature(t: Tensor, dtype):
    """A temperature as the native elementwise formulas take it: a float, or one value per row [N, 1]."""
    return t.to(dtype).reshape(-1, 1) if temperature.is_per_row(t) else float(t)


def _native_softmax_vjp(probs, grad, t):
    dtype = native.compute_dtype(probs.dtype)
    return native.tempered_softmax_vjp_rows(probs.to(dtype), grad.to(dtype), _native_temperature(t, dtype)).to(
        probs.dtype)


@torch.library.custom_op("bitempered::softmax_backward", mutates_args=())
def softmax_backward_op(probs: Tensor, grad: Tensor, t: Tensor, backend: str, class_dim: int = -1) -> Tensor:
    if backend == "triton":
        return triton_launchers().softmax_backward(probs, grad, t, class_dim=class_dim)
    if class_dim != -1:
        rows = _native_softmax_vjp(class_rows(probs, class_dim), class_rows(grad, class_dim), t)
        return from_class_rows(rows, probs, class_dim)
    return _native_softmax_vjp(probs, grad, t)


@softmax_backward_op.register_fake
def _(probs, grad, t, backend, class_dim=-1):
    return torch.empty_like(probs)


def _native_softmax_vjp_and_temperature_grad(probs, grad, t):
    """(the VJP, each row's gradient of t [N]) of rows [N, C], in the compute dtype (the VJP then in
    the probabilities' dtype)."""
    dtype = native.compute_dtype(probs.dtype)
    p, g, t_rows = probs.to(dtype), grad.to(dtype), _native_temperature(t, dtype)
    vjp = native.tempered_softmax_vjp_rows(p, g, t_rows).to(probs.dtype)
    return vjp, temperature.softmax_temperature_grad_rows(p, g, t_rows)


@torch.library.custom_op("bitempered::softmax_backward_with_temperature", mutates_args=())
def softmax_temperature_backward_op(probs: Tensor, grad: Tensor, t: Tensor, backend: str,
                                    class_dim: int = -1) -> tuple[Tensor, Tensor]:
    """``softmax_backward_op`` and each row's part of the gradient of ``t`` [R] (row order; compute
    dtype), in the same pass: sum g E - (sum g p^t)(sum E) / sum p^t (docs/math.md)."""
    num_rows = probs.numel() // probs.shape[class_dim]
    if backend == "triton":
        dt = probs.new_empty(num_rows, dtype=torch.float32)
        return triton_launchers().softmax_backward(probs, grad, t, class_dim=class_dim, temperature_grad=dt), dt
    if class_dim != -1:
        rows, dt = _native_softmax_vjp_and_temperature_grad(class_rows(probs, class_dim), class_rows(grad, class_dim),
                                                            t)
        return from_class_rows(rows, probs, class_dim), dt
    return _native_softmax_vjp_and_temperature_grad(probs, grad, t)


@softmax_temperature_backward_op.register_fake
def _(probs, grad, t, backend, class_dim=-1):
    num_rows = math.prod(without_axis(probs.shape, class_dim))
    return torch.empty_like(probs), probs.new_empty(num_rows, dtype=native.compute_dtype(probs.dtype))


def _save_probs(ctx, inputs, output):
    ctx.backend = inputs[3]
    ctx.class_dim = _class_dim(inputs, 4)
    ctx.save_for_backward(output, inputs[1])


def _direct(op, *args):
    return op(*args)


def _softmax_vjp(ctx, grad, invoke=_direct):
    """(``invoke`` calls the backward op: ``func`` passes its transform-ready call.) Rows get unit
    class stride; logits with another class axis go as they are (the backends take any strides).
    The gradient of ``t`` comes from the same pass, where ``t`` needs one."""
    probs, t = ctx.saved_tensors
    grad = grad.contiguous() if ctx.class_dim == -1 else grad
    if not ctx.needs_input_grad[1]:
        return invoke(softmax_backward_op, probs, grad, t, ctx.backend, ctx.class_dim), None, None, None, None
    grad_logits, dt = invoke(softmax_temperature_backward_op, probs, grad, t, ctx.backend, ctx.class_dim)
    return (grad_logits if ctx.needs_input_grad[0] else None), _TemperatureInput.of(t).gradient(dt), None, None, None


def _save_vjp_inputs(ctx, inputs, output):
    ctx.class_dim = _class_dim(inputs, 4)
    ctx.save_for_backward(*inputs[:3])


def _softmax_vjp_vjp(ctx, upstream):
    probs, grad, t = ctx.saved_tensors
    moved = (x.movedim(ctx.class_dim, -1) for x in (probs, grad, upstream))  # (views; -1: the rows as they are)
    d_probs, d_grad = second_order.softmax_vjp_vjp_rows(*moved, t)
    return d_probs.movedim(-1, ctx.class_dim), d_grad.movedim(-1, ctx.class_dim), None, None, None


def _save_vjp_inputs_with_temperature(ctx, inputs, output):
    _save_vjp_inputs(ctx, inputs, output)
    ctx.set_materialize_grads(False)  # an output that is not differentiated gets no upstream (None)


def _softmax_temperature_vjp_vjp(ctx, upstream, upstream_dt):
    """The derivatives of both outputs: the VJP's (``second_order``, the temperature's part
    included) and those of the temperature gradient (``second_order``, by autograd)."""
    probs, grad, t = ctx.saved_tensors
    moved = [x.movedim(ctx.class_dim, -1) for x in (probs, grad)]  # (views; -1: the rows as they are)
    d_probs = d_grad = d_t = None
    if upstream is not None:
        u = upstream.movedim(ctx.class_dim, -1)
        d_probs, d_grad = second_order.softmax_vjp_vjp_rows(*moved, u, t)
        if ctx.needs_input_grad[2]:
            d_t = _TemperatureInput.of(t).gradient(second_order.softmax_vjp_temperature_rows(*moved, u, t).reshape(-1))
    if upstream_dt is not None:
        dd_probs, dd_grad, dd_t = second_order.softmax_temperature_grad_vjp_rows(*moved, upstream_dt, t)
        d_probs = dd_probs if d_probs is None else d_probs + dd_probs
        d_grad = dd_grad if d_grad is None else d_grad + dd_grad
        dd_t = dd_t.to(t.dtype)
        d_t = dd_t if d_t is None else d_t + dd_t
    moved_back = [None if d is None else d.movedim(-1, ctx.class_dim) for d in (d_probs, d_grad)]
    return moved_back[0], moved_back[1], d_t, None, None


def _second_class(rows: Tensor) -> Tensor:
    """Column 1 of [N, 2] rows as a new contiguous tensor (no view: offset 0, as the fake says)."""
    return rows[:, 1].clone(memory_format=torch.contiguous_format)


def _binary_rows(x: Tensor) -> Tensor:
    """Logits [0, x] of the 2-class problem behind the binary functions."""
    return torch.stack([torch.zeros_like(x), x], dim=-1)


@torch.library.custom_op("bitempered::binary_loss", mutates_args=())
def binary_loss_op(logits: Tensor, labels: Tensor, weights: Tensor | None, t1: Tensor, t2: Tensor,
                   label_smoothing: Tensor, num_iters: int, ignore_index: float, reduction: str, backend: str,
                   need_grad: bool, need_temperature_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Binary loss of 1-D logits x and labels y: the 2-class loss of [0, x] and [1 - y, y]. Elements
    whose label equals ``ignore_index`` (NaN: none) get loss 0 and gradient 0 and are not counted;
    ``weights``: None or one weight per element; ``t1``, ``t2``: 0-d or one per element.
    ``need_temperature_grad``: the third output, as ``loss_op``'s (from the 2-class rows' solve; on
    the Triton backend the whole loss then runs the row kernel on the [N, 2] rows, as it does for
    per-element temperatures, which the binary kernel does not take)."""
    check_temperature_grad_iterations(num_iters, need_temperature_grad)
    dtype = torch.float32 if backend == "triton" else native.compute_dtype(logits.dtype)
    ignoring = not math.isnan(ignore_index)
    kept = labels != ignore_index if ignoring else torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    scale = grad_scale(kept, reduction, dtype, weights)
    if ignoring:  # an ignored element's label is never read, and its gradient is exactly 0
        labels = torch.where(kept, labels, 0.0)
        scale = torch.where(kept, scale, 0.0)
    iters = num_iters or None
    dt = _temperature_grads_output(logits, logits.shape[0], need_temperature_grad)
    if backend == "triton" and not need_temperature_grad and not _per_element(t1, t2):
        per_row, grad = triton_launchers().binary_loss_forward(logits, labels, t1, t2, label_smoothing, iters,
                                                               need_grad, grad_scale=scale)
    else:
        per_row, grad = _binary_rows_loss(logits, labels, t1, t2, label_smoothing, iters, need_grad, scale, backend,
                                          dt if need_temperature_grad else None)
    if ignoring:  # exactly 0, also where an ignored element's logit is not finite
        per_row = torch.where(kept, per_row, 0.0)
        for per_element in (grad, dt if need_temperature_grad else None):
            if per_element is not None:
                per_element.masked_fill_((~kept).reshape(-1, *([1] * (per_element.dim() - 1))), 0.0)
    return reduce(per_row, kept, reduction, weights), grad if grad is not None else _no_grad(logits), dt


def _binary_rows_loss(logits, labels, t1, t2, label_smoothing, num_iters, need_grad, scale, backend,
                      temperature_grads):
    """(per-element loss, scaled dL/dx or None) of the binary loss as the 2-class loss of rows [0, x]
    and [1 - y, y]; ``temperature_grads``: None or the [N, 2] output of the scaled (dL/dt1, dL/dt2)."""
    rows, dense = _binary_rows(logits), torch.stack([1.0 - labels, labels], dim=-1)
    if backend == "triton":
        per_row, grad = triton_launchers().loss_forward(rows, dense.to(torch.float32), t1, t2, label_smoothing,
                                                        num_iters, -100, need_grad, grad_scale=scale,
                                                        temperature_grads=temperature_grads)
        if temperature_grads is not None:
            temperature_grads.mul_(scale.unsqueeze(-1) if scale.dim() else scale)
    else:
        per_row, _, grad = native_loss.grouped_loss_and_grad(rows, dense, t1, t2, float(label_smoothing), num_iters,
                                                             -100, need_grad, scale,
                                                             temperature_grads=temperature_grads)
    return per_row, _second_class(grad) if need_grad else None


@binary_loss_op.register_fake
def _(logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction, backend, need_grad,
      need_temperature_grad=False):
    return _fake_loss_outputs(logits, reduction, need_grad, logits.shape[0], need_temperature_grad)


def _per_element(*temperatures: Tensor) -> bool:
    """A temperature per element of the binary functions: the binary kernels take one per call, so
    the Triton backend runs the row kernels on the 2-class rows [0, x] instead."""
    return any(temperature.is_per_row(t) for t in temperatures)


@torch.library.custom_op("bitempered::sigmoid", mutates_args=())
def sigmoid_op(logits: Tensor, t: Tensor, num_iters: int, backend: str) -> Tensor:
    """Tempered sigmoid of 1-D logits: tempered_softmax([0, x])[1]; ``t`` 0-d or one per element."""
    if backend == "triton" and not _per_element(t):
        return triton_launchers().sigmoid_forward(logits, t, num_iters or None)
    if backend == "triton":
        return _second_class(triton_launchers().softmax_forward(_binary_rows(logits), t, num_iters or None))
    return _second_class(_native_probs(_binary_rows(logits), t, num_iters or None))


@sigmoid_op.register_fake
def _(logits, t, num_iters, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("bitempered::sigmoid_backward", mutates_args=())
def sigmoid_backward_op(probs: Tensor, grad: Tensor, t: Tensor, backend: str) -> Tensor:
    if backend == "triton" and not _per_element(t):
        return triton_launchers().sigmoid_backward(probs, grad, t)
    rows = torch.stack([1.0 - probs, probs], dim=-1)
    grad_rows = torch.stack([torch.zeros_like(grad), grad], dim=-1)
    return _second_class(softmax_backward_op(rows, grad_rows, t, backend))


@sigmoid_backward_op.register_fake
def _(probs, grad, t, backend):
    return torch.empty_like(probs)


def _sigmoid_vjp(ctx, grad, invoke=_direct):
    """The gradient of the logits, and where ``t`` needs one its gradient: the 2-class softmax's
    (rows [1 - p, p], upstream [0, g]; native torch ops on any backend)."""
    probs, t = ctx.saved_tensors
    if not ctx.needs_input_grad[1]:
        return invoke(sigmoid_backward_op, probs, grad.contiguous(), t, ctx.backend), None, None, None
    rows = torch.stack([1.0 - probs, probs], dim=-1)
    grad_rows = torch.stack([torch.zeros_like(grad), grad], dim=-1)
    grad_logits, dt = invoke(softmax_temperature_backward_op, rows, grad_rows, t, "torch", -1)
    return (_second_class(grad_logits) if ctx.needs_input_grad[0] else None), _TemperatureInput.of(t).gradient(dt), \
        None, None


def _sigmoid_vjp_vjp(ctx, upstream):
    probs, grad, t = ctx.saved_tensors
    return second_order.sigmoid_vjp_vjp(probs, grad, upstream, t) + (None, None)


class InplaceBackwardLoss(torch.autograd.Function):
    """The loss with its gradient written into the logits' own buffer (opt-in ``inplace_backward``).

    No N x C allocation with the kernels (the native backend computes the gradient elsewhere and
    copies it in). The logits' values are destroyed: use it only when nothing else needs them.
    Eager only (the public API uses the custom op instead while torch.compile traces).

    float16 logits: the buffer holds the gradient WITHOUT the reduction's factor (float16 cannot
    hold g/N, see ``rows.stored_grad_dtype``); the backward applies factor x upstream in float32.
    """

    @staticmethod
    def forward(ctx, logits, rows, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction,
                backend, class_dim=-1):
        # ``rows``: what the op takes (``args.as_rows``): a view of the logits' buffer where possible
        buffer = rows.detach()
        deferred = stored_grad_dtype(buffer.dtype) != buffer.dtype
        need_temperature_grad = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        check_temperature_grad_iterations(num_iters, need_temperature_grad)
        # deferred: the unweighted gradient of each row ("none", unit factors), scaled in the backward
        settings = (t1, t2, label_smoothing, num_iters or None, ignore_index, "none" if deferred else reduction, True)
        if backend == "triton":
            loss, grad, dt = _triton_loss(buffer, labels, None if deferred else weights, *settings, grad_out=buffer,
                                          class_dim=class_dim, need_temperature_grad=need_temperature_grad)
        else:
            loss, grad, dt = _native_loss(buffer, labels, None if deferred else weights, *settings, class_dim,
                                          need_temperature_grad)
            buffer.copy_(grad)
        ctx.factor = None
        if deferred:
            kept = kept_rows(labels, ignore_index, class_dim).reshape(-1)
            ctx.factor = grad_scale(kept, reduction, torch.float32, weights)
            loss = reduce(loss, kept, reduction, weights)
        ctx.save_for_backward(buffer, dt)
        ctx.logits_shape, ctx.class_dim = logits.shape, class_dim
        ctx.temperatures = [_TemperatureInput.of(t) for t in (t1, t2)]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, dt = ctx.saved_tensors
        upstream = grad_loss if ctx.factor is None else grad_loss.float() * ctx.factor
        if ctx.factor is None:
            grad = scale_stored_grad(grad, grad_loss, grad.dtype, ctx.class_dim)
        else:
            grad = scale_half_stored_grad(grad, upstream, ctx.class_dim)
        grads = [grad.view(ctx.logits_shape)] + [None] * 11
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            scaled = dt * upstream.to(dt.dtype).reshape(-1, 1)
            for column, t in enumerate(ctx.temperatures):
                if ctx.needs_input_grad[4 + column]:
                    grads[4 + column] = t.gradient(scaled[:, column])
        return tuple(grads)


def autograd_rules(invoke=_direct) -> dict:
    """Each op's autograd, (setup_context, backward), as registered below. ``invoke`` calls the
    ops a backward runs (the softmax and sigmoid VJPs): ``func`` passes its transform-ready call to
    rebuild the same rules for torch.func."""
    return {
        loss_op: (_loss_setup_context(11, 12), _scale_saved_grad),
        binary_loss_op: (_loss_setup_context(None, 11), _scale_saved_grad),
        softmax_op: (_save_probs, lambda ctx, grad: _softmax_vjp(ctx, grad, invoke)),
        sigmoid_op: (_save_probs, lambda ctx, grad: _sigmoid_vjp(ctx, grad, invoke)),
        softmax_backward_op: (_save_vjp_inputs, _softmax_vjp_vjp),
        softmax_temperature_backward_op: (_save_vjp_inputs_with_temperature, _softmax_temperature_vjp_vjp),
        sigmoid_backward_op: (_save_vjp_inputs, _sigmoid_vjp_vjp),
    }


for _op, (_setup, _backward) in autograd_rules().items():
    _op.register_autograd(_backward, setup_context=_setup)

# as F.cross_entropy under torch.autocast: the losses of 16-bit logits computed from float32 ones
# (torch >= 2.5 has register_autocast; the public functions upcast on any torch themselves)
for _op in (loss_op, binary_loss_op) if hasattr(torch.library, "register_autocast") else ():
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(_op, _device, torch.float32)
