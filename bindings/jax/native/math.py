"""JAX native backend: SPEC computed with plain jnp/lax ops (XLA; no Triton).

It is the CPU/TPU backend, the float64 backend, and the oracle a JAX Triton path will be tested
against. It mirrors ``bindings/torch/native/math.py``'s solver and terms. Functions here take rows
``[..., C]`` (classes on the last axis, any leading shape) in the compute dtype and temperatures of
the same dtype, either 0-d or per row (``[..., 1]``, broadcasting against the rows), and return
plain arrays; ``jax.custom_vjp`` lives in ``bindings/jax/ops.py``, the loss with its residual in
``native/loss.py`` and the temperatures' derivatives in ``native/temperature.py``. The solver is
the one described in ``kernels/README.md``.

Temperatures are always traced values here: nothing branches on them in Python. The ``t = 1``
limits are taken with ``jnp.where`` (elementwise), run-time branches test every row (the softmax
shortcut when all rows have t = 1, the support count when any has t < 1) and the ``num_iters=k``
algorithm picks its method per row at run time, so one compiled program serves every temperature.

The converged solver is one loop, :func:`solve_normalizers`, driven by an evaluation callback
``evaluate(y) -> (f, g)`` (rows in memory: :func:`local_evaluator`; sharded classes: the same
callback with ``rows`` reducing across devices; a kernel can drive it the same way).

XLA:CPU notes (measured, jax 0.10.2): row sums become YNNPACK fusions; a compare or select in
the elementwise chain of a row sum, or any N x C value (a broadcast too) shared by two row sums,
is written out as an N x C buffer first. A loop-invariant N x C expression inside a
``while_loop`` body (``a - max``) is hoisted out of the loop and materialized, and an
``optimization_barrier`` does not keep two equal chains apart (it is removed before the last
CSE). So the N x C temporaries of a solve are bounded by the caller: ``native/loss.py`` runs it
on blocks of rows. Work inside a ``lax.cond`` branch is as parallel as outside it (measured).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# the solvers' safety cap, one for every backend (the measured worst case on SPEC's grid is 8)
from bitempered.kernels.launch_config import MAX_PASSES


class LocalRows:
    """Row reductions across devices: the identity for rows that hold every class.

    The solver and the loss (``native/loss.py``) reduce each row statistic (the max, the support
    size, the packed per-pass sums, the loss's row sums) through such an object; the
    vocab-parallel loss passes :class:`AxisRows`, which runs ``pmax``/``psum`` over the mesh axis
    that shards the classes, so the solver and the loss stay one.
    """

    def max(self, x):  # row maxima [..., 1]
        return x

    def sum(self, *parts):  # per-row partial sums [..., 1] each, reduced together
        return parts

    def class_slice(self, num_local: int):
        """(first global class of these rows' classes or None for 0, global class count)."""
        return None, num_local


LOCAL_ROWS = LocalRows()


class AxisRows(LocalRows):
    """Row reductions over the mesh axis (or axes) ``axis_name`` that shard the classes (inside
    ``shard_map``; device i of the axis holds classes [i C_local, (i + 1) C_local))."""

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

    def class_slice(self, num_local: int):
        return lax.axis_index(self.axis_name) * num_local, num_local * lax.axis_size(self.axis_name)


def rows_over(axis_name) -> LocalRows:
    """The row reductions of classes sharded over ``axis_name`` (None: every class local)."""
    return LOCAL_ROWS if axis_name is None else AxisRows(axis_name)


def compute_dtype(dtype) -> jnp.dtype:
    """float64 for float64 inputs (x64 enabled), float32 for float16/bfloat16/float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def tolerance(dtype) -> float:
    return 1e-6 if jnp.dtype(dtype) == jnp.float32 else 8 * float(jnp.finfo(dtype).eps)


def shifted(a: jax.Array, shift: jax.Array) -> jax.Array:
    """a - shift per row; where a equals its shift (a +inf logit of a row whose max is +inf) 0,
    the limit, not NaN."""
    return jnp.where(a == shift, jnp.zeros_like(a), a - shift)


def shift_by_max(a: jax.Array, rows: LocalRows = LOCAL_ROWS) -> jax.Array:
    """a - max(a) per row; a +inf logit maps to 0 and the other classes to -inf (the limit)."""
    return shifted(a, rows.max(jnp.max(a, axis=-1, keepdims=True)))


def safe_reciprocal(one_minus_t: jax.Array) -> jax.Array:
    """1 / (1 - t), finite at t = 1 (where every caller selects the t = 1 limit instead)."""
    return 1.0 / jnp.where(one_minus_t == 0, 1.0, one_minus_t)


def _log1p_over(z: jax.Array, one_minus_t: jax.Array, u: jax.Array) -> jax.Array:
    """log1p(z) / (1 - t), with its t = 1 limit ``u`` (z = (1-t) u / c -> 0 there)."""
    tempered = jnp.log1p(jnp.maximum(z, -1.0)) * safe_reciprocal(one_minus_t)
    return jnp.where(one_minus_t == 0, u, tempered)


def exp_t(u: jax.Array, t: jax.Array) -> jax.Array:
    """exp_t(u) = [1 + (1-t) u]_+^(1/(1-t)), accurate near t = 1."""
    return jnp.exp(log_exp_t(u, t))


def log_exp_t(u: jax.Array, t: jax.Array) -> jax.Array:
    """log exp_t(u) = log1p((1-t) u) / (1-t) (u at t = 1; -inf outside the support), finite where
    exp_t(u) underflows."""
    one_minus_t = 1.0 - t
    return _log1p_over(one_minus_t * u, one_minus_t, u)


def log_t(x: jax.Array, t: jax.Array) -> jax.Array:
    """log_t(x) = (x^(1-t) - 1) / (1-t), accurate near t = 1."""
    return log_t_from_log(jnp.log(x), t)


def log_t_from_log(log_x: jax.Array, t: jax.Array) -> jax.Array:
    one_minus_t = 1.0 - t
    tempered = jnp.expm1(one_minus_t * log_x) * safe_reciprocal(one_minus_t)
    return jnp.where(one_minus_t == 0, log_x, tempered)


def _log_p_at(a0: jax.Array, y: jax.Array, one_minus_t: jax.Array):
    """(log p, z) at y: log p_i = -y + log1p(z_i) / (1-t), z_i = max((1-t) a0_i / c, -1)."""
    scale = one_minus_t * jnp.exp(one_minus_t * y)  # (1 - t) / c, one value per row
    z = jnp.maximum(a0 * scale, -1.0)
    return -y + _log1p_over(z, one_minus_t, a0), z


def _evaluate(a0: jax.Array, y: jax.Array, one_minus_t: jax.Array):
    """One solver pass at y: (log p, f = sum p, g = sum p / (1 + z))."""
    log_p, z = _log_p_at(a0, y, one_minus_t)
    p = jnp.exp(log_p)
    base = 1.0 + z
    positive = base > 0  # False where p = 0 (t < 1) and for the 0 * -inf of a -inf logit at t = 1
    f = jnp.sum(p, axis=-1, keepdims=True)
    g = jnp.sum(jnp.where(positive, p / jnp.where(positive, base, 1.0), 0.0), axis=-1, keepdims=True)
    return log_p, f, g


def support_size(a0: jax.Array, t: jax.Array) -> jax.Array:
    """This device's D of kernels/README.md per row [..., 1]: the classes that can have p > 0 for
    t < 1 (one pass over the rows, only run when some row has t < 1), the class count for t >= 1."""
    every_class = jnp.full_like(a0[..., :1], a0.shape[-1])

    def count():
        one_minus_t = 1.0 - t
        inside = jnp.sum(a0 > -safe_reciprocal(one_minus_t), axis=-1, keepdims=True, dtype=jnp.int32)
        return jnp.where(one_minus_t > 0, inside.astype(a0.dtype), every_class)

    return lax.cond(jnp.any(t < 1), count, lambda: every_class)


def solve_normalizers(evaluate, support: jax.Array, t: jax.Array, rows: LocalRows = LOCAL_ROWS):
    """THE converged solver of every JAX path: y = -log p_max per row, and the passes it took.

    The safeguarded Newton iteration of kernels/README.md on per-row scalars, in a
    ``lax.while_loop`` that stops as soon as every row is done (or after MAX_PASSES passes),
    driven by an evaluation callback, so the rows can live anywhere (in memory as here, sharded
    over devices, or behind a kernel):

        ``evaluate(y) -> (f, g)``: this device's partial row sums f = sum p and
        g = sum p / (1 + z) at ``y`` [..., 1] (the formulas of kernels/README.md), each [..., 1].
        It is called inside the loop body: what it computes from the logits there is recomputed
        each pass (fused by XLA) instead of being carried as an N x C loop operand.
    ``support`` [..., 1]: this device's D (:func:`support_size`); ``rows`` reduces it once and
    (f, g) once per pass across devices (classes sharded), so every device takes the same steps.
    ``t``: the temperature, 0-d or per row [..., 1]. At t = 1 the iteration is exact in two passes (the first Newton
    step on log f lands on the logsumexp); callers with the rows in memory take the one-pass
    logsumexp instead; the vocab-parallel kernels (no branch on a traced t) rely on this, their
    passes at t = 1 closed-form from one read of each slice's max and sum-exp.

    Returns (y, passes), each [..., 1] (passes int32): each row's y at its last evaluation (the y
    its log p is taken at). Finished rows keep their y, so evaluating them again changes nothing.
    Every constant below is made ``*_like`` a row statistic so that it has the data's varying
    mesh axes: inside ``shard_map`` (check_vma) the loop carry must agree on them.
    """
    dtype = support.dtype
    one_minus_t = 1.0 - t
    (support,) = rows.sum(support)
    tol = tolerance(dtype)
    ulp4 = 4 * float(jnp.finfo(dtype).eps)

    def cond(state):
        step, done = state[0], state[4]
        return (step < MAX_PASSES) & ~jnp.all(done)

    def body(state):
        step, y, lo, hi, done, lo_evaluated, passes, _ = state
        f, g = rows.sum(*evaluate(y))
        y_evaluated = y
        passes = passes + (~done).astype(jnp.int32)
        r = f - 1.0
        done = done | (jnp.abs(r) <= tol) | ~jnp.isfinite(r)  # a NaN row stays NaN
        log_f, f_over_g = jnp.log(f), f / g
        above = r > 0
        # Newton on f^(1-t) in c: from a point with f > 1 it never passes the root (convexity).
        y_safe = y - _log1p_over(f_over_g * jnp.expm1(-one_minus_t * log_f), one_minus_t, -f_over_g * log_f)
        lo = jnp.where(above, jnp.minimum(jnp.maximum(jnp.maximum(lo, y), y_safe), hi), lo)
        lo_evaluated = jnp.where(above, y_safe <= y, lo_evaluated)
        hi = jnp.where(above, hi, jnp.minimum(hi, y))
        y_newton = y + log_f * f_over_g  # Newton on log f in y: fast, but may leave the bracket
        inside = (y_newton > lo) & (y_newton < hi)
        y_new = jnp.where(inside, y_newton, jnp.where(lo_evaluated, 0.5 * (lo + hi), lo))
        done = done | (jnp.abs(y_new - y) <= ulp4 * jnp.maximum(jnp.abs(y), 1.0))
        y = jnp.where(done, y, y_new)
        return step + 1, y, lo, hi, done, lo_evaluated, passes, y_evaluated

    lo = jnp.zeros_like(support)
    false = jnp.zeros_like(support, dtype=bool)
    state = (jnp.int32(0), lo, lo, jnp.log(jnp.maximum(support, 1.0)), false, false,
             jnp.zeros_like(support, jnp.int32), lo)
    state = lax.while_loop(cond, body, state)
    return state[7], state[6]


def local_evaluator(a0: jax.Array, t: jax.Array):
    """``evaluate(y) -> (f, g)`` of :func:`solve_normalizers` for max-shifted rows ``a0`` [..., C]
    in memory: two separate row sums (a variadic reduce is several times slower on XLA:CPU)."""
    one_minus_t = 1.0 - t

    def evaluate(y):
        _, f, g = _evaluate(a0, y, one_minus_t)
        return f, g

    return evaluate


def log_p_at(a0: jax.Array, y: jax.Array, t: jax.Array) -> jax.Array:
    """log p of max-shifted rows ``a0`` at the solved ``y`` (the solver's own formula)."""
    return _log_p_at(a0, y, 1.0 - t)[0]


def solve_converged(a0: jax.Array, t: jax.Array, rows: LocalRows = LOCAL_ROWS):
    """Converged log-probabilities for max-shifted rows ``a0`` [..., C]; returns (log_p, passes).

    :func:`solve_normalizers` on the rows in memory (when every row has t = 1 the normalizer is the
    logsumexp, exact in one pass): the run-time branch returns only the normalizer per row, and
    log p is computed once from it, outside (fused by XLA into its consumers). ``t``: 0-d or per
    row [..., 1].
    """
    def iterate():
        return solve_normalizers(local_evaluator(a0, t), support_size(a0, t), t, rows)

    def softmax():  # t = 1: the normalizer is the logsumexp, exact in one pass
        (total,) = rows.sum(jnp.sum(jnp.exp(a0), axis=-1, keepdims=True))  # >= 1: the max is 0
        return jnp.log(total), jnp.ones_like(total, jnp.int32)  # reduced: iterate's vma

    y, passes = lax.cond(jnp.all(t == 1), softmax, iterate)
    return log_p_at(a0, y, t), passes


def normalizer_original(a0: jax.Array, t: jax.Array, num_iters: int, rows: LocalRows = LOCAL_ROWS) -> jax.Array:
    """lam of max-shifted rows by the original algorithm with exactly ``num_iters`` steps.

    The method (logsumexp at t = 1, fixed point for t > 1, bisection for t < 1) is chosen at run
    time from the traced ``t``: with ``lax.switch`` for a 0-d ``t``; per row for a per-row ``t``
    [..., 1] (each method runs when some row needs it, every row takes its own method's value).
    """
    one_minus_t = 1.0 - t

    def row_sum(x):  # sum over the classes of every device
        return rows.sum(jnp.sum(x, axis=-1, keepdims=True))[0]

    def logsumexp(a0):
        return jnp.log(row_sum(jnp.exp(a0)))  # the max of a0 is 0: the sum is >= 1

    def fixed_point(a0):
        def step(_, z):
            partition = row_sum(exp_t(z, t))
            return a0 * partition ** one_minus_t

        z = lax.fori_loop(0, num_iters, step, a0)
        partition = row_sum(exp_t(z, t))
        return -log_t(1.0 / partition, t)

    def bisection(a0):
        support = row_sum((a0 > -safe_reciprocal(one_minus_t)).astype(a0.dtype))

        def step(_, bracket):
            lo, hi = bracket
            mid = 0.5 * (lo + hi)
            below = row_sum(exp_t(a0 - mid, t)) < 1.0
            return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

        hi = -log_t(1.0 / support, t)
        lo, hi = lax.fori_loop(0, num_iters, step, (jnp.zeros_like(hi), hi))
        return 0.5 * (lo + hi)

    branch = jnp.where(t == 1, 0, jnp.where(t > 1, 1, 2))
    methods = (logsumexp, fixed_point, bisection)
    if jnp.ndim(t) == 0:
        return lax.switch(branch, methods, a0)
    return _per_row_method(branch, methods, a0)


def _per_row_method(branch: jax.Array, methods, a0: jax.Array) -> jax.Array:
    """``methods[branch]`` of each row ([..., 1] results): a method runs when some row takes it
    (other rows' values of it, possibly NaN, are discarded by the selection)."""
    lam = jnp.zeros_like(a0[..., :1])
    for index, method in enumerate(methods):
        taken = branch == index
        value = lax.cond(jnp.any(taken), method, lambda a0: jnp.zeros_like(a0[..., :1]), a0)
        lam = jnp.where(taken, value, lam)
    return lam


def tempered_log_softmax_rows(a: jax.Array, t: jax.Array, num_iters: int | None,
                              rows: LocalRows = LOCAL_ROWS) -> jax.Array:
    """log of SPEC's tempered softmax of rows ``a`` [..., C] (compute dtype); -inf where p = 0.

    ``t``: 0-d or per row [..., 1]. ``rows`` reduces row statistics across devices when the
    classes are sharded (``LocalRows``).
    """
    a0 = shift_by_max(a, rows)
    if num_iters is None:
        return solve_converged(a0, t, rows)[0]
    lam = normalizer_original(a0, t, num_iters, rows)
    one_minus_t = 1.0 - t
    u = a0 - lam
    return _log1p_over(one_minus_t * u, one_minus_t, u)


def smooth_labels(y: jax.Array, label_smoothing: jax.Array, num_classes: int | None = None) -> jax.Array:
    """SPEC's (reference) smoothing over ``num_classes`` classes (default: y's last axis; a
    vocab-parallel slice passes the GLOBAL count); exact identity at label_smoothing = 0.

    With one class the rule is undefined: such rows become NaN unless label_smoothing = 0
    (concrete values are rejected earlier by the binding).
    """
    num_classes = y.shape[-1] if num_classes is None else num_classes
    if num_classes < 2:
        return jnp.where(label_smoothing == 0, y, jnp.nan)
    share = label_smoothing / (num_classes - 1)
    return (1.0 - num_classes * share) * y + share


def kept_and_invalid(indices: jax.Array, ignore_index: int | None, num_classes: int):
    """(rows whose class index is not ``ignore_index``, every row for None; those of them outside
    [0, C)): the bindings turn the latter into NaN rows (a concrete out-of-range index is rejected
    earlier)."""
    kept = jnp.ones(indices.shape, bool) if ignore_index is None else indices != ignore_index
    return kept, kept & ((indices < 0) | (indices >= num_classes))


def tempered_softmax_vjp_rows(p: jax.Array, grad_p: jax.Array, t: jax.Array,
                              rows: LocalRows = LOCAL_ROWS) -> jax.Array:
    """Vector-Jacobian product of the tempered softmax: w - e * sum(w), w = g p^t, e = p^t / sum p^t."""
    positive = p > 0
    p_t = jnp.where(positive, jnp.exp(t * jnp.log(jnp.where(positive, p, 1.0))), 0.0)
    w = grad_p * p_t
    sum_p_t, sum_w = rows.sum(jnp.sum(p_t, axis=-1, keepdims=True), jnp.sum(w, axis=-1, keepdims=True))
    return w - p_t / sum_p_t * sum_w
