"""Thin torch launchers of the Triton kernels in ``kernels/`` (no validation, no autograd).

Inputs are already flattened: rows ``[N, C]`` with last stride 1 (any row stride), or 1-D
tensors for the binary kernels. Temperatures and label smoothing may be Python floats or 0-d
tensors; they reach the kernels as 1-element fp32 device tensors, built without a host sync.
On CUDA every launch runs inside ``torch.cuda.device(x.device)``; nothing here calls ``.item()``.
"""

from __future__ import annotations

import contextlib

import torch

from ..kernels import launch_config
from ..kernels.binary import (
    tempered_binary_loss_kernel, tempered_sigmoid_bwd_kernel, tempered_sigmoid_fwd_kernel,
)
from ..kernels.loss import tempered_loss_kernel
from ..kernels.softmax import tempered_softmax_bwd_kernel, tempered_softmax_fwd_kernel

MAX_PASSES = launch_config.MAX_PASSES


def loss_path(num_classes: int, dtype: torch.dtype) -> str:
    """"on_chip" or "chunked": the path the row kernels take for this C and logits dtype."""
    return launch_config.row_config(num_classes, dtype.itemsize).path


def _device_scope(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _scalar(value, device) -> torch.Tensor:
    """A 1-element fp32 tensor on ``device`` holding a Python float or 0-d tensor (no sync)."""
    if isinstance(value, torch.Tensor) and value.device != torch.device("cpu"):
        return value.detach().reshape(1).to(device=device, dtype=torch.float32)
    # A host value (Python float or CPU tensor: reading it syncs nothing) becomes a device fill,
    # not a host-to-device copy from pageable memory.
    return torch.full((1,), float(value), dtype=torch.float32, device=device)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Rows with unit class stride (a copy only if the last stride is not 1)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _one_if_none(value):
    return 1.0 if value is None else value


def _solver_args(num_iters):
    """(ORIGINAL flag, num_iters runtime value) for num_iters None (converged) or k."""
    return (False, 1) if num_iters is None else (True, int(num_iters))


def loss_forward(logits2d, labels, t1, t2, label_smoothing, num_iters, ignore_index, need_grad,
                 grad_out=None, grad_scale=None):
    """Per-row loss (fp32 [N]) and, if ``need_grad``, dL/dlogits for unit upstream gradient
    ([N, C] in the logits' dtype, written into ``grad_out`` when given: in-place mode, which may
    be ``logits2d`` itself). ``labels``: dense [N, C] floats or class indices [N] (int32/int64).
    ``grad_scale`` (float or 0-d tensor, default 1, e.g. 1/count for a mean reduction) multiplies
    the gradient in fp32 before its one rounding. Rows of ignored labels get loss 0 and gradient 0;
    other class indices outside [0, C) get NaN (loss and gradient row), never an out-of-bounds read.
    """
    logits2d = _rows(logits2d)
    n_rows, n_cols = logits2d.shape
    device = logits2d.device
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else torch.empty_like(logits2d)
        assert grad.shape == logits2d.shape and grad.dtype == logits2d.dtype
        assert grad.stride(-1) == 1
    if n_rows == 0:
        return loss, grad
    indices = not labels.is_floating_point()
    if indices:
        stride_labels = labels.stride(0)
    else:
        labels = _rows(labels)
        stride_labels = labels.stride(0)
    original, k = _solver_args(num_iters)
    config = launch_config.row_config(n_cols, logits2d.element_size())
    grid = (triton_cdiv(n_rows, config.block_rows),)
    with _device_scope(logits2d):
        tempered_loss_kernel[grid](
            logits2d, labels, _scalar(t1, device), _scalar(t2, device),
            _scalar(label_smoothing, device), _scalar(_one_if_none(grad_scale), device),
            k, int(ignore_index),
            n_rows, n_cols,
            logits2d.stride(0), stride_labels, grad.stride(0) if need_grad else 0,
            loss, grad if need_grad else loss,
            LABELS_ARE_INDICES=indices, NEED_GRAD=bool(need_grad), ORIGINAL=original,
            CHUNKED=config.chunked, BLOCK_ROWS=config.block_rows, BLOCK_COLS=config.block_cols,
            MAX_PASSES=MAX_PASSES, num_warps=config.num_warps, maxnreg=config.maxnreg,
        )
    return loss, grad


def softmax_forward(logits2d, t, num_iters):
    """Tempered softmax of rows [N, C]; probabilities in the logits' dtype."""
    logits2d = _rows(logits2d)
    n_rows, n_cols = logits2d.shape
    probs = torch.empty_like(logits2d, memory_format=torch.contiguous_format)
    if n_rows == 0:
        return probs
    original, k = _solver_args(num_iters)
    config = launch_config.row_config(n_cols, logits2d.element_size())
    with _device_scope(logits2d):
        tempered_softmax_fwd_kernel[(triton_cdiv(n_rows, config.block_rows),)](
            logits2d, _scalar(t, logits2d.device), k, n_rows, n_cols,
            logits2d.stride(0), probs.stride(0), probs,
            ORIGINAL=original, CHUNKED=config.chunked, BLOCK_ROWS=config.block_rows,
            BLOCK_COLS=config.block_cols, MAX_PASSES=MAX_PASSES, num_warps=config.num_warps,
            maxnreg=config.maxnreg,
        )
    return probs


def softmax_backward(probs2d, grad2d, t):
    """Gradient of the logits of the tempered softmax: w - e sum(w), w = g p^t, e = p^t/sum p^t."""
    probs2d, grad2d = _rows(probs2d), _rows(grad2d)
    n_rows, n_cols = probs2d.shape
    out = torch.empty(probs2d.shape, dtype=probs2d.dtype, device=probs2d.device)
    if n_rows == 0:
        return out
    config = launch_config.row_config(n_cols, probs2d.element_size())
    with _device_scope(probs2d):
        tempered_softmax_bwd_kernel[(triton_cdiv(n_rows, config.block_rows),)](
            probs2d, grad2d, _scalar(t, probs2d.device), n_rows, n_cols,
            probs2d.stride(0), grad2d.stride(0), out.stride(0), out,
            CHUNKED=config.chunked, BLOCK_ROWS=config.block_rows, BLOCK_COLS=config.block_cols,
            num_warps=config.num_warps, maxnreg=config.maxnreg,
        )
    return out


def binary_loss_forward(x1d, y1d, t1, t2, label_smoothing, num_iters, need_grad, grad_scale=None):
    """Binary loss (fp32 [M]) and, if ``need_grad``, grad_scale * dL/dx ([M], x's dtype; grad_scale
    a float or 0-d tensor, default 1) of logits x and labels y in [0, 1]."""
    n = x1d.shape[0]
    device = x1d.device
    loss = torch.empty(n, dtype=torch.float32, device=device)
    grad = torch.empty(n, dtype=x1d.dtype, device=device) if need_grad else None
    if n == 0:
        return loss, grad
    original, k = _solver_args(num_iters)
    config = launch_config.binary_config()
    with _device_scope(x1d):
        tempered_binary_loss_kernel[(triton_cdiv(n, config.block),)](
            x1d, y1d, _scalar(t1, device), _scalar(t2, device), _scalar(label_smoothing, device),
            _scalar(_one_if_none(grad_scale), device),
            k, n, x1d.stride(0), y1d.stride(0), loss, grad if need_grad else loss,
            NEED_GRAD=bool(need_grad), ORIGINAL=original, BLOCK=config.block,
            MAX_PASSES=MAX_PASSES, num_warps=config.num_warps, maxnreg=config.maxnreg,
        )
    return loss, grad


def sigmoid_forward(x1d, t, num_iters):
    """Tempered sigmoid of a 1-D tensor (x's dtype)."""
    n = x1d.shape[0]
    probs = torch.empty(n, dtype=x1d.dtype, device=x1d.device)
    if n == 0:
        return probs
    original, k = _solver_args(num_iters)
    config = launch_config.binary_config()
    with _device_scope(x1d):
        tempered_sigmoid_fwd_kernel[(triton_cdiv(n, config.block),)](
            x1d, _scalar(t, x1d.device), k, n, x1d.stride(0), probs,
            ORIGINAL=original, BLOCK=config.block, MAX_PASSES=MAX_PASSES,
            num_warps=config.num_warps, maxnreg=config.maxnreg,
        )
    return probs


def sigmoid_backward(probs1d, grad1d, t):
    """dL/dx of the tempered sigmoid from its output p and the upstream gradient."""
    n = probs1d.shape[0]
    out = torch.empty(n, dtype=probs1d.dtype, device=probs1d.device)
    if n == 0:
        return out
    config = launch_config.binary_config()
    with _device_scope(probs1d):
        tempered_sigmoid_bwd_kernel[(triton_cdiv(n, config.block),)](
            probs1d, grad1d, _scalar(t, probs1d.device), n, probs1d.stride(0), grad1d.stride(0),
            out,
            BLOCK=config.block, num_warps=config.num_warps, maxnreg=config.maxnreg,
        )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
