"""The differentiable cores of the JAX binding: ``custom_vjp`` rules over the XLA loss
(``native/loss.py``) and the Triton kernels (``launchers.py``), compiled once per shape, dtype
and static configuration, for every temperature value.

Arguments arrive checked (``args.py``): logits with the classes on ``axis`` (a NEGATIVE int, so
that a vmapped batch folded in front never moves it; -1: [..., C]), labels (class indices of the
rows' shape, the logits' shape without ``axis``, or dense of the logits' shape), 0-d temperatures
and smoothing in the compute dtype, the loss weights (or None), static ``num_iters``,
``ignore_index`` (an int, or None: no row ignored), backend ("xla" or "triton") and, for the XLA
loss and softmax, ``axis_name`` (the mesh axis that shards the classes, None when every class is
local). The XLA loss and softmax work on rows [..., C]: the class axis is moved last
(:func:`classes_last`); the Triton launchers read it in place. The custom VJPs' gradients flow to
the logits only; the weights multiply each row's loss outside them (``weighted_reduce``), so JAX
differentiates that product.
Importing this module imports no Triton: ``launchers`` is imported inside the Triton functions,
when that path is traced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bitempered.bindings.common.validation import without_axis
from bitempered.bindings.jax import args, reductions
from bitempered.bindings.jax.native import loss as native_loss
from bitempered.bindings.jax.native import math as native


def fold_batch(fn, num_arrays: int):
    """``custom_vmap`` of a row-wise call: a vmapped call is the same call on more rows.

    ``fn`` takes ``num_arrays`` arrays with any leading axes, then 0-d scalars. Unbatched arrays
    are broadcast to the batch; per-example scalars (a vmapped temperature) fall back to one call
    per example (``lax.map``). Needed because jax-triton's ``triton_call`` has no batching rule, and
    by the XLA loss so that its run-time branches decide once for all rows (a vmapped ``lax.cond``
    would run both branches and, inside shard_map, trip check_vma on a batched branch's constants).
    """
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *operands):
        def full(arg, batched):
            return arg if batched else jnp.broadcast_to(arg, (axis_size,) + jnp.shape(arg))

        if any(in_batched[num_arrays:]):  # a per-example temperature: one call per example
            out = jax.lax.map(lambda xs: wrapped(*xs), tuple(map(full, operands, in_batched)))
        else:  # calling `wrapped` (not `fn`) again keeps nested vmaps folding too
            arrays = tuple(map(full, operands[:num_arrays], in_batched[:num_arrays]))
            out = wrapped(*arrays, *operands[num_arrays:])
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


def stored_grad_dtype(dtype):
    """The dtype a gradient stored by a forward pass for its backward is kept in: float32 for
    float16 (whose range cannot hold dL/da x 1/N under a loss scale; SPEC "Precision"), else
    ``dtype``."""
    return jnp.float32 if dtype == jnp.float16 else dtype


def scale_stored_gradient(grad, upstream, like, axis: int = -1):
    """upstream x the stored unit gradient, rounded once to ``like``'s dtype; ``upstream`` has
    the gradient's shape without its class axis ``axis`` (a negative int; if it has one)."""
    if upstream.ndim < grad.ndim:
        upstream = jnp.expand_dims(upstream, axis)
    return (upstream.astype(grad.dtype) * grad).astype(like.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def stored_gradient_loss(kernel, x, labels, t1, t2, label_smoothing, axis=-1):
    """A loss whose forward also computes its unit gradient and whose backward scales it.

    ``kernel(need_grad)`` (hashable, static) returns a function of (x, labels, t1, t2,
    label_smoothing) giving the loss, or (loss, unit gradient) when ``need_grad``: the Triton
    losses (plain, binary and vocab-parallel). The forward without a gradient skips it.
    ``axis``: the class axis of ``x`` (negative; none for the elementwise binary loss).
    """
    return kernel(False)(x, labels, t1, t2, label_smoothing)


def _stored_gradient_fwd(kernel, x, labels, t1, t2, label_smoothing, axis=-1):
    loss, grad = kernel(True)(x, labels, t1, t2, label_smoothing)
    # The unit gradient stays in the compute dtype; the zero-size array only carries the input's
    # dtype to the backward rule, which rounds once to it.
    return loss, (grad, jnp.zeros((0,), x.dtype))


def _stored_gradient_bwd(kernel, axis, residuals, grad_loss):
    grad, like = residuals
    # Labels, temperatures and smoothing get no gradient (None: zeros, float0 for integer labels).
    return scale_stored_gradient(grad, grad_loss, like, axis), None, None, None, None


stored_gradient_loss.defvjp(_stored_gradient_fwd, _stored_gradient_bwd)


# --------------------------------------------------------------------------------------------
# Triton (jax-triton): kernel calls on the N-d arrays with the class axis, folded under vmap (the
# batch goes in front; the class axis is negative, so it stays the same axis)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _triton_loss_fn(num_iters, ignore_index, axis, need_grad):
    def fn(logits, labels, t1, t2, label_smoothing):
        from bitempered.bindings.jax import launchers

        if jnp.issubdtype(labels.dtype, jnp.integer) and labels.dtype not in (jnp.int32, jnp.int64):
            labels = labels.astype(jnp.int32)
        loss, grad = launchers.loss_rows(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index,
                                         need_grad, axis=axis)
        loss = loss.reshape(without_axis(logits.shape, axis))  # [R] in row order
        return (loss, grad) if need_grad else loss

    return fold_batch(fn, 2)


@functools.lru_cache(maxsize=None)
def _triton_softmax_fn(num_iters, axis):
    def fn(logits, t):
        from bitempered.bindings.jax import launchers

        return launchers.softmax_forward(logits, t, num_iters, axis=axis)

    return fold_batch(fn, 1)


@functools.lru_cache(maxsize=None)
def _triton_softmax_vjp_fn(axis):
    def fn(p, grad_p, t):
        from bitempered.bindings.jax import launchers

        return launchers.softmax_backward(p, grad_p, t, axis=axis)

    return fold_batch(fn, 2)


@functools.lru_cache(maxsize=None)
def _triton_binary_fn(num_iters, need_grad):
    def fn(x, y, t1, t2, label_smoothing):
        from bitempered.bindings.jax import launchers

        loss, grad = launchers.binary_loss(x.reshape(-1), y.reshape(-1).astype(jnp.float32), t1, t2,
                                           label_smoothing, num_iters, need_grad)
        return (loss.reshape(x.shape), grad.reshape(x.shape)) if need_grad else loss.reshape(x.shape)

    return fold_batch(fn, 2)


@functools.lru_cache(maxsize=None)
def _triton_sigmoid_fn(num_iters):
    def fn(x, t):
        from bitempered.bindings.jax import launchers

        return launchers.sigmoid_forward(x.reshape(-1), t, num_iters).reshape(x.shape)

    return fold_batch(fn, 1)


@functools.lru_cache(maxsize=None)
def _triton_sigmoid_vjp_fn():
    def fn(p, grad_p, t):
        from bitempered.bindings.jax import launchers

        return launchers.sigmoid_backward(p.reshape(-1), grad_p.reshape(-1), t).reshape(p.shape)

    return fold_batch(fn, 2)


# --------------------------------------------------------------------------------------------
# XLA loss: native/loss.py's forward and backward, rows flattened, folded under vmap
# --------------------------------------------------------------------------------------------

def classes_last(logits, labels, axis: int):
    """The logits and labels with the classes on the last axis, for the XLA loss's rows [..., C]:
    dense labels move with the logits; class indices already have the rows' shape, in the same
    row order. XLA fuses the transpose into its consumers; for axis -1 it is no operation (the
    program is the last-axis one), and JAX transposes the gradient back to the logits' layout."""
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        labels = jnp.moveaxis(labels, axis, -1)
    return jnp.moveaxis(logits, axis, -1), labels


def _loss_labels(labels, num_local: int, dtype, ignore_index, label_smoothing, rows):
    """native_loss.Labels of class indices [...] or dense labels [..., C], rows flattened."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return native_loss.class_index_labels(args.widen_indices(labels.reshape(-1)), num_local, dtype,
                                              ignore_index, label_smoothing, rows)
    return native_loss.dense_labels(labels.reshape(-1, num_local), dtype, label_smoothing, rows)


@functools.lru_cache(maxsize=None)
def xla_forward_fn(num_iters, ignore_index, axis_name, need_residual):
    """(loss, R, alpha, beta) of the XLA loss (R shaped as the logits, alpha and beta [..., 1]),
    or (loss,) without the residual. Folded under vmap (:func:`fold_batch`): the run-time
    branches of ``native/loss.py`` (the cross-entropy fast paths and their exact fallback) decide
    once for all the rows instead of per example."""
    def fn(logits, labels, t1, t2, label_smoothing):
        rows_shape, num_classes = logits.shape[:-1], logits.shape[-1]
        rows = native.rows_over(axis_name)
        read = _loss_labels(labels, num_classes, t1.dtype, ignore_index, label_smoothing, rows)
        loss, (r, alpha, beta) = native_loss.forward(logits.reshape(-1, num_classes).astype(t1.dtype), read, t1, t2,
                                                     num_iters, need_residual, rows)
        loss = loss.reshape(rows_shape)
        if not need_residual:
            return (loss,)
        return loss, r.reshape(logits.shape), alpha.reshape(rows_shape + (1,)), beta.reshape(rows_shape + (1,))

    return fold_batch(fn, 2)


@functools.lru_cache(maxsize=None)
def xla_backward_fn(ignore_index, axis_name):
    """upstream [...] x dL/dlogits in the dtype of ``like`` (a zero-size array) from the labels
    and the residual of :func:`xla_forward_fn` (folded under vmap likewise)."""
    def fn(labels, r, alpha, beta, upstream, label_smoothing, like):
        num_classes = r.shape[-1]
        read = _loss_labels(labels, num_classes, r.dtype, ignore_index, label_smoothing, native.rows_over(axis_name))
        residual = native_loss.Residual(r.reshape(-1, num_classes), alpha.reshape(-1, 1), beta.reshape(-1, 1))
        grad = native_loss.backward(residual, read, upstream.reshape(-1, 1).astype(r.dtype))
        return grad.astype(like.dtype).reshape(r.shape)

    return fold_batch(fn, 5)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def xla_loss(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, axis_name):
    """The XLA loss per row with its custom gradient; ``axis_name``: the mesh axis sharding the
    classes (inside shard_map; the labels are then GLOBAL indices or this slice's dense labels),
    or None."""
    # no gradient wanted: the forward skips the gradient's N x C residual
    return xla_forward_fn(num_iters, ignore_index, axis_name, False)(logits, labels, t1, t2, label_smoothing)[0]


def _xla_loss_fwd(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, axis_name):
    # the residual (R, alpha, beta) of native/loss.py; one elementwise backward
    loss, *residual = xla_forward_fn(num_iters, ignore_index, axis_name, True)(logits, labels, t1, t2,
                                                                               label_smoothing)
    return loss, (labels, label_smoothing, tuple(residual), jnp.zeros((0,), logits.dtype))


def _xla_loss_bwd(num_iters, ignore_index, axis_name, residuals, grad_loss):
    labels, label_smoothing, residual, like = residuals
    grad_logits = xla_backward_fn(ignore_index, axis_name)(labels, *residual, grad_loss, label_smoothing, like)
    return grad_logits, None, None, None, None


xla_loss.defvjp(_xla_loss_fwd, _xla_loss_bwd)


# --------------------------------------------------------------------------------------------
# The losses and probabilities of the public API
# --------------------------------------------------------------------------------------------

def _loss(logits, labels, t1, t2, label_smoothing, class_weight, sample_weight, num_iters, ignore_index, backend,
          reduction, axis):
    if backend == "triton":
        kernel = functools.partial(_triton_loss_fn, num_iters, ignore_index, axis)
        loss = stored_gradient_loss(kernel, logits, labels, t1, t2, label_smoothing, axis)
    else:
        loss = xla_loss(*classes_last(logits, labels, axis), t1, t2, label_smoothing, num_iters, ignore_index, None)
    return weighted_reduce(loss, labels, class_weight, sample_weight, ignore_index, reduction, axis)


def weighted_reduce(loss_rows, labels, class_weight, sample_weight, ignore_index, reduction, axis=-1):
    """The per-row losses of a differentiable core weighted and reduced (``reductions``): each
    row's weight reaches the core's backward as its upstream value, with the reduction's.
    ``axis``: the class axis of dense ``labels``."""
    kept = reductions.kept_rows(labels, ignore_index, axis)
    factors = reductions.row_factors(labels, kept, class_weight, sample_weight, loss_rows.dtype)
    return reductions.reduce(loss_rows, kept, reduction, factors)


loss_jit = jax.jit(_loss, static_argnums=(7, 8, 9, 10, 11))


def loss_rows(logits, labels, t1, t2, label_smoothing, row_weights, num_iters, ignore_index, backend):
    """(per-row loss, ``row_weights`` [N] x dL/dlogits in the logits' dtype, or None when
    ``row_weights`` is None): the plain loss's forward and backward in one go, for a caller that
    already knows each row's upstream value (the fused linear head, per chunk)."""
    need_grad = row_weights is not None
    like = jnp.zeros((0,), logits.dtype)
    if backend == "triton":
        out = _triton_loss_fn(num_iters, ignore_index, -1, need_grad)(logits, labels, t1, t2, label_smoothing)
        if not need_grad:
            return out, None
        loss, grad = out
        return loss, scale_stored_gradient(grad, row_weights, like)
    loss, *residual = xla_forward_fn(num_iters, ignore_index, None, need_grad)(logits, labels, t1, t2,
                                                                              label_smoothing)
    if not need_grad:
        return loss, None
    return loss, xla_backward_fn(ignore_index, None)(labels, *residual, row_weights, label_smoothing, like)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def tempered_softmax(logits, t, num_iters, backend, axis_name, axis=-1):
    """Tempered softmax over the class axis ``axis`` (negative), in the logits' dtype;
    ``axis_name``: the mesh axis sharding the classes (XLA only, inside shard_map), or None."""
    return _softmax_fwd(logits, t, num_iters, backend, axis_name, axis)[0]


def _softmax_fwd(logits, t, num_iters, backend, axis_name, axis=-1):
    if backend == "triton":
        p = _triton_softmax_fn(num_iters, axis)(logits, t)
        return p, (p, t)
    # XLA: rows [..., C] (the classes moved last, a no-op for -1); the residual p stays in that layout
    a = jnp.moveaxis(logits, axis, -1).astype(t.dtype)
    p = jnp.exp(native.tempered_log_softmax_rows(a, t, num_iters, native.rows_over(axis_name)))
    return jnp.moveaxis(p, -1, axis).astype(logits.dtype), (p, t)


def _softmax_bwd(num_iters, backend, axis_name, axis, residuals, grad_p):
    p, t = residuals
    if backend == "triton":
        return _triton_softmax_vjp_fn(axis)(p, grad_p.astype(p.dtype), t), None
    grad_rows = jnp.moveaxis(grad_p, axis, -1).astype(p.dtype)
    grad = native.tempered_softmax_vjp_rows(p, grad_rows, t, native.rows_over(axis_name))
    return jnp.moveaxis(grad, -1, axis).astype(grad_p.dtype), None


tempered_softmax.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def softmax_jit(logits, t, num_iters, backend, axis):
    return tempered_softmax(logits, t, num_iters, backend, None, axis)


def _two_classes(x, first):
    """[..., 2] rows [first, x] of the binary problem (logits [0, x], labels [1 - y, y])."""
    return jnp.stack([first, x], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sigmoid_triton(x, t, num_iters):
    return _triton_sigmoid_fn(num_iters)(x, t)


def _sigmoid_triton_fwd(x, t, num_iters):
    p = _triton_sigmoid_fn(num_iters)(x, t)
    return p, (p, t)


def _sigmoid_triton_bwd(num_iters, residuals, grad_p):
    p, t = residuals
    return _triton_sigmoid_vjp_fn()(p, grad_p.astype(p.dtype), t), None


_sigmoid_triton.defvjp(_sigmoid_triton_fwd, _sigmoid_triton_bwd)


@functools.partial(jax.jit, static_argnums=(2, 3))
def sigmoid_jit(x, t, num_iters, backend):
    """Elementwise tempered sigmoid: the softmax of [0, x] (XLA) or the binary kernels (Triton)."""
    if backend == "triton":
        return _sigmoid_triton(x, t, num_iters)
    return tempered_softmax(_two_classes(x, jnp.zeros_like(x)), t, num_iters, backend, None)[..., 1]


@functools.partial(jax.jit, static_argnums=(6, 7, 8, 9))
def binary_loss_jit(x, y, t1, t2, label_smoothing, sample_weight, num_iters, backend, ignore_index, reduction):
    """Elementwise binary loss: the 2-class loss of [0, x], [1 - y, y] (XLA) or the binary kernel,
    weighted by ``sample_weight`` (or None) and reduced. Elements whose label equals
    ``ignore_index`` (None: none) are skipped: their logit and label are replaced by 0 before the
    loss (an O(N) select: no NaN from a label such as 255 reaches a gradient, and the select's
    transpose gives their logits an exact 0 gradient, also for a NaN logit) and their loss is 0,
    not counted by "mean"."""
    kept = jnp.ones(y.shape, bool) if ignore_index is None else y != ignore_index
    if ignore_index is not None:
        x, y = jnp.where(kept, x, 0), jnp.where(kept, y, 0)
    if backend == "triton":
        kernel = functools.partial(_triton_binary_fn, num_iters)
        loss = stored_gradient_loss(kernel, x, y, t1, t2, label_smoothing)
    else:
        y = y.astype(t1.dtype)
        loss = xla_loss(_two_classes(x, jnp.zeros_like(x)), _two_classes(y, 1.0 - y), t1, t2, label_smoothing,
                        num_iters, None, None)
    factors = reductions.row_factors(None, kept, None, sample_weight, loss.dtype)
    return reductions.reduce(jnp.where(kept, loss, 0.0), kept, reduction, factors)
