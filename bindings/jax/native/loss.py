"""THE XLA loss of every JAX path: a forward that keeps one N x C residual and a one-pass backward.

The plain loss (``bindings/jax/ops.py``), the fused linear head (per chunk) and the vocab-parallel
loss (classes sharded over a mesh axis) all run :func:`forward` and :func:`backward`. Row
statistics are reduced through a ``rows`` object (``native/math.py``: ``LOCAL_ROWS``, or
``AxisRows`` over the mesh axis that shards the classes), so a sharded row takes the same
branches, blocks and passes on every device: every ``lax.cond`` predicate below is computed from
reduced (hence replicated) row values or from the temperatures. ``native/math.py`` holds the math
(solver, loss and gradient terms), ``native/temperature.py`` the temperatures' derivatives. The
forward returns, besides the per-row loss, the :class:`Residual` R [N, C] and alpha, beta [N, 1]
with

    dL/da = g (R alpha - y beta)

and, when asked (``need_temperature_grads``, static), each row's (dL/dt1, dL/dt2) [N, 2] for unit
upstream gradient, from the same solve (the tempered branch's terms; docs/math.md "Temperature
gradients"). Temperatures are 0-d, or per row [N, 1].

Three branches, chosen at run time from the traced temperatures (one compiled program for every
temperature value), each a module-level function:

- :func:`cross_entropy_indices` and :func:`cross_entropy_dense` (t1 = t2 = 1): select-free fast
  paths (class indices: optax's max shift with the gradient, the target logit as the shift without
  it; dense labels: y log max(y, tiny)) with an exact branch as a run-time fallback decided from
  O(N) row values (:func:`_fast_path_ok`). In the fast paths R = exp(a - max) (softmax's
  numerator, which the forward writes out anyway) with alpha = (1 - ratio) / sum R, beta = 1:
  the backward is optax's, no second exp.
- :func:`tempered`: R is the unit gradient (SPEC's closed form, exactly 0 where p is exactly 0),
  alpha = 1, beta = 0 (as in the exact cross-entropy fallbacks). It is also the only branch with
  the temperatures' derivatives: with ``need_temperature_grads`` it runs for every temperature
  (exact at t1 = t2 = 1 too), without the cross-entropy branches.

The backward is select-free and outside every ``lax.cond`` so that XLA writes the gradient over
R in place: the training step holds about 1.1x the logits beyond its inputs, gradient included,
at N = 4096, C = 50000 (``tests/test_jax_memory.py``). The tempered forward (and the exact
cross-entropy ones) run on blocks of rows of at most BLOCK_ELEMENTS elements, so their
temporaries stay a few blocks whatever N x C is. Without a gradient (``need_residual=False``,
decided once by the caller) no R is made.

The XLA:CPU notes below (measured, jax 0.10) sit next to the code they explain; the one that
shapes every branch: N x C values are built inside the branch that uses them (a ``lax.cond``
operand or a closed-over N x C value is materialized), hence the labels are a function of the
rows to take.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bitempered.bindings.jax.native import math as native
from bitempered.bindings.jax.native import temperature

BLOCK_ELEMENTS = 2**22  # elements per row block of the tempered forward: 16 MiB per fp32 temporary


class Residual(NamedTuple):
    """What the backward needs: dL/da = R alpha - y beta per row (R None without the gradient)."""
    r: jax.Array | None  # [N, C]
    alpha: jax.Array     # [N, 1]
    beta: jax.Array      # [N, 1]


class Labels(NamedTuple):
    """The labels as the loss reads them (rows flattened; this device's slice of the classes).

    ``smoothed(take)`` returns the smoothed dense labels [rows, C] of the rows ``take`` selects
    (``take`` slices the leading axis of any per-row array: every row, or one block). It is called
    inside each branch so that XLA fuses it (an elementwise expression, e.g. a one-hot
    comparison) instead of passing an N x C array into a ``lax.cond``.
    """
    smoothed: Callable[[Callable], jax.Array]
    smoothing: jax.Array     # label_smoothing (0-d)
    num_classes: int         # the GLOBAL class count (smoothing; the cross-entropy's class count)
    # class indices (else None): each row's target column in this slice (0 where it has none),
    # the rows whose target is in this slice (None: every row's, the classes are local), and the
    # kept rows (not ignore_index) and invalid ones (index outside [0, C): NaN rows)
    target: jax.Array | None = None
    target_here: jax.Array | None = None
    kept: jax.Array | None = None
    invalid: jax.Array | None = None
    # dense labels (else None): the caller's unsmoothed [N, C] labels, any float dtype, read
    # directly when the smoothing is 0 (the smoothing's affine map, on a traced value, costs ~10%)
    dense: jax.Array | None = None


def class_index_labels(indices, num_local: int, dtype, ignore_index: int, smoothing,
                       rows: native.LocalRows = native.LOCAL_ROWS) -> Labels:
    """:class:`Labels` of GLOBAL class indices [N] (32/64-bit) for rows of ``num_local`` classes.

    The one-hot rows are a comparison with ``arange``, so an out-of-range index never reads out
    of bounds: its row is all zero and flagged ``invalid``.
    """
    offset, num_classes = rows.class_slice(num_local)
    kept, invalid = native.kept_and_invalid(indices, ignore_index, num_classes)
    valid = kept & ~invalid
    if offset is None:
        local, here = indices, None
        target = jnp.where(valid, indices, 0)
    else:
        local = indices - offset.astype(indices.dtype)
        here = valid & (local >= 0) & (local < num_local)
        target = jnp.where(here, local, 0)

    def smoothed(take):  # arange built here, not closed over: a cond or loop operand is materialized
        onehot = (take(local)[..., None] == jnp.arange(num_local, dtype=local.dtype)).astype(dtype)
        return native.smooth_labels(onehot, smoothing, num_classes)

    return Labels(smoothed, smoothing, num_classes, target=target, target_here=here, kept=kept, invalid=invalid)


def dense_labels(labels, dtype, smoothing, rows: native.LocalRows = native.LOCAL_ROWS) -> Labels:
    """:class:`Labels` of dense labels [N, C] (this device's classes)."""
    num_classes = rows.class_slice(labels.shape[-1])[1]
    return Labels(lambda take: native.smooth_labels(take(labels).astype(dtype), smoothing, num_classes),
                  smoothing, num_classes, dense=labels)


def mask_rows(values, labels: Labels):
    """Ignored rows 0, invalid class indices NaN (per-row values, or [..., C] rows)."""
    if labels.kept is None:
        return values
    extra = (None,) * (values.ndim - labels.kept.ndim)
    kept, invalid = labels.kept[(...,) + extra], labels.invalid[(...,) + extra]
    return jnp.where(kept, jnp.where(invalid, jnp.nan, values), 0.0)


class _Inputs(NamedTuple):
    """The forward's inputs that every branch reads."""
    a: jax.Array           # logits [N, C] in the compute dtype (rows flattened)
    labels: Labels
    need_residual: bool    # static: whether to make R (a gradient is wanted)
    rows: native.LocalRows  # row reductions (across devices when the classes are sharded)
    need_temperature_grads: bool = False  # static: whether to make each row's (dL/dt1, dL/dt2)


def forward(a, labels: Labels, t1, t2, num_iters, need_residual=True, rows=native.LOCAL_ROWS,
            need_temperature_grads=False):
    """(per-row loss [N] (ignored rows 0, invalid ones NaN), the :class:`Residual` of
    :func:`backward`, each row's (dL/dt1, dL/dt2) [N, 2] or None); R is None with
    ``need_residual=False`` (no gradient of the logits wanted), the temperatures' derivatives
    (masked as the loss) are None unless ``need_temperature_grads`` (static).

    ``a``: logits in the compute dtype [N, C] (rows flattened; with ``rows`` sharding the
    classes, this device's slice); ``labels``: :class:`Labels`; t1, t2: temperatures, 0-d or
    per row [N, 1]; ``num_iters``: None (converged) or the original algorithm's step count
    (static; the temperatures' derivatives are defined for the converged normalization only:
    ValueError naming num_iters).
    """
    x = _Inputs(a, labels, need_residual, rows, need_temperature_grads)
    if need_temperature_grads:
        if num_iters is not None:
            raise ValueError(f"temperature gradients need the converged normalization (num_iters=None), "
                             f"got num_iters={num_iters}")
        loss, residual, temperature_grads = tempered(x, t1, t2, num_iters)
        return mask_rows(loss, labels), residual, mask_rows(temperature_grads, labels)
    cross_entropy = cross_entropy_indices if labels.target is not None else cross_entropy_dense
    loss, residual = lax.cond(_is_cross_entropy(t1, t2), lambda: cross_entropy(x),
                              lambda: tempered(x, t1, t2, num_iters)[:2])
    return mask_rows(loss, labels), residual, None


def backward(residual: Residual, labels: Labels, upstream):
    """upstream [..., 1] x dL/da [..., C] from the forward's residual (compute dtype): one
    select-free elementwise pass, g (R alpha - y beta), ignored rows 0 and invalid ones NaN
    (fused with it). Outside any ``lax.cond`` so that XLA writes it over R."""
    r, alpha, beta = residual
    return mask_rows(upstream * (r * alpha - labels.smoothed(_all_rows) * beta), labels)


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------

def _all_rows(x):
    return x


def _row_sums(rows, *xs):
    """Several row sums, each [..., 1], reduced across devices together by ``rows``. Separate
    reductions: XLA:CPU vectorizes those, while a variadic reduce ran several times slower
    (measured)."""
    return rows.sum(*(jnp.sum(x, axis=-1, keepdims=True) for x in xs))


def _row_max(a, rows):
    return rows.max(jnp.max(a, axis=-1, keepdims=True))


def _by_row_blocks(block, num_rows: int, num_classes: int, like):
    """``block(take)`` on blocks of rows, its per-row results put together.

    ``block`` gets ``take``, which selects its rows of any per-row array (leading axis = rows),
    and returns a pytree of per-row arrays shaped like ``like`` (with the rows taken; None leaves
    stay None). One call when the rows fit in BLOCK_ELEMENTS; otherwise a ``fori_loop`` over
    blocks of equal size, the last one moved back to end at the last row (its first rows are
    computed twice, with the same values). Sharded rows have the same shapes on every device:
    their blocks run in lockstep.
    """
    block_rows = max(1, BLOCK_ELEMENTS // max(num_classes, 1))
    if block_rows >= num_rows:
        return block(_all_rows)
    num_blocks = -(-num_rows // block_rows)

    def body(i, out):
        start = jnp.minimum(i * block_rows, num_rows - block_rows)
        values = block(lambda x: lax.dynamic_slice_in_dim(x, start, block_rows, 0))
        return jax.tree.map(lambda o, v: lax.dynamic_update_slice_in_dim(o, v, start, 0), out, values)

    # zeros_like: the outputs carry the data's varying mesh axes (shard_map, check_vma)
    return lax.fori_loop(0, num_blocks, body, jax.tree.map(jnp.zeros_like, like))


def _blocks(x: _Inputs, block, shift, with_temperature_grads=False):
    """(loss, Residual[, temperature grads [N, 2]]) of ``block(take)`` over row blocks; ``shift``
    [N, 1] shapes the per-row results."""
    like = (shift[..., 0], Residual(x.a if x.need_residual else None, shift, shift))
    if with_temperature_grads:
        like += (jnp.concatenate([shift, shift], axis=-1),)
    return _by_row_blocks(block, x.a.shape[0], x.a.shape[1], like)


def _fast_path_ok(row_values):
    """Whether a cross-entropy fast path's per-row values stand for every row (all finite): the
    run-time predicate of its exact fallback (tests/test_jax_cross_entropy.py forces it)."""
    return jnp.all(jnp.isfinite(row_values))


def _is_cross_entropy(t1, t2):
    return jnp.all((t1 == 1) & (t2 == 1))  # every row's, for per-row temperatures


def _exact_gradient(a0, value):
    """An exact branch's unit gradient: ``value`` (p sum(y) - y, or its smoothed-index form), but
    exactly 0 where p is exactly 0 (a0 = -inf: SPEC's zero rule); NaN rows stay NaN."""
    return jnp.where(a0 == -jnp.inf, 0.0, value)


def _x_log_x(v):
    return jnp.where(v > 0, v * jnp.log(jnp.where(v > 0, v, 1.0)), 0.0)


# --------------------------------------------------------------------------------------------
# t1 = t2 = 1. XLA:CPU: a compare or select inside a row sum's elementwise chain makes XLA write
# that chain out as an N x C buffer first (a pass of its own), and a select per element costs the
# backward ~10% against optax; so the fast paths are select-free and leave the exact-zero rules of
# SPEC to a run-time fallback branch, taken when a row needs them (decided from O(N) row values).
# Their exp(a - max) is written out (as R) and then summed: faster than exp fused into the row
# sum, and the backward needs no second exp.
# --------------------------------------------------------------------------------------------

# dense labels

def cross_entropy_dense(x: _Inputs):
    """(loss, Residual) at t1 = t2 = 1 of dense labels: the fast path on the caller's unsmoothed
    labels when the smoothing is 0, else on the smoothed ones."""
    labels = x.labels
    return lax.cond(labels.smoothing == 0, lambda: _dense_fast(x, lambda: labels.dense.astype(x.a.dtype)),
                    lambda: _dense_fast(x, lambda: labels.smoothed(_all_rows)))


def _dense_fast(x: _Inputs, dense_y):
    """Labels ``dense_y()`` (every row). Select-free: max, sum y (log y - a0), sum y, then exp(a0)
    written out as R and summed; the exact branch's value wherever every a0 is finite.
    y log max(y, tiny) is y log y for y > 0 and 0 for y = 0 (log tiny is finite). A row with a
    -inf logit (0 * -inf or y * inf), a +inf max or a NaN has a non-finite sum y (log y - a0):
    then every row is computed by the exact branch instead (an O(N) predicate, decided before R
    is written: a cond branch returning a value computed outside it would copy it)."""
    a = x.a
    shift = _row_max(a, x.rows)
    y = dense_y()
    tiny = jnp.finfo(a.dtype).tiny
    cross, y_sum = _row_sums(x.rows, y * (jnp.log(jnp.maximum(y, tiny)) - (a - shift)), y)

    def fast():
        e = jnp.exp(a - shift)  # fused into its row sum when R is not kept
        (total,) = _row_sums(x.rows, e)
        loss = (cross + jnp.log(total) * y_sum - y_sum + 1.0)[..., 0]
        return loss, Residual(e if x.need_residual else None, y_sum / total, jnp.ones_like(total))

    return lax.cond(_fast_path_ok(cross), fast, lambda: _dense_exact(x))


def _dense_exact(x: _Inputs):
    """The exact branch of dense labels; its selects keep N x C temporaries: in blocks of rows,
    as the tempered branch."""
    shift = _row_max(x.a, x.rows)
    return _blocks(x, lambda take: _dense_block(x, take, shift), shift)


def _dense_block(x: _Inputs, take, shift):
    """(loss, Residual) at t1 = t2 = 1 of the rows ``take`` selects, dense labels (exact)."""
    y = x.labels.smoothed(take)
    a0 = native.shifted(take(x.a), take(shift))
    e = jnp.exp(a0)
    # SPEC at t1 = 1: sum y log y - sum y log p - sum y + sum p, with sum p = 1;
    # 0 log 0 = 0 and 0 log p = 0 also where p = 0; the ratio counts p > 0 only
    y_log_y = _x_log_x(y)
    y_a0 = jnp.where(y > 0, y * a0, 0.0)
    y_positive = jnp.where(a0 > -jnp.inf, y, 0.0)
    total, cross, y_sum, y_finite = _row_sums(x.rows, e, y_log_y - y_a0, y, y_positive)
    y_norm = jnp.log(total)  # the max of a0 is 0: the sum is >= 1
    loss = (cross + y_norm * y_sum - y_sum + 1.0)[..., 0]
    one = jnp.ones_like(total)
    if not x.need_residual:
        return loss, Residual(None, one, one)
    # dL/da = p - y - p ratio with ratio = sum d / sum p = 1 - y_finite (sum p = 1)
    return loss, Residual(_exact_gradient(a0, e * (y_finite / total) - y), one, jnp.zeros_like(one))


# class indices

class _Target(NamedTuple):
    """Each row's target logit and the coefficients of its smoothed one-hot label."""
    logit: jax.Array      # [N, 1]
    on: jax.Array         # the target's label 1 - s
    off: jax.Array        # every other class's label s / (C - 1)
    entropy: jax.Array    # sum y log y of the smoothed one-hot row
    off_positive: jax.Array  # off > 0: the off-target sums are needed


def cross_entropy_indices(x: _Inputs):
    """(loss, Residual) at t1 = t2 = 1 of class indices: optax's max-shift fast path with the
    gradient, the target-logit shift without it; each falls back to the exact branch."""
    labels, num_classes = x.labels, x.labels.num_classes
    # a gather from a0 (a select) would materialize it: gather from a, shift the one value per row
    logit = jnp.take_along_axis(x.a, labels.target[..., None], axis=-1)
    if labels.target_here is not None:  # sharded classes: the target's slice has it
        (logit,) = x.rows.sum(jnp.where(labels.target_here[..., None], logit, 0.0))
    s = labels.smoothing  # outside the branches: scalars only
    off = s / (num_classes - 1) if num_classes > 1 else jnp.where(s == 0, 0.0, jnp.nan)
    on = 1.0 - s
    target = _Target(logit, on, off, _x_log_x(on) + (num_classes - 1) * _x_log_x(off), off > 0)
    return _index_fast_with_gradient(x, target) if x.need_residual else _index_fast(x, target)


def _index_loss(x: _Inputs, target: _Target, y_norm, a0_target, sums):
    """(loss, ratio) of smoothed one-hot rows from Y, the target's a0 and :func:`_off_target_sums`."""
    shifted_sum, positive = sums
    num_classes = x.labels.num_classes
    log_p_target = a0_target - y_norm
    log_p_sum = shifted_sum - num_classes * y_norm
    # sum y log y - sum y log p of the smoothed one-hot row (sum y = sum p = 1 cancel)
    loss = target.entropy - (target.on - target.off) * log_p_target - target.off * log_p_sum
    ratio = 1.0 - (target.on - target.off) * (a0_target > -jnp.inf) - target.off * positive
    return loss[..., 0], ratio


def _off_target_sums(x: _Inputs, target: _Target, shifted_rows, like):
    """(sum a0, count of p > 0) per row, shaped ``like`` [rows, 1], for the label mass off the
    target (smoothing); zeros without smoothing (the usual case: the sums are skipped at run
    time)."""
    def sums():
        a0 = shifted_rows()  # built here: a closed-over N x C value would be materialized
        return _row_sums(x.rows, a0, (a0 > -jnp.inf).astype(a0.dtype))

    return lax.cond(target.off_positive, sums, lambda: (jnp.zeros_like(like),) * 2)


def _index_fast(x: _Inputs, target: _Target):
    """Without the gradient: the target logit as the shift, no max. sum exp(a - a_target) >= 1
    (the target's own term), so it is finite exactly when the row is finite with every logit
    less than ~88 (float32) above its target's; any other row (a NaN, +-inf at the target or
    the max, a gap that overflows) sends every row to the exact branch (O(N) predicate). A
    -inf logit elsewhere is exact here: exp(-inf) = 0, and the smoothing sums see it."""
    a, logit = x.a, target.logit
    (total,) = _row_sums(x.rows, jnp.exp(a - logit))

    def fast():
        loss, ratio = _index_loss(x, target, jnp.log(total), jnp.zeros_like(logit),
                                  _off_target_sums(x, target, lambda: a - logit, total))
        return loss, Residual(None, (1.0 - ratio) / total, jnp.ones_like(total))

    return lax.cond(_fast_path_ok(total), fast, lambda: _index_exact(x, target))


def _index_fast_with_gradient(x: _Inputs, target: _Target):
    """optax's arithmetic: max, exp(a - max) written out as R, its row sum; select-free. It is
    the exact value when every row has its label mass on classes with p > 0: a finite max
    and target logit, and with smoothing no -inf logit (sum a0 finite, a pass taken only
    with smoothing). Otherwise (a NaN, +-inf at the max or the target, a -inf logit under
    smoothing) every row is computed by the exact branch (O(N) predicate)."""
    a = x.a
    shift = _row_max(a, x.rows)
    a0_target = target.logit - shift
    shifted_sum = lax.cond(target.off_positive, lambda: _row_sums(x.rows, a - shift)[0],
                           lambda: jnp.zeros_like(shift))

    def fast():
        e = jnp.exp(a - shift)
        (total,) = _row_sums(x.rows, e)  # the max of a0 is 0: the sum is >= 1
        sums = (shifted_sum, jnp.full_like(total, x.labels.num_classes))  # every p > 0
        loss, ratio = _index_loss(x, target, jnp.log(total), a0_target, sums)
        return loss, Residual(e, (1.0 - ratio) / total, jnp.ones_like(total))

    return lax.cond(_fast_path_ok(a0_target + shifted_sum), fast, lambda: _index_exact(x, target))


def _index_exact(x: _Inputs, target: _Target):
    """The exact branch of class indices: max shift, SPEC's zero rules."""
    if x.need_residual:  # R and its temporaries in blocks of rows (as tempered)
        return _blocks(x, lambda take: _index_block(x, target, take), jnp.zeros_like(target.logit))
    a = x.a
    shift = _row_max(a, x.rows)
    # the max of a0 is 0: the sum is >= 1. A finite max: a - max is the same value as the
    # select, which XLA:CPU would write out first
    (total,) = x.rows.sum(lax.cond(jnp.all(jnp.isfinite(shift) | jnp.isnan(shift)),
                                   lambda: jnp.sum(jnp.exp(a - shift), axis=-1, keepdims=True),
                                   lambda: jnp.sum(jnp.exp(native.shifted(a, shift)), axis=-1, keepdims=True)))
    loss, ratio = _index_loss(x, target, jnp.log(total), native.shifted(target.logit, shift),
                              _off_target_sums(x, target, lambda: native.shifted(a, shift), total))
    return loss, Residual(None, (1.0 - ratio) / total, jnp.ones_like(total))


def _index_block(x: _Inputs, target: _Target, take):
    """(loss, Residual(R, 1, 0)) of the rows ``take`` selects, class indices, max shift (exact)."""
    a_rows = take(x.a)
    shift = _row_max(a_rows, x.rows)
    a0 = native.shifted(a_rows, shift)
    e = jnp.exp(a0)
    (total,) = _row_sums(x.rows, e)  # the max of a0 is 0: the sum is >= 1
    loss, ratio = _index_loss(x, target, jnp.log(total), native.shifted(take(target.logit), shift),
                              _off_target_sums(x, target, lambda: native.shifted(a_rows, shift), total))
    gradient = _exact_gradient(a0, e * ((1.0 - ratio) / total) - x.labels.smoothed(take))
    return loss, Residual(gradient, jnp.ones_like(total), jnp.zeros_like(total))


# --------------------------------------------------------------------------------------------
# Tempered (any t1, t2)
# --------------------------------------------------------------------------------------------

def tempered(x: _Inputs, t1, t2, num_iters):
    """(loss, Residual(unit gradient, 1, 0), each row's (dL/dt1, dL/dt2) [N, 2] or None without
    ``need_temperature_grads``) for any temperatures. The solver's passes and the epilogue hold a
    few N x C temporaries (a0, p, ...): in blocks of rows they stay a few BLOCK_ELEMENTS whatever
    N x C is (rows are independent)."""
    shift = _row_max(x.a, x.rows)
    out = _blocks(x, lambda take: _tempered_block(x, take, shift, t1, t2, num_iters), shift,
                  x.need_temperature_grads)
    return out if x.need_temperature_grads else out + (None,)


def _take_rows(take, t):
    """A temperature's value for the rows ``take`` selects: 0-d as is, per row [N, 1] taken."""
    return t if jnp.ndim(t) == 0 else take(t)


def _tempered_block(x: _Inputs, take, shift, t1, t2, num_iters):
    """(loss, Residual[, (dL/dt1, dL/dt2) [rows, 2] with ``need_temperature_grads``]) of the rows
    ``take`` selects (all, or one block)."""
    rows = x.rows
    a_rows, shift_rows, y = take(x.a), take(shift), x.labels.smoothed(take)
    t1, t2 = _take_rows(take, t1), _take_rows(take, t2)
    a0 = native.shifted(a_rows, shift_rows)
    if num_iters is None:
        log_p, _ = native.solve_converged(a0, t2, rows)
    else:
        log_p = native.tempered_log_softmax_rows(a0, t2, num_iters, rows)
    two_minus_t1 = 2.0 - t1
    y_log_ratio = jnp.where(y > 0, y * (native.log_t(y, t1) - native.log_t_from_log(log_p, t1)), 0.0)
    power_gap = (y ** two_minus_t1 - jnp.exp(two_minus_t1 * log_p)) / two_minus_t1
    terms = y_log_ratio - power_gap
    one = jnp.ones_like(shift_rows)
    if not (x.need_residual or x.need_temperature_grads):
        (loss,) = _row_sums(rows, terms)
        return loss[..., 0], Residual(None, one, one)
    d, escort = _gradient_terms(log_p, y, t1, t2)
    if x.need_temperature_grads:  # one reduction for the loss's and the temperatures' row sums
        loss, d_sum, escort_sum, *temperature_sums = _row_sums(
            rows, terms, d, escort, *temperature.loss_temperature_terms(y, log_p, d, t1, t2))
    else:
        loss, d_sum, escort_sum = _row_sums(rows, terms, d, escort)
    residual = Residual(d - escort * (d_sum / escort_sum) if x.need_residual else None, one, jnp.zeros_like(one))
    if not x.need_temperature_grads:
        return loss[..., 0], residual
    return loss[..., 0], residual, temperature.combine_row_sums(*temperature_sums, d_sum, escort_sum)


def _gradient_terms(log_p, y, t1, t2):
    """(d, p^t2): d = (p - y) p^(t2 - t1), 0 only where p is exactly 0 (log p = -inf: outside the
    finite support, a -inf logit); an underflowed p keeps p^(t2 - t1) from its finite log p
    (SPEC "Zero versus underflow"). Where y = 0, d = p^(1 + t2 - t1) from log p: an underflowed p
    times an overflowing p^(t2 - t1) (t2 < t1) would be 0 x inf."""
    positive = log_p > -jnp.inf
    log_p_finite = jnp.where(positive, log_p, 0.0)
    labelled = y > 0
    # one exp: (p - y) p^(t2 - t1) where y > 0, 1 x p^(1 + t2 - t1) where y = 0
    factor = jnp.where(labelled, jnp.exp(log_p_finite) - y, 1.0)
    power = jnp.exp((t2 - t1 + jnp.where(labelled, 0.0, 1.0)) * log_p_finite)
    d = jnp.where(positive, factor * power, 0.0)
    return d, jnp.exp(t2 * log_p)
