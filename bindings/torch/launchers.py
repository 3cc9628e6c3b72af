"""Thin torch launchers of the Triton kernels in ``kernels/`` (no validation, no autograd).

The row kernels take tensors of any rank with the classes on ``class_dim`` (a negative int, -1 by
default) and read them in place, in any layout whose other axes merge into two
(``common/row_layout.py``: rows [N, C] with any row stride, F.cross_entropy's NCHW, channels_last);
only other layouts are copied first. Outputs: per-row values [R] in row order (the rows' shape
flattened), per-class ones allocated ``torch.empty_like`` the input (the logits' own strides when
they are dense). The binary kernels take 1-D tensors. Temperatures and label smoothing may be Python floats or 0-d
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
from bitempered.bindings.common.row_layout import RowLayout, row_layout
from bitempered.bindings.torch.rows import stored_grad_dtype
from bitempered.kernels import launch_config
from bitempered.kernels.binary import (
    tempered_binary_loss_kernel, tempered_sigmoid_bwd_kernel, tempered_sigmoid_fwd_kernel,
)
from bitempered.kernels.loss import tempered_loss_kernel
from bitempered.kernels.softmax import tempered_softmax_bwd_kernel, tempered_softmax_fwd_kernel
from bitempered.kernels.vocab_parallel import (
    epilogue_sums_kernel, gradient_kernel, max_sumexp_kernel, partial_sums_kernel,
)


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


def _row_config(family, x, n_cols, make_bench, layout: RowLayout | None = None, **key):
    """(The device name and the tuning runs are only computed when autotuning is on.) ``layout``:
    the rows' addressing (its first tensor is ``x``); strided classes get their own tiles."""
    strided = layout is not None and layout.strides[0][2] != 1 and n_cols > 1
    return autotune.row_config(family, n_cols, dtype_name(x.dtype), x.element_size(),
                               device=lambda: device_name(x), **key, strided=strided,
                               make_bench=_tunable(x, make_bench))


def _row_grid(layout: RowLayout, config) -> tuple[int]:
    """One program per BLOCK_ROWS consecutive inner rows of each outer index (``row_block``)."""
    return (layout.n_outer * triton_cdiv(layout.n_inner, config.block_rows),)


def _in_place_layout(class_dim: int, inputs: list, outputs: list):
    """(inputs, outputs, layout, finish): tensors the kernel can address together in place
    (``row_layout``), copying only what cannot be: first dense labels (into the logits' layout),
    then everything (contiguous inputs; each output that does not fit gets a contiguous stand-in
    that ``finish()`` copies back). ``inputs[0]`` is the logits (or probabilities)."""
    tensors = inputs + outputs
    layout = row_layout(tensors[0].shape, class_dim, *(t.stride() for t in tensors))
    if layout is None and len(inputs) > 1:
        inputs = inputs[:1] + [torch.empty_like(inputs[0], dtype=x.dtype).copy_(x) for x in inputs[1:]]
        tensors = inputs + outputs
        layout = row_layout(tensors[0].shape, class_dim, *(t.stride() for t in tensors))
    if layout is not None:
        return inputs, outputs, layout, lambda: None
    inputs = [x.contiguous() for x in inputs]
    stand_ins = [y if y.is_contiguous() else torch.empty(y.shape, dtype=y.dtype, device=y.device) for y in outputs]
    tensors = inputs + stand_ins
    layout = row_layout(tensors[0].shape, class_dim, *(t.stride() for t in tensors))

    def finish():
        for y, stand_in in zip(outputs, stand_ins):
            if y is not stand_in:
                y.copy_(stand_in)

    return inputs, stand_ins, layout, finish


def _strides(layout: RowLayout, index: int) -> tuple[int, int, int]:
    return layout.strides[index]


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


def _temperature(value, device, n_rows: int):
    """(fp32 tensor on ``device``, its row stride) of a temperature: a float or 0-d tensor (one
    value, stride 0) or one value per row [R] in row order (stride 1: launched one row per program,
    ``_row_launch_config``)."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        if value.shape != (n_rows,):
            raise ValueError(f"a per-row temperature has one value per row ({n_rows}), got shape "
                             f"{tuple(value.shape)}")
        return value.detach().to(device=device, dtype=torch.float32).contiguous(), 1
    return _scalar(value, device), 0


def _row_launch_config(config, stride_temperature: int):
    """Per-row temperatures (stride 1) run one row per program (``launch_config.one_row_per_program``)."""
    return launch_config.one_row_per_program(config) if stride_temperature else config


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


def loss_forward(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, need_grad,
                 grad_out=None, grad_scale=None, class_dim=-1, temperature_grads=None):
    """Per-row loss (fp32 [R], row order) and, if ``need_grad``, dL/dlogits for unit upstream
    gradient (the logits' shape, allocated ``empty_like`` the logits in ``rows.stored_grad_dtype``:
    the logits' dtype, float32 for float16 logits; or written into ``grad_out`` when given: in-place
    mode, which may be the logits themselves). Classes on ``class_dim``. ``labels``: dense floats of
    the logits' shape, or class indices (int32/int64) of the rows' shape. ``grad_scale`` (float or
    0-d tensor, default 1, e.g. 1/count for a mean reduction; or one value per row [R]) multiplies
    the gradient in fp32 before its one rounding. Rows of ignored labels get loss 0 and gradient 0;
    other class indices outside [0, C) get NaN (loss and gradient row), never an out-of-bounds read.
    ``temperature_grads``: None, or a float32 [R, 2] tensor that receives each row's (dL/dt1, dL/dt2)
    for unit upstream gradient (the kernels' NEED_TEMP_GRAD variant; ignored rows 0).
    """
    n_cols = logits.shape[class_dim]
    n_rows = logits.numel() // max(n_cols, 1)
    device = logits.device
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else torch.empty_like(
            logits, dtype=stored_grad_dtype(logits.dtype))
        assert grad.shape == logits.shape
    if logits.numel() == 0:
        return loss, grad
    indices = not labels.is_floating_point()
    if indices:  # one per row, in row order
        labels = labels.reshape(-1).contiguous()
    inputs, outputs, layout, finish = _in_place_layout(
        class_dim, [logits] + ([] if indices else [labels]), [grad] if need_grad else [])
    logits_in = inputs[0]
    labels_in = labels if indices else inputs[1]
    grad_buffer = outputs[0] if need_grad else None
    label_strides = (layout.n_inner, 1, 0) if indices else _strides(layout, 1)
    need_temp_grad = temperature_grads is not None
    if need_temp_grad:
        assert temperature_grads.shape == (n_rows, 2) and temperature_grads.dtype == torch.float32
        assert temperature_grads.is_contiguous()
    grad_strides = _strides(layout, len(inputs)) if need_grad else (0, 0, 0)
    original, k = _solver_args(num_iters)
    scale, stride_scale = _grad_scale(grad_scale, device, n_rows)
    (t1_device, stride_t1), (t2_device, stride_t2) = (_temperature(t, device, n_rows) for t in (t1, t2))
    if stride_t1 != stride_t2:  # one per row for both (the kernel takes one temperature stride)
        t1_device, t2_device = (t.expand(n_rows).contiguous() for t in (t1_device, t2_device))
    stride_temperature = max(stride_t1, stride_t2)
    scalars = (t1_device, t2_device, _scalar(label_smoothing, device), scale)

    def launch(config, loss_out, grad_target, dt_target):
        with _launch_scope(logits_in):
            tempered_loss_kernel[_row_grid(layout, config)](
                logits_in, labels_in, *scalars, k, int(ignore_index),
                layout.n_inner, n_cols,
                *_strides(layout, 0), *label_strides, *grad_strides, stride_scale, stride_temperature,
                loss_out, grad_target if need_grad else loss_out, dt_target if need_temp_grad else loss_out,
                LABELS_ARE_INDICES=indices, NEED_GRAD=bool(need_grad), NEED_TEMP_GRAD=need_temp_grad,
                ORIGINAL=original,
                CHUNKED=config.chunked, BLOCK_ROWS=config.block_rows,
                BLOCK_COLS=config.block_cols, MAX_PASSES=launch_config.MAX_PASSES, **config.launch_options(),
            )

    def make_bench():  # scratch outputs: grad may be the logits buffer itself (in place)
        scratch_loss = torch.empty_like(loss)
        scratch_grad = torch.empty_like(grad_buffer) if need_grad else None
        scratch_dt = torch.empty_like(temperature_grads) if need_temp_grad else None
        return lambda config: launch(config, scratch_loss, scratch_grad, scratch_dt)

    config = _row_config("loss", logits_in, n_cols, make_bench, layout,
                         labels="indices" if indices else "dense", need_grad=bool(need_grad),
                         original=original)
    config = launch_config.fit_loss_variant(config, not indices, need_temp_grad)
    launch(_row_launch_config(config, stride_temperature), loss, grad_buffer, temperature_grads)
    finish()
    return loss, grad


def softmax_forward(logits, t, num_iters, class_dim=-1):
    """Tempered softmax over ``class_dim``; probabilities in the logits' dtype and shape
    (allocated ``empty_like`` the logits)."""
    probs = torch.empty_like(logits)
    if logits.numel() == 0:
        return probs
    n_cols = logits.shape[class_dim]
    (logits_in,), (out,), layout, finish = _in_place_layout(class_dim, [logits], [probs])
    original, k = _solver_args(num_iters)
    t_device, stride_t = _temperature(t, logits.device, layout.n_rows)

    def launch(config, target):
        with _launch_scope(logits_in):
            tempered_softmax_fwd_kernel[_row_grid(layout, config)](
                logits_in, t_device, stride_t, k, layout.n_inner, n_cols,
                *_strides(layout, 0), *_strides(layout, 1), target,
                ORIGINAL=original, CHUNKED=config.chunked, BLOCK_ROWS=config.block_rows,
                BLOCK_COLS=config.block_cols, MAX_PASSES=launch_config.MAX_PASSES, **config.launch_options(),
            )

    def make_bench():
        scratch = torch.empty_like(out)
        return lambda config: launch(config, scratch)

    config = _row_config("softmax_fwd", logits_in, n_cols, make_bench, layout, original=original)
    launch(_row_launch_config(config, stride_t), out)
    finish()
    return probs


def softmax_backward(probs, grad, t, class_dim=-1, temperature_grad=None):
    """Gradient of the logits of the tempered softmax: w - e sum(w), w = g p^t, e = p^t/sum p^t
    (the probabilities' shape, allocated ``empty_like`` them). ``temperature_grad``: None, or a
    float32 [R] tensor that receives each row's part of the gradient of t (docs/math.md)."""
    result = torch.empty_like(probs)
    if probs.numel() == 0:
        return result
    n_cols = probs.shape[class_dim]
    (probs_in, grad_in), (out,), layout, finish = _in_place_layout(class_dim, [probs, grad], [result])
    t_device, stride_t = _temperature(t, probs.device, layout.n_rows)
    need_temp_grad = temperature_grad is not None
    if need_temp_grad:
        assert temperature_grad.shape == (layout.n_rows,) and temperature_grad.dtype == torch.float32

    def launch(config, target):
        with _launch_scope(probs_in):
            tempered_softmax_bwd_kernel[_row_grid(layout, config)](
                probs_in, grad_in, t_device, stride_t, layout.n_inner, n_cols,
                *_strides(layout, 0), *_strides(layout, 1), *_strides(layout, 2), target,
                temperature_grad if need_temp_grad else target,
                CHUNKED=config.chunked, NEED_TEMP_GRAD=need_temp_grad, BLOCK_ROWS=config.block_rows,
                BLOCK_COLS=config.block_cols, **config.launch_options(),
            )

    def make_bench():
        scratch = torch.empty_like(out)
        return lambda config: launch(config, scratch)

    launch(_row_launch_config(_row_config("softmax_bwd", probs_in, n_cols, make_bench, layout), stride_t), out)
    finish()
    return result


def _vocab_parallel_launch(kernel, logits, layout: RowLayout, n_cols: int, *args, **constexprs):
    """One launch of a vocab-parallel kernel over every row of the slice ``logits``. Each kernel
    streams a row in BLOCK_COLS chunks: the loss kernel's heuristic gives the chunk (the whole
    padded slice below the on-chip limit, with its rows per program); the epilogue's temperature
    variant has its own (``launch_config.temperature_sums_config``)."""
    strided = layout.strides[0][2] != 1 and n_cols > 1
    config = launch_config.row_config(n_cols, logits.element_size(), strided)
    if constexprs.get("NEED_TEMP_GRAD"):
        config = launch_config.temperature_sums_config(n_cols)
    with _launch_scope(logits):
        kernel[_row_grid(layout, config)](
            *args, **constexprs, BLOCK_ROWS=config.block_rows, BLOCK_COLS=config.block_cols,
            **config.launch_options())


def vocab_parallel_max_sumexp(logits, class_dim=-1):
    """This slice's (max m, sum exp(a - m)) per row, fp32 [R, 2] in row order, from one read of
    the slice (``max_sumexp_kernel``): at t = 1 the max sweep and the solver's one pass together."""
    n_cols = logits.shape[class_dim]
    (logits_in,), _, layout, _ = _in_place_layout(class_dim, [logits], [])
    out = torch.empty(layout.n_rows, 2, dtype=torch.float32, device=logits.device)
    _vocab_parallel_launch(max_sumexp_kernel, logits_in, layout, n_cols, logits_in, layout.n_inner, n_cols,
                           *_strides(layout, 0), out)
    return out


def vocab_parallel_sums(logits, row_max, y, t, count_support: bool, class_dim=-1):
    """This slice's (f, g[, D]) at the normalizer y (fp32 [R, 3]; D only with ``count_support``):
    one solver pass. ``logits``: the slice, classes on ``class_dim`` (read in place where
    ``row_layout`` allows); ``row_max`` and ``y`` are the GLOBAL row max and y = -log p_max, fp32 [R]
    in row order."""
    n_cols = logits.shape[class_dim]
    (logits_in,), _, layout, _ = _in_place_layout(class_dim, [logits], [])
    sums = torch.empty(layout.n_rows, 3, dtype=torch.float32, device=logits.device)
    _vocab_parallel_launch(partial_sums_kernel, logits_in, layout, n_cols, logits_in, row_max, y,
                           _scalar(t, logits.device), layout.n_inner, n_cols, *_strides(layout, 0), sums,
                           COUNT_SUPPORT=bool(count_support))
    return sums


def _vocab_parallel_inputs(logits, labels, class_dim, outputs=()):
    """(inputs, outputs, layout, finish, label strides) of the epilogue and gradient launches:
    class indices one per row (row order), dense labels addressed with the logits."""
    indices = not labels.is_floating_point()
    if indices:
        labels = labels.reshape(-1).contiguous()
    inputs, outputs, layout, finish = _in_place_layout(class_dim, [logits] + ([] if indices else [labels]),
                                                       list(outputs))
    label_strides = (layout.n_inner, 1, 0) if indices else _strides(layout, 1)
    return inputs[0], (labels if indices else inputs[1]), outputs, layout, finish, label_strides, indices


def _epilogue_scalars(device, t1, t2, label_smoothing):
    return (_scalar(t1, device), _scalar(t2, device), _scalar(label_smoothing, device))


def vocab_parallel_epilogue(logits, labels, row_max, y, t1, t2, label_smoothing, num_classes: int, class_dim=-1,
                            need_temperature_grads=False):
    """This slice's (loss, sum e, sum d) at the converged y (fp32 [R, 3]); with
    ``need_temperature_grads`` [R, 6], + the slice's (dL/dt1, sum A, sum E): once reduced, a row's
    dL/dt2 = sum A - sum d sum E / sum e (``kernels/vocab_parallel.py``). ``labels``: the dense
    slice (the logits' shape) or class indices (the rows' shape) LOCAL to the slice (any value
    outside [0, C_local) matches no class here); the smoothing uses the GLOBAL class count
    ``num_classes``."""
    n_cols = logits.shape[class_dim]
    logits_in, labels_in, _, layout, _, label_strides, indices = _vocab_parallel_inputs(logits, labels, class_dim)
    sums = torch.empty(layout.n_rows, 6 if need_temperature_grads else 3, dtype=torch.float32, device=logits.device)
    _vocab_parallel_launch(epilogue_sums_kernel, logits_in, layout, n_cols, logits_in, labels_in, row_max, y,
                           *_epilogue_scalars(logits.device, t1, t2, label_smoothing), int(num_classes),
                           layout.n_inner, n_cols, *_strides(layout, 0), *label_strides, sums,
                           LABELS_ARE_INDICES=indices, NEED_TEMP_GRAD=bool(need_temperature_grads))
    return sums


def vocab_parallel_gradient(logits, labels, row_max, y, sums, row_scale, t1, t2, label_smoothing, num_classes: int,
                            class_dim=-1):
    """This slice's gradient (the logits' shape, ``empty_like`` them in ``rows.stored_grad_dtype``)
    from the REDUCED (loss, sum e, sum d) sums [R, 3] (the first three columns of [R, 6]), times
    ``row_scale`` [R] (fp32; 0 for ignored rows, NaN for bad labels)."""
    n_cols = logits.shape[class_dim]
    sums = sums[:, :3].contiguous()
    grad = torch.empty_like(logits, dtype=stored_grad_dtype(logits.dtype))
    logits_in, labels_in, (grad_out,), layout, finish, label_strides, indices = _vocab_parallel_inputs(
        logits, labels, class_dim, [grad])
    _vocab_parallel_launch(gradient_kernel, logits_in, layout, n_cols, logits_in, labels_in, row_max, y,
                           *_epilogue_scalars(logits.device, t1, t2, label_smoothing), sums, row_scale,
                           int(num_classes), layout.n_inner, n_cols, *_strides(layout, 0), *label_strides,
                           *_strides(layout, 2 if not indices else 1), grad_out, LABELS_ARE_INDICES=indices)
    finish()
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
