"""Derivatives of the tempered-softmax VJP, so that tempered_softmax/tempered_sigmoid support
double backward (the losses do not: their gradient is a closed form from the forward pass).

With q = p^t (0 where p = 0), e = q / sum q, the VJP is ``out = g q - e sum(g q)`` (SPEC's
escort form). For an upstream u of ``out``, with u_bar = sum(u e) and g_bar = sum(g e):

    d out / d g  (vjp):  q (u - u_bar)
    d out / d q  (vjp):  (u - u_bar) (g - g_bar),   and dq/dp = t p^(t-1)  (0 where p = 0)

The temperature's part, for a gradient of t that requires its own graph (double backward with t
learnable): d<u, out>/dt = sum_k (u_k - u_bar)(g_k - g_bar) q_k ln p_k (dq/dt = q ln p).

Plain torch ops in the compute dtype (differentiable again, for third derivatives). ``t``: 0-d, or
one value per row (the rows' count, row order). The gradient of t itself (``native/temperature``)
is differentiated once more by autograd through its torch ops (second derivatives only).
"""

from __future__ import annotations

import torch

from bitempered.bindings.torch.native import math as native
from bitempered.bindings.torch.native import temperature


def _rows_temperature(t, p: torch.Tensor) -> torch.Tensor:
    """``t`` in p's dtype, shaped to broadcast against rows p [..., C]: 0-d, or one per row."""
    t = t.to(p.dtype) if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=p.dtype)
    return t.reshape(*p.shape[:-1], 1) if t.dim() == 1 else t


def _escort_terms(probs: torch.Tensor, grad: torch.Tensor, upstream: torch.Tensor, t):
    """(p, log p (0 where p = 0), q = p^t, u - u_bar, g - g_bar) of rows [..., C] in the compute dtype."""
    dtype = native.compute_dtype(probs.dtype)
    p, g, u = probs.to(dtype), grad.to(dtype), upstream.to(dtype)
    t = _rows_temperature(t, p)
    positive = p > 0
    log_p = torch.log(torch.where(positive, p, 1.0))
    q = torch.where(positive, torch.exp(t * log_p), 0.0)
    e = q / q.sum(dim=-1, keepdim=True)
    u_centered = u - (u * e).sum(dim=-1, keepdim=True)
    g_centered = g - (g * e).sum(dim=-1, keepdim=True)
    return p, t, log_p, q, u_centered, g_centered


def softmax_vjp_vjp_rows(probs: torch.Tensor, grad: torch.Tensor, upstream: torch.Tensor, t):
    """(d/dprobs, d/dgrad) of <upstream, tempered_softmax_vjp(probs, grad)> for rows [N, C]."""
    p, t, log_p, q, u_centered, g_centered = _escort_terms(probs, grad, upstream, t)
    dq_dp = torch.where(p > 0, t * torch.exp((t - 1.0) * log_p), 0.0)
    d_probs = u_centered * g_centered * dq_dp
    d_grad = q * u_centered
    return d_probs.to(probs.dtype), d_grad.to(grad.dtype)


def softmax_vjp_temperature_rows(probs: torch.Tensor, grad: torch.Tensor, upstream: torch.Tensor, t):
    """Each row's d/dt of <upstream, tempered_softmax_vjp(probs, grad)> (rows [..., C] -> [...])."""
    _, _, log_p, q, u_centered, g_centered = _escort_terms(probs, grad, upstream, t)
    return (u_centered * g_centered * q * log_p).sum(dim=-1)


def sigmoid_vjp_vjp(probs: torch.Tensor, grad: torch.Tensor, upstream: torch.Tensor, t):
    """The same for the tempered sigmoid (1-D): its VJP is the softmax VJP of rows [1 - p, p],
    upstream [0, g], second class."""
    rows = torch.stack([1.0 - probs, probs], dim=-1)
    grad_rows = torch.stack([torch.zeros_like(grad), grad], dim=-1)
    upstream_rows = torch.stack([torch.zeros_like(upstream), upstream], dim=-1)
    d_rows, d_grad_rows = softmax_vjp_vjp_rows(rows, grad_rows, upstream_rows, t)
    return d_rows[:, 1] - d_rows[:, 0], d_grad_rows[:, 1]


def softmax_temperature_grad_vjp_rows(probs: torch.Tensor, grad: torch.Tensor, upstream: torch.Tensor, t):
    """(d/dprobs, d/dgrad, d/dt) of <upstream, the per-row gradient of t> (``temperature.
    softmax_temperature_grad_rows``; rows [..., C], ``upstream`` one per row [...]) by autograd through
    its torch ops, on detached inputs: exact second derivatives, not differentiable again."""
    dtype = native.compute_dtype(probs.dtype)
    num_classes = probs.shape[-1]
    with torch.enable_grad():
        p = probs.detach().to(dtype).requires_grad_()
        g = grad.detach().to(dtype).requires_grad_()
        t_leaf = (t.detach().to(dtype) if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=dtype))
        t_leaf.requires_grad_()
        t_rows = t_leaf.reshape(-1, 1) if t_leaf.dim() == 1 else t_leaf
        dt = temperature.softmax_temperature_grad_rows(p.reshape(-1, num_classes), g.reshape(-1, num_classes), t_rows)
        d_probs, d_grad, d_t = torch.autograd.grad(dt, (p, g, t_leaf), upstream.to(dtype).reshape(-1))
    return d_probs.to(probs.dtype), d_grad.to(grad.dtype), d_t
