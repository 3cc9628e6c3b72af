"""bindings/torch/rows.py: the kept rows, the reduction and its gradient factor, and the backward
that scales the stored gradient, which every torch path (native, Triton, fused linear,
vocab-parallel, vmap) shares."""

import math

import pytest
import torch

from bitempered.bindings.torch import rows

LABELS = torch.tensor([[0, -100, 2, 5], [-100, -100, -100, -100]])  # a sample with no kept row


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_batched_reduction_equals_each_sample_alone(reduction):
    """func.py's vmap rule reduces [B, N] at once: each sample as if it were alone."""
    loss_rows = torch.tensor([[0.5, 0.0, 1.5, 2.0], [0.0, 0.0, 0.0, 0.0]])
    kept = rows.kept_rows(LABELS, -100)
    batched = rows.reduce(loss_rows, kept, reduction)
    scale = rows.grad_scale(kept, reduction, torch.float32)
    for b in range(2):
        alone = rows.reduce(loss_rows[b], kept[b], reduction)
        torch.testing.assert_close(batched[b], alone, equal_nan=True)
        torch.testing.assert_close(scale.expand(2)[b], rows.grad_scale(kept[b], reduction, torch.float32))
    if reduction == "mean":  # F.cross_entropy's convention: NaN loss, zero gradient where no row is kept
        assert math.isnan(batched[1]) and scale[1] == 0.0 and scale[0] == 1.0 / 3.0


def test_dense_rows_are_all_kept_and_bad_indices_get_nan():
    dense = torch.rand(3, 4)
    kept, bad = rows.kept_and_bad(dense, -100, 4)
    assert kept.tolist() == [True] * 3 and bad is None
    assert rows.masked_scale(kept, bad, torch.tensor(0.5), torch.float32).tolist() == [0.5] * 3
    kept, bad = rows.kept_and_bad(torch.tensor([1, -100, 4, -1]), -100, 4)
    assert kept.tolist() == [True, False, True, True] and bad.tolist() == [False, False, True, True]
    scale = rows.masked_scale(kept, bad, torch.tensor(0.5), torch.float64)
    assert scale[0] == 0.5 and scale[1] == 0.0 and scale[2:].isnan().all()


def _in_backward(fn, retain_graph=False):
    """``fn()`` run inside a backward pass, where autograd says whether the graph is retained."""
    result = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            result.append(fn())
            return grad

    Probe.apply(torch.zeros((), requires_grad=True)).backward(retain_graph=retain_graph)
    return result[0]


def test_stored_gradient_is_scaled_in_place_in_eager_mode():
    grad = torch.ones(3, 2)
    storage, version = grad.data_ptr(), grad._version
    upstream = torch.tensor([1.0, 2.0, 3.0])  # reduction="none": per row
    out = _in_backward(lambda: rows.scale_stored_grad(grad, upstream, grad.dtype))
    assert out.data_ptr() == storage and out[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert grad._version > version
    version = grad._version
    # loss.backward(): no pass over the gradient
    same = _in_backward(lambda: rows.scale_stored_grad(grad, torch.tensor(1.0), grad.dtype))
    assert same is grad and grad._version > version  # the version still changes (a second use fails)


def test_stored_gradient_is_scaled_out_of_place_in_a_retained_graph():
    grad = torch.ones(3, 2)
    out = _in_backward(lambda: rows.scale_stored_grad(grad, torch.tensor(2.0), grad.dtype), retain_graph=True)
    assert out.data_ptr() != grad.data_ptr() and (out == 2.0).all() and (grad == 1.0).all()


def test_float32_storage_of_float16_gradients_is_rounded_once():
    grad = torch.full((2, 2), 1e-7)  # below float16's normal range: 1e-7 x 2^16 is not
    out = _in_backward(lambda: rows.scale_stored_grad(grad, torch.tensor(65536.0), torch.float16))
    assert out.dtype == torch.float16 and torch.equal(out, torch.full((2, 2), 1e-7 * 65536.0).half())
    half = torch.full((3, 2), 0.5, dtype=torch.float16)
    out = _in_backward(lambda: rows.scale_half_stored_grad(half, torch.tensor([2.0**-20, 1.0, 3.0])))
    assert out is half and out[:, 0].tolist() == [0.5 * 2.0**-20, 0.5, 1.5]  # 2^-21: a float16 subnormal


def test_stored_gradient_is_scaled_out_of_place_under_a_transform():
    grad = torch.ones(3, 2)
    out = torch.func.functionalize(rows.scale_stored_grad)(grad, torch.tensor(2.0), grad.dtype)
    assert out.data_ptr() != grad.data_ptr() and (out == 2.0).all() and (grad == 1.0).all()
