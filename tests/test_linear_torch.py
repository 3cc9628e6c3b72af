"""Fused linear + bi-tempered loss (torch): value and the gradients of hidden, weight and bias against
the float64 NumPy reference (tests/reference.py) and the materialized loss, on small ragged shapes
that force several chunks (N not a multiple of the chunk, H and C not powers of two)."""

import numpy as np
import pytest
import torch

import reference as ref
from bitempered import torch as bt
from bitempered.bindings.common import linear_chunks
from bitempered.bindings.torch import linear as torch_linear
from interpreter_warnings import EXPECTED as pytestmark  # noqa: E402  (the interpreter's expected warnings)

N, H, C, CHUNK = 13, 7, 11, 4  # 4 chunks, the last one of 1 row
TEMPS = [(0.7, 1.3), (1.0, 1.0), (0.5, 0.8), (1.3, 1.1)]


def _inputs(n=N, h=H, c=C, dtype=torch.float64, seed=0, bias=True, dense=False, ignore=(3,)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen, dtype=torch.float64)
    w = torch.randn(c, h, generator=gen, dtype=torch.float64) * 1.5
    b = torch.randn(c, generator=gen, dtype=torch.float64) if bias else None
    if dense:
        y = torch.rand(n, c, generator=gen, dtype=torch.float64)
        y = y / y.sum(-1, keepdim=True)
    else:
        y = torch.randint(0, c, (n,), generator=gen)
        for i in ignore:
            if i < n:
                y[i] = -100
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(x), cast(w), cast(b), (y.to(dtype) if dense else y)


def _reference(x, w, b, y, t1, t2, smoothing, reduction, upstream):
    """float64 (loss, grad_hidden, grad_weight, grad_bias) of the materialized math, NumPy only."""
    xs, ws = x.detach().double().numpy(), w.detach().double().numpy()
    a = xs @ ws.T + (0.0 if b is None else b.detach().double().numpy())
    if y.dtype.is_floating_point:
        labels, kept = y.double().numpy(), np.ones(len(xs), bool)
    else:
        labels, kept = ref.one_hot(y.numpy(), ws.shape[0])
    rows = ref.loss(a, labels, t1, t2, smoothing) * kept
    dlogits = ref.loss_grad(a, labels, t1, t2, smoothing) * kept[:, None]
    g = np.asarray(upstream, np.float64)
    if reduction == "none":
        value, row_weights = rows, g
    elif reduction == "sum":
        value, row_weights = rows.sum(), np.full(len(xs), g)
    else:
        value, row_weights = rows.sum() / kept.sum(), np.full(len(xs), g / kept.sum())
    dlogits = dlogits * row_weights[:, None]
    return value, dlogits @ ws, dlogits.T @ xs, dlogits.sum(0)


def _upstream(reduction, n=N, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64) if reduction == "none" else torch.tensor(-1.7)


def _grads(loss, params, upstream):
    wanted = [p for p in params if p is not None]
    return torch.autograd.grad(loss, wanted, upstream.to(loss.dtype))


def _close(actual, expected, tol):
    actual = np.asarray(actual.detach().double() if isinstance(actual, torch.Tensor) else actual, np.float64)
    scale = max(np.abs(expected).max(), 1e-12)
    assert np.abs(actual - expected).max() <= tol * scale, (np.abs(actual - expected).max(), scale)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("t1,t2", TEMPS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(reduction, t1, t2, bias):
    x, w, b, y = _inputs(bias=bias)
    g = _upstream(reduction)
    loss = bt.linear_bi_tempered_logistic_loss(x, w, y, t1, t2, bias=b, reduction=reduction, chunk_size=CHUNK)
    expected = _reference(x, w, b, y, t1, t2, 0.0, reduction, g)
    _close(loss, expected[0], 1e-9)
    for got, want in zip(_grads(loss, (x, w, b), g), expected[1:]):
        _close(got, want, 1e-8)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dense", [False, True])
def test_smoothing_and_dense_labels(reduction, dense):
    x, w, b, y = _inputs(dense=dense)
    g = _upstream(reduction)
    loss = bt.linear_bi_tempered_logistic_loss(x, w, y, 0.8, 1.2, bias=b, label_smoothing=0.15,
                                               reduction=reduction, chunk_size=CHUNK)
    expected = _reference(x, w, b, y, 0.8, 1.2, 0.15, reduction, g)
    _close(loss, expected[0], 1e-9)
    for got, want in zip(_grads(loss, (x, w, b), g), expected[1:]):
        _close(got, want, 1e-8)


def _materialized(x, w, b, y, reduction, **kwargs):
    logits = x @ w.T + (0 if b is None else b)
    return bt.bi_tempered_logistic_loss(logits, y, reduction=reduction, backend="torch", **kwargs)


@pytest.mark.parametrize("num_iters", [1, 3])
@pytest.mark.parametrize("t1,t2", [(0.6, 1.4), (0.8, 0.6)])
def test_num_iters_matches_materialized(num_iters, t1, t2):
    x, w, b, y = _inputs()
    g = _upstream("none")
    fused = bt.linear_bi_tempered_logistic_loss(x, w, y, t1, t2, bias=b, num_iters=num_iters, reduction="none",
                                                chunk_size=CHUNK)
    plain = _materialized(x, w, b, y, "none", t1=t1, t2=t2, num_iters=num_iters)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(fused, (x, w, b), g), _grads(plain, (x, w, b), g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 5, N, 100, None])
def test_chunking_does_not_change_the_result(chunk_size):
    x, w, b, y = _inputs(dtype=torch.float32)
    loss = bt.linear_bi_tempered_logistic_loss(x, w, y, 0.7, 1.3, bias=b, chunk_size=chunk_size)
    plain = _materialized(x, w, b, y, "mean", t1=0.7, t2=1.3)
    torch.testing.assert_close(loss, plain, rtol=2e-6, atol=1e-6)
    for got, want in zip(_grads(loss, (x, w, b), torch.tensor(1.0)), _grads(plain, (x, w, b), torch.tensor(1.0))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_default_chunk_rule():
    assert linear_chunks.default_chunk_size(4096, 50000) == 316  # 13 balanced chunks of <= 335 rows
    assert linear_chunks.default_chunk_size(8192, 128256) * 4 * 128256 <= linear_chunks.CHUNK_BYTES
    assert linear_chunks.default_chunk_size(10, 3) == 10  # at most N
    assert linear_chunks.default_chunk_size(0, 3) == 1
    assert linear_chunks.default_chunk_size(5, 10**9) == 1  # at least one row


def test_float64_finite_differences():
    x, w, b, y = _inputs(n=5, h=3, c=4, ignore=(2,))
    fn = lambda x, w, b: bt.linear_bi_tempered_logistic_loss(x, w, y, 0.6, 1.4, bias=b, reduction="none",  # noqa: E731
                                                             label_smoothing=0.1, chunk_size=2)
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("frozen", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_inputs(frozen, reduction):
    x, w, b, y = _inputs()
    {"hidden": x, "weight": w, "bias": b}[frozen].requires_grad_(False)
    g = _upstream(reduction)
    loss = bt.linear_bi_tempered_logistic_loss(x, w, y, 0.7, 1.3, bias=b, reduction=reduction, chunk_size=CHUNK)
    loss.backward(g)
    expected = dict(zip(("hidden", "weight", "bias"), _reference(x, w, b, y, 0.7, 1.3, 0.0, reduction, g)[1:]))
    for name, param in (("hidden", x), ("weight", w), ("bias", b)):
        if name == frozen:
            assert param.grad is None
        else:
            _close(param.grad, expected[name], 1e-8)


def test_nothing_requires_grad_and_no_grad_mode():
    x, w, b, y = _inputs()
    expected = _reference(x, w, b, y, 0.7, 1.3, 0.0, "mean", 1.0)[0]
    with torch.no_grad():
        _close(bt.linear_bi_tempered_logistic_loss(x, w, y, 0.7, 1.3, bias=b, chunk_size=CHUNK), expected, 1e-9)
    frozen = [t.detach() for t in (x, w, b)]
    loss = bt.linear_bi_tempered_logistic_loss(frozen[0], frozen[1], y, 0.7, 1.3, bias=frozen[2])
    assert not loss.requires_grad
    _close(loss, expected, 1e-9)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    x, w, b, y = _inputs(n=0)
    loss = bt.linear_bi_tempered_logistic_loss(x, w, y, 0.7, 1.3, bias=b, reduction=reduction)
    plain = _materialized(x, w, b, y, reduction, t1=0.7, t2=1.3)
    assert loss.shape == plain.shape
    torch.testing.assert_close(loss, plain, equal_nan=True)
    (loss.sum() if reduction == "none" else loss).backward()
    assert x.grad.shape == (0, H) and not w.grad.any() and not b.grad.any()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored(reduction):
    x, w, b, y = _inputs(ignore=range(N))
    loss = bt.linear_bi_tempered_logistic_loss(x, w, y, 0.7, 1.3, bias=b, reduction=reduction, chunk_size=CHUNK)
    assert torch.isnan(loss) if reduction == "mean" else loss == 0
    loss.backward()
    assert not x.grad.any() and not w.grad.any() and not b.grad.any()


def test_one_class():
    x, w, b, y = _inputs(c=1, ignore=())
    loss = bt.linear_bi_tempered_logistic_loss(x, w, y, 0.7, 1.3, bias=b, reduction="none", chunk_size=CHUNK)
    expected = _reference(x, w, b, y, 0.7, 1.3, 0.0, "none", _upstream("none"))
    _close(loss + 1.0, expected[0] + 1.0, 1e-12)  # p = 1 = y: the loss is 0
    loss.backward(_upstream("none"))
    assert not x.grad.any() and not w.grad.any() and not b.grad.any()


def test_leading_axes_and_module():
    x, w, b, y = _inputs(n=12)
    module = bt.LinearBiTemperedLogisticLoss(0.7, 1.3, reduction="none", chunk_size=5)
    loss = module(x.reshape(3, 4, H), w, y.reshape(3, 4), bias=b)
    assert loss.shape == (3, 4)
    expected = _reference(x, w, b, y, 0.7, 1.3, 0.0, "none", np.ones(12))[0]
    _close(loss.reshape(-1), expected, 1e-9)
    assert "chunk_size=5" in repr(module)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_no_worse_than_materialized(dtype, reduction):
    """Error against float64 of every gradient: fused <= materialized (same dtype) + a dtype tolerance."""
    x64, w64, b64, y = _inputs(n=37, h=19, c=53, ignore=(3, 20))
    x, w, b = (t.detach().to(dtype).requires_grad_() for t in (x64, w64, b64))
    g = _upstream(reduction, n=37)
    exact = _reference(x, w, b, y, 0.8, 1.2, 0.1, reduction, g)  # the low-precision inputs, exactly
    fused = bt.linear_bi_tempered_logistic_loss(x, w, y, 0.8, 1.2, bias=b, label_smoothing=0.1,
                                                reduction=reduction, chunk_size=8)
    plain = _materialized(x, w, b, y, reduction, t1=0.8, t2=1.2, label_smoothing=0.1)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    for got, base, want in zip((fused,) + _grads(fused, (x, w, b), g), (plain,) + _grads(plain, (x, w, b), g),
                               exact):
        assert got.dtype == base.dtype
        scale = np.abs(want).max()
        err = np.abs(got.detach().double().numpy() - want).max() / scale
        base_err = np.abs(base.detach().double().numpy() - want).max() / scale
        assert err <= base_err + tol, (err, base_err)


def test_torch_compile_fullgraph_no_recompile_for_new_temperatures():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    x, w, b, y = _inputs(dtype=torch.float32)

    @torch.compile(fullgraph=True, backend=counter, dynamic=False)
    def step(x, w, b, y, t1, t2):
        return bt.linear_bi_tempered_logistic_loss(x, w, y, t1, t2, bias=b, chunk_size=CHUNK)

    compiled_after_first = None
    for t1, t2 in [(0.7, 1.3), (0.9, 1.1), (1.0, 1.0)]:
        t1_, t2_ = torch.tensor(t1, dtype=torch.float64), torch.tensor(t2, dtype=torch.float64)
        if compiled_after_first is None:
            loss = step(x, w, b, y, t1_, t2_)
            compiled_after_first = counter.frame_count
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                loss = step(x, w, b, y, t1_, t2_)
        grads = torch.autograd.grad(loss, (x, w, b))
        eager = bt.linear_bi_tempered_logistic_loss(x, w, y, t1, t2, bias=b, chunk_size=CHUNK)
        torch.testing.assert_close(loss, eager)
        for got, want in zip(grads, torch.autograd.grad(eager, (x, w, b))):
            torch.testing.assert_close(got, want)
    assert compiled_after_first >= 1 and counter.frame_count == compiled_after_first


def test_opcheck():
    x, w, b, y = (t.float() if t.dtype.is_floating_point else t for t in _inputs())
    t1, t2, s = (torch.tensor(v, dtype=torch.float64) for v in (0.7, 1.3, 0.1))
    row_weights = torch.rand(y.shape[0])
    for reduction, weights in (("mean", None), ("none", None), ("mean", row_weights), ("none", row_weights)):
        args = (x, w, b, y, weights, t1, t2, s, 0, -100, reduction, "torch", CHUNK, True, True, True)
        torch.library.opcheck(torch_linear.linear_loss_op, args)
    args = (x.half(), w.half(), b.half(), y, None, t1, t2, s, 0, -100, "mean", "torch", CHUNK, True, True, True)
    torch.library.opcheck(torch_linear.linear_loss_op, args)  # float16: grad_hidden held in float32
    empty = _inputs(n=0, dtype=torch.float32)
    torch.library.opcheck(torch_linear.linear_loss_op, (*empty, None, t1, t2, s, 2, -100, "sum", "torch", 3, True,
                                                        False, True))


def test_triton_path_interpreted(monkeypatch):
    pytest.importorskip("triton")
    import os

    from bitempered.bindings.torch import launchers as torch_triton

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []
    real = torch_triton.loss_forward
    monkeypatch.setattr(torch_triton, "loss_forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    x, w, b, y = (t.detach().float().to(device) if t.dtype.is_floating_point else t.to(device)
                  for t in _inputs(n=7, h=5, c=9, ignore=(2,)))
    for reduction in ("mean", "none"):
        params = [t.clone().requires_grad_() for t in (x, w, b)]
        g = _upstream(reduction, n=7).float().to(device)
        loss = bt.linear_bi_tempered_logistic_loss(*params[:2], y, 0.7, 1.3, bias=params[2], reduction=reduction,
                                                   label_smoothing=0.1, chunk_size=3, backend="triton")
        grads = torch.autograd.grad(loss, params, g)
        expected = _reference(*params[:2], params[2], y.cpu(), 0.7, 1.3, 0.1, reduction, g.cpu())
        _close(loss.cpu(), expected[0], 1e-5)
        for got, want in zip(grads, expected[1:]):
            _close(got.cpu(), want, 1e-5)
    assert len(calls) == 3 + 6  # mean: 3 chunks (forward); none: 3 forward + 3 recomputed in the backward
    assert all(k["grad_out"] is not None for k in calls[:3])  # the in-place mode


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x[:, :-1], w, y, 1.0, 1.0), ValueError, "last dim"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x, w, y, 1.0, 1.0, bias=b[:-1]), ValueError, "bias"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x, w.float(), y, 1.0, 1.0), TypeError, "same dtype"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x, w, y[:-1], 1.0, 1.0), ValueError, "labels shape"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x, w, torch.full_like(y, C), 1.0, 1.0), ValueError,
     "outside"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x, w, y, 1.0, 1.0, chunk_size=0), ValueError,
     "chunk_size"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x, w, y, 1.0, 1.0, chunk_size=2.0), TypeError,
     "chunk_size"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x, w, y, 2.5, 1.0), ValueError, "t1"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x, w, y, 1.0, 0.0), ValueError, "t2"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x, w, y, 1.0, 1.0, reduction="avg"), ValueError,
     "reduction"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x, w[0], y, 1.0, 1.0), ValueError, "weight"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x.long(), w, y, 1.0, 1.0), TypeError, "hidden"),
    (lambda x, w, b, y: bt.LinearBiTemperedLogisticLoss(1.0, 1.0, chunk_size=-1), ValueError, "chunk_size"),
    (lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x[:, :0], w[:, :0], y, 1.0, 1.0), ValueError,
     r"hidden must have at least one feature \(H >= 1\)"),
    (lambda x, w, b, y: bt.LinearBiTemperedLogisticLoss(1.0, 1.0, ignore_index=1.5), TypeError, "ignore_index"),
    (lambda x, w, b, y: bt.LinearBiTemperedLogisticLoss(1.0, float("inf")), ValueError, "t2"),
])
def test_bad_input(call, error, match):
    x, w, b, y = (t.detach() if t.dtype.is_floating_point else t for t in _inputs())
    with pytest.raises(error, match=match):
        call(x, w, b, y)


@pytest.mark.parametrize("cpu_kernel_on", [True, False])
def test_per_row_upstream_at_t1_with_dense_float32_labels(cpu_kernel_on):
    """reduction="none" recomputes each chunk with the upstream values as per-row gradient scales;
    at t1 = t2 = 1 with float32 dense labels the CPU C kernel (one scale for every row) serves the
    chunk: each row must still get its own upstream value."""
    import contextlib

    from bitempered.bindings.torch.native import cpu_kernel

    x, w, b, y = _inputs(dtype=torch.float32, dense=True)
    g = torch.linspace(-2.0, 3.0, N)
    with contextlib.nullcontext() if cpu_kernel_on else cpu_kernel.switched_off():
        fused = bt.linear_bi_tempered_logistic_loss(x, w, y, 1.0, 1.0, bias=b, reduction="none", chunk_size=CHUNK)
        want = _materialized(x, w, b, y, "none", t1=1.0, t2=1.0)
        got_grads = _grads(fused, (x, w, b), g)
        want_grads = _grads(want, (x, w, b), g)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-6)
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
