"""torch.func support for the custom ops: vmap rules and transform-ready autograd.

vmap: each op's rule folds the vmapped dimension into the rows (one call on [B * N, C] instead of
B calls), and reduces per sample afterwards. Logits whose classes are on another axis (``class_dim``,
a negative int) take the batch in front as one more row axis: the class axis, counted from the end,
stays where it is. Only a vmapped temperature or label smoothing, which the kernels take as one
scalar per call, falls back to one call per sample.

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
    """One op call per sample, for vmapped scalars; outputs stacked on dim 0."""
    outputs = []
    for b in range(info.batch_size):
        sample = [a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)]
        outputs.append(op(*sample))
    if isinstance(outputs[0], tuple):
        loss = torch.stack([o[0] for o in outputs])
        grads = [o[1] for o in outputs]
        if grads[0].numel() == 0:  # need_grad=False: one unbatched empty tensor
            return (loss, grads[0]), (0, None)
        return (loss, torch.stack(grads)), (0, 0)
    return torch.stack(outputs), 0


def _scalars_batched(in_dims, positions) -> bool:
    return any(in_dims[i] is not None for i in positions)


def _reduce_per_sample(loss_rows: Tensor, grad: Tensor, kept: Tensor, weights: Tensor | None, reduction: str,
                       need_grad: bool):
    """Per-row losses [B, N] and gradients [B, N, ...] of reduction "none" (already times each
    row's weight) -> each sample's reduction (``weights`` [B, N] count for "mean")."""
    if reduction == "none":
        return loss_rows, grad
    if reduction == "sum":
        return loss_rows.sum(dim=-1), grad
    if need_grad:
        factor = mean_factor(kept, grad.dtype, weights)
        grad = grad.mul_(factor.reshape(-1, *([1] * (grad.dim() - 1))))
    return loss_rows.sum(dim=-1) / mean_count(kept, weights).to(loss_rows.dtype), grad


def _fold_optional(x: Tensor | None, in_dim, batch_size: int) -> Tensor | None:
    return None if x is None else _fold(x, in_dim, batch_size)


def _loss_vmap(info, in_dims, logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction,
               backend, need_grad, class_dim=-1):
    args = (logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction, backend, need_grad,
            class_dim)
    if _scalars_batched(in_dims, (3, 4, 5)):
        return _per_sample(ops.loss_op, info, in_dims, args)
    batch = info.batch_size
    folded_logits = _fold_logits(logits, in_dims[0], batch, class_dim)
    dense = labels.dtype.is_floating_point  # (class indices: one per row, [R])
    folded_labels = _fold_logits(labels, in_dims[1], batch, class_dim) if dense else _fold(labels, in_dims[1], batch)
    folded_weights = _fold_optional(weights, in_dims[2], batch)
    loss_rows, grad = ops.loss_op(folded_logits, folded_labels, folded_weights, t1, t2, label_smoothing, num_iters,
                                  ignore_index, "none", backend, need_grad, class_dim)
    rows = loss_rows.shape[0] // batch
    kept = kept_rows(folded_labels, ignore_index, class_dim).reshape(batch, rows)
    grad = grad.reshape(batch, rows, -1) if need_grad and class_dim == -1 else grad  # (else already batch first)
    per_sample_weights = None if weights is None else folded_weights.reshape(batch, rows)
    loss, grad = _reduce_per_sample(loss_rows.reshape(batch, rows), grad, kept, per_sample_weights, reduction,
                                    need_grad)
    return (loss, grad), (0, 0 if need_grad else None)


def _binary_loss_vmap(info, in_dims, logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index,
                      reduction, backend, need_grad):
    args = (logits, labels, weights, t1, t2, label_smoothing, num_iters, ignore_index, reduction, backend, need_grad)
    if _scalars_batched(in_dims, (3, 4, 5)):
        return _per_sample(ops.binary_loss_op, info, in_dims, args)
    batch = info.batch_size
    folded_logits = _fold(logits, in_dims[0], batch)
    folded_labels = _fold(labels, in_dims[1], batch)
    folded_weights = _fold_optional(weights, in_dims[2], batch)
    loss_rows, grad = ops.binary_loss_op(folded_logits, folded_labels, folded_weights, t1, t2, label_smoothing,
                                         num_iters, ignore_index, "none", backend, need_grad)
    rows = folded_logits.shape[0] // batch
    kept = (folded_labels != ignore_index).reshape(batch, rows)  # (a NaN ignore_index: every element)
    grad = grad.reshape(batch, rows) if need_grad else grad
    per_sample_weights = None if weights is None else folded_weights.reshape(batch, rows)
    loss, grad = _reduce_per_sample(loss_rows.reshape(batch, rows), grad, kept, per_sample_weights, reduction,
                                    need_grad)
    return (loss, grad), (0, 0 if need_grad else None)


def _rowwise_vmap(op, tensor_args: int, scalar_position: int, class_position: int | None = None):
    """vmap rule of an op whose first ``tensor_args`` inputs are rows (or logits with the classes on
    its input ``class_position``, when it has one) and whose output has their shape."""

    def rule(info, in_dims, *args):
        if in_dims[scalar_position] is not None:
            return _per_sample(op, info, in_dims, args)
        batch = info.batch_size
        class_dim = -1 if class_position is None or len(args) <= class_position else args[class_position]
        folded = [_fold_logits(a, d, batch, class_dim) for a, d in zip(args[:tensor_args], in_dims)]
        out = op(*folded, *args[tensor_args:])
        return (out.reshape(batch, -1, *out.shape[1:]) if class_dim == -1 else out), 0

    return rule


torch.library.register_vmap(ops.loss_op, _loss_vmap)
torch.library.register_vmap(ops.binary_loss_op, _binary_loss_vmap)
torch.library.register_vmap(ops.softmax_op, _rowwise_vmap(ops.softmax_op, 1, 1, class_position=4))
torch.library.register_vmap(ops.softmax_backward_op, _rowwise_vmap(ops.softmax_backward_op, 2, 2, class_position=4))
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
        if isinstance(output, tuple):
            ctx.mark_non_differentiable(output[1])  # the loss ops' gradient output

    name = f"{op._namespace}_{op._name}_for_transforms"
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup),
        "backward": staticmethod(backward), "jvp": staticmethod(_no_forward_mode),
        "generate_vmap_rule": True,
    })


def call(op, *args):
    """``op(*args)``, through its transform-ready autograd.Function while a torch.func transform runs."""
    if transforms_active():
        return _TRANSFORMABLE[op].apply(*args)
    return op(*args)


# each op's registered autograd, its backward calling ops through ``call``
_TRANSFORMABLE = {op: _transform_function(op, setup_context, backward)
                  for op, (setup_context, backward) in ops.autograd_rules(invoke=call).items()}
