"""The native PyTorch loss driver: SPEC's loss and gradient over blocks of rows.

``bindings/torch_native.py`` holds the math (the solver, the loss and gradient terms) for whole
row sets; this driver runs it on blocks of about ``BLOCK_ELEMENTS`` logits at a time and writes
each block's gradient, scaled and masked, straight into the one [N, C] output. Why blocks:

- memory: every temporary of the solver and of the loss/gradient terms is block-sized, so the
  loss costs the gradient buffer plus O(block) (measured by ``python -m perf --memory``), instead
  of several N x C temporaries;
- speed on CPU: a block's temporaries stay in cache, so the many elementwise torch ops of each
  solver pass run at cache rather than DRAM bandwidth; only the logits read and the gradient
  write go to memory.

At t1 = t2 = 1 the loss is cross-entropy (SPEC), and a block takes a lean path: one
``log_softmax``, the gradient ``p - y`` (dense labels: ``p sum(y) - y``) made in place from it.
Rows where that shortcut is not SPEC's value (a non-finite loss: NaN or +inf logits, label mass
on a p = 0 class) are recomputed by the general path, so the result never depends on the path.
"""

from __future__ import annotations

import math

import torch

from . import torch_native as native

# Logits per block: 2^18 fp32 values are 1 MiB, so the ~4 block-sized temporaries of a solver
# pass stay in a CPU's L2/L3 cache; a block of at least this size keeps torch's per-op overhead
# small against the work (a pass costs ~12 ops per block).
BLOCK_ELEMENTS = 1 << 18


def rows_per_block(num_classes: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(num_classes, 1))


def _xlogx(value: float) -> float:
    return value * math.log(value) if value > 0.0 else 0.0


def _cross_entropy_block(a, labels, indices: bool, on: float, off: float, scale, grad_out):
    """Loss at t1 = t2 = 1, KL(y || softmax(a)), and (into ``grad_out``, if given) its gradient
    times the row scale: ``scale (p - y)``; dense labels ``scale (p sum(y) - y)``.

    The scale enters as ``exp(log p + log scale)``, so the gradient is stored by the same op that
    exponentiates (no separate scaling pass). Returns the per-row loss.
    """
    log_p = torch.log_softmax(a, dim=-1)
    if indices:
        target = labels.unsqueeze(-1)
        # sum y log y of the smoothed one-hot row; sum p = sum y = 1 cancel in SPEC's loss
        labels_part = _xlogx(on) + (a.shape[-1] - 1) * _xlogx(off)
        loss = labels_part - (on - off) * log_p.gather(-1, target).squeeze(-1)
        if off > 0.0:
            loss = loss - off * log_p.sum(dim=-1)
        if grad_out is not None:
            torch.exp(log_p.add_(torch.log(scale)), out=grad_out)
            if off > 0.0:
                grad_out.sub_(off * scale)
            grad_out.scatter_add_(-1, target, (-(on - off)) * scale)
        return loss
    total = labels.sum(dim=-1, keepdim=True)
    # sum y log y - sum y log p - sum y + sum p, with sum p = 1
    loss = torch.special.xlogy(labels, labels).sub_(labels * log_p).sum(dim=-1) - total.squeeze(-1) + 1.0
    if grad_out is not None:
        torch.exp(log_p.add_(torch.log(total * scale)), out=grad_out)
        grad_out.addcmul_(labels, scale, value=-1.0)
    return loss


def _general_block(a, labels, indices: bool, t1, t2, label_smoothing: float, num_iters, need_grad: bool):
    log_p = native.tempered_log_softmax_rows(a, t2, num_iters)
    if indices:
        return native.loss_and_grad_rows_indices(log_p, labels, label_smoothing, t1, t2, need_grad)
    return native.loss_and_grad_rows(log_p, labels, t1, t2, need_grad)  # dense labels come smoothed


def loss_and_grad(logits, labels, t1, t2, label_smoothing: float, num_iters, ignore_index: int,
                  need_grad: bool, grad_scale: torch.Tensor):
    """Per-row losses [N] (compute dtype; 0 for ignored rows, NaN for invalid class indices), the
    mask of kept rows [N], and ``grad_scale`` x dL/dlogits [N, C] in the logits' dtype (or None).

    ``logits`` [N, C] with unit class stride; ``labels`` dense [N, C] or class indices [N];
    temperatures as host floats; ``grad_scale`` a 0-d tensor (e.g. 1/count for "mean").
    Each gradient element is computed in the compute dtype and rounded once into the logits' dtype.
    """
    t1, t2 = float(t1), float(t2)
    dtype = native.compute_dtype(logits.dtype)
    num_rows, num_classes = logits.shape
    indices = not labels.dtype.is_floating_point
    if indices:
        kept = labels != ignore_index
        # CPU indices were range-checked by the API; an unchecked (CUDA) bad index gives a NaN row
        bad = kept & ((labels < 0) | (labels >= num_classes))
        safe_labels = torch.where(kept & ~bad, labels, 0).long()
    else:
        kept = torch.ones(num_rows, dtype=torch.bool, device=logits.device)
        bad = torch.zeros_like(kept)
        safe_labels = labels
    # The reduction's scale, 0 for ignored rows and NaN for invalid ones, applied in the same op
    # that stores each block's gradient.
    row_scale = torch.where(kept, torch.where(bad, math.nan, 1.0), 0.0).to(dtype).mul_(grad_scale.to(dtype))
    cross_entropy = t1 == 1.0 and t2 == 1.0
    on = 1.0 - label_smoothing if label_smoothing > 0.0 else 1.0
    off = label_smoothing / (num_classes - 1) if label_smoothing > 0.0 else 0.0

    loss = torch.empty(num_rows, dtype=dtype, device=logits.device)
    grad = torch.empty_like(logits) if need_grad else None
    step = rows_per_block(num_classes)
    for start in range(0, num_rows, step):
        block = slice(start, min(start + step, num_rows))
        a = logits[block].to(dtype)
        y = safe_labels[block] if indices else native.smooth_labels(safe_labels[block].to(dtype), label_smoothing)
        scale = row_scale[block].unsqueeze(-1)
        # the block's gradient in the compute dtype: the output itself when the dtypes agree
        block_grad = None
        if need_grad:
            block_grad = grad[block] if grad.dtype == dtype else torch.empty_like(a)
        if cross_entropy:
            block_loss = _cross_entropy_block(a, y, indices, on, off, scale, block_grad)
            redo = ~torch.isfinite(block_loss)
            if bool(redo.any()):  # NaN/+inf logits, label mass on p = 0: SPEC's general path
                redo_loss, redo_grad = _general_block(a[redo], y[redo], indices, t1, t2, label_smoothing,
                                                      num_iters, need_grad)
                block_loss[redo] = redo_loss
                if need_grad:
                    block_grad[redo] = redo_grad.mul_(scale[redo])
        else:
            block_loss, general_grad = _general_block(a, y, indices, t1, t2, label_smoothing, num_iters,
                                                      need_grad)
            if need_grad:
                torch.mul(general_grad, scale, out=block_grad)
        loss[block] = block_loss
        if need_grad and block_grad.dtype != grad.dtype:
            grad[block] = block_grad  # the one rounding into the logits' dtype
    if indices:
        loss = torch.where(kept, torch.where(bad, math.nan, loss), 0.0)
        if need_grad and not bool(kept.all()):
            grad[~kept] = 0.0  # exactly 0 even where an ignored row's logits are not finite
    return loss, kept, grad
