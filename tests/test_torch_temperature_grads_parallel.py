"""Learnable temperatures (issue 22) in the fused linear loss and the vocab-parallel losses (torch).

The plain loss's temperature gradients are checked against finite differences in
tests/test_torch_temperature_grads.py; here the other paths must give the same values:

- ``linear_bi_tempered_logistic_loss`` == the plain loss of ``hidden @ weight.T + bias`` (float64
  native: to rounding, for several chunk sizes, every reduction, weights, dense labels, 0-d and
  per-row temperatures; the interpreted Triton kernels at float32 tolerance);
- the vocab-parallel loss and softmax on 2 and 3 gloo ranks == the plain functions' (native and
  interpreted kernels), the same gradient on every rank, with no extra collective on the kernels.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from bitempered import torch as bt
from bitempered.bindings.torch import linear as torch_linear
from bitempered.bindings.torch.native import temperature
from distributed import run_ranks
from interpreter_warnings import EXPECTED as EXPECTED_INTERPRETER_WARNINGS

pytestmark = EXPECTED_INTERPRETER_WARNINGS

N, H, C = 9, 5, 7
INDICES = torch.tensor([0, 3, -100, 1, 6, 2, 4, 5, 3])
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TIMEOUT_S = 240


def _operands(dtype=torch.float64, seed=0):
    """(hidden [N, H], weight [C, H], bias [C]), requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=gen, dtype=torch.float64)
    w = torch.randn(C, H, generator=gen, dtype=torch.float64) * 1.5
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_() for t in (x, w, b))


def _dense(seed=1, rows=N):
    y = torch.rand(rows, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return y / y.sum(-1, keepdim=True)


def _temperatures(per_row: bool, dtype=torch.float64):
    """(t1, t2) requiring grad: 0-d, or one per row (t = 1 exactly, t2 < 1 and t2 > 1 among them)."""
    if per_row:
        t1 = torch.tensor([0.5, 0.8, 0.8, 1.0, 0.6, 0.9, 0.7, 1.0, 0.55], dtype=dtype)
        t2 = torch.tensor([0.7, 1.2, 1.2, 1.0, 2.0, 0.8, 1.5, 1.0, 1.1], dtype=dtype)
    else:
        t1, t2 = torch.tensor(0.7, dtype=dtype), torch.tensor(1.3, dtype=dtype)
    return t1.requires_grad_(), t2.requires_grad_()


def _upstream(loss):
    if loss.dim() == 0:
        return torch.tensor(1.5, dtype=loss.dtype)
    return torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)


def _linear_grads(per_row, fused, labels, reduction, chunk_size=None, backend="torch", dtype=torch.float64,
                  **kwargs):
    """(loss, dt1, dt2, dL/dhidden) of the fused loss, or of the plain loss of the materialized logits."""
    x, w, b = _operands(dtype)
    t1, t2 = _temperatures(per_row)
    if fused:
        loss = bt.linear_bi_tempered_logistic_loss(x, w, labels, t1, t2, bias=b, reduction=reduction,
                                                   chunk_size=chunk_size, backend=backend, **kwargs)
    else:
        weight = kwargs.pop("class_weight", None)
        loss = bt.bi_tempered_logistic_loss(x @ w.T + b, labels, t1, t2, reduction=reduction, backend=backend,
                                            weight=weight, **kwargs)
    loss.backward(_upstream(loss))
    return loss.detach(), t1.grad, t2.grad, x.grad


def _assert_same(got, want, rtol, atol):
    for g, v in zip(got, want):
        torch.testing.assert_close(g, v.to(g.dtype), rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("kind", ["indices", "dense", "weighted"])
def test_linear_temperature_grads_equal_the_plain_loss(reduction, per_row, kind):
    labels = _dense() if kind == "dense" else INDICES
    kwargs = dict(label_smoothing=0.1)
    if kind == "weighted":
        gen = torch.Generator().manual_seed(2)
        kwargs.update(class_weight=torch.rand(C, generator=gen, dtype=torch.float64) + 0.2,
                      sample_weight=torch.rand(N, generator=gen, dtype=torch.float64))
    want = _linear_grads(per_row, False, labels, reduction, **kwargs)
    assert (want[1].abs() > 1e-3).any() and (want[2].abs() > 1e-3).any()
    for chunk_size in (1, 4, None):  # 9 chunks, 3 chunks (the last of 1 row), one chunk
        got = _linear_grads(per_row, True, labels, reduction, chunk_size, **kwargs)
        _assert_same(got, want, rtol=1e-11, atol=1e-13)


def test_linear_temperatures_alone_and_leading_axes():
    """Only the temperatures require grad (no gradient of hidden/weight/bias is made); hidden with
    leading axes takes temperatures of its rows' shape."""
    x, w, b = (t.detach() for t in _operands())
    for per_row, reduction in itertools.product((False, True), ("mean", "none")):
        grads = []
        for fused in (True, False):
            t1, t2 = (t.reshape(3, 3) if per_row else t for t in _temperatures(per_row))
            hidden, labels = x.reshape(3, 3, H), INDICES.reshape(3, 3)
            if fused:
                loss = bt.linear_bi_tempered_logistic_loss(hidden, w, labels, t1, t2, bias=b, reduction=reduction,
                                                           chunk_size=2)
            else:
                loss = bt.bi_tempered_logistic_loss(hidden @ w.T + b, labels, t1, t2, reduction=reduction)
            assert loss.requires_grad
            grads.append(torch.autograd.grad(loss, (t1, t2), _upstream(loss)))
        _assert_same(grads[0], grads[1], rtol=1e-11, atol=1e-13)
        assert grads[0][0].shape == ((3, 3) if per_row else ())


def test_linear_float16_mean_applies_the_deferred_factor():
    """float16 hidden: the chunks' gradients (and temperature gradients) leave "mean"'s 1/N out
    until the end; the result equals the plain loss of the same float16 logits."""
    x, w, b = (t.detach().half() for t in _operands())
    logits = torch.addmm(b, x, w.T)
    for fused in (True, False):
        t1, t2 = _temperatures(False, torch.float32)
        if fused:
            loss = bt.linear_bi_tempered_logistic_loss(x, w, INDICES, t1, t2, bias=b, chunk_size=4)
        else:
            loss = bt.bi_tempered_logistic_loss(logits, INDICES, t1, t2)
        loss.backward()
        if fused:
            got = (t1.grad, t2.grad)
    torch.testing.assert_close(got, (t1.grad, t2.grad), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (CPU tensors on the kernels)")
def test_linear_triton_interpreted_matches_the_native_float64_values(monkeypatch):
    pytest.importorskip("triton")
    from bitempered.bindings.torch import launchers

    calls = []
    real = launchers.loss_forward
    monkeypatch.setattr(launchers, "loss_forward", lambda *a, **k: calls.append(k) or real(*a, **k))
    for per_row, reduction, labels in ((False, "mean", INDICES), (True, "none", INDICES),
                                       (True, "sum", _dense().float())):
        calls.clear()
        want = _linear_grads(per_row, False, labels.double() if labels.is_floating_point() else labels, reduction,
                             label_smoothing=0.1)
        got = _linear_grads(per_row, True, labels, reduction, 4, backend="triton", dtype=torch.float32,
                            label_smoothing=0.1)
        _assert_same(got, want, rtol=1e-4, atol=1e-5)
        # the forward's 3 chunks hand the kernel their temperature output; "none" recomputes the
        # gradient of hidden in the backward (3 more launches), not the temperatures'
        assert [k["temperature_grads"] is not None for k in calls] == [True] * 3 + [False] * (3 if reduction == "none"
                                                                                             else 0)


def test_linear_nothing_extra_without_a_temperature_that_requires_grad(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("temperature gradients computed though no temperature requires grad")

    monkeypatch.setattr(temperature, "loss_temperature_grads_rows", forbidden)
    for reduction in ("mean", "none"):
        x, w, b = _operands()
        t1 = torch.tensor(0.7, dtype=torch.float64)
        loss = bt.linear_bi_tempered_logistic_loss(x, w, INDICES, t1, 1.3, bias=b, reduction=reduction, chunk_size=4)
        loss.backward(_upstream(loss))
        with torch.no_grad():  # requires grad, but no gradient is wanted (num_iters allowed then)
            bt.linear_bi_tempered_logistic_loss(x, w, INDICES, t1.clone().requires_grad_(), 1.3, bias=b, num_iters=3)


def test_linear_temperature_errors():
    x, w, b = _operands()
    t1, t2 = _temperatures(False)
    with pytest.raises(ValueError, match="num_iters"):
        bt.linear_bi_tempered_logistic_loss(x, w, INDICES, t1, t2, bias=b, num_iters=3)
    with pytest.raises(ValueError, match=r"t2 must be .* the rows' shape \(9,\)"):
        bt.linear_bi_tempered_logistic_loss(x, w, INDICES, 0.7, torch.full((N - 1,), 1.2), bias=b)
    with pytest.raises(ValueError, match="t1"):
        bt.linear_bi_tempered_logistic_loss(x, w, INDICES, torch.full((N,), 2.5), 1.2, bias=b)


def test_linear_module_with_learnable_temperatures():
    module = bt.LinearBiTemperedLogisticLoss(torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64)),
                                             torch.nn.Parameter(torch.tensor(1.3, dtype=torch.float64)),
                                             label_smoothing=0.1, chunk_size=4)
    assert {name for name, _ in module.named_parameters()} == {"t1", "t2"}
    x, w, b = _operands()
    (module(x, w, INDICES, bias=b) * 1.5).backward()
    want = _linear_grads(False, False, INDICES, "mean", label_smoothing=0.1)
    torch.testing.assert_close((module.t1.grad, module.t2.grad), want[1:3], rtol=1e-11, atol=1e-13)


def test_linear_compiled_learnable_temperatures_never_recompile():
    x, w, b = (t.detach().float() for t in _operands())
    w.requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda w, t1, t2: bt.linear_bi_tempered_logistic_loss(x, w, INDICES, t1, t2, bias=b,
                                                                                   chunk_size=4),
                             fullgraph=True, backend="aot_eager")
    for step, (v1, v2) in enumerate(((0.7, 1.3), (0.9, 0.8))):
        grads = []
        for fn in (compiled, lambda *a: bt.linear_bi_tempered_logistic_loss(x, *a[:1], INDICES, *a[1:], bias=b,
                                                                             chunk_size=4)):
            t1, t2 = torch.tensor(v1, requires_grad=True), torch.full((N,), v2, requires_grad=True)
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                grads.append(torch.autograd.grad(fn(w, t1, t2), (w, t1, t2)))
        _assert_same(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("per_row", [False, True])
def test_linear_opcheck_with_temperature_grads(reduction, per_row):
    x, w, b = (t.detach().float().requires_grad_() for t in _operands())
    t1, t2 = (t.detach().float().requires_grad_() for t in _temperatures(per_row))
    smoothing = torch.tensor(0.1, dtype=torch.float64)
    for weights in (None, torch.rand(N)):
        torch.library.opcheck(torch_linear.linear_loss_op, (x, w, b, INDICES, weights, t1, t2, smoothing, 0, -100,
                                                            reduction, "torch", 4, True, True, True, True))
    # only the temperatures' output
    torch.library.opcheck(torch_linear.linear_loss_op, (x.detach(), w.detach(), None, INDICES, None, t1, t2,
                                                        smoothing, 0, -100, reduction, "torch", 4, False, False,
                                                        False, True))


# --------------------------------------------------------------------------------------------
# Vocab-parallel: gloo ranks, each holding a slice of the C classes
# --------------------------------------------------------------------------------------------

SPLITS = {2: [3, 4], 3: [2, 3, 2]}
VP_TEMPERATURES = [(0.5, 0.7), (0.8, 1.2), (1.0, 1.0), (0.8, 2.0)]


def _vp_logits(dtype=torch.float64, seed=3):
    """[N, C], a row with a dominant class (p = 0 elsewhere at t2 < 1) and a row with -inf logits."""
    x = 2.0 * torch.randn(N, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0] = torch.tensor([12.0, -3.0, 0.0, -1.0, 1.0, 0.5, -2.0])
    x[5, [1, 4]] = float("-inf")
    return x.to(dtype)


def _slice(rank, world_size):
    splits = SPLITS[world_size]
    return slice(sum(splits[:rank]), sum(splits[:rank + 1]))


def _vp_labels(kind, t1, t2, logits):
    """Labels on classes with p > 0 (a label on a p = 0 class makes the loss +inf at t1 >= 1)."""
    support = bt.tempered_softmax(logits.double(), t2) > 0
    if kind == "indices":
        return torch.where(INDICES == -100, -100, torch.where(support[torch.arange(N), INDICES.clamp(0)],
                                                              INDICES, logits.argmax(-1)))
    y = torch.where(support, _dense(4), 0.0)
    return y / y.sum(-1, keepdim=True)


def _loss_temperature_grads(fn, logits, labels, t1, t2, **kwargs):
    """(loss, dt1, dt2) by autograd of ``fn`` with float64 0-d temperature tensors."""
    u1, u2 = (torch.tensor(t, dtype=torch.float64, requires_grad=True) for t in (t1, t2))
    loss = fn(logits, labels, u1, u2, **kwargs)
    loss.backward(_upstream(loss))
    return loss.detach().double(), u1.grad, u2.grad


def _vp_matches_plain(rank, world_size, backend, dtype, grid, rtol, atol):
    from bitempered.bindings.torch.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss as vp_loss

    cols = _slice(rank, world_size)
    logits = _vp_logits(dtype)
    gen = torch.Generator().manual_seed(5)  # the same weights on every rank
    weights = dict(weight=torch.rand(C, generator=gen, dtype=torch.float64) + 0.2,
                   sample_weight=torch.rand(N, generator=gen, dtype=torch.float64))
    for (t1, t2), reduction, kind in grid:
        labels = _vp_labels("dense" if kind == "dense" else "indices", t1, t2, logits)
        smoothing = 0.1 if t1 < 1.0 else 0.0  # (smoothing puts mass on the p = 0 classes: +inf at t1 >= 1)
        kwargs = dict(label_smoothing=smoothing, reduction=reduction, **(weights if kind == "weighted" else {}))
        want = _loss_temperature_grads(bt.bi_tempered_logistic_loss, logits.double(), labels, t1, t2, **kwargs)
        local_labels = labels[:, cols].to(dtype) if kind == "dense" else labels
        got = _loss_temperature_grads(vp_loss, logits[:, cols], local_labels, t1, t2, backend=backend, **kwargs)
        where = f"rank {rank}/{world_size} {backend} {dtype} t={(t1, t2)} {reduction} {kind}"
        assert torch.isfinite(torch.stack(want[1:])).all() and (torch.stack(want[1:]).abs() > 1e-3).any(), where
        for g, v in zip(got, want):
            torch.testing.assert_close(g, v, rtol=rtol, atol=atol, msg=lambda m: f"{where}\n{m}")


def _vp_softmax_matches_plain(rank, world_size):
    from bitempered.bindings.torch.vocab_parallel import vocab_parallel_tempered_softmax

    cols = _slice(rank, world_size)
    logits = _vp_logits()
    upstream = torch.randn(N, C, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for value in (0.6, 1.0, 1.7):
        grads = []
        for fn, x, g in ((bt.tempered_softmax, logits, upstream),
                         (vocab_parallel_tempered_softmax, logits[:, cols], upstream[:, cols])):
            t = torch.tensor(value, dtype=torch.float64, requires_grad=True)
            x = x.clone().requires_grad_()
            (fn(x, t) * g).sum().backward()
            grads.append((t.grad, x.grad))
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(grads[1][1], grads[0][1][:, cols], rtol=1e-11, atol=1e-13)
        assert abs(float(grads[0][0])) > 1e-3


def _count_all_reduces(fn):
    import torch.distributed as dist

    calls = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = original
    return len(calls)


def _vp_collectives(rank, world_size, backend, dtype):
    """The kernels' temperature sums ride in the epilogue's all-reduce (the same count as without);
    the native driver reduces its temperature sums in one more per block. Without a temperature
    that requires grad nothing of them is computed."""
    from bitempered.bindings.torch import ops
    from bitempered.bindings.torch.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss as vp_loss

    local = _vp_logits(dtype)[:, _slice(rank, world_size)]
    asked = []  # whether each call computed temperature terms (native rows / the epilogue's variant)
    launchers = ops.triton_launchers() if backend == "triton" else None  # (Triton may be missing otherwise)
    native_terms = temperature.loss_temperature_grads_rows
    epilogue = launchers and launchers.vocab_parallel_epilogue
    temperature.loss_temperature_grads_rows = lambda *a, **k: asked.append(True) or native_terms(*a, **k)
    if launchers:
        launchers.vocab_parallel_epilogue = lambda *a, **k: asked.append(k["need_temperature_grads"]) or \
            epilogue(*a, **k)
    counts = []
    try:
        for learnable in (False, True):
            asked.clear()
            t1 = torch.tensor(0.8, requires_grad=learnable)
            counts.append(_count_all_reduces(lambda: vp_loss(local, INDICES, t1, 1.2, backend=backend).backward()
                                             if learnable else vp_loss(local, INDICES, t1, 1.2, backend=backend)))
            assert any(asked) == learnable, (backend, learnable, asked)
    finally:
        temperature.loss_temperature_grads_rows = native_terms
        if launchers:
            launchers.vocab_parallel_epilogue = epilogue
    assert counts[1] == counts[0] + (0 if backend == "triton" else 1), (backend, counts)


def _vp_errors_and_dtensor(rank, world_size):
    """Per-row temperatures and num_iters=k with a learnable temperature raise (on every rank, before
    any collective of the solve), as do ranks that disagree on which temperatures require grad; the
    DTensor path gives the plain loss's temperature gradients (a replicated DTensor temperature too)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from bitempered.bindings.torch.vocab_parallel import (vocab_parallel_bi_tempered_logistic_loss as vp_loss,
                                                          vocab_parallel_tempered_softmax)

    cols = _slice(rank, world_size)
    local = _vp_logits()[:, cols]
    per_row = torch.full((N,), 0.8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"t1 must be a float or a 0-d tensor: 0-d temperatures only here"):
        vp_loss(local, INDICES, per_row, 1.2)
    with pytest.raises(ValueError, match=r"t2 must be .*0-d temperatures only here"):
        vp_loss(local, INDICES, 0.8, per_row.reshape(3, 3))
    with pytest.raises(ValueError, match=r"t must be .*0-d temperatures only here"):
        vocab_parallel_tempered_softmax(local, per_row)
    learnable = torch.tensor(0.8, requires_grad=True)
    with pytest.raises(ValueError, match="num_iters"):
        vp_loss(local, INDICES, learnable, 1.2, num_iters=3)
    with pytest.raises(ValueError, match="num_iters"):
        vocab_parallel_tempered_softmax(local, learnable, num_iters=3)
    with pytest.raises(ValueError, match="disagree on whether t1 or t2 requires grad"):
        vp_loss(local, INDICES, torch.tensor(0.8, requires_grad=rank == 0), 1.2)
    with pytest.raises(ValueError, match="disagree on whether t requires grad"):
        vocab_parallel_tempered_softmax(local, torch.tensor(0.8, requires_grad=rank == 0))
    # the DTensor path (torch's chunking of the classes)
    mesh = init_device_mesh("cpu", (world_size,))
    full = _vp_logits()
    want = _loss_temperature_grads(bt.bi_tempered_logistic_loss, full, INDICES, 0.5, 0.7, label_smoothing=0.1)
    got = _loss_temperature_grads(lambda x, *a, **k: bt.bi_tempered_logistic_loss(x, *a, **k).full_tensor(),
                                  distribute_tensor(full, mesh, [Shard(1)]), INDICES, 0.5, 0.7, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
    t1 = distribute_tensor(torch.tensor(0.5, dtype=torch.float64), mesh, [Replicate()]).requires_grad_()
    loss = bt.bi_tempered_logistic_loss(distribute_tensor(full, mesh, [Shard(1)]), INDICES, t1, 0.7,
                                        label_smoothing=0.1)
    (loss.full_tensor() * 1.5).backward()
    assert isinstance(t1.grad, DTensor)
    torch.testing.assert_close(t1.grad.full_tensor(), want[1], rtol=1e-11, atol=1e-13)


FLOAT64 = dict(rtol=1e-10, atol=1e-12)
FLOAT32 = dict(rtol=2e-4, atol=2e-5)  # the kernels' float32 against the float64 native values


def _two_ranks(rank, world_size):
    grid = list(itertools.product(VP_TEMPERATURES, ("mean", "sum", "none"), ("indices", "dense")))
    grid += itertools.product(VP_TEMPERATURES[:2], ("mean", "none"), ("weighted",))
    _vp_matches_plain(rank, world_size, "torch", torch.float64, grid, **FLOAT64)
    if INTERPRETED:
        kernel_grid = [((0.5, 0.7), "mean", "indices"), ((1.0, 1.0), "none", "dense"), ((0.8, 2.0), "sum", "dense"),
                       ((0.8, 1.2), "mean", "weighted")]
        _vp_matches_plain(rank, world_size, "triton", torch.float32, kernel_grid, **FLOAT32)
    _vp_softmax_matches_plain(rank, world_size)
    _vp_errors_and_dtensor(rank, world_size)


def _three_ranks(rank, world_size):
    grid = list(itertools.product(VP_TEMPERATURES, ("mean", "none"), ("indices", "dense", "weighted")))
    _vp_matches_plain(rank, world_size, "torch", torch.float64, grid, **FLOAT64)
    _vp_collectives(rank, world_size, "torch", torch.float64)
    if INTERPRETED:
        kernel_grid = [((0.8, 1.2), "none", "indices"), ((0.5, 0.7), "mean", "dense")]
        _vp_matches_plain(rank, world_size, "triton", torch.float32, kernel_grid, **FLOAT32)
        _vp_collectives(rank, world_size, "triton", torch.float32)
    _vp_softmax_matches_plain(rank, world_size)


def test_vocab_parallel_two_ranks_match_the_plain_temperature_grads_errors_dtensor():
    run_ranks(_two_ranks, 2, TIMEOUT_S)


def test_vocab_parallel_three_ranks_match_the_plain_temperature_grads_no_extra_collective():
    run_ranks(_three_ranks, 3, TIMEOUT_S)
