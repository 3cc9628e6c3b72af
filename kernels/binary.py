"""Binary kernels: tempered sigmoid (forward, backward) and the binary bi-tempered loss.

SPEC: tempered_sigmoid(x) = tempered_softmax([0, x])[1]; the binary loss is the 2-class loss on
[0, x] with labels [1 - y, y]. Each program takes BLOCK elements as a [BLOCK, 2] register tile and
runs the shared row solver on it (all rows at once), so there is one program per BLOCK elements,
not per element. Launch configuration: ``launch_config.binary_config``.
"""

import triton
import triton.language as tl

from .tempered_math import (
    grad_terms, label_powers, loss_terms, nan_max, safe_reciprocal, shift, smoothing_coefficients,
    softmax_vjp_terms, solve,
)


@triton.jit
def two_class_tile(x, cols):
    """Max-shifted rows [0, x] of a [BLOCK, 1] column x."""
    a = tl.where(cols == 1, x, 0.0)
    return shift(a, nan_max(a, 1), cols < 2)


@triton.jit
def second_class(tile, cols):
    """Column 1 of a [BLOCK, 2] tile as [BLOCK, 1]."""
    return tl.sum(tl.where(cols == 1, tile, 0.0), axis=1, keep_dims=True)


@triton.jit
def tempered_binary_loss_kernel(
    # input pointers: logits x [M], labels y [M] (floats in [0, 1]); t1, t2 and label smoothing as
    # 1-element fp32 tensors (runtime values); the gradient's scale: fp32, one value
    # (stride_grad_scale 0) or one per element (stride_grad_scale 1, e.g. 0 where ignored)
    x_ptr, y_ptr, t1_ptr, t2_ptr, smoothing_ptr, grad_scale_ptr,
    # runtime scalars: steps of the original algorithm (ORIGINAL only)
    num_iters,
    # sizes
    n_elements,
    # strides in elements
    stride_x, stride_y, stride_grad_scale,
    # outputs: loss (fp32 [M]); grad_scale * dL/dx [M] in the logits' dtype (contiguous)
    loss_ptr, grad_ptr,
    # compile-time flags and block sizes
    NEED_GRAD: tl.constexpr, ORIGINAL: tl.constexpr, BLOCK: tl.constexpr,
    MAX_PASSES: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None]
    in_range = offs < n_elements
    offs64 = offs.to(tl.int64)
    cols = tl.arange(0, 2)[None, :]
    t1 = tl.load(t1_ptr)
    t2 = tl.load(t2_ptr)
    one_minus_t1 = 1.0 - t1
    inv_one_minus_t1 = safe_reciprocal(one_minus_t1)
    two_minus_t1 = 2.0 - t1
    one_minus_t2 = 1.0 - t2
    scale, add = smoothing_coefficients(tl.load(smoothing_ptr), 2)

    x = tl.load(x_ptr + offs64 * stride_x, mask=in_range, other=0.0).to(tl.float32)
    y1 = tl.load(y_ptr + offs64 * stride_y, mask=in_range, other=0.0).to(tl.float32)
    a0 = two_class_tile(x, cols)
    _, log2_p, p, q, _, _, _, _ = solve(a0, x_ptr, 1, in_range, a0, a0, a0, ~in_range, 2, one_minus_t2,
                                        safe_reciprocal(one_minus_t2), 0.0, num_iters, ORIGINAL,
                                        False, MAX_PASSES, BLOCK, 2)
    y = scale * tl.where(cols == 1, y1, 1.0 - y1) + add
    log_t_y, pow_y = label_powers(y, one_minus_t1, inv_one_minus_t1, two_minus_t1)
    loss = tl.sum(loss_terms(y, log_t_y, pow_y, log2_p, one_minus_t1, inv_one_minus_t1,
                             two_minus_t1, 1.0 / two_minus_t1), axis=1, keep_dims=True)
    tl.store(loss_ptr + offs64, loss, mask=in_range)
    if NEED_GRAD:
        d = grad_terms(y, log2_p, p, t2 - t1)
        ratio = tl.sum(d, axis=1, keep_dims=True) / tl.sum(q, axis=1, keep_dims=True)
        grad_scale = tl.load(grad_scale_ptr + offs64 * stride_grad_scale, mask=in_range, other=0.0)
        grad = second_class(d - q * ratio, cols) * grad_scale
        tl.store(grad_ptr + offs64, grad.to(grad_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def tempered_sigmoid_fwd_kernel(
    # input pointers: logits x [M]; t as a 1-element fp32 tensor (runtime value)
    x_ptr, t_ptr,
    # runtime scalars: steps of the original algorithm (ORIGINAL only)
    num_iters,
    # sizes
    n_elements,
    # strides in elements
    stride_x,
    # outputs: probabilities [M] in the logits' dtype (contiguous)
    probs_ptr,
    # compile-time flags and block sizes
    ORIGINAL: tl.constexpr, BLOCK: tl.constexpr, MAX_PASSES: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None]
    in_range = offs < n_elements
    offs64 = offs.to(tl.int64)
    cols = tl.arange(0, 2)[None, :]
    one_minus_t = 1.0 - tl.load(t_ptr)
    x = tl.load(x_ptr + offs64 * stride_x, mask=in_range, other=0.0).to(tl.float32)
    a0 = two_class_tile(x, cols)
    _, _, p, _, _, _, _, _ = solve(a0, x_ptr, 1, in_range, a0, a0, a0, ~in_range, 2, one_minus_t,
                                   safe_reciprocal(one_minus_t), 0.0, num_iters, ORIGINAL, False,
                                   MAX_PASSES, BLOCK, 2)
    probs = second_class(p, cols)
    tl.store(probs_ptr + offs64, probs.to(probs_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def tempered_sigmoid_bwd_kernel(
    # input pointers: probabilities p [M] (of class 1), upstream gradient [M]; t as a 1-element
    # fp32 tensor (runtime value)
    probs_ptr, grad_ptr, t_ptr,
    # sizes
    n_elements,
    # strides in elements
    stride_probs, stride_grad,
    # outputs: dL/dx [M] (contiguous)
    out_ptr,
    # compile-time block size
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None]
    in_range = offs < n_elements
    offs64 = offs.to(tl.int64)
    cols = tl.arange(0, 2)[None, :]
    p1 = tl.load(probs_ptr + offs64 * stride_probs, mask=in_range, other=0.5).to(tl.float32)
    g1 = tl.load(grad_ptr + offs64 * stride_grad, mask=in_range, other=0.0).to(tl.float32)
    p = tl.where(cols == 1, p1, 1.0 - p1)
    w, p_t = softmax_vjp_terms(p, tl.where(cols == 1, g1, 0.0), tl.load(t_ptr))
    ratio = tl.sum(w, axis=1, keep_dims=True) / tl.sum(p_t, axis=1, keep_dims=True)
    grad = second_class(w - p_t * ratio, cols)
    tl.store(out_ptr + offs64, grad.to(out_ptr.dtype.element_ty), mask=in_range)
