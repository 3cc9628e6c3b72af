"""The differentiable cores of the JAX binding: ``custom_vjp`` rules over the XLA loss
(``native/loss.py``) and the Triton kernels (``launchers.py``), compiled once per shape, dtype
and static configuration, for every temperature value.

Arguments arrive checked (``args.py``): logits with the classes on ``axis`` (a NEGATIVE int, so
that a vmapped batch folded in front never moves it; -1: [..., C]), labels (class indices of the
rows' shape, the logits' shape without ``axis``, or dense of the logits' shape), temperatures in
the compute dtype (0-d, or per row: of the rows' shape; an elementwise function's: of the logits'
shape), 0-d smoothing in the compute dtype, the loss weights (or None), static ``num_iters``,
``ignore_index`` (an int, or None: no row ignored), backend ("xla" or "triton") and, for the XLA
loss and softmax, ``axis_name`` (the mesh axis that shards the classes, None when every class is
local). The XLA loss and softmax work on rows [..., C]: the class axis is moved last
(:func:`classes_last`); the Triton launchers read it in place. The custom VJPs' gradients flow to
the logits and the temperatures (never to the labels or the smoothing); the weights multiply each
row's loss outside them (``weighted_reduce``), so JAX differentiates that product, and each row's
weight and reduction factor reach the backward rules as that row's upstream value.

The rules use ``symbolic_zeros``: the forward rule sees which inputs are differentiated
(``CustomVJPPrimal.perturbed``, known at trace time), so a temperature's derivatives are computed
(from the same solve as the loss: each row's dL/dt1, dL/dt2, or dp/dt terms) only when a
temperature is differentiated, and the logits' gradient only when the logits are; anything else
costs nothing. The temperatures' derivatives exist for the converged normalization only: a
differentiated temperature with ``num_iters=k`` raises ValueError naming ``num_iters``. A
temperature's cotangent is the sum over rows of upstream x that row's derivative (0-d), or each
row's (per row).
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
from bitempered.bindings.jax.native import temperature


def fold_batch(fn, num_arrays: int):
    """``custom_vmap`` of a row-wise call: a vmapped call is the same call on more rows.

    ``fn`` takes ``num_arrays`` arrays with any leading axes, then operands that are 0-d scalars or
    per-row values (a per-row temperature: the rows' leading axes, which fold as the arrays').
    Unbatched arrays and per-row values are broadcast to the batch; per-example scalars (a vmapped
    0-d temperature) fall back to one call per example (``lax.map``). Needed because jax-triton's
    ``triton_call`` has no batching rule, and by the XLA loss so that its run-time branches decide
    once for all rows (a vmapped ``lax.cond`` would run both branches and, inside shard_map, trip
    check_vma on a batched branch's constants).
    """
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *operands):
        def full(arg, batched):
            return arg if batched else jnp.broadcast_to(arg, (axis_size,) + jnp.shape(arg))

        def per_example_scalar(arg, batched):
            return batched and jnp.ndim(arg) == 1

        def folded(position, arg, batched):  # the arrays and the per-row values fold with the rows
            return full(arg, batched) if position < num_arrays or batched or jnp.ndim(arg) > 0 else arg

        if any(map(per_example_scalar, operands[num_arrays:], in_batched[num_arrays:])):
            # a per-example 0-d value (a vmapped temperature): one call per example
            out = jax.lax.map(lambda xs: wrapped(*xs), tuple(map(full, operands, in_batched)))
        else:  # calling `wrapped` (not `fn`) again keeps nested vmaps folding too
            out = wrapped(*map(folded, range(len(operands)), operands, in_batched))
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


# --------------------------------------------------------------------------------------------
# Temperatures: 0-d, or per row (the rows' shape) in the cores; their derivatives per row
# --------------------------------------------------------------------------------------------

def row_temperature(t):
    """A temperature for the native rows [R, C] (rows flattened): 0-d as is, per row [R, 1]."""
    return t if t.ndim == 0 else t.reshape(-1, 1)


def flat_temperature(t):
    """A temperature for the Triton launchers: 0-d as is, per row [R] in row order."""
    return t if t.ndim == 0 else t.reshape(-1)


def wants_temperature_grads(num_iters, *temperatures) -> bool:
    """Whether any of the temperatures (``CustomVJPPrimal``s of a ``symbolic_zeros`` forward rule)
    is differentiated; ValueError naming ``num_iters`` when one is under ``num_iters=k`` (the
    derivatives are those of the converged normalization)."""
    wanted = any(t.perturbed for t in temperatures)
    if wanted and num_iters is not None:
        raise ValueError(f"gradients of the temperatures need the converged normalization (num_iters=None), got "
                         f"num_iters={num_iters}: differentiate the temperatures with num_iters=None, or stop "
                         "their gradient (jax.lax.stop_gradient)")
    return wanted


def varying_axes(value) -> set:
    """The mesh axes ``value`` varies over, as ``shard_map``'s check_vma tracks them (none when it
    is off, or outside shard_map). (jax 0.10: aval.manual_axis_type.varying)"""
    return set(getattr(getattr(jax.typeof(value), "manual_axis_type", None), "varying", ()))


def temperature_like(t):
    """The residual that lets a backward rule shape a temperature's cotangent: a zero-size slice
    of it (the temperature's shape + (0,), its dtype and the mesh axes it varies over) when ``t``
    (a ``CustomVJPPrimal``) is differentiated, else None (no cotangent)."""
    return t.value[..., None][..., :0] if t.perturbed else None


def temperature_cotangent(row_grads, like, upstream=None):
    """``upstream`` x each row's dL/dt (both of the rows' shape; None: ``row_grads`` already
    include it), summed to the temperature's shape (``like``: :func:`temperature_like`; 0-d: the
    sum over rows, per row: each row's), or None for a temperature not differentiated.

    Inside shard_map, a temperature the same on every device of a mesh axis whose devices hold
    other rows (a 0-d temperature with the rows sharded over "data") gets the sum of the devices'
    parts (a psum over those axes, as JAX's own transpose of the implicit broadcast would)."""
    if like is None:
        return None
    values = row_grads if upstream is None else upstream.astype(row_grads.dtype) * row_grads
    shape = like.shape[:-1]
    cotangent = (jnp.sum(values) if shape == () else values.reshape(shape)).astype(like.dtype)
    missing = tuple(sorted(varying_axes(cotangent) - varying_axes(like)))
    return jax.lax.psum(cotangent, missing) if missing else cotangent


def jitted_rule(rule, static_argnums):
    """A ``symbolic_zeros`` custom_vjp ``rule`` called through ``jax.jit``: inside a jit trace it
    is bound as usual, but an eager ``shard_map`` (the vocab-parallel functions called outside
    jit) cannot bind such a rule itself ("custom_vjp symbolic_zeros support with shard_map is not
    implemented", jax 0.10); a jitted call it runs. Inside an outer jit this costs nothing."""
    return functools.wraps(rule)(jax.jit(rule, static_argnums=static_argnums))


class StaticCall:
    """A static argument that is a function (``functools.partial`` of a kernel factory), equal to
    and hashing as every partial of the same function and arguments: a new but equal partial per
    call hits ``jax.jit``'s cache (a partial alone compares by identity)."""

    def __init__(self, fn):
        self.fn = fn
        if isinstance(fn, functools.partial):
            self.key = (fn.func, fn.args, tuple(sorted(fn.keywords.items())))
        else:
            self.key = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __eq__(self, other):
        return isinstance(other, StaticCall) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


# --------------------------------------------------------------------------------------------
# Losses that compute their gradients in the forward pass (the Triton kernels)
# --------------------------------------------------------------------------------------------

def stored_gradient_loss(kernel, x, labels, t1, t2, label_smoothing, axis=-1, temperature_kernel=None):
    """A loss whose forward also computes its unit gradient and whose backward scales it.

    ``kernel(need_grad)`` (static) returns a function of (x, labels, t1, t2, label_smoothing)
    giving the loss, or (loss, unit gradient) when ``need_grad``: the Triton losses (plain,
    binary and vocab-parallel). The forward without a gradient skips it. ``axis``: the class axis
    of ``x`` (negative; none for the elementwise binary loss). ``temperature_kernel(need_grad)``
    (static, or None: the temperatures cannot be differentiated, NotImplementedError) returns the
    function used when a temperature is differentiated: (loss, [unit gradient if need_grad,]
    each row's (dL/dt1, dL/dt2) [rows..., 2] for unit upstream gradient).
    """
    kernels = StaticCall(kernel), None if temperature_kernel is None else StaticCall(temperature_kernel)
    return _stored_gradient_jit(kernels[0], x, labels, t1, t2, label_smoothing, axis, kernels[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6, 7))
def _stored_gradient_rule(kernel, x, labels, t1, t2, label_smoothing, axis=-1, temperature_kernel=None):
    return kernel(False)(x, labels, t1, t2, label_smoothing)


def _stored_gradient_fwd(kernel, x, labels, t1, t2, label_smoothing, axis=-1, temperature_kernel=None):
    need_grad = x.perturbed
    operands = (x.value, labels.value, t1.value, t2.value, label_smoothing.value)
    row_grads = None
    if t1.perturbed or t2.perturbed:
        if temperature_kernel is None:
            raise NotImplementedError("gradients of t1/t2 are not implemented on this backend: use backend='xla', "
                                      "or stop their gradient")
        loss, *grad, row_grads = temperature_kernel(need_grad)(*operands)
        grad = grad[0] if need_grad else None
    elif need_grad:
        loss, grad = kernel(True)(*operands)
    else:
        loss, grad = kernel(False)(*operands), None
    # The unit gradient stays in the compute dtype; the zero-size array only carries the input's
    # dtype to the backward rule, which rounds once to it.
    temperatures = None if row_grads is None else (row_grads, temperature_like(t1), temperature_like(t2))
    return loss, (grad, jnp.zeros((0,), x.value.dtype), temperatures)


def _stored_gradient_bwd(kernel, axis, temperature_kernel, residuals, grad_loss):
    grad, like, temperatures = residuals
    grad_x = None if grad is None else scale_stored_gradient(grad, grad_loss, like, axis)
    # Labels and smoothing get no gradient (None: zeros, float0 for integer labels).
    return (grad_x, None, *_temperature_cotangents(temperatures, grad_loss), None)


def _temperature_cotangents(temperatures, upstream):
    """(t1's cotangent, t2's) from (each row's (dL/dt1, dL/dt2) [rows..., 2], t1's like, t2's
    like) (:func:`temperature_cotangent`), or (None, None)."""
    if temperatures is None:
        return None, None
    row_grads, t1_like, t2_like = temperatures
    return (temperature_cotangent(row_grads[..., 0], t1_like, upstream),
            temperature_cotangent(row_grads[..., 1], t2_like, upstream))


_stored_gradient_rule.defvjp(_stored_gradient_fwd, _stored_gradient_bwd, symbolic_zeros=True)
_stored_gradient_jit = jitted_rule(_stored_gradient_rule, (0, 6, 7))


# --------------------------------------------------------------------------------------------
# Triton (jax-triton): kernel calls on the N-d arrays with the class axis, folded under vmap (the
# batch goes in front; the class axis is negative, so it stays the same axis)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _triton_loss_fn(num_iters, ignore_index, axis, need_grad, need_temperature_grads=False):
    """The plain loss on the Triton kernel: loss, (loss, unit gradient) with ``need_grad``; with
    ``need_temperature_grads`` also each row's (dL/dt1, dL/dt2) [rows..., 2] last (the
    ``temperature_kernel`` protocol of :func:`stored_gradient_loss`)."""
    if need_temperature_grads and num_iters is not None:
        raise ValueError(f"gradients of the temperatures need num_iters=None, got num_iters={num_iters}")

    def fn(logits, labels, t1, t2, label_smoothing):
        from bitempered.bindings.jax import launchers

        if jnp.issubdtype(labels.dtype, jnp.integer) and labels.dtype not in (jnp.int32, jnp.int64):
            labels = labels.astype(jnp.int32)
        rows_shape = without_axis(logits.shape, axis)
        out = launchers.loss_rows(logits, labels, flat_temperature(t1), flat_temperature(t2), label_smoothing,
                                  num_iters, ignore_index, need_grad, axis=axis,
                                  need_temperature_grads=need_temperature_grads)
        loss = out[0].reshape(rows_shape)  # [R] in row order
        grad = (out[1],) if need_grad else ()
        row_grads = (out[2].reshape(rows_shape + (2,)),) if need_temperature_grads else ()
        if not (need_grad or need_temperature_grads):
            return loss
        return (loss, *grad, *row_grads)

    return fold_batch(fn, 2)


@functools.lru_cache(maxsize=None)
def _triton_softmax_fn(num_iters, axis):
    def fn(logits, t):
        from bitempered.bindings.jax import launchers

        return launchers.softmax_forward(logits, flat_temperature(t), num_iters, axis=axis)

    return fold_batch(fn, 1)


@functools.lru_cache(maxsize=None)
def _triton_softmax_vjp_fn(axis, need_temperature_grad=False):
    """The softmax's vjp on the Triton kernel: the logits' gradient, with
    ``need_temperature_grad`` also each row's part of t's gradient (the rows' shape)."""
    def fn(p, grad_p, t):
        from bitempered.bindings.jax import launchers

        out = launchers.softmax_backward(p, grad_p, flat_temperature(t), axis=axis,
                                         need_temperature_grad=need_temperature_grad)
        if not need_temperature_grad:
            return out
        grad, row_grads = out
        return grad, row_grads.reshape(without_axis(p.shape, axis))

    return fold_batch(fn, 2)


def _per_element(*temperatures) -> bool:
    """A temperature per element of the binary functions: the binary kernels take one per call, so
    such calls run the row kernels on the two-class rows [0, x] (one row per element) instead."""
    return any(jnp.ndim(t) > 0 for t in temperatures)


def _triton_two_class_loss(x, y, t1, t2, label_smoothing, num_iters, need_grad, need_temperature_grads):
    """(loss, [dL/dx for unit upstream gradient if need_grad,] [each element's (dL/dt1, dL/dt2)
    [..., 2] if need_temperature_grads]) of the binary loss as the row kernel's loss of the
    two-class rows [0, x], [1 - y, y]: x's gradient is the second class's (the first logit is
    the constant 0)."""
    from bitempered.bindings.jax import launchers

    y = y.astype(jnp.float32)
    out = launchers.loss_rows(_two_classes(x, jnp.zeros_like(x)), _two_classes(y, 1.0 - y), flat_temperature(t1),
                              flat_temperature(t2), label_smoothing, num_iters, None, need_grad,
                              need_temperature_grads=need_temperature_grads)
    loss = (out[0].reshape(x.shape),)
    grad = (out[1][..., 1],) if need_grad else ()
    row_grads = (out[2].reshape(x.shape + (2,)),) if need_temperature_grads else ()
    return loss + grad + row_grads


@functools.lru_cache(maxsize=None)
def _triton_binary_fn(num_iters, need_grad):
    """The binary loss on the Triton kernels: the binary kernel, or with a temperature per element
    the row kernel on the two-class rows (:func:`_triton_two_class_loss`)."""
    def fn(x, y, t1, t2, label_smoothing):
        from bitempered.bindings.jax import launchers

        if _per_element(t1, t2):
            out = _triton_two_class_loss(x, y, t1, t2, label_smoothing, num_iters, need_grad, False)
            return out if need_grad else out[0]
        loss, grad = launchers.binary_loss(x.reshape(-1), y.reshape(-1).astype(jnp.float32), t1, t2,
                                           label_smoothing, num_iters, need_grad)
        return (loss.reshape(x.shape), grad.reshape(x.shape)) if need_grad else loss.reshape(x.shape)

    return fold_batch(fn, 2)


@functools.lru_cache(maxsize=None)
def _triton_binary_temperature_fn(num_iters, need_grad):
    """The binary loss with each element's (dL/dt1, dL/dt2) [..., 2] (``temperature_kernel``
    protocol of :func:`stored_gradient_loss`): the binary kernel has no temperature variant, so the
    row kernel's runs on the two-class rows (one solve for the loss and every derivative)."""
    if num_iters is not None:
        raise ValueError(f"gradients of the temperatures need num_iters=None, got num_iters={num_iters}")

    def fn(x, y, t1, t2, label_smoothing):
        return _triton_two_class_loss(x, y, t1, t2, label_smoothing, num_iters, need_grad, True)

    return fold_batch(fn, 2)


@functools.lru_cache(maxsize=None)
def _triton_sigmoid_fn(num_iters):
    """The sigmoid on the binary kernel, or with a temperature per element the softmax kernel's
    second class of the rows [0, x]."""
    def fn(x, t):
        from bitempered.bindings.jax import launchers

        if _per_element(t):
            p = launchers.softmax_forward(_two_classes(x, jnp.zeros_like(x)), flat_temperature(t), num_iters)
            return p[..., 1]
        return launchers.sigmoid_forward(x.reshape(-1), t, num_iters).reshape(x.shape)

    return fold_batch(fn, 1)


@functools.lru_cache(maxsize=None)
def _triton_sigmoid_vjp_fn():
    """The sigmoid's vjp on the binary kernel, or with a temperature per element the softmax
    kernel's on the rows [1 - p, p] with upstream [0, g]."""
    def fn(p, grad_p, t):
        from bitempered.bindings.jax import launchers

        if _per_element(t):
            grad = launchers.softmax_backward(_two_classes(p, 1.0 - p), _two_classes(grad_p, jnp.zeros_like(grad_p)),
                                              flat_temperature(t))
            return grad[..., 1]
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
def xla_forward_fn(num_iters, ignore_index, axis_name, need_residual, need_temperature_grads=False):
    """(loss, R, alpha, beta) of the XLA loss (R shaped as the logits, alpha and beta [..., 1]),
    or (loss,) without the residual; with ``need_temperature_grads`` each row's (dL/dt1, dL/dt2)
    [..., 2] last. Temperatures: 0-d or of the rows' shape. Folded under vmap
    (:func:`fold_batch`): the run-time branches of ``native/loss.py`` (the cross-entropy fast
    paths and their exact fallback) decide once for all the rows instead of per example."""
    def fn(logits, labels, t1, t2, label_smoothing):
        rows_shape, num_classes = logits.shape[:-1], logits.shape[-1]
        rows = native.rows_over(axis_name)
        read = _loss_labels(labels, num_classes, t1.dtype, ignore_index, label_smoothing, rows)
        loss, (r, alpha, beta), row_grads = native_loss.forward(
            logits.reshape(-1, num_classes).astype(t1.dtype), read, row_temperature(t1), row_temperature(t2),
            num_iters, need_residual, rows, need_temperature_grads)
        out = (loss.reshape(rows_shape),)
        if need_residual:
            out += (r.reshape(logits.shape), alpha.reshape(rows_shape + (1,)), beta.reshape(rows_shape + (1,)))
        if need_temperature_grads:
            out += (row_grads.reshape(rows_shape + (2,)),)
        return out

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
def _xla_loss_rule(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, axis_name):
    """The XLA loss per row with its custom gradient (the logits' and the temperatures');
    ``axis_name``: the mesh axis sharding the classes (inside shard_map; the labels are then
    GLOBAL indices or this slice's dense labels), or None. Temperatures: 0-d or of the rows'
    shape."""
    # no gradient wanted: the forward skips the gradient's N x C residual
    return xla_forward_fn(num_iters, ignore_index, axis_name, False)(logits, labels, t1, t2, label_smoothing)[0]


def _xla_loss_fwd(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, axis_name):
    # the residual (R, alpha, beta) of native/loss.py when the logits are differentiated (one
    # elementwise backward), each row's temperature derivatives when a temperature is
    need_grad, need_temperature_grads = logits.perturbed, wants_temperature_grads(num_iters, t1, t2)
    loss, *out = xla_forward_fn(num_iters, ignore_index, axis_name, need_grad, need_temperature_grads)(
        logits.value, labels.value, t1.value, t2.value, label_smoothing.value)
    residual = tuple(out[:3]) if need_grad else None
    temperatures = (out[-1], temperature_like(t1), temperature_like(t2)) if need_temperature_grads else None
    return loss, (labels.value, label_smoothing.value, residual, jnp.zeros((0,), logits.value.dtype), temperatures)


def _xla_loss_bwd(num_iters, ignore_index, axis_name, residuals, grad_loss):
    labels, label_smoothing, residual, like, temperatures = residuals
    grad_logits = None
    if residual is not None:
        grad_logits = xla_backward_fn(ignore_index, axis_name)(labels, *residual, grad_loss, label_smoothing, like)
    return (grad_logits, None, *_temperature_cotangents(temperatures, grad_loss), None)


_xla_loss_rule.defvjp(_xla_loss_fwd, _xla_loss_bwd, symbolic_zeros=True)
xla_loss = jitted_rule(_xla_loss_rule, (5, 6, 7))


# --------------------------------------------------------------------------------------------
# The losses and probabilities of the public API
# --------------------------------------------------------------------------------------------

def _loss(logits, labels, t1, t2, label_smoothing, class_weight, sample_weight, num_iters, ignore_index, backend,
          reduction, axis):
    if backend == "triton":
        kernel = functools.partial(_triton_loss_fn, num_iters, ignore_index, axis)
        temperature_kernel = functools.partial(_triton_loss_fn, num_iters, ignore_index, axis,
                                               need_temperature_grads=True)
        loss = stored_gradient_loss(kernel, logits, labels, t1, t2, label_smoothing, axis, temperature_kernel)
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


def loss_rows(logits, labels, t1, t2, label_smoothing, row_weights, num_iters, ignore_index, backend,
              need_temperature_grads=False):
    """(per-row loss, ``row_weights`` [N] x dL/dlogits in the logits' dtype, or None when
    ``row_weights`` is None): the plain loss's forward and backward in one go, for a caller that
    already knows each row's upstream value (the fused linear head, per chunk). Temperatures: 0-d
    or [N]. With ``need_temperature_grads`` (static) a third output, each row's (dL/dt1, dL/dt2)
    [N, 2] for unit upstream gradient (0 on ignored rows), from the same solve."""
    need_grad = row_weights is not None
    like = jnp.zeros((0,), logits.dtype)
    grad = None
    if backend == "triton":
        out = _triton_loss_fn(num_iters, ignore_index, -1, need_grad, need_temperature_grads)(
            logits, labels, t1, t2, label_smoothing)
        loss, *rest = out if isinstance(out, tuple) else (out,)
        if need_grad:
            grad = scale_stored_gradient(rest[0], row_weights, like)
    else:
        loss, *rest = xla_forward_fn(num_iters, ignore_index, None, need_grad, need_temperature_grads)(
            logits, labels, t1, t2, label_smoothing)
        if need_grad:
            grad = xla_backward_fn(ignore_index, None)(labels, *rest[:3], row_weights, label_smoothing, like)
    return (loss, grad, rest[-1]) if need_temperature_grads else (loss, grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _softmax_rule(logits, t, num_iters, backend, axis_name, axis=-1):
    """Tempered softmax over the class axis ``axis`` (negative), in the logits' dtype;
    ``axis_name``: the mesh axis sharding the classes (XLA only, inside shard_map), or None.
    ``t``: 0-d or of the rows' shape (the logits' shape without ``axis``)."""
    return _softmax(logits, t, num_iters, backend, axis_name, axis, False)[0]


def _softmax(logits, t, num_iters, backend, axis_name, axis, keep_log):
    """(p in the logits' layout and dtype, the backward's residual): Triton's p; XLA's rows
    [..., C] (the classes moved last, a no-op for -1) in the compute dtype: p, or log p with
    ``keep_log`` (t's derivative: computed from log p, finite where p underflows)."""
    if backend == "triton":
        p = _triton_softmax_fn(num_iters, axis)(logits, t)
        return p, p
    a = jnp.moveaxis(logits, axis, -1).astype(t.dtype)
    log_p = native.tempered_log_softmax_rows(a, _rows_of(t), num_iters, native.rows_over(axis_name))
    p = jnp.exp(log_p)
    return jnp.moveaxis(p, -1, axis).astype(logits.dtype), (log_p if keep_log else p)


def _rows_of(t):
    """A temperature of rows [..., C]: 0-d as is, per row (the rows' shape) [..., 1]."""
    return t if t.ndim == 0 else t[..., None]


def _softmax_fwd(logits, t, num_iters, backend, axis_name, axis=-1):
    need_temperature_grad = wants_temperature_grads(num_iters, t)
    p, kept = _softmax(logits.value, t.value, num_iters, backend, axis_name, axis, need_temperature_grad)
    return p, (kept, t.value, temperature_like(t))


def _softmax_bwd(num_iters, backend, axis_name, axis, residuals, grad_p):
    kept, t, t_like = residuals  # kept: p, or log p (XLA, t differentiated)
    if backend == "triton":
        if t_like is None:
            return _triton_softmax_vjp_fn(axis)(kept, grad_p.astype(kept.dtype), t), None
        grad, row_grads = _triton_softmax_vjp_fn(axis, True)(kept, grad_p.astype(kept.dtype), t)
        return grad, temperature_cotangent(row_grads, t_like)
    grad_rows = jnp.moveaxis(grad_p, axis, -1).astype(kept.dtype)
    rows = native.rows_over(axis_name)
    if t_like is None:
        grad = native.tempered_softmax_vjp_rows(kept, grad_rows, _rows_of(t), rows)
        t_cotangent = None
    else:
        grad, row_grads = temperature.softmax_vjp_with_temperature(kept, grad_rows, _rows_of(t), rows)
        t_cotangent = temperature_cotangent(row_grads[..., 0], t_like)
    return jnp.moveaxis(grad, -1, axis).astype(grad_p.dtype), t_cotangent


_softmax_rule.defvjp(_softmax_fwd, _softmax_bwd, symbolic_zeros=True)
tempered_softmax = jitted_rule(_softmax_rule, (2, 3, 4, 5))


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
    need_temperature_grad = wants_temperature_grads(num_iters, t)
    x, t_value = x.value, t.value
    p = _triton_sigmoid_fn(num_iters)(x, t_value)
    # the binary kernels have no temperature variant: log p of the two-class rows [0, x] (a solve of
    # two classes per element) for t's derivative
    log_p = None
    if need_temperature_grad:
        a = x.astype(t_value.dtype)
        log_p = native.tempered_log_softmax_rows(_two_classes(a, jnp.zeros_like(a)), _rows_of(t_value), None)
    return p, (p, t_value, log_p, temperature_like(t))


def _sigmoid_triton_bwd(num_iters, residuals, grad_p):
    p, t, log_p, t_like = residuals
    grad = _triton_sigmoid_vjp_fn()(p, grad_p.astype(p.dtype), t)
    if t_like is None:
        return grad, None
    g = grad_p.astype(log_p.dtype)
    _, row_grads = temperature.softmax_vjp_with_temperature(log_p, _two_classes(g, jnp.zeros_like(g)), _rows_of(t))
    return grad, temperature_cotangent(row_grads[..., 0], t_like)


_sigmoid_triton.defvjp(_sigmoid_triton_fwd, _sigmoid_triton_bwd, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnums=(2, 3))
def sigmoid_jit(x, t, num_iters, backend):
    """Elementwise tempered sigmoid: the softmax of [0, x] (XLA) or the binary kernels (Triton);
    ``t``: 0-d or one per element (x's shape: the two-class rows' temperatures)."""
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
        temperature_kernel = functools.partial(_triton_binary_temperature_fn, num_iters)
        loss = stored_gradient_loss(kernel, x, y, t1, t2, label_smoothing, -1, temperature_kernel)
    else:
        y = y.astype(t1.dtype)
        loss = xla_loss(_two_classes(x, jnp.zeros_like(x)), _two_classes(y, 1.0 - y), t1, t2, label_smoothing,
                        num_iters, None, None)
    factors = reductions.row_factors(None, kept, None, sample_weight, loss.dtype)
    return reductions.reduce(jnp.where(kept, loss, 0.0), kept, reduction, factors)
