"""Thin torch launchers of the Triton kernels in ``kernels/`` (no validation, no autograd).

Inputs are already flattened: rows ``[N, C]`` with last stride 1 (any row stride), or 1-D
tensors for the binary kernels. Temperatures and label smoothing may be Python floats or 0-d
tensors; they reach the kernels as 1-element fp32 device tensors, built without a host sync.
On CUDA every launch runs inside ``torch.cuda.device(x.device)``; nothing here calls ``.item()``.
Under Triton's interpreter (not thread-safe) launches run one at a time (``common/interpreter.py``).

Launch configurations come from ``autotune.row_config`` / ``binary_config``: the heuristic of
``kernels/launch_config.py`` unless autotuning is on (then the cached best, or a one-time timing
of the candidates on scratch outputs, never on the caller's buffers; not while a CUDA graph is
being captured).
"""

from __future__ import annotations

import contextlib

import torch

from bitempered.bindings.common import autotune, interpreter
from bitempered.bindings.torch.rows import stored_grad_dtype
from bitempered.kernels import launch_config
from bitempered.kernels.binary import (
    tempered_binary_loss_kernel, tempered_sigmoid_bwd_kernel, tempered_sigmoid_fwd_kernel,
)
from bitempered.kernels.loss import tempered_loss_kernel
from bitempered.kernels.softmax import tempered_softmax_bwd_kernel, tempered_softmax_fwd_kernel
from bitempered.kernels.vocab_parallel import epilogue_sums_kernel, gradient_kernel, partial_sums_kernel


def loss_path(num_classes: int, dtype: torch.dtype) -> str:
    """"on_chip" or "chunked": the path the heuristic takes for this C and logits dtype."""
    return launch_config.row_config(num_classes, dtype.itemsize).path


def device_name(x: torch.Tensor) -> str:
    """The autotune cache's device name (the interpreter has one of its own)."""
    if autotune.interpreted() or not x.is_cuda:
        return autotune.INTERPRETER_DEVICE
    return torch.cuda.get_device_name(x.device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tunable(x: torch.Tensor, make_bench):
    """Timing syncs the device: never while a CUDA graph is being captured (then the cached
    config or the heuristic)."""
    def maybe_bench():
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        return None if capturing else make_bench()

    return maybe_bench


def _row_config(family, x, n_cols, make_bench, **key):
    """(The device name and the tuning runs are only computed when autotuning is on.)"""
    return autotune.row_config(family, n_cols, dtype_name(x.dtype), x.element_size(),
                               device=lambda: device_name(x), **key,
                               make_bench=_tunable(x, make_bench))


def _binary_config(family, x, make_bench, **key):
    return autotune.binary_config(family, dtype_name(x.dtype), device=lambda: device_name(x),
                                  **key, make_bench=_tunable(x, make_bench))


@contextlib.contextmanager
def _launch_scope(x: torch.Tensor):
    """A launch on ``x``'s CUDA device; under the interpreter, one launch at a time (``interpreter``)."""
    device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with device, interpreter.launch_scope():
        yield


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


def _grad_scale(value, device, n_rows: int):
    """(fp32 tensor on ``device``, its row stride) of a gradient scale: None (1), a float or 0-d
    tensor (one value, stride 0) or a tensor of one value per row [N] (stride 1)."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        assert value.shape == (n_rows,)
        return value.to(device=device, dtype=torch.float32).contiguous(), 1
    return _scalar(1.0 if value is None else value, device), 0


def _solver_args(num_iters):
    """(ORIGINAL flag, num_iters runtime value) for num_iters None (converged) or k."""
    return (False, 1) if num_iters is None else (True, int(num_iters))


def loss_forward(logits2d, labels, t1, t2, label_smoothing, num_iters, ignore_index, need_grad,
                 grad_out=None, grad_scale=None):
    """Per-row loss (fp32 [N]) and, if ``need_grad``, dL/dlogits for unit upstream gradient
    ([N, C] in ``rows.stored_grad_dtype``: the logits' dtype, float32 for float16 logits; or written
    into ``grad_out`` when given: in-place mode, which may be ``logits2d`` itself). ``labels``:
    dense [N, C] floats or class indices [N] (int32/int64). ``grad_scale`` (float or 0-d tensor,
    default 1, e.g. 1/count for a mean reduction; or one value per row [N]) multiplies the gradient
    in fp32 before its one rounding. Rows of ignored labels get loss 0 and gradient 0; other class
    indices outside [0, C) get NaN (loss and gradient row), never an out-of-bounds read.
    """
    logits2d = _rows(logits2d)
    n_rows, n_cols = logits2d.shape
    device = logits2d.device
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else torch.empty_like(logits2d, dtype=stored_grad_dtype(logits2d.dtype))
        assert grad.shape == logits2d.shape
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
    scale, stride_scale = _grad_scale(grad_scale, device, n_rows)
    scalars = (_scalar(t1, device), _scalar(t2, device), _scalar(label_smoothing, device), scale)

    def launch(config, loss_out, grad_buffer):
        with _launch_scope(logits2d):
            tempered_loss_kernel[(triton_cdiv(n_rows, config.block_rows),)](
                logits2d, labels, *scalars, k, int(ignore_index),
                n_rows, n_cols,
                logits2d.stride(0), stride_labels, grad_buffer.stride(0) if need_grad else 0, stride_scale,
                loss_out, grad_buffer if need_grad else loss_out,
                LABELS_ARE_INDICES=indices, NEED_GRAD=bool(need_grad), ORIGINAL=original,
                CHUNKED=config.chunked, BLOCK_ROWS=config.block_rows,
                BLOCK_COLS=config.block_cols, MAX_PASSES=launch_config.MAX_PASSES, **config.launch_options(),
            )

    def make_bench():  # scratch outputs: grad may be the logits buffer itself (in place)
        scratch_loss = torch.empty_like(loss)
        scratch_grad = torch.empty_like(grad) if need_grad else None
        return lambda config: launch(config, scratch_loss, scratch_grad)

    config = _row_config("loss", logits2d, n_cols, make_bench,
                         labels="indices" if indices else "dense", need_grad=bool(need_grad),
                         original=original)
    launch(config, loss, grad)
    return loss, grad


def softmax_forward(logits2d, t, num_iters):
    """Tempered softmax of rows [N, C]; probabilities in the logits' dtype."""
    logits2d = _rows(logits2d)
    n_rows, n_cols = logits2d.shape
    probs = torch.empty_like(logits2d, memory_format=torch.contiguous_format)
    if n_rows == 0:
        return probs
    original, k = _solver_args(num_iters)
    t_device = _scalar(t, logits2d.device)

    def launch(config, out):
        with _launch_scope(logits2d):
            tempered_softmax_fwd_kernel[(triton_cdiv(n_rows, config.block_rows),)](
                logits2d, t_device, k, n_rows, n_cols,
                logits2d.stride(0), out.stride(0), out,
                ORIGINAL=original, CHUNKED=config.chunked, BLOCK_ROWS=config.block_rows,
                BLOCK_COLS=config.block_cols, MAX_PASSES=launch_config.MAX_PASSES, **config.launch_options(),
            )

    def make_bench():
        scratch = torch.empty_like(probs)
        return lambda config: launch(config, scratch)

    launch(_row_config("softmax_fwd", logits2d, n_cols, make_bench, original=original), probs)
    return probs


def softmax_backward(probs2d, grad2d, t):
    """Gradient of the logits of the tempered softmax: w - e sum(w), w = g p^t, e = p^t/sum p^t."""
    probs2d, grad2d = _rows(probs2d), _rows(grad2d)
    n_rows, n_cols = probs2d.shape
    out = torch.empty(probs2d.shape, dtype=probs2d.dtype, device=probs2d.device)
    if n_rows == 0:
        return out
    t_device = _scalar(t, probs2d.device)

    def launch(config, result):
        with _launch_scope(probs2d):
            tempered_softmax_bwd_kernel[(triton_cdiv(n_rows, config.block_rows),)](
                probs2d, grad2d, t_device, n_rows, n_cols,
                probs2d.stride(0), grad2d.stride(0), result.stride(0), result,
                CHUNKED=config.chunked, BLOCK_ROWS=config.block_rows,
                BLOCK_COLS=config.block_cols, **config.launch_options(),
            )

    def make_bench():
        scratch = torch.empty_like(out)
        return lambda config: launch(config, scratch)

    launch(_row_config("softmax_bwd", probs2d, n_cols, make_bench), out)
    return out


def _vocab_parallel_launch(kernel, rows2d, *args, **constexprs):
    """One launch of a vocab-parallel kernel over every row of the slice ``rows2d``. Each kernel
    streams a row in BLOCK_COLS chunks: the loss kernel's heuristic gives the chunk (the whole
    padded slice below the on-chip limit, with its rows per program)."""
    config = launch_config.row_config(rows2d.shape[1], rows2d.element_size())
    with _launch_scope(rows2d):
        kernel[(triton_cdiv(rows2d.shape[0], config.block_rows),)](
            *args, **constexprs, BLOCK_ROWS=config.block_rows, BLOCK_COLS=config.block_cols,
            **config.launch_options())


def vocab_parallel_sums(rows2d, row_max, y, t, count_support: bool):
    """This slice's (f, g[, D]) at the normalizer y (fp32 [N, 3]; D only with ``count_support``):
    one solver pass. ``row_max`` and ``y`` are the GLOBAL row max and y = -log p_max, fp32 [N]."""
    n_rows, n_cols = rows2d.shape
    sums = torch.empty(n_rows, 3, dtype=torch.float32, device=rows2d.device)
    _vocab_parallel_launch(partial_sums_kernel, rows2d, rows2d, row_max, y, _scalar(t, rows2d.device), n_rows,
                           n_cols, rows2d.stride(0), sums, COUNT_SUPPORT=bool(count_support))
    return sums


def _epilogue_args(rows2d, labels, row_max, y, t1, t2, label_smoothing):
    device = rows2d.device
    return (rows2d, labels, row_max, y, _scalar(t1, device), _scalar(t2, device), _scalar(label_smoothing, device))


def vocab_parallel_epilogue(rows2d, labels, row_max, y, t1, t2, label_smoothing, num_classes: int):
    """This slice's (loss, sum e, sum d) at the converged y (fp32 [N, 3]). ``labels``: the dense
    slice [N, C_local] or class indices [N] LOCAL to the slice (any value outside [0, C_local)
    matches no class here); the smoothing uses the GLOBAL class count ``num_classes``."""
    n_rows, n_cols = rows2d.shape
    indices = not labels.is_floating_point()
    sums = torch.empty(n_rows, 3, dtype=torch.float32, device=rows2d.device)
    _vocab_parallel_launch(epilogue_sums_kernel, rows2d,
                           *_epilogue_args(rows2d, labels, row_max, y, t1, t2, label_smoothing), int(num_classes),
                           n_rows, n_cols, rows2d.stride(0), 0 if indices else labels.stride(0), sums,
                           LABELS_ARE_INDICES=indices)
    return sums


def vocab_parallel_gradient(rows2d, labels, row_max, y, sums, row_scale, t1, t2, label_smoothing, num_classes: int):
    """This slice's gradient ([N, C_local] in ``rows.stored_grad_dtype``) from the REDUCED (loss,
    sum e, sum d) sums [N, 3], times ``row_scale`` [N] (fp32; 0 for ignored rows, NaN for bad labels)."""
    n_rows, n_cols = rows2d.shape
    indices = not labels.is_floating_point()
    grad = torch.empty(n_rows, n_cols, dtype=stored_grad_dtype(rows2d.dtype), device=rows2d.device)
    _vocab_parallel_launch(gradient_kernel, rows2d,
                           *_epilogue_args(rows2d, labels, row_max, y, t1, t2, label_smoothing), sums, row_scale,
                           int(num_classes), n_rows, n_cols, rows2d.stride(0), 0 if indices else labels.stride(0),
                           grad.stride(0), grad, LABELS_ARE_INDICES=indices)
    return grad


def binary_loss_forward(x1d, y1d, t1, t2, label_smoothing, num_iters, need_grad, grad_scale=None):
    """Binary loss (fp32 [M]) and, if ``need_grad``, grad_scale * dL/dx ([M], x's dtype; grad_scale
    a float or 0-d tensor, default 1, or one value per element [M]; in ``rows.stored_grad_dtype``) of
    logits x and labels y in [0, 1]."""
    n = x1d.shape[0]
    device = x1d.device
    loss = torch.empty(n, dtype=torch.float32, device=device)
    grad = torch.empty(n, dtype=stored_grad_dtype(x1d.dtype), device=device) if need_grad else None
    if n == 0:
        return loss, grad
    original, k = _solver_args(num_iters)
    scale, stride_scale = _grad_scale(grad_scale, device, n)
    scalars = (_scalar(t1, device), _scalar(t2, device), _scalar(label_smoothing, device), scale)

    def launch(config, loss_out, grad_buffer):
        with _launch_scope(x1d):
            tempered_binary_loss_kernel[(triton_cdiv(n, config.block),)](
                x1d, y1d, *scalars,
                k, n, x1d.stride(0), y1d.stride(0), stride_scale, loss_out,
                grad_buffer if need_grad else loss_out,
                NEED_GRAD=bool(need_grad), ORIGINAL=original, BLOCK=config.block,
                MAX_PASSES=launch_config.MAX_PASSES, **config.launch_options(),
            )

    def make_bench():
        scratch_grad = torch.empty_like(grad) if need_grad else None
        scratch_loss = torch.empty_like(loss)
        return lambda config: launch(config, scratch_loss, scratch_grad)

    config = _binary_config("binary_loss", x1d, make_bench, need_grad=bool(need_grad),
                            original=original)
    launch(config, loss, grad)
    return loss, grad


def sigmoid_forward(x1d, t, num_iters):
    """Tempered sigmoid of a 1-D tensor (x's dtype)."""
    n = x1d.shape[0]
    probs = torch.empty(n, dtype=x1d.dtype, device=x1d.device)
    if n == 0:
        return probs
    original, k = _solver_args(num_iters)
    t_device = _scalar(t, x1d.device)

    def launch(config, out):
        with _launch_scope(x1d):
            tempered_sigmoid_fwd_kernel[(triton_cdiv(n, config.block),)](
                x1d, t_device, k, n, x1d.stride(0), out,
                ORIGINAL=original, BLOCK=config.block, MAX_PASSES=launch_config.MAX_PASSES,
                **config.launch_options(),
            )

    def make_bench():
        scratch = torch.empty_like(probs)
        return lambda config: launch(config, scratch)

    launch(_binary_config("sigmoid_fwd", x1d, make_bench, original=original), probs)
    return probs


def sigmoid_backward(probs1d, grad1d, t):
    """dL/dx of the tempered sigmoid from its output p and the upstream gradient."""
    n = probs1d.shape[0]
    out = torch.empty(n, dtype=probs1d.dtype, device=probs1d.device)
    if n == 0:
        return out
    t_device = _scalar(t, probs1d.device)

    def launch(config, result):
        with _launch_scope(probs1d):
            tempered_sigmoid_bwd_kernel[(triton_cdiv(n, config.block),)](
                probs1d, grad1d, t_device, n, probs1d.stride(0), grad1d.stride(0), result,
                BLOCK=config.block, **config.launch_options(),
            )

    def make_bench():
        scratch = torch.empty_like(out)
        return lambda config: launch(config, scratch)

    launch(_binary_config("sigmoid_bwd", probs1d, make_bench), out)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
