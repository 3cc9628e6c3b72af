"""Learnable temperatures in PyTorch (issue 22): the gradients of the loss with respect to t1 and
t2, and of tempered_softmax / tempered_sigmoid with respect to t, through the converged
normalization, for 0-d and per-row temperatures.

The float64 native backend is checked against fourth-order central differences of the converged
loss itself (h = 1e-5: truncation ~h^4, rounding ~1e-11), at points of SPEC's grid including t = 1
exactly and t2 < 1 rows with classes outside the finite support; the Triton kernels (float32)
against the float64 native values. Every checked derivative is asserted to be far from 0, so a
wrong formula cannot pass.
"""

from __future__ import annotations

import math

import pytest
import torch

from bitempered import torch as bt
from bitempered.bindings.torch import ops
from bitempered.bindings.torch.native import temperature
from interpreter_warnings import EXPECTED as EXPECTED_INTERPRETER_WARNINGS

pytestmark = EXPECTED_INTERPRETER_WARNINGS

N, C = 6, 5
STEP = 1e-5
RTOL = 1e-7
INDICES = torch.tensor([0, 3, -100, 1, 4, 2])
# (t1, t2): below, at and above 1; t2 < 1 puts row 0's small classes outside the support
GRID = [(0.5, 0.7), (0.8, 1.0), (1.0, 1.0), (0.8, 1.5), (0.5, 2.0), (1.0, 0.7)]


def _logits(seed=0, dtype=torch.float64, shape=(N, C)):
    x = 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x.reshape(-1, shape[-1])[0] = torch.tensor([12.0, -3.0, 0.0, -1.0, 1.0])  # a dominant class
    return x.to(dtype)


def _dense(seed=1):
    y = torch.softmax(torch.randn(N, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), -1)
    y[4, 2] = 0.0  # a zero label (0 log 0 = 0)
    return y / y.sum(-1, keepdim=True)


def _labels(kind, t1, t2, x):
    """(labels, smoothing): at t1 >= 1 > t2 a label on a class outside the support (p = 0) makes the
    loss +inf, so there the labels sit on classes with p > 0 only and nothing is smoothed."""
    support = bt.tempered_softmax(x, t2) > 0
    outside = t1 >= 1.0 > t2
    if kind == "indices":
        if not outside:
            return INDICES, 0.1
        return torch.where(INDICES == -100, -100, x.argmax(-1)), 0.0
    y = _dense()
    if not outside:
        return y, 0.1
    y = torch.where(support, y, 0.0)
    return y / y.sum(-1, keepdim=True), 0.0


def derivative(fn, value: float, step: float = STEP) -> float:
    """Fourth-order central difference of a scalar function of a float."""
    return (-fn(value + 2 * step) + 8 * fn(value + step) - 8 * fn(value - step) + fn(value - 2 * step)) / (12 * step)


def _assert_close_to_differences(got, want, rtol=RTOL):
    assert abs(want) > 1e-3, "a derivative near 0 would not check the formula"
    assert math.isclose(float(got), want, rel_tol=rtol, abs_tol=rtol * 1e-2), (float(got), want)


def _upstream(loss):
    """An upstream gradient of the loss's shape, not 1 (and "none" rows weighted apart)."""
    if loss.dim() == 0:
        return torch.tensor(1.5, dtype=loss.dtype)
    return torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)


def _temperature_grads(fn, t1, t2):
    """(dt1, dt2) by autograd of ``fn(t1, t2)`` (a loss of any shape) with temperature tensors."""
    u1 = torch.tensor(t1, dtype=torch.float64, requires_grad=True)
    u2 = torch.tensor(t2, dtype=torch.float64, requires_grad=True)
    loss = fn(u1, u2)
    loss.backward(_upstream(loss))
    return u1.grad, u2.grad


def _differences(fn, t1, t2):
    """(dt1, dt2) by differences of <upstream, fn(t1, t2)> in float temperatures."""
    def scalar(u1, u2):
        with torch.no_grad():
            loss = fn(u1, u2)
            return float((loss * _upstream(loss)).sum())
    return derivative(lambda u: scalar(u, t2), t1), derivative(lambda u: scalar(t1, u), t2)


@pytest.mark.parametrize("t1, t2", GRID)
@pytest.mark.parametrize("kind", ["indices", "dense"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_temperature_grads_match_differences(t1, t2, kind, reduction):
    x = _logits()
    labels, smoothing = _labels(kind, t1, t2, x)

    def fn(u1, u2):
        return bt.bi_tempered_logistic_loss(x, labels, u1, u2, smoothing, reduction=reduction)

    if t2 < 1.0:  # the case is there: row 0 has classes with p = 0 exactly
        assert (bt.tempered_softmax(x, t2)[0] == 0).any()
    assert torch.isfinite(fn(t1, t2)).all()
    got = _temperature_grads(fn, t1, t2)
    for value, want in zip(got, _differences(fn, t1, t2)):
        _assert_close_to_differences(value, want)


@pytest.mark.parametrize("t1, t2", [(0.5, 0.7), (1.0, 1.0), (0.8, 1.5)])
def test_weighted_loss_temperature_grads_match_differences(t1, t2):
    x = _logits(2)
    weight = torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    sample_weight = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.25, 1.0], dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        def fn(u1, u2):
            return bt.bi_tempered_logistic_loss(x, INDICES, u1, u2, 0.1, reduction=reduction, weight=weight,
                                                sample_weight=sample_weight)

        for value, want in zip(_temperature_grads(fn, t1, t2), _differences(fn, t1, t2)):
            _assert_close_to_differences(value, want)


def test_ignored_rows_give_no_temperature_gradient():
    """An ignored row's logits (even non-finite) change nothing; all rows ignored: 0."""
    x = _logits()
    x[2] = math.inf  # row 2 is ignored
    got = _temperature_grads(lambda u1, u2: bt.bi_tempered_logistic_loss(x, INDICES, u1, u2, reduction="sum"),
                             0.7, 1.3)
    kept = INDICES != -100
    want = _temperature_grads(lambda u1, u2: bt.bi_tempered_logistic_loss(x[kept], INDICES[kept], u1, u2,
                                                                          reduction="sum"), 0.7, 1.3)
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-14, atol=0)
    none_kept = torch.full((N,), -100)
    zero = _temperature_grads(lambda u1, u2: bt.bi_tempered_logistic_loss(x, none_kept, u1, u2), 0.7, 1.3)
    assert torch.equal(torch.stack(zero), torch.zeros(2, dtype=torch.float64))


def test_a_label_outside_the_support_at_t1_of_one_gives_infinite_gradients():
    """t1 >= 1 > t2 with label mass on a p = 0 class: the loss is +inf, and so is dL/dt1 (SPEC)."""
    x = _logits()
    dense = _dense()  # row 0 has mass on its classes outside the support at t2 = 0.7
    dt1, dt2 = _temperature_grads(lambda u1, u2: bt.bi_tempered_logistic_loss(x, dense, u1, u2, reduction="none"),
                                  1.0, 0.7)
    assert dt1 == math.inf


def test_bad_class_indices_give_nan_temperature_gradients():
    """Unchecked bad indices (as on CUDA or compiled): a NaN row, its temperature gradients NaN too."""
    t = torch.tensor(1.0, dtype=torch.float64)
    labels = torch.tensor([0, C, 2, -100, 1, 1])
    _, _, dt = ops.loss_op(_logits(), labels, None, t * 0.8, t * 1.2, t * 0.0, 0, -100, "none", "torch", False, -1,
                           True)
    assert dt[1].isnan().all() and (dt[3] == 0).all() and dt[[0, 2, 4, 5]].isfinite().all()


def test_temperature_grads_leave_the_loss_and_logit_gradient_unchanged():
    x = _logits().requires_grad_()
    t1, t2 = torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for labels in (INDICES, _dense()):  # t1 = t2 = 1: the cross-entropy shortcut against the general path
        plain = bt.bi_tempered_logistic_loss(x, labels, t1, t2, 0.1 if labels is INDICES else 0.0)
        (plain_grad,) = torch.autograd.grad(plain, x)
        learnt = bt.bi_tempered_logistic_loss(x, labels, t1.clone().requires_grad_(), t2.clone().requires_grad_(),
                                              0.1 if labels is INDICES else 0.0)
        (learnt_grad,) = torch.autograd.grad(learnt, x)
        torch.testing.assert_close(learnt, plain, rtol=1e-14, atol=0)
        torch.testing.assert_close(learnt_grad, plain_grad, rtol=1e-13, atol=1e-16)


def test_nothing_extra_is_computed_without_a_temperature_that_requires_grad(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("temperature gradients computed though no temperature requires grad")

    monkeypatch.setattr(temperature, "loss_temperature_grads_rows", forbidden)
    monkeypatch.setattr(temperature, "softmax_temperature_grad_rows", forbidden)
    x = _logits().requires_grad_()
    t = torch.tensor(0.8, dtype=torch.float64)
    bt.bi_tempered_logistic_loss(x, INDICES, t, 1.2).backward()
    bt.tempered_softmax(x, t + 0.5).sum().backward()
    bt.tempered_sigmoid(x, t).sum().backward()
    with torch.no_grad():  # requires grad, but no gradient is wanted
        bt.bi_tempered_logistic_loss(x, INDICES, t.clone().requires_grad_(), 1.2, num_iters=3)


def test_the_kernels_get_no_temperature_output_without_a_temperature_that_requires_grad(monkeypatch):
    pytest.importorskip("triton")
    launchers = ops.triton_launchers()
    calls = []

    def recording(launch, keyword):
        def launcher(*args, **kwargs):
            calls.append(kwargs.get(keyword))
            return launch(*args, **kwargs)
        return launcher

    monkeypatch.setattr(launchers, "loss_forward", recording(launchers.loss_forward, "temperature_grads"))
    monkeypatch.setattr(launchers, "softmax_backward", recording(launchers.softmax_backward, "temperature_grad"))
    x = _logits().float().requires_grad_()
    t = torch.tensor(0.8, requires_grad=True)
    bt.bi_tempered_logistic_loss(x, INDICES, 0.8, torch.tensor(1.2), backend="triton").backward()
    bt.tempered_softmax(x, torch.tensor(1.3), backend="triton").sum().backward()
    assert calls == [None, None]
    bt.bi_tempered_logistic_loss(x, INDICES, t, 1.2, backend="triton").backward()
    bt.tempered_softmax(x, t, backend="triton").sum().backward()
    assert calls[2].shape == (N, 2) and calls[3].shape == (N,)


def test_per_row_temperatures_equal_each_row_alone():
    x = _logits(3)
    t1 = torch.tensor([0.5, 0.8, 0.8, 1.0, 0.5, 0.8], dtype=torch.float64, requires_grad=True)
    t2 = torch.tensor([0.7, 1.2, 1.2, 1.0, 2.0, 0.7], dtype=torch.float64, requires_grad=True)
    xr = x.clone().requires_grad_()
    loss = bt.bi_tempered_logistic_loss(xr, INDICES, t1, t2, 0.1, reduction="none")
    loss.backward(_upstream(loss))
    upstream = _upstream(loss)
    for r in range(N):
        row = x[r:r + 1].clone().requires_grad_()
        u1, u2 = (t[r].detach().clone().requires_grad_() for t in (t1, t2))
        alone = bt.bi_tempered_logistic_loss(row, INDICES[r:r + 1], u1, u2, 0.1, reduction="sum")
        (alone * upstream[r]).backward()
        torch.testing.assert_close(loss[r], alone, rtol=1e-14, atol=0)
        torch.testing.assert_close(xr.grad[r], row.grad[0], rtol=1e-13, atol=1e-16)
        torch.testing.assert_close(t1.grad[r], u1.grad, rtol=1e-13, atol=0)
        torch.testing.assert_close(t2.grad[r], u2.grad, rtol=1e-13, atol=0)
    assert (t1.grad[[0, 1, 3, 4, 5]].abs() > 1e-3).all() and t1.grad[2] == 0  # row 2 is ignored


def test_per_row_temperatures_match_differences_with_a_mean():
    x = _logits(4)
    base1 = torch.tensor([0.5, 0.8, 0.6, 1.0, 0.5, 0.8], dtype=torch.float64)
    base2 = torch.tensor([0.7, 1.2, 1.0, 1.0, 2.0, 0.7], dtype=torch.float64)
    t1, t2 = base1.clone().requires_grad_(), base2.clone().requires_grad_()
    bt.bi_tempered_logistic_loss(x, INDICES, t1, t2, 0.1).backward()

    def loss_with(row, column, value):
        temps = [base1.clone(), base2.clone()]
        temps[column][row] = value
        with torch.no_grad():
            return float(bt.bi_tempered_logistic_loss(x, INDICES, *temps, 0.1))

    # row 0 at t2 < 1: one class holds all the mass (dL/dt2 = 0 exactly), the others p = 0 but not
    # their smoothed labels; t = 1 exactly; t2 = 2; t2 < 1 again
    for row, column in ((0, 0), (3, 0), (3, 1), (4, 0), (4, 1), (5, 0), (5, 1)):
        want = derivative(lambda v: loss_with(row, column, v), float((base1, base2)[column][row]))
        _assert_close_to_differences((t1, t2)[column].grad[row], want)
    assert t2.grad[0] == 0


def test_per_row_temperatures_with_segmentation_logits():
    """dim=1: temperatures of shape (N, H, W), the rows' order of the moved logits."""
    x = _logits(5, shape=(2, 3, 4, C)).movedim(-1, 1)  # (N, C, H, W)
    labels = torch.randint(0, C, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    t1 = (0.6 + 0.3 * torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    t2 = torch.where(torch.arange(24).reshape(2, 3, 4) % 3 == 0, 1.0, 1.4).double()
    results = []
    for moved in (False, True):
        logits = (x.movedim(1, -1) if moved else x).clone().requires_grad_()
        u1, u2 = t1.clone().requires_grad_(), t2.clone().requires_grad_()
        loss = bt.bi_tempered_logistic_loss(logits, labels, u1, u2, 0.1, dim=-1 if moved else 1)
        loss.backward()
        grad = logits.grad.movedim(-1, 1) if moved else logits.grad
        results.append((loss, grad, u1.grad, u2.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-16)
    assert (results[0][2].abs() > 1e-4).all()


def test_binary_loss_temperature_grads_match_differences():
    x = 3.0 * torch.randn(7, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.rand(7, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y[3] = 255.0  # ignored
    for t1, t2 in ((0.5, 0.7), (1.0, 1.0), (0.8, 1.5)):
        def fn(u1, u2):
            return bt.bi_tempered_binary_logistic_loss(x, y, u1, u2, 0.1, ignore_index=255, reduction="none")

        for value, want in zip(_temperature_grads(fn, t1, t2), _differences(fn, t1, t2)):
            _assert_close_to_differences(value, want)
    # per element temperatures: each element's gradient is its own
    t1 = torch.linspace(0.5, 1.0, 7, dtype=torch.float64).requires_grad_()
    loss = bt.bi_tempered_binary_logistic_loss(x, y, t1, 1.2, ignore_index=255, reduction="sum")
    loss.backward()
    for i in (0, 6):
        u = t1[i].detach().clone().requires_grad_()
        bt.bi_tempered_binary_logistic_loss(x[i:i + 1], y[i:i + 1], u, 1.2, reduction="sum").backward()
        torch.testing.assert_close(t1.grad[i], u.grad, rtol=1e-13, atol=0)
    assert t1.grad[3] == 0


@pytest.mark.parametrize("t", [0.6, 1.0, 1.7])
def test_softmax_and_sigmoid_temperature_grads_match_differences(t):
    x = _logits(8)
    upstream = torch.randn(N, C, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for function, arg in ((bt.tempered_softmax, x), (bt.tempered_sigmoid, x[:, :3])):
        g = upstream[:, :arg.shape[1]]
        u = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        (function(arg, u) * g).sum().backward()

        def scalar(v):
            with torch.no_grad():
                return float((function(arg, v) * g).sum())

        _assert_close_to_differences(u.grad, derivative(scalar, t))
        # per row (softmax) / per element (sigmoid): each one's part of the same gradient
        per_row = torch.full(arg.shape[:1] if function is bt.tempered_softmax else arg.shape, t,
                             dtype=torch.float64, requires_grad=True)
        (function(arg, per_row) * g).sum().backward()
        torch.testing.assert_close(per_row.grad.sum(), u.grad, rtol=1e-12, atol=0)


def test_softmax_temperature_grad_with_segmentation_logits():
    x = _logits(10, shape=(2, 3, C)).movedim(-1, 1)  # (N, C, H)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    t = torch.tensor([[0.7, 1.0, 1.6], [1.2, 0.5, 1.0]], dtype=torch.float64, requires_grad=True)
    (bt.tempered_softmax(x, t, dim=1) * g).sum().backward()
    for n, h in ((0, 0), (1, 2)):
        u = t[n, h].detach().clone().requires_grad_()
        (bt.tempered_softmax(x[n, :, h], u) * g[n, :, h]).sum().backward()
        torch.testing.assert_close(t.grad[n, h], u.grad, rtol=1e-12, atol=0)


def test_gradcheck_of_the_temperatures():
    x = _logits(12)[:3].requires_grad_()
    labels = INDICES[:3]
    t1 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    t2 = torch.tensor([1.3, 0.8, 1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, u1, u2: bt.bi_tempered_logistic_loss(a, labels, u1, u2, 0.1),
                                    (x, t1, t2))
    t = torch.tensor([1.3, 0.8, 1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, u: bt.tempered_softmax(a, u), (x, t))
    assert torch.autograd.gradcheck(lambda a, u: bt.tempered_sigmoid(a, u), (x[:, :2], t[:1].reshape(())))
    # double backward with a learnable t: the logits' gradient, differentiated in t too
    assert torch.autograd.gradgradcheck(lambda a, u: bt.tempered_softmax(a, u), (x, t))


def test_inplace_backward_gives_the_same_temperature_gradients():
    results = []
    for inplace in (False, True):
        x = _logits(13).requires_grad_()
        t1 = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        t2 = torch.tensor([1.3, 0.8, 1.0, 1.0, 2.0, 1.1], dtype=torch.float64, requires_grad=True)
        loss = bt.bi_tempered_logistic_loss(x * 1.0, INDICES, t1, t2, 0.1, inplace_backward=inplace)
        loss.backward()
        results.append((loss, x.grad, t1.grad, t2.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def test_torch_func_grad_and_vmap_of_temperatures():
    from torch.func import grad, vmap

    x = _logits(14)

    def fn(u1, u2, logits):
        return bt.bi_tempered_logistic_loss(logits, INDICES, u1, u2, 0.1)

    def eager(logits, u1, u2):
        u1, u2 = u1.clone().requires_grad_(), u2.clone().requires_grad_()
        return torch.stack(torch.autograd.grad(fn(u1, u2, logits), (u1, u2)))

    t1, t2 = torch.tensor(0.7, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    got = grad(fn, argnums=(0, 1))(t1, t2, x)
    torch.testing.assert_close(torch.stack(got), eager(x, t1, t2), rtol=1e-13, atol=0)
    batch = torch.stack([x, _logits(15)])
    per_sample = vmap(grad(fn, argnums=(0, 1)), in_dims=(None, None, 0))(t1, t2, batch)
    torch.testing.assert_close(torch.stack(per_sample)[:, 1], eager(batch[1], t1, t2), rtol=1e-13, atol=0)
    # per-row temperatures under vmap fold with the rows
    rows_t2 = torch.tensor([1.3, 0.8, 1.0, 1.0, 2.0, 1.1], dtype=torch.float64)
    per_row = vmap(grad(fn, argnums=1), in_dims=(None, None, 0))(t1, rows_t2, batch)
    for b in range(2):
        u2 = rows_t2.clone().requires_grad_()
        (want,) = torch.autograd.grad(fn(t1, u2, batch[b]), [u2])
        torch.testing.assert_close(per_row[b], want, rtol=1e-13, atol=0)
    # the softmax's per-row temperature and its gradient, under vmap
    def softmax_fn(u, logits):
        return (bt.tempered_softmax(logits, u) * logits).sum()

    per_row = vmap(grad(softmax_fn), in_dims=(None, 0))(rows_t2, batch)
    for b in range(2):
        u = rows_t2.clone().requires_grad_()
        (want,) = torch.autograd.grad(softmax_fn(u, batch[b]), [u])
        torch.testing.assert_close(per_row[b], want, rtol=1e-13, atol=0)
    # vmapped per-row temperatures too (each sample its own rows' values)
    batched_t2 = torch.stack([rows_t2, rows_t2.flip(0)])
    per_sample = vmap(grad(fn, argnums=1), in_dims=(None, 0, 0))(t1, batched_t2, batch)
    for b in range(2):
        u2 = batched_t2[b].clone().requires_grad_()
        (want,) = torch.autograd.grad(fn(t1, u2, batch[b]), [u2])
        torch.testing.assert_close(per_sample[b], want, rtol=1e-13, atol=0)


def test_module_with_learnable_temperatures():
    module = bt.BiTemperedLogisticLoss(torch.nn.Parameter(torch.tensor(0.8)), torch.nn.Parameter(torch.tensor(1.2)),
                                       label_smoothing=0.1)
    assert {name for name, _ in module.named_parameters()} == {"t1", "t2"}
    assert set(module.state_dict()) >= {"t1", "t2"}
    module = module.to(torch.float64)  # (.to(device) moves them the same way)
    assert module.t1.dtype == torch.float64 and isinstance(module.t1, torch.nn.Parameter)
    x = _logits(16)
    (module(x, INDICES) * 1.5).backward()  # (1.5: the upstream gradient of ``_temperature_grads``)
    want = _temperature_grads(lambda u1, u2: bt.bi_tempered_logistic_loss(x, INDICES, u1, u2, 0.1),
                              float(module.t1.detach()), float(module.t2.detach()))  # (0.8 and 1.2 in float32)
    torch.testing.assert_close(torch.stack([module.t1.grad, module.t2.grad]), torch.stack(want), rtol=1e-13, atol=0)


def test_compiled_temperatures_never_recompile():
    x = _logits(17).requires_grad_()

    def fn(logits, u1, u2):
        return bt.bi_tempered_logistic_loss(logits, INDICES, u1, u2, 0.1, backend="torch")

    for learnable, rows in ((True, ()), (False, ()), (True, (N,))):  # (rows: 0-d, or one per row)
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            for t1, t2 in ((0.8, 1.2), (0.6, 1.5), (1.0, 1.0)):
                grads = []
                for function in (compiled, fn):
                    u1 = torch.full(rows, t1, dtype=torch.float64, requires_grad=learnable)
                    u2 = torch.full(rows, t2, dtype=torch.float64, requires_grad=learnable)
                    loss = function(x, u1, u2)
                    inputs = (x, u1, u2) if learnable else (x,)
                    grads.append((loss, *torch.autograd.grad(loss, inputs)))
                for got, want in zip(*grads):
                    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(t1=torch.full((N, 1), 0.8)), ValueError, r"t1 .*\(6,\).*\(6, 1\)"),
    (dict(t2=torch.full((C,), 1.2)), ValueError, r"t2 .*\(6,\).*\(5,\)"),
    (dict(t1=torch.tensor([0.8, 0.8, 2.5, 0.8, 0.8, 0.8])), ValueError, "t1"),
    (dict(t2=torch.tensor([1.2, 1.2, 1.2, 0.0, 1.2, 1.2])), ValueError, "t2"),
    (dict(t2=torch.tensor([1.2, 1.2, 1.2, math.nan, 1.2, 1.2])), ValueError, "t2"),
    (dict(t1=torch.tensor(0.8, requires_grad=True), num_iters=3), ValueError, "num_iters"),
    (dict(t2=torch.full((N,), 1.2, requires_grad=True), num_iters=3), ValueError, "num_iters"),
])
def test_bad_temperatures(overrides, error, match):
    kwargs = dict(logits=_logits(), labels=INDICES, t1=0.8, t2=1.2)
    kwargs.update(overrides)
    with pytest.raises(error, match=match):
        bt.bi_tempered_logistic_loss(**kwargs)


def test_bad_temperatures_of_the_softmax_and_sigmoid():
    x = _logits()
    with pytest.raises(ValueError, match=r"t .*\(6,\).*\(5,\)"):
        bt.tempered_softmax(x, torch.full((C,), 1.2))
    with pytest.raises(ValueError, match="num_iters"):
        bt.tempered_softmax(x, torch.tensor(1.2, requires_grad=True), num_iters=2)
    with pytest.raises(ValueError, match="num_iters"):
        bt.tempered_sigmoid(x, torch.tensor(1.2, requires_grad=True), num_iters=2)
    with pytest.raises(ValueError, match=r"t .*\(6, 5\).*\(6,\)"):
        bt.tempered_sigmoid(x, torch.full((N,), 1.2))


# ---- the Triton kernels (float32, interpreted on CPU) against the float64 native backend ----

def _triton_and_native(fn, t1, t2):
    """(dt1, dt2) of ``fn(logits, u1, u2, backend)`` on the kernels (float32) and natively (float64)."""
    results = []
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        u1 = t1.to(dtype).clone().requires_grad_()
        u2 = t2.to(dtype).clone().requires_grad_()
        loss = fn(dtype, u1, u2, backend)
        loss.backward(_upstream(loss))
        results.append((loss.double(), *(None if u.grad is None else u.grad.double() for u in (u1, u2))))
    return results


def _assert_float32_close(results):
    (got_loss, *got), (want_loss, *want) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        if w is None:  # a temperature that the function does not use
            assert g is None
            continue
        assert (w.abs() > 1e-3).any()
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["indices", "dense"])
def test_triton_temperature_grads_match_native(kind):
    pytest.importorskip("triton")
    x = _logits(18)
    labels, smoothing = _labels(kind, 0.7, 1.3, x)
    for t1, t2 in ((0.7, 1.3), (0.5, 0.7), (1.0, 1.0)):
        def fn(dtype, u1, u2, backend):
            return bt.bi_tempered_logistic_loss(x.to(dtype), labels.to(dtype) if kind == "dense" else labels, u1,
                                                u2, smoothing, backend=backend, reduction="none")

        _assert_float32_close(_triton_and_native(fn, torch.tensor(t1), torch.tensor(t2)))


def test_triton_temperature_grads_with_segmentation_logits():
    """dim=1 logits read in place by the kernels; per-row temperatures of shape (N, H)."""
    pytest.importorskip("triton")
    x = _logits(22, shape=(2, 3, C)).movedim(-1, 1)  # (N, C, H)
    labels = torch.tensor([[0, 4, -100], [2, 1, 3]])
    t1 = torch.tensor(0.7)
    t2 = torch.tensor([[1.3, 0.7, 1.0], [2.0, 1.3, 1.3]])

    def fn(dtype, u1, u2, backend):
        a = x.to(dtype)
        return torch.cat([bt.bi_tempered_logistic_loss(a, labels, u1, u2, 0.1, backend=backend, dim=1).reshape(1),
                          (bt.tempered_softmax(a, u2, backend=backend, dim=1) * a).sum((1, 2))])

    _assert_float32_close(_triton_and_native(fn, t1, t2))


def test_triton_softmax_sigmoid_and_binary_temperature_grads_match_native():
    pytest.importorskip("triton")
    x = _logits(19)
    y = torch.rand(N, C, generator=torch.Generator().manual_seed(20))

    def softmax_and_sigmoid(dtype, u1, u2, backend):
        a = x.to(dtype)
        return torch.stack([(bt.tempered_softmax(a, u2, backend=backend) * y.to(dtype)).sum(),
                            (bt.tempered_sigmoid(a, u1, backend=backend) * y.to(dtype)).sum()])

    _assert_float32_close(_triton_and_native(softmax_and_sigmoid, torch.tensor(0.7), torch.tensor(1.4)))

    def binary(dtype, u1, u2, backend):
        return bt.bi_tempered_binary_logistic_loss(x.to(dtype), y.to(dtype), u1, u2, 0.1, backend=backend,
                                                   reduction="none")

    _assert_float32_close(_triton_and_native(binary, torch.tensor(0.7), torch.tensor(1.4)))


def test_triton_per_row_temperatures_match_native():
    """Per-row temperatures on the kernels (they take t1/t2 of shape [R])."""
    pytest.importorskip("triton")
    x = _logits(21)
    t1 = torch.tensor([0.5, 0.8, 0.6, 1.0, 0.5, 0.8])
    t2 = torch.tensor([0.7, 1.2, 1.0, 1.0, 2.0, 0.7])

    def fn(dtype, u1, u2, backend):
        return bt.bi_tempered_logistic_loss(x.to(dtype), INDICES, u1, u2, 0.1, backend=backend, reduction="none")

    _assert_float32_close(_triton_and_native(fn, t1, t2))

    def softmax(dtype, u1, u2, backend):
        return (bt.tempered_softmax(x.to(dtype), u2, backend=backend) * x.to(dtype)).sum(-1)

    _assert_float32_close(_triton_and_native(softmax, t1, t2))

    def binary(dtype, u1, u2, backend):  # per element: the row kernels on the 2-class rows [0, x]
        a = x[:, 0].to(dtype)
        y = torch.linspace(0.1, 0.9, N, dtype=dtype)
        return torch.cat([bt.bi_tempered_binary_logistic_loss(a, y, u1, u2, 0.1, backend=backend, reduction="none"),
                          bt.tempered_sigmoid(a, u2, backend=backend) * y])

    _assert_float32_close(_triton_and_native(binary, t1, t2))
