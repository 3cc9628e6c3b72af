"""The class axis ``dim=`` of the PyTorch API (issue 21): F.cross_entropy's (N, C, d1, ..., dk) logits.

Every loss, probability and gradient must equal the moved-axis computation (``x.movedim(dim, -1)``
with the default dim=-1, itself checked against the float64 reference in test_torch_native.py and
test_triton_kernels.py) on the native and the Triton backend: every reduction, class indices with
ignored rows, dense labels, label smoothing, per-class and per-row weights. Then the layouts (the
gradient keeps the logits' strides, NCHW and channels_last; a cropped view), inplace_backward, vmap,
torch.compile(fullgraph=True), opcheck of the ops with a class axis, the vocab-parallel loss and a
DTensor sharded on axis 1, and bad ``dim`` values. C = 5 (not a power of two) and small shapes: the
Triton interpreter is slow.
"""

import os

import pytest
import torch
from torch.func import grad, vmap
from torch.library import opcheck

from bitempered import torch as bt
from bitempered.bindings.torch import ops
from distributed import run_ranks
from interpreter_warnings import EXPECTED as EXPECTED_INTERPRETER_WARNINGS

pytestmark = EXPECTED_INTERPRETER_WARNINGS  # Triton's interpreter on masked tails (see that module)

C = 5
BACKENDS = [("torch", torch.float64), ("triton", torch.float32)]  # the kernels compute in float32
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # (conftest: CPU tensors run the kernels interpreted)
TOLERANCES = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=3e-6, atol=3e-7),
              torch.float16: dict(rtol=2e-3, atol=2e-6)}
# (logits shape, dim): NCHW (positive and negative dim), (N, C, L), and classes first on 2-D logits
CASES = [((2, C, 3, 7), 1), ((2, C, 3, 7), -3), ((3, C, 4), 1), ((C, 6), 0)]


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _device(backend):
    """The kernels' tensors: CUDA where there is a GPU, else CPU (interpreted)."""
    return "cuda" if backend == "triton" and not INTERPRETED else "cpu"


def _logits(shape, dtype, seed=0, device="cpu"):
    return (2.0 * torch.randn(shape, generator=_generator(seed), dtype=torch.float64)).to(device=device, dtype=dtype)


def _rows_shape(shape, dim):
    return tuple(s for i, s in enumerate(shape) if i != dim % len(shape))


def _indices(shape, dim, seed=1, device="cpu"):
    """Class indices of the rows' shape, with every third row ignored (-100)."""
    labels = torch.randint(0, shape[dim], _rows_shape(shape, dim), generator=_generator(seed))
    labels.view(-1)[::3] = -100
    return labels.to(device)


def _dense(shape, dim, dtype, seed=2, device="cpu"):
    labels = torch.softmax(torch.randn(shape, generator=_generator(seed), dtype=torch.float64), dim=dim)
    return labels.to(device=device, dtype=dtype)


def _loss_and_grad(x, labels, upstream=None, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = bt.bi_tempered_logistic_loss(x, labels, 0.8, 1.2, **kwargs)
    loss.backward(upstream if loss.dim() else None)
    return loss.detach(), x.grad


def _moved_loss_and_grad(x, labels, dim, upstream=None, **kwargs):
    """The oracle: the classes moved last, the default dim (the gradient comes back through movedim)."""
    x = x.detach().clone().requires_grad_()
    moved_labels = labels.movedim(dim, -1) if labels.is_floating_point() else labels
    loss = bt.bi_tempered_logistic_loss(x.movedim(dim, -1), moved_labels, 0.8, 1.2, **kwargs)
    loss.backward(upstream if loss.dim() else None)
    return loss.detach(), x.grad


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("shape,dim", CASES)
@pytest.mark.parametrize("labels_kind", ["indices", "dense", "weighted"])
def test_loss_and_gradient_equal_the_moved_axis_computation(backend, dtype, shape, dim, labels_kind):
    device = _device(backend)
    x = _logits(shape, dtype, device=device)
    rows_shape = _rows_shape(shape, dim)
    kwargs = dict(backend=backend)
    if labels_kind == "dense":
        labels = _dense(shape, dim, dtype, device=device)
    else:
        labels = _indices(shape, dim, device=device)
    if labels_kind == "weighted":  # smoothing, per-class and per-row weights
        gen = _generator(3)
        kwargs.update(label_smoothing=0.1, weight=(torch.rand(C, generator=gen, dtype=dtype) + 0.1).to(device),
                      sample_weight=(torch.rand(rows_shape, generator=gen, dtype=dtype) + 0.1).to(device))
    upstream = (torch.rand(rows_shape, generator=_generator(4), dtype=torch.float64) + 0.5).to(device)
    for reduction in ("none", "sum", "mean"):
        up = upstream.to(torch.float64 if dtype == torch.float64 else torch.float32) if reduction == "none" else None
        got, got_grad = _loss_and_grad(x, labels, up, reduction=reduction, dim=dim, **kwargs)
        want, want_grad = _moved_loss_and_grad(x, labels, dim, up, reduction=reduction, **kwargs)
        assert got.shape == (rows_shape if reduction == "none" else ())
        assert torch.isfinite(got).all() and (got != 0).any()
        torch.testing.assert_close(got, want, **TOLERANCES[dtype])
        torch.testing.assert_close(got_grad, want_grad, **TOLERANCES[dtype])


def test_weights_that_require_grad_get_the_moved_axis_gradient():
    shape, dim = (2, C, 3, 4), 1
    x, labels = _logits(shape, torch.float64), _indices(shape, dim)
    grads = []
    for fn in (lambda w, s: bt.bi_tempered_logistic_loss(x, labels, 0.8, 1.2, weight=w, sample_weight=s, dim=dim),
               lambda w, s: bt.bi_tempered_logistic_loss(x.movedim(dim, -1), labels, 0.8, 1.2, weight=w,
                                                         sample_weight=s)):
        w = torch.linspace(0.5, 1.5, C, dtype=torch.float64).requires_grad_()
        s = torch.linspace(0.2, 2.0, 24, dtype=torch.float64).reshape(2, 3, 4).requires_grad_()
        grads.append(torch.autograd.grad(fn(w, s), (w, s)))
    for got, want in zip(*grads):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("shape,dim", CASES)
def test_tempered_softmax_values_and_gradients(backend, dtype, shape, dim):
    device = _device(backend)
    x = _logits(shape, dtype, device=device)
    weights = torch.randn(shape, generator=_generator(5), dtype=dtype).to(device)
    got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = bt.tempered_softmax(got_x, 1.3, backend=backend, dim=dim)
    want = bt.tempered_softmax(want_x.movedim(dim, -1), 1.3, backend=backend).movedim(-1, dim)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    torch.testing.assert_close(got.sum(dim=dim), torch.ones(_rows_shape(shape, dim), dtype=dtype, device=device),
                               **TOLERANCES[torch.float32])
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert got_x.grad.abs().sum() > 0
    torch.testing.assert_close(got_x.grad, want_x.grad, **TOLERANCES[dtype])


def test_tempered_softmax_double_backward():
    x = _logits((2, C, 3), torch.float64)
    weights = torch.randn(2, C, 3, generator=_generator(6), dtype=torch.float64)
    second = []
    for fn in (lambda a: bt.tempered_softmax(a, 0.7, dim=1),
               lambda a: bt.tempered_softmax(a.movedim(1, -1), 0.7).movedim(-1, 1)):
        a = x.clone().requires_grad_()
        (first,) = torch.autograd.grad((fn(a) * weights).sum(), a, create_graph=True)
        second.append(torch.autograd.grad((first * weights).sum(), a)[0])
    assert second[1].abs().sum() > 0
    torch.testing.assert_close(second[0], second[1], **TOLERANCES[torch.float64])


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_outputs_keep_the_logits_strides(backend, dtype, layout):
    """The ops allocate per-class outputs like the logits (no layout change, as the fake says), and
    the public gradient keeps them."""
    shape, class_dim = (2, C, 3, 7), -3
    device = _device(backend)
    x = _logits(shape, dtype, device=device).contiguous(memory_format=LAYOUTS[layout])
    labels = _indices(shape, 1, device=device)
    t = torch.tensor(1.2, dtype=torch.float64)
    _, stored, _ = ops.loss_op(x, labels.reshape(-1), None, t * 0.7, t, t * 0, 0, -100, "mean", backend, True, class_dim)
    probs = ops.softmax_op(x, t, 0, backend, class_dim)
    back = ops.softmax_backward_op(probs, torch.randn_like(x), t, backend, class_dim)
    for out in (stored, probs, back):
        assert out.shape == x.shape and out.stride() == x.stride()
    got, got_grad = _loss_and_grad(x, labels, backend=backend, dim=1)
    want, want_grad = _moved_loss_and_grad(x, labels, 1, backend=backend)
    assert got_grad.stride() == x.stride()
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    torch.testing.assert_close(got_grad, want_grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_a_cropped_view_of_the_logits(backend, dtype):
    device = _device(backend)
    x = _logits((2, C, 6, 8), dtype, device=device)[:, :, ::2, 1:]  # (2, 5, 3, 7), not dense
    for labels in (_indices(x.shape, 1, device=device), _dense((2, C, 3, 9), 1, dtype, device=device)[..., 2:]):
        got, got_grad = _loss_and_grad(x, labels, backend=backend, dim=1, reduction="sum")
        want, want_grad = _moved_loss_and_grad(x, labels, 1, backend=backend, reduction="sum")
        torch.testing.assert_close(got, want, **TOLERANCES[dtype])
        torch.testing.assert_close(got_grad, want_grad, **TOLERANCES[dtype])
    probs = bt.tempered_softmax(x, 0.8, backend=backend, dim=1)
    torch.testing.assert_close(probs, bt.tempered_softmax(x.movedim(1, -1), 0.8, backend=backend).movedim(-1, 1),
                               **TOLERANCES[dtype])


@pytest.mark.parametrize("backend,dtype", BACKENDS + [("torch", torch.float16), ("triton", torch.float16)])
@pytest.mark.parametrize("shape,dim", [((2, C, 3, 7), 1), ((C, 6), 0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_writes_the_gradient_into_the_logits(backend, dtype, shape, dim, reduction, monkeypatch):
    """float16: the deferred factor is applied per row in the backward (``rows.scale_half_stored_grad``,
    here one slice of the first axis per block: with dim=0 that axis holds the classes)."""
    from bitempered.bindings.torch import rows

    monkeypatch.setattr(rows, "HALF_SCALE_BLOCK_ELEMENTS", 8)
    device = _device(backend)
    x = _logits(shape, dtype, device=device)
    labels = _indices(shape, dim, device=device)
    rows_shape = _rows_shape(shape, dim)
    upstream = (torch.rand(rows_shape, generator=_generator(7)) + 0.5).to(device) if reduction == "none" else None
    want, want_grad = _loss_and_grad(x, labels, upstream, reduction=reduction, backend=backend, dim=dim)
    layer_out = x.clone().requires_grad_() * 1.0  # a non-leaf, like a layer's output
    storage = layer_out.data_ptr()
    loss = bt.bi_tempered_logistic_loss(layer_out, labels, 0.8, 1.2, reduction=reduction, backend=backend, dim=dim,
                                        inplace_backward=True)
    (got_grad,) = torch.autograd.grad(loss, layer_out, upstream)
    torch.testing.assert_close(loss, want, **TOLERANCES[dtype])
    torch.testing.assert_close(got_grad, want_grad, **TOLERANCES[dtype])
    assert got_grad.data_ptr() == storage and got_grad.stride() == x.stride()


def _vmapped_functions(dim, backend):
    weights = torch.randn(2, C, 3, 4, generator=_generator(8), dtype=torch.float64).to(_device(backend))
    return {
        "mean": lambda x, y: bt.bi_tempered_logistic_loss(x, y, 0.7, 1.3, label_smoothing=0.1, dim=dim,
                                                          backend=backend),
        "none": lambda x, y: (bt.bi_tempered_logistic_loss(x, y, 0.7, 1.3, reduction="none", dim=dim,
                                                           backend=backend) * weights[:, 0].to(x.dtype)).sum(),
        "softmax": lambda x, y: (bt.tempered_softmax(x, 1.4, dim=dim, backend=backend) * weights.to(x.dtype)).sum(),
    }


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("dim", [1, -3])
def test_vmap_over_a_leading_batch(backend, dtype, dim):
    """The per-sample class axis (1 or -3 of (N, C, H, W)) stays the class axis of the batch (B, N,
    C, H, W): the ops see it as -3 either way."""
    device = _device(backend)
    xs = _logits((3, 2, C, 3, 4), dtype, device=device)
    ys = torch.stack([_indices((2, C, 3, 4), 1, seed, device) for seed in range(3)])
    for name, fn in _vmapped_functions(dim, backend).items():
        if backend == "triton" and name != "mean":
            continue  # (the interpreter is slow: the rules are the same)
        values = torch.stack([fn(xs[b], ys[b]) for b in range(3)])
        grads = torch.stack([torch.func.grad(fn)(xs[b], ys[b]) for b in range(3)])
        torch.testing.assert_close(vmap(fn)(xs, ys), values, **TOLERANCES[dtype])
        torch.testing.assert_close(vmap(grad(fn))(xs, ys), grads, **TOLERANCES[dtype])
        # the batch on another axis of the logits (moved first by the rule)
        torch.testing.assert_close(vmap(grad(fn), in_dims=(2, 0))(xs.movedim(0, 2), ys), grads, **TOLERANCES[dtype])
        assert grads.abs().sum() > 0


def test_vmap_of_classes_first():
    """Per-sample logits (C, N) with dim=0: the batch must not be merged into the class axis."""
    xs = _logits((3, C, 6), torch.float64)
    ys = torch.stack([_indices((C, 6), 0, seed) for seed in range(3)])
    dense = _dense((3, C, 6), 1, torch.float64)
    for fn, labels in ((lambda x, y: bt.bi_tempered_logistic_loss(x, y, 0.6, 1.4, dim=0), ys),
                       (lambda x, y: bt.bi_tempered_logistic_loss(x, y, 0.6, 1.4, dim=0, reduction="sum"), dense),
                       (lambda x, y: bt.tempered_softmax(x, 0.6, dim=0)[1:].sum(), ys)):
        values = torch.stack([fn(xs[b], labels[b]) for b in range(3)])
        grads = torch.stack([torch.func.grad(fn)(xs[b], labels[b]) for b in range(3)])
        torch.testing.assert_close(vmap(fn)(xs, labels), values, **TOLERANCES[torch.float64])
        torch.testing.assert_close(vmap(grad(fn))(xs, labels), grads, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_of_a_segmentation_step(backend):
    torch.manual_seed(0)
    device = _device(backend)
    conv = torch.nn.Conv2d(3, C, kernel_size=1).to(device)
    image = torch.randn(2, 3, 4, 6, device=device)
    target = torch.randint(0, C, (2, 4, 6), device=device)
    target[0, 0] = 255  # (fullgraph=True: a graph break raises)

    def step(image, target, t2):
        logits = conv(image)
        loss = bt.bi_tempered_logistic_loss(logits, target, 0.8, t2, ignore_index=255, label_smoothing=0.05,
                                            dim=1, backend=backend)
        return loss + bt.tempered_softmax(logits, t2, dim=1, backend=backend)[:, 0].mean()

    def value_and_grad(fn):
        conv.zero_grad()
        out = fn(image, target, torch.tensor(1.2))
        out.backward()
        return out.detach(), conv.weight.grad.clone()

    eager = value_and_grad(step)
    compiled = value_and_grad(torch.compile(step, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], **TOLERANCES[torch.float32])
    torch.testing.assert_close(compiled[1], eager[1], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_of_the_ops_with_a_class_axis(backend, dtype, layout):
    shape = (2, C, 3, 4)
    device = _device(backend)
    x = _logits(shape, dtype, device=device).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    t = torch.tensor(1.2, dtype=torch.float64)
    indices = _indices(shape, 1, device=device).reshape(-1)
    weights = torch.rand(indices.shape, generator=_generator(9), dtype=dtype).to(device)
    for labels, row_weights, reduction in ((indices, None, "none"), (indices, weights, "mean"),
                                           (_dense(shape, 1, dtype, device=device), None, "sum")):
        opcheck(ops.loss_op, (x, labels, row_weights, t * 0.7, t, t * 0.1, 0, -100, reduction, backend, True, -3))
    opcheck(ops.softmax_op, (x, t, 0, backend, -3))
    probs = bt.tempered_softmax(x.detach(), 1.2, dim=1).requires_grad_()
    opcheck(ops.softmax_backward_op, (probs, torch.randn_like(x).requires_grad_(), t, backend, -3))


def test_the_module_takes_dim():
    module = bt.BiTemperedLogisticLoss(0.8, 1.2, label_smoothing=0.1, dim=1)
    assert "dim=1" in repr(module)
    x, labels = _logits((2, C, 3), torch.float64), _indices((2, C, 3), 1)
    torch.testing.assert_close(module(x, labels), bt.bi_tempered_logistic_loss(x, labels, 0.8, 1.2,
                                                                               label_smoothing=0.1, dim=1))
    assert "dim=-1" in repr(bt.BiTemperedLogisticLoss(0.8, 1.2))
    for bad, error in ((1.5, TypeError), (True, TypeError), ("1", TypeError)):
        with pytest.raises(error, match="dim"):
            bt.BiTemperedLogisticLoss(0.8, 1.2, dim=bad)
    with pytest.raises(ValueError, match="dim"):
        bt.BiTemperedLogisticLoss(0.8, 1.2, dim=3)(x, labels)


def test_an_empty_batch_has_the_rows_shape():
    x = torch.randn(0, C, 3, requires_grad=True)
    loss = bt.bi_tempered_logistic_loss(x, torch.zeros(0, 3, dtype=torch.long), 0.8, 1.2, reduction="none", dim=1)
    assert loss.shape == (0, 3)
    assert bt.tempered_softmax(x, 1.2, dim=1).shape == x.shape


X4 = torch.randn(2, C, 3, 7)
Y4 = torch.randint(0, C, (2, 3, 7))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dim=1.0), TypeError, "dim must be an int"),
    (dict(dim=True), TypeError, "dim must be an int"),
    (dict(dim=None), TypeError, "dim must be an int"),
    (dict(dim=4), ValueError, r"dim must be in \[-4, 4\)"),
    (dict(dim=-5), ValueError, r"dim must be in \[-4, 4\)"),
    (dict(dim=1, labels=torch.randint(0, C, (2, C, 3))), ValueError, r"without the class axis dim=1"),
    (dict(dim=-3, labels=Y4.movedim(1, 2)), ValueError, r"without the class axis dim=1, \(2, 3, 7\)"),
    (dict(dim=1, labels=torch.rand(2, 3, 7, C)), ValueError, "dense .* must have the logits' shape"),
    (dict(dim=1, sample_weight=torch.rand(2, 3)), ValueError, r"sample_weight .*without the class axis \(2, 3, 7\)"),
    (dict(dim=1, weight=torch.rand(7)), ValueError, r"the 5 class weights"),
    (dict(dim=1, labels=torch.full((2, 3, 7), C)), ValueError, r"outside \[0, 5\)"),
    (dict(dim=1, logits=torch.randn(2, 1, 3, 7), labels=torch.zeros(2, 3, 7, dtype=torch.long),
          label_smoothing=0.1), ValueError, "label_smoothing > 0 needs at least 2 classes, got 1"),
    (dict(dim=1, logits=torch.randn(2, 0, 3, 7), labels=torch.zeros(2, 3, 7, dtype=torch.long)),
     ValueError, "class axis dim=1"),
    (dict(dim=0, logits=torch.tensor(1.0), labels=torch.tensor(1.0)), ValueError, "at least one axis"),
])
def test_bad_input_names_the_class_axis(kwargs, error, match):
    args = dict(logits=X4, labels=Y4, t1=0.8, t2=1.2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        bt.bi_tempered_logistic_loss(**args)


def test_tempered_softmax_checks_dim():
    for bad, error in ((1.0, TypeError), (False, TypeError), (4, ValueError), (-5, ValueError)):
        with pytest.raises(error, match="dim"):
            bt.tempered_softmax(X4, 1.2, dim=bad)
    with pytest.raises(ValueError, match="class axis dim=1"):
        bt.tempered_softmax(torch.randn(2, 0, 3), 1.2, dim=1)


def _sharded_class_axis(rank, world_size):
    """Classes on axis 1 of (N, C, H, W) logits, split 3 + 4 over two ranks: the vocab-parallel loss
    and softmax with dim=1 equal the plain ones; a DTensor sharded on axis 1 (Shard(1)) with dim=1."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from bitempered.bindings.torch.vocab_parallel import (vocab_parallel_bi_tempered_logistic_loss,
                                                          vocab_parallel_tempered_softmax)

    classes = 7
    cols = slice(0, 3) if rank == 0 else slice(3, classes)
    full = _logits((2, classes, 3, 2), torch.float64)
    indices = _indices(full.shape, 1)
    dense = _dense(full.shape, 1, torch.float64)
    upstream = torch.rand(2, 3, 2, generator=_generator(10), dtype=torch.float64) + 0.5
    for labels, local_labels in ((indices, indices), (dense, dense[:, cols])):
        for reduction, up in (("mean", None), ("none", upstream)):
            kwargs = dict(t1=0.8, t2=1.2, label_smoothing=0.1, reduction=reduction, dim=1)
            x = full.clone().requires_grad_()
            want = bt.bi_tempered_logistic_loss(x, labels, **kwargs)
            want.backward(up)
            local = full[:, cols].clone().requires_grad_()
            got = vocab_parallel_bi_tempered_logistic_loss(local, local_labels, **kwargs)
            got.backward(up)
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(local.grad, x.grad[:, cols], rtol=1e-10, atol=1e-12)
    if INTERPRETED:  # the vocab-parallel kernels (interpreted: gloo ranks hold CPU tensors) take the moved slice too
        got = vocab_parallel_bi_tempered_logistic_loss(full[:, cols].float(), indices, 0.8, 1.2, reduction="none",
                                                       backend="triton", dim=-3)
        want = bt.bi_tempered_logistic_loss(full.float(), indices, 0.8, 1.2, reduction="none", dim=1)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    x = full.clone().requires_grad_()
    probs = vocab_parallel_tempered_softmax(x[:, cols], 1.3, dim=1)
    want_probs = bt.tempered_softmax(full, 1.3, dim=1)
    torch.testing.assert_close(probs, want_probs[:, cols], rtol=1e-10, atol=1e-12)
    # a DTensor sharded on axis 1 (torch's chunking: 4 + 3) through the plain functions
    mesh = init_device_mesh("cpu", (world_size,))
    sharded = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_()
    got = bt.bi_tempered_logistic_loss(sharded, indices, 0.8, 1.2, dim=1)
    got.backward()
    want, want_grad = _loss_and_grad(full, indices, dim=1)
    torch.testing.assert_close(got.full_tensor(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sharded.grad.full_tensor(), want_grad, rtol=1e-10, atol=1e-12)
    probs = bt.tempered_softmax(distribute_tensor(full, mesh, [Shard(1)]), 1.3, dim=1)
    torch.testing.assert_close(probs.full_tensor(), want_probs, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="sharded on the class"):  # classes on the last axis, shards on 1
        bt.bi_tempered_logistic_loss(sharded, torch.zeros(2, 7, 3, dtype=torch.long), 0.8, 1.2)
    with pytest.raises(ValueError, match="class axis dim=1"):  # the same error on every rank
        vocab_parallel_bi_tempered_logistic_loss(full[:, cols], indices[:, :2], 0.8, 1.2, dim=1)


def test_vocab_parallel_and_dtensor_on_the_class_axis():
    run_ranks(_sharded_class_axis, 2, 240)
