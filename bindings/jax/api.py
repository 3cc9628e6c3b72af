"""JAX API of bitempered: the public functions. Each checks its arguments (``args.py``) and makes
one call of a differentiable core (``ops.py``); the math is in ``native/``.

Classes are on ``axis`` (keyword, default the LAST axis, as ``jax.nn.softmax``; e.g. ``axis=1`` for
(N, C, H, W) logits), any number of other axes; the rows are the logits' entries with the class axis
removed, in row-major order, and per-row results have that shape. ``axis`` is static (an int: under
``jax.jit`` mark it static). Everything works under ``jax.jit``, ``jax.grad``/``jax.value_and_grad``
and ``jax.vmap``.

Temperatures and ``label_smoothing`` may be Python floats, 0-d arrays or traced values; the
temperatures may also be one per row: an array of the rows' shape (the logits' shape without the
class axis; the elementwise functions': the logits' shape). They are passed to the compiled
program as operands, never baked in as constants, so a new value never retraces or recompiles;
``num_iters``, ``ignore_index`` and ``reduction`` are static (a new value compiles anew).

Gradients flow to the logits and to the temperatures (learnable temperatures): ``jax.grad`` with
respect to t1, t2 (or t) is the exact derivative through the converged normalization
(docs/math.md "Temperature gradients"), computed in the forward pass from the same solve, and only
when a temperature is differentiated (otherwise it costs nothing); it is defined for
``num_iters=None`` only (differentiating a temperature with ``num_iters=k`` raises ValueError
naming ``num_iters``). The labels and the smoothing are constants for differentiation (zero;
``float0`` for integer labels). The loss weights (``weight=``, ``sample_weight=``) are operands too
(new values never recompile); they get a gradient only where one asks for it
(``jax.grad(..., argnums=...)``), and then the exact one.

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
(``bindings/jax/launchers.py`` is imported only when the Triton path is traced).
"""

from __future__ import annotations

import jax.numpy as jnp

from bitempered.bindings.common import validation as check
from bitempered.bindings.jax import args, ops, reductions
from bitempered.bindings.jax.native import math as native

__all__ = [
    "bi_tempered_binary_logistic_loss",
    "bi_tempered_logistic_loss",
    "tempered_sigmoid",
    "tempered_softmax",
]


def _probability_args(logits, t, num_iters, backend, rows_shape, rows_name):
    """Checked (t as an operand: 0-d or of ``rows_shape``, num_iters, backend) of
    tempered_softmax/sigmoid."""
    iters = args.as_num_iters(num_iters)
    backend = args.resolve_backend(backend, logits.dtype)
    t_ = args.temperature(t, "t", native.compute_dtype(logits.dtype), lambda value: check.check_t(value, "t"),
                          rows_shape, rows_name)
    return t_, iters, backend


def tempered_softmax(logits, t, num_iters=None, backend="auto", *, axis=-1):
    """SPEC's tempered softmax over the class axis ``axis``, returned in the logits' dtype.

    Args:
        logits: floating array with C >= 1 classes on ``axis`` (float16/bfloat16/float32 compute
            in float32, float64 in float64 when x64 is enabled).
        t: temperature, finite and > 0 (t < 1: finite support, t > 1: heavy tails, t = 1: the
            softmax). A float, a 0-d array, or one per row: an array of the logits' shape
            without ``axis``; traced values too. Concrete values are checked as given and as
            rounded to the compute dtype, traced ones are not checked. Differentiable (the exact
            derivative of the converged softmax; ``num_iters=None`` only).
        num_iters: None (default): solve the normalization to convergence. An int k >= 1: the
            original algorithm with exactly k steps (matches jax-bitempered-loss at the same k).
        backend: "auto" (default: Triton kernels via jax-triton on a CUDA GPU, XLA elsewhere),
            "xla" or "triton".
        axis: the class axis (keyword only; an int in [-ndim, ndim), default -1: the last axis),
            as ``jax.nn.softmax``. Static: a new value compiles anew.

    Returns:
        Probabilities of the logits' shape and dtype; each row (along ``axis``) sums to 1.
    """
    logits, axis = args.as_class_logits(logits, axis)
    t_, iters, backend = _probability_args(logits, t, num_iters, backend, check.without_axis(logits.shape, axis),
                                           args.ROWS_NAME)
    if logits.size == 0:
        return jnp.zeros(logits.shape, logits.dtype)
    return ops.softmax_jit(logits, t_, iters, backend, axis)


def tempered_sigmoid(logits, t, num_iters=None, backend="auto"):
    """Elementwise tempered sigmoid ``tempered_softmax([0, x], t)[1]``, in the logits' dtype.

    Args:
        logits: floating array of any shape (no class axis; a scalar too).
        t: temperature, finite and > 0: a float, a 0-d array, or one per element (an array of
            the logits' shape); traced values too (not checked). Differentiable, as in
            :func:`tempered_softmax`.
        num_iters: None (default: converged) or an int k >= 1 (the original algorithm's k steps).
        backend: "auto" (default), "xla" or "triton", as in :func:`tempered_softmax`.

    Returns:
        Probabilities in [0, 1] of the logits' shape and dtype.
    """
    logits = args.as_logits(logits, class_axis=False)
    t_, iters, backend = _probability_args(logits, t, num_iters, backend, logits.shape, "the logits' shape")
    if logits.size == 0:
        return jnp.zeros(logits.shape, logits.dtype)
    return ops.sigmoid_jit(logits, t_, iters, backend)


def bi_tempered_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None,
                              ignore_index=-100, backend="auto", reduction="none", *, weight=None, sample_weight=None,
                              axis=-1):
    """Bi-tempered logistic loss (Amid et al., 2019) over the class axis ``axis``, one value per row
    (like optax; with ``axis``, like ``torch.nn.functional.cross_entropy``'s class dimension).

    Args:
        logits: floating array with C >= 1 classes on ``axis``.
        labels: dense floating labels of the logits' shape (values in [0, 1]; rows need not sum to
            1; concrete values outside [0, 1] or NaN raise ValueError, traced ones are unchecked and
            give a meaningless or NaN loss), or integer class indices of the rows' shape (the
            logits' shape without ``axis``, e.g. (N, H, W) for (N, C, H, W) logits and ``axis=1``).
            Rows whose index equals ``ignore_index`` get loss 0 and gradient 0. Any other index
            outside [0, C) raises ValueError when the labels are concrete; traced labels give a NaN
            loss for that row.
        t1: 0 <= t1 < 2 (t1 < 1 bounds the loss). t2: finite and > 0 (t2 > 1: heavy tails, t2 < 1:
            finite support). Floats, 0-d arrays, or one per row: arrays of the rows' shape (the
            logits' shape without ``axis``); traced values too (a new value never recompiles).
            Concrete values are checked as given and as rounded to the compute dtype (float32
            rounds t1 = 1.99999999 to 2); another shape raises ValueError. Differentiable:
            ``jax.grad`` with respect to t1 and t2 is exact (the converged normalization's;
            ``num_iters=None`` only), each row's derivative times that row's weight and
            reduction factor.
        label_smoothing: in [0, 1) (default 0), reference convention (target 1 - s, every other
            class s/(C-1)); needs C >= 2 when > 0. May be traced.
        num_iters: None (converged, default) or the original algorithm's step count k >= 1 (static).
        ignore_index: int (static), default -100, or None: no row is ignored (every class index is
            a target; out-of-range indices follow the rule above).
        backend: "auto" (default: Triton kernels via jax-triton on a CUDA GPU, XLA elsewhere),
            "xla" or "triton".
        reduction: "none" (default: the per-row losses, like optax), "sum", or "mean" over the rows
            not ignored (NaN when every row is ignored), as the fused linear loss.
        weight: None (default) or the C per-class weights, a 1-D real array (keyword only;
            class-index labels only; dense labels raise ValueError, see below). Each row's loss and gradient are
            multiplied by ``weight[target]``; "mean" divides the weighted sum by the sum of
            ``weight[target]`` over the rows not ignored, exactly as
            ``torch.nn.functional.cross_entropy(weight=...)``. With ``label_smoothing`` the whole
            smoothed row term is multiplied by ``weight[target]`` (F.cross_entropy instead weights
            each smoothed class term by its own class's weight). Dense labels: each class term of
            this loss is a Bregman divergence D(y_i, p_i), but F.cross_entropy's per-class weighting
            of probability targets (sum_i w_i y_i log p_i) is minimized at p proportional to w * y,
            not at p = y, and weighting the Bregman terms instead would not equal it at t1 = t2 = 1:
            so ``weight`` with dense labels raises; ``sample_weight`` weights whole rows.
        sample_weight: None (default) or one weight per row, a real array of the rows' shape
            (the logits' shape without ``axis``; keyword only; Keras' ``sample_weight``);
            multiplies each row's loss and gradient (with ``weight``: by
            ``weight[target] * sample_weight``); "mean" is then sum(w L) / sum(w) over the rows
            not ignored.
            Weights are traced operands (new values never recompile) and constants for
            ``jax.grad`` of the logits; differentiated explicitly they get their exact gradient (the
            unweighted row losses through the reduction). Concrete weights must be finite and
            >= 0 (ValueError naming ``weight``/``sample_weight``); traced ones are not checked.
        axis: the class axis (keyword only; an int in [-ndim, ndim), default -1: the last axis).
            Static: a new value compiles anew.

    Returns:
        Losses of the rows' shape (the logits' shape without ``axis``; "none", weighted when
        weights are given) or a scalar
        ("sum", "mean"), float32 (float64 for float64 logits). The custom gradient (SPEC's closed
        form) flows to ``logits`` (and to the temperatures and the weights only when asked for)
        and has the logits' dtype.
    """
    logits, axis = args.as_class_logits(logits, axis)
    labels = args.as_labels(labels)
    indices = args.labels_are_indices(labels, logits.shape, axis)
    iters = args.as_num_iters(num_iters)
    ignore_index = args.as_ignore_index(ignore_index)
    check.check_reduction(reduction)
    backend = args.resolve_backend(backend, logits.dtype)
    dtype = native.compute_dtype(logits.dtype)
    num_classes, rows_shape = logits.shape[axis], check.without_axis(logits.shape, axis)
    t1_, t2_, s_, s_value = args.temperatures(t1, t2, label_smoothing, dtype, rows_shape)
    check.check_smoothing_classes(s_value, num_classes)
    args.check_labels(labels, indices, num_classes, ignore_index)
    weight = args.as_class_weight(weight, indices, num_classes)
    sample_weight = args.as_sample_weight(sample_weight, rows_shape)
    labels = jnp.asarray(labels)
    if logits.size == 0:
        return ops.weighted_reduce(jnp.zeros(rows_shape, dtype), labels, weight, sample_weight, ignore_index,
                                   reduction, axis)
    return ops.loss_jit(logits, labels, t1_, t2_, s_, weight, sample_weight, iters, ignore_index, backend, reduction,
                        axis)


def bi_tempered_binary_logistic_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None,
                                     backend="auto", ignore_index=None, reduction="none", *, sample_weight=None):
    """Binary bi-tempered loss, elementwise: the 2-class loss of logits [0, x], labels [1 - y, y].

    ``logits`` (floating) and ``labels`` (real, in [0, 1]) share one shape; the result has that
    shape ("none") or is a scalar ("sum", "mean"), float32 (float64 for float64 logits). Smoothing
    uses C = 2.

    Args:
        ignore_index: None (default: every element counts) or an int (static): elements whose
            label equals it (e.g. 255 or -100 in a segmentation mask) are skipped: loss 0, gradient
            exactly 0 (also for a NaN logit), and not counted by "mean". Those labels are exempt
            from the [0, 1] check.
        reduction: "none" (default: elementwise losses), "sum", or "mean" over the elements not
            ignored (NaN when every element is ignored).
        sample_weight: None (default) or one weight per element, a real array of the logits'
            shape (keyword only): each element's loss and gradient times it; "mean" is then
            sum(w L) / sum(w) over the elements not ignored. Traced, checked and differentiable as
            in :func:`bi_tempered_logistic_loss`.
        t1, t2, label_smoothing, num_iters, backend: as in :func:`bi_tempered_logistic_loss`; a
            per-row temperature here is one per element (an array of the logits' shape).
    """
    logits = args.as_logits(logits, class_axis=False)
    labels = args.as_labels(labels)
    check.check_binary_shapes(logits.shape, labels.shape)
    iters = args.as_num_iters(num_iters)
    ignore_index = args.as_ignore_index(ignore_index)
    check.check_reduction(reduction)
    backend = args.resolve_backend(backend, logits.dtype)
    dtype = native.compute_dtype(logits.dtype)
    t1_, t2_, s_, _ = args.temperatures(t1, t2, label_smoothing, dtype, logits.shape, "the logits' shape")
    args.check_dense_labels(labels, ignore_index)
    sample_weight = args.as_sample_weight(sample_weight, logits.shape, "logits' shape")
    labels = jnp.asarray(labels)
    if logits.size == 0:
        return reductions.reduce(jnp.zeros(logits.shape, dtype), jnp.ones(logits.shape, bool), reduction,
                                 None if sample_weight is None else sample_weight.astype(dtype))
    return ops.binary_loss_jit(logits, labels, t1_, t2_, s_, sample_weight, iters, backend, ignore_index, reduction)
