"""torch.library.opcheck on every custom op (schema, fake tensor, autograd registration, AOT dispatch),
and the eager backward's memory property. opcheck checks the plumbing, not the math: the values are
checked against the float64 reference in test_torch_native.py / test_triton_kernels.py."""

import pytest
import torch
from torch.library import opcheck

from bitempered import torch as bt
from bitempered.bindings.torch import ops
from interpreter_warnings import EXPECTED as EXPECTED_INTERPRETER_WARNINGS

pytestmark = EXPECTED_INTERPRETER_WARNINGS  # Triton's interpreter on masked tails (see that module)

N, C = 3, 5  # not powers of two
REDUCTIONS = ["none", "sum", "mean"]
DTYPES = [torch.float32, torch.float64]


def scalar(value):
    return torch.tensor(value, dtype=torch.float64)


def backends(dtype, triton_too=True):
    """The kernels compute in fp32; interpreted Triton is slow, so some cases run it only once."""
    return ["torch", "triton"] if dtype == torch.float32 and triton_too else ["torch"]


def logits(rows, dtype, need_grad, cols=C):
    return torch.randn(rows, cols, dtype=dtype, requires_grad=need_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("need_grad", [False, True])
@pytest.mark.parametrize("labels_kind", ["indices", "dense", "weighted"])
def test_loss_op(dtype, reduction, need_grad, labels_kind):
    for backend in backends(dtype, triton_too=need_grad or labels_kind == "dense"):
        weights = None
        if labels_kind == "dense":
            labels = torch.softmax(torch.randn(N, C, dtype=dtype), dim=-1)
        else:
            labels = torch.tensor([0, -100, 4])  # with an ignored row
            if labels_kind == "weighted":  # per-row weights (weight[target] x sample_weight)
                weights = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float32 if dtype == torch.float32 else dtype)
        args = (logits(N, dtype, need_grad), labels, weights, scalar(0.8), scalar(1.2), scalar(0.1), 0, -100,
                reduction, backend, need_grad)
        opcheck(ops.loss_op, args)


@pytest.mark.parametrize("need_grad", [False, True])
def test_loss_op_stores_float16_gradients_in_float32(need_grad):
    args = (logits(N, torch.float32, False).half().requires_grad_(need_grad), torch.tensor([0, -100, 4]), None,
            scalar(0.8), scalar(1.2), scalar(0.1), 0, -100, "mean", "torch", need_grad)
    opcheck(ops.loss_op, args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("need_grad", [False, True])
def test_binary_loss_op(dtype, reduction, need_grad):
    for backend in backends(dtype, triton_too=need_grad or reduction == "none"):
        x = torch.randn(7, dtype=dtype, requires_grad=need_grad)
        labels = torch.rand(7, dtype=dtype)
        opcheck(ops.binary_loss_op, (x, labels, None, scalar(0.6), scalar(1.4), scalar(0.0), 3, float("nan"),
                                     reduction, backend, need_grad))
        labels[2] = 255.0  # an ignored element, and one weight per element
        weights = torch.rand(7, dtype=torch.float32 if dtype == torch.float32 else dtype)
        opcheck(ops.binary_loss_op, (x, labels, weights, scalar(0.6), scalar(1.4), scalar(0.0), 0, 255.0,
                                     reduction, backend, need_grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_grad", [False, True])
def test_softmax_and_sigmoid_ops(dtype, need_grad):
    for backend in backends(dtype):
        opcheck(ops.softmax_op, (logits(N, dtype, need_grad), scalar(1.3), 0, backend))
        opcheck(ops.sigmoid_op, (torch.randn(7, dtype=dtype, requires_grad=need_grad), scalar(0.7), 0, backend))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need_grad", [False, True])
def test_backward_ops(dtype, need_grad):
    for backend in backends(dtype):
        probs = bt.tempered_softmax(torch.randn(N, C, dtype=dtype), 1.3).requires_grad_(need_grad)
        grad = torch.randn(N, C, dtype=dtype, requires_grad=need_grad)
        opcheck(ops.softmax_backward_op, (probs, grad, scalar(1.3), backend))
        p = bt.tempered_sigmoid(torch.randn(7, dtype=dtype), 0.7).requires_grad_(need_grad)
        opcheck(ops.sigmoid_backward_op, (p, torch.randn(7, dtype=dtype, requires_grad=need_grad), scalar(0.7),
                                          backend))


def temperatures(dtype, per_row):
    """(t1, t2) requiring grad: 0-d, or one per row of the N rows."""
    t1, t2 = (torch.tensor([0.8, 0.6, 1.0][:N] if per_row else 0.8, dtype=dtype),
              torch.tensor([1.2, 1.0, 0.7][:N] if per_row else 1.2, dtype=dtype))
    return t1.requires_grad_(), t2.requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("per_row", [False, True])
def test_loss_ops_with_temperature_grads(dtype, reduction, per_row):
    """The third output (each row's scaled temperature gradients) and the temperatures' backward."""
    for backend in backends(dtype, triton_too=reduction == "none"):
        t1, t2 = temperatures(dtype, per_row)
        opcheck(ops.loss_op, (logits(N, dtype, True), torch.tensor([0, -100, 4]), None, t1, t2, scalar(0.1), 0, -100,
                              reduction, backend, True, -1, True))
        opcheck(ops.loss_op, (logits(N, dtype, False), torch.softmax(torch.randn(N, C, dtype=dtype), -1), None, t1,
                              t2, scalar(0.0), 0, -100, reduction, backend, False, -1, True))
        x = torch.randn(N, dtype=dtype, requires_grad=True)
        opcheck(ops.binary_loss_op, (x, torch.rand(N, dtype=dtype), None, t1, t2, scalar(0.1), 0, float("nan"),
                                     reduction, backend, True, True))


def test_temperature_grads_need_the_converged_normalization():
    t1, t2 = temperatures(torch.float64, False)
    with pytest.raises(ValueError, match="num_iters"):
        ops.loss_op(logits(N, torch.float64, True), torch.tensor([0, 1, 2]), None, t1, t2, scalar(0.0), 3, -100,
                    "mean", "torch", True, -1, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_softmax_and_sigmoid_ops_with_a_learnable_temperature(dtype, per_row):
    for backend in backends(dtype):
        t = torch.tensor([1.3, 0.7, 1.0] if per_row else 1.3, dtype=dtype, requires_grad=True)
        opcheck(ops.softmax_op, (logits(N, dtype, True), t, 0, backend))
        probs = bt.tempered_softmax(torch.randn(N, C, dtype=dtype), 1.3).requires_grad_()
        opcheck(ops.softmax_temperature_backward_op, (probs, torch.randn(N, C, dtype=dtype, requires_grad=True), t,
                                                      backend))
        opcheck(ops.sigmoid_op, (torch.randn(N, dtype=dtype, requires_grad=True), t, 0, backend))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "sum"])  # "mean" of no rows is NaN: see the next test
def test_empty_rows(dtype, reduction):
    """The public API returns early on an empty batch; the ops themselves must still be well-formed."""
    for need_grad in (False, True):
        args = (logits(0, dtype, need_grad), torch.zeros(0, dtype=torch.long), None, scalar(0.8), scalar(1.2),
                scalar(0.0), 0, -100, reduction, "torch", need_grad)
        opcheck(ops.loss_op, args)
    opcheck(ops.softmax_op, (logits(0, dtype, True), scalar(1.3), 0, "torch"))
    opcheck(ops.sigmoid_op, (torch.zeros(0, dtype=dtype, requires_grad=True), scalar(1.3), 0, "torch"))


def test_empty_rows_mean_is_nan_with_an_empty_gradient():
    """(opcheck compares eager and traced outputs without equal_nan, so this case is checked here.)"""
    x = logits(0, torch.float64, True)
    loss, grad, _ = ops.loss_op(x, torch.zeros(0, dtype=torch.long), None, scalar(0.8), scalar(1.2), scalar(0.0), 0,
                                -100, "mean", "torch", True)
    assert torch.isnan(loss) and grad.shape == (0, C)
    (dx,) = torch.autograd.grad(loss, x)
    assert dx.shape == (0, C)


def test_fake_matches_real_without_gradient_in_float64():
    """The bug opcheck found: the fake returned a float64 empty gradient, the real op a float32 one."""
    x = torch.randn(N, C, dtype=torch.float64)
    _, grad, _ = ops.loss_op(x, torch.tensor([0, 1, 2]), None, scalar(0.8), scalar(1.2), scalar(0.0), 0, -100, "mean",
                             "torch", False)
    assert grad.dtype == torch.float64 and grad.numel() == 0


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("torch", torch.float32),
                                           ("triton", torch.float32)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_eager_backward_allocates_no_second_buffer(backend, dtype, reduction):
    """Eager mode: the logits' gradient IS the buffer the forward pass stored (scaled in place)."""
    x = logits(N, dtype, True)
    loss, stored, _ = ops.loss_op(x, torch.tensor([0, -100, 4]), None, scalar(0.8), scalar(1.2), scalar(0.1), 0,
                                  -100, reduction, backend, True)
    upstream = torch.full(loss.shape, 2.0, dtype=loss.dtype)
    expected = stored.detach().clone() * (upstream.unsqueeze(-1) if reduction == "none" else upstream)
    (grad,) = torch.autograd.grad(loss, x, upstream)
    assert grad.data_ptr() == stored.data_ptr()
    assert torch.equal(grad, expected)


def test_public_api_gradient_is_the_stored_buffer():
    """Through the public API too (the reshape to rows is a view): no N x C copy in the backward."""
    x = torch.randn(2, N, C, requires_grad=True)
    pointers = []

    def record(tensor):
        pointers.append(tensor.data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        loss = bt.bi_tempered_logistic_loss(x, torch.tensor([[0, 1, 2], [3, 4, 0]]), 0.8, 1.2)
    loss.backward()
    assert x.grad.data_ptr() in pointers


def test_binary_eager_backward_allocates_no_second_buffer():
    x = torch.randn(7, requires_grad=True)
    loss, stored, _ = ops.binary_loss_op(x, torch.rand(7), None, scalar(0.6), scalar(1.4), scalar(0.1), 0,
                                         float("nan"), "sum", "torch", True)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.data_ptr() == stored.data_ptr()
