"""JAX vocab-parallel loss: the classes sharded over a mesh axis, for use inside ``jax.shard_map``.

Each device holds ``local_logits`` [..., C_local], its slice of the classes in the order of its
index along ``axis_name`` (``shard_map`` slices evenly, so C = C_local * axis size). The result
equals :func:`bitempered.jax.bi_tempered_logistic_loss` on the concatenated logits, on every
device; the gradient of each slice is local. An ``axis_name`` that no enclosing ``shard_map`` binds,
or logits replicated over it (seen where check_vma tracks the varying axes, the default), raise a
ValueError naming ``axis_name``.

It is THE XLA loss of ``native/loss.py`` (the plain loss's forward, residual and backward, through
``ops.xla_loss``) with its row statistics reduced over ``axis_name`` (``native.math.AxisRows``):
``pmax`` of the row max, ``psum`` of the target logit (class indices), of the support size and
one packed ``psum`` of (f, g) per solver pass, and packed ``psum``s of the loss's row sums. Every
branch of that loss (the cross-entropy fast paths, their exact fallback, the row blocks) is
decided from reduced row values, so the devices of the axis take the same branches and blocks in
lockstep. That is a few collectives of O(rows) floats each (plus one per solver pass), never
N x C; the backward needs none. Under plain ``jax.jit`` with the logits sharded on the class axis by a
``NamedSharding``, the ordinary ``bi_tempered_logistic_loss`` already partitions this way (XLA
turns its row reductions into all-reduces; ``tests/test_vocab_parallel_jax.py`` checks the HLO).

Backends: ``"xla"`` (that XLA loss), ``"triton"`` (the vocab-parallel kernels of
``kernels/vocab_parallel.py`` through jax-triton, CUDA GPUs: one partial-sums call per solver pass,
then the epilogue sums and the gradient, driven by the same ``native.math.solve_normalizers`` with
the same collectives; the support size costs one more pass over the slice when t < 1) and
``"auto"`` (Triton on a GPU with jax-triton, as ``bi_tempered_logistic_loss``). The kernels run
the converged solver with one temperature for every row; ``num_iters=k``, per-row temperatures
and a global C of 1 take the XLA path on every backend. ``vocab_parallel_tempered_softmax`` is
XLA only.

Learnable temperatures: t1, t2 (and the softmax's t) differentiate as in the plain loss, each
row's derivatives from the same solve, computed only when a temperature is differentiated. On XLA
the temperature terms' row sums are reduced like the loss's; on the kernels the epilogue's
temperature variant adds its three row sums (dL/dt1, sum A, sum E) to the epilogue's one packed
psum: no other collective.

The class axis ``axis`` (keyword, default -1, as ``bi_tempered_logistic_loss``): the XLA loss and
softmax move it last (``ops.classes_last``: XLA fuses the transpose, and JAX transposes the
gradient back to the slice's layout); the Triton kernels read the slice in place with its class
axis, as the plain loss's.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from bitempered.bindings.common import validation as check
from bitempered.bindings.jax import args, ops
from bitempered.bindings.jax.native import math as native
from bitempered.bindings.jax.native.math import AxisRows

__all__ = ["vocab_parallel_bi_tempered_logistic_loss", "vocab_parallel_tempered_softmax"]

_ROWS_NAME = "local_logits' shape without the class axis"


def _vary_like(x, like):
    """``x`` varying over the mesh axes ``like`` varies over: a kernel call's output (jax-triton's
    call, or the interpreter's callback) carries none under ``shard_map``'s check_vma, and a psum
    of a value that does not vary would count it once per device."""
    missing = tuple(sorted(ops.varying_axes(like) - ops.varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def _kernel_loss_rows(logits, labels, t1, t2, label_smoothing, ignore_index, axis_name, axis, need_grad,
                      need_temperature_grads=False):
    """The loss on the vocab-parallel Triton kernels: the slice with its C_local classes on ``axis``
    (negative), read in place; per-row values [R] in row order. The loss in the temperatures'
    dtype, the unit gradient fp32 (one rounding in the backward). Returns (loss, unit gradient or
    None, each row's (dL/dt1, dL/dt2) [rows..., 2] or None): with ``need_temperature_grads`` the
    epilogue's temperature variant adds three row sums to the one packed psum (no other
    collective)."""
    from bitempered.bindings.jax import launchers

    rows = AxisRows(axis_name)
    num_local = logits.shape[axis]
    offset, num_classes = rows.class_slice(num_local)
    t = t2.astype(jnp.float32)

    def max_and_sum_exp():  # t = 1: one read, the slice's max and sum exp(a - max)
        local = _vary_like(launchers.vocab_parallel_max_sumexp(logits, axis=axis), logits)
        return local[:, :1], local[:, 1:]

    def max_only():  # no exponential per logit
        local_max = jnp.max(logits, axis=axis).reshape(-1, 1).astype(jnp.float32)
        return local_max, jnp.zeros_like(local_max)

    local_max, local_sum = lax.cond(t == 1, max_and_sum_exp, max_only)
    row_max = rows.max(local_max)  # [R, 1], row order
    # at t = 1, f(y) = e^-y f(0) exactly: the solver's passes need no read of the slice; exp(m - M)
    # is 0 for a slice without the top logits, 1 (not exp(nan)) where the maxima are equal
    sum_at_zero = local_sum * jnp.where(local_max == row_max, 1.0, jnp.exp(local_max - row_max))
    row_max = row_max.reshape(-1)

    def evaluate(y):  # one solver pass: one kernel call (t != 1), then the packed psum in the solver
        def streamed():
            sums = _vary_like(launchers.vocab_parallel_sums(logits, row_max, y.reshape(-1), t, False, axis=axis),
                              logits)
            return sums[:, :1], sums[:, 1:2]

        def closed_form():
            f = sum_at_zero * jnp.exp(-y)
            return f, f

        return lax.cond(t == 1, closed_form, streamed)

    def count_support():  # t < 1 only: the kernel counts the classes that can have p > 0
        sums = launchers.vocab_parallel_sums(logits, row_max, jnp.zeros_like(row_max), t, True, axis=axis)
        return _vary_like(sums, logits)[:, 2:]

    classes_here = _vary_like(jnp.full_like(row_max[:, None], num_local), logits)
    y, _ = native.solve_normalizers(evaluate, lax.cond(t < 1, count_support, lambda: classes_here), t, rows)
    y = y.reshape(-1)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        indices = args.widen_indices(labels.reshape(-1))
        kept, invalid = native.kept_and_invalid(indices, ignore_index, num_classes)
        # the target's index in this slice; -1 (no class here) for ignored and invalid rows
        local = jnp.where(kept & ~invalid, indices - offset.astype(indices.dtype), -1).astype(jnp.int32)
    else:
        local = labels  # the dense slice, of the logits' shape
        kept = invalid = None
    columns = 6 if need_temperature_grads else 3
    loss, sum_e, sum_d, *temperature_sums = rows.sum(*jnp.split(_vary_like(launchers.vocab_parallel_epilogue(
        logits, local, row_max, y, t1, t2, label_smoothing, num_classes, axis=axis,
        need_temperature_grads=need_temperature_grads), logits), columns, axis=-1))
    loss = _mask_rows(loss[:, 0], kept, invalid).astype(t1.dtype)
    rows_shape = check.without_axis(logits.shape, axis)
    row_grads = None
    if need_temperature_grads:
        row_grads = _temperature_grads(sum_e, sum_d, *temperature_sums, kept, invalid).astype(t1.dtype)
        row_grads = row_grads.reshape(rows_shape + (2,))
    if not need_grad:
        return loss.reshape(rows_shape), None, row_grads
    row_scale = jnp.ones_like(row_max) if kept is None else jnp.where(kept, jnp.where(invalid, jnp.nan, 1.0), 0.0)
    grad = launchers.vocab_parallel_gradient(
        logits, local, row_max, y, jnp.concatenate([loss.reshape(-1, 1).astype(jnp.float32), sum_e, sum_d], axis=-1),
        row_scale.astype(jnp.float32), t1, t2, label_smoothing, num_classes, axis=axis)
    return loss.reshape(rows_shape), _vary_like(grad, logits), row_grads


def _mask_rows(values, kept, invalid):
    """Per-row values [R] (or [R, k]) with the ignored rows 0 and the rows of an invalid class
    index NaN (``kept``/``invalid``: None for dense labels, every row kept)."""
    if kept is None:
        return values
    if values.ndim > kept.ndim:
        kept, invalid = kept[:, None], invalid[:, None]
    return jnp.where(kept, jnp.where(invalid, jnp.nan, values), 0.0)


def _temperature_grads(sum_e, sum_d, dt1, sum_a, sum_big_e, kept, invalid):
    """Each row's (dL/dt1, dL/dt2) [R, 2] for unit upstream gradient from the epilogue's REDUCED
    row sums ([R, 1] each): dL/dt2 = sum A - sum d sum E / sum e (``kernels/vocab_parallel.py``);
    0 on ignored rows, NaN on rows of an invalid class index."""
    return _mask_rows(jnp.concatenate([dt1, sum_a - sum_d * sum_big_e / sum_e], axis=-1), kept, invalid)


@functools.lru_cache(maxsize=None)
def _kernel_loss_fn(ignore_index, axis_name, axis, need_grad, need_temperature_grads=False):
    """The kernel path with vmap folded into the rows (jax-triton's call has no batching rule;
    the class axis is negative, so the batch folded in front does not move it): the loss, or
    (loss, [unit gradient if need_grad,] [each row's (dL/dt1, dL/dt2) if need_temperature_grads]),
    the ``kernel`` / ``temperature_kernel`` protocols of ``ops.stored_gradient_loss``."""
    def fn(logits, labels, t1, t2, label_smoothing):
        loss, grad, row_grads = _kernel_loss_rows(logits, labels, t1, t2, label_smoothing, ignore_index, axis_name,
                                                  axis, need_grad, need_temperature_grads)
        out = (loss,) + ((grad,) if need_grad else ()) + ((row_grads,) if need_temperature_grads else ())
        return out if len(out) > 1 else loss

    folded = ops.fold_batch(fn, 2)

    def call(logits, labels, t1, t2, label_smoothing):
        out = folded(logits, labels, t1, t2, label_smoothing)
        if not need_grad:
            return out
        return (out[0], _vary_like(out[1], logits), *out[2:])

    return call


def _check_axis(axis_name, logits) -> None:
    """``axis_name``: axes of the enclosing ``shard_map`` over which the logits vary.

    Replicated logits (the same on every device of an axis of size > 1) would be taken as each
    device's slice of the classes: the loss of a row of axis-size copies, with no error. Whether
    the logits vary is known only where check_vma tracks it (the default; it then tracks
    ``axis_index``): with check_vma=False this check is skipped.
    """
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"axis_name must be a mesh axis name (str) or a tuple of them, got {axis_name!r}")
    for name in names:
        try:
            size = lax.axis_size(name)
        except NameError:
            raise ValueError(f"axis_name {name!r} is not an axis of an enclosing jax.shard_map: call this "
                             "function inside shard_map over a mesh with that axis") from None
        tracked = name in ops.varying_axes(lax.axis_index(name))
        if size > 1 and tracked and name not in ops.varying_axes(logits):
            raise ValueError(
                f"local_logits are replicated over axis_name {name!r} (the same on its {size} devices), but "
                "each device must hold its own slice of the classes: shard the class axis over it "
                f"(shard_map in_specs=P(..., {name!r})), or call bi_tempered_logistic_loss on the whole logits")


def vocab_parallel_tempered_softmax(local_logits, t, axis_name, num_iters=None, *, axis=-1):
    """Tempered softmax of rows whose classes are sharded over ``axis_name`` (inside shard_map).

    Returns this device's slice of ``tempered_softmax(concatenated logits, t, axis=axis)``, in the
    logits' dtype; ``axis`` (keyword only, default -1): the class axis of ``local_logits``; ``t``:
    0-d or one per row (``local_logits``' shape without ``axis``), differentiable. Collectives:
    pmax, then psum of the support size and one psum per solver pass.
    """
    logits, axis = args.as_class_logits(local_logits, axis)
    iters = args.as_num_iters(num_iters)
    t_ = args.temperature(t, "t", native.compute_dtype(logits.dtype), lambda value: check.check_t(value, "t"),
                          check.without_axis(logits.shape, axis), _ROWS_NAME)
    _check_axis(axis_name, logits)
    if logits.size == 0:
        return jnp.zeros(logits.shape, logits.dtype)
    return ops.tempered_softmax(logits, t_, iters, "xla", axis_name, axis)


def vocab_parallel_bi_tempered_logistic_loss(local_logits, labels, t1, t2, axis_name, label_smoothing=0.0,
                                             num_iters=None, ignore_index=-100, backend="auto", reduction="none", *,
                                             weight=None, sample_weight=None, axis=-1):
    """Bi-tempered loss of rows whose classes are sharded over ``axis_name`` (call inside shard_map).

    Args:
        local_logits: C_local classes on ``axis``, this device's contiguous slice of the classes
            (device i of the axis holds classes [i C_local, (i + 1) C_local)).
        labels: integer GLOBAL class indices of the rows' shape (``local_logits``' shape without
            ``axis``; an index outside
            [0, C) other than ``ignore_index`` gives a NaN row), or dense labels sliced like the
            logits.
        axis_name: the mesh axis (or tuple of axes) that shards the classes.
        t1, t2, label_smoothing, num_iters, ignore_index: as in ``bi_tempered_logistic_loss``;
            smoothing uses the GLOBAL class count; ``ignore_index`` may be None (no row ignored).
            The temperatures are 0-d or one per row (the rows' shape, sharded like the labels;
            they run on XLA) and differentiable (``num_iters=None``).
        backend: "auto" (the vocab-parallel Triton kernels on a GPU with jax-triton, XLA otherwise),
            "xla" or "triton" (see the module docstring; ``num_iters=k`` runs on XLA).
        reduction: "none" (default: the per-row losses), "sum" or "mean" over THIS device's rows
            (the rows of ``local_logits``; rows sharded over another mesh axis are reduced per
            shard), as in ``bi_tempered_logistic_loss``.
        weight: None or the GLOBAL per-class weights (keyword only), a 1-D real array of the
            C = C_local x axis size weights, the same full vector on every device (shard_map
            ``in_specs=P()``); class-index labels only. Each row is weighted by ``weight[target]``
            (a gather by the global index: no collective) as in ``bi_tempered_logistic_loss``.
        sample_weight: None or one weight per row, of the rows' shape (the rows' weights,
            sharded like the labels), as in ``bi_tempered_logistic_loss``.
        axis: the class axis of ``local_logits`` (keyword only, default -1), as in
            ``bi_tempered_logistic_loss`` (see the module docstring).

    Returns the per-row losses, or their reduction (the same on every device of the axis); the
    custom gradient flows to this device's slice.
    """
    logits, axis = args.as_class_logits(local_logits, axis)
    labels = args.as_labels(labels)
    indices = args.labels_are_indices(labels, logits.shape, axis)
    iters = args.as_num_iters(num_iters)
    ignore_index = args.as_ignore_index(ignore_index)
    check.check_reduction(reduction)
    dtype = native.compute_dtype(logits.dtype)
    rows_shape = check.without_axis(logits.shape, axis)
    t1_, t2_, s_, _ = args.temperatures(t1, t2, label_smoothing, dtype, rows_shape, _ROWS_NAME)
    _check_axis(axis_name, logits)
    num_classes = AxisRows(axis_name).class_slice(logits.shape[axis])[1]
    weight = args.as_class_weight(weight, indices, num_classes)
    sample_weight = args.as_sample_weight(sample_weight, rows_shape)
    backend = args.resolve_backend(backend, logits.dtype)
    if iters is not None or num_classes < 2 or t1_.ndim or t2_.ndim:
        # the kernels run the converged solver with one temperature for every row; C = 1 takes
        # XLA's NaN-smoothing rule
        backend = "xla"
    labels = jnp.asarray(labels)
    if logits.size == 0:
        loss = jnp.zeros(rows_shape, dtype)
    elif backend == "triton":
        kernel = functools.partial(_kernel_loss_fn, ignore_index, axis_name, axis)
        temperature_kernel = functools.partial(_kernel_loss_fn, ignore_index, axis_name, axis,
                                               need_temperature_grads=True)
        loss = ops.stored_gradient_loss(kernel, logits, labels, t1_, t2_, s_, axis, temperature_kernel)
    else:
        loss = ops.xla_loss(*ops.classes_last(logits, labels, axis), t1_, t2_, s_, iters, ignore_index, axis_name)
    return ops.weighted_reduce(loss, labels, weight, sample_weight, ignore_index, reduction, axis)
