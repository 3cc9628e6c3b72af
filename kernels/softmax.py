"""Tempered softmax kernels: forward (probabilities) and backward (vector-Jacobian product).

Forward: the shared solver on each row, probabilities stored in the logits' dtype.
Backward: given p and the upstream gradient g, grad = w - e sum(w), w = g p^t,
e = p^t / sum p^t (one pass over registers, or two streamed passes when chunked).
Launch configuration: ``launch_config.row_config``.
"""

import triton
import triton.language as tl

from .temperature_terms import exp_t_dt
from .tempered_math import (
    INF, evaluate, load_shifted, nan_max, program_value, row_block, row_max_chunked, safe_reciprocal,
    shift, softmax_vjp_terms, solve,
)


@triton.jit
def tempered_softmax_fwd_kernel(
    # input pointers: logits (rows x C, any layout); t: fp32, one value (stride_t 0) or one per row
    # (stride_t 1, with BLOCK_ROWS = 1: ``program_value``)
    logits_ptr, t_ptr, stride_t,
    # runtime scalars: steps of the original algorithm (ORIGINAL only)
    num_iters,
    # sizes: rows are (outer, inner) pairs (``row_block``), C classes
    n_inner, n_cols,
    # strides in elements of (outer, inner, class) per tensor (as in loss.py)
    stride_logits_outer, stride_logits_inner, stride_logits_class,
    stride_probs_outer, stride_probs_inner, stride_probs_class,
    # outputs: probabilities in the logits' dtype
    probs_ptr,
    # compile-time flags and block sizes
    ORIGINAL: tl.constexpr, CHUNKED: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr, MAX_PASSES: tl.constexpr,
):
    _rows, row_mask, outer, inner = row_block(n_inner, BLOCK_ROWS)
    row_ptr = logits_ptr + outer * stride_logits_outer + inner * stride_logits_inner
    out_row_ptr = probs_ptr + outer * stride_probs_outer + inner * stride_probs_inner
    cols = tl.arange(0, BLOCK_COLS)[None, :]
    one_minus_t = 1.0 - program_value(t_ptr, stride_t, n_inner, BLOCK_ROWS)
    inv_one_minus_t = safe_reciprocal(one_minus_t)

    if CHUNKED:
        mx, y_start, n_pos, _f0 = row_max_chunked(row_ptr, stride_logits_class, row_mask, n_cols, one_minus_t,
                                                  inv_one_minus_t, BLOCK_ROWS, BLOCK_COLS)
        placeholder = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        y2, _, _, _, _, _, _, _ = solve(placeholder, row_ptr, stride_logits_class, row_mask, mx, y_start, n_pos, ~row_mask,
                                        n_cols, one_minus_t, inv_one_minus_t, 0.0, num_iters,
                                        ORIGINAL, True, MAX_PASSES, BLOCK_ROWS, BLOCK_COLS)
        for start in range(0, n_cols, BLOCK_COLS):
            a0, mask = load_shifted(row_ptr + start * stride_logits_class, stride_logits_class,
                                    row_mask, cols, n_cols - start, mx)
            log2_p_chunk, p, q_chunk = evaluate(a0, y2, one_minus_t, inv_one_minus_t)
            tl.store(out_row_ptr + (start + cols) * stride_probs_class,
                     p.to(probs_ptr.dtype.element_ty), mask=mask)
    else:
        mask = row_mask & (cols < n_cols)
        a = tl.load(row_ptr + cols * stride_logits_class, mask=mask, other=-INF).to(tl.float32)
        a0 = shift(a, nan_max(a, 1), mask)
        _, _, p, _, _, _, _, _ = solve(a0, row_ptr, stride_logits_class, row_mask, a0, a0, a0,
                                       ~row_mask, n_cols, one_minus_t, inv_one_minus_t, 0.0,
                                       num_iters, ORIGINAL, False, MAX_PASSES, BLOCK_ROWS,
                                       BLOCK_COLS)
        tl.store(out_row_ptr + cols * stride_probs_class, p.to(probs_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def temperature_term(p, one_minus_t, inv_one_minus_t, t):
    """E = d exp_t(u)/dt at fixed u from the stored p (``temperature_terms.exp_t_dt``)."""
    positive = p > 0.0
    log2_p = tl.where(positive, tl.log2(tl.where(positive, p, 1.0)), -INF)
    return exp_t_dt(log2_p, p, one_minus_t, inv_one_minus_t, t)


@triton.jit
def tempered_softmax_bwd_kernel(
    # input pointers: probabilities, upstream gradient (rows x C, any layouts); t: fp32, one value
    # (stride_t 0) or one per row (stride_t 1, with BLOCK_ROWS = 1)
    probs_ptr, grad_ptr, t_ptr, stride_t,
    # sizes: rows are (outer, inner) pairs (``row_block``), C classes
    n_inner, n_cols,
    # strides in elements of (outer, inner, class) per tensor (as in loss.py)
    stride_probs_outer, stride_probs_inner, stride_probs_class,
    stride_grad_outer, stride_grad_inner, stride_grad_class,
    stride_out_outer, stride_out_inner, stride_out_class,
    # outputs: gradient of the logits; with NEED_TEMP_GRAD each row's part of the gradient of t,
    # sum g E - sum(w) sum(E) / sum(p^t) (E = d exp_t(u)/dt at fixed u; fp32 [R], row order)
    out_ptr, dt_ptr,
    # compile-time flags and block sizes
    CHUNKED: tl.constexpr, NEED_TEMP_GRAD: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows, row_mask, outer, inner = row_block(n_inner, BLOCK_ROWS)
    p_row_ptr = probs_ptr + outer * stride_probs_outer + inner * stride_probs_inner
    g_row_ptr = grad_ptr + outer * stride_grad_outer + inner * stride_grad_inner
    out_row_ptr = out_ptr + outer * stride_out_outer + inner * stride_out_inner
    cols = tl.arange(0, BLOCK_COLS)[None, :]
    t = program_value(t_ptr, stride_t, n_inner, BLOCK_ROWS)
    one_minus_t = 1.0 - t
    inv_one_minus_t = safe_reciprocal(one_minus_t)
    sum_ge = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    sum_e = tl.zeros([BLOCK_ROWS, 1], tl.float32)

    if CHUNKED:
        sum_w = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        sum_pt = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        for start in range(0, n_cols, BLOCK_COLS):
            mask = row_mask & (start + cols < n_cols)
            p = tl.load(p_row_ptr + (start + cols) * stride_probs_class, mask=mask,
                        other=0.0).to(tl.float32)
            g = tl.load(g_row_ptr + (start + cols) * stride_grad_class, mask=mask,
                        other=0.0).to(tl.float32)
            w, p_t = softmax_vjp_terms(p, g, t)
            sum_w += tl.sum(w, axis=1, keep_dims=True)
            sum_pt += tl.sum(p_t, axis=1, keep_dims=True)
            if NEED_TEMP_GRAD:
                e = temperature_term(p, one_minus_t, inv_one_minus_t, t)
                sum_ge += tl.sum(g * e, axis=1, keep_dims=True)
                sum_e += tl.sum(e, axis=1, keep_dims=True)
        ratio = sum_w / sum_pt
        for start in range(0, n_cols, BLOCK_COLS):
            mask = row_mask & (start + cols < n_cols)
            p = tl.load(p_row_ptr + (start + cols) * stride_probs_class, mask=mask,
                        other=0.0).to(tl.float32)
            g = tl.load(g_row_ptr + (start + cols) * stride_grad_class, mask=mask,
                        other=0.0).to(tl.float32)
            w, p_t = softmax_vjp_terms(p, g, t)
            tl.store(out_row_ptr + (start + cols) * stride_out_class,
                     (w - p_t * ratio).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        mask = row_mask & (cols < n_cols)
        p = tl.load(p_row_ptr + cols * stride_probs_class, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_row_ptr + cols * stride_grad_class, mask=mask, other=0.0).to(tl.float32)
        w, p_t = softmax_vjp_terms(p, g, t)
        ratio = tl.sum(w, axis=1, keep_dims=True) / tl.sum(p_t, axis=1, keep_dims=True)
        tl.store(out_row_ptr + cols * stride_out_class, (w - p_t * ratio).to(out_ptr.dtype.element_ty),
                 mask=mask)
        if NEED_TEMP_GRAD:
            e = temperature_term(p, one_minus_t, inv_one_minus_t, t)
            sum_ge = tl.sum(g * e, axis=1, keep_dims=True)
            sum_e = tl.sum(e, axis=1, keep_dims=True)
    if NEED_TEMP_GRAD:
        tl.store(dt_ptr + rows, sum_ge - ratio * sum_e, mask=row_mask)
