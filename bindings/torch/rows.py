"""The rows of a loss, written once for every torch path (native, Triton, fused linear, vocab-parallel,
vmap): which rows count, the reduction and its factor on the gradient, and the backward that
scales the gradient stored by the forward pass.

Every loss computes the gradient of the logits in its forward pass, already multiplied by the
reduction's factor (``grad_scale``), so its backward only multiplies by the upstream gradient
(``scale_stored_grad``): in place in eager mode (no second N x C buffer), out of place where the
graph is functionalized (torch.compile, torch.export) or a torch.func transform holds the tensor.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.functional_tensor import FunctionalTensor

Tensor = torch.Tensor


def kept_rows(labels: Tensor, ignore_index: int) -> Tensor:
    """The rows a loss counts [...]: every row of dense labels [..., C], the class indices [...]
    other than ``ignore_index``."""
    if labels.dtype.is_floating_point:
        return torch.ones(labels.shape[:-1], dtype=torch.bool, device=labels.device)
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


def grad_scale(kept: Tensor, reduction: str, dtype) -> Tensor:
    """The reduction's factor on each row's gradient, as a device tensor (no host sync): 1, or for
    "mean" 1/#kept rows (0 when none is kept). ``kept`` [..., N]: one factor per leading index."""
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=kept.device)
    count = kept.sum(dim=-1).to(dtype)
    return torch.where(count > 0, 1.0 / count, 0.0)


def masked_scale(kept: Tensor, bad: Tensor | None, scale: Tensor, dtype) -> Tensor:
    """Each row's factor on its gradient [N]: ``scale`` (a 0-d ``grad_scale``, or one value per row
    [N]) on kept rows, 0 on ignored rows, NaN on bad ones (``kept_and_bad``)."""
    if bad is None:
        return scale.to(dtype).expand(kept.shape[0])
    return torch.where(kept, torch.where(bad, math.nan, 1.0), 0.0).to(dtype).mul_(scale.to(dtype))


def reduce(loss_rows: Tensor, kept: Tensor, reduction: str) -> Tensor:
    """Per-row losses [..., N] reduced over the last axis as F.cross_entropy does ("mean": over the
    kept rows; NaN if none)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum(dim=-1)
    return loss_rows.sum(dim=-1) / kept.sum(dim=-1).to(loss_rows.dtype)


def _scale_in_place(grad: Tensor) -> bool:
    """Eager autograd scales the stored gradient in place. A functionalized trace (torch.compile's
    AOT autograd, torch.export) cannot mutate a forward output in the backward and torch.func
    transforms may hold it at another level: there the product is a new tensor (the compiler may
    reuse the stored buffer for it)."""
    functional_trace = (isinstance(grad, FunctionalTensor) or torch.compiler.is_compiling()
                        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FUNCTIONAL) is not None)
    return not functional_trace and not torch._C._are_functorch_transforms_active()


def _is_host_one(grad_loss: Tensor) -> bool:
    """A CPU scalar upstream gradient equal to 1 (reading it costs no device sync)."""
    return grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and float(grad_loss) == 1.0


def scale_stored_grad(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """dL/dlogits = the stored gradient [N, C] x the upstream gradient (0-d, or [N] for
    reduction="none"): in place in eager mode (``_scale_in_place``), a new tensor otherwise.

    The stored gradient was rounded once into the logits' dtype, so a non-unit upstream gradient
    rounds twice (exact for 1.0 or any power of two). In place, the stored tensor changes, so a
    second backward through the same graph fails autograd's saved-tensor version check instead of
    silently scaling twice.
    """
    upstream = grad_loss.unsqueeze(-1) if grad_loss.dim() == 1 and grad.dim() == 2 else grad_loss
    if not _scale_in_place(grad):
        return grad * upstream
    if _is_host_one(grad_loss):
        # the usual loss.backward() of a reduced loss: no pass over N x C; the version bump keeps
        # the second-backward check that mul_ would have triggered
        torch.autograd.graph.increment_version(grad)
        return grad
    return grad.mul_(upstream)
