"""The JAX (XLA) loss as a forward that keeps one N x C residual and a one-pass backward.

``bindings/jax/native/math.py`` holds the math (solver, loss and gradient terms). The forward returns,
besides the per-row loss, R [N, C] and alpha, beta [N, 1] with

    dL/da = g (R alpha - y beta)

In the cross-entropy fast paths (t1 = t2 = 1, every row's label mass on classes with p > 0)
R = exp(a - max) (softmax's numerator, written out by the forward anyway, since an elementwise
exp written out and then summed is faster on XLA:CPU than exp fused into the row sum) with
alpha = (1 - ratio) / sum R, beta = 1: the backward is optax's, no second exp. Otherwise R is
the unit gradient (SPEC's closed form, exactly 0 where p is exactly 0), alpha = 1, beta = 0.
The backward is select-free and outside every ``lax.cond`` so that XLA writes the gradient over
R in place: the training step holds about 1.1x the logits beyond its inputs, gradient included,
at N = 4096, C = 50000 (``tests/test_jax_memory.py``). The tempered forward (and the exact
cross-entropy ones) run on blocks of rows of at most BLOCK_ELEMENTS elements, so their
temporaries stay a few blocks whatever N x C is. Without a gradient (``need_residual=False``) no
R is made.

At t1 = t2 = 1 a ``lax.cond`` takes cross-entropy branches: select-free fast paths (class indices:
optax's max shift with the gradient, the target logit as the shift without it; dense labels:
y log max(y, tiny)) with an exact branch as a run-time fallback decided from O(N) row values
(``_fast_path_ok``). Branches are chosen at run time from the traced temperatures: one compiled
program for every temperature value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from bitempered.bindings.jax.native import math as native


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


def _exact_gradient(a0, value):
    """An exact branch's unit gradient: ``value`` (p sum(y) - y, or its smoothed-index form), but
    exactly 0 where p is exactly 0 (a0 = -inf: SPEC's zero rule); NaN rows stay NaN."""
    return jnp.where(a0 == -jnp.inf, 0.0, value)


def forward(a, labels, t1, t2, num_iters, target=None, smoothing=None, dense_labels=None,
            need_residual=True):
    """Per-row loss [...] and the residual (R, alpha, beta) of :func:`backward`.

    ``a``: logits in the compute dtype [N, C] (rows flattened); ``labels(take)``: a function
    returning the smoothed dense labels of the rows ``take`` selects (``take`` slices the leading
    axis of the caller's per-row label arrays: every row, or one block), called inside each
    branch so that XLA fuses them (an elementwise expression, e.g. a one-hot comparison) instead
    of passing an N x C array into the ``lax.cond``. With class indices, ``target`` [N] and
    ``smoothing`` let the cross-entropy branch read the target logit by a gather from ``a``
    itself instead of reducing over ``y``. With dense labels, ``dense_labels`` (the caller's
    unsmoothed [N, C] labels, any float dtype) lets it read them directly when the smoothing is
    0 (the smoothing's affine map, on a traced value, costs ~10% there).

    The residual: R [N, C] and alpha, beta [N, 1] with dL/da = R alpha - y beta. In the
    cross-entropy fast paths (every row has its label mass on classes with p > 0), R = exp(a -
    max), alpha = (1 - ratio) / sum R, beta = 1; otherwise (the tempered branch and the exact
    cross-entropy fallback) R is the unit gradient itself, exactly 0 where p is exactly 0,
    alpha = 1, beta = 0. The backward is then one select-free elementwise pass outside any
    ``lax.cond``, which XLA writes in place over R: the training step holds about 1x the logits
    beyond its inputs, gradient included. ``need_residual=False`` (no gradient wanted) skips R.

    XLA:CPU notes (measured, jax 0.10): separate row sums, not a variadic reduce (several times
    slower); N x C values are built inside the branch that uses them (a ``lax.cond`` operand or
    closed-over N x C value is materialized); a compare or select inside a row sum's elementwise
    chain makes XLA write that chain out as an N x C buffer first (a pass of its own), and a
    select per element costs the backward ~10% against optax, so the cross-entropy fast paths
    below are select-free and leave the exact-zero rules of SPEC to a run-time fallback branch,
    taken when a row needs them (decided from O(N) row values); exp written out by an elementwise
    fusion and then summed is faster than exp fused into the row sum, and keeping it as R saves
    the backward a second exp.
    """
    num_rows, num_classes = a.shape
    ones = lambda like: jnp.ones_like(like)
    zeros = lambda like: jnp.zeros_like(like)

    def row_max():
        return jnp.max(a, axis=-1, keepdims=True)

    def by_blocks(block, shift):
        """``block(take)`` -> (loss, R or None, alpha, beta) over row blocks (see _by_row_blocks)."""
        like = (shift[..., 0],) + ((a,) if need_residual else ()) + (shift, shift)
        if need_residual:
            return _by_row_blocks(block, num_rows, num_classes, like)
        loss, alpha, beta = _by_row_blocks(lambda take: _drop_residual(block(take)), num_rows, num_classes, like)
        return loss, None, alpha, beta

    def dense_cross_entropy_block(take, shift):
        """(loss, R, alpha, beta) at t1 = t2 = 1 of the rows ``take`` selects, dense labels (exact)."""
        y = labels(take)
        a0 = native.shifted(take(a), take(shift))
        e = jnp.exp(a0)
        total = _row_sum(e)
        y_norm = jnp.log(total)  # the max of a0 is 0: the sum is >= 1
        # SPEC at t1 = 1: sum y log y - sum y log p - sum y + sum p, with sum p = 1;
        # 0 log 0 = 0 and 0 log p = 0 also where p = 0; the ratio counts p > 0 only
        y_log_y = _x_log_x(y)
        y_a0 = jnp.where(y > 0, y * a0, 0.0)
        y_positive = jnp.where(a0 > -jnp.inf, y, 0.0)
        cross, y_sum, y_finite = _row_sums(y_log_y - y_a0, y, y_positive)
        loss = (cross + y_norm * y_sum - y_sum + 1.0)[..., 0]
        if not need_residual:
            return loss, None, ones(total), ones(total)
        # dL/da = p - y - p ratio with ratio = sum d / sum p = 1 - y_finite (sum p = 1)
        return loss, _exact_gradient(a0, e * (y_finite / total) - y), ones(total), zeros(total)

    def dense_exact():  # its selects keep N x C temporaries: in blocks of rows, as tempered
        shift = row_max()
        return by_blocks(lambda take: dense_cross_entropy_block(take, shift), shift)

    def dense_fast(dense_y):
        """Labels ``dense_y()`` (every row). Select-free: max, sum y (log y - a0), sum y, then
        exp(a0) written out as R and summed; the exact branch's value wherever every a0 is
        finite. y log max(y, tiny) is y log y for y > 0 and 0 for y = 0 (log tiny is finite). A
        row with a -inf logit (0 * -inf or y * inf), a +inf max or a NaN has a non-finite
        sum y (log y - a0): then every row is computed by the exact branch instead (an O(N)
        predicate, decided before R is written: a cond branch returning a value computed outside
        it would copy it)."""
        shift = row_max()
        y = dense_y()
        tiny = jnp.finfo(a.dtype).tiny
        cross, y_sum = _row_sums(y * (jnp.log(jnp.maximum(y, tiny)) - (a - shift)), y)

        def fast():
            a0 = a - shift
            if need_residual:
                e = jnp.exp(a0)
                total = _row_sum(e)
            else:
                e, total = None, _row_sum(jnp.exp(a0))
            loss = (cross + jnp.log(total) * y_sum - y_sum + 1.0)[..., 0]
            return loss, e, y_sum / total, ones(total)

        return _cond_residual(_fast_path_ok(cross), fast, dense_exact)

    # a gather from a0 (a select) would materialize it: gather from a, shift the one value per row
    a_target = None if target is None else jnp.take_along_axis(a, target[..., None], axis=-1)
    if target is not None:  # outside the branches: scalars only
        off = smoothing / (num_classes - 1) if num_classes > 1 else jnp.where(smoothing == 0, 0.0, jnp.nan)
        on = 1.0 - smoothing
        labels_entropy = _x_log_x(on) + (num_classes - 1) * _x_log_x(off)
        smoothed = off > 0

    def off_target_sums(shifted_rows, like):
        """(sum a0, count of p > 0) per row, shaped ``like`` [rows, 1], for the label mass off the
        target (smoothing); zeros without smoothing (the usual case: the sums are skipped at run
        time)."""
        def sums():
            a0 = shifted_rows()  # built here: a closed-over N x C value would be materialized
            return _row_sums(a0, (a0 > -jnp.inf).astype(a.dtype))

        return lax.cond(smoothed, sums, lambda: (zeros(like),) * 2)

    def index_cross_entropy(y_norm, a0_target, sums):
        """(loss, ratio) of smoothed one-hot rows from Y, the target's a0 and off_target_sums."""
        shifted_sum, positive = sums
        log_p_target = a0_target - y_norm
        log_p_sum = shifted_sum - num_classes * y_norm
        # sum y log y - sum y log p of the smoothed one-hot row (sum y = sum p = 1 cancel)
        loss = labels_entropy - (on - off) * log_p_target - off * log_p_sum
        ratio = 1.0 - (on - off) * (a0_target > -jnp.inf) - off * positive
        return loss[..., 0], ratio

    def index_block(take):
        """(loss, R, 1, 0) of the rows ``take`` selects, class indices, max shift (exact)."""
        a_rows = take(a)
        shift = jnp.max(a_rows, axis=-1, keepdims=True)
        a0 = native.shifted(a_rows, shift)
        e = jnp.exp(a0)
        total = _row_sum(e)  # the max of a0 is 0: the sum is >= 1
        loss, ratio = index_cross_entropy(jnp.log(total), native.shifted(take(a_target), shift),
                                          off_target_sums(lambda: native.shifted(a_rows, shift), total))
        return loss, _exact_gradient(a0, e * ((1.0 - ratio) / total) - labels(take)), ones(total), zeros(total)

    def index_exact():
        if need_residual:  # R and its temporaries in blocks of rows (as tempered)
            like = zeros(a_target)
            return _by_row_blocks(index_block, num_rows, num_classes, (like[..., 0], a, like, like))
        shift = row_max()
        # the max of a0 is 0: the sum is >= 1. A finite max: a - max is the same value as the
        # select, which XLA:CPU would write out first
        total = lax.cond(jnp.all(jnp.isfinite(shift) | jnp.isnan(shift)), lambda: _row_sum(jnp.exp(a - shift)),
                         lambda: _row_sum(jnp.exp(native.shifted(a, shift))))
        loss, ratio = index_cross_entropy(jnp.log(total), native.shifted(a_target, shift),
                                          off_target_sums(lambda: native.shifted(a, shift), total))
        return loss, None, (1.0 - ratio) / total, ones(total)

    def index_fast():
        """Without the gradient: the target logit as the shift, no max. sum exp(a - a_target) >= 1
        (the target's own term), so it is finite exactly when the row is finite with every logit
        less than ~88 (float32) above its target's; any other row (a NaN, +-inf at the target or
        the max, a gap that overflows) sends every row to the exact branch (O(N) predicate). A
        -inf logit elsewhere is exact here: exp(-inf) = 0, and the smoothing sums see it."""
        total = _row_sum(jnp.exp(a - a_target))

        def fast():
            loss, ratio = index_cross_entropy(jnp.log(total), zeros(a_target),
                                              off_target_sums(lambda: a - a_target, total))
            return loss, None, (1.0 - ratio) / total, ones(total)

        return _cond_residual(_fast_path_ok(total), fast, index_exact)

    def index_fast_with_gradient():
        """optax's arithmetic: max, exp(a - max) written out as R, its row sum; select-free. It is
        the exact value when every row has its label mass on classes with p > 0: a finite max
        and target logit, and with smoothing no -inf logit (sum a0 finite, a pass taken only
        with smoothing). Otherwise (a NaN, +-inf at the max or the target, a -inf logit under
        smoothing) every row is computed by the exact branch (O(N) predicate)."""
        shift = row_max()
        a0_target = a_target - shift
        shifted_sum = lax.cond(smoothed, lambda: _row_sum(a - shift), lambda: zeros(shift))

        def fast():
            e = jnp.exp(a - shift)
            total = _row_sum(e)  # the max of a0 is 0: the sum is >= 1
            sums = (shifted_sum, jnp.full_like(total, num_classes))  # every p > 0
            loss, ratio = index_cross_entropy(jnp.log(total), a0_target, sums)
            return loss, e, (1.0 - ratio) / total, ones(total)

        return _cond_residual(_fast_path_ok(a0_target + shifted_sum), fast, index_exact)

    def cross_entropy(a):
        if target is None:
            if dense_labels is None:
                return dense_fast(lambda: labels(_all_rows))
            return _cond_residual(smoothing == 0, lambda: dense_fast(lambda: dense_labels.astype(a.dtype)),
                                  lambda: dense_fast(lambda: labels(_all_rows)))
        return index_fast_with_gradient() if need_residual else index_fast()

    def tempered_block(take, shift):
        """(loss, R = the unit gradient, 1, 0) of the rows ``take`` selects (all, or one block)."""
        a_rows, shift_rows, y = take(a), take(shift), labels(take)
        a0 = native.shifted(a_rows, shift_rows)
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
        two_minus_t1 = 2.0 - t1
        y_log_ratio = jnp.where(y > 0, y * (native.log_t(y, t1) - native.log_t_from_log(log_p, t1)), 0.0)
        power_gap = (y ** two_minus_t1 - jnp.exp(two_minus_t1 * log_p)) / two_minus_t1
        loss = jnp.sum(y_log_ratio - power_gap, axis=-1)
        one = jnp.ones_like(shift_rows)
        if not need_residual:
            return loss, None, one, one
        _, d, escort = _gradient_terms(log_p, y, t1, t2)
        ratio = _row_sum(d) / _row_sum(escort)
        return loss, d - escort * ratio, one, jnp.zeros_like(one)

    def tempered(a):
        # The solver's passes and the epilogue hold a few N x C temporaries (a0, p, ...): in
        # blocks of rows they stay a few BLOCK_ELEMENTS whatever N x C is (rows are independent).
        shift = row_max()
        return by_blocks(lambda take: tempered_block(take, shift), shift)

    loss, residual, alpha, beta = _cond_residual(_is_cross_entropy(t1, t2), lambda: cross_entropy(a),
                                                 lambda: tempered(a))
    return loss, (residual, alpha, beta)


def _drop_residual(values):
    loss, _, alpha, beta = values
    return loss, alpha, beta


def _cond_residual(predicate, true_fn, false_fn):
    """``lax.cond`` of branches returning (loss, R or None, alpha, beta)."""
    def strip(fn):
        def run():
            loss, residual, alpha, beta = fn()
            return (loss, alpha, beta) if residual is None else (loss, residual, alpha, beta)
        return run

    out = lax.cond(predicate, strip(true_fn), strip(false_fn))
    return out if len(out) == 4 else (out[0], None, out[1], out[2])


def _x_log_x(v):
    return jnp.where(v > 0, v * jnp.log(jnp.where(v > 0, v, 1.0)), 0.0)


def backward(residual, labels, upstream, mask_rows=lambda values: values):
    """upstream [..., 1] x dL/da [..., C] from the forward's residual (compute dtype): one
    select-free elementwise pass, g (R alpha - y beta).

    ``labels`` as in :func:`forward`; ``mask_rows`` sets ignored rows to 0 and invalid ones to NaN
    (fused with the gradient). Outside any ``lax.cond`` so that XLA writes it over R.
    """
    r, alpha, beta = residual
    return mask_rows(upstream * (r * alpha - labels(_all_rows) * beta))
