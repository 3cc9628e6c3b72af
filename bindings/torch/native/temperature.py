"""Gradients of the loss and of the tempered softmax with respect to their temperatures, in plain
torch ops (docs/math.md, "Temperature gradients"; ``kernels/temperature_terms.py`` is the float32
Triton version of the same terms).

With l = ln x and e = 1 - t:

    K(x, t) = d/dt log_t(x)            = -l^2 psi(e l),    psi(s) = (1 - e^s + s e^s) / s^2
    E(u, t) = d/dt exp_t(u), u fixed   = p l^2 phi(-e l),  phi(s) = (e^s - 1 - s) / s^2,  p = exp_t(u)

psi and phi are 1/2 at s = 0, so both terms are continuous (and exact) through t = 1: they are
evaluated by their Taylor series for |s| < 1 (no cancellation there) and in closed form otherwise,
rearranged so that no intermediate overflows where the result does not. Every term is computed
from log p, which stays finite where p underflows (SPEC "Zero versus underflow"); a class with
p = 0 exactly (log p = -inf) contributes E = 0, and where its label is positive the limit
-y K(0, t1) = y / (1 - t1)^2 (t1 < 1; +inf for t1 >= 1, where the loss is +inf too).

Per row, y the smoothed labels, d = (p - y) p^(t2 - t1), Q = sum p^t2:

    dL/dt1 = sum_i [ y_i K(y_i, t1) - y_i K(p_i, t1) - (Y_i - P_i) / (2 - t1)^2 ],
             Y = y^(2-t1) (1 - (2-t1) ln y),  P = p^(2-t1) (1 - (2-t1) ln p)
    dL/dt2 = sum_i (p_i - y_i) p_i^(-t1) E_i - (sum_i d_i) (sum_i E_i) / Q

and for the tempered softmax with upstream gradient g: dt = sum g E - (sum g p^t) (sum E) / Q.

Temperatures here are Python floats or tensors broadcasting against the rows ([N, 1]: one per
row); the solver itself takes one value per call, so per-row temperatures are solved in groups of
equal values (``temperature_groups``).
"""

from __future__ import annotations

import math

import torch

from bitempered.bindings.torch.native import math as native

# Taylor terms for |s| < 1: the first omitted one is below 1/(n+2)! (float32: 1/13! = 1.6e-10,
# float64: 1/21! = 2e-20, relative to psi, phi >= 1/2 x e^-1)
SERIES_TERMS = {torch.float32: 11, torch.float64: 19}


def _series(s: torch.Tensor, coefficient) -> torch.Tensor:
    """sum_k coefficient(k) s^k over the dtype's ``SERIES_TERMS`` (Horner)."""
    terms = SERIES_TERMS.get(s.dtype, SERIES_TERMS[torch.float64])
    poly = torch.full_like(s, coefficient(terms - 1))
    for k in range(terms - 2, -1, -1):
        poly = poly.mul_(s).add_(coefficient(k))
    return poly


def psi_series(s: torch.Tensor) -> torch.Tensor:
    """psi(s) = sum_k (k+1)/(k+2)! s^k (|s| < 1)."""
    return _series(s, lambda k: (k + 1) / math.factorial(k + 2))


def phi_series(s: torch.Tensor) -> torch.Tensor:
    """phi(s) = sum_k s^k/(k+2)! (|s| < 1)."""
    return _series(s, lambda k: 1.0 / math.factorial(k + 2))


def _split(s: torch.Tensor):
    """(|s| < 1, s there and 0 elsewhere, s elsewhere and 1 there): the series' and the closed form's
    arguments, each finite where the other branch is taken (no NaN in either, nor in their
    derivatives: the softmax's temperature gradient is differentiated again by autograd)."""
    small = s.abs() < 1.0
    return small, torch.where(small, s, 0.0), torch.where(small, 1.0, s)


def log_t_dt(log_x: torch.Tensor, t) -> torch.Tensor:
    """K(x, t) = d/dt log_t(x) from a FINITE log x (x > 0)."""
    s = (1.0 - t) * log_x
    small, s_series, s_closed = _split(s)
    series = -log_x.square() * psi_series(s_series)
    # -(1 - e^s + s e^s) / (1-t)^2, with 1/(1-t)^2 = (l/s)^2 (no division by 1 - t, 0 at t = 1)
    closed = (torch.expm1(s_closed) - s_closed * torch.exp(s_closed)) * (log_x / s_closed).square()
    return torch.where(small, series, closed)


def _phi_terms(log_p: torch.Tensor, t):
    """(p > 0, l = log p (0 where p = 0), s = -(1-t) l, |s| < 1, phi(s) by its series there, (l/s)^2
    = 1/(1-t)^2 elsewhere, 1 + s there) of E at t."""
    positive = log_p > -math.inf
    l = torch.where(positive, log_p, 0.0)
    s = -(1.0 - t) * l
    small, s_series, s_closed = _split(s)
    return positive, l, small, phi_series(s_series), (l / s_closed).square(), 1.0 + s_closed


def exp_t_dt(log_p: torch.Tensor, t) -> torch.Tensor:
    """E = d/dt exp_t(u) at fixed u, from log p, p = exp_t(u) (0 where p = 0)."""
    positive, l, small, phi, inv_square, one_plus_s = _phi_terms(log_p, t)
    p = torch.exp(l)
    series = p * l.square() * phi
    closed = (torch.exp(t * l) - p * one_plus_s) * inv_square  # p (e^s - 1 - s) / (1-t)^2, p e^s = p^t
    return torch.where(positive, torch.where(small, series, closed), 0.0)


def _t1_terms(log_p: torch.Tensor, y: torch.Tensor, t1) -> torch.Tensor:
    """Per-class terms of dL/dt1 (module docstring)."""
    positive = log_p > -math.inf
    l = torch.where(positive, log_p, 0.0)
    has_y = y > 0.0
    log_y = torch.log(torch.where(has_y, y, 1.0))
    one_minus_t1 = 1.0 - t1
    two_minus_t1 = 1.0 + one_minus_t1
    # K(0, t1): -1/(1-t1)^2 for t1 < 1, -inf otherwise (the loss is +inf there too)
    if isinstance(one_minus_t1, torch.Tensor):
        k_zero = torch.where(one_minus_t1 > 0.0, -1.0 / one_minus_t1.square(), -math.inf)
    else:
        k_zero = -1.0 / one_minus_t1 ** 2 if one_minus_t1 > 0.0 else -math.inf
    k_p = torch.where(positive, log_t_dt(l, t1), k_zero)
    k_y = log_t_dt(log_y, t1)
    power_y = torch.where(has_y, torch.exp(two_minus_t1 * log_y) * (1.0 - two_minus_t1 * log_y), 0.0)
    power_p = torch.where(positive, torch.exp(two_minus_t1 * l) * (1.0 - two_minus_t1 * l), 0.0)
    label_part = torch.where(has_y, y * (k_y - k_p), 0.0)
    return label_part - (power_y - power_p) / (two_minus_t1 * two_minus_t1)


def _t2_terms(log_p: torch.Tensor, y: torch.Tensor, t1, t2):
    """Per-class (A, E, d, p^t2) of dL/dt2 = sum A - sum d sum E / sum p^t2, A = (p - y) p^(-t1) E;
    all 0 where p = 0."""
    positive, l, small, phi, inv_square, one_plus_s = _phi_terms(log_p, t2)
    p = torch.exp(l)
    escort = torch.where(positive, torch.exp(t2 * l), 0.0)
    # (p - y) p^(-t1) p = p^(2-t1) - y p^(1-t1); the y term only where y > 0 (no 0 x inf)
    weight = torch.exp((2.0 - t1) * l) - torch.where(y > 0.0, y * torch.exp((1.0 - t1) * l), 0.0)
    d = torch.where(positive, (p - y) * torch.exp((t2 - t1) * l), 0.0)
    series = weight * l.square() * phi
    closed = (d - one_plus_s * weight) * inv_square  # (p - y) p^(-t1) (p^t2 - p (1 + s)) / (1-t2)^2
    a = torch.where(positive, torch.where(small, series, closed), 0.0)
    e = torch.where(positive, torch.where(small, p * l.square() * phi, (escort - p * one_plus_s) * inv_square), 0.0)
    return a, e, d, escort


def loss_temperature_grads_rows(log_p: torch.Tensor, y: torch.Tensor, t1, t2,
                                rows: native.LocalRows = native.LOCAL_ROWS) -> torch.Tensor:
    """Each row's (dL/dt1, dL/dt2) [N, 2] for unit upstream gradient, from the converged log p [N, C]
    (-inf where p = 0) and the smoothed dense labels y [N, C] (compute dtype). ``rows`` reduces the
    row sums across ranks (classes sharded)."""
    a, e, d, escort = _t2_terms(log_p, y, t1, t2)
    dt1, sum_a, sum_e, sum_d, sum_escort = rows.sum(*(x.sum(dim=-1, keepdim=True)
                                                      for x in (_t1_terms(log_p, y, t1), a, e, d, escort)))
    return torch.cat([dt1, sum_a - sum_d * sum_e / sum_escort], dim=-1)


def softmax_temperature_grad_rows(probs: torch.Tensor, grad_p: torch.Tensor, t,
                                  rows: native.LocalRows = native.LOCAL_ROWS) -> torch.Tensor:
    """Each row's gradient of t [N] for the upstream gradient ``grad_p`` of the tempered softmax's
    probabilities ``probs`` [N, C] (compute dtype): sum g E - (sum g p^t)(sum E) / sum p^t. ``t``: a
    float, a 0-d tensor or one value per row [N, 1]. Differentiable by autograd (every branch finite)."""
    positive = probs > 0.0
    log_p = torch.where(positive, torch.log(torch.where(positive, probs, 1.0)), -math.inf)
    e = exp_t_dt(log_p, t)
    escort = torch.where(positive, torch.exp(t * torch.where(positive, log_p, 0.0)), 0.0)
    sum_ge, sum_g_escort, sum_e, sum_escort = rows.sum(*(x.sum(dim=-1, keepdim=True)
                                                         for x in (grad_p * e, grad_p * escort, e, escort)))
    return (sum_ge - sum_g_escort * sum_e / sum_escort).squeeze(-1)


def one_hot_labels(targets: torch.Tensor, num_classes: int, label_smoothing: float, dtype) -> torch.Tensor:
    """SPEC's smoothed one-hot rows [N, C] of class indices [N] in [0, C) (a block of rows: the
    temperature terms need the labels of every class)."""
    y = torch.zeros(targets.shape[0], num_classes, dtype=dtype, device=targets.device)
    y.scatter_(-1, targets.long().unsqueeze(-1), 1.0)
    return native.smooth_labels(y, label_smoothing)


def is_per_row(t) -> bool:
    """Whether a temperature holds one value per row ([R]) rather than one for every row."""
    return isinstance(t, torch.Tensor) and t.dim() == 1


def temperature_groups(*temperatures):
    """The rows of each distinct combination of per-row temperatures: a list of (values as floats,
    row indices [M] or None for every row). Temperatures: floats, 0-d tensors or [R] tensors; one
    host read of them (the solver takes one value per call)."""
    if not any(is_per_row(t) for t in temperatures):
        return [(tuple(float(t) for t in temperatures), None)]
    num_rows = next(t.shape[0] for t in temperatures if is_per_row(t))
    device = next(t.device for t in temperatures if is_per_row(t))
    table = torch.stack([t.detach().to(device=device, dtype=torch.float64).expand(num_rows)
                         if isinstance(t, torch.Tensor) else torch.full((num_rows,), float(t), dtype=torch.float64,
                                                                        device=device)
                         for t in temperatures], dim=-1)
    values, group = torch.unique(table, dim=0, return_inverse=True)
    if values.shape[0] == 1:
        return [(tuple(values[0].tolist()), None)]
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=values.shape[0]).tolist()
    return [(tuple(value), rows) for value, rows in zip(values.tolist(), torch.split(order, counts)) if rows.numel()]
