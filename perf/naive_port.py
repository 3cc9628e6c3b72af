"""A naive PyTorch port of the bi-tempered loss, written the way popular ports are.

This is the benchmark's "what people use today" baseline, NOT a reference: it is written from
SPEC's description of the ORIGINAL algorithm ("num_iters=k: reproduce the original reference
algorithm") in the style of the common community ports:

- eager torch ops, computed in the input dtype (no upcast of bf16/fp16),
- a fixed 5 iterations: fixed point for t2 > 1, bisection for t2 < 1, logsumexp at t2 = 1,
- integer labels turned into a dense one-hot tensor inside the loss,
- ``log_t(labels + 1e-10)`` instead of the ``y log_t(y) = 0`` convention,
- the gradient is whatever autograd makes of all of the above (it differentiates through the 5
  iterations; through the bisection only via the row max, so that gradient is not the true one).

Every intermediate N x C tensor of the iterations is kept alive for autograd, which is why this
port needs many times the memory of the logits.
"""

from __future__ import annotations

import torch

NUM_ITERS = 5


def log_t(x: torch.Tensor, t: float) -> torch.Tensor:
    if t == 1.0:
        return torch.log(x)
    return (x.pow(1.0 - t) - 1.0) / (1.0 - t)


def exp_t(u: torch.Tensor, t: float) -> torch.Tensor:
    if t == 1.0:
        return torch.exp(u)
    return torch.relu(1.0 + (1.0 - t) * u).pow(1.0 / (1.0 - t))


def _normalizer_fixed_point(a: torch.Tensor, t: float, num_iters: int) -> torch.Tensor:
    """t > 1: z <- a0 * Z^(1-t) with Z = sum exp_t(z), num_iters times; lam = -log_t(1/Z) + max."""
    row_max = a.max(dim=-1, keepdim=True).values
    a0 = a - row_max
    z = a0
    for _ in range(num_iters):
        partition = exp_t(z, t).sum(dim=-1, keepdim=True)
        z = a0 * partition.pow(1.0 - t)
    partition = exp_t(z, t).sum(dim=-1, keepdim=True)
    return -log_t(1.0 / partition, t) + row_max


def _normalizer_bisection(a: torch.Tensor, t: float, num_iters: int) -> torch.Tensor:
    """t < 1: bisection of lam in [0, -log_t(1/D)], D = #classes inside exp_t's support."""
    row_max = a.max(dim=-1, keepdim=True).values
    a0 = a - row_max
    support = (a0 > -1.0 / (1.0 - t)).sum(dim=-1, keepdim=True).to(a.dtype)
    lower = torch.zeros_like(support)
    upper = -log_t(1.0 / support, t)
    for _ in range(num_iters):
        middle = (lower + upper) / 2.0
        total = exp_t(a0 - middle, t).sum(dim=-1, keepdim=True)
        below = (total < 1.0).to(a.dtype)
        lower = lower * below + middle * (1.0 - below)
        upper = upper * (1.0 - below) + middle * below
    return (lower + upper) / 2.0 + row_max


def compute_normalization(a: torch.Tensor, t: float, num_iters: int = NUM_ITERS) -> torch.Tensor:
    if t == 1.0:
        return torch.logsumexp(a, dim=-1, keepdim=True)
    if t > 1.0:
        return _normalizer_fixed_point(a, t, num_iters)
    return _normalizer_bisection(a, t, num_iters)


def tempered_softmax(a: torch.Tensor, t: float, num_iters: int = NUM_ITERS) -> torch.Tensor:
    if t == 1.0:
        return torch.softmax(a, dim=-1)
    return exp_t(a - compute_normalization(a, t, num_iters), t)


def bi_tempered_logistic_loss(logits: torch.Tensor, labels: torch.Tensor, t1: float, t2: float,
                              label_smoothing: float = 0.0, num_iters: int = NUM_ITERS,
                              reduction: str = "mean") -> torch.Tensor:
    """Per-row bi-tempered loss, reduced by ``reduction`` ("none", "sum", "mean")."""
    if labels.dim() < logits.dim():  # class indices -> one-hot, as the ports do
        dense = torch.zeros_like(logits)
        dense.scatter_(1, labels.unsqueeze(1), 1.0)
        labels = dense
    if label_smoothing > 0.0:
        num_classes = labels.shape[-1]
        labels = (1.0 - num_classes / (num_classes - 1) * label_smoothing) * labels \
            + label_smoothing / (num_classes - 1)
    probabilities = tempered_softmax(logits, t2, num_iters)
    per_class = (labels * log_t(labels + 1e-10, t1)
                 - labels * log_t(probabilities, t1)
                 - labels.pow(2.0 - t1) / (2.0 - t1)
                 + probabilities.pow(2.0 - t1) / (2.0 - t1))
    loss = per_class.sum(dim=-1)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()
