"""JAX native backend: the derivatives of the loss and of the tempered softmax with respect to the
temperatures (docs/math.md "Temperature gradients"), with plain jnp ops.

With l = ln x and e = 1 - t, and the functions psi(s) = (1 - e^s + s e^s) / s^2 and
phi(s) = (e^s - 1 - s) / s^2 (both 1/2 at s = 0, smooth through it):

    K(x, t) = d/dt log_t(x)          = -l^2 psi(e l)
    E(u, t) = d/dt exp_t(u), u fixed = p l^2 phi(-e l),   p = exp_t(u), l = ln p

Per row (y the smoothed labels, p the converged probabilities, d = (p - y) p^(t2 - t1),
Q = sum p^t2):

    dL/dt1 = sum_i [ y_i K(y_i, t1) - y_i K(p_i, t1) - (Y_i - P_i) / (2 - t1)^2 ],
             Y = y^(2-t1) (1 - (2-t1) ln y),  P = p^(2-t1) (1 - (2-t1) ln p)
    dL/dt2 = sum_i A_i - (sum_i d_i)(sum_i E_i) / Q,   A_i = (p_i - y_i) p_i^(-t1) E_i

and for the tempered softmax with upstream gradient g: dt = sum g E - (sum g p^t)(sum E) / Q.
This is the float64-exact twin of ``kernels/temperature_terms.py`` (the float32 kernels): every
term is computed from log p, finite where p underflows (SPEC "Zero versus underflow"); a class with
p = 0 exactly (log p = -inf) contributes E = A = 0 and, where y > 0, -y K(0, t1) = y / (1 - t1)^2
(t1 < 1; +inf for t1 >= 1, where the loss is +inf too). psi and phi are Taylor series for |s| < 1
(accurate to float64 rounding) and closed forms otherwise, arranged so that no intermediate
overflows where the result does not. Temperatures are traced values, 0-d or per row [..., 1]
(broadcasting against the rows [..., C]); nothing branches on them in Python, so t = 1 is the
series' value (continuous) in the same compiled program.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from bitempered.bindings.jax.native import math as native

SERIES_TERMS = 20  # the series' truncation at |s| < 1 is below 1/21! ~ 2e-20: float64 rounding
SERIES_RADIUS = 1.0


def _horner(coefficients, s):
    """sum_k coefficients[k] s^k."""
    poly = jnp.zeros_like(s) + coefficients[-1]
    for c in reversed(coefficients[:-1]):
        poly = poly * s + c
    return poly


_PSI_COEFFICIENTS = tuple((k + 1) / math.factorial(k + 2) for k in range(SERIES_TERMS))
_PHI_COEFFICIENTS = tuple(1 / math.factorial(k + 2) for k in range(SERIES_TERMS))


def _series_argument(s):
    """(|s| < SERIES_RADIUS, s there and 0 elsewhere): the series is evaluated on small arguments
    only, so that its unselected values stay finite."""
    small = jnp.abs(s) < SERIES_RADIUS
    return small, jnp.where(small, s, 0.0)


def log_t_dt(log_x, t):
    """K(x, t) = d/dt log_t(x) for x > 0 given by its finite log ``log_x``.

    Closed form for |s| >= 1 (s = (1-t) l): -(1 + (s - 1) e^s) / (1-t)^2, which is -inf, not
    NaN, where e^s overflows (t > 1, tiny x)."""
    one_minus_t = 1.0 - t
    s = one_minus_t * log_x
    small, s_small = _series_argument(s)
    series = -log_x * log_x * _horner(_PSI_COEFFICIENTS, s_small)
    inverse = native.safe_reciprocal(one_minus_t)  # |s| >= 1: t != 1 wherever selected
    closed = -(1.0 + (s - 1.0) * jnp.exp(jnp.where(small, 0.0, s))) * (inverse * inverse)
    return jnp.where(small, series, closed)


def exp_t_dt(log_p, t):
    """E = d/dt exp_t(u) at fixed u, from log p = log exp_t(u); 0 where log p = -inf (p = 0).

    Closed form for |s| >= 1 (s = -(1-t) l): (p^t - p (1 + s)) / (1-t)^2, every term <= 1."""
    positive = log_p > -jnp.inf
    l = jnp.where(positive, log_p, 0.0)
    p = jnp.exp(l)
    one_minus_t = 1.0 - t
    s = -one_minus_t * l
    small, s_small = _series_argument(s)
    series = p * l * l * _horner(_PHI_COEFFICIENTS, s_small)
    inverse = native.safe_reciprocal(one_minus_t)
    closed = (jnp.exp(t * l) - p * (1.0 + s)) * (inverse * inverse)
    return jnp.where(positive, jnp.where(small, series, closed), 0.0)


def _positive_log(x):
    """(x > 0, log x there and 0 elsewhere)."""
    positive = x > 0
    return positive, jnp.log(jnp.where(positive, x, 1.0))


def _power_term(log_x, two_minus_t1):
    """x^(2-t1) (1 - (2-t1) ln x) / (2-t1)^2 from a finite log x: d/dt1 of x^(2-t1) / (2-t1)."""
    return jnp.exp(two_minus_t1 * log_x) * (1.0 - two_minus_t1 * log_x) / (two_minus_t1 * two_minus_t1)


def loss_t1_terms(y, log_p, t1):
    """Per-class terms of dL/dt1 [..., C] (module docstring); y = 0 contributes only its P term,
    p = 0 (log p = -inf) its -y K(0, t1) limit."""
    has_p = log_p > -jnp.inf
    log_p_finite = jnp.where(has_p, log_p, 0.0)
    has_y, log_y = _positive_log(y)
    one_minus_t1, two_minus_t1 = 1.0 - t1, 2.0 - t1
    inverse = native.safe_reciprocal(one_minus_t1)
    k_zero = jnp.where(one_minus_t1 > 0, -(inverse * inverse), -jnp.inf)  # K(0, t1)
    k_p = jnp.where(has_p, log_t_dt(log_p_finite, t1), k_zero)
    label_part = y * (log_t_dt(log_y, t1) - k_p) - _power_term(log_y, two_minus_t1)
    p_part = jnp.where(has_p, _power_term(log_p_finite, two_minus_t1), 0.0)
    return jnp.where(has_y, label_part, 0.0) + p_part


def loss_t2_terms(y, log_p, d, t1, t2):
    """(A, E) per class [..., C]: A = (p - y) p^(-t1) E, E = :func:`exp_t_dt` at t2; both 0 where
    p = 0. ``d`` = (p - y) p^(t2 - t1), the logits' gradient term (``native/loss.py``).

    A = w l^2 phi(s) with w = (p - y) p^(1-t1) = p^(2-t1) - y p^(1-t1) (the y term only where
    y > 0: no 0 x inf) and s = -(1-t2) l; for |s| >= 1, A = (d - (1 + s) w) / (1-t2)^2, as
    d = w e^s."""
    positive = log_p > -jnp.inf
    l = jnp.where(positive, log_p, 0.0)
    one_minus_t2 = 1.0 - t2
    s = -one_minus_t2 * l
    small, s_small = _series_argument(s)
    weight = jnp.exp((2.0 - t1) * l) - jnp.where(y > 0, y * jnp.exp((1.0 - t1) * l), 0.0)
    series = weight * l * l * _horner(_PHI_COEFFICIENTS, s_small)
    inverse = native.safe_reciprocal(one_minus_t2)
    closed = (d - (1.0 + s) * weight) * (inverse * inverse)
    a = jnp.where(positive, jnp.where(small, series, closed), 0.0)
    return a, exp_t_dt(log_p, t2)


def loss_temperature_terms(y, log_p, d, t1, t2):
    """The per-class terms whose row sums give the loss's temperature derivatives
    (:func:`combine_row_sums`): (dL/dt1 terms, A, E), each [..., C].

    ``y``: smoothed dense labels, ``log_p``: the converged log-probabilities, ``d``: (p - y)
    p^(t2 - t1) (0 where p = 0); t1, t2 0-d or [..., 1]."""
    return (loss_t1_terms(y, log_p, t1),) + loss_t2_terms(y, log_p, d, t1, t2)


def combine_row_sums(dt1_sum, a_sum, e_sum, d_sum, q_sum):
    """Each row's (dL/dt1, dL/dt2) [..., 2] from its row sums [..., 1] of the terms of
    :func:`loss_temperature_terms` and of d and p^t2 (Q): dL/dt2 = sum A - sum d sum E / Q."""
    return jnp.concatenate([dt1_sum, a_sum - d_sum * (e_sum / q_sum)], axis=-1)


def loss_temperature_grads(y, log_p, d, t1, t2, rows: native.LocalRows = native.LOCAL_ROWS):
    """Each row's (dL/dt1, dL/dt2) [..., 2] for unit upstream gradient (arguments as
    :func:`loss_temperature_terms`; ``rows`` reduces the row sums across devices when the classes
    are sharded)."""
    terms = loss_temperature_terms(y, log_p, d, t1, t2) + (d, jnp.exp(t2 * log_p))
    return combine_row_sums(*rows.sum(*(jnp.sum(x, axis=-1, keepdims=True) for x in terms)))


def softmax_vjp_with_temperature(log_p, grad_p, t, rows: native.LocalRows = native.LOCAL_ROWS):
    """(dL/dlogits [..., C], dL/dt per row [..., 1]) of the tempered softmax p = exp(``log_p``)
    for the upstream gradient ``grad_p``: w - e sum(w) (w = g p^t, e = p^t / Q) and
    sum g E - sum(w) sum(E) / Q, Q = sum p^t."""
    p_t = jnp.exp(t * log_p)  # 0 where log p = -inf
    w = grad_p * p_t
    e = exp_t_dt(log_p, t)
    sum_q, sum_w, sum_ge, sum_e = rows.sum(*(jnp.sum(x, axis=-1, keepdims=True)
                                             for x in (p_t, w, grad_p * e, e)))
    return w - p_t / sum_q * sum_w, sum_ge - sum_w * (sum_e / sum_q)
