"""Fused linear + bi-tempered loss for JAX: the loss of ``hidden @ weight.T + bias`` without the
N x C logits (or their gradient) in memory.

It equals ``bi_tempered_logistic_loss(hidden @ weight.T + bias, labels, ...)`` up to rounding (per
row by default, like the plain JAX loss; ``reduction="sum"``/``"mean"`` reduce it). The rows are
padded to whole chunks and processed by a ``lax.scan``: per chunk one matmul for the logits (fp32
accumulation, rounded to the input dtype), the plain loss on it (``ops.loss_rows``: the XLA loss
of ``native/loss.py``, its forward and then its backward with each row's weight as the upstream
value (the reduction's factor times the row's ``class_weight[target] * sample_weight``), or the
Triton kernel through jax-triton), then ``grad_hidden[chunk] = dlogits @ weight``
and ``grad_weight += dlogits.T @ hidden[chunk]`` accumulated in fp32 (fp64 for fp64) in the
scan's carry. Peak extra memory: one chunk x C working set, the accumulators and O(N).

"sum"/"mean": the custom VJP's forward computes every gradient (no recomputation) and the backward
multiplies by the upstream scalar. "none": the forward computes the losses only and the backward
recomputes each chunk with each row's upstream value (exact for any upstream vector).

Learnable temperatures (0-d or one per row): where t1 or t2 is differentiated (the rule's
``symbolic_zeros``), the forward's chunks also return each row's (dL/dt1, dL/dt2) for unit
upstream gradient from the same solve ([N, 2] kept, on every reduction), and the backward
multiplies them by each row's upstream value, the factor the logits' gradient gets; nothing of
it is computed otherwise. The projection's gradients likewise only when hidden, weight or bias
is differentiated.

Default chunk size: ``bindings/common/linear_chunks.py`` (one fp32 chunk x C buffer within 64 MiB).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bitempered.bindings.common import linear_chunks
from bitempered.bindings.common import validation as check
from bitempered.bindings.jax import args, ops, reductions
from bitempered.bindings.jax.native import math as native


def _chunks(array, num_chunks: int, chunk: int, fill):
    """[N, ...] -> [num_chunks, chunk, ...], the tail padded with ``fill``."""
    pad = num_chunks * chunk - array.shape[0]
    padded = jnp.pad(array, [(0, pad)] + [(0, 0)] * (array.ndim - 1), constant_values=fill)
    return padded.reshape((num_chunks, chunk) + array.shape[1:])


def _chunked_temperature(t, num_chunks: int, chunk: int):
    """A temperature for the scan: None for a 0-d one (the body closes over it), per row [N] as
    [num_chunks, chunk] (the padded rows get 1, a valid temperature; their values are dropped)."""
    return None if t.ndim == 0 else _chunks(t, num_chunks, chunk, 1)


def _scan(hidden, weight, bias, labels, t1, t2, label_smoothing, row_weights, num_iters, ignore_index, chunk,
          backend, need_grad, need_temperature_grads=False):
    """(per-row losses [N], grad_hidden [N, H], grad_weight, grad_bias, each row's (dL/dt1, dL/dt2)
    [N, 2]) in one pass over the chunks.

    ``row_weights`` [N] is each row's upstream value (the reduction's factor or the upstream
    vector); grad_hidden comes back in ``ops.stored_grad_dtype``, grad_weight/grad_bias in the
    accumulation dtype; None where not computed. The temperatures are 0-d or [N]; their
    derivatives (``need_temperature_grads``) are for unit upstream gradient, from each chunk's
    solve.
    """
    num_rows, width = hidden.shape
    acc_dtype = native.compute_dtype(weight.dtype)
    stored_dtype = ops.stored_grad_dtype(hidden.dtype)
    num_chunks = -(-num_rows // chunk)
    valid = _chunks(jnp.ones((num_rows,), bool), num_chunks, chunk, False)
    xs = (_chunks(hidden, num_chunks, chunk, 0), _chunks(labels, num_chunks, chunk, 0), valid,
          _chunks(row_weights, num_chunks, chunk, 0) if need_grad else valid,
          _chunked_temperature(t1, num_chunks, chunk), _chunked_temperature(t2, num_chunks, chunk))

    def body(carry, chunk_xs):
        x, lab, ok, w, t1_rows, t2_rows = chunk_xs
        logits = jnp.matmul(x, weight.T, preferred_element_type=acc_dtype)
        if bias is not None:
            logits = logits + bias.astype(acc_dtype)
        logits = logits.astype(hidden.dtype)
        loss, d, *row_grads = ops.loss_rows(  # d: w x dL/dlogits, rounded once to the logits' dtype
            logits, lab, t1 if t1_rows is None else t1_rows, t2 if t2_rows is None else t2_rows, label_smoothing,
            w if need_grad else None, num_iters, ignore_index, backend, need_temperature_grads)
        loss = jnp.where(ok, loss, 0.0)
        row_grads = jnp.where(ok[:, None], row_grads[0], 0.0) if need_temperature_grads else None
        if not need_grad:
            return carry, (loss, None, row_grads)
        grad_weight, grad_bias = carry
        d = jnp.where(ok[:, None], d, 0.0)  # padded rows
        grad_x = jnp.matmul(d, weight, preferred_element_type=acc_dtype).astype(stored_dtype)
        grad_weight = grad_weight + jnp.matmul(d.T, x, preferred_element_type=acc_dtype)
        grad_bias = grad_bias + jnp.sum(d, axis=0, dtype=acc_dtype)
        return (grad_weight, grad_bias), (loss, grad_x, row_grads)

    carry = (jnp.zeros(weight.shape, acc_dtype), jnp.zeros(weight.shape[:1], acc_dtype)) if need_grad else ()
    carry, (loss, grad_x, row_grads) = lax.scan(body, carry, xs)
    loss = loss.reshape(-1)[:num_rows]
    if need_temperature_grads:
        row_grads = row_grads.reshape(-1, 2)[:num_rows]
    if not need_grad:
        return loss, None, None, None, row_grads
    return loss, grad_x.reshape(-1, width)[:num_rows], carry[0], carry[1], row_grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _linear_loss(hidden, weight, bias, labels, t1, t2, label_smoothing, factors, num_iters, ignore_index, reduction,
                 chunk, backend):
    """The reduced loss; ``factors``: each row's weight (``reductions.row_factors``), or None."""
    loss_rows = _scan(hidden, weight, bias, labels, t1, t2, label_smoothing, None, num_iters, ignore_index, chunk,
                      backend, False)[0]
    return reductions.reduce(loss_rows, reductions.kept_rows(labels, ignore_index), reduction, factors)


def _value(primal):
    """The value of a ``symbolic_zeros`` forward rule's argument (None stays None)."""
    return None if primal is None else primal.value


def _perturbed(primal) -> bool:
    return primal is not None and primal.perturbed


def _linear_loss_fwd(hidden, weight, bias, labels, t1, t2, label_smoothing, factors, num_iters, ignore_index,
                     reduction, chunk, backend):
    # symbolic zeros: the projection's gradients only when hidden, weight or bias is differentiated,
    # each row's temperature derivatives only when a temperature is (from the same chunks' solves)
    need_grad = any(map(_perturbed, (hidden, weight, bias)))
    need_temperature_grads = ops.wants_temperature_grads(num_iters, t1, t2)
    temperature_likes = (ops.temperature_like(t1), ops.temperature_like(t2))
    hidden, weight, bias, labels, t1, t2, label_smoothing, factors = map(
        _value, (hidden, weight, bias, labels, t1, t2, label_smoothing, factors))
    kept = reductions.kept_rows(labels, ignore_index)
    if reduction == "none" or not need_grad:
        # "none": the backward recomputes the chunks with each row's upstream value
        loss_rows, *_, row_grads = _scan(hidden, weight, bias, labels, t1, t2, label_smoothing, None, num_iters,
                                         ignore_index, chunk, backend, False, need_temperature_grads)
        residuals = (hidden, weight, bias, labels, t1, t2, label_smoothing) if need_grad else None
    else:
        residuals, loss_rows, row_grads = _forward_gradients(
            hidden, weight, bias, labels, t1, t2, label_smoothing, factors, kept, num_iters, ignore_index, reduction,
            chunk, backend, need_temperature_grads)
    temperatures = (row_grads, *temperature_likes) if need_temperature_grads else None
    return (reductions.reduce(loss_rows, kept, reduction, factors),
            (residuals, factors, kept, loss_rows, temperatures))


def _forward_gradients(hidden, weight, bias, labels, t1, t2, label_smoothing, factors, kept, num_iters, ignore_index,
                       reduction, chunk, backend, need_temperature_grads):
    """"sum"/"mean": (the gradients of hidden, weight and bias for unit upstream gradient and
    their dtypes, the per-row losses, each row's temperature derivatives or None) in one pass."""
    # float16 cannot hold the chunks' gradients x 1/N (ops.stored_grad_dtype): they keep only the
    # rows' weights, and "mean"'s factor multiplies the float32 results
    deferred = reduction == "mean" and ops.stored_grad_dtype(hidden.dtype) != hidden.dtype
    weights = reductions.row_weights(kept, "sum" if deferred else reduction, t1.dtype, factors)
    loss_rows, grad_x, grad_weight, grad_bias, row_grads = _scan(
        hidden, weight, bias, labels, t1, t2, label_smoothing, weights, num_iters, ignore_index, chunk, backend,
        True, need_temperature_grads)
    if deferred:
        factor = reductions.mean_factor(kept, t1.dtype, factors)
        grad_x, grad_weight, grad_bias = grad_x * factor, grad_weight * factor, grad_bias * factor
    like = (jnp.zeros((0,), hidden.dtype), jnp.zeros((0,), weight.dtype),
            None if bias is None else jnp.zeros((0,), bias.dtype))
    return (grad_x, grad_weight, grad_bias, like), loss_rows, row_grads


def _row_upstream(grad_loss, kept, reduction, factors, dtype):
    """Each row's upstream value [N]: the upstream vector x the rows' weights ("none"), or the
    upstream scalar x each row's factor on its gradient ("sum"/"mean": ``reductions.row_weights``);
    0 on the rows not kept."""
    if reduction == "none":
        return grad_loss if factors is None else grad_loss * factors
    return grad_loss * reductions.row_weights(kept, reduction, dtype, factors)


def _linear_loss_bwd(num_iters, ignore_index, reduction, chunk, backend, saved, grad_loss):
    residuals, factors, kept, loss_rows, temperatures = saved
    grad_x = grad_weight = grad_bias = None
    if residuals is not None and reduction == "none":
        hidden, weight, bias, labels, t1, t2, label_smoothing = residuals
        upstream = _row_upstream(grad_loss, kept, reduction, factors, t1.dtype)
        _, grad_x, grad_weight, grad_bias, _ = _scan(hidden, weight, bias, labels, t1, t2, label_smoothing,
                                                     upstream.astype(t1.dtype), num_iters, ignore_index, chunk,
                                                     backend, True)
        grad_x = grad_x.astype(hidden.dtype)
        like_weight, like_bias = weight, bias
    elif residuals is not None:
        grad_x, grad_weight, grad_bias, (like_hidden, like_weight, like_bias) = residuals
        grad_x = (grad_x * grad_loss.astype(grad_x.dtype)).astype(like_hidden.dtype)  # rounded once
        grad_weight, grad_bias = grad_weight * grad_loss, grad_bias * grad_loss
    if residuals is not None:
        grad_weight = grad_weight.astype(like_weight.dtype)
        grad_bias = None if like_bias is None else grad_bias.astype(like_bias.dtype)
    # The row weights' exact gradient: the reduction's, of the (unweighted) per-row losses, O(N).
    grad_factors = None if factors is None else jax.vjp(
        lambda f: reductions.reduce(loss_rows, kept, reduction, f), factors)[1](grad_loss)[0]
    grad_t1, grad_t2 = _temperature_cotangents(temperatures, grad_loss, kept, reduction, factors)
    # Labels and smoothing get no gradient.
    return grad_x, grad_weight, grad_bias, None, grad_t1, grad_t2, None, grad_factors


def _temperature_cotangents(temperatures, grad_loss, kept, reduction, factors):
    """(t1's cotangent, t2's): each row's upstream value (:func:`_row_upstream`, the factor its
    logits' gradient gets) x its derivatives, summed (0-d) or per row; (None, None) when no
    temperature is differentiated."""
    if temperatures is None:
        return None, None
    row_grads, t1_like, t2_like = temperatures
    upstream = _row_upstream(grad_loss, kept, reduction, factors, row_grads.dtype)
    return (ops.temperature_cotangent(row_grads[:, 0], t1_like, upstream),
            ops.temperature_cotangent(row_grads[:, 1], t2_like, upstream))


_linear_loss.defvjp(_linear_loss_fwd, _linear_loss_bwd, symbolic_zeros=True)


def _weighted_linear_loss(hidden, weight, bias, labels, t1, t2, label_smoothing, class_weight, sample_weight,
                          num_iters, ignore_index, reduction, chunk, backend):
    factors = reductions.row_factors(labels, reductions.kept_rows(labels, ignore_index), class_weight,
                                     sample_weight, t1.dtype)
    return _linear_loss(hidden, weight, bias, labels, t1, t2, label_smoothing, factors, num_iters, ignore_index,
                        reduction, chunk, backend)


_weighted_linear_loss_jit = jax.jit(_weighted_linear_loss, static_argnums=(9, 10, 11, 12, 13))


def _check_shapes(hidden, weight, bias) -> None:
    check.check_linear_shapes(hidden.shape, weight.shape)
    if jnp.dtype(hidden.dtype) != jnp.dtype(weight.dtype):
        raise TypeError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [C] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if jnp.dtype(bias.dtype) != jnp.dtype(weight.dtype):
            raise TypeError(f"bias must have the weight's dtype {weight.dtype}, got {bias.dtype}")


def linear_bi_tempered_logistic_loss(hidden, weight, labels, t1, t2, bias=None, label_smoothing=0.0,
                                     num_iters=None, ignore_index=-100, reduction="none", chunk_size=None,
                                     backend="auto", *, class_weight=None, sample_weight=None):
    """Bi-tempered loss of ``hidden @ weight.T + bias`` without materializing the logits.

    Equals ``bi_tempered_logistic_loss(hidden @ weight.T + bias, labels, t1, t2, ...,
    weight=class_weight, sample_weight=sample_weight)`` up to rounding (then summed / averaged over
    the non-ignored rows for ``reduction="sum"``/``"mean"``).

    Args:
        hidden: [..., H] floating array. weight: [C, H] (``nn.Linear`` layout), same dtype. bias: None or [C].
        labels: integer class indices of shape ``hidden.shape[:-1]`` or dense [..., C] labels
            (values in [0, 1]); concrete ones are checked as by :func:`bi_tempered_logistic_loss`.
        reduction: "none" (default: per-row losses of shape ``hidden.shape[:-1]``, like the plain
            JAX loss), "sum" or "mean" (every gradient computed in the forward pass: cheaper).
        chunk_size: rows per chunk (static); None: ``clamp(64 MiB // (4 C), 1, N)``.
        class_weight: None or the C per-class weights, a 1-D real array (keyword only): the plain loss's
            ``weight=`` (named ``class_weight`` here, where ``weight`` is the projection). Each
            row's loss and gradients are multiplied by ``class_weight[target]`` and "mean" divides
            by the sum of ``class_weight[target]`` over the rows not ignored (as
            ``F.cross_entropy(weight=...)``); with smoothing the whole smoothed row term is
            weighted; class-index labels only (see :func:`bi_tempered_logistic_loss`).
        sample_weight: None or one weight per row, shape ``hidden.shape[:-1]``: each row's loss and
            gradients times it (times ``class_weight[target]`` too when both are given); "mean" is
            sum(w L) / sum(w) over the rows not ignored. Each row's weight multiplies its upstream
            value in the chunks (no N x C buffer). Both weights: finite and >= 0 when concrete,
            traced operands (new values never recompile), exact gradients when differentiated.
        t1, t2: 0-d, or one per row (``hidden.shape[:-1]``), as in :func:`bi_tempered_logistic_loss`.
        label_smoothing, num_iters, ignore_index (an int or None), backend: as in
            :func:`bi_tempered_logistic_loss`.

    Gradients flow to hidden, weight and bias (grad_weight/grad_bias accumulated in fp32) and to
    t1 and t2 (exact, through the converged normalization: ``num_iters=None``), each computed only
    when differentiated.
    """
    hidden = args.as_floating(hidden, "hidden")
    weight = args.as_floating(weight, "weight")
    bias = None if bias is None else args.as_floating(bias, "bias")
    _check_shapes(hidden, weight, bias)
    num_classes = weight.shape[0]
    labels = args.as_labels(labels)
    indices = args.labels_are_indices(labels, tuple(hidden.shape[:-1]) + (num_classes,))
    check.check_reduction(reduction)
    iters = args.as_num_iters(num_iters)
    ignore_index = args.as_ignore_index(ignore_index)
    backend = args.resolve_backend(backend, hidden.dtype)
    t1_, t2_, s_, s_value = args.temperatures(t1, t2, label_smoothing, native.compute_dtype(hidden.dtype),
                                              hidden.shape[:-1], "hidden's shape without its last axis")
    check.check_smoothing_classes(s_value, num_classes)
    args.check_labels(labels, indices, num_classes, ignore_index)
    class_weight = args.as_class_weight(class_weight, indices, num_classes, "class_weight")
    sample_weight = args.as_sample_weight(sample_weight, hidden.shape[:-1])
    x = hidden.reshape(-1, hidden.shape[-1])
    label_rows = jnp.asarray(labels).reshape((-1,) if indices else (-1, num_classes))
    sample_rows = None if sample_weight is None else sample_weight.reshape(-1)
    chunk = linear_chunks.chunk_size(chunk_size, x.shape[0], num_classes)
    loss = _weighted_linear_loss_jit(x, weight, bias, label_rows, ops.flat_temperature(t1_),
                                     ops.flat_temperature(t2_), s_, class_weight, sample_rows, iters, ignore_index,
                                     reduction, chunk, backend)
    return loss.reshape(hidden.shape[:-1]) if reduction == "none" else loss
