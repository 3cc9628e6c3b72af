"""Per-element terms of the loss's derivatives with respect to the temperatures t1 and t2
(docs/math.md, "Temperature gradients"), @triton.jit, framework-free.

With l = ln x and e = 1 - t:

    d/dt log_t(x) = K(x, t) = -l^2 psi(e l),           psi(s) = (1 - e^s + s e^s) / s^2
    d/dt exp_t(u) at fixed u = E = p l^2 phi(-e l),    phi(s) = (e^s - 1 - s) / s^2,  p = exp_t(u)

(psi, phi -> 1/2 at s = 0, so both are continuous through t = 1: K = -l^2/2, E = p u^2/2). They
are evaluated from log2 x, which stays finite where x underflows (SPEC "Zero versus underflow"),
by their Taylor series for |s| < 1 (no cancellation) and in closed form otherwise, where the
closed form is rearranged so that no intermediate overflows when the result does not.

Then, per row (y the smoothed labels, d = (p - y) p^(t2 - t1), Q = sum p^t2):

    dL/dt1 = sum_i [ y_i K(y_i, t1) - y_i K(p_i, t1) - (Y_i - P_i) / (2 - t1)^2 ],
             Y = y^(2-t1) (1 - (2-t1) ln y),  P = p^(2-t1) (1 - (2-t1) ln p)
    dL/dt2 = sum_i A_i - (sum_i d_i) (sum_i E_i) / Q,    A_i = (p_i - y_i) p_i^(-t1) E_i

(the normalizer's dependence on t2 is the second term: dlam/dt2 = sum E / Q, from
sum_i exp_t2(a_i - lam) = 1). Classes with p = 0 exactly contribute E = A = 0 and, for t1 < 1,
-y K(0, t1) = y / (1 - t1)^2 (the limit; +inf for t1 >= 1, where the loss is +inf too).
"""

import triton
import triton.language as tl

from .tempered_math import INF, LN2


@triton.jit
def _psi_series(s):
    """psi(s) = sum_k (k+1)/(k+2)! s^k, truncation < 2e-10 for |s| < 1."""
    poly = 11.0 / 479001600.0
    poly = poly * s + 10.0 / 39916800.0
    poly = poly * s + 9.0 / 3628800.0
    poly = poly * s + 8.0 / 362880.0
    poly = poly * s + 7.0 / 40320.0
    poly = poly * s + 6.0 / 5040.0
    poly = poly * s + 5.0 / 720.0
    poly = poly * s + 4.0 / 120.0
    poly = poly * s + 3.0 / 24.0
    poly = poly * s + 2.0 / 6.0
    return poly * s + 0.5


@triton.jit
def _phi_series(s):
    """phi(s) = sum_k s^k/(k+2)!, truncation < 2e-10 for |s| < 1."""
    poly = 1.0 / 479001600.0
    poly = poly * s + 1.0 / 39916800.0
    poly = poly * s + 1.0 / 3628800.0
    poly = poly * s + 1.0 / 362880.0
    poly = poly * s + 1.0 / 40320.0
    poly = poly * s + 1.0 / 5040.0
    poly = poly * s + 1.0 / 720.0
    poly = poly * s + 1.0 / 120.0
    poly = poly * s + 1.0 / 24.0
    poly = poly * s + 1.0 / 6.0
    return poly * s + 0.5


@triton.jit
def log_t_dt(log2_x, one_minus_t, inv_one_minus_t):
    """K(x, t) = d/dt log_t(x) for x > 0 (finite log2 x); the limit at x = 0 is the caller's."""
    l = log2_x * LN2
    s = one_minus_t * l
    small = tl.abs(s) < 1.0
    series = -l * l * _psi_series(tl.where(small, s, 0.0))
    x_e = tl.exp2(one_minus_t * log2_x)  # x^(1-t) = e^s
    closed = -(1.0 - x_e + s * x_e) * (inv_one_minus_t * inv_one_minus_t)
    return tl.where(small, series, closed)


@triton.jit
def t1_terms(y, log2_y, log2_p, one_minus_t1, inv_one_minus_t1, two_minus_t1):
    """Per-class dL/dt1 (module docstring); y > 0 where log2_y is used, p = 0 where log2_p = -inf."""
    positive = log2_p > -INF
    has_y = y > 0.0
    safe_log2_p = tl.where(positive, log2_p, 0.0)
    safe_log2_y = tl.where(has_y, log2_y, 0.0)
    inv_sq = 1.0 / (two_minus_t1 * two_minus_t1)
    k_p = tl.where(positive, log_t_dt(safe_log2_p, one_minus_t1, inv_one_minus_t1),
                   tl.where(one_minus_t1 > 0.0, -(inv_one_minus_t1 * inv_one_minus_t1), -INF))
    k_y = log_t_dt(safe_log2_y, one_minus_t1, inv_one_minus_t1)
    pow_y = tl.exp2(two_minus_t1 * safe_log2_y) * (1.0 - two_minus_t1 * safe_log2_y * LN2)
    pow_p = tl.where(positive, tl.exp2(two_minus_t1 * safe_log2_p) * (1.0 - two_minus_t1 * safe_log2_p * LN2),
                     0.0)
    label_part = tl.where(has_y, y * (k_y - k_p) - pow_y * inv_sq, 0.0)
    return label_part + pow_p * inv_sq


@triton.jit
def exp_t_dt(log2_p, p, one_minus_t, inv_one_minus_t, t):
    """E = d/dt exp_t(u) at fixed u, from p = exp_t(u) > 0 (0 where log2_p = -inf)."""
    positive = log2_p > -INF
    safe_log2_p = tl.where(positive, log2_p, 0.0)
    l = safe_log2_p * LN2
    s = -one_minus_t * l  # phi's argument
    small = tl.abs(s) < 1.0
    series = p * l * l * _phi_series(tl.where(small, s, 0.0))
    closed = (tl.exp2(t * safe_log2_p) - p * (1.0 + s)) * (inv_one_minus_t * inv_one_minus_t)
    return tl.where(positive, tl.where(small, series, closed), 0.0)


@triton.jit
def t2_terms(y, log2_p, p, d, one_minus_t1, two_minus_t1, one_minus_t2, inv_one_minus_t2):
    """(A, E) per class: A = (p - y) p^(-t1) E (so dL/dt2 = sum A - sum d sum E / Q), E as
    ``exp_t_dt`` at t2; both 0 where p = 0. ``d`` = (p - y) p^(t2 - t1) of ``grad_terms``."""
    positive = log2_p > -INF
    safe_log2_p = tl.where(positive, log2_p, 0.0)
    l = safe_log2_p * LN2
    s = -one_minus_t2 * l
    small = tl.abs(s) < 1.0
    # (p - y) p^(-t1) = p^(2-t1)/p - y p^(1-t1)/p: keep the y term only where y > 0 (0 x inf)
    p_1_t1 = tl.exp2(one_minus_t1 * safe_log2_p)  # p^(1-t1)
    p_2_t1 = tl.exp2(two_minus_t1 * safe_log2_p)  # p^(2-t1)
    weight = p_2_t1 - tl.where(y > 0.0, y * p_1_t1, 0.0)  # (p - y) p^(-t1) p
    series = weight * l * l * _phi_series(tl.where(small, s, 0.0))
    # closed form: (p - y) p^(-t1) (p^t2 - p (1 + s)) / (1-t2)^2 = (d - (1 + s) weight) / (1-t2)^2
    closed = (d - (1.0 + s) * weight) * (inv_one_minus_t2 * inv_one_minus_t2)
    a = tl.where(positive, tl.where(small, series, closed), 0.0)
    e = exp_t_dt(log2_p, p, one_minus_t2, inv_one_minus_t2, 1.0 - one_minus_t2)
    return a, e
