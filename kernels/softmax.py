"""Tempered softmax kernels: forward (probabilities) and backward (vector-Jacobian product).

Forward: the shared solver on each row, probabilities stored in the logits' dtype.
Backward: given p and the upstream gradient g, grad = w - e sum(w), w = g p^t,
e = p^t / sum p^t (one pass over registers, or two streamed passes when chunked).
Launch configuration: ``launch_config.row_config``.
"""

import triton
import triton.language as tl

from .tempered_math import (
    INF, evaluate, load_shifted, nan_max, row_max_chunked, safe_reciprocal, shift,
    softmax_vjp_terms, solve,
)


@triton.jit
def tempered_softmax_fwd_kernel(
    # input pointers: logits [N, C]; t as a 1-element fp32 tensor (runtime value)
    logits_ptr, t_ptr,
    # runtime scalars: steps of the original algorithm (ORIGINAL only)
    num_iters,
    # sizes
    n_rows, n_cols,
    # strides in elements (the class stride is 1)
    stride_logits, stride_probs,
    # outputs: probabilities [N, C] in the logits' dtype
    probs_ptr,
    # compile-time flags and block sizes
    ORIGINAL: tl.constexpr, CHUNKED: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr, MAX_PASSES: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    row_ptr = logits_ptr + rows64 * stride_logits
    out_row_ptr = probs_ptr + rows64 * stride_probs
    cols = tl.arange(0, BLOCK_COLS)[None, :]
    one_minus_t = 1.0 - tl.load(t_ptr)
    inv_one_minus_t = safe_reciprocal(one_minus_t)

    if CHUNKED:
        mx, f0, n_pos = row_max_chunked(row_ptr, row_mask, n_cols, one_minus_t, BLOCK_ROWS,
                                        BLOCK_COLS)
        placeholder = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        y2, _, _, _, _, _, _, _ = solve(placeholder, row_ptr, row_mask, mx, f0, n_pos, ~row_mask,
                                        n_cols, one_minus_t, inv_one_minus_t, 0.0, num_iters,
                                        ORIGINAL, True, MAX_PASSES, BLOCK_ROWS, BLOCK_COLS)
        for start in range(0, n_cols, BLOCK_COLS):
            a0, mask = load_shifted(row_ptr + start, row_mask, cols, n_cols - start, mx)
            log2_p_chunk, p, q_chunk = evaluate(a0, y2, one_minus_t, inv_one_minus_t)
            tl.store(out_row_ptr + start + cols, p.to(probs_ptr.dtype.element_ty), mask=mask)
    else:
        mask = row_mask & (cols < n_cols)
        a = tl.load(row_ptr + cols, mask=mask, other=-INF).to(tl.float32)
        a0 = shift(a, nan_max(a, 1), mask)
        _, _, p, _, _, _, _, _ = solve(a0, row_ptr, row_mask, a0, a0, a0, ~row_mask, n_cols,
                                       one_minus_t, inv_one_minus_t, 0.0, num_iters, ORIGINAL,
                                       False, MAX_PASSES, BLOCK_ROWS, BLOCK_COLS)
        tl.store(out_row_ptr + cols, p.to(probs_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tempered_softmax_bwd_kernel(
    # input pointers: probabilities [N, C], upstream gradient [N, C]; t as a 1-element fp32 tensor
    probs_ptr, grad_ptr, t_ptr,
    # sizes
    n_rows, n_cols,
    # strides in elements (the class stride is 1)
    stride_probs, stride_grad, stride_out,
    # outputs: gradient of the logits [N, C]
    out_ptr,
    # compile-time flags and block sizes
    CHUNKED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    p_row_ptr = probs_ptr + rows64 * stride_probs
    g_row_ptr = grad_ptr + rows64 * stride_grad
    out_row_ptr = out_ptr + rows64 * stride_out
    cols = tl.arange(0, BLOCK_COLS)[None, :]
    t = tl.load(t_ptr)

    if CHUNKED:
        sum_w = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        sum_pt = tl.zeros([BLOCK_ROWS, 1], tl.float32)
        for start in range(0, n_cols, BLOCK_COLS):
            mask = row_mask & (start + cols < n_cols)
            p = tl.load(p_row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            w, p_t = softmax_vjp_terms(p, g, t)
            sum_w += tl.sum(w, axis=1, keep_dims=True)
            sum_pt += tl.sum(p_t, axis=1, keep_dims=True)
        ratio = sum_w / sum_pt
        for start in range(0, n_cols, BLOCK_COLS):
            mask = row_mask & (start + cols < n_cols)
            p = tl.load(p_row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            w, p_t = softmax_vjp_terms(p, g, t)
            tl.store(out_row_ptr + start + cols, (w - p_t * ratio).to(out_ptr.dtype.element_ty),
                     mask=mask)
    else:
        mask = row_mask & (cols < n_cols)
        p = tl.load(p_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        w, p_t = softmax_vjp_terms(p, g, t)
        ratio = tl.sum(w, axis=1, keep_dims=True) / tl.sum(p_t, axis=1, keep_dims=True)
        tl.store(out_row_ptr + cols, (w - p_t * ratio).to(out_ptr.dtype.element_ty), mask=mask)
