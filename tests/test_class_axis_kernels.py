"""The row kernels read a class axis other than the last in place (issue 21: F.cross_entropy's layout).

Launcher level (bindings/torch/launchers.py, the interpreter on CPU): logits of shape (N, C, H, W)
and friends with ``class_dim`` are compared with the same launchers on the moved-axis rows
``x.movedim(dim, -1).reshape(-1, C)`` (the unit-class-stride path every other test covers) and with
the float64 reference; the kernel is shown to receive the caller's tensor itself (no copy) and to
write the gradient in the logits' layout. ``common/row_layout.py`` is checked on its own first.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import reference as ref  # noqa: E402  (tests/ is on sys.path under pytest)
from bitempered.bindings.common.row_layout import row_layout  # noqa: E402
from bitempered.bindings.torch import launchers  # noqa: E402
from bitempered.kernels import launch_config  # noqa: E402

from interpreter_warnings import EXPECTED as EXPECTED_INTERPRETER_WARNINGS  # noqa: E402

pytestmark = EXPECTED_INTERPRETER_WARNINGS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------
# row_layout: which layouts are read in place
# ------------------------------------------------------------------------------------------------

def _layout_of(x: torch.Tensor, dim: int, *others: torch.Tensor):
    return row_layout(x.shape, dim, x.stride(), *(o.stride() for o in others))


def test_row_layout_of_common_layouts():
    nchw = torch.empty(2, 5, 3, 7)
    assert _layout_of(nchw, 1) == row_layout((2, 5, 3, 7), 1, (105, 21, 7, 1))
    layout = _layout_of(nchw, 1)
    assert (layout.n_outer, layout.n_inner, layout.strides) == (2, 21, ((105, 1, 21),))
    # channels_last: every other axis merges into one of stride C, class stride 1 (plain rows)
    layout = _layout_of(nchw.to(memory_format=torch.channels_last), 1)
    assert (layout.n_outer, layout.n_inner, layout.strides) == (1, 42, ((0, 5, 1),))
    # rows [N, C] with a row stride > C, classes last
    layout = _layout_of(torch.empty(6, 9)[:, :5], -1)
    assert (layout.n_outer, layout.n_inner, layout.strides) == (1, 6, ((0, 9, 1),))
    # classes on axis 0 of a matrix; size-1 axes never block a merge
    layout = _layout_of(torch.empty(5, 6), 0)
    assert (layout.n_outer, layout.n_inner, layout.strides) == (1, 6, ((0, 1, 6),))
    layout = _layout_of(torch.empty(2, 5, 1, 7), 1)
    assert (layout.n_outer, layout.n_inner, layout.strides) == (2, 7, ((35, 1, 7),))
    # a cropped image still merges; a subsampled one does not (three row axes)
    big = torch.empty(2, 5, 6, 7)
    assert _layout_of(big[:, :, 2:5], 1).n_inner == 21
    assert _layout_of(big[:, :, :, ::2], 1) is None
    # tensors read together merge only where every one merges: NCHW logits with channels_last labels
    labels = torch.empty(2, 5, 3, 7).to(memory_format=torch.channels_last)
    layout = _layout_of(nchw, 1, labels)
    assert (layout.n_outer, layout.n_inner) == (2, 21)
    assert layout.strides == ((105, 1, 21), (105, 5, 1))
    assert _layout_of(nchw, 1, big[:, :, :3]) is not None


# ------------------------------------------------------------------------------------------------
# The launchers on strided classes
# ------------------------------------------------------------------------------------------------

def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _nchw(shape, dtype, seed):
    return (3.0 * torch.randn(shape, generator=_generator(seed))).to(dtype).to(DEVICE)


LAYOUTS = {
    # name: (logits of the layout from an (N, C, ...) tensor, class dim)
    "nchw": (lambda x: x, 1),
    "channels_last": (lambda x: x.to(memory_format=torch.channels_last), 1),
    "cropped": (lambda x: torch.cat([x, x], 2)[:, :, 1:1 + x.shape[2]], 1),
    "subsampled": (lambda x: torch.repeat_interleave(x, 2, -1)[:, :, :, ::2], 1),  # copied first
    "ncl": (lambda x: x[:, :, 0], 1),
    "classes_first": (lambda x: x[0, :, 0], 0),
}


def _moved_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


class _KernelArgs:
    """Records the tensors each launch of a kernel receives (to prove nothing was copied)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(args)
            return self.kernel[grid](*args, **kwargs)
        return launch


@contextlib.contextmanager
def _recording(name):
    recorder = _KernelArgs(getattr(launchers, name))
    saved = getattr(launchers, name)
    setattr(launchers, name, recorder)
    try:
        yield recorder
    finally:
        setattr(launchers, name, saved)


def _ignore_some(indices: torch.Tensor) -> torch.Tensor:
    flat = indices.reshape(-1).clone()
    flat[1] = -100
    return flat.reshape(indices.shape)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loss_reads_the_class_axis_in_place(layout, chunked):
    make, dim = LAYOUTS[layout]
    base = _nchw((2, 5, 3, 4), torch.float32, seed=len(layout))
    logits = make(base)
    num_classes = logits.shape[dim]
    rows = _moved_rows(logits, dim)
    indices = _ignore_some(torch.randint(0, num_classes, rows.shape[:1], generator=_generator(3)))
    index_labels = indices.reshape(logits.movedim(dim, -1).shape[:-1]).to(DEVICE)
    dense_rows = torch.rand(rows.shape, generator=_generator(4)).to(DEVICE)
    dense_rows /= dense_rows.sum(-1, keepdim=True)
    dense = dense_rows.reshape(logits.movedim(dim, -1).shape).movedim(-1, dim)  # a strided view
    t1, t2, smoothing = 0.8, 1.2, 0.1
    scale = torch.rand(rows.shape[0], generator=_generator(5)).to(DEVICE)
    force = launch_config.override_on_chip_limit(4) if chunked else contextlib.nullcontext()
    row_losses = []
    with force:
        for labels, label_rows in ((index_labels, index_labels.reshape(-1)), (dense, dense_rows)):
            with _recording("tempered_loss_kernel") as kernel:
                loss, grad = launchers.loss_forward(logits, labels, t1, t2, smoothing, None, -100, True,
                                                    grad_scale=scale, class_dim=dim - logits.ndim)
            want_loss, want_grad = launchers.loss_forward(rows, label_rows, t1, t2, smoothing, None, -100, True,
                                                          grad_scale=scale)
            torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
            row_losses.append(loss)
            assert grad.shape == logits.shape
            torch.testing.assert_close(_moved_rows(grad, dim), want_grad, rtol=1e-6, atol=1e-7)
            (args,) = kernel.calls
            if layout != "subsampled":  # every other layout is read where it lies
                assert args[0] is logits
                assert args[1] is labels or labels.dtype == torch.int64
            # the gradient is written straight into the returned tensor, in the logits' layout
            assert any(arg is grad for arg in args) or layout == "subsampled"
            if logits.is_contiguous() or logits.is_contiguous(memory_format=torch.channels_last):
                assert grad.stride() == logits.stride()
    # the float64 truth, on the moved rows (ignored row: loss 0)
    a = rows.double().cpu().numpy()
    y = ref.smooth(ref.one_hot(indices.numpy(), num_classes)[0], smoothing)
    truth = np.where(indices.numpy() == -100, 0.0, ref.loss(a, y, t1, t2))
    np.testing.assert_allclose(row_losses[0].double().cpu().numpy(), truth, rtol=2e-5, atol=1e-6)
    truth = ref.loss(a, ref.smooth(dense_rows.double().cpu().numpy(), smoothing), t1, t2)
    np.testing.assert_allclose(row_losses[1].double().cpu().numpy(), truth, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_nchw_and_in_place_gradient(dtype):
    logits = _nchw((3, 6, 5), dtype, seed=11)
    rows = _moved_rows(logits, 1)
    labels = torch.randint(0, 6, (3, 5), generator=_generator(12)).to(DEVICE)
    loss, grad = launchers.loss_forward(logits, labels, 0.5, 0.8, 0.0, None, -100, True, class_dim=-2)
    want_loss, want_grad = launchers.loss_forward(rows, labels.reshape(-1), 0.5, 0.8, 0.0, None, -100, True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_moved_rows(grad, 1), want_grad, rtol=0, atol=0)
    if dtype == torch.bfloat16:  # in place: the gradient overwrites the logits (bfloat16 stores its own dtype)
        buffer = logits.clone()
        loss_in_place, grad_in_place = launchers.loss_forward(buffer, labels, 0.5, 0.8, 0.0, None, -100, True,
                                                              grad_out=buffer, class_dim=-2)
        assert grad_in_place is buffer
        torch.testing.assert_close(grad_in_place, grad, rtol=0, atol=0)
        torch.testing.assert_close(loss_in_place, loss, rtol=0, atol=0)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "subsampled", "classes_first"])
def test_softmax_forward_and_backward_on_strided_classes(layout, chunked):
    make, dim = LAYOUTS[layout]
    logits = make(_nchw((2, 5, 3, 4), torch.float32, seed=21))
    upstream = make(_nchw((2, 5, 3, 4), torch.float32, seed=22))
    force = launch_config.override_on_chip_limit(4) if chunked else contextlib.nullcontext()
    with force:
        probs = launchers.softmax_forward(logits, 1.3, None, class_dim=dim - logits.ndim)
        want = launchers.softmax_forward(_moved_rows(logits, dim), 1.3, None)
        torch.testing.assert_close(_moved_rows(probs, dim), want, rtol=1e-6, atol=1e-7)
        grad = launchers.softmax_backward(probs, upstream, 1.3, class_dim=dim - logits.ndim)
        want_grad = launchers.softmax_backward(want, _moved_rows(upstream, dim), 1.3)
        torch.testing.assert_close(_moved_rows(grad, dim), want_grad, rtol=1e-5, atol=1e-7)
    truth = ref.tempered_softmax(_moved_rows(logits, dim).double().cpu().numpy(), 1.3)
    np.testing.assert_allclose(want.double().cpu().numpy(), truth, rtol=1e-5, atol=1e-7)
    if layout in ("nchw", "channels_last"):
        assert probs.stride() == logits.stride() and grad.stride() == logits.stride()
