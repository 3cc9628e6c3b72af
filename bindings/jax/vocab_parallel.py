"""JAX vocab-parallel loss: the classes sharded over a mesh axis, for use inside ``jax.shard_map``.

Each device holds ``local_logits`` [..., C_local], its slice of the classes in the order of its
index along ``axis_name`` (``shard_map`` slices evenly, so C = C_local * axis size). The result
equals :func:`bitempered.jax.bi_tempered_logistic_loss` on the concatenated logits, on every
device; the gradient of each slice is local.

It is the native solver of ``jax_native`` with its row statistics reduced over ``axis_name``
(``AxisRows``): ``pmax`` of the row max, ``psum`` of the support size, one packed ``psum`` of
(f, g) per solver pass and one packed ``psum`` of (loss, sum e, sum d) for the loss and the
gradient's row sums. That is passes + 3 collectives of O(rows) floats each, never N x C; the
backward needs none. Under plain ``jax.jit`` with the logits sharded on the class axis by a
``NamedSharding``, the ordinary ``bi_tempered_logistic_loss`` already partitions this way (XLA
turns its row reductions into all-reduces; ``tests/test_vocab_parallel_jax.py`` checks the HLO).

Backends: ``"xla"`` (the jnp native math), ``"triton"`` (the vocab-parallel kernels of
``kernels/vocab_parallel.py`` through jax-triton, CUDA GPUs: one partial-sums call per solver pass,
then the epilogue sums and the gradient, driven by the same ``jax_native.solve_normalizers`` with
the same collectives; the support size costs one more pass over the slice when t < 1) and
``"auto"`` (Triton on a GPU with jax-triton, as ``bi_tempered_logistic_loss``). The kernels run
the converged solver; ``num_iters=k`` and a global C of 1 take the XLA path on every backend.
``vocab_parallel_tempered_softmax`` is XLA only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bitempered.bindings.jax.native import math as native
from bitempered.bindings.common import validation as check
from bitempered.bindings.jax.api import (_as_labels, _as_logits, _fold_batch, _num_iters, _resolve_backend, _scalar, _temperatures,
                  _widen_indices)

__all__ = ["vocab_parallel_bi_tempered_logistic_loss", "vocab_parallel_tempered_softmax", "AxisRows"]


class AxisRows(native.LocalRows):
    """Row reductions over the mesh axis (or axes) ``axis_name`` that shard the classes."""

    def __init__(self, axis_name):
        self.axis_name = axis_name

    def max(self, x):
        # a NaN flag rides along: XLA's max reduction need not propagate a NaN, SPEC's NaN row must
        packed = lax.pmax(jnp.concatenate([x, jnp.isnan(x).astype(x.dtype)], axis=-1), self.axis_name)
        return jnp.where(packed[..., 1:] > 0, jnp.nan, packed[..., :1])

    def sum(self, *parts):
        # one collective for all the partial sums of a step: pack them on the last axis
        packed = lax.psum(jnp.concatenate(parts, axis=-1), self.axis_name)
        return tuple(packed[..., i:i + 1] for i in range(len(parts)))


def _class_offset(num_local: int, axis_name):
    """(first global class of this device, global class count)."""
    return lax.axis_index(axis_name) * num_local, num_local * lax.axis_size(axis_name)


def _local_labels(labels, num_local: int, dtype, ignore_index: int, axis_name):
    """This device's slice of the one-hot rows of global class indices, and the kept/invalid masks."""
    indices = _widen_indices(labels)
    offset, num_classes = _class_offset(num_local, axis_name)
    kept, invalid = native.kept_and_invalid(indices, ignore_index, num_classes)
    classes = offset.astype(indices.dtype) + jnp.arange(num_local, dtype=indices.dtype)
    return (indices[..., None] == classes).astype(dtype), kept, invalid


def _loss_rows(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, axis_name, need_grad):
    rows = AxisRows(axis_name)
    dtype = t1.dtype
    a = logits.astype(dtype)
    log_p = native.tempered_log_softmax_rows(a, t2, num_iters, rows)
    indices = jnp.issubdtype(labels.dtype, jnp.integer)
    if indices:
        y, kept, invalid = _local_labels(labels, a.shape[-1], dtype, ignore_index, axis_name)
    else:
        y = labels.astype(dtype)
    y = native.smooth_labels(y, label_smoothing, _class_offset(a.shape[-1], axis_name)[1])  # the GLOBAL C
    loss, grad = native.loss_and_grad_rows(log_p, y, t1, t2, need_grad, rows)
    if indices:
        loss = jnp.where(kept, jnp.where(invalid, jnp.nan, loss), 0.0)
        if need_grad:
            grad = jnp.where(kept[..., None], jnp.where(invalid[..., None], jnp.nan, grad), 0.0)
    return loss, grad


def _vary_like(x, like):
    """``x`` varying over the mesh axes ``like`` varies over: a kernel call's output (jax-triton's
    call, or the interpreter's callback) carries none under ``shard_map``'s check_vma, and a psum
    of a value that does not vary would count it once per device."""
    def axes(v):  # (jax 0.10: aval.manual_axis_type.varying)
        return set(getattr(getattr(jax.typeof(v), "manual_axis_type", None), "varying", ()))

    missing = tuple(sorted(axes(like) - axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def _kernel_loss_rows(logits, labels, t1, t2, label_smoothing, ignore_index, axis_name, need_grad):
    """``_loss_rows`` on the vocab-parallel Triton kernels: rows [..., C_local] of the slice; the
    loss in the temperatures' dtype, the gradient fp32 (one rounding in the backward)."""
    from bitempered.bindings.jax import launchers as jax_kernels

    rows = AxisRows(axis_name)
    num_local = logits.shape[-1]
    offset, num_classes = _class_offset(num_local, axis_name)
    a = logits.reshape(-1, num_local)
    row_max = rows.max(jnp.max(a, axis=-1, keepdims=True).astype(jnp.float32)).reshape(-1)
    t = t2.astype(jnp.float32)

    def evaluate(y):  # one solver pass: one kernel call, then the packed psum in the solver
        sums = _vary_like(jax_kernels.vocab_parallel_sums(a, row_max, y.reshape(-1), t, False), a)
        return sums[:, :1], sums[:, 1:2]

    def count_support():  # t < 1 only: the kernel counts the classes that can have p > 0
        return _vary_like(jax_kernels.vocab_parallel_sums(a, row_max, jnp.zeros_like(row_max), t, True), a)[:, 2:]

    classes_here = _vary_like(jnp.full_like(row_max[:, None], num_local), a)
    y, _ = native.solve_normalizers(evaluate, lax.cond(t < 1, count_support, lambda: classes_here), t, rows)
    y = y.reshape(-1)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        indices = _widen_indices(labels.reshape(-1))
        kept, invalid = native.kept_and_invalid(indices, ignore_index, num_classes)
        # the target's index in this slice; -1 (no class here) for ignored and invalid rows
        local = jnp.where(kept & ~invalid, indices - offset.astype(indices.dtype), -1).astype(jnp.int32)
    else:
        local = labels.reshape(-1, num_local)
        kept = invalid = None
    loss, sum_e, sum_d = rows.sum(*jnp.split(_vary_like(jax_kernels.vocab_parallel_epilogue(
        a, local, row_max, y, t1, t2, label_smoothing, num_classes), a), 3, axis=-1))
    loss = loss[:, 0]
    if kept is not None:
        loss = jnp.where(kept, jnp.where(invalid, jnp.nan, loss), 0.0)
    loss = loss.astype(t1.dtype).reshape(logits.shape[:-1])
    if not need_grad:
        return loss, None
    row_scale = jnp.ones_like(row_max) if kept is None else jnp.where(kept, jnp.where(invalid, jnp.nan, 1.0), 0.0)
    grad = jax_kernels.vocab_parallel_gradient(a, local, row_max, y, jnp.concatenate([loss.reshape(-1, 1).astype(
        jnp.float32), sum_e, sum_d], axis=-1), row_scale.astype(jnp.float32), t1, t2, label_smoothing, num_classes)
    return loss, _vary_like(grad, a).reshape(logits.shape)


@functools.lru_cache(maxsize=None)
def _kernel_loss_fn(ignore_index, axis_name, need_grad):
    """The kernel path with vmap folded into the rows (jax-triton's call has no batching rule)."""
    def fn(logits, labels, t1, t2, label_smoothing):
        loss, grad = _kernel_loss_rows(logits, labels, t1, t2, label_smoothing, ignore_index, axis_name, need_grad)
        return (loss, grad) if need_grad else loss

    return _fold_batch(fn, 2)


def _rows_of(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, axis_name, need_grad, backend):
    if backend == "triton":
        out = _kernel_loss_fn(ignore_index, axis_name, need_grad)(logits, labels, t1, t2, label_smoothing)
        loss, grad = out if need_grad else (out, None)
        return loss, None if grad is None else _vary_like(grad, logits)
    return _loss_rows(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, axis_name, need_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _loss(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, axis_name, backend):
    return _rows_of(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, axis_name, False, backend)[0]


def _loss_fwd(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, axis_name, backend):
    loss, grad = _rows_of(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, axis_name, True,
                          backend)
    return loss, (grad, jnp.zeros((0,), logits.dtype))


def _loss_bwd(num_iters, ignore_index, axis_name, backend, residuals, grad_loss):
    grad, like_logits = residuals
    # local: the row sums are already reduced, so each slice's gradient needs no collective
    return (grad_loss[..., None].astype(grad.dtype) * grad).astype(like_logits.dtype), None, None, None, None


_loss.defvjp(_loss_fwd, _loss_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _softmax(logits, t, num_iters, axis_name):
    return _softmax_fwd(logits, t, num_iters, axis_name)[0]


def _softmax_fwd(logits, t, num_iters, axis_name):
    p = jnp.exp(native.tempered_log_softmax_rows(logits.astype(t.dtype), t, num_iters, AxisRows(axis_name)))
    return p.astype(logits.dtype), (p, t)


def _softmax_bwd(num_iters, axis_name, residuals, grad_p):
    p, t = residuals
    grad = native.tempered_softmax_vjp_rows(p, grad_p.astype(p.dtype), t, AxisRows(axis_name))
    return grad.astype(grad_p.dtype), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _check_axis_name(axis_name) -> None:
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"axis_name must be a mesh axis name (str) or a tuple of them, got {axis_name!r}")


def vocab_parallel_tempered_softmax(local_logits, t, axis_name, num_iters=None):
    """Tempered softmax of rows whose classes are sharded over ``axis_name`` (inside shard_map).

    Returns this device's slice of ``tempered_softmax(concatenated logits, t)``, in the logits'
    dtype. Collectives: pmax, then psum of the support size and one psum per solver pass.
    """
    _check_axis_name(axis_name)
    logits = _as_logits(local_logits)
    iters = _num_iters(num_iters)
    t_, t_value = _scalar(t, "t", native.compute_dtype(logits.dtype))
    check.check_t(t_value, "t")
    if logits.size == 0:
        return jnp.zeros(logits.shape, logits.dtype)
    return _softmax(logits, t_, iters, axis_name)


def vocab_parallel_bi_tempered_logistic_loss(local_logits, labels, t1, t2, axis_name, label_smoothing=0.0,
                                             num_iters=None, ignore_index=-100, backend="auto"):
    """Bi-tempered loss of rows whose classes are sharded over ``axis_name`` (call inside shard_map).

    Args:
        local_logits: [..., C_local], this device's contiguous slice of the classes (device i of
            the axis holds classes [i C_local, (i + 1) C_local)).
        labels: integer GLOBAL class indices of shape ``local_logits.shape[:-1]`` (an index outside
            [0, C) other than ``ignore_index`` gives a NaN row), or dense labels sliced like the
            logits.
        axis_name: the mesh axis (or tuple of axes) that shards the classes.
        t1, t2, label_smoothing, num_iters, ignore_index: as in ``bi_tempered_logistic_loss``;
            smoothing uses the GLOBAL class count.
        backend: "auto" (the vocab-parallel Triton kernels on a GPU with jax-triton, XLA otherwise),
            "xla" or "triton" (see the module docstring; ``num_iters=k`` runs on XLA).

    Returns the per-row losses (the same on every device of the axis); the custom gradient flows
    to this device's slice.
    """
    _check_axis_name(axis_name)
    logits = _as_logits(local_logits)
    labels = _as_labels(labels)
    check.labels_are_indices(logits.shape, labels.shape, jnp.issubdtype(labels.dtype, jnp.integer))
    iters = _num_iters(num_iters)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    dtype = native.compute_dtype(logits.dtype)
    t1_, t2_, s_, _ = _temperatures(t1, t2, label_smoothing, dtype)
    backend = _resolve_backend(backend, logits.dtype)
    if iters is not None or _class_offset(logits.shape[-1], axis_name)[1] < 2:
        backend = "xla"  # the kernels run the converged solver; C = 1 takes XLA's NaN-smoothing rule
    if logits.size == 0:
        return jnp.zeros(logits.shape[:-1], dtype)
    return _loss(logits, jnp.asarray(labels), t1_, t2_, s_, iters, int(ignore_index), axis_name, backend)
