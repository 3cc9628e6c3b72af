"""Per-class and per-example weights in torch (issue #23), the binary loss's ignore_index and
ignore_index=None (issue #25 item 4): against F.cross_entropy(weight=...) at t1 = t2 = 1 and the
float64 reference's weighted sums at tempered settings, on every backend (kernels under the
interpreter), plain and fused linear (the vocab-parallel loss: tests/test_vocab_parallel_torch.py)."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference as ref
from bitempered import torch as bt
from interpreter_warnings import EXPECTED

pytestmark = EXPECTED
BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
REDUCTIONS = ["mean", "sum", "none"]
N, C = 11, 7
TEMPERATURES = [(0.8, 1.2), (0.5, 0.8), (1.0, 1.5)]


def _inputs(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(N, C, generator=gen, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, C, (N,), generator=gen)
    labels[[2, 7]] = -100
    weight = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.1).to(dtype)
    sample_weight = (2.0 * torch.rand(N, generator=gen, dtype=torch.float64)).to(dtype)
    return logits, labels, weight, sample_weight


def _loss_and_grad(fn, logits, *args, reduction="mean", **kwargs):
    x = logits.clone().requires_grad_()
    loss = fn(x, *args, reduction=reduction, **kwargs)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, x, upstream)
    return loss.detach(), grad, upstream


def _weighted_reference(logits, labels, row_weights, t1, t2, smoothing, reduction, upstream):
    """The float64 reference's per-row losses and gradients, weighted and reduced as F.cross_entropy."""
    a = logits.double().numpy()
    y, kept = ref.one_hot(labels.numpy(), C)
    w = np.where(kept, row_weights.double().numpy(), 0.0)
    rows = np.where(kept, ref.loss(a, y, t1, t2, smoothing), 0.0) * w
    grads = np.where(kept[:, None], ref.loss_grad(a, y, t1, t2, smoothing), 0.0) * w[:, None]
    u = upstream.double().numpy()
    if reduction == "none":
        return rows, grads * u[:, None]
    divisor = w.sum() if reduction == "mean" else 1.0
    return rows.sum() / divisor, grads * u / divisor


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_equals_cross_entropy_with_class_weights_at_t_one(reduction, smoothing):
    logits, labels, weight, _ = _inputs()
    got, got_grad, upstream = _loss_and_grad(bt.bi_tempered_logistic_loss, logits, labels, 1.0, 1.0,
                                             label_smoothing=smoothing, reduction=reduction, weight=weight)
    x = logits.clone().requires_grad_()
    if smoothing == 0.0:
        want = F.cross_entropy(x, labels, weight=weight, reduction=reduction)
    else:
        # this library's smoothing (target 1 - s, others s/(C-1)) as dense targets, the whole row
        # weighted by its target's weight; + sum y log y: SPEC's loss is the KL divergence
        kept = labels != -100
        y = torch.from_numpy(ref.smooth(ref.one_hot(labels.numpy(), C)[0], smoothing))
        rows = (F.cross_entropy(x, y, reduction="none") + torch.special.xlogy(y, y).sum(-1)) * kept
        w = torch.where(kept, weight[labels.clamp(0)], 0.0)
        rows = rows * w
        want = rows if reduction == "none" else rows.sum() / (w.sum() if reduction == "mean" else 1.0)
    (want_grad,) = torch.autograd.grad(want, x, upstream)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("t1, t2", TEMPERATURES)
def test_weighted_tempered_loss_equals_the_reference(backend, reduction, t1, t2):
    dtype = torch.float64 if backend == "torch" else torch.float32
    logits, labels, weight, sample_weight = _inputs(seed=1, dtype=dtype)
    got, got_grad, upstream = _loss_and_grad(bt.bi_tempered_logistic_loss, logits, labels, t1, t2,
                                             label_smoothing=0.1, reduction=reduction, backend=backend,
                                             weight=weight, sample_weight=sample_weight)
    want, want_grad = _weighted_reference(logits, labels, weight[labels.clamp(0)] * sample_weight, t1, t2, 0.1,
                                          reduction, upstream)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got.double().numpy(), want, **tolerance)
    np.testing.assert_allclose(got_grad.double().numpy(), want_grad, **tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_loss_with_weights_equals_the_plain_loss(backend, reduction):
    dtype = torch.float64 if backend == "torch" else torch.float32
    _, labels, weight, sample_weight = _inputs(seed=2, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, 5, generator=gen, dtype=dtype, requires_grad=True)
    layer = torch.randn(C, 5, generator=gen, dtype=dtype, requires_grad=True)
    kwargs = dict(reduction=reduction, backend=backend, sample_weight=sample_weight)
    fused = bt.linear_bi_tempered_logistic_loss(hidden, layer, labels, 0.8, 1.2, chunk_size=4, class_weight=weight,
                                                **kwargs)
    plain = bt.bi_tempered_logistic_loss(hidden @ layer.t(), labels, 0.8, 1.2, weight=weight, **kwargs)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(fused, plain, **tolerance)
    upstream = torch.rand(fused.shape, dtype=dtype)
    for got, want in zip(torch.autograd.grad(fused, (hidden, layer), upstream),
                         torch.autograd.grad(plain, (hidden, layer), upstream)):
        torch.testing.assert_close(got, want, **tolerance)


def test_weights_under_vmap_and_the_module():
    logits, labels, weight, sample_weight = _inputs(seed=4)
    batched = torch.stack([logits, logits.flip(0)])
    batched_labels = torch.stack([labels, labels.flip(0)])
    batched_weights = torch.stack([sample_weight, 2.0 * sample_weight.flip(0)])
    per_sample = torch.func.vmap(lambda x, y, w: bt.bi_tempered_logistic_loss(x, y, 0.8, 1.2, weight=weight,
                                                                               sample_weight=w))
    got = per_sample(batched, batched_labels, batched_weights)
    for b in range(2):
        alone = bt.bi_tempered_logistic_loss(batched[b], batched_labels[b], 0.8, 1.2, weight=weight,
                                             sample_weight=batched_weights[b])
        torch.testing.assert_close(got[b], alone)
    module = bt.BiTemperedLogisticLoss(0.8, 1.2, weight=weight)
    assert "weight" in module.state_dict()
    torch.testing.assert_close(module(logits, labels, sample_weight),
                               bt.bi_tempered_logistic_loss(logits, labels, 0.8, 1.2, weight=weight,
                                                            sample_weight=sample_weight))


def test_new_weight_values_never_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    logits, labels, weight, sample_weight = _inputs(seed=5, dtype=torch.float32)

    @torch.compile(fullgraph=True, backend=counter, dynamic=False)
    def step(x, w, s):
        return bt.bi_tempered_logistic_loss(x, labels, 0.8, 1.2, weight=w, sample_weight=s)

    x = logits.clone().requires_grad_()
    step(x, weight, sample_weight).backward()
    with torch.compiler.set_stance("fail_on_recompile"):
        for scale in (0.5, 3.0):
            loss = step(x, weight * scale, sample_weight.flip(0))
            torch.testing.assert_close(loss, bt.bi_tempered_logistic_loss(
                logits, labels, 0.8, 1.2, weight=weight * scale, sample_weight=sample_weight.flip(0)))
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", ["weight", "sample_weight"])
def test_bad_weights_raise_naming_the_argument(name):
    logits, labels, weight, sample_weight = _inputs(dtype=torch.float32)
    good = weight if name == "weight" else sample_weight
    bad_values = [good[:-1], good.reshape(1, -1), -good, good.clone().fill_(float("nan")),
                  good.clone().fill_(float("inf")), good.long(), good.to("meta")]
    for bad in bad_values:
        with pytest.raises((ValueError, TypeError), match=name):
            bt.bi_tempered_logistic_loss(logits, labels, 0.8, 1.2, **{name: bad})


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weights_that_require_grad_get_the_exact_gradient(reduction):
    """Only where asked for (float64 gradcheck); the logits' gradient is the same either way."""
    logits, labels, weight, sample_weight = _inputs(seed=7)
    weight, sample_weight = weight.requires_grad_(), sample_weight.requires_grad_()
    plain = lambda w, s: bt.bi_tempered_logistic_loss(logits, labels, 0.8, 1.2, reduction=reduction,  # noqa: E731
                                                      weight=w, sample_weight=s)
    assert torch.autograd.gradcheck(plain, (weight, sample_weight))
    hidden, layer = torch.randn(N, 3, dtype=torch.float64), torch.randn(C, 3, dtype=torch.float64)
    fused = lambda w, s: bt.linear_bi_tempered_logistic_loss(hidden, layer, labels, 0.8, 1.2,  # noqa: E731
                                                             reduction=reduction, class_weight=w, sample_weight=s)
    assert torch.autograd.gradcheck(fused, (weight, sample_weight))
    y = torch.rand(N, C, dtype=torch.float64)
    y[0, :3] = 255.0
    binary = lambda s: bt.bi_tempered_binary_logistic_loss(logits, y, 0.8, 1.2, reduction=reduction,  # noqa: E731
                                                           ignore_index=255, sample_weight=s)
    assert torch.autograd.gradcheck(binary, (torch.rand(N, C, dtype=torch.float64, requires_grad=True),))
    x = logits.clone().requires_grad_()
    (asked,) = torch.autograd.grad(bt.bi_tempered_logistic_loss(x, labels, 0.8, 1.2, reduction=reduction,
                                                                weight=weight, sample_weight=sample_weight).sum(), x)
    (unasked,) = torch.autograd.grad(bt.bi_tempered_logistic_loss(x, labels, 0.8, 1.2, reduction=reduction,
                                                                  weight=weight.detach(),
                                                                  sample_weight=sample_weight.detach()).sum(), x)
    assert torch.equal(asked, unasked)


def test_class_weights_need_class_indices():
    logits, labels, weight, _ = _inputs(dtype=torch.float32)
    dense = torch.softmax(logits, dim=-1)
    with pytest.raises(ValueError, match="class-index labels only"):
        bt.bi_tempered_logistic_loss(logits, dense, 0.8, 1.2, weight=weight)
    # per-row weights apply to dense labels too
    got = bt.bi_tempered_logistic_loss(logits, dense, 0.8, 1.2, sample_weight=torch.full((N,), 2.0), reduction="sum")
    torch.testing.assert_close(got, 2.0 * bt.bi_tempered_logistic_loss(logits, dense, 0.8, 1.2, reduction="sum"))


# --------------------------------------------------------------------------------------------
# ignore_index=None and the binary loss's ignore_index
# --------------------------------------------------------------------------------------------

def test_ignore_index_none_counts_every_row():
    logits, labels, _, _ = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="outside"):  # -100 is no class index when nothing is ignored
        bt.bi_tempered_logistic_loss(logits, labels, 0.8, 1.2, ignore_index=None)
    targets = labels.clamp(0)
    torch.testing.assert_close(bt.bi_tempered_logistic_loss(logits, targets, 0.8, 1.2, ignore_index=None),
                               bt.bi_tempered_logistic_loss(logits, targets, 0.8, 1.2))
    module = bt.BiTemperedLogisticLoss(0.8, 1.2, ignore_index=None)
    torch.testing.assert_close(module(logits, targets), bt.bi_tempered_logistic_loss(logits, targets, 0.8, 1.2))
    hidden, layer = torch.randn(N, 3), torch.randn(C, 3)
    torch.testing.assert_close(bt.linear_bi_tempered_logistic_loss(hidden, layer, targets, 0.8, 1.2, ignore_index=None),
                               bt.linear_bi_tempered_logistic_loss(hidden, layer, targets, 0.8, 1.2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_none_makes_unchecked_bad_indices_nan_rows(backend):
    """Where labels are not range-checked (CUDA, compiled), no index is ignored under None: one
    outside [0, C), -2 (the ops' own ignore_index then) included, gives a NaN row."""
    from bitempered.bindings.torch import args, ops

    logits, _, _, _ = _inputs(dtype=torch.float32)
    labels, ignore_index = args.op_labels(torch.tensor([0, -2, 3, C, -7, 1, 2, 3, 4, 5, 6]), True, None, C)
    t = torch.tensor(1.0, dtype=torch.float64)
    loss, *_ = ops.loss_op(logits, labels, None, t * 0.8, t * 1.2, torch.tensor(0.0), 0, ignore_index, "none",
                           backend, False)
    assert loss[[1, 3, 4]].isnan().all() and loss[[0, 2, 5]].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_ignore_index_skips_elements(backend, reduction):
    gen = torch.Generator().manual_seed(6)
    dtype = torch.float64 if backend == "torch" else torch.float32
    x = 3.0 * torch.randn(6, 9, generator=gen, dtype=dtype)
    y = torch.rand(6, 9, generator=gen, dtype=dtype)
    ignored = torch.rand(6, 9, generator=gen) < 0.3
    y[ignored] = 255.0
    x[0, ignored[0]] = float("nan")  # an ignored element's logit is never read into the loss
    sample_weight = torch.rand(6, 9, generator=gen, dtype=dtype)
    got, got_grad, upstream = _loss_and_grad(bt.bi_tempered_binary_logistic_loss, x, y, 0.8, 1.2,
                                             reduction=reduction, ignore_index=255, backend=backend,
                                             sample_weight=sample_weight)
    keep = ~ignored
    rows = np.where(keep, ref.binary_loss(np.where(keep, x.double(), 0.0), np.where(keep, y.double(), 0.0), 0.8, 1.2),
                    0.0) * sample_weight.double().numpy()
    want = rows if reduction == "none" else rows.sum() / (
        float(sample_weight[keep].double().sum()) if reduction == "mean" else 1.0)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got.double().numpy(), want, **tolerance)
    assert (got_grad[ignored] == 0).all() and torch.isfinite(got_grad).all()
    # the kept elements' gradient: the elementwise loss of the kept elements alone
    x_kept = x[keep].clone().requires_grad_()
    alone = bt.bi_tempered_binary_logistic_loss(x_kept, y[keep], 0.8, 1.2, reduction="none", backend=backend)
    divisor = sample_weight[keep].sum() if reduction == "mean" else 1.0
    u = upstream[keep] if reduction == "none" else upstream
    (want_grad,) = torch.autograd.grad(alone, x_kept, u * sample_weight[keep] / divisor)
    torch.testing.assert_close(got_grad[keep], want_grad, **tolerance)


def test_binary_ignore_index_checks():
    x, y = torch.randn(5), torch.rand(5)
    y[1] = -100.0  # outside [0, 1] but ignored: accepted
    bt.bi_tempered_binary_logistic_loss(x, y, 0.8, 1.2, ignore_index=-100)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bt.bi_tempered_binary_logistic_loss(x, y, 0.8, 1.2)
    with pytest.raises(TypeError, match="ignore_index"):
        bt.bi_tempered_binary_logistic_loss(x, y, 0.8, 1.2, ignore_index=0.5)
    all_ignored = bt.bi_tempered_binary_logistic_loss(x, torch.full((5,), 255.0), 0.8, 1.2, ignore_index=255)
    assert torch.isnan(all_ignored)  # "mean" of nothing, as the multi-class loss
