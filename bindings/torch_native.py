"""PyTorch native backend: SPEC computed with plain torch ops (no Triton).

It is the CPU fallback, the backend for float64, and the ground truth the Triton kernels are
tested against. Functions here take flattened rows ``[N, C]`` in the compute dtype and 0-d
temperature tensors, and return plain tensors; autograd lives in ``bindings/torch.py``.
The solver is the one described in ``kernels/README.md``.
"""

from __future__ import annotations

import torch

MAX_PASSES = 30  # safety cap; the measured worst case on SPEC's grid is 8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tolerance(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps


def shift_by_max(a: torch.Tensor) -> torch.Tensor:
    """a - max(a) per row; a +inf logit maps to 0 and the other classes to -inf (the limit)."""
    mx = a.amax(dim=-1, keepdim=True)
    return torch.where(a == mx, torch.zeros_like(a), a - mx)


def _log1p_over(z: torch.Tensor, one_minus_t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """log1p(z) / (1 - t), with its t = 1 limit ``u`` (z = (1-t) u / c -> 0 there)."""
    tempered = torch.log1p(z.clamp(min=-1.0)) / one_minus_t
    return torch.where(one_minus_t == 0, u, tempered)


def exp_t(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """exp_t(u) = [1 + (1-t) u]_+^(1/(1-t)), accurate near t = 1."""
    one_minus_t = 1.0 - t
    return torch.exp(_log1p_over(one_minus_t * u, one_minus_t, u))


def log_t(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log_t(x) = (x^(1-t) - 1) / (1-t), accurate near t = 1."""
    return log_t_from_log(torch.log(x), t)


def log_t_from_log(log_x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    one_minus_t = 1.0 - t
    return torch.where(one_minus_t == 0, log_x, torch.expm1(one_minus_t * log_x) / one_minus_t)


def _evaluate(a0: torch.Tensor, y: torch.Tensor, one_minus_t: torch.Tensor):
    """One solver pass at y: (log p, f = sum p, g = sum p / (1 + z))."""
    c = torch.exp(-one_minus_t * y)
    z = (one_minus_t * a0 / c).clamp(min=-1.0)
    log_p = -y + _log1p_over(z, one_minus_t, a0)
    p = torch.exp(log_p)
    base = 1.0 + z
    f = p.sum(dim=-1, keepdim=True)
    g = torch.where(base > 0, p / torch.where(base > 0, base, 1.0), 0.0).sum(dim=-1, keepdim=True)
    return log_p, f, g


def solve_converged(a0: torch.Tensor, t: torch.Tensor):
    """Converged log-probabilities for max-shifted rows ``a0`` [N, C]; returns (log_p, passes).

    The safeguarded Newton iteration of kernels/README.md, vectorised over rows: rows that have
    converged keep their y, so evaluating them again changes nothing.
    """
    one_minus_t = 1.0 - t
    num_classes = a0.shape[-1]
    in_support = (a0 > -1.0 / one_minus_t).sum(dim=-1, keepdim=True)
    support = torch.where(t < 1, in_support, num_classes).clamp(min=1).to(a0.dtype)
    lo = torch.zeros_like(support)
    hi = torch.log(support)
    y = lo.clone()
    lo_evaluated = torch.zeros_like(y, dtype=torch.bool)
    done = torch.zeros_like(lo_evaluated)
    tol = tolerance(a0.dtype)
    ulp4 = 4 * torch.finfo(a0.dtype).eps
    passes = torch.zeros_like(y, dtype=torch.int32)
    for _ in range(MAX_PASSES):
        log_p, f, g = _evaluate(a0, y, one_minus_t)
        passes += (~done).int()
        r = f - 1.0
        done |= (r.abs() <= tol) | ~torch.isfinite(r)  # a NaN row stays NaN
        log_f, f_over_g = torch.log(f), f / g
        above = r > 0
        # Newton on f^(1-t) in c: from a point with f > 1 it never passes the root (convexity).
        y_safe = y - _log1p_over(f_over_g * torch.expm1(-one_minus_t * log_f), one_minus_t, -f_over_g * log_f)
        lo = torch.where(above, torch.minimum(torch.maximum(torch.maximum(lo, y), y_safe), hi), lo)
        lo_evaluated = torch.where(above, y_safe <= y, lo_evaluated)
        hi = torch.where(above, hi, torch.minimum(hi, y))
        y_newton = y + log_f * f_over_g  # Newton on log f in y: fast, but may leave the bracket
        inside = (y_newton > lo) & (y_newton < hi)
        y_new = torch.where(inside, y_newton, torch.where(lo_evaluated, 0.5 * (lo + hi), lo))
        done |= (y_new - y).abs() <= ulp4 * torch.clamp(y.abs(), min=1.0)
        y = torch.where(done, y, y_new)
        if bool(done.all()):
            break
    return log_p, passes


def normalizer_original(a0: torch.Tensor, t: float, num_iters: int) -> torch.Tensor:
    """lam of max-shifted rows by the original algorithm with exactly ``num_iters`` steps."""
    t_ = torch.tensor(t, dtype=a0.dtype)
    if t == 1.0:
        return torch.logsumexp(a0, dim=-1, keepdim=True)
    if t > 1.0:
        z = a0
        for _ in range(num_iters):
            partition = exp_t(z, t_).sum(dim=-1, keepdim=True)
            z = a0 * partition ** (1.0 - t)
        partition = exp_t(z, t_).sum(dim=-1, keepdim=True)
        return -log_t(1.0 / partition, t_)
    support = (a0 > -1.0 / (1.0 - t)).sum(dim=-1, keepdim=True).to(a0.dtype)
    lo = torch.zeros_like(support)
    hi = -log_t(1.0 / support, t_)
    for _ in range(num_iters):
        mid = 0.5 * (lo + hi)
        below = exp_t(a0 - mid, t_).sum(dim=-1, keepdim=True) < 1.0
        hi = torch.where(below, mid, hi)
        lo = torch.where(below, lo, mid)
    return 0.5 * (lo + hi)


def tempered_log_softmax_rows(a: torch.Tensor, t: torch.Tensor, num_iters: int | None):
    """log of SPEC's tempered softmax of rows ``a`` [N, C] (compute dtype); -inf where p = 0."""
    a0 = shift_by_max(a)
    if num_iters is None:
        return solve_converged(a0, t)[0]
    lam = normalizer_original(a0, float(t), num_iters)
    one_minus_t = 1.0 - t
    u = a0 - lam
    return _log1p_over(one_minus_t * u, one_minus_t, u)


def smooth_labels(y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if label_smoothing == 0.0:
        return y
    num_classes = y.shape[-1]
    return (1.0 - num_classes / (num_classes - 1) * label_smoothing) * y + label_smoothing / (num_classes - 1)


def dense_labels_from_indices(indices: torch.Tensor, num_classes: int, dtype, ignore_index: int):
    """One-hot rows for class indices (ignored rows all zero) and the mask of kept rows."""
    kept = indices != ignore_index
    safe = torch.where(kept, indices, 0).long()
    onehot = torch.zeros(indices.shape + (num_classes,), dtype=dtype, device=indices.device)
    onehot.scatter_(-1, safe.unsqueeze(-1), 1.0)
    return onehot, kept


def loss_and_grad_rows(log_p: torch.Tensor, y: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor,
                       need_grad: bool):
    """Per-row loss [N] and dL/da for unit upstream gradient [N, C] (or None)."""
    p = torch.exp(log_p)
    positive = p > 0
    two_minus_t1 = 2.0 - t1
    y_log_ratio = torch.where(y > 0, y * (log_t(y, t1) - log_t_from_log(log_p, t1)), 0.0)
    power_gap = (y ** two_minus_t1 - torch.exp(two_minus_t1 * log_p)) / two_minus_t1
    loss = (y_log_ratio - power_gap).sum(dim=-1)
    if not need_grad:
        return loss, None
    d = torch.where(positive, (p - y) * torch.exp((t2 - t1) * torch.where(positive, log_p, 0.0)), 0.0)
    escort = torch.exp(t2 * log_p)
    escort = escort / escort.sum(dim=-1, keepdim=True)
    grad = d - escort * d.sum(dim=-1, keepdim=True)
    return loss, grad


def tempered_softmax_vjp_rows(p: torch.Tensor, grad_p: torch.Tensor, t: torch.Tensor):
    """Vector-Jacobian product of the tempered softmax: w - e * sum(w), w = g p^t, e = p^t / sum p^t."""
    p_t = torch.where(p > 0, torch.exp(t * torch.log(p)), 0.0)
    w = grad_p * p_t
    return w - p_t / p_t.sum(dim=-1, keepdim=True) * w.sum(dim=-1, keepdim=True)

