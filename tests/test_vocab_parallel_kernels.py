"""Vocab-parallel Triton kernels (kernels/vocab_parallel.py) under the interpreter on CPU.

The classes of each row are split into uneven slices (as ranks would hold them); each kernel's
per-slice partial sums, added over the slices (what the all-reduce does), must equal the native
backend's sums over the whole row at the same normalizer (float64 native: the truth), and the
gradient kernel, given the reduced sums, must give each slice of the native gradient. BLOCK_COLS
is small so every kernel streams several chunks and a masked tail.
"""

import os

import pytest
import torch

from bitempered.bindings.torch.native import math as native

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs CUDA or the Triton interpreter"),
    # the interpreter (numpy) warns on log2(0) = -inf of masked tails and p = 0 classes: expected
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
]

C = 37
SLICES = [(0, 13), (13, 30), (30, 37)]  # uneven, none a power of two
BLOCK = dict(BLOCK_ROWS=2, BLOCK_COLS=8)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels():
    from bitempered.kernels import vocab_parallel

    return vocab_parallel


def _logits(dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, C, generator=g, dtype=torch.float64) * 3.0
    a[1, 30] += 30.0          # confident row, max in the last slice
    a[2, [0, 14, 31]] = float("-inf")
    return a.to(dtype)


def _solved(logits, t2):
    """(global row max [N], y = -log p_max [N], log p [N, C]) from the float64 native solver."""
    a = logits.double()
    log_p = native.tempered_log_softmax_rows(a, t2, None)
    mx = a.amax(dim=-1)
    return mx, -log_p.amax(dim=-1), log_p


def _scalar(value):
    """Temperatures and smoothing reach the kernels as 1-element fp32 arrays."""
    return torch.full((1,), value, dtype=torch.float32, device=DEVICE)


def _grid(n):
    return ((n + BLOCK["BLOCK_ROWS"] - 1) // BLOCK["BLOCK_ROWS"],)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t2", [0.3, 0.7, 1.0, 1.6])
def test_partial_sums_add_up_to_the_row_sums(t2, dtype):
    kernels = _kernels()
    logits = _logits(dtype)
    mx, y, _ = _solved(logits, t2)
    y = y + 0.05  # a normalizer off the root (as in a solver pass), f != 1
    total = torch.zeros(5, 3, dtype=torch.float32)
    for lo, hi in SLICES:
        part = logits[:, lo:hi].contiguous().to(DEVICE)
        sums = torch.full((5, 3), float("nan"), dtype=torch.float32, device=DEVICE)
        kernels.partial_sums_kernel[_grid(5)](part, mx.float().to(DEVICE), y.float().to(DEVICE), _scalar(t2), 5,
                                              hi - lo, 0, part.stride(0), 1, sums, COUNT_SUPPORT=True, **BLOCK)
        total += sums.cpu()
    a0 = native.shift_by_max(logits.double())
    _, f, g = native._evaluate(a0, y.unsqueeze(-1), 1.0 - t2) if t2 != 1.0 else (
        None, torch.exp(a0 - y.unsqueeze(-1)).sum(-1, keepdim=True), torch.exp(a0 - y.unsqueeze(-1)).sum(-1, keepdim=True))
    support = (a0 > -1.0 / (1.0 - t2)).sum(-1) if t2 < 1.0 else torch.full((5,), C)
    torch.testing.assert_close(total[:, 0].double(), f.squeeze(-1), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(total[:, 1].double(), g.squeeze(-1), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(total[:, 2].double(), support.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slices_max_and_sum_exp_give_the_t1_pass(dtype):
    """t = 1: each slice's (max, sum-exp) from one read, rescaled to the global max
    (``SumExpRows``) and added over the slices, is the row's f(y) = sum exp(a - max - y) of the
    float64 native solver, also where a slice holds only -inf, the max is +inf (in one slice or
    two), the whole row is -inf, or a logit is NaN."""
    from bitempered.bindings.torch.vocab_parallel import SumExpRows

    kernels = _kernels()
    logits = torch.cat([_logits(torch.float64), torch.randn(5, C, dtype=torch.float64,
                                                            generator=torch.Generator().manual_seed(1))])
    logits[5, :13] = float("-inf")            # slice 0 holds none of the row
    logits[6, [3, 20]] = float("inf")         # +inf in two slices
    logits[7] = float("-inf")                 # the whole row
    logits[8, 33] = float("nan")
    logits[9, 12] = 90.0                      # the max in slice 0, the other slices far below it
    logits = logits.to(dtype)
    n = logits.shape[0]
    locals_ = []
    for lo, hi in SLICES:
        part = logits[:, lo:hi].contiguous().to(DEVICE)
        out = torch.full((n, 2), float("nan"), dtype=torch.float32, device=DEVICE)
        kernels.max_sumexp_kernel[_grid(n)](part, n, hi - lo, 0, part.stride(0), 1, out, **BLOCK)
        locals_.append(out.cpu())
    row_max = torch.stack([part[:, 0] for part in locals_]).amax(dim=0)
    row_max = torch.where(torch.stack([part[:, 0] for part in locals_]).isnan().any(dim=0), float("nan"), row_max)
    y = torch.linspace(0.0, 3.0, n).unsqueeze(-1)  # f(y) = e^-y f(0) at t = 1: any y, not only 0
    total = sum(SumExpRows(part, row_max).sums(y)[0] for part in locals_).squeeze(-1)
    a = logits.double()
    torch.testing.assert_close(row_max.double(), a.amax(dim=-1), equal_nan=True)
    want = torch.exp(native.shift_by_max(a) - y.double()).sum(-1)
    torch.testing.assert_close(total.double(), want, rtol=2e-6, atol=0.0, equal_nan=True)
    assert total[8].isnan() and torch.isfinite(total[torch.arange(n) != 8]).all()


def _rows_of(x: torch.Tensor, class_major: bool) -> torch.Tensor:
    """x [N, C] stored row-major, or class-major (strides (1, N): the classes strided, as NCHW)."""
    return x.T.contiguous().T if class_major else x.contiguous()


def _row_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(outer, inner, class) strides of rows [N, C] (one outer index)."""
    return (0, x.stride(0), x.stride(1))


def _assert_temperature_grads(total, logits, y, t1, t2, step=1e-6):
    """The reduced temperature sums of the NEED_TEMP_GRAD epilogue (columns 3-5: dL/dt1, sum A,
    sum E) give each row's dL/dt1 and dL/dt2 = sum A - sum d sum E / sum e: float64 central
    differences of the reference loss (rows whose loss is +inf, a label on p = 0 at t1 >= 1, left out)."""
    import numpy as np
    import reference as ref

    a = logits.double().numpy()
    with np.errstate(invalid="ignore"):
        want1 = (ref.loss(a, y, t1 + step, t2) - ref.loss(a, y, t1 - step, t2)) / (2 * step)
        want2 = (ref.loss(a, y, t1, t2 + step) - ref.loss(a, y, t1, t2 - step)) / (2 * step)
    got = total.double()
    dt2 = got[:, 4] - got[:, 2] * got[:, 5] / got[:, 1]
    finite = np.isfinite(want1) & np.isfinite(want2)
    assert finite.sum() >= 4
    scale = max(1.0, float(np.abs(np.concatenate([want1[finite], want2[finite]])).max()))
    np.testing.assert_allclose(got[:, 3].numpy()[finite], want1[finite], rtol=5e-5, atol=5e-6 * scale)
    np.testing.assert_allclose(dt2.numpy()[finite], want2[finite], rtol=5e-5, atol=5e-6 * scale)


@pytest.mark.parametrize("class_major", [False, True])
@pytest.mark.parametrize("labels_kind", ["indices", "dense"])
@pytest.mark.parametrize("t1, t2", [(0.8, 1.2), (0.5, 0.7), (1.0, 1.0), (1.5, 3.0), (0.2, 0.3)])
def test_epilogue_sums_and_gradient_match_native(t1, t2, labels_kind, class_major):
    kernels = _kernels()
    smoothing = 0.1
    logits = _logits(torch.float32)
    mx, y, log_p = _solved(logits, t2)
    if labels_kind == "indices":
        labels = torch.tensor([0, 30, 14, 36, 20])
        dense = torch.nn.functional.one_hot(labels, C).double()
    else:
        w = -torch.log(torch.rand(5, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        dense = labels = w / w.sum(-1, keepdim=True)
    add = smoothing / (C - 1)
    scale = 1.0 - C * add
    want_loss, want_grad = native.loss_and_grad_rows(log_p, scale * dense + add, t1, t2, True)
    escort = torch.exp(t2 * log_p)
    forget = torch.exp((t2 - t1) * log_p.clamp(min=torch.finfo(torch.float64).min))
    d = ((torch.exp(log_p) - (scale * dense + add)) * forget).masked_fill(torch.isneginf(log_p), 0.0)
    total = torch.zeros(5, 6, dtype=torch.float32)
    row_scale = torch.tensor([0.5, 0.5, 0.0, 0.5, 0.5])  # row 2 ignored: gradient 0
    parts = []
    for lo, hi in SLICES:
        part = _rows_of(logits[:, lo:hi], class_major).to(DEVICE)
        local = (labels - lo) if labels_kind == "indices" else _rows_of(labels[:, lo:hi].float(), class_major)
        local = local.to(DEVICE)
        stride_labels = (5, 1, 0) if labels_kind == "indices" else _row_strides(local)
        sums = torch.full((5, 6), float("nan"), dtype=torch.float32, device=DEVICE)
        args = (part, local, mx.float().to(DEVICE), y.float().to(DEVICE), _scalar(t1), _scalar(t2), _scalar(smoothing))
        kernels.epilogue_sums_kernel[_grid(5)](*args, C, 5, hi - lo, *_row_strides(part), *stride_labels,
                                               sums, LABELS_ARE_INDICES=labels_kind == "indices",
                                               NEED_TEMP_GRAD=True, **BLOCK)
        total += sums.cpu()
        parts.append((args, hi - lo, stride_labels))
    torch.testing.assert_close(total[:, 0].double(), want_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(total[:, 1].double(), escort.sum(-1), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(total[:, 2].double(), d.sum(-1), rtol=2e-5, atol=2e-6)
    _assert_temperature_grads(total, logits, (scale * dense + add).numpy(), t1, t2)
    reduced = total[:, :3].contiguous().to(DEVICE)
    for (lo, hi), (args, width, stride_labels) in zip(SLICES, parts):
        grad = _rows_of(torch.full((5, width), float("nan"), dtype=torch.bfloat16), class_major).to(DEVICE)
        kernels.gradient_kernel[_grid(5)](*args, reduced, row_scale.float().to(DEVICE), C, 5, width,
                                          *_row_strides(args[0]), *stride_labels, *_row_strides(grad), grad,
                                          LABELS_ARE_INDICES=labels_kind == "indices", **BLOCK)
        want = (want_grad * row_scale.unsqueeze(-1))[:, lo:hi]
        torch.testing.assert_close(grad.cpu().double(), want, rtol=1.6e-2, atol=1e-3)
