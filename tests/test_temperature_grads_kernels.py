"""The loss kernel's temperature gradients (issue 22): each row's dL/dt1 and dL/dt2 from the
NEED_TEMP_GRAD variant of ``kernels/loss.py`` (through ``launchers.loss_forward``) against float64
central finite differences of the converged loss (tests/reference.py, log1p/expm1 forms, accurate
at t = 1 too), on the on-chip and chunked paths, with class indices (ignored rows, smoothing) and
dense labels, at temperatures below, at and above 1, including t2 < 1 rows with classes outside
the finite support. The kernel computes in float32: the tolerance is float32's, relative to the
row's largest derivative.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import reference as ref  # noqa: E402  (tests/ is on sys.path under pytest)
from bitempered.bindings.torch import launchers  # noqa: E402
from bitempered.kernels import launch_config  # noqa: E402

from interpreter_warnings import EXPECTED as EXPECTED_INTERPRETER_WARNINGS  # noqa: E402

pytestmark = EXPECTED_INTERPRETER_WARNINGS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TEMPERATURES = [(0.8, 1.2), (0.5, 0.8), (1.0, 1.0), (1.0, 0.6), (0.3, 2.5), (1.4, 1.1), (0.7, 0.7)]
STEP = 1e-6


def finite_differences(a, y, t1, t2):
    """(dL/dt1, dL/dt2) per row, float64 central differences of the reference loss."""
    def loss(u1, u2):
        return ref.loss(a, y, u1, u2)
    with np.errstate(invalid="ignore"):  # inf - inf: a row whose loss is +inf (NaN, left out)
        return ((loss(t1 + STEP, t2) - loss(t1 - STEP, t2)) / (2 * STEP),
                (loss(t1, t2 + STEP) - loss(t1, t2 - STEP)) / (2 * STEP))


def _logits(seed, rows=6, classes=7, scale=3.0):
    x = scale * torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0, 0] = 12.0  # a dominant class: at t2 < 1 the smallest classes fall outside the support
    return x


def _assert_rows_close(got, want, rows=None):
    """float32 against float64: relative 3e-5, and 2e-6 absolute (a row's derivative can be a small
    difference of O(1) sums, computed in float32)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    rows = np.ones(len(want), bool) if rows is None else rows
    np.testing.assert_allclose(got[rows], want[rows], rtol=3e-5, atol=2e-6)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("t1, t2", TEMPERATURES)
def test_loss_kernel_temperature_grads_match_finite_differences(t1, t2, chunked):
    logits = _logits(seed=int(10 * t1 + 100 * t2))
    num_classes = logits.shape[1]
    indices = torch.tensor([0, 3, -100, 6, 1, 2])
    # t1 >= 1 > t2: a label on a class outside the support makes the loss +inf, so no smoothing and
    # dense labels only where p > 0 there
    smoothing = 0.0 if t1 >= 1.0 > t2 else 0.1
    weights = torch.rand(logits.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dense = torch.from_numpy(ref.tempered_softmax(logits.numpy(), t2)) * weights
    dense /= dense.sum(-1, keepdim=True)
    def force():
        return launch_config.override_on_chip_limit(4) if chunked else contextlib.nullcontext()

    a = logits.numpy()
    for labels, y, ignored in (
            (indices, ref.smooth(ref.one_hot(indices.numpy(), num_classes)[0], smoothing), indices.numpy() == -100),
            (dense.float(), ref.smooth(dense.numpy(), smoothing), np.zeros(6, bool))):
        for need_grad in (True, False):
            dt = torch.full((6, 2), float("nan"))
            with force():
                loss, _ = launchers.loss_forward(logits.float().to(DEVICE), labels.to(DEVICE), t1, t2, smoothing, None,
                                                 -100, need_grad, temperature_grads=dt)
            want1, want2 = finite_differences(a, y, t1, t2)
            assert (dt[ignored] == 0).all()
            kept = ~ignored & np.isfinite(want1)
            assert kept.sum() >= 3  # most rows have a finite loss
            _assert_rows_close(dt[:, 0].numpy(), want1, kept)
            _assert_rows_close(dt[:, 1].numpy(), want2, kept)
            # the loss itself is unchanged by the variant
            with force():
                plain, _ = launchers.loss_forward(logits.float().to(DEVICE), labels.to(DEVICE), t1, t2, smoothing,
                                                  None, -100, need_grad)
            torch.testing.assert_close(loss, plain, rtol=0, atol=0)


def test_temperature_grads_at_a_confidently_wrong_row_are_finite():
    """A target 60 below the maximum: p_target underflows float32's normal range (log p stays
    finite), and the temperature gradients stay finite and match the float64 differences."""
    logits = torch.zeros(2, 5, dtype=torch.float64)
    logits[:, 0] = 60.0
    labels = torch.tensor([1, 0])
    y = ref.one_hot(labels.numpy(), 5)[0]
    for t1, t2 in ((1.0, 1.0), (0.8, 1.0), (1.0, 1.1)):
        dt = torch.empty(2, 2)
        launchers.loss_forward(logits.float().to(DEVICE), labels.to(DEVICE), t1, t2, 0.0, None, -100, True,
                               temperature_grads=dt)
        want1, want2 = finite_differences(logits.numpy(), y, t1, t2)
        assert torch.isfinite(dt).all()
        _assert_rows_close(dt[:, 0].numpy(), want1)
        _assert_rows_close(dt[:, 1].numpy(), want2)
