"""PyTorch API on the native backend against the float64 reference (tests/reference.py)."""

import math

import numpy as np
import pytest
import torch

import reference as ref
from bitempered import torch as bt
from bitempered.bindings.torch.native import math as native

T2_VALUES = [0.3, 0.8, 1.0, 1.2, 2.0, 4.0]
LEADING_SHAPES = [(), (3,), (2, 5)]
# Relative tolerance of float32/16-bit results against float64 truth (16-bit: input rounding dominates,
# so those compare against the reference evaluated on the rounded inputs).
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def random_logits(shape, scale, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def random_dense_labels(shape, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.rand(shape, generator=gen, dtype=torch.float64)
    return y / y.sum(-1, keepdim=True)


def assert_close(actual, expected, rtol, atol=0.0):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol)


def assert_normwise_close(actual, expected, rtol):
    """||actual - expected|| <= rtol ||expected||: gradients at t2 < t1 span many magnitudes."""
    actual = np.asarray(actual, dtype=np.float64)
    assert np.linalg.norm(actual - expected) <= rtol * np.linalg.norm(expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", T2_VALUES)
@pytest.mark.parametrize("leading", LEADING_SHAPES)
def test_tempered_softmax_matches_reference(dtype, t, leading):
    a = random_logits(leading + (37,), 3.0, seed=int(t * 10) + len(leading), dtype=dtype)
    p = bt.tempered_softmax(a, t)
    assert p.dtype == dtype and p.shape == a.shape
    expected = ref.tempered_softmax(a.double().numpy(), t)
    tol = TOLERANCES[dtype] if dtype in (torch.float64, torch.float32) else 1e-2  # output rounding
    assert_close(p.double(), expected, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("num_classes", [1, 2, 3, 1000])
def test_rows_sum_to_one_and_c1(num_classes):
    a = random_logits((4, num_classes), 5.0, seed=num_classes)
    for t in [0.5, 1.0, 1.7]:
        p = bt.tempered_softmax(a, t).double()
        assert_close(p.sum(-1), np.ones(4), rtol=2e-5)
    if num_classes == 1:
        assert torch.equal(bt.tempered_softmax(a, 0.5), torch.ones_like(a))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t1,t2", [(0.0, 0.3), (0.5, 0.8), (0.8, 1.2), (1.0, 1.0), (1.5, 2.0), (0.2, 4.0),
                                   (1.5, 0.8)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_grad_dense(dtype, t1, t2, smoothing):
    a = random_logits((2, 3, 29), 2.0, seed=7, dtype=dtype).requires_grad_()
    y = random_dense_labels((2, 3, 29), seed=7).to(dtype)
    loss = bt.bi_tempered_logistic_loss(a, y, t1, t2, label_smoothing=smoothing, reduction="none")
    expected = ref.loss(a.detach().double().numpy(), y.double().numpy(), t1, t2, smoothing)
    assert_close(loss.detach(), expected, rtol=TOLERANCES[dtype], atol=TOLERANCES[dtype])
    loss.sum().backward()
    grad = ref.loss_grad(a.detach().double().numpy(), y.double().numpy(), t1, t2, smoothing)
    assert a.grad.dtype == dtype
    # p^(t2 - t1) with t2 < t1 amplifies the float32 rounding of p near the edge of the support.
    grad_tol = TOLERANCES[dtype] * (25 if t2 < t1 else 1)
    assert_normwise_close(a.grad, grad, rtol=grad_tol)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("t1,t2", [(0.5, 0.8), (0.8, 1.2), (1.0, 1.0)])
def test_integer_labels_ignore_index_and_reductions(reduction, t1, t2):
    a = random_logits((6, 5, 11), 2.0, seed=3, dtype=torch.float64).requires_grad_()
    idx = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(4))
    idx[1, 2] = idx[4, 0] = -100
    loss = bt.bi_tempered_logistic_loss(a, idx, t1, t2, label_smoothing=0.05, reduction=reduction)
    dense, kept = ref.one_hot(idx.numpy(), 11)
    rows = ref.loss(a.detach().numpy(), dense, t1, t2, 0.05) * kept
    grads = ref.loss_grad(a.detach().numpy(), dense, t1, t2, 0.05) * kept[..., None]
    scale = {"none": 1.0, "sum": 1.0, "mean": 1.0 / kept.sum()}[reduction]
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / kept.sum()}[reduction]
    assert_close(loss.detach(), expected, rtol=1e-10, atol=1e-12)
    upstream = torch.rand(loss.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(3.0).double()
    loss.backward(upstream)
    expected_grad = grads * scale * (upstream.numpy()[..., None] if reduction == "none" else 3.0)
    assert_close(a.grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert torch.all(a.grad[1, 2] == 0) and torch.all(a.grad[4, 0] == 0)


def test_all_rows_ignored_mean_is_nan_with_zero_grad():
    a = random_logits((3, 4), 1.0, seed=0).requires_grad_()
    loss = bt.bi_tempered_logistic_loss(a, torch.full((3,), -100), 0.8, 1.2)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.all(a.grad == 0)


@pytest.mark.parametrize("t1,t2", [(0.5, 1.5), (0.5, 0.8)])
@pytest.mark.parametrize("num_iters", [1, 5, 20])
def test_num_iters_matches_original_jax(t1, t2, num_iters):
    jax_loss = pytest.importorskip("jax_bitempered_loss.loss")
    a = random_logits((16, 9), 4.0, seed=num_iters)
    y = random_dense_labels((16, 9), seed=num_iters).float()
    ours = bt.bi_tempered_logistic_loss(a, y, t1, t2, num_iters=num_iters, reduction="none")
    theirs = jax_loss.bi_tempered_logistic_loss(a.numpy(), y.numpy(), t1, t2, num_iters=num_iters)
    assert_close(ours, np.asarray(theirs), rtol=1e-5, atol=1e-5)
    p_ours = bt.tempered_softmax(a, t2, num_iters=num_iters)
    p_theirs = jax_loss.tempered_softmax(a.numpy(), t2, num_iters=num_iters)
    assert_close(p_ours, np.asarray(p_theirs), rtol=1e-5, atol=1e-6)


def test_published_values_of_the_original_package():
    """Values from jax-bitempered-loss 0.0.2's loss_test.py (num_iters=5 unless stated)."""
    a = torch.tensor([[-0.5, 0.1, 2.0], [0.1, 1.5, -5.0], [4.0, -3.0, -6.0]])
    y = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.2, 0.8, 0.0]])
    loss = bt.bi_tempered_logistic_loss(a, y, 0.5, 1.5, num_iters=5, reduction="none")
    assert_close(loss, [0.02301914, 0.18972909, 0.93874922], rtol=0, atol=1e-5)
    loss = bt.bi_tempered_logistic_loss(a, y, 0.5, 0.8, num_iters=20, reduction="none")
    assert_close(loss, [0.21646356, 0.41836615, 1.33997854], rtol=0, atol=1e-5)
    onehot = torch.eye(3)
    loss = bt.bi_tempered_logistic_loss(a, onehot, 0.5, 1.5, label_smoothing=0.1, num_iters=5, reduction="none")
    assert_close(loss, [0.76652711, 0.08627685, 1.35443510], rtol=0, atol=1e-5)
    p = bt.tempered_softmax(a, 4.0, num_iters=5)
    assert_close(p, [[0.3205458, 0.32714278, 0.3523402], [0.3430056, 0.36491093, 0.29220778],
                     [0.41369352, 0.30534995, 0.28299212]], rtol=0, atol=1e-6)
    s = bt.tempered_sigmoid(torch.tensor([0.0, 3.0, 6.0]), 4.0, num_iters=5)
    assert_close(s, [0.5, 0.58516014, 0.6421035], rtol=0, atol=1e-6)
    b = bt.bi_tempered_binary_logistic_loss(torch.zeros(2), torch.tensor([1.0, 0.0]), 1.0, 1.0, reduction="none")
    assert_close(b, [0.69314718, 0.69314718], rtol=0, atol=1e-5)
    dyn = torch.tensor([[-0.5, 0.1, 2.0]])
    labels = torch.tensor([[0.2, 0.5, 0.3]])
    for t1, t2, value in [(1.0, 1.0, 0.628705), (0.9, 1.1, 0.45677936), (0.8, 1.2, 0.34298314),
                          (0.7, 1.3, 0.26295574)]:
        assert_close(bt.bi_tempered_logistic_loss(dyn, labels, t1, t2, num_iters=5), value, rtol=0, atol=1e-5)


def test_default_converges_where_the_original_does_not():
    a = random_logits((8, 1000), 10.0, seed=11)
    p5 = bt.tempered_softmax(a, 1.5, num_iters=5).double().sum(-1)
    p = bt.tempered_softmax(a, 1.5).double().sum(-1)
    assert (p5 - 1).abs().max() > 1e-2  # the original at its default misses
    assert (p - 1).abs().max() < 2e-5


@pytest.mark.parametrize("t1", [0.0, 0.5, 0.8, 1.0, 1.5])
@pytest.mark.parametrize("t2", [0.3, 0.8, 1.0, 1.2, 2.0, 4.0])
@pytest.mark.parametrize("labels_kind,smoothing", [("dense", 0.0), ("dense", 0.2), ("index", 0.0),
                                                   ("index", 0.1)])
def test_gradient_matches_finite_differences(t1, t2, labels_kind, smoothing):
    gen = torch.Generator().manual_seed(int(10 * t1 + 100 * t2))
    a = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 1.5
    if labels_kind == "dense":
        y = torch.rand(3, 6, generator=gen, dtype=torch.float64)
        y = y / y.sum(-1, keepdim=True)
    else:
        y = torch.randint(0, 6, (3,), generator=gen)
    if t2 < 1 <= t1:
        a = a * 0.05  # keep every p > 0 so that the loss stays finite (p = 0 is tested below)
    a.requires_grad_()
    loss = bt.bi_tempered_logistic_loss(a, y, t1, t2, label_smoothing=smoothing, reduction="sum")
    (grad,) = torch.autograd.grad(loss, a)
    step = 1e-6
    fd = torch.zeros_like(a)
    with torch.no_grad():
        for idx in np.ndindex(*a.shape):
            e = torch.zeros_like(a)
            e[idx] = step
            plus = bt.bi_tempered_logistic_loss(a + e, y, t1, t2, label_smoothing=smoothing, reduction="sum")
            minus = bt.bi_tempered_logistic_loss(a - e, y, t1, t2, label_smoothing=smoothing, reduction="sum")
            fd[idx] = (plus - minus) / (2 * step)
    assert torch.isfinite(loss)
    rel = (grad - fd).norm() / fd.norm().clamp(min=1e-300)
    assert rel < 1e-6, rel


@pytest.mark.parametrize("t1,t2", [(1.5, 0.5), (1.2, 0.3), (1.0, 0.8)])
def test_finite_gradient_where_some_p_is_zero(t1, t2):
    a = torch.tensor([[0.0, -0.5, -30.0, -50.0], [2.0, 0.0, -40.0, 1.0]], requires_grad=True)
    p = bt.tempered_softmax(a, t2)
    assert (p == 0).any()
    y = torch.tensor([0, 3])
    loss = bt.bi_tempered_logistic_loss(a, y, t1, t2, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    # A true +inf, not NaN, when a labelled class has p = 0 and t1 >= 1.
    bad = bt.bi_tempered_logistic_loss(a.detach(), torch.tensor([2, 2]), t1, t2, reduction="none")
    assert torch.isinf(bad).all() and (bad > 0).all()


def test_nan_row_is_isolated_and_infinities_follow_limits():
    a = random_logits((4, 6), 2.0, seed=5).requires_grad_(False)
    a[1, 3] = float("nan")
    a[2, 0] = float("-inf")
    a[3, 4] = float("inf")
    a.requires_grad_()
    y = torch.tensor([1, 2, 3, 4])
    loss = bt.bi_tempered_logistic_loss(a, y, 0.8, 1.2, reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[1]) and torch.isnan(a.grad[1]).all()
    finite = [0, 2, 3]
    assert torch.isfinite(loss[finite]).all() and torch.isfinite(a.grad[finite]).all()
    p = bt.tempered_softmax(a.detach(), 1.2)
    assert p[2, 0] == 0
    assert torch.equal(p[3], torch.eye(6)[4])
    clean = a.detach()[0:1]
    assert_close(loss[0].detach(), ref.loss(clean.double().numpy(), np.eye(6)[[1]], 0.8, 1.2), rtol=2e-5)


def test_empty_batch():
    a = torch.zeros(0, 5, requires_grad=True)
    idx = torch.zeros(0, dtype=torch.long)
    assert bt.bi_tempered_logistic_loss(a, idx, 0.8, 1.2, reduction="none").shape == (0,)
    assert bt.bi_tempered_logistic_loss(a, idx, 0.8, 1.2, reduction="sum") == 0
    mean = bt.bi_tempered_logistic_loss(a, idx, 0.8, 1.2)
    assert torch.isnan(mean)
    mean.backward()
    assert bt.tempered_softmax(torch.zeros(0, 3), 1.5).shape == (0, 3)


def test_non_contiguous_input():
    wide = random_logits((5, 40), 2.0, seed=9)
    a = wide[:, ::2]
    idx = torch.arange(5)
    assert torch.allclose(bt.bi_tempered_logistic_loss(a, idx, 0.5, 2.0, reduction="none"),
                          bt.bi_tempered_logistic_loss(a.contiguous(), idx, 0.5, 2.0, reduction="none"))
    assert torch.allclose(bt.tempered_softmax(a.t(), 1.3), bt.tempered_softmax(a.t().contiguous(), 1.3))


def test_binary_loss_and_sigmoid():
    x = random_logits((4, 3), 3.0, seed=1, dtype=torch.float64).requires_grad_()
    y = torch.rand(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss = bt.bi_tempered_binary_logistic_loss(x, y, 0.5, 1.5, label_smoothing=0.1, reduction="none")
    assert_close(loss.detach(), ref.binary_loss(x.detach().numpy(), y.numpy(), 0.5, 1.5, 0.1), rtol=1e-10)
    loss.sum().backward()
    stacked = torch.stack([torch.zeros_like(x), x], -1).detach()
    dense = torch.stack([1 - y, y], -1)
    assert_close(x.grad, ref.loss_grad(stacked.numpy(), dense.numpy(), 0.5, 1.5, 0.1)[..., 1], rtol=1e-9)
    s = bt.tempered_sigmoid(x.detach(), 2.0)
    assert_close(s, ref.tempered_sigmoid(x.detach().numpy(), 2.0), rtol=1e-10)


def test_softmax_and_sigmoid_gradients_match_finite_differences():
    a = random_logits((3, 5), 1.0, seed=4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: bt.tempered_softmax(z, 1.6), (a,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda z: bt.tempered_softmax(z, 0.6), (a,), eps=1e-6, atol=1e-7)
    x = random_logits((7,), 2.0, seed=5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: bt.tempered_sigmoid(z, 2.5), (x,), eps=1e-6, atol=1e-7)


def test_module_matches_function_and_temperature_tensors():
    a = random_logits((6, 10), 2.0, seed=2)
    idx = torch.arange(6)
    module = bt.BiTemperedLogisticLoss(0.7, 1.3, label_smoothing=0.1)
    assert torch.equal(module(a, idx), bt.bi_tempered_logistic_loss(a, idx, 0.7, 1.3, 0.1))
    module.t1, module.t2 = torch.tensor(0.7), torch.tensor(1.3)
    assert torch.allclose(module(a, idx), bt.bi_tempered_logistic_loss(a, idx, 0.7, 1.3, 0.1))
    assert "t1=" in repr(module)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_flushed_is_exp_except_for_subnormal_results(dtype):
    """exp_flushed (the native solver's exp where log p = -inf is common): exp itself on the normal
    range, 0 for -inf and for results at the subnormal end, NaN and +inf propagated."""
    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([0.0, -3.5, 20.0, math.log(tiny) + 2.0, math.log(tiny) - 5.0, -1e30,
                      -math.inf, math.inf, math.nan], dtype=dtype)
    got = native.exp_flushed(x)
    torch.testing.assert_close(got[:4], torch.exp(x[:4]), rtol=2 * torch.finfo(dtype).eps, atol=0.0)
    assert got[3] > 0  # the smallest kept results are normal numbers, not flushed
    assert (got[4:7] == 0).all() and got[7] == math.inf and torch.isnan(got[8])
