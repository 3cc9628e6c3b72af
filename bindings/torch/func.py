"""torch.func support for the custom ops: vmap rules and transform-ready autograd.

vmap: each op's rule folds the vmapped dimension into the rows (one call on [B * N, C] instead of
B calls), and reduces per sample afterwards. Logits whose classes are on another axis (``class_dim``,
a negative int) take the batch in front as one more row axis: the class axis, counted from the end,
stays where it is. Per-row temperatures fold with the rows (repeated for every sample where they
are not vmapped). Only a vmapped 0-d temperature or label smoothing, one scalar per call, falls
back to one call per sample.

grad/vjp/jacrev: the autograd that ``torch.library`` generates for a custom op does not work under
torch.func transforms (pytorch/pytorch#168393), so while a transform is active the public API calls
the op through :func:`call`: an autograd.Function with the same setup_context and backward
functions as the op's own registration, and a vmap rule generated from the op's vmap rule.
"""

from __future__ import annotations

import torch

from bitempered.bindings.torch import ops
from bitempered.bindings.torch.rows import kept_rows, mean_count, mean_factor

Tensor = torch.Tensor


def transforms_active() -> bool:
    """True inside torch.func.grad/vmap/vjp/jacrev (the ops then go through ``transformable``)."""
    return torch._C._are_functorch_transforms_active()


def requires_grad(tensor: Tensor) -> bool:
    """``tensor.requires_grad`` at any torch.func level (a vmapped tensor hides its grad wrapper)."""
    if torch.compiler.is_compiling():
        return tensor.requires_grad  # (dynamo cannot trace the unwrapping, and needs none)
    while True:
        if tensor.requires_grad:
            return True
        if not torch._C._functorch.is_functorch_wrapped_tensor(tensor):
            return False
        tensor = torch._C._functorch.get_unwrapped(tensor)


def _batch_first(x: Tensor, in_dim, batch_size: int) -> Tensor:
    """x with its vmapped dim moved first (a broadcast one where it has none)."""
    return x.movedim(in_dim, 0) if in_dim is not None else x.expand(batch_size, *x.shape)


def _fold(x: Tensor, in_dim, batch_size: int) -> Tensor:
    """x with its vmapped dim (or a broadcast one) moved first and merged into the next (rows) dim."""
    x = _batch_first(x, in_dim, batch_size)
    return x.reshape(batch_size * x.shape[1], *x.shape[2:])


def _fold_logits(x: Tensor, in_dim, batch_size: int, class_dim: int) -> Tensor:
    """The op's logits (or dense labels, probabilities) of every sample in one call: rows [N, C]
    (``class_dim`` -1) folded into [B * N, C]; classes on another axis: the batch in front."""
    return _fold(x, in_dim, batch_size) if class_dim == -1 else _batch_first(x, in_dim, batch_size)


def _per_sample(op, info, in_dims, args):
    """One op call per sample, for vmapped scalars; outputs stacked on dim 0 (an empty output, an
    output that was not asked for, stays one unbatched empty tensor)."""
    outputs = []
    for b in range(info.batch_size):
        sample = [a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)]
        outputs.append(op(*sample))
    if not isinstance(outputs[0], tuple):
        return torch.stack(outputs), 0
    stacked, out_dims = [], []
    for parts in zip(*outputs):
        empty = parts[0].numel() == 0 and parts[0].dim() == 1 and not any(p.numel() for p in parts)
        stacked.append(parts[0] if empty else torch.stack(parts))
        out_dims.append(None if empty else 0)
    return tuple(stacked), tuple(out_dims)


def _scalars_batched(in_dims, positions) -> bool:
    return any(in_dims[i] is not None for i in positions)


def _temperatures_batched(in_dims, args, positions) -> bool:
    """A vmapped 0-d temperature (one value per sample: the per-sample fallback); a per-row one,
    vmapped or not, folds with the rows (``_fold_temperature``)."""
    return any(in_dims[i] is not None and args[i].dim() == 1 for i in positions)


def _fold_temperature(t: Tensor, in_dim, batch_size: int) -> Tensor:
    """A temperature as the op takes it for the folded rows: 0-d as it is, one per row [R] (or [B, R]
    vmapped) -> [B * R] in the folded rows' order."""
    if in_dim is None:
        return t if t.dim() == 0 else t.repeat(batch_size)
    return t.movedim(in_dim, 0).reshape(-1)


def _reduce_per_sample(loss_rows: Tensor, grad: Tensor, kept: Tensor, weights: Tensor | None, reduction: str,
                       need_grad: bool, temperature_grads: Tensor | None = None):
    """Per-row losses [B, N], gradients [B, N, ...] and temperature gradients [B, N, 2] (or None) of
    reduction "none" (already times each row's weight) -> each sample's reduction (``weights`` [B, N]
    count for "mean")."""
    if reduction == "none":
        return loss_rows, grad, temperature_grads
    if reduction == "sum":
        return loss_rows.sum(dim=-1), grad, temperature_grads
    if need_grad or temperature_grads is not None:
        factor = mean_factor(kept, loss_rows.dtype, weights)
        if need_grad:
            grad = grad.mul_(factor.to(grad.dtype).reshape(-1, *([1] * (grad.dim() - 1))))
        if temperature_grads is not None:
            temperature_grads = temperature_grads.mul_(factor.to(temperature_grads.dtype).reshape(-1, 1, 1))
    return loss_rows.sum(dim=-1) / mean_count(kept, weights).to(loss_rows.dtype), grad, temperature_grads


def _fold_optional(x: Tensor | None, in_dim, batch_size: int) -> Tensor | None:
    return None if x is None else _fold(x, in_dim, batch_size)


def _batched_loss_outputs(loss_rows, grad, dt, kept, weights, reduction, need_grad, need_temperature_grad, batch,
                          rows):
    """The folded "none" outputs of a loss op -> each sample's outputs and their out_dims."""
    per_sample_weights = None if weights is None else weights.reshape(batch, rows)
    per_sample_dt = dt.reshape(batch, rows, 2) if need_temperature_grad else None
    loss, grad, per_sample_dt = _reduce_per_sample(loss_rows.reshape(batch, rows), grad, kept, per_sample_weights,
                                                   reduction, need_grad, per_sample_dt)
    return ((loss, grad, per_sample_dt if need_temperature_grad else dt),
            (0, 0 if need_grad else None, 0 if need_temperature_grad else None))


def _loss_vmap(info, in_dims, logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction,
               backend, need_grad, class_dim=-1, need_temperature_grad=False):
    args = (logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction, backend, need_grad,
            class_dim, need_temperature_grad)
    if _scalars_batched(in_dims, (5,)) or _temperatures_batched(in_dims, args, (3, 4)):
        return _per_sample(ops.loss_op, info, in_dims, args)
    batch = info.batch_size
    folded_logits = _fold_logits(logits, in_dims[0], batch, class_dim)
    dense = labels.dtype.is_floating_point  # (class indices: one per row, [R])
    folded_labels = _fold_logits(labels, in_dims[1], batch, class_dim) if dense else _fold(labels, in_dims[1], batch)
    folded_weights = _fold_optional(weights, in_dims[2], batch)
    folded_t1, folded_t2 = (_fold_temperature(t, d, batch) for t, d in ((t1, in_dims[3]), (t2, in_dims[4])))
    loss_rows, grad, dt = ops.loss_op(folded_logits, folded_labels, folded_weights, folded_t1, folded_t2,
                                      label_smoothing, num_iters, ignore_index, "none", backend, need_grad, class_dim,
                                      need_temperature_grad)
    rows = loss_rows.shape[0] // batch
    kept = kept_rows(folded_labels, ignore_index, class_dim).reshape(batch, rows)
    grad = grad.reshape(batch, rows, -1) if need_grad and class_dim == -1 else grad  # (else already batch first)
    return _batched_loss_outputs(loss_rows, grad, dt, kept, folded_weights, reduction, need_grad,
                                 need_temperature_grad, batch, rows)


def _binary_loss_vmap(info, in_dims, logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index,
                      reduction, backend, need_grad, need_temperature_grad=False):
    args = (logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction, backend, need_grad,
            need_temperature_grad)
    if _scalars_batched(in_dims, (5,)) or _temperatures_batched(in_dims, args, (3, 4)):
        return _per_sample(ops.binary_loss_op, info, in_dims, args)
    batch = info.batch_size
    folded_logits = _fold(logits, in_dims[0], batch)
    folded_labels = _fold(labels, in_dims[1], batch)
    folded_weights = _fold_optional(weights, in_dims[2], batch)
    folded_t1, folded_t2 = (_fold_temperature(t, d, batch) for t, d in ((t1, in_dims[3]), (t2, in_dims[4])))
    loss_rows, grad, dt = ops.binary_loss_op(folded_logits, folded_labels, folded_weights, folded_t1, folded_t2,
                                             label_smoothing, num_iters, ignore_index, "none", backend, need_grad,
                                             need_temperature_grad)
    rows = folded_logits.shape[0] // batch
    kept = (folded_labels != ignore_index).reshape(batch, rows)  # (a NaN ignore_index: every element)
    grad = grad.reshape(batch, rows) if need_grad else grad
    return _batched_loss_outputs(loss_rows, grad, dt, kept, folded_weights, reduction, need_grad,
                                 need_temperature_grad, batch, rows)


def _rowwise_vmap(op, tensor_args: int, scalar_position: int, class_position: int | None = None):
    """vmap rule of an op whose first ``tensor_args`` inputs are rows (or logits with the classes on
    its input ``class_position``, when it has one), whose input ``scalar_position`` is a temperature
    (0-d, or one per row), and whose outputs are of the rows' shape (per class), or one per row."""

    def rule(info, in_dims, *args):
        t, t_dim = args[scalar_position], in_dims[scalar_position]
        if t_dim is not None and t.dim() == 1:  # one temperature per sample: one call per sample
            return _per_sample(op, info, in_dims, args)
        batch = info.batch_size
        class_dim = -1 if class_position is None or len(args) <= class_position else args[class_position]
        folded = [_fold_logits(a, d, batch, class_dim) for a, d in zip(args[:tensor_args], in_dims)]
        rest = list(args[tensor_args:])
        rest[scalar_position - tensor_args] = _fold_temperature(t, t_dim, batch)
        out = op(*folded, *rest)
        if isinstance(out, tuple):  # (per class, one per row)
            return (_unfold(out[0], batch, class_dim), out[1].reshape(batch, -1)), (0, 0)
        return _unfold(out, batch, class_dim), 0

    return rule


def _unfold(out: Tensor, batch: int, class_dim: int) -> Tensor:
    """A folded per-class output with the batch first again (classes on another axis: already)."""
    return out.reshape(batch, -1, *out.shape[1:]) if class_dim == -1 else out


torch.library.register_vmap(ops.loss_op, _loss_vmap)
torch.library.register_vmap(ops.binary_loss_op, _binary_loss_vmap)
torch.library.register_vmap(ops.softmax_op, _rowwise_vmap(ops.softmax_op, 1, 1, class_position=4))
torch.library.register_vmap(ops.softmax_backward_op, _rowwise_vmap(ops.softmax_backward_op, 2, 2, class_position=4))
torch.library.register_vmap(ops.softmax_temperature_backward_op,
                            _rowwise_vmap(ops.softmax_temperature_backward_op, 2, 2, class_position=4))
torch.library.register_vmap(ops.sigmoid_op, _rowwise_vmap(ops.sigmoid_op, 1, 1))
torch.library.register_vmap(ops.sigmoid_backward_op, _rowwise_vmap(ops.sigmoid_backward_op, 2, 2))


def _no_forward_mode(*args):
    raise RuntimeError(ops.FORWARD_MODE)


def _transform_function(op, setup_context, backward):
    """An autograd.Function equal to ``op`` with its registered autograd, usable under torch.func."""

    def forward(*args):
        return op(*args)

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        if op in _LOSS_OPS:
            ctx.mark_non_differentiable(*output[1:])  # the loss ops' gradient outputs

    name = f"{op._namespace}_{op._name}_for_transforms"
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup),
        "backward": staticmethod(backward), "jvp": staticmethod(_no_forward_mode),
        "generate_vmap_rule": True,
    })


_LOSS_OPS = (ops.loss_op, ops.binary_loss_op)


def call(op, *args):
    """``op(*args)``, through its transform-ready autograd.Function while a torch.func transform runs."""
    if transforms_active():
        return _TRANSFORMABLE[op].apply(*args)
    return op(*args)


# each op's registered autograd, its backward calling ops through ``call``
_TRANSFORMABLE = {op: _transform_function(op, setup_context, backward)
                  for op, (setup_context, backward) in ops.autograd_rules(invoke=call).items()}
