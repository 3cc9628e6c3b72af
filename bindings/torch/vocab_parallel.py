"""PyTorch vocab-parallel loss: the classes sharded across the ranks of a torch.distributed group.

Each rank holds ``local_logits`` [..., C_local], its contiguous slice of the classes, in the rank
order of the group (slices may differ in size; C is their sum). The result equals
:func:`bitempered.torch.bi_tempered_logistic_loss` on the concatenated logits, on every rank;
the gradient of each slice is local (the backward needs no collective). A DTensor sharded on the
classes reaches this path from the plain functions (``dtensor.py``).

The native path is the plain loss's driver (``native/loss.py``) on this rank's slice, with its row
statistics all-reduced over the group (``GroupRows``). It runs over blocks of rows, the same
rows on every rank (rows per block from ceil(C / P)), and each block reduces its own rows.
Collectives per call, each O(rows) values, never N x C:

    1  argument check: (N, C_local, dtype, temperatures, ...) of every rank, one row each (P x 10)
    then for each block of rows:
    1  row max
    k  one per solver pass, (f, g) packed; the support size rides along with the first pass
       (t2 = 1 included: one pass, the cross-entropy shortcut needs whole rows)
    1  the loss and the gradient's two row sums, packed

so 1 + sum over blocks of (passes + 2), which is passes + 3 for N up to one block
(``native/loss.BLOCK_ELEMENTS`` // ceil(C / P) rows: 32 at C = 32000 on 2 ranks; the k of a block
is its slowest row's). ``num_iters=k`` makes k + 1 sums per block (t2 < 1: the support count and
k bisection steps; t2 = 1: one). The check makes a rank whose arguments differ (rows, dtype,
temperatures, ...) raise ValueError on every rank instead of hanging in a later collective. A
group of size 1 sends nothing: it runs the plain loss's driver on whole rows.

Gloo (CPU) and NCCL (CUDA) take the same code path. The per-slice math runs on the native backend
(CPU, float64, ``backend="torch"``) or on the vocab-parallel Triton kernels (CUDA by default, or
interpreted CPU tensors with ``backend="triton"``): ``kernels/vocab_parallel.py`` is the fused loss
kernel split at each row reduction, one launch per solver pass over every row (``KernelRows``),
then one for the loss sums and one for the gradient: there the collectives are those of ONE block
(passes + 3). Both evaluate the same solver (``native/math.solve_normalizers`` /
``original_normalizers``). ``vocab_parallel_tempered_softmax`` runs native ops on every backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bitempered.bindings.common import validation as check
from bitempered.bindings.torch import args, ops
from bitempered.bindings.torch.native import loss as native_loss
from bitempered.bindings.torch.native import math as native
from bitempered.bindings.torch.rows import grad_scale, kept_and_bad, masked_scale, reduce, scale_stored_grad

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class GroupRows(native.LocalRows):
    """Row reductions over a process group: all-reduce MAX, and SUM of the packed partial sums."""

    def __init__(self, group):
        self.group = group
        self.slices = dist.get_world_size(group)

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


class KernelRows:
    """The solver's row evaluations (``native/math.ShiftedRows``' interface) by the vocab-parallel
    kernels: one ``partial_sums_kernel`` launch per pass over every row of the slice (so no ``keep``)."""

    def __init__(self, rows, row_max, t: float):
        self.rows, self.row_max = rows, row_max
        self.t = torch.full((1,), t, dtype=torch.float32, device=rows.device)  # made once, read by every pass

    def support(self):
        return self.sums(torch.zeros_like(self.row_max.unsqueeze(-1)), support=True)[2]

    def sums(self, y, keep=None, support=False):
        sums = ops.triton_launchers().vocab_parallel_sums(self.rows, self.row_max, y.reshape(-1).contiguous(),
                                                          self.t, support)
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
    kept, bad = kept_and_bad(labels, ignore_index, num_classes)
    # the target's index within this slice (-1: an ignored or bad row); dense labels as they are
    local = labels if bad is None else torch.where(kept & ~bad, labels.long() - offset, -1)
    loss_sums, sum_e, sum_d = reducer.sum(*ops.triton_launchers().vocab_parallel_epilogue(
        rows, local, row_max, y, t1, t2, label_smoothing, num_classes).split(1, dim=-1))
    loss_rows = loss_sums.squeeze(-1)
    if bad is not None:
        loss_rows = torch.where(kept, torch.where(bad, float("nan"), loss_rows), 0.0)
    loss = reduce(loss_rows, kept, reduction)
    if not need_grad:
        return loss, None
    row_scale = masked_scale(kept, bad, grad_scale(kept, reduction, torch.float32), torch.float32)
    reduced = torch.cat([loss_sums, sum_e, sum_d], dim=-1)
    grad = ops.triton_launchers().vocab_parallel_gradient(rows, local, row_max, y, reduced,
                                                          row_scale.contiguous(), t1, t2, label_smoothing,
                                                          num_classes)
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
        return (scale_stored_grad(grad, grad_loss).reshape(ctx.logits_shape),) + (None,) * 7


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
    args.check_logits(local_logits)
    device = local_logits.device
    checked = args.loss_args(local_logits.shape, device, local_logits.dtype, labels, t1, t2, label_smoothing,
                             num_iters, reduction, ignore_index, backend)
    smoothing = checked.smoothing_value
    if smoothing is None:
        raise TypeError("label_smoothing must be a Python float or a CPU 0-d tensor here")
    t1_, t2_ = _host_value(checked.t1, checked.t1_value), _host_value(checked.t2, checked.t2_value)
    num_local = local_logits.shape[-1]
    if _group_size(group) == 1:
        reducer, offset, num_classes = native.LOCAL_ROWS, 0, num_local
    else:
        settings = (t1_, t2_, smoothing, checked.num_iters, ignore_index, float(checked.indices),
                    check.REDUCTIONS.index(reduction))
        reducer = GroupRows(group)
        offset, num_classes = _slices(group, local_logits.numel() // num_local, num_local, local_logits.dtype,
                                      settings, device)
    check.check_smoothing_classes(smoothing, num_classes)
    if local_logits.numel() == 0:
        return args.empty_loss(local_logits, local_logits.shape[:-1], reduction)
    rows = args.as_rows(local_logits)
    label_rows = args.label_rows(labels, checked.indices)
    args.check_label_values(label_rows, checked.indices, num_classes, ignore_index)
    settings = (t1_, t2_, smoothing, checked.num_iters or None, ignore_index, reduction)
    compute = kernel_loss_and_grad if checked.backend == "triton" else native_loss.reduced_loss_and_grad
    if torch.is_grad_enabled() and local_logits.requires_grad:
        loss = _VocabParallelLoss.apply(local_logits, rows, label_rows, settings, reducer, offset, num_classes,
                                        compute)
    else:
        loss, _ = compute(rows, label_rows, *settings, False, reducer, offset, num_classes)
    return loss.reshape(local_logits.shape[:-1]) if reduction == "none" else loss


def _host_value(tensor: torch.Tensor, value: float | None) -> float:
    """A checked scalar as a Python float (a CUDA one costs a sync: every rank needs the value)."""
    return float(tensor) if value is None else value


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
    args.check_logits(local_logits)
    check.check_backend(backend, ("auto", "torch"))
    iters = args.iterations(num_iters) or None
    t_, t_value = args.temperature_and_value(t, "t", local_logits.device)
    t_ = _host_value(t_, t_value)
    num_local = local_logits.shape[-1]
    reducer = native.LOCAL_ROWS
    if _group_size(group) > 1:
        reducer = GroupRows(group)
        _slices(group, local_logits.numel() // num_local, num_local, local_logits.dtype, (t_, iters or 0),
                local_logits.device)
    if local_logits.numel() == 0:
        return torch.empty_like(local_logits)
    return _VocabParallelSoftmax.apply(args.as_rows(local_logits), t_, iters, reducer).reshape(local_logits.shape)
