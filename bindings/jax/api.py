"""JAX API of bitempered: validation, backend choice, custom VJPs. The math is in ``jax_native``.

Classes are the LAST axis; any number of leading axes. Everything works under ``jax.jit``,
``jax.grad``/``jax.value_and_grad`` and ``jax.vmap``.

Temperatures and ``label_smoothing`` may be Python floats, 0-d arrays or traced values. They are
passed to the compiled program as (0-d) operands, never baked in as constants, so a new value never
retraces or recompiles; ``num_iters`` and ``ignore_index`` are static (a new value compiles anew).
They are constants for differentiation: gradients flow to the logits only (zero for the labels,
temperatures and smoothing; ``float0`` for integer labels).

Validation: concrete values (Python/NumPy numbers and arrays, and JAX arrays outside a trace) are
checked and bad input raises ValueError/TypeError naming the argument. Traced values (inside
``jit``/``vmap``/``grad``) cannot be inspected without a host sync and are NOT checked: out-of-range
temperatures then give NaN or meaningless values, a dense/binary label outside [0, 1] a NaN or
meaningless loss for its row, and an out-of-range class index gives a NaN loss for its row (never
an out-of-bounds read). Checking a concrete JAX array reads it to the host.

Backends: ``"xla"`` runs the jnp implementation (XLA on CPU, GPU and TPU); ``"triton"`` runs the
fused kernels of ``kernels/`` through jax-triton (CUDA GPUs only; the same kernels PyTorch uses);
``"auto"`` picks Triton when the default JAX device is a GPU and jax-triton imports, XLA
otherwise, at trace time. Importing this module imports neither triton, jax_triton nor torch
(``bindings/jax/launchers.py`` is imported only when the Triton path is taken).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bitempered.bindings.jax.native import math as native
from bitempered.bindings.jax.native import loss as native_loss
from bitempered.bindings.common import validation as check

BACKENDS = ("auto", "xla", "triton")

__all__ = [
    "bi_tempered_binary_logistic_loss",
    "bi_tempered_logistic_loss",
    "tempered_sigmoid",
    "tempered_softmax",
]


# --------------------------------------------------------------------------------------------
# Argument handling (outside any compiled program)
# --------------------------------------------------------------------------------------------

def _jax_triton_available() -> bool:
    try:
        import jax_triton  # noqa: F401  (imported only here and in jax_kernels, never at module import)
    except Exception:  # ImportError, or jaxlib without GPU support failing inside jax_triton
        return False
    return True


def _resolve_backend(backend, dtype) -> str:
    """"xla" or "triton", decided at trace time from the default device's platform."""
    check.check_backend(backend, BACKENDS)
    on_gpu = jax.default_backend() == "gpu"
    if backend == "auto":
        use_kernels = on_gpu and jnp.dtype(dtype) != jnp.float64 and _jax_triton_available()
        return "triton" if use_kernels else "xla"
    if backend == "triton":
        if jnp.dtype(dtype) == jnp.float64:
            raise ValueError("backend='triton' computes in float32; float64 logits need backend='xla' or 'auto'")
        if not on_gpu:
            raise RuntimeError(f"backend='triton' needs a CUDA GPU (jax default backend: {jax.default_backend()})")
        if not _jax_triton_available():
            raise RuntimeError("backend='triton' needs the `jax-triton` package (pip install 'bitempered[jax-gpu]')")
    return backend


def _is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _scalar(value, name: str, dtype) -> tuple[jax.Array, float | None]:
    """(0-d operand in ``dtype``, its value if concrete else None) of a temperature-like argument."""
    concrete = check.concrete_float(value, name)  # TypeError for bool, str, None, complex
    if concrete is None:
        shape = getattr(value, "shape", None)
        value_dtype = getattr(value, "dtype", None)
        if shape is None or value_dtype is None:
            raise TypeError(f"{name} must be a real number or a 0-d array, got {type(value).__name__}")
        if int(np.prod(shape)) != 1:
            raise TypeError(f"{name} must be a scalar (0-d array), got shape {tuple(shape)}")
        if not (jnp.issubdtype(value_dtype, jnp.floating) or jnp.issubdtype(value_dtype, jnp.integer)):
            raise TypeError(f"{name} must be a real number, got an array of dtype {value_dtype}")
        if not _is_traced(value):
            concrete = float(np.asarray(value).reshape(()))
    return jnp.asarray(value, dtype=dtype).reshape(()), concrete


def _temperatures(t1, t2, label_smoothing, dtype):
    t1_, t1_value = _scalar(t1, "t1", dtype)
    check.check_t1(t1_value)
    t2_, t2_value = _scalar(t2, "t2", dtype)
    check.check_t(t2_value, "t2")
    s_, s_value = _scalar(label_smoothing, "label_smoothing", dtype)
    check.check_label_smoothing(s_value)
    return t1_, t2_, s_, s_value


def _as_logits(logits, class_axis: bool = True) -> jax.Array:
    if not hasattr(logits, "dtype"):
        logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be a floating array, got dtype {logits.dtype}")
    if class_axis:
        check.check_logits_shape(logits.shape)
    return jnp.asarray(logits)


def _as_labels(labels) -> jax.Array:
    if not hasattr(labels, "dtype"):
        labels = np.asarray(labels)
    if not (jnp.issubdtype(labels.dtype, jnp.floating) or jnp.issubdtype(labels.dtype, jnp.integer)):
        raise TypeError(f"labels must be floating (dense) or integer (class indices), got dtype {labels.dtype}")
    return labels


def _check_indices(labels, num_classes: int, ignore_index: int) -> None:
    """Raises on an out-of-range class index when the labels are concrete (traced: NaN rows)."""
    if _is_traced(labels):
        return
    indices = np.asarray(labels)
    bad = (indices != ignore_index) & ((indices < 0) | (indices >= num_classes))
    if bad.any():
        raise ValueError(
            f"labels (class indices) must be in [0, {num_classes}) or equal ignore_index={ignore_index}, "
            f"got {indices[bad].reshape(-1)[0]} ({int(bad.sum())} bad entries)")


def _widen_indices(indices: jax.Array) -> jax.Array:
    """Class indices as a fresh 32-bit (64-bit for 64-bit input) signed array, made by a scatter.

    Not a plain convert: XLA fuses a convert (ours, or one the caller wrote before passing the
    labels) into the [N, C] consumers, where broadcasting a 16-bit row value crashes XLA:CPU's LLVM
    backend ("Cannot select: v16i16 X86ISD::SUBV_BROADCAST_LOAD", jax 0.10.2 on AVX-512). XLA
    does not fuse a scatter into its consumers, so the one-hot rows read a materialized 32-bit
    array. The [N]-sized scatter costs nothing next to the [N, C] work.
    """
    dtype = jnp.int64 if jnp.dtype(indices.dtype).itemsize == 8 else jnp.int32
    flat = indices.reshape(-1)
    wide = jnp.zeros(flat.shape, dtype).at[jnp.arange(flat.size)].set(flat.astype(dtype))
    return wide.reshape(indices.shape)


def _num_iters(num_iters):
    check.check_num_iters(num_iters)
    return None if num_iters is None else int(num_iters)


# --------------------------------------------------------------------------------------------
# Differentiable cores (compiled once per shape/dtype/static config, every temperature value)
# --------------------------------------------------------------------------------------------

def _fold_batch(fn, num_arrays: int):
    """``custom_vmap`` of a row-wise kernel call: a vmapped call is the same call on more rows.

    ``fn`` takes ``num_arrays`` arrays with any leading axes, then 0-d scalars. Unbatched arrays
    are broadcast to the batch; per-example scalars (a vmapped temperature) fall back to one call
    per example (``lax.map``). Needed because jax-triton's ``triton_call`` has no batching rule, and
    by the XLA loss so that its run-time branches decide once for all rows.
    """
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):
        def full(arg, batched):
            return arg if batched else jnp.broadcast_to(arg, (axis_size,) + jnp.shape(arg))

        if any(in_batched[num_arrays:]):  # a per-example temperature: one call per example
            out = jax.lax.map(lambda xs: wrapped(*xs), tuple(map(full, args, in_batched)))
        else:  # calling `wrapped` (not `fn`) again keeps nested vmaps folding too
            arrays = tuple(map(full, args[:num_arrays], in_batched[:num_arrays]))
            out = wrapped(*arrays, *args[num_arrays:])
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


@functools.lru_cache(maxsize=None)
def _triton_loss_fn(num_iters, ignore_index, need_grad):
    def fn(logits, labels, t1, t2, label_smoothing):
        from bitempered.bindings.jax import launchers as jax_kernels

        num_classes = logits.shape[-1]
        indices = jnp.issubdtype(labels.dtype, jnp.integer)
        if indices:
            labels = labels.reshape(-1)
            labels = labels if labels.dtype in (jnp.int32, jnp.int64) else labels.astype(jnp.int32)
        else:
            labels = labels.reshape(-1, num_classes)
        loss, grad = jax_kernels.loss_rows(logits.reshape(-1, num_classes), labels, t1, t2, label_smoothing,
                                           num_iters, ignore_index, need_grad)
        loss = loss.reshape(logits.shape[:-1])
        return (loss, grad.reshape(logits.shape)) if need_grad else loss

    return _fold_batch(fn, 2)


@functools.lru_cache(maxsize=None)
def _triton_softmax_fn(num_iters):
    def fn(logits, t):
        from bitempered.bindings.jax import launchers as jax_kernels

        rows = logits.reshape(-1, logits.shape[-1])
        return jax_kernels.softmax_forward(rows, t, num_iters).reshape(logits.shape)

    return _fold_batch(fn, 1)


@functools.lru_cache(maxsize=None)
def _triton_softmax_vjp_fn():
    def fn(p, grad_p, t):
        from bitempered.bindings.jax import launchers as jax_kernels

        rows = p.reshape(-1, p.shape[-1])
        return jax_kernels.softmax_backward(rows, grad_p.reshape(rows.shape), t).reshape(p.shape)

    return _fold_batch(fn, 2)


def _log_softmax(logits, t, num_iters):
    return native.tempered_log_softmax_rows(logits.astype(t.dtype), t, num_iters)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _softmax(logits, t, num_iters, backend):
    return _softmax_fwd(logits, t, num_iters, backend)[0]


def _softmax_fwd(logits, t, num_iters, backend):
    if backend == "triton":
        p = _triton_softmax_fn(num_iters)(logits, t)
        return p, (p, t)
    p = jnp.exp(_log_softmax(logits, t, num_iters))
    return p.astype(logits.dtype), (p, t)


def _softmax_bwd(num_iters, backend, residuals, grad_p):
    p, t = residuals
    if backend == "triton":
        return _triton_softmax_vjp_fn()(p, grad_p.astype(p.dtype), t), None
    grad = native.tempered_softmax_vjp_rows(p, grad_p.astype(p.dtype), t)
    return grad.astype(grad_p.dtype), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)
_softmax_jit = jax.jit(_softmax, static_argnums=(2, 3))


def _loss_rows(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, need_grad, backend):
    """Per-row loss and (if asked) dL/dlogits for unit upstream gradient, both in the compute dtype."""
    if backend == "triton":
        out = _triton_loss_fn(num_iters, ignore_index, need_grad)(logits, labels, t1, t2, label_smoothing)
        return out if need_grad else (out, None)
    dtype = t1.dtype
    a = logits.astype(dtype)
    log_p = native.tempered_log_softmax_rows(a, t2, num_iters)
    indices = jnp.issubdtype(labels.dtype, jnp.integer)
    if indices:
        y, kept, invalid = native.dense_labels_from_indices(_widen_indices(labels), a.shape[-1], dtype,
                                                            ignore_index)
    else:
        y = labels.astype(dtype)
    y = native.smooth_labels(y, label_smoothing)
    loss, grad = native.loss_and_grad_rows(log_p, y, t1, t2, need_grad)
    if indices:
        loss = jnp.where(kept, jnp.where(invalid, jnp.nan, loss), 0.0)
        if need_grad:
            grad = jnp.where(kept[..., None], jnp.where(invalid[..., None], jnp.nan, grad), 0.0)
    return loss, grad


def _xla_labels(labels, dtype, num_classes, ignore_index, label_smoothing):
    """(function of ``take`` building the smoothed dense labels of the rows it selects, kept rows,
    invalid rows, indices) of dense labels [N, C] or class indices [N] (rows flattened). The
    one-hot rows are a comparison XLA fuses into their consumers (never an N x C array) as long as
    they are built where they are used: hence a function."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        indices = _widen_indices(labels)
        kept, invalid = native.kept_and_invalid(indices, ignore_index, num_classes)

        def dense(take):
            y = native.dense_labels_from_indices(take(indices), num_classes, dtype, ignore_index)[0]
            return native.smooth_labels(y, label_smoothing)

        return dense, kept, invalid, indices
    return (lambda take: native.smooth_labels(take(labels).astype(dtype), label_smoothing)), None, None, None


def _flat_rows(logits, labels):
    """Logits [N, C] and labels [N, C] or [N] with the leading axes flattened into rows."""
    num_classes = logits.shape[-1]
    indices = jnp.issubdtype(labels.dtype, jnp.integer)
    return logits.reshape(-1, num_classes), labels.reshape((-1,) if indices else (-1, num_classes))


def _mask_rows(values, kept, invalid):
    """Ignored rows 0, invalid class indices NaN (per-row values, or [..., C] rows)."""
    if kept is None:
        return values
    extra = (None,) * (values.ndim - kept.ndim)
    kept, invalid = kept[(...,) + extra], invalid[(...,) + extra]
    return jnp.where(kept, jnp.where(invalid, jnp.nan, values), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _loss(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, backend):
    if backend == "triton":
        return _loss_fwd(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, backend)[0]
    # no gradient wanted: the XLA forward skips the gradient's N x C residual
    return _xla_forward_fn(num_iters, ignore_index, False)(logits, labels, t1, t2, label_smoothing)[0]


def _loss_fwd(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, backend):
    if backend == "triton":
        loss, grad = _loss_rows(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, True, backend)
        # The unit gradient stays in the compute dtype; the zero-size array only carries the
        # logits' dtype to the backward rule, which rounds once to it.
        return loss, (grad, jnp.zeros((0,), logits.dtype))
    # XLA: the residual (R, alpha, beta) of bindings/jax/native/loss.py; one elementwise backward
    loss, *residual = _xla_forward_fn(num_iters, ignore_index, True)(logits, labels, t1, t2, label_smoothing)
    return loss, (labels, label_smoothing, tuple(residual), jnp.zeros((0,), logits.dtype))


@functools.lru_cache(maxsize=None)
def _xla_forward_fn(num_iters, ignore_index, need_residual):
    """(loss, R, alpha, beta) of the XLA loss (R shaped as the logits, alpha and beta [..., 1]),
    or (loss,) without the residual.

    Folded under vmap (``_fold_batch``): the run-time branches of ``jax_native_loss`` (the
    cross-entropy fast paths and their exact fallback) decide once for all the rows instead of
    per example, where a vmapped ``lax.cond`` would run both branches (and, inside shard_map,
    trip check_vma on a batched branch's constants)."""
    def fn(logits, labels, t1, t2, label_smoothing):
        rows_shape = logits.shape[:-1]
        a, flat_labels = _flat_rows(logits, labels)
        y, kept, invalid, indices = _xla_labels(flat_labels, t1.dtype, a.shape[-1], ignore_index, label_smoothing)
        target = None
        if kept is not None:  # class indices: the cross-entropy branch gathers the target logit
            target = jnp.where(kept & ~invalid, indices, 0)
        dense = None if kept is not None else flat_labels  # unsmoothed: the t = 1 fast path reads them
        loss, (residual, alpha, beta) = native_loss.forward(a.astype(t1.dtype), y, t1, t2, num_iters, target,
                                                            label_smoothing, dense, need_residual)
        loss = _mask_rows(loss, kept, invalid).reshape(rows_shape)
        if not need_residual:
            return (loss,)
        return (loss, residual.reshape(logits.shape), alpha.reshape(rows_shape + (1,)),
                beta.reshape(rows_shape + (1,)))

    return _fold_batch(fn, 2)


@functools.lru_cache(maxsize=None)
def _xla_backward_fn(ignore_index):
    """dL/dlogits (the dtype of ``like``, a zero-size array) from the residual and the upstream
    [...] (folded under vmap as :func:`_xla_forward_fn`)."""
    def fn(labels, residual, alpha, beta, grad_loss, label_smoothing, like):
        num_classes = residual.shape[-1]
        flat_labels = labels.reshape((-1,) if jnp.issubdtype(labels.dtype, jnp.integer) else (-1, num_classes))
        y, kept, invalid, _ = _xla_labels(flat_labels, residual.dtype, num_classes, ignore_index, label_smoothing)
        upstream = grad_loss.reshape(-1, 1).astype(residual.dtype)
        flat = (residual.reshape(-1, num_classes), alpha.reshape(-1, 1), beta.reshape(-1, 1))
        grad = native_loss.backward(flat, y, upstream, lambda values: _mask_rows(values, kept, invalid))
        return grad.astype(like.dtype).reshape(residual.shape)

    return _fold_batch(fn, 5)


def _loss_bwd(num_iters, ignore_index, backend, residuals, grad_loss):
    if backend == "triton":
        grad, like_logits = residuals
        grad_logits = (grad_loss[..., None].astype(grad.dtype) * grad).astype(like_logits.dtype)
    else:
        labels, label_smoothing, residual, like = residuals
        grad_logits = _xla_backward_fn(ignore_index)(labels, *residual, grad_loss, label_smoothing, like)
    # Labels, temperatures and smoothing get no gradient (None: zeros, float0 for integer labels).
    return grad_logits, None, None, None, None


_loss.defvjp(_loss_fwd, _loss_bwd)
_loss_jit = jax.jit(_loss, static_argnums=(5, 6, 7))


def _two_classes(x, first):
    """[..., 2] rows [first, x] of the binary problem (logits [0, x], labels [1 - y, y])."""
    return jnp.stack([first, x], axis=-1)


@functools.lru_cache(maxsize=None)
def _triton_binary_fn(num_iters, need_grad):
    def fn(x, y, t1, t2, label_smoothing):
        from bitempered.bindings.jax import launchers as jax_kernels

        loss, grad = jax_kernels.binary_loss(x.reshape(-1), y.reshape(-1).astype(jnp.float32), t1, t2,
                                             label_smoothing, num_iters, need_grad)
        return (loss.reshape(x.shape), grad.reshape(x.shape)) if need_grad else loss.reshape(x.shape)

    return _fold_batch(fn, 2)


@functools.lru_cache(maxsize=None)
def _triton_sigmoid_fn(num_iters):
    def fn(x, t):
        from bitempered.bindings.jax import launchers as jax_kernels

        return jax_kernels.sigmoid_forward(x.reshape(-1), t, num_iters).reshape(x.shape)

    return _fold_batch(fn, 1)


@functools.lru_cache(maxsize=None)
def _triton_sigmoid_vjp_fn():
    def fn(p, grad_p, t):
        from bitempered.bindings.jax import launchers as jax_kernels

        return jax_kernels.sigmoid_backward(p.reshape(-1), grad_p.reshape(-1), t).reshape(p.shape)

    return _fold_batch(fn, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _binary_loss_triton(x, y, t1, t2, label_smoothing, num_iters):
    return _triton_binary_fn(num_iters, False)(x, y, t1, t2, label_smoothing)


def _binary_loss_triton_fwd(x, y, t1, t2, label_smoothing, num_iters):
    loss, grad = _triton_binary_fn(num_iters, True)(x, y, t1, t2, label_smoothing)
    return loss, (grad, jnp.zeros((0,), x.dtype))


def _binary_loss_triton_bwd(num_iters, residuals, grad_loss):
    grad, like_x = residuals
    return (grad_loss.astype(grad.dtype) * grad).astype(like_x.dtype), None, None, None, None


_binary_loss_triton.defvjp(_binary_loss_triton_fwd, _binary_loss_triton_bwd)


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
def _sigmoid_jit(x, t, num_iters, backend):
    if backend == "triton":
        return _sigmoid_triton(x, t, num_iters)
    return _softmax(_two_classes(x, jnp.zeros_like(x)), t, num_iters, backend)[..., 1]


@functools.partial(jax.jit, static_argnums=(5, 6))
def _binary_loss_jit(x, y, t1, t2, label_smoothing, num_iters, backend):
    if backend == "triton":
        return _binary_loss_triton(x, y, t1, t2, label_smoothing, num_iters)
    y = y.astype(t1.dtype)
    return _loss(_two_classes(x, jnp.zeros_like(x)), _two_classes(y, 1.0 - y), t1, t2, label_smoothing,
                 num_iters, -100, backend)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _probability_args(logits, t, num_iters, backend, class_axis: bool):
    """Checked (logits, t as a 0-d operand, num_iters, backend) of tempered_softmax/sigmoid."""
    logits = _as_logits(logits, class_axis=class_axis)
    iters = _num_iters(num_iters)
    backend = _resolve_backend(backend, logits.dtype)
    t_, t_value = _scalar(t, "t", native.compute_dtype(logits.dtype))
    check.check_t(t_value, "t")
    return logits, t_, iters, backend


def tempered_softmax(logits, t, num_iters=None, backend="auto"):
    """SPEC's tempered softmax over the last axis, returned in the logits' dtype.

    Args:
        logits: [..., C] floating array (float16/bfloat16/float32 compute in float32, float64 in
            float64 when x64 is enabled).
        t: temperature > 0 (float, 0-d array or traced value; traced values are not checked).
        num_iters: None (default): solve the normalization to convergence. An int k >= 1: the
            original algorithm with exactly k steps (matches jax-bitempered-loss at the same k).
        backend: "auto" (Triton kernels via jax-triton on a CUDA GPU, XLA elsewhere), "xla", "triton".
    """
    logits, t_, iters, backend = _probability_args(logits, t, num_iters, backend, class_axis=True)
    if logits.size == 0:
        return jnp.zeros(logits.shape, logits.dtype)
    return _softmax_jit(logits, t_, iters, backend)


def tempered_sigmoid(logits, t, num_iters=None, backend="auto"):
    """Elementwise tempered sigmoid ``tempered_softmax([0, x], t)[1]``, in the logits' dtype.

    ``logits`` may have any shape (no class axis); see :func:`tempered_softmax` for the rest.
    """
    logits, t_, iters, backend = _probability_args(logits, t, num_iters, backend, class_axis=False)
    if logits.size == 0:
        return jnp.zeros(logits.shape, logits.dtype)
    return _sigmoid_jit(logits, t_, iters, backend)


def _check_dense_labels(labels) -> None:
    """Dense/binary labels are SPEC's values in [0, 1] when concrete (traced: unchecked)."""
    if _is_traced(labels):
        return
    values = np.asarray(labels)
    if values.size:
        has_nan = bool(np.isnan(values).any())
        low, high = (0.0, 1.0) if has_nan else (float(values.min()), float(values.max()))
        check.check_dense_label_range(low, high, has_nan, "labels")


def bi_tempered_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None,
                              ignore_index=-100, backend="auto"):
    """Bi-tempered logistic loss (Amid et al., 2019) over the last axis, one value per row (like optax).

    Args:
        logits: [..., C] floating array.
        labels: dense floating labels of the logits' shape (values in [0, 1]; rows need not sum to
            1; concrete values outside [0, 1] or NaN raise ValueError, traced ones are unchecked and
            give a meaningless or NaN loss), or integer class indices of shape ``logits.shape[:-1]``. Rows whose index equals
            ``ignore_index`` get loss 0 and gradient 0. Any other index outside [0, C) raises
            ValueError when the labels are concrete; traced labels give a NaN loss for that row.
        t1: 0 <= t1 < 2 (t1 < 1 bounds the loss). t2: > 0 (t2 > 1: heavy tails, t2 < 1: finite
            support). Floats, 0-d arrays or traced values (a new value never recompiles).
        label_smoothing: in [0, 1), reference convention (target 1 - s, every other class
            s/(C-1)); needs C >= 2 when > 0. May be traced.
        num_iters: None (converged, default) or the original algorithm's step count (static).
        ignore_index: int (static).
        backend: "auto" (Triton kernels via jax-triton on a CUDA GPU, XLA elsewhere), "xla", "triton".

    Returns:
        Losses of shape ``logits.shape[:-1]``, float32 (float64 for float64 logits). The custom
        gradient (SPEC's closed form) flows to ``logits`` only and has the logits' dtype.
    """
    logits = _as_logits(logits)
    labels = _as_labels(labels)
    indices = check.labels_are_indices(logits.shape, labels.shape, jnp.issubdtype(labels.dtype, jnp.integer))
    iters = _num_iters(num_iters)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    ignore_index = int(ignore_index)
    backend = _resolve_backend(backend, logits.dtype)
    dtype = native.compute_dtype(logits.dtype)
    t1_, t2_, s_, s_value = _temperatures(t1, t2, label_smoothing, dtype)
    check.check_smoothing_classes(s_value, logits.shape[-1])
    if indices:
        _check_indices(labels, logits.shape[-1], ignore_index)
    else:
        _check_dense_labels(labels)
    if logits.size == 0:
        return jnp.zeros(logits.shape[:-1], dtype)
    return _loss_jit(logits, jnp.asarray(labels), t1_, t2_, s_, iters, ignore_index, backend)


def bi_tempered_binary_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None,
                                     backend="auto"):
    """Binary bi-tempered loss, elementwise: the 2-class loss of logits [0, x], labels [1 - y, y].

    ``logits`` (floating) and ``labels`` (real, in [0, 1]) share one shape; the result has that
    shape (float32, float64 for float64 logits). Smoothing uses C = 2. See
    :func:`bi_tempered_logistic_loss` for the other arguments.
    """
    logits = _as_logits(logits, class_axis=False)
    labels = _as_labels(labels)
    check.check_binary_shapes(logits.shape, labels.shape)
    iters = _num_iters(num_iters)
    backend = _resolve_backend(backend, logits.dtype)
    dtype = native.compute_dtype(logits.dtype)
    t1_, t2_, s_, _ = _temperatures(t1, t2, label_smoothing, dtype)
    _check_dense_labels(labels)
    if logits.size == 0:
        return jnp.zeros(logits.shape, dtype)
    return _binary_loss_jit(logits, jnp.asarray(labels), t1_, t2_, s_, iters, backend)
