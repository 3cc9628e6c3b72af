"""jax-triton launchers of the kernels in ``kernels/`` (the same kernels PyTorch launches).

Imported lazily by ``bindings/jax/ops.py`` (and ``vocab_parallel.py``) only when the Triton backend
is traced: ``jax_triton`` fails to import where jaxlib has no GPU support. The row kernels take
arrays of any rank with the classes on ``axis`` (a negative int, -1 by default), read in place: JAX
arrays are row-major, so the axes before the class axis are the kernels' outer rows and those after
it the inner ones, with class stride = their size (``common/row_layout.py``; 1 for rows [N, C]).
Per-row outputs are [R] in row order. The binary kernels take 1-D arrays.

jax-triton passes Python scalars to the kernel as compile-time values, so temperatures, label
smoothing and the gradient scale travel as 1-element fp32 arrays that the kernels ``tl.load``:
a traced temperature schedule compiles once. Sizes and ``num_iters`` are static anyway.
``triton_call`` has no batching or differentiation rule: ``bindings/jax/ops.py`` keeps these calls
inside its ``custom_vjp`` and folds ``vmap`` batches into the row dimension.

No launch happens here: ``triton_call`` runs at trace time and puts the compiled kernel in the
program as an XLA custom call on the GPU (jax-triton compiles; it never runs Triton's
interpreter). So these calls take no interpreter lock (``bindings/common/interpreter.py``): here
it would serialize tracing, not launches. A stand-in that does launch on the interpreter
(``tests/test_jax_triton.py``, through ``jax.pure_callback``) takes that lock around each launch,
as the torch launchers do.

Launch configurations: the heuristic, or with autotuning on the best one cached by the torch
launchers / ``python -m bitempered.tune`` for this device (``autotune.py``). Nothing is timed
here: these calls run inside traces. jax-triton has no ``maxnreg`` option, so a cached config's
register cap is not applied (num_warps, num_stages and the block sizes are).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitempered.bindings.common import autotune
from bitempered.bindings.common.row_layout import RowLayout, row_layout, row_major_strides
from bitempered.kernels import launch_config
from bitempered.kernels.binary import (
    tempered_binary_loss_kernel, tempered_sigmoid_bwd_kernel, tempered_sigmoid_fwd_kernel,
)
from bitempered.kernels.loss import tempered_loss_kernel
from bitempered.kernels.softmax import tempered_softmax_bwd_kernel, tempered_softmax_fwd_kernel
from bitempered.kernels.vocab_parallel import (
    epilogue_sums_kernel, gradient_kernel, max_sumexp_kernel, partial_sums_kernel,
)


def _triton_call(*args, **kwargs):
    import jax_triton  # lazy: see the module docstring

    return jax_triton.triton_call(*args, **kwargs)


def _scalar(value) -> jax.Array:
    return jnp.asarray(value, jnp.float32).reshape(1)


def _temperature(value, n_rows: int):
    """(fp32 array, its row stride) of a temperature: a scalar (one value, stride 0) or one value per
    row [R] in row order (stride 1: launched one row per program, ``_per_row_config``)."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 1 and value.size != 1:
        if value.shape != (n_rows,):
            raise ValueError(f"a per-row temperature has one value per row ({n_rows}), got shape {value.shape}")
        return value, 1
    return value.reshape(1), 0


def _per_row_config(config, stride_temperature: int):
    """Per-row temperatures (stride 1) run one row per program (``launch_config.one_row_per_program``)."""
    return launch_config.one_row_per_program(config) if stride_temperature else config


def _solver(num_iters):
    """(ORIGINAL flag, steps) for num_iters None (converged) or k."""
    return (False, 1) if num_iters is None else (True, int(num_iters))


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _shape(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def device_name() -> str:
    """The autotune cache's device name: the GPU jax-triton launches on, or the interpreter."""
    if autotune.interpreted() or jax.default_backend() != "gpu":
        return autotune.INTERPRETER_DEVICE
    return jax.devices()[0].device_kind


def _row_config(family, x, axis: int, layout: RowLayout, **key):
    dtype = jnp.dtype(x.dtype)
    n_cols = x.shape[axis]
    return autotune.row_config(family, n_cols, dtype.name, dtype.itemsize, device=device_name(), **key,
                               strided=layout.strides[0][2] != 1 and n_cols > 1)


def _layout(shape, axis: int) -> RowLayout:
    """The kernels' (outer, inner, class) addressing of row-major arrays of ``shape`` (always
    possible: the axes before and after the class axis each merge)."""
    return row_layout(shape, axis, row_major_strides(shape))


def _grid(layout: RowLayout, config) -> tuple[int]:
    return (layout.n_outer * _cdiv(layout.n_inner, config.block_rows),)


def _binary_config(family, x, **key):
    return autotune.binary_config(family, jnp.dtype(x.dtype).name, device=device_name(), **key)


def _options(config) -> dict:
    """triton_call's launch keywords (it takes no maxnreg)."""
    options = {"num_warps": config.num_warps}
    if config.num_stages is not None:
        options["num_stages"] = config.num_stages
    return options


def loss_rows(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index, need_grad, axis=-1,
              need_temperature_grads=False):
    """(per-row loss fp32 [R] in row order, dL/dlogits for unit upstream gradient fp32 of the
    logits' shape, or None); classes on ``axis``; ``labels``: dense of the logits' shape or class
    indices of the rows' shape; ``ignore_index``: an int, or None (no row ignored).

    The gradient is kept in fp32 so that the backward rule rounds once into the logits' dtype
    after multiplying by the upstream gradient (SPEC "Precision"). ``need_temperature_grads``: a
    third output, each row's (dL/dt1, dL/dt2) for unit upstream gradient, fp32 [R, 2].
    """
    n_cols = logits.shape[axis]
    layout = _layout(logits.shape, axis)
    n_rows = layout.n_rows
    strides = layout.strides[0]
    indices = jnp.issubdtype(labels.dtype, jnp.integer)
    if indices:
        labels = labels.reshape(-1)
    if ignore_index is None:  # no row ignored: the kernel's ignore_index must equal no label
        if indices:  # out-of-range indices stay out of range (-1 or C: NaN rows); none is -2
            labels = jnp.clip(labels, -1, n_cols).astype(jnp.int32)
        ignore_index = -2
    original, steps = _solver(num_iters)
    (t1, stride_t1), (t2, stride_t2) = _temperature(t1, n_rows), _temperature(t2, n_rows)
    stride_temperature = max(stride_t1, stride_t2)
    if stride_t1 != stride_t2:  # one per row for both (the kernel takes one temperature stride)
        t1, t2 = jnp.broadcast_to(t1, (n_rows,)), jnp.broadcast_to(t2, (n_rows,))
    config = _row_config("loss", logits, axis, layout, labels="indices" if indices else "dense",
                         need_grad=bool(need_grad), original=original)
    config = _per_row_config(launch_config.fit_loss_variant(config, not indices, bool(need_temperature_grads)),
                             stride_temperature)
    grad_shape = logits.shape if need_grad else (1,)
    dt_shape = (n_rows, 2) if need_temperature_grads else (1,)
    loss, grad, dt = _triton_call(
        logits, labels, t1, t2, _scalar(label_smoothing), _scalar(1.0),
        steps, ignore_index,
        layout.n_inner, n_cols,
        *strides, *((layout.n_inner, 1, 0) if indices else strides), *(strides if need_grad else (0, 0, 0)), 0,
        stride_temperature,
        kernel=tempered_loss_kernel,
        out_shape=[_shape((n_rows,), jnp.float32), _shape(grad_shape, jnp.float32), _shape(dt_shape, jnp.float32)],
        grid=_grid(layout, config), **_options(config),
        LABELS_ARE_INDICES=bool(indices), NEED_GRAD=bool(need_grad),
        NEED_TEMP_GRAD=bool(need_temperature_grads), ORIGINAL=original,
        CHUNKED=config.chunked, BLOCK_ROWS=config.block_rows, BLOCK_COLS=config.block_cols,
        MAX_PASSES=launch_config.MAX_PASSES,
    )
    if need_temperature_grads:
        return loss, (grad if need_grad else None), dt
    return loss, (grad if need_grad else None)


def softmax_forward(logits, t, num_iters, axis=-1):
    layout = _layout(logits.shape, axis)
    original, steps = _solver(num_iters)
    t, stride_t = _temperature(t, layout.n_rows)
    config = _per_row_config(_row_config("softmax_fwd", logits, axis, layout, original=original), stride_t)
    strides = layout.strides[0]
    return _triton_call(
        logits, t, stride_t, steps, layout.n_inner, logits.shape[axis], *strides, *strides,
        kernel=tempered_softmax_fwd_kernel,
        out_shape=_shape(logits.shape, logits.dtype),
        grid=_grid(layout, config), **_options(config),
        ORIGINAL=original, CHUNKED=config.chunked, BLOCK_ROWS=config.block_rows,
        BLOCK_COLS=config.block_cols, MAX_PASSES=launch_config.MAX_PASSES,
    )


def softmax_backward(probs, grad, t, axis=-1, need_temperature_grad=False):
    """The logits' gradient (probs' shape and dtype); with ``need_temperature_grad`` also each
    row's part of the gradient of t (fp32 [R])."""
    layout = _layout(probs.shape, axis)
    t, stride_t = _temperature(t, layout.n_rows)
    config = _per_row_config(_row_config("softmax_bwd", probs, axis, layout), stride_t)
    strides = layout.strides[0]
    grad_logits, dt = _triton_call(
        probs, grad, t, stride_t, layout.n_inner, probs.shape[axis], *strides, *strides, *strides,
        kernel=tempered_softmax_bwd_kernel,
        out_shape=[_shape(probs.shape, probs.dtype),
                   _shape((layout.n_rows,) if need_temperature_grad else (1,), jnp.float32)],
        grid=_grid(layout, config), **_options(config),
        CHUNKED=config.chunked, NEED_TEMP_GRAD=bool(need_temperature_grad), BLOCK_ROWS=config.block_rows,
        BLOCK_COLS=config.block_cols,
    )
    return (grad_logits, dt) if need_temperature_grad else grad_logits


def binary_loss(x, y, t1, t2, label_smoothing, num_iters, need_grad):
    """(loss fp32 [M], dL/dx fp32 [M] for unit upstream gradient or None) of 1-D x and y."""
    (n,) = x.shape
    original, steps = _solver(num_iters)
    config = _binary_config("binary_loss", x, need_grad=bool(need_grad), original=original)
    loss, grad = _triton_call(
        x, y, _scalar(t1), _scalar(t2), _scalar(label_smoothing), _scalar(1.0),
        steps, n, 1, 1, 0,
        kernel=tempered_binary_loss_kernel,
        out_shape=[_shape((n,), jnp.float32), _shape((n,) if need_grad else (1,), jnp.float32)],
        grid=(_cdiv(n, config.block),), **_options(config),
        NEED_GRAD=bool(need_grad), ORIGINAL=original, BLOCK=config.block,
        MAX_PASSES=launch_config.MAX_PASSES,
    )
    return loss, (grad if need_grad else None)


def sigmoid_forward(x, t, num_iters):
    (n,) = x.shape
    original, steps = _solver(num_iters)
    config = _binary_config("sigmoid_fwd", x, original=original)
    return _triton_call(
        x, _scalar(t), steps, n, 1,
        kernel=tempered_sigmoid_fwd_kernel,
        out_shape=_shape(x.shape, x.dtype),
        grid=(_cdiv(n, config.block),), **_options(config),
        ORIGINAL=original, BLOCK=config.block, MAX_PASSES=launch_config.MAX_PASSES,
    )


def sigmoid_backward(probs, grad, t):
    (n,) = probs.shape
    config = _binary_config("sigmoid_bwd", probs)
    return _triton_call(
        probs, grad, _scalar(t), n, 1, 1,
        kernel=tempered_sigmoid_bwd_kernel,
        out_shape=_shape(probs.shape, probs.dtype),
        grid=(_cdiv(n, config.block),), **_options(config), BLOCK=config.block,
    )


# --------------------------------------------------------------------------------------------
# Vocab-parallel kernels (``bindings/jax/vocab_parallel.py``): the logits slice with classes on
# ``axis`` (read in place, as the loss kernel), the GLOBAL row max and y (fp32 [R], row order); the
# loss kernel's heuristic gives the chunk width, as in torch.
# --------------------------------------------------------------------------------------------

def _vocab_parallel_call(kernel, logits, axis, layout: RowLayout, *args, out_shape, **constexprs):
    n_cols = logits.shape[axis]
    strided = layout.strides[0][2] != 1 and n_cols > 1
    config = launch_config.row_config(n_cols, jnp.dtype(logits.dtype).itemsize, strided)
    if constexprs.get("NEED_TEMP_GRAD"):  # the epilogue's temperature variant: its own tiles
        config = launch_config.temperature_sums_config(n_cols)
    return _triton_call(*args, kernel=kernel, out_shape=out_shape, grid=_grid(layout, config),
                        **_options(config), **constexprs, BLOCK_ROWS=config.block_rows,
                        BLOCK_COLS=config.block_cols)


def vocab_parallel_max_sumexp(logits, axis=-1):
    """This slice's (max m, sum exp(a - m)) per row, fp32 [R, 2] in row order, from one read."""
    layout = _layout(logits.shape, axis)
    return _vocab_parallel_call(max_sumexp_kernel, logits, axis, layout, logits, layout.n_inner, logits.shape[axis],
                                *layout.strides[0], out_shape=_shape((layout.n_rows, 2), jnp.float32))


def vocab_parallel_sums(logits, row_max, y, t, count_support: bool, axis=-1):
    """This slice's (f, g[, D]) at y, fp32 [R, 3] (column 2 is written only with ``count_support``)."""
    layout = _layout(logits.shape, axis)
    return _vocab_parallel_call(partial_sums_kernel, logits, axis, layout, logits, row_max, y, _scalar(t),
                                layout.n_inner, logits.shape[axis], *layout.strides[0],
                                out_shape=_shape((layout.n_rows, 3), jnp.float32), COUNT_SUPPORT=bool(count_support))


def _epilogue_operands(logits, labels, axis, layout: RowLayout):
    """(labels, label strides, indices?): class indices one per row (row order), dense labels
    addressed as the logits (same shape, row-major)."""
    indices = jnp.issubdtype(labels.dtype, jnp.integer)
    if indices:
        return labels.reshape(-1), (layout.n_inner, 1, 0), True
    return labels, layout.strides[0], False


def vocab_parallel_epilogue(logits, labels, row_max, y, t1, t2, label_smoothing, num_classes: int, axis=-1,
                            need_temperature_grads=False):
    """This slice's (loss, sum e, sum d) at the converged y, fp32 [R, 3]; with
    ``need_temperature_grads`` [R, 6], + the slice's (dL/dt1, sum A, sum E) (reduced: dL/dt2 =
    sum A - sum d sum E / sum e); ``labels``: the dense slice or class indices LOCAL to the slice
    (outside [0, C_local): no class here)."""
    layout = _layout(logits.shape, axis)
    labels, label_strides, indices = _epilogue_operands(logits, labels, axis, layout)
    return _vocab_parallel_call(
        epilogue_sums_kernel, logits, axis, layout, logits, labels, row_max, y, _scalar(t1), _scalar(t2),
        _scalar(label_smoothing), int(num_classes), layout.n_inner, logits.shape[axis], *layout.strides[0],
        *label_strides, out_shape=_shape((layout.n_rows, 6 if need_temperature_grads else 3), jnp.float32),
        LABELS_ARE_INDICES=bool(indices), NEED_TEMP_GRAD=bool(need_temperature_grads))


def vocab_parallel_gradient(logits, labels, row_max, y, sums, row_scale, t1, t2, label_smoothing, num_classes: int,
                            axis=-1):
    """This slice's gradient, fp32 of the logits' shape, from the REDUCED sums [R, 3] times
    ``row_scale`` [R] (fp32 so that the backward rule rounds once into the logits' dtype, as
    ``loss_rows``); [R, 6] sums: their first three columns."""
    layout = _layout(logits.shape, axis)
    labels, label_strides, indices = _epilogue_operands(logits, labels, axis, layout)
    sums = sums[:, :3]
    return _vocab_parallel_call(
        gradient_kernel, logits, axis, layout, logits, labels, row_max, y, _scalar(t1), _scalar(t2),
        _scalar(label_smoothing), sums, row_scale, int(num_classes), layout.n_inner, logits.shape[axis],
        *layout.strides[0], *label_strides, *layout.strides[0],
        out_shape=_shape(logits.shape, jnp.float32), LABELS_ARE_INDICES=bool(indices))
