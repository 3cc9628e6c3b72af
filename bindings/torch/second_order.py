"""Derivatives of the tempered-softmax VJP, so that tempered_softmax/tempered_sigmoid support
double backward (the losses do not: their gradient is a closed form from the forward pass).

With q = p^t (0 where p = 0), e = q / sum q, the VJP is ``out = g q - e sum(g q)`` (SPEC's
escort form). For an upstream u of ``out``, with u_bar = sum(u e) and g_bar = sum(g e):

    d out / d g  (vjp):  q (u - u_bar)
    d out / d q  (vjp):  (u - u_bar) (g - g_bar),   and dq/dp = t p^(t-1)  (0 where p = 0)

Plain torch ops in the compute dtype (differentiable again, for third derivatives).
"""

from __future__ import annotations

import torch

from bitempered.bindings.torch.native import math as native


def softmax_vjp_vjp_rows(probs: torch.Tensor, grad: torch.Tensor, upstream: torch.Tensor, t):
    """(d/dprobs, d/dgrad) of <upstream, tempered_softmax_vjp(probs, grad)> for rows [N, C]."""
    dtype = native.compute_dtype(probs.dtype)
    p, g, u = probs.to(dtype), grad.to(dtype), upstream.to(dtype)
    t = t.to(dtype) if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=dtype)
    positive = p > 0
    log_p = torch.log(torch.where(positive, p, 1.0))
    q = torch.where(positive, torch.exp(t * log_p), 0.0)
    e = q / q.sum(dim=-1, keepdim=True)
    u_centered = u - (u * e).sum(dim=-1, keepdim=True)
    g_centered = g - (g * e).sum(dim=-1, keepdim=True)
    dq_dp = torch.where(positive, t * torch.exp((t - 1.0) * log_p), 0.0)
    d_probs = u_centered * g_centered * dq_dp
    d_grad = q * u_centered
    return d_probs.to(probs.dtype), d_grad.to(grad.dtype)


def sigmoid_vjp_vjp(probs: torch.Tensor, grad: torch.Tensor, upstream: torch.Tensor, t):
    """The same for the tempered sigmoid (1-D): its VJP is the softmax VJP of rows [1 - p, p],
    upstream [0, g], second class."""
    rows = torch.stack([1.0 - probs, probs], dim=-1)
    grad_rows = torch.stack([torch.zeros_like(grad), grad], dim=-1)
    upstream_rows = torch.stack([torch.zeros_like(upstream), upstream], dim=-1)
    d_rows, d_grad_rows = softmax_vjp_vjp_rows(rows, grad_rows, upstream_rows, t)
    return d_rows[:, 1] - d_rows[:, 0], d_grad_rows[:, 1]
