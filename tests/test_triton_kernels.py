"""Triton kernels (bindings/torch/launchers.py) against the native torch backend and the float64 oracle.

Three-level oracle: the float64 reference (tests/reference.py, or the native backend in float64
where reference.py has no such function) is the truth; the kernel's error must be no worse than
the native backend's error at the same dtype plus a per-dtype tolerance from TOLERANCES.
On a machine without CUDA the kernels run under Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import reference as ref  # noqa: E402  (tests/ is on sys.path under pytest)
from bitempered.bindings.torch.native import math as native  # noqa: E402
from bitempered.bindings.torch.rows import stored_grad_dtype  # noqa: E402
from bitempered.bindings.torch import launchers as tt  # noqa: E402
from bitempered.kernels import launch_config  # noqa: E402

from interpreter_warnings import EXPECTED as EXPECTED_INTERPRETER_WARNINGS  # noqa: E402

# Only the interpreter's expected messages on masked tails (see that module); others stay visible.
pytestmark = EXPECTED_INTERPRETER_WARNINGS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Scaled errors (max |x - truth| / max |truth|, see scaled_error) the kernel may exceed the native
# backend's by. "out": values stored in the logits' dtype (gradient, probabilities): one ulp of
# the largest value (the interpreter truncates bf16 where torch rounds). "loss": fp32 for every dtype.
TOLERANCES = {
    torch.float32: {"loss": 2e-5, "out": 2e-5},
    torch.bfloat16: {"loss": 2e-5, "out": 2.0**-7},
    torch.float16: {"loss": 2e-5, "out": 2.0**-10},
}
# (t1, t2): t2 below, at and above 1, including t2 < 1 < t1 and t1 < 1.
TEMPERATURES = [(0.8, 0.6), (1.3, 0.7), (1.0, 1.0), (0.7, 1.5), (1.5, 2.0)]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(n, c, dtype, seed, scale=3.0):
    return (scale * torch.randn(n, c, generator=generator(seed))).to(dtype).to(DEVICE)


def random_dense_labels(n, c, seed):
    y = torch.rand(n, c, generator=generator(seed + 1))
    return (y / y.sum(-1, keepdim=True)).to(DEVICE)


def random_indices(n, c, seed, dtype=torch.int64):
    return torch.randint(0, c, (n,), generator=generator(seed + 2)).to(dtype).to(DEVICE)


def as_np(x):
    return x.detach().double().cpu().numpy()


def scaled_error(x, truth, dtype=torch.float64) -> float:
    """max |x - truth| / max |truth| over the finite truth values; infinities and NaNs must match.
    Truth values beyond ``dtype``'s range must come out as infinities of the right sign."""
    x, truth = as_np(x) if torch.is_tensor(x) else x, np.asarray(truth, dtype=np.float64)
    assert x.shape == truth.shape
    np.testing.assert_array_equal(np.isnan(x), np.isnan(truth))
    inf = np.abs(truth) > torch.finfo(dtype).max
    np.testing.assert_array_equal(x[inf], np.sign(truth[inf]) * np.inf)
    finite = ~inf & ~np.isnan(truth)
    if not finite.any():
        return 0.0
    assert np.isfinite(x[finite]).all()
    return float(np.abs(x[finite] - truth[finite]).max() / max(np.abs(truth[finite]).max(), 1e-30))


def assert_three_level(kernel, native_same_dtype, truth, dtype, quantity):
    err_kernel = scaled_error(kernel, truth, kernel.dtype)
    err_native = scaled_error(native_same_dtype, truth, kernel.dtype)
    assert err_kernel <= err_native + TOLERANCES[dtype][quantity], (quantity, err_kernel, err_native)


def native_loss(logits, labels, t1, t2, smoothing=0.0, num_iters=None, ignore_index=-100):
    """The native backend as bindings/torch/api.py runs it: compute dtype, gradient rounded to the
    logits' dtype, ignored rows zeroed."""
    cd = native.compute_dtype(logits.dtype)
    a = logits.to(cd)
    t1_, t2_ = torch.tensor(t1, dtype=cd), torch.tensor(t2, dtype=cd)
    log_p = native.tempered_log_softmax_rows(a, t2_, num_iters)
    kept = None
    if labels.is_floating_point():
        y = labels.to(cd)
    else:
        y, kept = native.dense_labels_from_indices(labels, a.shape[-1], cd, ignore_index)
    y = native.smooth_labels(y, smoothing)
    loss, grad = native.loss_and_grad_rows(log_p, y, t1_, t2_, True)
    if kept is not None:
        loss = torch.where(kept, loss, 0.0)
        grad = torch.where(kept[:, None], grad, 0.0)
    return loss, grad.to(logits.dtype)


def reference_loss(logits, labels, t1, t2, smoothing=0.0, ignore_index=-100):
    a = as_np(logits)
    if labels.is_floating_point():
        y, kept = as_np(labels), np.ones(a.shape[0], bool)
    else:
        y, kept = ref.one_hot(labels.cpu().numpy(), a.shape[-1], ignore_index)
    with np.errstate(all="ignore"):
        loss = ref.loss(a, y, t1, t2, smoothing)
        grad = ref.loss_grad(a, y, t1, t2, smoothing)
    return np.where(kept, loss, 0.0), np.where(kept[:, None], grad, 0.0)


def check_loss(logits, labels, t1, t2, smoothing=0.0, dtype=None):
    dtype = dtype or logits.dtype
    loss, grad = tt.loss_forward(logits, labels, t1, t2, smoothing, None, -100, True)
    assert loss.dtype == torch.float32 and grad.dtype == stored_grad_dtype(logits.dtype)  # fp16: stored in fp32
    loss_n, grad_n = native_loss(logits, labels, t1, t2, smoothing)
    loss_r, grad_r = reference_loss(logits, labels, t1, t2, smoothing)
    assert_three_level(loss, loss_n, loss_r, dtype, "loss")
    assert_three_level(grad, grad_n, grad_r, dtype, "out")
    return loss, grad


# ----------------------------------------------------------------------------------------------
# Loss and gradient
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [1, 2, 3, 1000, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label_kind", ["indices", "dense"])
def test_loss_and_grad_match_reference(num_classes, dtype, label_kind):
    n = 2 if num_classes > 1000 else 5
    seed = num_classes + 7 * DTYPES.index(dtype)
    logits = random_logits(n, num_classes, dtype, seed)
    labels = (random_indices(n, num_classes, seed) if label_kind == "indices"
              else random_dense_labels(n, num_classes, seed))
    for t1, t2 in TEMPERATURES:
        check_loss(logits, labels, t1, t2)


@pytest.mark.parametrize("label_kind", ["indices", "dense"])
@pytest.mark.parametrize("num_classes", [2, 10])
def test_label_smoothing(label_kind, num_classes):
    logits = random_logits(4, num_classes, torch.float32, 11)
    labels = (random_indices(4, num_classes, 11) if label_kind == "indices"
              else random_dense_labels(4, num_classes, 11))
    for t1, t2 in TEMPERATURES:
        for smoothing in (0.1, 0.4):
            check_loss(logits, labels, t1, t2, smoothing)


def test_loss_at_t1_t2_one_is_kl_divergence():
    logits = random_logits(6, 9, torch.float32, 3)
    labels = random_dense_labels(6, 9, 3)
    loss, grad = tt.loss_forward(logits, labels, 1.0, 1.0, 0.0, None, -100, True)
    log_p = torch.log_softmax(logits, -1)
    kl = (labels * (labels.log() - log_p)).sum(-1)
    torch.testing.assert_close(loss, kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch.softmax(logits, -1) * labels.sum(-1, keepdim=True) - labels,
                               rtol=1e-5, atol=1e-6)


def test_class_indices_ignore_and_out_of_range():
    c = 7
    logits = random_logits(7, c, torch.float32, 5)
    labels = torch.tensor([0, -100, 3, c, -1, 6, 2], device=DEVICE)
    for index_dtype in (torch.int64, torch.int32):
        loss, grad = tt.loss_forward(logits, labels.to(index_dtype), 1.2, 0.8, 0.0, None, -100, True)
        assert loss[1] == 0 and (grad[1] == 0).all()
        for bad in (3, 4):
            assert torch.isnan(loss[bad]) and torch.isnan(grad[bad]).all()
        good = [0, 2, 5, 6]
        loss_n, grad_n = native_loss(logits[good], labels[good], 1.2, 0.8)
        torch.testing.assert_close(loss[good], loss_n, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(grad[good], grad_n, rtol=2e-5, atol=1e-6)
    # ignore_index may be a valid class: those rows are ignored, not scored
    loss, grad = tt.loss_forward(logits, labels.clamp(0, c - 1), 1.2, 0.8, 0.0, None, 3, True)
    assert loss[2] == 0 and (grad[2] == 0).all() and (loss[[0, 1, 3, 4, 5, 6]] > 0).all()


def test_nan_row_is_isolated_and_infinite_logits_follow_the_limits():
    c = 6
    logits = random_logits(4, c, torch.float32, 9)
    logits[1, 2] = float("nan")
    logits[2, 4] = float("inf")     # that class gets p = 1
    logits[3, [0, 5]] = -float("inf")  # those classes get p = 0
    labels = torch.tensor([1, 1, 4, 2], device=DEVICE)
    for t1, t2 in TEMPERATURES:
        loss, grad = tt.loss_forward(logits, labels, t1, t2, 0.0, None, -100, True)
        assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
        keep = [0, 2, 3]
        assert torch.isfinite(grad[keep]).all()
        loss_n, grad_n = native_loss(logits[keep], labels[keep], t1, t2)
        torch.testing.assert_close(loss[keep], loss_n, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(grad[keep], grad_n, rtol=2e-5, atol=1e-6)
        assert loss[2] == 0 and (grad[2] == 0).all()
        probs = tt.softmax_forward(logits, t2, None)
        assert torch.isnan(probs[1]).all()
        assert torch.equal(probs[2], torch.nn.functional.one_hot(torch.tensor(4), c).float().to(DEVICE))
        assert (probs[3, [0, 5]] == 0).all()


def test_zero_probability_with_positive_label_gives_infinite_loss():
    # t2 < 1 has finite support: class 0 gets p = 0; t1 >= 1 then gives L = +inf, NaN-free gradient
    logits = torch.tensor([[-50.0, 0.0, 0.5], [-50.0, 0.0, 0.5]], device=DEVICE)
    labels = torch.tensor([0, 1], device=DEVICE)
    for t1 in (1.0, 1.5):
        loss, grad = tt.loss_forward(logits, labels, t1, 0.5, 0.0, None, -100, True)
        assert loss[0] == float("inf") and torch.isfinite(loss[1])
        assert torch.isfinite(grad).all()
    loss, _ = tt.loss_forward(logits, labels, 0.5, 0.5, 0.0, None, -100, True)
    assert torch.isfinite(loss).all()  # t1 < 1: bounded


@pytest.mark.parametrize("num_iters", [1, 2, 5])
@pytest.mark.parametrize("t2", [0.5, 1.0, 1.7])
def test_num_iters_reproduces_the_original_algorithm(num_iters, t2):
    logits = random_logits(5, 50, torch.float32, 21, scale=10.0)
    labels = random_indices(5, 50, 21)
    t1 = 0.9
    loss, grad = tt.loss_forward(logits, labels, t1, t2, 0.0, num_iters, -100, True)
    loss_n, grad_n = native_loss(logits, labels, t1, t2, num_iters=num_iters)
    torch.testing.assert_close(loss, loss_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_n, rtol=1e-5, atol=1e-6)
    probs = tt.softmax_forward(logits, t2, num_iters)
    probs_n = native.tempered_log_softmax_rows(logits, torch.tensor(t2), num_iters).exp()
    torch.testing.assert_close(probs, probs_n, rtol=1e-5, atol=1e-7)


def test_converged_default_differs_from_few_original_steps():
    logits = random_logits(4, 1000, torch.float32, 8, scale=10.0)
    converged = tt.softmax_forward(logits, 1.5, None)
    few = tt.softmax_forward(logits, 1.5, 2)
    assert (converged.double().sum(-1) - 1).abs().max() < 5e-6
    assert (few.double().sum(-1) - 1).abs().max() > 1e-3


def test_strided_rows_and_leading_shapes_give_identical_rows():
    c = 37
    wide = random_logits(2 * 3 * 4, c + 11, torch.float32, 13)
    logits = wide[:, 5:5 + c]  # row stride c + 11
    assert logits.stride() == (c + 11, 1)
    dense_wide = random_dense_labels(24, c + 3, 13)
    dense = dense_wide[:, :c]
    indices = random_indices(24, c, 13)
    leading = logits.contiguous().reshape(2, 3, 4, c).reshape(-1, c)
    for labels, labels_contig in ((dense, dense.contiguous()), (indices, indices)):
        loss, grad = tt.loss_forward(logits, labels, 1.2, 0.9, 0.1, None, -100, True)
        loss_c, grad_c = tt.loss_forward(leading, labels_contig, 1.2, 0.9, 0.1, None, -100, True)
        assert torch.equal(loss, loss_c) and torch.equal(grad, grad_c)
    # a class stride that is not 1 is copied by the launcher
    transposed = logits.contiguous().t().contiguous().t()
    assert transposed.stride(-1) != 1
    assert torch.equal(tt.softmax_forward(transposed, 1.3, None), tt.softmax_forward(logits, 1.3, None))
    # strided index labels (a column of a wider integer tensor)
    idx_wide = torch.stack([indices, indices.flip(0)], dim=1)
    loss_s, _ = tt.loss_forward(logits, idx_wide[:, 0], 1.2, 0.9, 0.0, None, -100, False)
    loss_c, _ = tt.loss_forward(logits, indices, 1.2, 0.9, 0.0, None, -100, False)
    assert torch.equal(loss_s, loss_c)


def test_in_place_gradient_and_no_grad():
    for num_classes, limit in ((30, None), (300, 64)):  # on-chip, then chunked
        logits = random_logits(5, num_classes, torch.bfloat16, 17)
        labels = random_dense_labels(5, num_classes, 17)
        with launch_config.override_on_chip_limit(limit or launch_config.ON_CHIP_LIMIT[2]):
            loss, grad = tt.loss_forward(logits, labels, 1.1, 1.3, 0.0, None, -100, True)
            loss_only, none = tt.loss_forward(logits, labels, 1.1, 1.3, 0.0, None, -100, False)
            buffer = logits.clone()
            loss_ip, grad_ip = tt.loss_forward(buffer, labels, 1.1, 1.3, 0.0, None, -100, True,
                                               grad_out=buffer)
        assert none is None and grad_ip is buffer
        assert torch.equal(loss, loss_only) and torch.equal(loss, loss_ip) and torch.equal(grad, grad_ip)


def test_tensor_scalars_grad_scale_and_empty_batch():
    logits = random_logits(3, 8, torch.float32, 2)
    labels = random_indices(3, 8, 2)
    as_float = tt.loss_forward(logits, labels, 1.2, 0.8, 0.1, None, -100, True)
    as_tensor = tt.loss_forward(logits, labels, torch.tensor(1.2, device=DEVICE),
                                torch.tensor(0.8, dtype=torch.float64, device=DEVICE),
                                torch.tensor(0.1, device=DEVICE), None, -100, True)
    assert torch.equal(as_float[0], as_tensor[0]) and torch.equal(as_float[1], as_tensor[1])
    # grad_scale (a mean reduction's 1/count) scales the gradient before its one rounding
    scaled = tt.loss_forward(logits, labels, 1.2, 0.8, 0.1, None, -100, True,
                             grad_scale=torch.tensor(0.25, device=DEVICE))
    assert torch.equal(scaled[0], as_float[0]) and torch.equal(scaled[1], 0.25 * as_float[1])
    x, y = logits[:, 0].contiguous(), torch.rand(3, generator=generator(2)).to(DEVICE)
    plain = tt.binary_loss_forward(x, y, 1.2, 0.8, 0.0, None, True)
    scaled = tt.binary_loss_forward(x, y, 1.2, 0.8, 0.0, None, True, grad_scale=0.5)
    assert torch.equal(scaled[0], plain[0]) and torch.equal(scaled[1], 0.5 * plain[1])
    empty = logits[:0]
    loss, grad = tt.loss_forward(empty, labels[:0], 1.2, 0.8, 0.0, None, -100, True)
    assert loss.shape == (0,) and grad.shape == (0, 8)
    assert tt.softmax_forward(empty, 1.2, None).shape == (0, 8)
    assert tt.softmax_backward(empty, empty, 1.2).shape == (0, 8)
    x = torch.zeros(0, device=DEVICE)
    assert tt.binary_loss_forward(x, x, 1.0, 1.0, 0.0, None, True)[0].shape == (0,)
    assert tt.sigmoid_forward(x, 1.0, None).shape == (0,)
    assert tt.sigmoid_backward(x, x, 1.0).shape == (0,)


# ----------------------------------------------------------------------------------------------
# On-chip / chunked threshold
# ----------------------------------------------------------------------------------------------

def test_default_threshold_paths():
    for dtype in DTYPES:
        limit = launch_config.on_chip_limit(dtype.itemsize)
        assert tt.loss_path(limit, dtype) == "on_chip"
        assert tt.loss_path(limit + 1, dtype) == "chunked"
    assert tt.loss_path(1, torch.float32) == "on_chip"


def test_wide_tiles_take_only_the_loss_variants_that_fit():
    """Above NARROW_TILE an on-chip row takes 1024 threads at 64 registers (the register file);
    class indices without temperature gradients stay there, the dense-label and
    temperature-gradient variants (which spill there, tests/test_triton_compile.py) stream the row."""
    for dtype in DTYPES:
        wide = launch_config.row_config(launch_config.on_chip_limit(dtype.itemsize), dtype.itemsize)
        assert launch_config.is_wide(wide) and wide.num_warps == launch_config.MAX_BLOCK_WARPS
        assert wide.num_warps * 32 * wide.maxnreg == 65536
        assert launch_config.fit_loss_variant(wide, False, False) == wide
        for dense, temperature_grads in ((True, False), (False, True), (True, True)):
            assert launch_config.fit_loss_variant(wide, dense, temperature_grads).chunked
        narrow = launch_config.row_config(launch_config.NARROW_TILE, dtype.itemsize)
        assert not launch_config.is_wide(narrow)
        assert launch_config.fit_loss_variant(narrow, True, True) == narrow


@pytest.mark.parametrize("num_classes, num_iters", [(63, None), (64, None), (65, None), (130, 3)])
def test_chunked_path_matches_on_chip(num_classes, num_iters):
    limit = 64
    logits = random_logits(3, num_classes, torch.float32, num_classes)
    indices = random_indices(3, num_classes, num_classes)
    dense = random_dense_labels(3, num_classes, num_classes)
    upstream = torch.randn(3, num_classes, generator=generator(1)).to(DEVICE)
    on_chip = {}
    for forced in (False, True):
        with launch_config.override_on_chip_limit(limit) if forced else contextlib.nullcontext():
            expected = "chunked" if forced and num_classes > limit else "on_chip"
            assert tt.loss_path(num_classes, torch.float32) == expected
            results = []
            for t1, t2 in TEMPERATURES[1:4]:
                for labels in (indices, dense):
                    results += tt.loss_forward(logits, labels, t1, t2, 0.1, num_iters, -100, True)
                probs = tt.softmax_forward(logits, t2, num_iters)
                results += [probs, tt.softmax_backward(probs, upstream, t2)]
        if not forced:
            on_chip = results
    for a, b in zip(on_chip, results):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, equal_nan=True)
    if num_classes > limit and num_iters is None:
        check_loss(logits, indices, 1.3, 0.7)  # and against the float64 oracle


# ----------------------------------------------------------------------------------------------
# Tempered softmax forward / backward
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [1, 3, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_forward_backward(num_classes, dtype):
    logits = random_logits(4, num_classes, dtype, 31 + num_classes)
    upstream = torch.randn(4, num_classes, generator=generator(4)).to(dtype).to(DEVICE)
    cd = native.compute_dtype(dtype)
    for t in (0.5, 1.0, 1.5):
        probs = tt.softmax_forward(logits, t, None)
        assert probs.dtype == dtype
        probs_n = native.tempered_log_softmax_rows(logits.to(cd), torch.tensor(t), None).exp().to(dtype)
        probs_r = ref.tempered_softmax(as_np(logits), t)
        assert_three_level(probs, probs_n, probs_r, dtype, "out")
        if dtype == torch.float32:
            assert (probs.double().sum(-1) - 1).abs().max() < 5e-6
        grad = tt.softmax_backward(probs, upstream, t)
        grad_n = native.tempered_softmax_vjp_rows(probs.to(cd), upstream.to(cd), torch.tensor(t)).to(dtype)
        grad_r = native.tempered_softmax_vjp_rows(probs.double(), upstream.double(),
                                                  torch.tensor(t, dtype=torch.float64))
        assert_three_level(grad, grad_n, grad_r, dtype, "out")


def test_softmax_properties():
    logits = random_logits(3, 50, torch.float32, 41)
    for t in (0.3, 1.0, 2.5):
        probs = tt.softmax_forward(logits, t, None)
        torch.testing.assert_close(tt.softmax_forward(logits + 7.5, t, None), probs, rtol=2e-5, atol=1e-7)
        assert (probs >= 0).all()
    torch.testing.assert_close(tt.softmax_forward(logits, 1.0, None), torch.softmax(logits, -1),
                               rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Binary loss and tempered sigmoid
# ----------------------------------------------------------------------------------------------

def two_class_native(x, y, t1, t2, smoothing, dtype=torch.float64):
    """Native loss and dL/dx, computed in ``dtype``, of the 2-class loss on [0, x] with labels
    [1 - y, y] (float64: the truth for the gradient)."""
    x64, y64 = x.to(dtype).cpu(), y.to(dtype).cpu()
    rows = torch.stack([torch.zeros_like(x64), x64], -1)
    labels = native.smooth_labels(torch.stack([1 - y64, y64], -1), smoothing)
    t1_, t2_ = torch.tensor(t1, dtype=dtype), torch.tensor(t2, dtype=dtype)
    log_p = native.tempered_log_softmax_rows(rows, t2_, None)
    loss, grad = native.loss_and_grad_rows(log_p, labels, t1_, t2_, True)
    return loss, grad[:, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_binary_loss_and_sigmoid(dtype):
    m = 1037  # more than one program, ragged tail
    x = (4 * torch.randn(m, generator=generator(51))).to(dtype).to(DEVICE)
    y = torch.rand(m, generator=generator(52)).to(DEVICE)
    upstream = torch.randn(m, generator=generator(53)).to(dtype).to(DEVICE)
    cd = native.compute_dtype(dtype)
    for t1, t2 in TEMPERATURES:
        smoothing = 0.1
        loss, grad = tt.binary_loss_forward(x, y, t1, t2, smoothing, None, True)
        assert grad.dtype == stored_grad_dtype(dtype)
        loss_r = ref.binary_loss(as_np(x), as_np(y), t1, t2, smoothing)
        loss_t, grad_t = two_class_native(x, y, t1, t2, smoothing)
        np.testing.assert_allclose(loss_t.numpy(), loss_r, rtol=1e-9, atol=1e-12)
        loss_n, grad_n = two_class_native(x, y, t1, t2, smoothing, cd)
        assert_three_level(loss, loss_n, loss_r, dtype, "loss")
        # (float16: the stored float32 gradient, rounded into float16 as the backward returns it)
        assert_three_level(grad.to(dtype), grad_n.to(dtype), grad_t, dtype, "out")
        probs = tt.sigmoid_forward(x, t2, None)
        rows = torch.stack([torch.zeros_like(x), x], -1).to(cd)
        probs_n = native.tempered_log_softmax_rows(rows, torch.tensor(t2), None).exp()[:, 1]
        assert_three_level(probs, probs_n.to(dtype), ref.tempered_sigmoid(as_np(x), t2), dtype, "out")
        vjp = tt.sigmoid_backward(probs, upstream, t2)
        vjp_t, vjp_n = (
            native.tempered_softmax_vjp_rows(
                torch.stack([1 - probs.to(d), probs.to(d)], -1),
                torch.stack([torch.zeros_like(upstream, dtype=d), upstream.to(d)], -1),
                torch.tensor(t2, dtype=d))[:, 1]
            for d in (torch.float64, cd))
        assert_three_level(vjp, vjp_n.to(dtype), vjp_t, dtype, "out")
    for k in (1, 4):  # original algorithm on 2 classes
        for t2 in (0.5, 1.0, 1.5):
            rows = torch.stack([torch.zeros_like(x), x], -1).float()
            probs_n = native.tempered_log_softmax_rows(rows, torch.tensor(t2), k).exp()[:, 1]
            torch.testing.assert_close(tt.sigmoid_forward(x, t2, k).float(), probs_n.to(dtype).float(),
                                       rtol=TOLERANCES[dtype]["out"], atol=1e-6)
