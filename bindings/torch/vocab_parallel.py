"""PyTorch vocab-parallel loss: the classes sharded across the ranks of a torch.distributed group.

Each rank holds ``local_logits`` [..., C_local], its contiguous slice of the classes, in the rank
order of the group (slices may differ in size; C is their sum). The result equals
:func:`bitempered.torch.bi_tempered_logistic_loss` on the concatenated logits, on every rank;
the gradient of each slice is local (the backward needs no collective).

It is the one native solver of ``torch_native`` with its row statistics all-reduced over the
group (``GroupRows``). Collectives per call, each O(N) values, never N x C:

    1  argument check: (N, C_local, dtype, temperatures, ...) of every rank, one row each (P x 10)
    1  row max
    k  one per solver pass, (f, g) packed; the support size rides along with the first pass
    1  the loss and the gradient's two row sums, packed

so passes + 3 (``num_iters=k``: k + 4 at most, from the original algorithm's k + 1 sums and the
support count). The check makes a rank whose arguments differ (rows, dtype, temperatures, ...)
raise ValueError on every rank instead of hanging in a later collective. A group of size 1 runs
the same per-slice math with no collective (equal to the plain loss; on CPU slower than it, because
the native per-slice math holds N x C_local temporaries where the plain loss works in row blocks).

Gloo (CPU) and NCCL (CUDA) take the same code path. The per-slice math runs on the native backend
(CPU, float64, ``backend="torch"``) or on the vocab-parallel Triton kernels (CUDA by default, or
interpreted CPU tensors with ``backend="triton"``): ``kernels/vocab_parallel.py`` is the fused loss
kernel split at each row reduction, one launch per solver pass (``KernelRows``), then one for the
loss sums and one for the gradient. Both evaluate the same solver (``torch_native.solve_normalizers``
/ ``original_normalizers``), so the collectives above are the same. The kernels run every row in
every pass (a finished row is evaluated again at its frozen y); the native path drops finished rows.
``vocab_parallel_tempered_softmax`` runs native ops on every backend.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from bitempered.bindings.torch.native import math as native
from bitempered.bindings.common import validation as check
from bitempered.bindings.torch.ops import _grad_scale, _reduce

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "sum", "mean")


class GroupRows(native.LocalRows):
    """Row reductions over a process group: all-reduce MAX, and SUM of the packed partial sums."""

    def __init__(self, group):
        self.group = group

    def max(self, x):
        # a NaN flag rides along: a backend's MAX need not propagate a NaN, SPEC's NaN row must
        packed = torch.cat([x, x.isnan().to(x.dtype)], dim=-1)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=self.group)
        return torch.where(packed[:, 1:] > 0, float("nan"), packed[:, :1])

    def sum(self, *parts):
        packed = torch.cat(parts, dim=-1)  # one collective per step: (f, g[, D]) or (loss, sum e, sum d)
        dist.all_reduce(packed, group=self.group)
        return tuple(packed[:, i:i + 1] for i in range(len(parts)))


def _slices(group, num_rows: int, num_local: int, dtype, settings: tuple, device) -> tuple[int, int]:
    """(first global class of this rank, global class count), after checking that every rank of
    the group passed the same rows, dtype and settings (one P x 10 all-reduce)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    table = torch.zeros(size, 3 + len(settings), dtype=torch.float64, device=device)
    table[rank] = torch.tensor([num_rows, num_local, DTYPES.index(dtype), *settings], dtype=torch.float64)
    dist.all_reduce(table, group=group)
    table = table.cpu()
    shared = torch.cat([table[:, :1], table[:, 2:]], dim=1)
    if not bool((shared == shared[0]).all()):
        raise ValueError(
            "vocab-parallel ranks disagree on the rows, dtype or settings (each rank's row: rows, C_local, "
            f"dtype, then the temperatures and settings of the call): {table.tolist()}")
    local_sizes = table[:, 1].long().tolist()
    return sum(local_sizes[:rank]), sum(local_sizes)


def _local_indices(labels, offset: int, num_classes: int, ignore_index: int):
    """(each row's target index in this slice, or -1 where it is not here / the row is ignored or
    bad; the kept rows; the bad rows: unchecked (CUDA) indices outside [0, C))."""
    kept, bad = native.kept_and_bad(labels, ignore_index, num_classes)
    return torch.where(kept & ~bad, labels.long() - offset, -1), kept, bad


def _local_labels(labels, offset: int, num_local: int, num_classes: int, ignore_index: int, dtype):
    """This rank's slice of the one-hot rows of global class indices; the kept and bad-row masks."""
    local, kept, bad = _local_indices(labels, offset, num_classes, ignore_index)
    here = (local >= 0) & (local < num_local)
    y = torch.zeros(labels.shape[0], num_local, dtype=dtype, device=labels.device)
    y.scatter_(-1, torch.where(here, local, 0).unsqueeze(-1), here.to(dtype).unsqueeze(-1))
    return y, kept, bad


def loss_and_grad(rows, labels, t1: float, t2: float, label_smoothing: float, num_iters, ignore_index: int,
                  reduction: str, need_grad: bool, reducer, offset: int, num_classes: int):
    """(reduced loss, scaled dL/dlogits of this slice or None) of rows [N, C_local] (native math)."""
    dtype = native.compute_dtype(rows.dtype)
    log_p = native.tempered_log_softmax_rows(rows.to(dtype), t2, num_iters, reducer)
    if labels.dtype.is_floating_point:
        kept = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        bad, y = None, labels.to(dtype)
    else:
        y, kept, bad = _local_labels(labels, offset, rows.shape[-1], num_classes, ignore_index, dtype)
    y = native.smooth_labels(y, label_smoothing, num_classes)  # the GLOBAL C
    loss_rows, grad = native.loss_and_grad_rows(log_p, y, t1, t2, need_grad, reducer)
    if bad is not None:  # unchecked (CUDA) indices outside [0, C): NaN rows, never an out-of-range read
        loss_rows = torch.where(bad, float("nan"), loss_rows)
    loss_rows = torch.where(kept, loss_rows, 0.0)
    loss = _reduce(loss_rows, kept, reduction)
    if not need_grad:
        return loss, None
    if bad is not None:
        grad = torch.where(bad.unsqueeze(-1), float("nan"), grad)
    grad = grad.masked_fill_(~kept.unsqueeze(-1), 0.0).mul_(_grad_scale(kept, reduction, grad.dtype))
    return loss, grad.to(rows.dtype)


def _launchers():
    """The kernel launchers (imported on first use: triton is an optional dependency)."""
    from bitempered.bindings.torch import launchers as torch_triton

    return torch_triton


class KernelRows:
    """The solver's row evaluations (``torch_native.RowSums``) by the vocab-parallel kernels: one
    ``partial_sums_kernel`` launch per pass over every row of the slice (so no ``keep``)."""

    def __init__(self, rows, row_max, t: float):
        self.rows, self.row_max = rows, row_max
        self.t = torch.full((1,), t, dtype=torch.float32, device=rows.device)  # made once, read by every pass

    def support(self):
        return self.sums(torch.zeros_like(self.row_max.unsqueeze(-1)), support=True)[2]

    def sums(self, y, keep=None, support=False):
        sums = _launchers().vocab_parallel_sums(self.rows, self.row_max, y.reshape(-1).contiguous(), self.t,
                                                 support)
        return (sums[:, :1], sums[:, 1:2], sums[:, 2:]) if support else (sums[:, :1], sums[:, 1:2])


def kernel_loss_and_grad(rows, labels, t1: float, t2: float, label_smoothing: float, num_iters, ignore_index: int,
                         reduction: str, need_grad: bool, reducer, offset: int, num_classes: int):
    """``loss_and_grad`` on the vocab-parallel Triton kernels (fp32 math, the logits' dtype
    read and written as is): the same solver and the same collectives as the native path."""
    num_rows = rows.shape[0]
    row_max = reducer.max(rows.amax(dim=-1, keepdim=True).float()).reshape(-1).contiguous()
    evaluations = KernelRows(rows, row_max, t2)
    if num_iters is None:
        y, _ = native.solve_normalizers(evaluations, t2, num_rows, torch.float32, rows.device, reducer,
                                        compact=False)
    else:
        y = native.original_normalizers(evaluations, t2, num_iters, num_rows, torch.float32, rows.device, reducer)
    y = y.reshape(-1).contiguous()
    if labels.dtype.is_floating_point:
        kept = torch.ones(num_rows, dtype=torch.bool, device=rows.device)
        bad = torch.zeros_like(kept)
        local = labels
    else:
        local, kept, bad = _local_indices(labels, offset, num_classes, ignore_index)
    loss_sums, sum_e, sum_d = reducer.sum(*_launchers().vocab_parallel_epilogue(
        rows, local, row_max, y, t1, t2, label_smoothing, num_classes).split(1, dim=-1))
    loss_rows = torch.where(kept, torch.where(bad, float("nan"), loss_sums.squeeze(-1)), 0.0)
    loss = _reduce(loss_rows, kept, reduction)
    if not need_grad:
        return loss, None
    row_scale = torch.where(kept, torch.where(bad, float("nan"), 1.0), 0.0) * _grad_scale(kept, reduction,
                                                                                          torch.float32)
    reduced = torch.cat([loss_sums, sum_e, sum_d], dim=-1)
    grad = _launchers().vocab_parallel_gradient(rows, local, row_max, y, reduced, row_scale.float().contiguous(),
                                                 t1, t2, label_smoothing, num_classes)
    return loss, grad


class _VocabParallelLoss(torch.autograd.Function):
    """The gradient is made in the forward (from the reduced row sums); the backward scales it."""

    @staticmethod
    def forward(ctx, logits, rows, labels, settings, reducer, offset, num_classes, compute):
        loss, grad = compute(rows, labels, *settings, True, reducer, offset, num_classes)
        ctx.save_for_backward(grad)
        ctx.logits_shape = logits.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        upstream = grad_loss.reshape(-1, 1) if grad_loss.dim() > 0 else grad_loss
        grad_logits = (grad * upstream.to(grad.dtype)).reshape(ctx.logits_shape)
        return grad_logits, None, None, None, None, None, None, None


def _group_size(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab-parallel functions need torch.distributed initialized (init_process_group)")
    return dist.get_world_size(group)


def vocab_parallel_bi_tempered_logistic_loss(local_logits, labels, t1, t2, group=None, label_smoothing=0.0,
                                             num_iters=None, reduction="mean", ignore_index=-100,
                                             backend="auto"):
    """Bi-tempered loss of logits whose classes are sharded across ``group`` (default: the world).

    Args:
        local_logits: [..., C_local], this rank's contiguous slice of the classes (rank r of the
            group holds the r-th slice; slices may differ in size, C = their sum).
        labels: integer GLOBAL class indices of shape ``local_logits.shape[:-1]`` (the same on every
            rank), or dense labels sliced like the logits.
        t1, t2, label_smoothing, num_iters, reduction, ignore_index: as in
            ``bi_tempered_logistic_loss`` (smoothing uses the GLOBAL C); the same on every rank.
        backend: "auto" (the vocab-parallel Triton kernels for CUDA tensors, native ops otherwise),
            "torch" (native ops, CPU and CUDA alike) or "triton" (the kernels; CPU tensors only
            under TRITON_INTERPRET=1).

    Returns the loss (the same on every rank); the gradient flows to this rank's slice. Every rank
    must call it (collectives). See the module docstring for the collective count.
    """
    from bitempered.bindings.torch.api import (_check_dense_labels, _check_indices, _check_logits, _empty_loss, _label_kind,
                        _label_smoothing, _num_iters, _resolve_backend, _rows, _temperature)

    _check_logits(local_logits)
    indices = _label_kind(local_logits.shape, labels)
    check.check_reduction(reduction)
    backend = _resolve_backend(backend, local_logits.device, local_logits.dtype)
    iters = _num_iters(num_iters)
    _, smoothing = _label_smoothing(label_smoothing, local_logits.device)
    if smoothing is None:
        raise TypeError("label_smoothing must be a Python float or a CPU 0-d tensor here")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    t1_ = float(_temperature(t1, "t1", torch.device("cpu")))
    t2_ = float(_temperature(t2, "t2", torch.device("cpu")))
    if labels.device != local_logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {local_logits.device}")
    num_local = local_logits.shape[-1]
    if _group_size(group) == 1:
        reducer, offset, num_classes = native.LOCAL_ROWS, 0, num_local
    else:
        settings = (t1_, t2_, smoothing, iters, ignore_index, float(indices), REDUCTIONS.index(reduction))
        reducer = GroupRows(group)
        offset, num_classes = _slices(group, local_logits.numel() // num_local, num_local, local_logits.dtype,
                                      settings, local_logits.device)
    check.check_smoothing_classes(smoothing, num_classes)
    if local_logits.numel() == 0:
        return _empty_loss(local_logits, local_logits.shape[:-1], reduction)
    rows = _rows(local_logits)
    label_rows = labels.reshape(-1) if indices else _rows(labels)
    if indices:
        _check_indices(label_rows, num_classes, ignore_index)
    else:
        _check_dense_labels(label_rows)
    settings = (t1_, t2_, smoothing, iters or None, ignore_index, reduction)
    compute = kernel_loss_and_grad if backend == "triton" else loss_and_grad
    if torch.is_grad_enabled() and local_logits.requires_grad:
        loss = _VocabParallelLoss.apply(local_logits, rows, label_rows, settings, reducer, offset, num_classes,
                                        compute)
    else:
        loss, _ = compute(rows, label_rows, *settings, False, reducer, offset, num_classes)
    return loss.reshape(local_logits.shape[:-1]) if reduction == "none" else loss


class _VocabParallelSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, t: float, num_iters, reducer):
        dtype = native.compute_dtype(rows.dtype)
        p = native.tempered_log_softmax_rows(rows.to(dtype), t, num_iters, reducer).exp_()
        ctx.save_for_backward(p)
        ctx.t, ctx.reducer = t, reducer
        return p.to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_p):
        # the VJP's two row sums are over every slice: one packed all-reduce (the only one here)
        (p,) = ctx.saved_tensors
        grad = native.tempered_softmax_vjp_rows(p, grad_p.to(p.dtype), ctx.t, ctx.reducer)
        return grad.to(grad_p.dtype), None, None, None


def vocab_parallel_tempered_softmax(local_logits, t, group=None, num_iters=None, backend="auto"):
    """This rank's slice of ``tempered_softmax`` of logits whose classes are sharded across ``group``.

    Collectives: the argument check, the row max, one per solver pass (the support size with the
    first); the backward one.
    """
    from bitempered.bindings.torch.api import _check_logits, _num_iters, _rows, _temperature

    _check_logits(local_logits)
    check.check_backend(backend, ("auto", "torch"))
    iters = _num_iters(num_iters) or None
    t_ = float(_temperature(t, "t", torch.device("cpu")))
    num_local = local_logits.shape[-1]
    reducer = native.LOCAL_ROWS
    if _group_size(group) > 1:
        reducer = GroupRows(group)
        _slices(group, local_logits.numel() // num_local, num_local, local_logits.dtype, (t_, iters or 0),
                local_logits.device)
    if local_logits.numel() == 0:
        return torch.empty_like(local_logits)
    return _VocabParallelSoftmax.apply(_rows(local_logits), t_, iters, reducer).reshape(local_logits.shape)


# --------------------------------------------------------------------------------------------
# DTensor: logits sharded on the class dimension take this path from the plain functions
# --------------------------------------------------------------------------------------------

def is_dtensor(x) -> bool:
    """True for a DTensor (checked without importing torch.distributed.tensor when it is unused)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _class_group(logits):
    """The process group of the mesh dimension that shards the class (last) dimension of ``logits``."""
    from torch.distributed.tensor import Replicate, Shard

    last = logits.dim() - 1
    sharded = [i for i, p in enumerate(logits.placements) if isinstance(p, Shard) and p.dim % logits.dim() == last]
    others_replicated = all(isinstance(p, Replicate) for i, p in enumerate(logits.placements) if i not in sharded)
    if len(sharded) != 1 or not others_replicated:
        raise ValueError("a DTensor of logits must be sharded on the class (last) dimension over one mesh "
                         f"dimension (Shard(-1)) and replicated over the others, got {logits.placements}")
    return logits.device_mesh.get_group(sharded[0])


def dtensor_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None, reduction="mean",
                 ignore_index=-100, backend="auto", inplace_backward=False):
    """``bi_tempered_logistic_loss`` of a DTensor sharded on the classes (like ``loss_parallel()``).

    Labels: class indices (a tensor or a replicated DTensor), or dense labels of the full shape (a
    tensor, or a DTensor placed like the logits). Returns a replicated DTensor.
    """
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    if inplace_backward:
        raise ValueError("inplace_backward=True is not supported for DTensor logits")
    group = _class_group(logits)
    if labels.dtype.is_floating_point:
        if not is_dtensor(labels):
            labels = distribute_tensor(labels, logits.device_mesh, logits.placements)
        labels = labels.redistribute(logits.device_mesh, logits.placements).to_local()
    elif is_dtensor(labels):
        labels = labels.full_tensor()
    loss = vocab_parallel_bi_tempered_logistic_loss(
        logits.to_local(), labels, t1, t2, group=group, label_smoothing=label_smoothing, num_iters=num_iters,
        reduction=reduction, ignore_index=ignore_index, backend=backend)
    return DTensor.from_local(loss, logits.device_mesh, [Replicate()] * logits.device_mesh.ndim, run_check=False)


def dtensor_softmax(logits, t, num_iters=None, backend="auto"):
    """``tempered_softmax`` of a DTensor sharded on the classes; the result is placed like it."""
    from torch.distributed.tensor import DTensor

    group = _class_group(logits)
    probs = vocab_parallel_tempered_softmax(logits.to_local(), t, group=group, num_iters=num_iters, backend=backend)
    return DTensor.from_local(probs, logits.device_mesh, logits.placements, run_check=False, shape=logits.shape,
                              stride=logits.stride())
