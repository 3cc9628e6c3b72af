"""Fused bi-tempered loss kernel: normalization + per-row loss + logits gradient in one kernel.

One program handles BLOCK_ROWS rows (several rows for tiny C). On-chip path: the row tile is
loaded once (native dtype -> fp32), every solver pass runs on registers, the loss and the
gradient (for unit upstream gradient, rounded once into the gradient's dtype) are written at
the end. Chunked path (C above the on-chip limit): each pass streams the row in BLOCK_COLS
chunks (kernels/README.md, "Memory traffic"): the max (and at t2 = 1 the whole solve, online),
the solver passes (which also gather the support count and the sums that give sum(d)), then with
class indices the gradient write, which sums the loss too; a loss sweep only without gradient,
with dense labels or the original algorithm.
Rows are addressed as (outer, inner) pairs with per-tensor (outer, inner, class) strides
(``tempered_math.row_block``): [N, C] rows, or F.cross_entropy's (N, C, H, W) read in place.
Launch configuration: ``launch_config.row_config``.
"""

import triton
import triton.language as tl

from .temperature_terms import t1_terms, t2_terms
from .tempered_math import (
    INF, escort_powers, evaluate, exp2_accurate, grad_terms, label_powers, load_shifted, loss_terms,
    nan_max, program_value, row_block, row_max_chunked, safe_reciprocal, shift, smoothing_coefficients,
    solve,
)


@triton.jit
def label_tile(label_ptr, stride_class, idx, mask, cols, scale, add, one_minus_t1, inv_one_minus_t1,
               two_minus_t1, LABELS_ARE_INDICES: tl.constexpr):
    """(y, log_t1 y, y^(2-t1)) of one tile of smoothed labels, 0 off the mask.

    Class indices: the two label values (target, other) are per-row scalars, so their powers
    cost nothing per element. Dense labels are loaded (any float dtype) and powered per element.
    """
    if LABELS_ARE_INDICES:
        hit = cols == idx
        y_on = scale + add
        log_t_on, pow_on = label_powers(y_on, one_minus_t1, inv_one_minus_t1, two_minus_t1)
        log_t_off, pow_off = label_powers(add, one_minus_t1, inv_one_minus_t1, two_minus_t1)
        y = tl.where(mask, tl.where(hit, y_on, add), 0.0)
        log_t_y = tl.where(hit, log_t_on, log_t_off)
        pow_y = tl.where(mask, tl.where(hit, pow_on, pow_off), 0.0)
    else:
        y = tl.load(label_ptr + cols * stride_class, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(mask, scale * y + add, 0.0)
        log_t_y, pow_y = label_powers(y, one_minus_t1, inv_one_minus_t1, two_minus_t1)
    return y, log_t_y, pow_y


@triton.jit
def temperature_sums(y, log2_p, p, d, one_minus_t1, inv_one_minus_t1, two_minus_t1, one_minus_t2,
                     inv_one_minus_t2):
    """Row sums (dL/dt1, sum A, sum E) of one tile (``temperature_terms``)."""
    dt1 = t1_terms(y, tl.log2(y), log2_p, one_minus_t1, inv_one_minus_t1, two_minus_t1)
    a, e = t2_terms(y, log2_p, p, d, one_minus_t1, two_minus_t1, one_minus_t2, inv_one_minus_t2)
    return (tl.sum(dt1, axis=1, keep_dims=True), tl.sum(a, axis=1, keep_dims=True),
            tl.sum(e, axis=1, keep_dims=True))


@triton.jit
def store_temperature_grads(dt_ptr, rows, row_mask, dt1, sum_a, sum_e, sum_d, sum_q, y2, one_minus_t2,
                            ignored, bad):
    """Each row's (dL/dt1, dL/dt2) for unit upstream gradient: dL/dt2 = sum A - sum d sum E / Q,
    with Q = sum p^t2 = sum q / c (the solver's q = c p^t2, c = p_max^(1-t2) = 2^(-(1-t2) Y))."""
    c = exp2_accurate(-one_minus_t2 * y2)
    dt2 = sum_a - sum_d / sum_q * c * sum_e
    tl.store(dt_ptr + rows * 2, finish_rows(dt1, ignored, bad), mask=row_mask)
    tl.store(dt_ptr + rows * 2 + 1, finish_rows(dt2, ignored, bad), mask=row_mask)


@triton.jit
def finish_rows(value, ignored, bad):
    """Ignored label rows give 0, out-of-range class indices NaN."""
    return tl.where(ignored, 0.0, tl.where(bad, float("nan"), value))


@triton.jit
def tempered_loss_kernel(
    # input pointers: logits (rows x C); labels of the logits' layout (dense, any float dtype) or
    # one per row (int32/int64 class indices); t1, t2: fp32, one value (stride_temperature 0) or
    # one per row in row order (stride_temperature 1, with BLOCK_ROWS = 1: ``program_value``);
    # label smoothing as a 1-element fp32 tensor (runtime values); the gradient's scale (e.g. 1/count of a mean reduction, or a weight per row): fp32, one value
    # (stride_grad_scale 0) or one per row (stride_grad_scale 1)
    logits_ptr, labels_ptr, t1_ptr, t2_ptr, smoothing_ptr, grad_scale_ptr,
    # runtime scalars: steps of the original algorithm (ORIGINAL only), ignored class index
    num_iters, ignore_index,
    # sizes: rows are (outer, inner) pairs (``row_block``; the grid has n_outer x
    # cdiv(n_inner, BLOCK_ROWS) programs), C classes
    n_inner, n_cols,
    # strides in elements of (outer, inner, class) per tensor: [N, C] rows are (0, row stride, 1),
    # NCHW logits (C H W, 1, H W); class indices are (n_inner, 1, 0) (one per row, row order)
    stride_logits_outer, stride_logits_inner, stride_logits_class,
    stride_labels_outer, stride_labels_inner, stride_labels_class,
    stride_grad_outer, stride_grad_inner, stride_grad_class, stride_grad_scale, stride_temperature,
    # outputs: per-row loss (fp32, row order); grad_scale * dL/dlogits in the logits' dtype, any
    # layout (may be the logits buffer itself: every read of a row precedes its gradient's write);
    # with NEED_TEMP_GRAD each row's (dL/dt1, dL/dt2) for unit upstream gradient (fp32 [R, 2])
    loss_ptr, grad_ptr, dt_ptr,
    # compile-time flags and block sizes (NEED_TEMP_GRAD: one more variant, the others unchanged)
    LABELS_ARE_INDICES: tl.constexpr, NEED_GRAD: tl.constexpr, NEED_TEMP_GRAD: tl.constexpr,
    ORIGINAL: tl.constexpr,
    CHUNKED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    MAX_PASSES: tl.constexpr,
):
    rows, row_mask, outer, inner = row_block(n_inner, BLOCK_ROWS)
    row_ptr = logits_ptr + outer * stride_logits_outer + inner * stride_logits_inner
    label_row_ptr = labels_ptr + outer * stride_labels_outer + inner * stride_labels_inner
    grad_row_ptr = grad_ptr + outer * stride_grad_outer + inner * stride_grad_inner
    cols = tl.arange(0, BLOCK_COLS)[None, :]

    t1 = program_value(t1_ptr, stride_temperature, n_inner, BLOCK_ROWS)
    t2 = program_value(t2_ptr, stride_temperature, n_inner, BLOCK_ROWS)
    one_minus_t1 = 1.0 - t1
    inv_one_minus_t1 = safe_reciprocal(one_minus_t1)
    two_minus_t1 = 2.0 - t1
    inv_two_minus_t1 = 1.0 / two_minus_t1
    one_minus_t2 = 1.0 - t2
    inv_one_minus_t2 = safe_reciprocal(one_minus_t2)
    t2_minus_t1 = t2 - t1
    scale, add = smoothing_coefficients(tl.load(smoothing_ptr), n_cols)

    if LABELS_ARE_INDICES:
        idx = tl.load(label_row_ptr, mask=row_mask, other=0)
        ignored = idx == ignore_index
        bad = ~ignored & ((idx < 0) | (idx >= n_cols))
    else:
        idx = rows
        ignored = rows < 0
        bad = ignored
    inactive = ~row_mask | ignored | bad

    if CHUNKED:
        mx, y_start, n_pos, _f0 = row_max_chunked(row_ptr, stride_logits_class, row_mask, n_cols, one_minus_t2,
                                                  inv_one_minus_t2, BLOCK_ROWS, BLOCK_COLS)
        placeholder = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        # With class indices and a gradient the solver's passes also gather the sums of p^k,
        # k = t2 - t1, that give sum d (no loss sweep); otherwise the loss sweep sums d (k = 0:
        # no extra work in the passes)
        power = t2_minus_t1 if NEED_GRAD and LABELS_ARE_INDICES and not ORIGINAL else 0.0
        y2, _log2_p, _p, _q, _f, sum_q, s1, s0 = solve(
            placeholder, row_ptr, stride_logits_class, row_mask, mx, y_start, n_pos, inactive, n_cols, one_minus_t2,
            inv_one_minus_t2, power, num_iters, ORIGINAL, True, MAX_PASSES, BLOCK_ROWS,
            BLOCK_COLS)
        loss = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        sum_d = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        # temperature sums (NEED_TEMP_GRAD), gathered in the row's last sweep
        dt1 = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        sum_a = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        sum_e = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        if NEED_GRAD and LABELS_ARE_INDICES and not ORIGINAL:
            # sum d = sum (p - y) p^k, k = t2 - t1, from the last pass's label-free sums: every
            # class holds the off-target label `add`, the target y_on = scale + add (one logit)
            target = row_mask & ~inactive
            target_ptr = row_ptr + idx.to(tl.int64) * stride_logits_class
            a0_target = shift(tl.load(target_ptr, mask=target, other=-INF).to(tl.float32), mx,
                              target)
            log2_p_target, p_target, _q_target = evaluate(a0_target, y2, one_minus_t2,
                                                          inv_one_minus_t2)
            _p_k1_target, p_k_target = escort_powers(log2_p_target, p_target, t2_minus_t1)
            sum_d = s1 - add * s0 - scale * p_k_target
        else:  # the loss sweep (and sum d from the labels' tiles)
            for start in range(0, n_cols, BLOCK_COLS):
                a0, mask = load_shifted(row_ptr + start * stride_logits_class, stride_logits_class,
                                        row_mask, cols, n_cols - start, mx)
                log2_p, p, q = evaluate(a0, y2, one_minus_t2, inv_one_minus_t2)
                y, log_t_y, pow_y = label_tile(label_row_ptr + start * stride_labels_class,
                                               stride_labels_class, idx - start, mask, cols,
                                               scale, add, one_minus_t1, inv_one_minus_t1,
                                               two_minus_t1, LABELS_ARE_INDICES)
                loss += tl.sum(loss_terms(y, log_t_y, pow_y, log2_p, one_minus_t1,
                                          inv_one_minus_t1, two_minus_t1, inv_two_minus_t1),
                               axis=1, keep_dims=True)
                if NEED_GRAD or NEED_TEMP_GRAD:
                    d = grad_terms(y, log2_p, p, t2_minus_t1)
                    sum_d += tl.sum(d, axis=1, keep_dims=True)
                    if NEED_TEMP_GRAD:
                        tile_dt1, tile_a, tile_e = temperature_sums(
                            y, log2_p, p, d, one_minus_t1, inv_one_minus_t1, two_minus_t1,
                            one_minus_t2, inv_one_minus_t2)
                        dt1 += tile_dt1
                        sum_a += tile_a
                        sum_e += tile_e
        if NEED_GRAD:
            # the last sweep: the gradient is written after every read of this row (in-place
            # safe); the loss is summed here unless the loss sweep ran
            ratio = sum_d / sum_q
            grad_scale = tl.load(grad_scale_ptr + rows * stride_grad_scale, mask=row_mask, other=0.0)
            for start in range(0, n_cols, BLOCK_COLS):
                a0, mask = load_shifted(row_ptr + start * stride_logits_class, stride_logits_class,
                                        row_mask, cols, n_cols - start, mx)
                log2_p, p, q = evaluate(a0, y2, one_minus_t2, inv_one_minus_t2)
                y, log_t_y, pow_y = label_tile(label_row_ptr + start * stride_labels_class,
                                               stride_labels_class, idx - start, mask, cols,
                                               scale, add, one_minus_t1, inv_one_minus_t1,
                                               two_minus_t1, LABELS_ARE_INDICES)
                if LABELS_ARE_INDICES and not ORIGINAL:
                    loss += tl.sum(loss_terms(y, log_t_y, pow_y, log2_p, one_minus_t1,
                                              inv_one_minus_t1, two_minus_t1, inv_two_minus_t1),
                                   axis=1, keep_dims=True)
                d = grad_terms(y, log2_p, p, t2_minus_t1)
                if NEED_TEMP_GRAD and LABELS_ARE_INDICES and not ORIGINAL:  # (no loss sweep ran)
                    tile_dt1, tile_a, tile_e = temperature_sums(
                        y, log2_p, p, d, one_minus_t1, inv_one_minus_t1, two_minus_t1, one_minus_t2,
                        inv_one_minus_t2)
                    dt1 += tile_dt1
                    sum_a += tile_a
                    sum_e += tile_e
                grad = finish_rows((d - q * ratio) * grad_scale, ignored, bad)
                tl.store(grad_row_ptr + (start + cols) * stride_grad_class,
                         grad.to(grad_ptr.dtype.element_ty), mask=mask)
        if NEED_TEMP_GRAD:
            store_temperature_grads(dt_ptr, rows, row_mask, dt1, sum_a, sum_e, sum_d, sum_q, y2,
                                    one_minus_t2, ignored, bad)
    else:
        mask = row_mask & (cols < n_cols)
        a = tl.load(row_ptr + cols * stride_logits_class, mask=mask, other=-INF).to(tl.float32)
        a0 = shift(a, nan_max(a, 1), mask)
        y2, log2_p, p, q, _f, _g, _s1, _s0 = solve(
            a0, row_ptr, stride_logits_class, row_mask, a0, a0, a0, inactive, n_cols, one_minus_t2, inv_one_minus_t2,
            0.0, num_iters, ORIGINAL, False, MAX_PASSES, BLOCK_ROWS, BLOCK_COLS)
        y, log_t_y, pow_y = label_tile(label_row_ptr, stride_labels_class, idx, mask, cols, scale, add, one_minus_t1,
                                       inv_one_minus_t1, two_minus_t1, LABELS_ARE_INDICES)
        loss = tl.sum(loss_terms(y, log_t_y, pow_y, log2_p, one_minus_t1, inv_one_minus_t1,
                                 two_minus_t1, inv_two_minus_t1), axis=1, keep_dims=True)
        if NEED_GRAD or NEED_TEMP_GRAD:
            d = grad_terms(y, log2_p, p, t2_minus_t1)
            sum_d = tl.sum(d, axis=1, keep_dims=True)
            sum_q = tl.sum(q, axis=1, keep_dims=True)
            if NEED_GRAD:
                grad_scale = tl.load(grad_scale_ptr + rows * stride_grad_scale, mask=row_mask, other=0.0)
                grad = finish_rows((d - q * (sum_d / sum_q)) * grad_scale, ignored, bad)
                tl.store(grad_row_ptr + cols * stride_grad_class, grad.to(grad_ptr.dtype.element_ty),
                         mask=mask)
            if NEED_TEMP_GRAD:
                dt1, sum_a, sum_e = temperature_sums(y, log2_p, p, d, one_minus_t1, inv_one_minus_t1,
                                                     two_minus_t1, one_minus_t2, inv_one_minus_t2)
                store_temperature_grads(dt_ptr, rows, row_mask, dt1, sum_a, sum_e, sum_d, sum_q, y2,
                                        one_minus_t2, ignored, bad)

    tl.store(loss_ptr + rows, finish_rows(loss, ignored, bad), mask=row_mask)
