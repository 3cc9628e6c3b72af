"""The native backend's t1 = t2 = 1 shortcut (bindings/torch/native/loss.py: ``_cross_entropy``)
against the float64 reference, for class indices and dense labels, with the rows the shortcut must
hand to the general path (NaN, +inf logits, label mass on a -inf logit, a target below the normal
range) next to rows it must get exactly by itself (underflowing non-target classes and labels).
"""

import numpy as np
import pytest
import torch

import reference as ref
from cross_entropy_rows import C, TARGETS
from cross_entropy_rows import logits as _logits
from bitempered import torch as bt
from bitempered.bindings.torch.native import cpu_kernel as cpu_kernels
from bitempered.bindings.torch.native import loss as native_loss

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _dense_labels(a: np.ndarray) -> np.ndarray:
    """Soft labels, some exactly 0; mass where the logits put p = 0 or underflow in rows 7-9."""
    y = np.random.default_rng(1).random(a.shape) ** 4
    y[:, 0] = 0.0                      # exact zeros: y log y = 0
    y[0, 4] = 1e-39                    # a label below float32's normal range
    y[10, 6] = 0.0                     # no mass on the -inf logit: a finite loss
    y /= y.sum(-1, keepdims=True)
    y[3] *= 0.7                        # rows need not sum to 1
    return y


def _check(loss, grad, want_loss, want_grad, dtype):
    loss = loss.detach().double().numpy()
    grad = grad.double().numpy()
    tol = TOL[dtype]
    assert np.array_equal(np.isnan(loss), np.isnan(want_loss)), (loss, want_loss)
    finite = np.isfinite(want_loss)
    assert np.array_equal(np.isposinf(loss), np.isposinf(want_loss)), (loss, want_loss)
    np.testing.assert_allclose(loss[finite], want_loss[finite], rtol=tol, atol=tol)
    rows = ~np.isnan(want_grad).any(-1)
    assert np.isnan(grad[~rows]).all()
    np.testing.assert_allclose(grad[rows], want_grad[rows], rtol=tol, atol=tol)


def _redone_rows(monkeypatch):
    """Counts the rows the shortcut hands to SPEC's general path."""
    redone = []
    general = native_loss._general_block

    def counting(a, *args):
        redone.append(a.shape[0])
        return general(a, *args)

    monkeypatch.setattr(native_loss, "_general_block", counting)
    return redone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("block_elements", [4 * C, 1 << 18])  # several blocks / one
def test_class_indices(dtype, smoothing, block_elements, monkeypatch):
    monkeypatch.setattr(native_loss, "CROSS_ENTROPY_BLOCK_ELEMENTS", block_elements)
    redone = _redone_rows(monkeypatch)
    a64 = _logits()
    a = torch.tensor(a64, dtype=dtype, requires_grad=True)
    loss = bt.bi_tempered_logistic_loss(a, torch.tensor(TARGETS), 1.0, 1.0, label_smoothing=smoothing,
                                        reduction="none")
    loss.sum().backward()
    dense, _ = ref.one_hot(TARGETS, C)
    _check(loss, a.grad, ref.loss(a64, dense, 1.0, 1.0, smoothing), ref.loss_grad(a64, dense, 1.0, 1.0, smoothing),
           dtype)
    # The general path gets the NaN and +inf rows (softmax is NaN there), the -inf target, and in
    # float32 the targets 120 and 101 below the max (p_target 0 or subnormal); with smoothing also the -inf
    # logit off the target (label mass on p = 0: a true +inf). The class 200 below the max is exact
    # without it (no log of that p is taken).
    expected = {4, 5, 6, 7} | ({8, 11} if dtype == torch.float32 else set()) | ({10} if smoothing > 0.0 else set())
    assert sum(redone) == len(expected)
    assert np.isfinite(loss[[8, 9, 11]].detach().numpy()).all()


def _use_path(path, monkeypatch):
    """float32 dense labels on CPU take the C kernel (tests/test_cpu_kernels.py) where it is built;
    "eager" switches it off, to test the torch-op blocks it falls back to."""
    if path == "c-kernel" and cpu_kernels.dense_cross_entropy() is None:
        pytest.skip(cpu_kernels.status())
    if path == "eager":
        monkeypatch.setenv("BITEMPERED_CPU_KERNELS", "0")


# float32: the C kernel, and the eager blocks (several, or one); float64: always the eager blocks
DENSE_PATHS = [(torch.float32, "c-kernel", None), (torch.float32, "eager", 4 * C), (torch.float32, "eager", 1 << 18),
               (torch.float64, "eager", 4 * C), (torch.float64, "eager", 1 << 18)]


@pytest.mark.parametrize("dtype,path,block_elements", DENSE_PATHS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dense_labels(dtype, path, smoothing, block_elements, monkeypatch):
    _use_path(path, monkeypatch)
    if block_elements is not None:
        monkeypatch.setattr(native_loss, "DENSE_CROSS_ENTROPY_BLOCK_ELEMENTS", block_elements)
    redone = _redone_rows(monkeypatch)
    a64 = _logits()
    y64 = _dense_labels(a64)
    a = torch.tensor(a64, dtype=dtype, requires_grad=True)
    loss = bt.bi_tempered_logistic_loss(a, torch.tensor(y64, dtype=dtype), 1.0, 1.0, label_smoothing=smoothing,
                                        reduction="none")
    loss.sum().backward()
    y_in = torch.tensor(y64, dtype=dtype).double().numpy()  # the labels as the loss saw them
    _check(loss, a.grad, ref.loss(a64, y_in, 1.0, 1.0, smoothing), ref.loss_grad(a64, y_in, 1.0, 1.0, smoothing),
           dtype)
    # rows with NaN/+inf logits or label mass on a -inf logit (rows 4-7, and row 10 once smoothing
    # puts mass there); label mass on underflowing classes (rows 8, 9) and a label of 0 at a -inf
    # logit (row 10 unsmoothed) are exact by themselves
    assert sum(redone) == (5 if smoothing > 0.0 else 4)


def test_reductions_ignore_index_and_bfloat16():
    a64 = _logits()[[0, 1, 2, 3, 8, 9, 11]]
    targets = torch.tensor([1, -100, 0, 5, 1, -100, 1])
    a = torch.tensor(a64, dtype=torch.bfloat16, requires_grad=True)
    loss = bt.bi_tempered_logistic_loss(a, targets, 1.0, 1.0)  # mean over the 4 kept rows
    loss.backward()
    rounded = a.detach().double().numpy()
    kept = targets.numpy() != -100
    dense, _ = ref.one_hot(targets.numpy(), C)
    want = ref.loss(rounded, dense, 1.0, 1.0)[kept].mean()
    want_grad = ref.loss_grad(rounded, dense, 1.0, 1.0) * kept[:, None] / kept.sum()
    assert loss.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    np.testing.assert_allclose(loss.item(), want, rtol=2e-5)
    np.testing.assert_allclose(a.grad.double().numpy(), want_grad, rtol=1e-2, atol=1e-3)
    assert (a.grad[~torch.from_numpy(kept)] == 0).all()


@pytest.mark.parametrize("block_elements", [3 * C, 1 << 18])
def test_dense_labels_bfloat16_and_without_gradient(block_elements, monkeypatch):
    """bfloat16 logits: log p goes to block scratch, not the gradient; without a gradient too."""
    monkeypatch.setattr(native_loss, "DENSE_CROSS_ENTROPY_BLOCK_ELEMENTS", block_elements)
    rows = [0, 1, 2, 3, 8, 9, 11]
    a = torch.tensor(_logits()[rows], dtype=torch.bfloat16, requires_grad=True)
    y = torch.tensor(_dense_labels(_logits())[rows], dtype=torch.bfloat16)
    rounded, y_in = a.detach().double().numpy(), y.double().numpy()
    want = ref.loss(rounded, y_in, 1.0, 1.0)
    loss = bt.bi_tempered_logistic_loss(a, y, 1.0, 1.0, reduction="none")
    loss.sum().backward()
    assert loss.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    np.testing.assert_allclose(loss.detach().numpy(), want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(a.grad.double().numpy(), ref.loss_grad(rounded, y_in, 1.0, 1.0), rtol=1e-2, atol=1e-3)
    with torch.no_grad():
        no_grad = bt.bi_tempered_logistic_loss(a, y, 1.0, 1.0, reduction="none")
    assert torch.equal(no_grad, loss.detach())


@pytest.mark.parametrize("need_grad", [True, False])
def test_dense_rows_found_by_one_element(need_grad, monkeypatch):
    """The dense shortcut's NaN-skipping sum would hide a NaN row: the driver finds those rows from
    column 0 (of the gradient, or of log p and sum y) and redoes them; a -inf logit in column 0 with
    a label of 0 there is exact by itself. Labels outside [0, 1] (NaN, inf) are what CUDA tensors
    pass unchecked: their rows come back non-finite, not as a finite number."""
    monkeypatch.setattr(native_loss, "checks_dense_labels", lambda *args: False)  # as on CUDA
    redone = _redone_rows(monkeypatch)
    a64 = _logits()[[0, 1, 4, 3]]   # row 2: a NaN logit
    a64[3, 0] = -np.inf
    y64 = _dense_labels(_logits())[[0, 1, 2, 3]]  # column 0 is 0 in every row
    y64[1, 5] = np.nan
    y64[2, 5] = np.inf if need_grad else y64[2, 5]
    y64[0, 4] = np.inf if not need_grad else y64[0, 4]
    loss, _, grad = native_loss.loss_and_grad(torch.tensor(a64), torch.tensor(y64), 1.0, 1.0, 0.0, 0, -100,
                                              need_grad, torch.tensor(1.0))
    bad = [1, 2] if need_grad else [0, 1, 2]
    assert not torch.isfinite(loss[bad]).any()
    np.testing.assert_allclose(loss[3].item(), ref.loss(a64[3:], y64[3:], 1.0, 1.0)[0], rtol=1e-10)
    assert sum(redone) == len(bad)
    if need_grad:
        np.testing.assert_allclose(grad[3].numpy(), ref.loss_grad(a64[3:], y64[3:], 1.0, 1.0)[0], rtol=1e-10,
                                   atol=1e-12)


BAD_LABELS = [(2, 3, -0.25), (5, 1, 1.5), (4, 2, float("nan")), (5, 0, 1.0 + 1e-12), (3, 4, -1e-300)]


@pytest.mark.parametrize("row,col,value", BAD_LABELS)
@pytest.mark.parametrize("label_dtype,smoothing,need_grad,path", [
    (torch.float64, 0.0, True, "eager"), (torch.float32, 0.0, False, "eager"), (torch.float64, 0.1, True, "eager"),
    (torch.float32, 0.0, False, "c-kernel"), (torch.float32, 0.1, True, "c-kernel")])
def test_dense_labels_checked_by_the_shortcut(row, col, value, label_dtype, smoothing, need_grad, path, monkeypatch):
    """On CPU at t1 = t2 = 1 the shortcut checks dense labels itself (the API skips its own pass):
    a value outside [0, 1] in any block, in the labels' own dtype (a float64 1 + 1e-12 rounds to 1
    in float32), raises the API's error, with and without smoothing and gradient."""
    _use_path(path, monkeypatch)
    monkeypatch.setattr(native_loss, "DENSE_CROSS_ENTROPY_BLOCK_ELEMENTS", 2 * C)  # rows 4-5: the last block
    y = torch.full((6, C), 1.0 / C, dtype=label_dtype)
    y[0, 0] = -0.0  # in [0, 1]
    if label_dtype == torch.float32 and value in (1.0 + 1e-12, -1e-300):
        value = 1.0 + 1e-6 if value > 0 else -1e-40
    y[row, col] = value
    a = torch.randn(6, C, requires_grad=need_grad)
    with pytest.raises(ValueError, match="labels") as at_one:
        bt.bi_tempered_logistic_loss(a, y, 1.0, 1.0, label_smoothing=smoothing)
    with pytest.raises(ValueError, match="labels") as beside:  # the API's own check
        bt.bi_tempered_logistic_loss(a, y, 1.0, 0.9, label_smoothing=smoothing)
    assert str(at_one.value) == str(beside.value)
    y[row, col] = 1.0 / C
    assert torch.isfinite(bt.bi_tempered_logistic_loss(a, y, 1.0, 1.0, label_smoothing=smoothing))


def test_same_values_as_the_general_path_near_one():
    """Continuity in (t1, t2): the shortcut at 1 and the general path just beside it agree."""
    a = torch.tensor(_logits()[[0, 1, 2, 3, 8, 9]], dtype=torch.float64)
    targets = torch.tensor([1, 2, 0, 5, 1, 1])
    y = torch.tensor(_dense_labels(_logits())[[0, 1, 2, 3, 8, 9]])
    for labels in (targets, y):
        at_one = bt.bi_tempered_logistic_loss(a, labels, 1.0, 1.0, reduction="none")
        beside = bt.bi_tempered_logistic_loss(a, labels, 1.0, 1.0 + 1e-12, reduction="none")
        np.testing.assert_allclose(at_one.numpy(), beside.numpy(), rtol=1e-6)


@pytest.mark.parametrize("t", [0.7, 1.3])
def test_exact_zeros_next_to_a_nan_row_in_one_block(t):
    """The general path's "is some p exactly 0" check is per row: a NaN row in the same block must
    not hide the -inf logits of another (d = -y there at t1 = t2 unless zeroed)."""
    a64 = _logits()[[0, 4, 7, 10]]  # ordinary, NaN, -inf target, -inf elsewhere
    targets = np.array([1, 3, 1, 1])
    a = torch.tensor(a64, requires_grad=True)
    loss = bt.bi_tempered_logistic_loss(a, torch.tensor(targets), t, t, reduction="none")
    loss.sum().backward()
    dense, _ = ref.one_hot(targets, C)
    _check(loss, a.grad, ref.loss(a64, dense, t, t), ref.loss_grad(a64, dense, t, t), torch.float64)
