"""The tempered functions themselves, public in ``bitempered.jax``: SPEC's ``log_t``, ``exp_t`` and
the tempered normalization ``compute_normalization``, thin checked entry points to the native math
(``native/math.py``, the same code every loss runs) with SPEC's closed-form derivatives.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from bitempered.bindings.common import validation as check
from bitempered.bindings.jax import args
from bitempered.bindings.jax.native import math as native


def _check_finite_t(value) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"t must be finite, got {value}")


def _elementwise_args(x, name: str, t):
    """(x in its compute dtype, t as a 0-d operand of that dtype, the dtype to return)."""
    x = args.as_floating(x, name)
    dtype = native.compute_dtype(x.dtype)
    t_, _ = args.scalar(t, "t", dtype, _check_finite_t)
    return x.astype(dtype), t_, x.dtype


# The derivatives are SPEC's closed forms (d/dx log_t(x) = x^-t, d/du exp_t(u) = exp_t(u)^t):
# exact where autodiff of the clamped formulas gives 0 * inf = NaN (exp_t outside its support).
# Temperatures are constants for differentiation, as everywhere in this library.
@jax.custom_jvp
def _log_t(x, t):
    return native.log_t(x, t)


@_log_t.defjvp
def _log_t_jvp(primals, tangents):
    x, t = primals
    return _log_t(x, t), tangents[0] * jnp.power(x, -t)


@jax.custom_jvp
def _exp_t(u, t):
    return native.exp_t(u, t)


@_exp_t.defjvp
def _exp_t_jvp(primals, tangents):
    u, t = primals
    value = _exp_t(u, t)
    positive = value > 0
    slope = jnp.where(positive, jnp.power(jnp.where(positive, value, 1.0), t), 0.0)
    return value, tangents[0] * slope


def log_t(x, t):
    """SPEC's tempered logarithm ``log_t(x) = (x^(1-t) - 1) / (1-t)`` elementwise (``log x`` at t = 1),
    accurate near t = 1.

    Args:
        x: floating array of any shape, values >= 0 (``log_t(0)`` is -1/(1-t) for t < 1 and -inf
            for t >= 1; negative values give NaN). float16/bfloat16 compute in float32.
        t: finite real temperature (t1 of the loss: 0 <= t1 < 2); a float, a 0-d array or a traced
            value (traced values are not checked).

    Returns:
        An array of x's shape and dtype. ``jax.grad`` gives ``x^-t`` (zero for ``t``).
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
        support; zero for ``t``).
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


@_normalization.defjvp
def _normalization_jvp(num_iters, primals, tangents):
    # d lam / d a_i = e_i = p_i^t / sum_j p_j^t (implicit differentiation of sum_i exp_t(a_i - lam) = 1)
    logits, t = primals
    log_p, lam = _log_probabilities_and_normalization(logits, t, num_iters)
    escort = jnp.exp(t * log_p)
    escort = escort / jnp.sum(escort, axis=-1, keepdims=True)
    return lam, jnp.sum(escort * tangents[0], axis=-1, keepdims=True)


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
        Differentiable: the gradient is that of the exact normalizer, ``p^t / sum p^t`` per row
        (evaluated at the returned lam; zero for ``t``).
    """
    logits = args.as_logits(logits)
    iters = args.as_num_iters(num_iters)
    dtype = native.compute_dtype(logits.dtype)
    t_, _ = args.scalar(t, "t", dtype, lambda value: check.check_t(value, "t"))
    if logits.size == 0:
        return jnp.zeros(logits.shape[:-1] + (1,), dtype)
    return _normalization_jit(logits.astype(dtype), t_, iters)
