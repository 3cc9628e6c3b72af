"""Mixed precision and gradient checking in torch (issue #25, items 1 and 2).

- float16 gradients under a GradScaler: the forward pass used to store dL/dlogits x 1/N already
  rounded to float16, flushing most small entries before the loss scale could save them. Now no
  entry whose float32 value times the scale is a normal float16 number comes back flushed, and
  each is within 2e-3 of it (the control below shows the old storage failing the same check).
- torch.autocast: the losses upcast 16-bit logits to float32, as F.cross_entropy does.
- torch.autograd.gradcheck and retained graphs (the backward used to scale the stored gradient in
  place, so a second use of the graph failed).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from bitempered import torch as bt
from bitempered.bindings.torch import rows
from interpreter_warnings import EXPECTED

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest.py where triton is installed
pytestmark = EXPECTED

FP16_TINY = 2.0**-14  # float16's smallest normal number
FP16_MAX = 65504.0
BACKENDS = ["torch"] + (["triton"] if INTERPRETED else [])
# (a GPU session also runs the compiled kernels on CUDA tensors: backend "auto" there)
DEVICE_BACKENDS = [("cpu", b) for b in BACKENDS] + ([("cuda", "auto")] if torch.cuda.is_available() else [])
N, C = 2048, 13  # at N = 2048 a stored g/N is below float16's normal range for |g| < 0.125


def _inputs(n=N, c=C, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(n, c, generator=gen)).half()
    labels = torch.randint(0, c, (n,), generator=gen)
    labels[::7] = -100  # ignored rows: "mean" divides by the kept ones
    return logits, labels


def _scaled_grads(fn, logits, scale, **kwargs):
    """(float16 run's gradient, float32 run's gradient x scale): loss x scale backpropagated, as a
    GradScaler does, from the same (float16-representable) logits."""
    grads = []
    for x in (logits.clone(), logits.float()):
        x.requires_grad_()
        loss = fn(x, **kwargs)
        (loss.sum() * scale).backward()
        grads.append(x.grad.float())
    return grads


def _assert_fp16_survives(got, want, tolerance=2e-3):
    """No flushed entry where ``want`` is a normal float16 number; relative error <= tolerance there."""
    normal = (want.abs() >= FP16_TINY) & (want.abs() <= FP16_MAX)
    assert normal.sum() > 0.25 * want.numel()  # not vacuous (t2 < 1 leaves classes at p = 0)
    flushed = (got == 0) & normal
    assert int(flushed.sum()) == 0, f"{int(flushed.sum())} flushed entries"
    error = ((got - want).abs() / want.abs())[normal].max()
    assert error <= tolerance, float(error)


def test_the_old_scaled_float16_storage_flushes_these_entries():
    """Control: storing g x 1/N in float16 (the old forward pass) fails the check the tests below pass."""
    logits, labels = _inputs()
    x = logits.float().requires_grad_()
    bt.bi_tempered_logistic_loss(x, labels, 0.8, 1.2).backward()
    scale = 65536.0
    old = x.grad.half().float() * scale  # the forward's rounding, then the upstream scale
    with pytest.raises(AssertionError, match="flushed"):
        _assert_fp16_survives(old, x.grad * scale)


@pytest.mark.parametrize("device, backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scale", [256.0, 65536.0])
def test_float16_gradients_survive_loss_scaling(device, backend, reduction, scale):
    logits, labels = (t.to(device) for t in _inputs())
    # "sum" and "none" (summed) have no 1/N: scale down so their result stays within float16's range
    scale = scale if reduction == "mean" else scale / N
    got, want = _scaled_grads(bt.bi_tempered_logistic_loss, logits, scale, labels=labels, t1=0.8, t2=1.2,
                              reduction=reduction, backend=backend)
    _assert_fp16_survives(got, want)


@pytest.mark.parametrize("t1, t2", [(1.0, 1.0), (0.5, 0.8)])
def test_float16_gradients_survive_at_every_temperature(t1, t2):
    logits, labels = _inputs(seed=3)
    got, want = _scaled_grads(bt.bi_tempered_logistic_loss, logits, 4096.0, labels=labels, t1=t1, t2=t2,
                              label_smoothing=0.1)
    _assert_fp16_survives(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_gradients_of_the_in_place_mode(backend):
    """inplace_backward=True keeps the gradient in the logits' float16 buffer, before the 1/N: every
    entry that is normal there survives (a loss scale up to N)."""
    logits, labels = _inputs(seed=1)
    runs = (logits.clone().requires_grad_(), logits.float().requires_grad_())
    for x in runs:
        leaf = x * 1.0  # the in-place mode writes into a non-leaf's buffer
        loss = bt.bi_tempered_logistic_loss(leaf, labels, 0.8, 1.2, inplace_backward=True, backend=backend)
        (loss * 1024.0).backward()
    _assert_fp16_survives(*(x.grad.float() for x in runs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_binary_gradients_survive_loss_scaling(backend):
    gen = torch.Generator().manual_seed(2)
    logits = (4.0 * torch.randn(N * 4, generator=gen)).half()
    labels = torch.rand(N * 4, generator=gen)
    got, want = _scaled_grads(bt.bi_tempered_binary_logistic_loss, logits, 65536.0, labels=labels, t1=0.8, t2=1.2,
                              backend=backend)
    _assert_fp16_survives(got, want)


def test_float16_fused_linear_gradients_survive_loss_scaling():
    """grad_hidden of the fused linear head: against the float32 gradient of the same float16
    logits (the matmul's own rounding is the same on both sides), scaled."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(N, 16, generator=gen).half().requires_grad_()
    weight = (0.5 * torch.randn(C, 16, generator=gen)).half()
    labels = torch.randint(0, C, (N,), generator=gen)
    scale = 65536.0
    (bt.linear_bi_tempered_logistic_loss(hidden, weight, labels, 0.8, 1.2) * scale).backward()
    logits = (hidden.detach() @ weight.t()).float().requires_grad_()  # float16 matmul, as in the op
    bt.bi_tempered_logistic_loss(logits, labels, 0.8, 1.2).backward()
    want = (logits.grad * scale) @ weight.float()
    got = hidden.grad.float()
    normal = want.abs() >= FP16_TINY
    assert int(((got == 0) & normal).sum()) == 0
    # the chunk gradient and the matmul round once each in float16 before the last rounding
    torch.testing.assert_close(got, want, rtol=0, atol=4e-3 * float(want.abs().max()))


def test_stored_gradient_dtype():
    assert rows.stored_grad_dtype(torch.float16) == torch.float32
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        assert rows.stored_grad_dtype(dtype) == dtype


# --------------------------------------------------------------------------------------------
# torch.autocast
# --------------------------------------------------------------------------------------------

def test_autocast_upcasts_the_losses_like_cross_entropy():
    logits, labels = _inputs(n=37, c=11)
    x = logits.bfloat16().requires_grad_()
    x32 = x.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = bt.bi_tempered_logistic_loss(x, labels, 0.8, 1.2)
        cross_entropy = F.cross_entropy(x, labels)
        at_one = bt.bi_tempered_logistic_loss(x, labels, 1.0, 1.0)
    assert loss.dtype == cross_entropy.dtype == torch.float32
    torch.testing.assert_close(at_one, cross_entropy)
    want = bt.bi_tempered_logistic_loss(x32, labels, 0.8, 1.2)
    assert torch.equal(loss, want)  # computed from the upcast logits, not from bfloat16 ones
    loss.backward()
    want.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, x32.grad.bfloat16())


def test_autocast_binary_and_fused_linear_losses():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(29, generator=gen).bfloat16()
    y = torch.rand(29, generator=gen)
    hidden, weight = torch.randn(23, 8, generator=gen), torch.randn(11, 8, generator=gen)
    labels = torch.randint(0, 11, (23,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        binary = bt.bi_tempered_binary_logistic_loss(x, y, 0.8, 1.2)
        fused = bt.linear_bi_tempered_logistic_loss(hidden, weight, labels, 0.8, 1.2)
        unfused = bt.bi_tempered_logistic_loss(F.linear(hidden, weight), labels, 0.8, 1.2)  # bfloat16 matmul
    assert binary.dtype == torch.float32
    torch.testing.assert_close(binary, bt.bi_tempered_binary_logistic_loss(x.float(), y, 0.8, 1.2))
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, unfused, rtol=1e-3, atol=1e-4)


def test_autocast_rule_of_the_custom_op():
    """Called directly, the loss op takes float32 logits inside autocast (its gradient output shows it)."""
    logits, labels = _inputs(n=5, c=7)
    t = torch.tensor(1.0, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad, _ = torch.ops.bitempered.loss(logits.bfloat16(), labels, None, t, t, torch.tensor(0.0), 0, -100,
                                                  "mean", "torch", True)
    assert grad.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_float16_on_cuda():
    logits, labels = _inputs(n=64, c=11)
    x = logits.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = bt.bi_tempered_logistic_loss(x, labels.cuda(), 0.8, 1.2)
        cross_entropy = F.cross_entropy(x, labels.cuda())
    assert loss.dtype == cross_entropy.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.float16


# --------------------------------------------------------------------------------------------
# gradcheck and retained graphs
# --------------------------------------------------------------------------------------------

def _double(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["indices", "dense"])
def test_gradcheck_of_the_loss(reduction, kind):
    x = _double(5, 7)
    if kind == "indices":
        labels = torch.tensor([0, 6, -100, 3, 2])
    else:
        labels = torch.softmax(torch.randn(5, 7, dtype=torch.float64), dim=-1)
    fn = lambda a: bt.bi_tempered_logistic_loss(a, labels, 0.8, 1.2, label_smoothing=0.1,  # noqa: E731
                                                reduction=reduction)
    assert torch.autograd.gradcheck(fn, (x,))


def test_gradcheck_of_the_binary_loss_softmax_and_sigmoid():
    x, x1 = _double(5, 7), _double(9, seed=1)
    y = torch.rand(9, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: bt.bi_tempered_binary_logistic_loss(a, y, 0.8, 1.2), (x1,))
    assert torch.autograd.gradcheck(lambda a: bt.tempered_softmax(a, 1.3), (x,))
    assert torch.autograd.gradcheck(lambda a: bt.tempered_sigmoid(a, 0.7), (x1,))
    assert torch.autograd.gradgradcheck(lambda a: bt.tempered_softmax(a, 1.3), (x,))
    assert torch.autograd.gradgradcheck(lambda a: bt.tempered_sigmoid(a, 0.7), (x1,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_of_the_fused_linear_loss(reduction):
    hidden, weight, bias = _double(5, 3), _double(7, 3, seed=1), _double(7, seed=2)
    labels = torch.tensor([0, 6, -100, 3, 2])
    fn = lambda h, w, b: bt.linear_bi_tempered_logistic_loss(h, w, labels, 0.8, 1.2, bias=b,  # noqa: E731
                                                             reduction=reduction)
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_retained_graph_gives_the_same_gradient_twice(backend, dtype):
    logits, labels = _inputs(n=9, c=7)
    x = logits.to(dtype).requires_grad_()
    loss = bt.bi_tempered_logistic_loss(x, labels, 0.8, 1.2, reduction="none", backend=backend)
    upstream = torch.linspace(0.5, 2.0, 9)
    (first,) = torch.autograd.grad(loss, x, upstream, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, upstream)
    assert torch.equal(first, second)
