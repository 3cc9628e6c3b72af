"""The tempered functions themselves, public in ``bitempered.jax``: SPEC's ``log_t``, ``exp_t`` and
the tempered normalization ``compute_normalization``, thin checked entry points to the native math
(``native/math.py``, the same code every loss runs) with SPEC's closed-form derivatives, with
respect to the temperature too (``native/temperature.py``). Their JVP rules use
``symbolic_zeros``: a derivative with respect to ``t`` is computed only where ``t`` is
differentiated.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from bitempered.bindings.common import validation as check
from bitempered.bindings.jax import args
from bitempered.bindings.jax.native import math as native
from bitempered.bindings.jax.native import temperature


def _check_finite_t(value) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"t must be finite, got {value}")


def _elementwise_args(x, name: str, t):
    """(x in its compute dtype, t as a 0-d operand of that dtype, the dtype to return)."""
    x = args.as_floating(x, name)
    dtype = native.compute_dtype(x.dtype)
    t_, _ = args.scalar(t, "t", dtype, _check_finite_t)
    return x.astype(dtype), t_, x.dtype


def _is_symbolic_zero(tangent) -> bool:
    return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def _tangent(like, *terms):
    """The sum of tangent x derivative() over the (tangent, derivative) ``terms`` whose tangent is
    not a symbolic zero (the derivative is computed only for those), summed over the last axis
    to ``like``'s shape where ``like`` has fewer elements (a row reduction); zeros like ``like``
    if every tangent is zero."""
    total = jnp.zeros_like(like)
    for tangent, derivative in terms:
        if not _is_symbolic_zero(tangent):
            term = tangent * derivative()
            total = total + (jnp.sum(term, axis=-1, keepdims=True) if term.shape != like.shape else term)
    return total


# The derivatives are SPEC's closed forms (d/dx log_t(x) = x^-t, d/du exp_t(u) = exp_t(u)^t):
# exact where autodiff of the clamped formulas gives 0 * inf = NaN (exp_t outside its support);
# those with respect to t are docs/math.md's K and E ("Temperature gradients").
@jax.custom_jvp
def _log_t(x, t):
    return native.log_t(x, t)


def _log_t_dt(x, t):
    """d/dt log_t(x): K from log x for x > 0; at x = 0 the limit -1/(1-t)^2 (t < 1; -inf for
    t >= 1, where log_t(0) = -inf); NaN for x < 0."""
    positive = x > 0
    k = temperature.log_t_dt(jnp.log(jnp.where(positive, x, 1.0)), t)
    inverse = native.safe_reciprocal(1.0 - t)
    at_zero = jnp.where(t < 1, -(inverse * inverse), -jnp.inf)
    return jnp.where(positive, k, jnp.where(x == 0, at_zero, jnp.nan))


def _log_t_jvp(primals, tangents):
    (x, t), (x_dot, t_dot) = primals, tangents
    value = _log_t(x, t)
    return value, _tangent(value, (x_dot, lambda: jnp.power(x, -t)), (t_dot, lambda: _log_t_dt(x, t)))


_log_t.defjvp(_log_t_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _exp_t(u, t):
    return native.exp_t(u, t)


def _exp_t_jvp(primals, tangents):
    (u, t), (u_dot, t_dot) = primals, tangents
    log_value = native.log_exp_t(u, t)  # finite where exp_t(u) underflows: E from it
    value = jnp.exp(log_value)
    positive = log_value > -jnp.inf
    slope = jnp.where(positive, jnp.exp(t * jnp.where(positive, log_value, 0.0)), 0.0)  # exp_t(u)^t, 0 outside
    return value, _tangent(value, (u_dot, lambda: slope), (t_dot, lambda: temperature.exp_t_dt(log_value, t)))


_exp_t.defjvp(_exp_t_jvp, symbolic_zeros=True)


def log_t(x, t):
    """SPEC's tempered logarithm ``log_t(x) = (x^(1-t) - 1) / (1-t)`` elementwise (``log x`` at t = 1),
    accurate near t = 1.

    Args:
        x: floating array of any shape, values >= 0 (``log_t(0)`` is -1/(1-t) for t < 1 and -inf
            for t >= 1; negative values give NaN). float16/bfloat16 compute in float32.
        t: finite real temperature (t1 of the loss: 0 <= t1 < 2); a float, a 0-d array or a traced
            value (traced values are not checked).

    Returns:
        An array of x's shape and dtype. ``jax.grad`` gives ``x^-t``, and for ``t`` the exact
        d/dt log_t(x) (at x = 0: -1/(1-t)^2 for t < 1).
    """
    x, t_, dtype = _elementwise_args(x, "x", t)
    return _log_t(x, t_).astype(dtype)


def exp_t(u, t):
    """SPEC's tempered exponential ``exp_t(u) = [1 + (1-t) u]_+^(1/(1-t))`` elementwise (``exp u`` at
    t = 1), accurate near t = 1; the inverse of :func:`log_t` on its range.

    Args:
        u: floating array of any shape (float16/bfloat16 compute in float32). For t < 1 the support
            is finite: exp_t(u) = 0 for u <= -1/(1-t).
        t: finite real temperature (t2 of the loss: t2 > 0); a float, a 0-d array or a traced value
            (traced values are not checked).

    Returns:
        An array of u's shape and dtype. ``jax.grad`` gives ``exp_t(u)^t`` (exactly 0 outside the
        support), and for ``t`` the exact d/dt exp_t(u) at fixed u (0 outside the support).
    """
    u, t_, dtype = _elementwise_args(u, "u", t)
    return _exp_t(u, t_).astype(dtype)


def _log_probabilities_and_normalization(logits, t, num_iters):
    """(log p, lam): the normalizer from the max class's log p, where log_t(p_max) = max(a) - lam
    holds exactly in the solver's variable (y = -log p_max)."""
    log_p = native.tempered_log_softmax_rows(logits, t, num_iters)
    top = jnp.max(logits, axis=-1, keepdims=True)
    return log_p, top - native.log_t_from_log(jnp.max(log_p, axis=-1, keepdims=True), t)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _normalization(logits, t, num_iters):
    return _log_probabilities_and_normalization(logits, t, num_iters)[1]


def _normalization_jvp(num_iters, primals, tangents):
    # implicit differentiation of sum_i exp_t(a_i - lam) = 1: d lam / d a_i = p_i^t / Q and
    # d lam / dt = sum_i E_i / Q (E = d exp_t / dt at fixed a_i - lam), Q = sum_j p_j^t
    (logits, t), (logits_dot, t_dot) = primals, tangents
    if num_iters is not None and not _is_symbolic_zero(t_dot):
        raise ValueError(f"the gradient of t needs the converged normalization (num_iters=None), got "
                         f"num_iters={num_iters}")
    log_p, lam = _log_probabilities_and_normalization(logits, t, num_iters)
    escort = jnp.exp(t * log_p)
    total = jnp.sum(escort, axis=-1, keepdims=True)
    return lam, _tangent(lam, (logits_dot, lambda: escort), (t_dot, lambda: temperature.exp_t_dt(log_p, t))) / total


_normalization.defjvp(_normalization_jvp, symbolic_zeros=True)


_normalization_jit = jax.jit(_normalization, static_argnums=(2,))


def compute_normalization(logits, t, num_iters=None):
    """SPEC's tempered normalization ``lam`` of each row: ``sum_i exp_t(logits_i - lam, t) = 1``.

    ``exp_t(logits - lam, t)`` is :func:`tempered_softmax`; at t = 1, lam is the logsumexp.

    Args:
        logits: [..., C] floating array, C >= 1 (float16/bfloat16/float32 compute in float32,
            float64 in float64 when x64 is enabled).
        t: temperature, finite and > 0; a float, a 0-d array or a traced value (a new value never
            recompiles; traced values are not checked).
        num_iters: None (default): solved to convergence (|sum p - 1| at the compute dtype's
            rounding). An int k >= 1 (static): the original algorithm with exactly k steps (fixed
            point for t > 1, bisection for t < 1), as jax-bitempered-loss at the same k.

    Returns:
        lam of shape ``logits.shape[:-1] + (1,)`` in the compute dtype (float32, or float64).
        Differentiable: the gradient is that of the exact normalizer, ``p^t / sum p^t`` per row,
        and for ``t`` ``sum_i d exp_t(a_i - lam)/dt / sum p^t`` (evaluated at the returned lam;
        the latter for ``num_iters=None`` only: ValueError naming num_iters otherwise).
    """
    logits = args.as_logits(logits)
    iters = args.as_num_iters(num_iters)
    dtype = native.compute_dtype(logits.dtype)
    t_, _ = args.scalar(t, "t", dtype, lambda value: check.check_t(value, "t"))
    if logits.size == 0:
        return jnp.zeros(logits.shape[:-1] + (1,), dtype)
    return _normalization_jit(logits.astype(dtype), t_, iters)
