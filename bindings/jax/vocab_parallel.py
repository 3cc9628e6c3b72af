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
the converged solver; ``num_iters=k`` and a global C of 1 take the XLA path on every backend.
``vocab_parallel_tempered_softmax`` is XLA only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bitempered.bindings.common import validation as check
from bitempered.bindings.jax import args, ops
from bitempered.bindings.jax.native import math as native
from bitempered.bindings.jax.native.math import AxisRows

__all__ = ["vocab_parallel_bi_tempered_logistic_loss", "vocab_parallel_tempered_softmax"]


def _varying_axes(value) -> set:
    """The mesh axes ``value`` varies over, as ``shard_map``'s check_vma tracks them (none when it
    is off). (jax 0.10: aval.manual_axis_type.varying)"""
    return set(getattr(getattr(jax.typeof(value), "manual_axis_type", None), "varying", ()))


def _vary_like(x, like):
    """``x`` varying over the mesh axes ``like`` varies over: a kernel call's output (jax-triton's
    call, or the interpreter's callback) carries none under ``shard_map``'s check_vma, and a psum
    of a value that does not vary would count it once per device."""
    missing = tuple(sorted(_varying_axes(like) - _varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def _kernel_loss_rows(logits, labels, t1, t2, label_smoothing, ignore_index, axis_name, need_grad):
    """The loss on the vocab-parallel Triton kernels: rows [..., C_local] of the slice; the loss in
    the temperatures' dtype, the unit gradient fp32 (one rounding in the backward)."""
    from bitempered.bindings.jax import launchers

    rows = AxisRows(axis_name)
    num_local = logits.shape[-1]
    offset, num_classes = rows.class_slice(num_local)
    a = logits.reshape(-1, num_local)
    row_max = rows.max(jnp.max(a, axis=-1, keepdims=True).astype(jnp.float32)).reshape(-1)
    t = t2.astype(jnp.float32)

    def evaluate(y):  # one solver pass: one kernel call, then the packed psum in the solver
        sums = _vary_like(launchers.vocab_parallel_sums(a, row_max, y.reshape(-1), t, False), a)
        return sums[:, :1], sums[:, 1:2]

    def count_support():  # t < 1 only: the kernel counts the classes that can have p > 0
        return _vary_like(launchers.vocab_parallel_sums(a, row_max, jnp.zeros_like(row_max), t, True), a)[:, 2:]

    classes_here = _vary_like(jnp.full_like(row_max[:, None], num_local), a)
    y, _ = native.solve_normalizers(evaluate, lax.cond(t < 1, count_support, lambda: classes_here), t, rows)
    y = y.reshape(-1)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        indices = args.widen_indices(labels.reshape(-1))
        kept, invalid = native.kept_and_invalid(indices, ignore_index, num_classes)
        # the target's index in this slice; -1 (no class here) for ignored and invalid rows
        local = jnp.where(kept & ~invalid, indices - offset.astype(indices.dtype), -1).astype(jnp.int32)
    else:
        local = labels.reshape(-1, num_local)
        kept = invalid = None
    loss, sum_e, sum_d = rows.sum(*jnp.split(_vary_like(launchers.vocab_parallel_epilogue(
        a, local, row_max, y, t1, t2, label_smoothing, num_classes), a), 3, axis=-1))
    loss = loss[:, 0]
    if kept is not None:
        loss = jnp.where(kept, jnp.where(invalid, jnp.nan, loss), 0.0)
    loss = loss.astype(t1.dtype).reshape(logits.shape[:-1])
    if not need_grad:
        return loss, None
    row_scale = jnp.ones_like(row_max) if kept is None else jnp.where(kept, jnp.where(invalid, jnp.nan, 1.0), 0.0)
    grad = launchers.vocab_parallel_gradient(a, local, row_max, y, jnp.concatenate([loss.reshape(-1, 1).astype(
        jnp.float32), sum_e, sum_d], axis=-1), row_scale.astype(jnp.float32), t1, t2, label_smoothing, num_classes)
    return loss, _vary_like(grad, a).reshape(logits.shape)


@functools.lru_cache(maxsize=None)
def _kernel_loss_fn(ignore_index, axis_name, need_grad):
    """The kernel path with vmap folded into the rows (jax-triton's call has no batching rule)."""
    def fn(logits, labels, t1, t2, label_smoothing):
        loss, grad = _kernel_loss_rows(logits, labels, t1, t2, label_smoothing, ignore_index, axis_name, need_grad)
        return (loss, grad) if need_grad else loss

    folded = ops.fold_batch(fn, 2)

    def call(logits, labels, t1, t2, label_smoothing):
        out = folded(logits, labels, t1, t2, label_smoothing)
        return (out[0], _vary_like(out[1], logits)) if need_grad else out

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
        tracked = name in _varying_axes(lax.axis_index(name))
        if size > 1 and tracked and name not in _varying_axes(logits):
            raise ValueError(
                f"local_logits are replicated over axis_name {name!r} (the same on its {size} devices), but "
                "each device must hold its own slice of the classes: shard the class axis over it "
                f"(shard_map in_specs=P(..., {name!r})), or call bi_tempered_logistic_loss on the whole logits")


def vocab_parallel_tempered_softmax(local_logits, t, axis_name, num_iters=None):
    """Tempered softmax of rows whose classes are sharded over ``axis_name`` (inside shard_map).

    Returns this device's slice of ``tempered_softmax(concatenated logits, t)``, in the logits'
    dtype. Collectives: pmax, then psum of the support size and one psum per solver pass.
    """
    logits = args.as_logits(local_logits)
    iters = args.as_num_iters(num_iters)
    t_, _ = args.scalar(t, "t", native.compute_dtype(logits.dtype), lambda value: check.check_t(value, "t"))
    _check_axis(axis_name, logits)
    if logits.size == 0:
        return jnp.zeros(logits.shape, logits.dtype)
    return ops.tempered_softmax(logits, t_, iters, "xla", axis_name)


def vocab_parallel_bi_tempered_logistic_loss(local_logits, labels, t1, t2, axis_name, label_smoothing=0.0,
                                             num_iters=None, ignore_index=-100, backend="auto", reduction="none", *,
                                             weight=None, sample_weight=None):
    """Bi-tempered loss of rows whose classes are sharded over ``axis_name`` (call inside shard_map).

    Args:
        local_logits: [..., C_local], this device's contiguous slice of the classes (device i of
            the axis holds classes [i C_local, (i + 1) C_local)).
        labels: integer GLOBAL class indices of shape ``local_logits.shape[:-1]`` (an index outside
            [0, C) other than ``ignore_index`` gives a NaN row), or dense labels sliced like the
            logits.
        axis_name: the mesh axis (or tuple of axes) that shards the classes.
        t1, t2, label_smoothing, num_iters, ignore_index: as in ``bi_tempered_logistic_loss``;
            smoothing uses the GLOBAL class count; ``ignore_index`` may be None (no row ignored).
        backend: "auto" (the vocab-parallel Triton kernels on a GPU with jax-triton, XLA otherwise),
            "xla" or "triton" (see the module docstring; ``num_iters=k`` runs on XLA).
        reduction: "none" (default: the per-row losses), "sum" or "mean" over THIS device's rows
            (the rows of ``local_logits``; rows sharded over another mesh axis are reduced per
            shard), as in ``bi_tempered_logistic_loss``.
        weight: None or the GLOBAL per-class weights (keyword only), a 1-D real array of the
            C = C_local x axis size weights, the same full vector on every device (shard_map
            ``in_specs=P()``); class-index labels only. Each row is weighted by ``weight[target]``
            (a gather by the global index: no collective) as in ``bi_tempered_logistic_loss``.
        sample_weight: None or one weight per row, shape ``local_logits.shape[:-1]`` (the rows'
            weights, sharded like the labels), as in ``bi_tempered_logistic_loss``.

    Returns the per-row losses, or their reduction (the same on every device of the axis); the
    custom gradient flows to this device's slice.
    """
    logits = args.as_logits(local_logits)
    labels = args.as_labels(labels)
    indices = args.labels_are_indices(labels, logits.shape)
    iters = args.as_num_iters(num_iters)
    ignore_index = args.as_ignore_index(ignore_index)
    check.check_reduction(reduction)
    dtype = native.compute_dtype(logits.dtype)
    t1_, t2_, s_, _ = args.temperatures(t1, t2, label_smoothing, dtype)
    _check_axis(axis_name, logits)
    num_classes = AxisRows(axis_name).class_slice(logits.shape[-1])[1]
    weight = args.as_class_weight(weight, indices, num_classes)
    sample_weight = args.as_sample_weight(sample_weight, logits.shape[:-1])
    backend = args.resolve_backend(backend, logits.dtype)
    if iters is not None or num_classes < 2:
        backend = "xla"  # the kernels run the converged solver; C = 1 takes XLA's NaN-smoothing rule
    labels = jnp.asarray(labels)
    if logits.size == 0:
        loss = jnp.zeros(logits.shape[:-1], dtype)
    elif backend == "triton":
        kernel = functools.partial(_kernel_loss_fn, ignore_index, axis_name)
        loss = ops.stored_gradient_loss(kernel, logits, labels, t1_, t2_, s_)
    else:
        loss = ops.xla_loss(logits, labels, t1_, t2_, s_, iters, ignore_index, axis_name)
    return ops.weighted_reduce(loss, labels, weight, sample_weight, ignore_index, reduction)
