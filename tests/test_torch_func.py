"""torch.func transforms over the public API: grad, vmap (folded into rows), jacrev, and the clear
errors where a derivative is not provided. Each transform is compared with eager autograd (itself
checked against the float64 reference in test_torch_native.py)."""

import pytest
import torch
from torch.func import grad, jacrev, vmap

from bitempered import torch as bt
from bitempered.bindings.torch import func as torch_func
from bitempered.bindings.torch import ops as torch_ops
from interpreter_warnings import EXPECTED as EXPECTED_INTERPRETER_WARNINGS

pytestmark = EXPECTED_INTERPRETER_WARNINGS  # Triton's interpreter on masked tails (see that module)

B, N, C = 3, 4, 5  # vmapped samples, rows per sample, classes (not powers of two)
torch.manual_seed(0)
X = torch.randn(B, N, C, dtype=torch.float64) * 3
INDICES = torch.tensor([[0, 4, -100, 2], [1, 1, 3, 0], [-100, -100, 2, 4]])
DENSE = torch.softmax(torch.randn(B, N, C, dtype=torch.float64), dim=-1)
WEIGHTS = torch.randn(N, C, dtype=torch.float64)
BINARY_LABELS = torch.rand(B, N, C, dtype=torch.float64)


def loss_indices(reduction):
    return lambda x, y: bt.bi_tempered_logistic_loss(x, y, 0.7, 1.3, label_smoothing=0.1, reduction=reduction)


FUNCTIONS = {  # name -> (scalar-valued function of (logits, labels), labels)
    "loss-indices-mean": (loss_indices("mean"), INDICES),
    "loss-indices-sum": (loss_indices("sum"), INDICES),
    "loss-indices-none": (lambda x, y: (loss_indices("none")(x, y) * WEIGHTS[:, 0]).sum(), INDICES),
    "loss-dense": (lambda x, y: bt.bi_tempered_logistic_loss(x, y, 1.0, 0.8), DENSE),
    "binary": (lambda x, y: bt.bi_tempered_binary_logistic_loss(x, y, 0.5, 1.5, label_smoothing=0.05), BINARY_LABELS),
    "softmax": (lambda x, y: (bt.tempered_softmax(x, 1.4) * WEIGHTS).sum(), INDICES),
    "sigmoid": (lambda x, y: (bt.tempered_sigmoid(x, 0.6) * WEIGHTS).sum(), INDICES),
}


def eager_grad(fn, x, y):
    x = x.clone().requires_grad_()
    fn(x, y).backward()
    return x.grad


@pytest.mark.parametrize("name", FUNCTIONS)
def test_grad_and_vmap_match_eager_autograd(name):
    fn, labels = FUNCTIONS[name]
    eager_values = torch.stack([fn(X[b], labels[b]) for b in range(B)])
    eager_grads = torch.stack([eager_grad(fn, X[b], labels[b]) for b in range(B)])
    assert torch.allclose(grad(fn)(X[0], labels[0]), eager_grads[0], rtol=1e-12, atol=1e-14)
    assert torch.allclose(vmap(fn)(X, labels), eager_values, rtol=1e-12, atol=1e-14)
    assert torch.allclose(vmap(grad(fn))(X, labels), eager_grads, rtol=1e-12, atol=1e-14)
    summed = grad(lambda x, y: vmap(fn)(x, y).sum())(X, labels)
    assert torch.allclose(summed, eager_grads, rtol=1e-12, atol=1e-14)


def test_vmap_over_another_axis_with_shared_labels():
    fn, _ = FUNCTIONS["loss-indices-mean"]
    moved = X.movedim(0, 1)  # samples on axis 1
    expected = torch.stack([fn(X[b], INDICES[0]) for b in range(B)])
    assert torch.allclose(vmap(fn, in_dims=(1, None))(moved, INDICES[0]), expected, rtol=1e-12)


def test_jacrev_of_per_row_losses():
    fn = loss_indices("none")
    jacobian = jacrev(fn)(X[1], INDICES[1])  # [N, N, C]: row i's loss depends on row i only
    for i in range(N):
        expected = eager_grad(lambda x, y: fn(x, y)[i], X[1], INDICES[1])
        assert torch.allclose(jacobian[i], expected, rtol=1e-12, atol=1e-14)


def test_vmap_folds_the_batch_into_one_op_call(monkeypatch):
    calls = []
    native_loss = torch_ops._native_loss

    def counting(logits, *args):
        calls.append(logits.shape)
        return native_loss(logits, *args)

    def no_fallback(*args):
        raise AssertionError("the per-sample fallback ran for unbatched temperatures")

    monkeypatch.setattr(torch_ops, "_native_loss", counting)
    monkeypatch.setattr(torch_func, "_per_sample", no_fallback)
    vmap(grad(FUNCTIONS["loss-indices-mean"][0]))(X, INDICES)
    assert calls == [(B * N, C)]


def test_vmapped_temperatures_run_per_sample():
    temperatures = torch.tensor([0.8, 1.0, 1.4], dtype=torch.float64)

    def fn(x, y, t2):
        return bt.bi_tempered_logistic_loss(x, y, 0.9, t2)

    expected = torch.stack([fn(X[b], INDICES[b], temperatures[b]) for b in range(B)])
    expected_grads = torch.stack([eager_grad(lambda x, y: fn(x, y, temperatures[b]), X[b], INDICES[b])
                                  for b in range(B)])
    assert torch.allclose(vmap(fn)(X, INDICES, temperatures), expected, rtol=1e-12)
    assert torch.allclose(vmap(grad(fn))(X, INDICES, temperatures), expected_grads, rtol=1e-12, atol=1e-14)


def test_vmapped_values_are_still_checked():
    bad = INDICES.clone()
    bad[2, 0] = C  # neither a class nor ignore_index
    with pytest.raises(ValueError, match="labels"):
        vmap(FUNCTIONS["loss-indices-mean"][0])(X, bad)
    with pytest.raises(ValueError, match="t2"):
        vmap(lambda x, t: bt.bi_tempered_logistic_loss(x, INDICES[0], 0.9, t))(X, torch.tensor([1.0, -1.0, 1.0]))


def test_inplace_backward_under_grad_leaves_the_logits_alone():
    x = X[0].clone()
    g = grad(lambda z: bt.bi_tempered_logistic_loss(z, INDICES[0], 0.7, 1.3, inplace_backward=True))(x)
    assert torch.equal(x, X[0])
    assert torch.allclose(g, eager_grad(lambda z, y: bt.bi_tempered_logistic_loss(z, y, 0.7, 1.3), X[0], INDICES[0]))


def test_triton_backend_under_vmap_grad():
    pytest.importorskip("triton")
    x, y = X.float(), INDICES

    def fn(z, labels):
        return bt.bi_tempered_logistic_loss(z, labels, 0.7, 1.3, backend="triton")

    expected = torch.stack([eager_grad(fn, x[b], y[b]) for b in range(B)])
    assert torch.allclose(vmap(grad(fn))(x, y), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("binary", [False, True])
def test_double_backward_of_the_losses_raises_a_clear_error(binary):
    if binary:
        fn = lambda x: bt.bi_tempered_binary_logistic_loss(x, BINARY_LABELS[0], 0.5, 1.5)  # noqa: E731
    else:
        fn = lambda x: bt.bi_tempered_logistic_loss(x, INDICES[0], 0.7, 1.3)  # noqa: E731
    x = X[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(fn(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad(lambda z: grad(fn)(z).sum())(X[0])
    with pytest.raises(RuntimeError, match="forward-mode"):
        torch.func.hessian(fn)(X[0])


@pytest.mark.parametrize("t", [0.7, 1.0, 1.3])
def test_softmax_and_sigmoid_support_double_backward(t):
    x = (X[0] * 0.5).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda z: bt.tempered_softmax(z, t), (x,))
    assert torch.autograd.gradgradcheck(lambda z: bt.tempered_sigmoid(z, t), (x[0],))
    fn = lambda z: (bt.tempered_softmax(z, t) * WEIGHTS).sum()  # noqa: E731
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    (expected,) = torch.autograd.grad((g * WEIGHTS).sum(), x)
    assert torch.allclose(grad(lambda z: (grad(fn)(z) * WEIGHTS).sum())(x.detach()), expected, rtol=1e-10)
