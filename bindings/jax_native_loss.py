"""The JAX (XLA) loss as a forward that keeps per-row statistics and a backward that rebuilds the
gradient from them: no N x C residual.

``bindings/jax_native.py`` holds the math (solver, loss and gradient terms). Saving the gradient
of the forward as the residual (what the Triton path does) costs an N x C buffer written by the
forward and read by the backward, plus the product with the upstream gradient in another. Here
the forward keeps, per row, the shift ``max(a)``, the normalizer ``Y = -log p_max`` and
``ratio = sum(d) / sum(p^t2)``; the backward recomputes, elementwise and fused by XLA with the
upstream multiply,

    log p = log p(a - max(a); Y)  (the solver's own formula),   d = (p - y) p^(t2 - t1),
    dL/da = g (d - p^t2 ratio)

which is SPEC's closed form (e = p^t2 / sum p^t2). So ``jit(value_and_grad)`` holds the logits,
labels and the returned gradient, and O(N) besides, plus the forward's temporaries: the solver's
passes and the epilogue write a few N x C values on XLA:CPU (see ``jax_native``), so the tempered
forward (and the dense cross-entropy one) runs on blocks of rows of at most BLOCK_ELEMENTS
elements: at N = 4096, C = 50000 the training step holds 1.08x the logits beyond its inputs,
gradient included (``tests/test_jax_memory.py``), where one block for all rows held 4x.

At t1 = t2 = 1 (cross-entropy) a ``lax.cond`` takes a lean branch in both passes: a logsumexp
forward and ``g (p - y - p sum(d))`` backward, the same values as the tempered branch at t = 1.
Branches are chosen at run time from the traced temperatures: one compiled program for every
temperature value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import jax_native as native


def _row_sum(x):
    return jnp.sum(x, axis=-1, keepdims=True)


def _row_sums(*xs):
    """Several row sums, each [..., 1] (separate reductions: XLA:CPU vectorizes those, while a
    variadic reduce ran several times slower, measured)."""
    return tuple(_row_sum(x) for x in xs)


def _gradient_terms(log_p, y, t1, t2):
    """(p, d, p^t2): d = (p - y) p^(t2 - t1), 0 only where p is exactly 0 (log p = -inf)."""
    p = jnp.exp(log_p)
    positive = log_p > -jnp.inf
    d = jnp.where(positive, (p - y) * jnp.exp((t2 - t1) * jnp.where(positive, log_p, 0.0)), 0.0)
    return p, d, jnp.exp(t2 * log_p)


BLOCK_ELEMENTS = 2**22  # elements per row block of the tempered forward: 16 MiB per fp32 temporary


def _by_row_blocks(block, num_rows: int, num_classes: int, like):
    """``block(take)`` on blocks of rows, its per-row results put together.

    ``block`` gets ``take``, which selects its rows of any per-row array (leading axis = rows),
    and returns per-row arrays shaped like ``like`` (with the rows taken). One call when the rows
    fit in BLOCK_ELEMENTS; otherwise a ``fori_loop`` over blocks of equal size, the last one
    moved back to end at the last row (its first rows are computed twice, with the same values).
    """
    block_rows = max(1, BLOCK_ELEMENTS // max(num_classes, 1))
    if block_rows >= num_rows:
        return block(lambda x: x)
    num_blocks = -(-num_rows // block_rows)

    def body(i, out):
        start = jnp.minimum(i * block_rows, num_rows - block_rows)
        values = block(lambda x: lax.dynamic_slice_in_dim(x, start, block_rows, 0))
        return tuple(lax.dynamic_update_slice_in_dim(o, v, start, 0) for o, v in zip(out, values))

    # zeros_like: the outputs carry the data's varying mesh axes (shard_map, check_vma)
    return lax.fori_loop(0, num_blocks, body, tuple(jnp.zeros_like(x) for x in like))


def _all_rows(x):
    return x


def _fast_path_ok(row_values):
    """Whether a cross-entropy fast path's per-row values stand for every row (all finite): the
    run-time predicate of its exact fallback (tests/test_jax_cross_entropy.py forces it)."""
    return jnp.all(jnp.isfinite(row_values))


def _is_cross_entropy(t1, t2):
    return (t1 == 1) & (t2 == 1)


def forward(a, labels, t1, t2, num_iters, target=None, smoothing=None, dense_labels=None):
    """Per-row loss [...] and the residual row statistics (shift, Y, ratio), each [..., 1].

    ``a``: logits in the compute dtype [N, C] (rows flattened); ``labels(take)``: a function
    returning the smoothed dense labels of the rows ``take`` selects (``take`` slices the leading
    axis of the caller's per-row label arrays: every row, or one block), called inside each
    branch so that XLA fuses them (an elementwise expression, e.g. a one-hot comparison) instead
    of passing an N x C array into the ``lax.cond``. With class indices, ``target`` [N] and
    ``smoothing`` let the cross-entropy branch read the target logit by a gather from ``a``
    itself instead of reducing over ``y``. With dense labels, ``dense_labels`` (the caller's
    unsmoothed [N, C] labels, any float dtype) and ``smoothing`` let the cross-entropy branch read
    them directly when the smoothing is 0.

    The shift is any finite per-row value with p = exp(a - shift - Y) (the backward only needs
    that): the row max in general, the target logit in the class-index cross-entropy fast path.

    XLA:CPU notes (measured, jax 0.10): separate row sums, not a variadic reduce (several times
    slower); N x C values are built inside the branch that uses them (a ``lax.cond`` operand or
    closed-over N x C value is materialized); a compare or select inside a row sum's elementwise
    chain makes XLA write that chain out as an N x C buffer first (a pass of its own), so the
    cross-entropy fast paths below are select-free and leave the exact-zero rules of SPEC to a
    run-time fallback branch, taken when a row needs them (decided from O(N) row values).
    """
    def row_max():
        return jnp.max(a, axis=-1, keepdims=True)

    def shifted(x, shift):
        return jnp.where(x == shift, 0.0, x - shift)

    def dense_cross_entropy_block(take, shift):
        """(loss, Y, ratio) at t1 = t2 = 1 of the rows ``take`` selects, dense labels (exact)."""
        y = labels(take)
        a0 = jnp.where(take(a) == take(shift), 0.0, take(a) - take(shift))
        y_norm = jnp.log(_row_sum(jnp.exp(a0)))  # the max of a0 is 0: the sum is >= 1
        # SPEC at t1 = 1: sum y log y - sum y log p - sum y + sum p, with sum p = 1;
        # 0 log 0 = 0 and 0 log p = 0 also where p = 0; the ratio counts p > 0 only
        y_log_y = jnp.where(y > 0, y * jnp.log(jnp.where(y > 0, y, 1.0)), 0.0)
        y_a0 = jnp.where(y > 0, y * a0, 0.0)
        y_positive = jnp.where(a0 > -jnp.inf, y, 0.0)
        cross, y_sum, y_finite = _row_sums(y_log_y - y_a0, y, y_positive)
        loss = cross + y_norm * y_sum - y_sum + 1.0
        return loss[..., 0], y_norm, 1.0 - y_finite  # ratio = sum d / sum p, sum p = 1

    def dense_exact():  # its selects keep N x C temporaries: in blocks of rows, as tempered
        shift = row_max()
        return _by_row_blocks(lambda take: dense_cross_entropy_block(take, shift), a.shape[0], a.shape[-1],
                              (shift[..., 0], shift, shift)) + (shift,)

    def dense_fast():
        """Unsmoothed dense labels, select-free: five row passes (max, sum exp(a0), sum y,
        sum y (log y - a0); the backward), the exact branch's value wherever every a0 is finite.
        y log max(y, tiny) is y log y for y > 0 and 0 for y = 0 (log tiny is finite). A row with
        a -inf logit (0 * -inf or y * inf), a +inf max or a NaN gives a non-finite loss here:
        then every row is recomputed by the exact branch (the predicate is O(N))."""
        shift = row_max()
        y = dense_labels.astype(a.dtype)
        a0 = a - shift
        y_norm = jnp.log(_row_sum(jnp.exp(a0)))
        tiny = jnp.finfo(a.dtype).tiny
        cross, y_sum = _row_sums(y * (jnp.log(jnp.maximum(y, tiny)) - a0), y)
        loss = (cross + y_norm * y_sum - y_sum + 1.0)[..., 0]
        fast = (loss, y_norm, 1.0 - y_sum, shift)
        return lax.cond(_fast_path_ok(loss), lambda: fast, dense_exact)

    def index_cross_entropy(shift, y_norm, a0_target, shifted_rows):
        """(loss, Y, ratio) of smoothed one-hot rows from the shift, Y and the target's a0."""
        log_p_target = a0_target - y_norm

        def x_log_x(v):
            return jnp.where(v > 0, v * jnp.log(jnp.where(v > 0, v, 1.0)), 0.0)

        def off_target():  # label mass off the target (smoothing): sum log p, count of p > 0
            a0 = shifted_rows()  # recomputed here: a closed-over N x C value would be materialized
            log_p_sum, positive = _row_sums(a0, (a0 > -jnp.inf).astype(a.dtype))
            return log_p_sum - num_classes * y_norm, positive

        # without smoothing (the usual case) those two sums are skipped at run time
        log_p_sum, positive = lax.cond(off > 0, off_target, lambda: (jnp.zeros_like(y_norm),) * 2)
        # sum y log y - sum y log p of the smoothed one-hot row (sum y = sum p = 1 cancel)
        loss = x_log_x(on) + (num_classes - 1) * x_log_x(off) - (on - off) * log_p_target - off * log_p_sum
        ratio = 1.0 - (on - off) * (a0_target > -jnp.inf) - off * positive
        return loss[..., 0], y_norm, ratio, shift

    # a gather from a0 (a select) would materialize it: gather from a, shift the one value per row
    a_target = None if target is None else jnp.take_along_axis(a, target[..., None], axis=-1)
    num_classes = a.shape[-1]
    if target is not None:  # outside the branches (inside a vmapped cond a division by a Python
        # constant would mix varying and unvarying mesh axes under shard_map's check_vma)
        off = smoothing / (num_classes - 1) if num_classes > 1 else jnp.where(smoothing == 0, 0.0, jnp.nan)
        on = 1.0 - smoothing

    def index_exact():
        shift = row_max()

        def logsumexp_select():  # SPEC's limit for a row whose max is +-inf
            return jnp.log(_row_sum(jnp.exp(shifted(a, shift))))

        def logsumexp():  # finite maxima: a - max is the same value, without the select that
            return jnp.log(_row_sum(jnp.exp(a - shift)))  # would make XLA:CPU write a0 out

        # the max of a0 is 0: the sum is >= 1. (Under vmap the row predicate is batched and
        # both branches run: the same values, at the select's cost.)
        y_norm = lax.cond(jnp.all(jnp.isfinite(shift) | jnp.isnan(shift)), logsumexp, logsumexp_select)
        return index_cross_entropy(shift, y_norm, shifted(a_target, shift), lambda: shifted(a, shift))

    def index_fast():
        """The target logit as the shift: one row pass (no max). sum exp(a - a_target) >= 1
        (the target's own term), so it is finite exactly when the row is finite with every
        logit less than ~88 above its target's; any other row (a NaN, +-inf at the target or
        the max, a gap that overflows) sends every row to the exact branch (O(N) predicate).
        A -inf logit elsewhere is exact here: exp(-inf) = 0, and the smoothing sums see it."""
        total = _row_sum(jnp.exp(a - a_target))
        fast = lambda: index_cross_entropy(a_target, jnp.log(total), jnp.zeros_like(a_target),
                                           lambda: a - a_target)
        return lax.cond(_fast_path_ok(total), fast, index_exact)

    def cross_entropy(a):
        if target is None:
            if dense_labels is None:
                return dense_exact()
            return lax.cond(smoothing == 0, dense_fast, dense_exact)
        return index_fast()

    def tempered_block(take, shift):
        """(loss, Y, ratio) of the rows ``take`` selects (all of them, or one block)."""
        a_rows, shift_rows, y = take(a), take(shift), labels(take)
        a0 = native._shifted(a_rows, shift_rows)
        if num_iters is None:
            def softmax():  # t2 = 1: Y is the logsumexp, exact in one pass
                return jnp.log(_row_sum(jnp.exp(a0)))

            def newton():
                evaluate = native.local_evaluator(a0, t2)
                return native.solve_normalizers(evaluate, native.support_size(a0, t2), t2)[0]

            y_norm = lax.cond(t2 == 1, softmax, newton)
            log_p = native.log_p_at(a0, y_norm, t2)  # p_max = exp(-Y) sits at a0 = 0
        else:
            log_p = native.tempered_log_softmax_rows(a0, t2, num_iters)
            y_norm = -jnp.max(log_p, axis=-1, keepdims=True)  # p_max sits at a0 = 0
        two_minus_t1 = 2.0 - t1
        y_log_ratio = jnp.where(y > 0, y * (native.log_t(y, t1) - native.log_t_from_log(log_p, t1)), 0.0)
        power_gap = (y ** two_minus_t1 - jnp.exp(two_minus_t1 * log_p)) / two_minus_t1
        loss = jnp.sum(y_log_ratio - power_gap, axis=-1)
        _, d, escort = _gradient_terms(log_p, y, t1, t2)
        return loss, y_norm, _row_sum(d) / _row_sum(escort)

    def tempered(a):
        # The solver's passes and the epilogue hold a few N x C temporaries (a0, p, ...): in
        # blocks of rows they stay a few BLOCK_ELEMENTS whatever N x C is (rows are independent).
        shift = row_max()
        return _by_row_blocks(lambda take: tempered_block(take, shift), a.shape[0], a.shape[-1],
                              (shift[..., 0], shift, shift)) + (shift,)

    loss, y_norm, ratio, shift = lax.cond(_is_cross_entropy(t1, t2), cross_entropy, tempered, a)
    return loss, (shift, y_norm, ratio)


def backward(a, labels, stats, t1, t2, upstream, mask_rows=lambda values: values):
    """upstream [..., 1] x dL/da [..., C] from the forward's row statistics (compute dtype).

    ``labels`` as in :func:`forward`; ``mask_rows`` sets ignored rows to 0 and invalid ones to NaN
    (applied inside each branch, fused with the gradient: outside it would be one more N x C pass).
    """
    shift, y_norm, ratio = stats

    def shifted(a):  # inside each branch: a cond operand would be materialized
        return jnp.where(a == shift, 0.0, a - shift)

    def cross_entropy(a):
        y = labels(_all_rows)
        log_p = shifted(a) - y_norm
        p = jnp.exp(log_p)
        d = jnp.where(log_p > -jnp.inf, p - y, 0.0)
        return mask_rows(upstream * (d - p * ratio))

    def tempered(a):
        y = labels(_all_rows)
        log_p = native._log_p_at(shifted(a), y_norm, 1.0 - t2)[0]  # the solver's own formula
        _, d, escort = _gradient_terms(log_p, y, t1, t2)
        return mask_rows(upstream * (d - escort * ratio))

    return lax.cond(_is_cross_entropy(t1, t2), cross_entropy, tempered, a)
