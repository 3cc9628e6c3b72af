"""The rows of a loss, written once for every torch path (native, Triton, fused linear, vocab-parallel,
vmap): which rows count, the reduction and its factor on the gradient, and the backward that
scales the gradient stored by the forward pass.

Every loss computes the gradient of the logits in its forward pass, already multiplied by the
reduction's factor (``grad_scale``), so its backward only multiplies by the upstream gradient
(``scale_stored_grad``): in place in eager mode (no second N x C buffer), out of place where the
graph is functionalized (torch.compile, torch.export), a torch.func transform holds the tensor or
the graph is retained (``retain_graph=True``, gradcheck).

float16 logits get their gradient stored in float32 (``stored_grad_dtype``): float16's range cannot
hold dL/dlogits x 1/N, and a GradScaler's upstream scale would multiply entries that were already
flushed to zero.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.functional_tensor import FunctionalTensor

from bitempered.bindings.common.validation import without_axis

Tensor = torch.Tensor


def kept_rows(labels: Tensor, ignore_index: int, class_dim: int = -1) -> Tensor:
    """The rows a loss counts, in the rows' shape: every row of dense labels (classes on
    ``class_dim``), the class indices [...] other than ``ignore_index``."""
    if labels.dtype.is_floating_point:
        return torch.ones(without_axis(labels.shape, class_dim), dtype=torch.bool, device=labels.device)
    return labels != ignore_index


def kept_and_bad(labels: Tensor, ignore_index: int, num_classes: int):
    """(``kept_rows``, the kept rows whose class index lies outside [0, C), or None for dense labels).

    The bindings turn bad rows into NaN (CPU indices were range-checked by the API; CUDA ones are
    not, and a bad one never reads out of bounds). As ``jax/native/math.kept_and_invalid``.
    """
    kept = kept_rows(labels, ignore_index)
    if labels.dtype.is_floating_point:
        return kept, None
    return kept, kept & ((labels < 0) | (labels >= num_classes))


def stored_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss's forward pass stores dL/dlogits in: float32 for float16 logits, the logits'
    dtype otherwise (bfloat16 has float32's exponent range).

    In float16, g/N for a mean over N rows falls below the normal range (6.1e-5) for most entries
    at large N, and loss scaling (GradScaler) cannot bring back what was rounded before it was
    applied: 26% of the entries flushed to 0 at N = 65536, C = 8 with the scaled float16 store. The
    float32 buffer costs twice the float16 one; the backward rounds its product with the upstream
    gradient once into float16."""
    return torch.float32 if dtype == torch.float16 else dtype


def mean_count(kept: Tensor, weights: Tensor | None = None) -> Tensor:
    """What "mean" divides by, over the last axis of ``kept`` [..., N]: the kept rows' count, or with
    per-row ``weights`` the sum of the kept rows' weights (F.cross_entropy's rule)."""
    return (kept if weights is None else torch.where(kept, weights, 0.0)).sum(dim=-1)


def mean_factor(kept: Tensor, dtype, weights: Tensor | None = None) -> Tensor:
    """1 / ``mean_count`` in ``dtype`` (0 where the count is 0), a device tensor (no host sync)."""
    count = mean_count(kept, weights).to(dtype)
    return torch.where(count > 0, 1.0 / count, 0.0)


def grad_scale(kept: Tensor, reduction: str, dtype, weights: Tensor | None = None) -> Tensor:
    """The reduction's factor on each row's gradient, as a device tensor (no host sync): 1, or for
    "mean" ``mean_factor``; times the row's weight where ``weights`` [..., N] are given (then one
    factor per row). ``kept`` [..., N]."""
    factor = mean_factor(kept, dtype, weights) if reduction == "mean" else torch.ones((), dtype=dtype,
                                                                                       device=kept.device)
    if weights is None:
        return factor
    return weights.to(dtype) * (factor.unsqueeze(-1) if factor.dim() else factor)


def masked_scale(kept: Tensor, bad: Tensor | None, scale: Tensor, dtype) -> Tensor:
    """Each row's factor on its gradient [N]: ``scale`` (a 0-d ``grad_scale``, or one value per row
    [N]) on kept rows, 0 on ignored rows, NaN on bad ones (``kept_and_bad``)."""
    if bad is None:
        return scale.to(dtype).expand(kept.shape[0])
    return torch.where(kept, torch.where(bad, math.nan, 1.0), 0.0).to(dtype).mul_(scale.to(dtype))


def reduce(loss_rows: Tensor, kept: Tensor, reduction: str, weights: Tensor | None = None) -> Tensor:
    """Per-row losses [..., N] (0 on ignored rows) reduced over the last axis as F.cross_entropy
    does: each row times its weight where ``weights`` [..., N] are given; "mean" over the kept rows'
    count or weights (NaN if there are none)."""
    if weights is not None:
        loss_rows = loss_rows * weights.to(loss_rows.dtype)
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum(dim=-1)
    return loss_rows.sum(dim=-1) / mean_count(kept, weights).to(loss_rows.dtype)


def with_weight_gradient(loss: Tensor, weights: Tensor | None, reduction: str, unweighted_rows) -> Tensor:
    """``loss`` (computed with ``weights.detach()``), plus, where ``weights`` [N] require grad, a term
    of value 0 whose gradient in them is the exact one: the unweighted row losses L through the
    reduction (d/dw_r = L_r for "none" and "sum", (L_r - loss) / sum(w) for "mean"; 0 on ignored
    rows). ``unweighted_rows()`` gives (L [N], 0 on ignored rows; the kept rows [N]); it runs only
    then (one more forward pass, without gradient). The logits' gradient never depends on this."""
    if weights is None or not weights.requires_grad or not torch.is_grad_enabled():
        return loss
    with torch.no_grad():
        rows, kept = unweighted_rows()
    delta = weights - weights.detach()  # 0, with d/dw = 1
    if reduction == "none":
        return loss + delta * rows
    if reduction == "sum":
        return loss + (delta * rows).sum()
    centered = torch.where(kept, rows - loss.detach(), 0.0)
    return loss + (delta * centered).sum() / mean_count(kept, weights.detach()).to(loss.dtype)


def _scale_in_place(grad: Tensor) -> bool:
    """Eager autograd scales the stored gradient in place. A functionalized trace (torch.compile's
    AOT autograd, torch.export) cannot mutate a forward output in the backward and torch.func
    transforms may hold it at another level; a retained graph (``retain_graph=True``, as gradcheck
    and repeated backward calls use) reads it again: there the product is a new tensor (the compiler
    may reuse the stored buffer for it)."""
    functional_trace = (isinstance(grad, FunctionalTensor) or torch.compiler.is_compiling()
                        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FUNCTIONAL) is not None)
    return (not functional_trace and not torch._C._are_functorch_transforms_active()
            and not torch._C._autograd._get_current_graph_task_keep_graph())


def per_row(values: Tensor, grad: Tensor, class_dim: int = -1) -> Tensor:
    """``values`` shaped to multiply ``grad`` (classes on ``class_dim``): one value per row [R] (row
    order) gets the rows' shape with a unit class axis; a 0-d value, or values for 1-D (binary)
    gradients, stay as they are."""
    if values.dim() != 1 or grad.dim() < 2:
        return values
    return values.reshape(without_axis(grad.shape, class_dim)).unsqueeze(class_dim)


def _is_host_one(grad_loss: Tensor) -> bool:
    """A CPU scalar upstream gradient equal to 1 (reading it costs no device sync)."""
    return grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and float(grad_loss) == 1.0


def scale_stored_grad(grad: Tensor, grad_loss: Tensor, dtype: torch.dtype, class_dim: int = -1) -> Tensor:
    """dL/dlogits in the logits' ``dtype`` = the stored gradient (the logits' shape, classes on
    ``class_dim``; [N, C] rows by default) x the upstream gradient (0-d, or one per row [R] for
    reduction="none"): in place in eager mode (``_scale_in_place``), a new tensor otherwise.

    A gradient stored in the logits' dtype was rounded once there, so a non-unit upstream gradient
    rounds twice (exact for 1.0 or any power of two); one stored in float32 for float16 logits
    (``stored_grad_dtype``) is rounded once, after the product. In place, the stored tensor
    changes, so a second backward through a graph that was not retained fails autograd's
    saved-tensor version check instead of silently scaling twice.
    """
    upstream = per_row(grad_loss, grad, class_dim)
    in_place = _scale_in_place(grad)
    if grad.dtype != dtype:  # float32 storage: the product is rounded once into the logits' dtype
        if not in_place:
            return (grad * upstream).to(dtype)
        return grad.to(dtype) if _is_host_one(grad_loss) else grad.mul_(upstream).to(dtype)
    if not in_place:
        return grad * upstream
    if _is_host_one(grad_loss):
        # the usual loss.backward() of a reduced loss: no pass over N x C; the version bump keeps
        # the second-backward check that mul_ would have triggered
        torch.autograd.graph.increment_version(grad)
        return grad
    return grad.mul_(upstream)


# Rows per float32 block of ``scale_half_stored_grad`` (16 MiB of temporaries)
HALF_SCALE_BLOCK_ELEMENTS = 1 << 22


def scale_half_stored_grad(grad: Tensor, upstream: Tensor, class_dim: int = -1) -> Tensor:
    """The in-place mode's float16 gradient (the logits' shape, classes on ``class_dim``; stored
    without the reduction's factor, in the logits' own buffer) x ``upstream`` (0-d, or one per row
    [R]: the upstream gradient times that factor, in float32), each product computed in float32 and
    rounded once. In place in eager mode, a block of the first axis at a time (a float32 temporary
    of one block), a new tensor otherwise (``_scale_in_place``)."""
    factor = per_row(upstream, grad, class_dim)
    if not _scale_in_place(grad):
        return (grad.float() * factor).to(grad.dtype)
    step = max(1, HALF_SCALE_BLOCK_ELEMENTS // max(math.prod(grad.shape[1:]), 1))
    sliced = factor.dim() > 0 and factor.shape[0] == grad.shape[0]  # (not where the first axis holds the classes)
    for start in range(0, grad.shape[0], step):
        block = slice(start, start + step)
        grad[block] = grad[block].float().mul_(factor[block] if sliced else factor)
    return grad



class TemperatureInput:
    """What a backward needs of a temperature input to return its gradient: 0-d (the rows' values
    summed) or one per row, its dtype and device."""

    def __init__(self, per_row: bool, shape, dtype, device):
        self.per_row, self.shape, self.dtype, self.device = per_row, shape, dtype, device

    @classmethod
    def of(cls, t: Tensor) -> "TemperatureInput":
        return cls(t.dim() == 1, t.shape, t.dtype, t.device)

    def gradient(self, per_row_values: Tensor) -> Tensor:
        """Its gradient from each row's part [R]."""
        values = per_row_values if self.per_row else per_row_values.sum()
        return values.reshape(self.shape).to(dtype=self.dtype, device=self.device)


def temperature_gradients(per_row: Tensor, grad_loss: Tensor, temperatures, needed) -> tuple:
    """The gradients of a loss's temperature inputs (``TemperatureInput`` each): each row's stored
    (dL/dt1, dL/dt2) [R, 2], already times the row's factor on its gradient, x the upstream gradient
    (0-d, or one per row for reduction="none"); None for a temperature not ``needed``."""
    upstream = grad_loss.to(per_row.dtype)
    scaled = per_row * (upstream.reshape(-1, 1) if upstream.dim() else upstream)
    return tuple(t.gradient(scaled[:, column]) if need else None
                 for column, (t, need) in enumerate(zip(temperatures, needed)))
