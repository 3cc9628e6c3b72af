"""TensorFlow native backend: SPEC computed with plain TF ops (``tf.function(jit_compile=True)``
compiles it with XLA; eager and graph mode run it op by op).

A port of ``bindings/jax/native/math.py`` (its solver, the one of ``kernels/README.md``, and its
terms), kept to what the Keras loss needs: rows ``[..., C]`` with every class local (no sharded
classes), in the compute dtype, with 0-d temperatures of that dtype. Nothing branches on a
temperature in Python: the t = 1 limits are ``tf.where`` selects and the method choices are
``tf.cond``/``tf.switch_case`` at run time, so one traced program serves every temperature.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# the solvers' safety cap, one for every backend (the measured worst case on SPEC's grid is 8)
from bitempered.kernels.launch_config import MAX_PASSES


def compute_dtype(dtype) -> tf.DType:
    """float64 for float64 inputs, float32 for float16/bfloat16/float32."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def tolerance(dtype) -> float:
    """The solver's |sum p - 1| target: float32 1e-6, float64 8 eps (as the JAX solver)."""
    return 1e-6 if dtype == tf.float32 else 8 * _eps(dtype)


def _eps(dtype) -> float:
    return float(np.finfo(dtype.as_numpy_dtype).eps)


def shifted(a, shift):
    """a - shift per row; where a equals its shift (a +inf logit of a row whose max is +inf) 0,
    the limit, not NaN."""
    return tf.where(a == shift, tf.zeros_like(a), a - shift)


def shift_by_max(a):
    """a - max(a) per row; a +inf logit maps to 0 and the other classes to -inf (the limit)."""
    return shifted(a, tf.reduce_max(a, axis=-1, keepdims=True))


def _safe_reciprocal(one_minus_t):
    """1 / (1 - t), finite at t = 1 (where every caller selects the t = 1 limit instead)."""
    return 1.0 / tf.where(one_minus_t == 0, tf.ones_like(one_minus_t), one_minus_t)


def _log1p_over(z, one_minus_t, u):
    """log1p(z) / (1 - t), with its t = 1 limit ``u`` (z = (1-t) u / c -> 0 there)."""
    tempered = tf.math.log1p(tf.maximum(z, -1.0)) * _safe_reciprocal(one_minus_t)
    return tf.where(one_minus_t == 0, u, tempered)


def exp_t(u, t):
    """exp_t(u) = [1 + (1-t) u]_+^(1/(1-t)), accurate near t = 1."""
    one_minus_t = 1.0 - t
    return tf.exp(_log1p_over(one_minus_t * u, one_minus_t, u))


def log_t(x, t):
    """log_t(x) = (x^(1-t) - 1) / (1-t), accurate near t = 1."""
    return log_t_from_log(tf.math.log(x), t)


def log_t_from_log(log_x, t):
    one_minus_t = 1.0 - t
    tempered = tf.math.expm1(one_minus_t * log_x) * _safe_reciprocal(one_minus_t)
    return tf.where(one_minus_t == 0, log_x, tempered)


def _log_p_at(a0, y, one_minus_t):
    """(log p, z) at y: log p_i = -y + log1p(z_i) / (1-t), z_i = max((1-t) a0_i / c, -1)."""
    scale = one_minus_t * tf.exp(one_minus_t * y)  # (1 - t) / c, one value per row
    z = tf.maximum(a0 * scale, -1.0)
    return -y + _log1p_over(z, one_minus_t, a0), z


def log_p_at(a0, y, t):
    """log p of max-shifted rows ``a0`` at the solved ``y`` (the solver's own formula)."""
    return _log_p_at(a0, y, 1.0 - t)[0]


def _evaluate(a0, y, one_minus_t):
    """One solver pass at y: (f = sum p, g = sum p / (1 + z)), each [..., 1]."""
    log_p, z = _log_p_at(a0, y, one_minus_t)
    p = tf.exp(log_p)
    base = 1.0 + z
    positive = base > 0  # False where p = 0 (t < 1) and for the 0 * -inf of a -inf logit at t = 1
    f = tf.reduce_sum(p, axis=-1, keepdims=True)
    g = tf.reduce_sum(tf.where(positive, p / tf.where(positive, base, tf.ones_like(base)), tf.zeros_like(p)),
                      axis=-1, keepdims=True)
    return f, g


def support_size(a0, t):
    """D of kernels/README.md per row [..., 1]: the classes that can have p > 0 for t < 1, the
    class count for t >= 1."""
    inside = a0 > -_safe_reciprocal(1.0 - t)
    count = tf.reduce_sum(tf.cast(inside, a0.dtype), axis=-1, keepdims=True)
    return tf.where(t < 1, count, tf.cast(tf.shape(a0)[-1], a0.dtype) * tf.ones_like(count))


def solve_normalizers(a0, t):
    """y = -log p_max per row [..., 1] of max-shifted rows ``a0``: the safeguarded Newton
    iteration of kernels/README.md (the JAX solver's steps, bracket and stopping rule), in a
    ``tf.while_loop`` that stops when every row is done or after MAX_PASSES passes."""
    dtype = a0.dtype
    one_minus_t = 1.0 - t
    tol = tolerance(dtype)
    ulp4 = 4 * _eps(dtype)

    def cond(step, y, lo, hi, done, lo_evaluated, y_evaluated):
        return (step < MAX_PASSES) & ~tf.reduce_all(done)

    def body(step, y, lo, hi, done, lo_evaluated, y_evaluated):
        f, g = _evaluate(a0, y, one_minus_t)
        y_evaluated = y
        r = f - 1.0
        done = done | (tf.abs(r) <= tol) | ~tf.math.is_finite(r)  # a NaN row stays NaN
        log_f, f_over_g = tf.math.log(f), f / g
        above = r > 0
        # Newton on f^(1-t) in c: from a point with f > 1 it never passes the root (convexity).
        y_safe = y - _log1p_over(f_over_g * tf.math.expm1(-one_minus_t * log_f), one_minus_t, -f_over_g * log_f)
        lo = tf.where(above, tf.minimum(tf.maximum(tf.maximum(lo, y), y_safe), hi), lo)
        lo_evaluated = tf.where(above, y_safe <= y, lo_evaluated)
        hi = tf.where(above, hi, tf.minimum(hi, y))
        y_newton = y + log_f * f_over_g  # Newton on log f in y: fast, but may leave the bracket
        inside = (y_newton > lo) & (y_newton < hi)
        y_new = tf.where(inside, y_newton, tf.where(lo_evaluated, 0.5 * (lo + hi), lo))
        done = done | (tf.abs(y_new - y) <= ulp4 * tf.maximum(tf.abs(y), 1.0))
        y = tf.where(done, y, y_new)
        return step + 1, y, lo, hi, done, lo_evaluated, y_evaluated

    support = support_size(a0, t)
    lo = tf.zeros_like(support)
    false = tf.zeros_like(support, dtype=tf.bool)
    state = (tf.constant(0), lo, lo, tf.math.log(tf.maximum(support, 1.0)), false, false, lo)
    return tf.while_loop(cond, body, state)[-1]


def normalizer_original(a0, t, num_iters: int):
    """lam of max-shifted rows by the original algorithm with exactly ``num_iters`` steps
    (logsumexp at t = 1, fixed point for t > 1, bisection for t < 1, chosen at run time)."""
    one_minus_t = 1.0 - t

    def row_sum(x):
        return tf.reduce_sum(x, axis=-1, keepdims=True)

    def logsumexp():
        return tf.math.log(row_sum(tf.exp(a0)))  # the max of a0 is 0: the sum is >= 1

    def fixed_point():
        def step(i, z):
            return i + 1, a0 * row_sum(exp_t(z, t)) ** one_minus_t

        z = tf.while_loop(lambda i, z: i < num_iters, step, (tf.constant(0), a0))[1]
        return -log_t(1.0 / row_sum(exp_t(z, t)), t)

    def bisection():
        support = row_sum(tf.cast(a0 > -_safe_reciprocal(one_minus_t), a0.dtype))

        def step(i, lo, hi):
            mid = 0.5 * (lo + hi)
            below = row_sum(exp_t(a0 - mid, t)) < 1.0
            return i + 1, tf.where(below, lo, mid), tf.where(below, mid, hi)

        hi = -log_t(1.0 / support, t)
        _, lo, hi = tf.while_loop(lambda i, lo, hi: i < num_iters, step, (tf.constant(0), tf.zeros_like(hi), hi))
        return 0.5 * (lo + hi)

    branch = tf.where(t == 1, 0, tf.where(t > 1, 1, 2))
    return tf.switch_case(branch, (logsumexp, fixed_point, bisection))


def tempered_log_softmax_rows(a, t, num_iters: int | None):
    """log of SPEC's tempered softmax of rows ``a`` [..., C] (compute dtype); -inf where p = 0."""
    a0 = shift_by_max(a)
    if num_iters is None:
        # t = 1: the normalizer is the logsumexp, exact in one pass
        y = tf.cond(t == 1, lambda: tf.math.log(tf.reduce_sum(tf.exp(a0), axis=-1, keepdims=True)),
                    lambda: solve_normalizers(a0, t))
        return log_p_at(a0, y, t)
    u = a0 - normalizer_original(a0, t, num_iters)
    one_minus_t = 1.0 - t
    return _log1p_over(one_minus_t * u, one_minus_t, u)


def smooth_labels(y, label_smoothing):
    """SPEC's (reference) smoothing over y's last axis; exact identity at label_smoothing = 0
    (one class: NaN unless label_smoothing = 0; concrete values are rejected by the binding)."""
    num_classes = y.shape[-1]
    if num_classes < 2:
        return tf.where(label_smoothing == 0, y, tf.fill(tf.shape(y), tf.constant(float("nan"), y.dtype)))
    share = label_smoothing / (num_classes - 1)
    return (1.0 - num_classes * share) * y + share


def tempered_softmax_vjp_rows(p, grad_p, t):
    """Vector-Jacobian product of the tempered softmax: w - e * sum(w), w = g p^t, e = p^t / sum p^t."""
    positive = p > 0
    p_t = tf.where(positive, tf.exp(t * tf.math.log(tf.where(positive, p, tf.ones_like(p)))), tf.zeros_like(p))
    w = grad_p * p_t
    return w - p_t / tf.reduce_sum(p_t, axis=-1, keepdims=True) * tf.reduce_sum(w, axis=-1, keepdims=True)
