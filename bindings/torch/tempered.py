"""The tempered functions themselves, public in ``bitempered.torch``: SPEC's ``log_t``, ``exp_t`` and
the tempered normalization ``compute_normalization``, thin checked entry points to the native math
(``native/math.py``, the same code every native loss runs) with SPEC's closed-form derivatives.
"""

from __future__ import annotations

import math

import torch

from bitempered.bindings.common import validation as check
from bitempered.bindings.torch import args
from bitempered.bindings.torch.native import math as native


def _check_finite_t(value) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"t must be finite, got {value}")


def _temperature_value(tensor: torch.Tensor, concrete) -> float:
    """The native math reads temperatures as Python floats (a host read for a CUDA tensor)."""
    return concrete if concrete is not None else float(tensor)


# The derivatives are SPEC's closed forms (d/dx log_t(x) = x^-t, d/du exp_t(u) = exp_t(u)^t):
# exact where autograd of the clamped formulas gives 0 * inf = NaN (exp_t outside its support).
# Both backward formulas are differentiable again. Temperatures get no gradient.
class _LogT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t: float):
        ctx.save_for_backward(x)
        ctx.t = t
        return native.log_t(x, t)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.pow(-ctx.t), None


class _ExpT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, t: float):
        value = native.exp_t(u, t)
        ctx.save_for_backward(value)
        ctx.t = t
        return value

    @staticmethod
    def backward(ctx, grad):
        (value,) = ctx.saved_tensors
        positive = value > 0
        return grad * torch.where(positive, torch.where(positive, value, 1.0).pow(ctx.t), 0.0), None


def _elementwise(function, x, name: str, t):
    args.check_floating(x, name)
    t_tensor, concrete = args.scalar_tensor(t, "t", x.device, _check_finite_t)
    compute = x.to(native.compute_dtype(x.dtype))
    return function.apply(compute, _temperature_value(t_tensor, concrete)).to(x.dtype)


def log_t(x, t):
    """SPEC's tempered logarithm ``log_t(x) = (x^(1-t) - 1) / (1-t)`` elementwise (``log x`` at t = 1),
    accurate near t = 1.

    Args:
        x: floating tensor of any shape, values >= 0 (``log_t(0)`` is -1/(1-t) for t < 1 and -inf
            for t >= 1; negative values give NaN). float16/bfloat16 compute in float32.
        t: finite real temperature (t1 of the loss: 0 <= t1 < 2); a float or a 0-d floating tensor
            (read to the host: one sync for a CUDA tensor).

    Returns a tensor of x's shape and dtype. Autograd gives ``x^-t`` (twice differentiable; no
    gradient for ``t``).
    """
    return _elementwise(_LogT, x, "x", t)


def exp_t(u, t):
    """SPEC's tempered exponential ``exp_t(u) = [1 + (1-t) u]_+^(1/(1-t))`` elementwise (``exp u`` at
    t = 1), accurate near t = 1; the inverse of :func:`log_t` on its range.

    Args:
        u: floating tensor of any shape (float16/bfloat16 compute in float32). For t < 1 the
            support is finite: exp_t(u) = 0 for u <= -1/(1-t).
        t: finite real temperature (t2 of the loss: t2 > 0); a float or a 0-d floating tensor
            (read to the host: one sync for a CUDA tensor).

    Returns a tensor of u's shape and dtype. Autograd gives ``exp_t(u)^t`` (exactly 0 outside the
    support; twice differentiable; no gradient for ``t``).
    """
    return _elementwise(_ExpT, u, "u", t)


def _log_probabilities_and_normalization(rows: torch.Tensor, t: float, num_iters):
    """(log p, lam) of rows [N, C]: the normalizer from the max class's log p, where
    log_t(p_max) = max(a) - lam holds exactly in the solver's variable (y = -log p_max)."""
    log_p = native.tempered_log_softmax_rows(rows, t, num_iters)
    top = rows.amax(dim=-1, keepdim=True)
    return log_p, top - native.log_t_from_log(log_p.amax(dim=-1, keepdim=True), t)


class _Normalization(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, t: float, num_iters):
        log_p, lam = _log_probabilities_and_normalization(rows, t, num_iters)
        ctx.save_for_backward(log_p)
        ctx.t = t
        return lam

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # d lam / d a_i = e_i = p_i^t / sum_j p_j^t (implicit differentiation of sum_i exp_t(a_i - lam) = 1)
        (log_p,) = ctx.saved_tensors
        escort = torch.exp(ctx.t * log_p)
        return grad * escort.div_(escort.sum(dim=-1, keepdim=True)), None, None


def compute_normalization(logits, t, num_iters=None):
    """SPEC's tempered normalization ``lam`` of each row: ``sum_i exp_t(logits_i - lam, t) = 1``.

    ``exp_t(logits - lam, t)`` is :func:`tempered_softmax`; at t = 1, lam is the logsumexp.
    Computed by the native backend (plain torch ops, on the logits' device).

    Args:
        logits: [..., C] float16/bfloat16/float32/float64 tensor, C >= 1 (16-bit logits compute
            in float32).
        t: temperature, finite and > 0; a float or a 0-d floating tensor (read to the host: one
            sync for a CUDA tensor).
        num_iters: None (default): solved to convergence (|sum p - 1| at the compute dtype's
            rounding). An int k >= 1: the original algorithm with exactly k steps (fixed point for
            t > 1, bisection for t < 1), as the original package at the same k.

    Returns lam of shape ``logits.shape[:-1] + (1,)`` in float32 (float64 for float64 logits).
    Autograd gives the gradient of the exact normalizer, ``p^t / sum p^t`` per row (evaluated at
    the returned lam; once differentiable; no gradient for ``t``).
    """
    args.check_logits(logits)
    check.check_num_iters(num_iters)
    t_tensor, concrete = args.temperature_and_value(t, "t", logits.device)
    rows = args.as_rows(logits).to(native.compute_dtype(logits.dtype))
    if rows.shape[0] == 0:
        return rows.new_zeros(logits.shape[:-1] + (1,))
    lam = _Normalization.apply(rows, _temperature_value(t_tensor, concrete), num_iters)
    return lam.reshape(logits.shape[:-1] + (1,))
