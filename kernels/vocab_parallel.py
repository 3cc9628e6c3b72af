"""Vocab-parallel kernels: the fused loss split where the classes are sharded across devices.

A device holds a slice [N, C_local] of the classes, so a row's sums must be all-reduced before
the solver (or the gradient) can use them. The fused kernel of ``loss.py`` is therefore split at
each reduction; the launcher runs the one solver's per-row update between the launches:

- ``max_sumexp_kernel`` (t = 1): this slice's max and sum exp(a - max) in one read; rescaled to
  the global max they give the solver's passes at t = 1 in closed form (f(y) = e^-y f(0)), so
  no ``partial_sums_kernel`` launch reads the slice;
- ``partial_sums_kernel``: (f, g) of this slice at a given normalizer y (one solver pass), plus
  the support count D of the slice (first pass, t < 1) from the same read;
- ``epilogue_sums_kernel``: this slice's part of the loss, sum e and sum d at the converged y
  (and, in its NEED_TEMP_GRAD variant, the slice's parts of the temperature gradients' row sums:
  dL/dt1, sum A and sum E of ``loss.temperature_sums``; dL/dt2 = sum A - sum d sum E / sum e
  once they are reduced);
- ``gradient_kernel``: the gradient of this slice from the reduced sums, d - e / sum(e) * sum(d),
  times the per-row scale (0 for ignored rows, NaN for bad labels).

Inputs of every kernel: the logits slice (native dtype, any layout addressed as (outer, inner,
class) like the other row kernels: ``tempered_math.row_block``), the GLOBAL row max and
y = -log p_max in natural units (fp32 [N], row order). Temperatures and label smoothing are
1-element fp32 arrays (loaded, as in ``loss.py``: a traced or 0-d tensor value compiles once);
smoothing uses the GLOBAL class count ``num_classes``. Every pass streams the row in BLOCK_COLS
chunks through the helpers of ``tempered_math.py`` (the Y of those helpers is y log2 e).
"""

import triton
import triton.language as tl

from .loss import label_tile, temperature_sums
from .tempered_math import (
    LOG2E, evaluate, grad_terms, load_shifted, loss_terms, row_block, row_max_chunked, safe_reciprocal,
    smoothing_coefficients, streamed_sums,
)


@triton.jit
def max_sumexp_kernel(
    # input pointer: logits slice (rows x C_local)
    logits_ptr,
    # sizes (rows as (outer, inner): ``row_block``), strides (elements: outer, inner, class)
    n_inner, n_cols, stride_logits_outer, stride_logits_inner, stride_logits_class,
    # output pointer: [N, 2] fp32 (this slice's max m and sum exp(a - m), online as in the fused loss)
    out_ptr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows, row_mask, outer, inner = row_block(n_inner, BLOCK_ROWS)
    row_ptr = logits_ptr + outer * stride_logits_outer + inner * stride_logits_inner
    mx, _y_start, _n_pos, f0 = row_max_chunked(row_ptr, stride_logits_class, row_mask, n_cols, 0.0, 0.0,
                                               BLOCK_ROWS, BLOCK_COLS)
    out = out_ptr + rows * 2
    tl.store(out, mx, mask=row_mask)
    tl.store(out + 1, f0, mask=row_mask)


@triton.jit
def partial_sums_kernel(
    # input pointers: logits slice (rows x C_local); global row max [N] and y [N] (fp32); the
    # temperature [1] (fp32)
    logits_ptr, row_max_ptr, y_ptr, t_ptr,
    # sizes (rows as (outer, inner): ``row_block``), strides (elements: outer, inner, class)
    n_inner, n_cols, stride_logits_outer, stride_logits_inner, stride_logits_class,
    # output pointer: [N, 3] fp32 (f, g, D of this slice; D written only with COUNT_SUPPORT)
    sums_ptr,
    COUNT_SUPPORT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows, row_mask, outer, inner = row_block(n_inner, BLOCK_ROWS)
    row_ptr = logits_ptr + outer * stride_logits_outer + inner * stride_logits_inner
    mx = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0)
    y2 = tl.load(y_ptr + rows, mask=row_mask, other=0.0) * LOG2E
    one_minus_t = 1.0 - tl.load(t_ptr)
    inv_one_minus_t = safe_reciprocal(one_minus_t)
    # one read of the slice: the support count rides along the pass (unused sums compile away)
    f, g, _h, _s1, _s0, count = streamed_sums(y2, row_ptr, stride_logits_class, row_mask, mx, n_cols, one_minus_t,
                                              inv_one_minus_t, 0.0, BLOCK_COLS)
    out = sums_ptr + rows * 3
    tl.store(out, f, mask=row_mask)
    tl.store(out + 1, g, mask=row_mask)
    if COUNT_SUPPORT:  # the slice's count (the >= 1 floor applies to the reduced D)
        tl.store(out + 2, count, mask=row_mask)


@triton.jit
def _row_state(row_max_ptr, y_ptr, label_rows, row_mask, LABELS_ARE_INDICES: tl.constexpr, rows):
    """Per-row (global max, Y = y log2 e, class index) of the epilogue and gradient kernels (the
    index is the row number, unused, for dense labels); ``label_rows``: each row's label pointer."""
    mx = tl.load(row_max_ptr + rows, mask=row_mask, other=0.0)
    y2 = tl.load(y_ptr + rows, mask=row_mask, other=0.0) * LOG2E
    idx = rows
    if LABELS_ARE_INDICES:
        idx = tl.load(label_rows, mask=row_mask, other=-1)
    return mx, y2, idx


@triton.jit
def _settings(t1_ptr, t2_ptr, smoothing_ptr, num_classes):
    """(t1, t2, scale, add) of the epilogue and gradient kernels: y <- scale y + add with the
    GLOBAL class count."""
    scale, add = smoothing_coefficients(tl.load(smoothing_ptr), num_classes)
    return tl.load(t1_ptr), tl.load(t2_ptr), scale, add


@triton.jit
def _epilogue_chunk(row_ptr, stride_class, label_row_ptr, stride_labels_class, idx, row_mask, cols, n_cols, mx,
                    y2, t2, scale, add, one_minus_t1, inv_one_minus_t1, two_minus_t1,
                    LABELS_ARE_INDICES: tl.constexpr):
    """(y, log_t1 y, y^(2-t1), log2 p, p, mask) of one chunk of a slice at the converged Y."""
    a0, mask = load_shifted(row_ptr, stride_class, row_mask, cols, n_cols, mx)
    one_minus_t2 = 1.0 - t2
    log2_p, p, _ = evaluate(a0, y2, one_minus_t2, safe_reciprocal(one_minus_t2))
    y, log_t_y, pow_y = label_tile(label_row_ptr, stride_labels_class, idx, mask, cols, scale, add, one_minus_t1, inv_one_minus_t1,
                                   two_minus_t1, LABELS_ARE_INDICES)
    return y, log_t_y, pow_y, log2_p, p, mask


@triton.jit
def epilogue_sums_kernel(
    # input pointers: logits slice (rows x C_local); labels: dense slice of its layout or class
    # indices (one per row, row order) LOCAL to the slice (the global index minus the slice's first class; may be outside
    # [0, C_local)); global row max [N] and converged y [N]; temperatures and label smoothing
    # [1] (all fp32)
    logits_ptr, labels_ptr, row_max_ptr, y_ptr, t1_ptr, t2_ptr, smoothing_ptr,
    # sizes (num_classes: the GLOBAL C, for the smoothing), strides (elements: outer, inner, class;
    # class indices: (n_inner, 1, 0))
    num_classes, n_inner, n_cols, stride_logits_outer, stride_logits_inner, stride_logits_class,
    stride_labels_outer, stride_labels_inner, stride_labels_class,
    # output pointer: [N, 3] fp32 (loss, sum e, sum d of this slice); with NEED_TEMP_GRAD [N, 6]:
    # + (dL/dt1, sum A, sum E) of this slice
    sums_ptr,
    LABELS_ARE_INDICES: tl.constexpr, NEED_TEMP_GRAD: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows, row_mask, outer, inner = row_block(n_inner, BLOCK_ROWS)
    row_ptr = logits_ptr + outer * stride_logits_outer + inner * stride_logits_inner
    label_rows = labels_ptr + outer * stride_labels_outer + inner * stride_labels_inner
    mx, y2, idx = _row_state(row_max_ptr, y_ptr, label_rows, row_mask, LABELS_ARE_INDICES, rows)
    t1, t2, scale, add = _settings(t1_ptr, t2_ptr, smoothing_ptr, num_classes)
    one_minus_t1 = 1.0 - t1
    inv_one_minus_t1 = safe_reciprocal(one_minus_t1)
    two_minus_t1 = 2.0 - t1
    loss = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    sum_e = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    sum_d = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    dt1 = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    sum_a = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    sum_big_e = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    one_minus_t2 = 1.0 - t2
    inv_one_minus_t2 = safe_reciprocal(one_minus_t2)
    cols = tl.arange(0, BLOCK_COLS)[None, :]
    for start in range(0, n_cols, BLOCK_COLS):
        y, log_t_y, pow_y, log2_p, p, mask = _epilogue_chunk(
            row_ptr + start * stride_logits_class, stride_logits_class, label_rows + start * stride_labels_class,
            stride_labels_class, idx - start, row_mask, cols, n_cols - start, mx, y2, t2, scale, add, one_minus_t1,
            inv_one_minus_t1, two_minus_t1, LABELS_ARE_INDICES)
        terms = loss_terms(y, log_t_y, pow_y, log2_p, one_minus_t1, inv_one_minus_t1, two_minus_t1,
                           1.0 / two_minus_t1)
        loss += tl.sum(tl.where(mask, terms, 0.0), axis=1, keep_dims=True)
        sum_e += tl.sum(tl.where(mask, tl.exp2(t2 * log2_p), 0.0), axis=1, keep_dims=True)
        d = tl.where(mask, grad_terms(y, log2_p, p, t2 - t1), 0.0)
        sum_d += tl.sum(d, axis=1, keep_dims=True)
        if NEED_TEMP_GRAD:  # off the mask: y = p = 0, every term 0
            tile_dt1, tile_a, tile_e = temperature_sums(y, log2_p, p, d, one_minus_t1, inv_one_minus_t1,
                                                        two_minus_t1, one_minus_t2, inv_one_minus_t2)
            dt1 += tile_dt1
            sum_a += tile_a
            sum_big_e += tile_e
    width: tl.constexpr = 6 if NEED_TEMP_GRAD else 3
    out = sums_ptr + rows * width
    tl.store(out, loss, mask=row_mask)
    tl.store(out + 1, sum_e, mask=row_mask)
    tl.store(out + 2, sum_d, mask=row_mask)
    if NEED_TEMP_GRAD:
        tl.store(out + 3, dt1, mask=row_mask)
        tl.store(out + 4, sum_a, mask=row_mask)
        tl.store(out + 5, sum_big_e, mask=row_mask)


@triton.jit
def gradient_kernel(
    # input pointers: as epilogue_sums_kernel, plus the REDUCED sums [N, 3] (loss, sum e, sum d)
    # and the per-row gradient scale [N] (fp32; 0: ignored row, NaN: bad label)
    logits_ptr, labels_ptr, row_max_ptr, y_ptr, t1_ptr, t2_ptr, smoothing_ptr, sums_ptr, row_scale_ptr,
    # sizes, strides (elements: outer, inner, class, as in epilogue_sums_kernel)
    num_classes, n_inner, n_cols, stride_logits_outer, stride_logits_inner, stride_logits_class,
    stride_labels_outer, stride_labels_inner, stride_labels_class,
    stride_grad_outer, stride_grad_inner, stride_grad_class,
    # output pointer: the gradient slice (any float dtype, any layout; rounded once)
    grad_ptr,
    LABELS_ARE_INDICES: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows, row_mask, outer, inner = row_block(n_inner, BLOCK_ROWS)
    row_ptr = logits_ptr + outer * stride_logits_outer + inner * stride_logits_inner
    label_rows = labels_ptr + outer * stride_labels_outer + inner * stride_labels_inner
    grad_rows = grad_ptr + outer * stride_grad_outer + inner * stride_grad_inner
    mx, y2, idx = _row_state(row_max_ptr, y_ptr, label_rows, row_mask, LABELS_ARE_INDICES, rows)
    sums = sums_ptr + rows * 3
    sum_e = tl.load(sums + 1, mask=row_mask, other=1.0)
    sum_d = tl.load(sums + 2, mask=row_mask, other=0.0)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    t1, t2, scale, add = _settings(t1_ptr, t2_ptr, smoothing_ptr, num_classes)
    one_minus_t1 = 1.0 - t1
    inv_one_minus_t1 = safe_reciprocal(one_minus_t1)
    two_minus_t1 = 2.0 - t1
    cols = tl.arange(0, BLOCK_COLS)[None, :]
    for start in range(0, n_cols, BLOCK_COLS):
        y, _, _, log2_p, p, mask = _epilogue_chunk(
            row_ptr + start * stride_logits_class, stride_logits_class, label_rows + start * stride_labels_class,
            stride_labels_class, idx - start, row_mask, cols, n_cols - start, mx, y2, t2, scale, add, one_minus_t1,
            inv_one_minus_t1, two_minus_t1, LABELS_ARE_INDICES)
        d = grad_terms(y, log2_p, p, t2 - t1)
        grad = d - tl.exp2(t2 * log2_p) / sum_e * sum_d
        grad = tl.where(row_scale == 0.0, 0.0, row_scale * grad)  # ignored rows: 0 even for inf/NaN logits
        tl.store(grad_rows + (start + cols) * stride_grad_class, grad.to(grad_ptr.dtype.element_ty), mask=mask)
