"""PyTorch vocab-parallel loss: the classes sharded across the ranks of a torch.distributed group.

Each rank holds ``local_logits`` [..., C_local], its contiguous slice of the classes, in the rank
order of the group (slices may differ in size; C is their sum). The result equals
:func:`bitempered.torch.bi_tempered_logistic_loss` on the concatenated logits, on every rank;
the gradient of each slice is local (the backward needs no collective). A DTensor sharded on the
classes reaches this path from the plain functions (``dtensor.py``).

The class axis is ``dim`` (keyword, default -1), as in the plain functions: the sharded one. For
another axis the slice's class axis is moved last here, a copy of the slice (and of dense labels)
unless the classes are innermost in memory: the native driver and the solver's row statistics work
on rows [N, C_local], and the vocab-parallel Triton path shares that driver (its launchers could
read the slice in place, as the plain loss's do; not done yet).

The native path is the plain loss's driver (``native/loss.py``) on this rank's slice, with its row
statistics all-reduced over the group (``GroupRows``). It runs over blocks of rows, the same
rows on every rank (rows per block from ceil(C / P)), and each block reduces its own rows.
Collectives per call, each O(rows) values, never N x C:

    1  the group check: every rank's row (error code, N, C_local, dtype, labels, settings), P x 14
    then for each block of rows:
    1  row max
    k  one per solver pass, (f, g) packed; the support size rides along with the first pass
       (t2 = 1 included: one pass, the cross-entropy shortcut needs whole rows)
    1  the loss and the gradient's two row sums, packed (with learnable temperatures: on the
       kernels the three more sums of the temperature gradients ride along; the native driver
       reduces its five temperature sums in one more collective per block)

so 1 + sum over blocks of (passes + 2), which is passes + 3 for N up to one block
(``native/loss.BLOCK_ELEMENTS`` // ceil(C / P) rows: 32 at C = 32000 on 2 ranks; the k of a block
is its slowest row's). ``num_iters=k`` makes k + 1 sums per block (t2 < 1: the support count and
k bisection steps; t2 = 1: one). A group of size 1 sends nothing: it runs the plain loss's driver
on whole rows.

An error on one rank never leaves the others waiting in a collective (``group_check.py``): each
rank runs its checks before the first collective with the error caught, and the group check's one
all-reduce tells every rank whether any failed; then every rank raises the same error (that rank's
message, naming the rank; a second collective carries it, on this error path only). Checked so:

- on each rank, before the group check: every argument as the plain loss checks it (the same
  messages), this rank's slice not empty (C_local >= 1: a DTensor with few classes for its mesh
  can leave a rank none), and dense labels of this rank's slice within [0, 1] (CPU tensors);
- across ranks, from the group check's table: the same rows N, dtype, t1, t2, label_smoothing,
  num_iters, ignore_index, reduction and kind of labels, and for class indices the same labels
  (a position-weighted checksum of them: O(N), one value in the table), and the same row weights
  (``weight``/``sample_weight``, a checksum too), else ValueError naming the value and each rank's;
- after it, alike on every rank (they hold the same settings, labels and global C by then):
  smoothing's class count, the per-class weights' length and class indices within [0, C) (CPU
  tensors).

Gloo (CPU) and NCCL (CUDA) take the same code path. The per-slice math runs on the native backend
(CPU, float64, ``backend="torch"``) or on the vocab-parallel Triton kernels (CUDA by default, or
interpreted CPU tensors with ``backend="triton"``): ``kernels/vocab_parallel.py`` is the fused loss
kernel split at each row reduction, one launch per solver pass over every row (``KernelRows``),
then one for the loss sums and one for the gradient: there the collectives are those of ONE block
(passes + 3). At t2 = 1 one launch gives the slice's max and sum-exp (``SumExpRows``): the max
collective, then the pass's sums, with no second read of the slice. Both evaluate the same solver
(``native/math.solve_normalizers`` / ``original_normalizers``). ``vocab_parallel_tempered_softmax``
runs native ops on every backend.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from bitempered.bindings.common import validation as check
from bitempered.bindings.torch import args, group_check, ops
from bitempered.bindings.torch.native import loss as native_loss
from bitempered.bindings.torch.native import math as native
from bitempered.bindings.torch.native import temperature
from bitempered.bindings.torch.rows import (
    TemperatureInput, grad_scale, kept_and_bad, kept_rows, masked_scale, reduce, scale_stored_grad,
    temperature_gradients, with_weight_gradient,
)

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


class SumExpRows:
    """The solver's evaluations at t = 1 from ``max_sumexp_kernel``'s per-slice (max, sum-exp):
    each slice's sum rescaled to the global max is f at y = 0, and f(y) = e^-y f(0) = g(y)
    exactly, so no pass reads the slice again (the max sweep was also the pass)."""

    def __init__(self, local, row_max):
        local_max, local_sum = local[:, :1], local[:, 1:]
        global_max = row_max.unsqueeze(-1)
        # exp(m - M) is 0 for a slice without the top logits (also one of only -inf); equal maxima
        # (a +inf max, a row of only -inf) give 1, not exp(nan)
        self.sum_at_zero = local_sum * torch.where(local_max == global_max, 1.0, torch.exp(local_max - global_max))

    def sums(self, y, keep=None, support=False):
        if support or keep is not None:  # t = 1: D is not needed; the caller does not compact
            raise NotImplementedError("SumExpRows evaluates all rows at t = 1, without the support size")
        f = self.sum_at_zero * torch.exp(-y)
        return f, f


def kernel_loss_and_grad(rows, labels, t1: float, t2: float, label_smoothing: float, num_iters, ignore_index: int,
                         reduction: str, need_grad: bool, reducer, offset: int, num_classes: int,
                         weights: torch.Tensor | None = None, temperature_grads: torch.Tensor | None = None):
    """``loss_and_grad`` on the vocab-parallel Triton kernels (fp32 math, the logits' dtype
    read and written as is): the same solver and the same collectives as the native path; each
    row weighted by ``weights`` [N] when given. ``temperature_grads``: None or the float32 [N, 2]
    output of each row's (dL/dt1, dL/dt2) times its factor on the gradient (as
    ``reduced_loss_and_grad``'s), from the epilogue's temperature variant: its three more row sums
    ride in the same all-reduce as the loss's (no extra collective)."""
    num_rows = rows.shape[0]
    if t2 == 1.0:  # the max sweep is also the solver's pass (SumExpRows)
        local = ops.triton_launchers().vocab_parallel_max_sumexp(rows)
        row_max = reducer.max(local[:, :1]).reshape(-1).contiguous()
        evaluations = SumExpRows(local, row_max)
    else:
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
    need_temperature_grads = temperature_grads is not None
    sums = reducer.sum(*ops.triton_launchers().vocab_parallel_epilogue(
        rows, local, row_max, y, t1, t2, label_smoothing, num_classes,
        need_temperature_grads=need_temperature_grads).split(1, dim=-1))
    loss_sums, sum_e, sum_d = sums[:3]
    loss_rows = loss_sums.squeeze(-1)
    if bad is not None:
        loss_rows = torch.where(kept, torch.where(bad, float("nan"), loss_rows), 0.0)
    loss = reduce(loss_rows, kept, reduction, weights)
    if not (need_grad or need_temperature_grads):
        return loss, None
    row_scale = masked_scale(kept, bad, grad_scale(kept, reduction, torch.float32, weights), torch.float32)
    if need_temperature_grads:
        temperature_grads.copy_(_reduced_temperature_grads(*sums[1:], kept, row_scale))
    if not need_grad:
        return loss, None
    reduced = torch.cat([loss_sums, sum_e, sum_d], dim=-1)
    grad = ops.triton_launchers().vocab_parallel_gradient(rows, local, row_max, y, reduced,
                                                          row_scale.contiguous(), t1, t2, label_smoothing,
                                                          num_classes)
    return loss, grad


def _reduced_temperature_grads(sum_e, sum_d, dt1, sum_a, sum_big_e, kept, row_scale):
    """Each row's (dL/dt1, dL/dt2) [N, 2] x ``row_scale`` (``masked_scale``) from the epilogue's
    REDUCED row sums but the loss's, [N, 1] each: dL/dt2 = sum A - sum d sum E / sum e
    (``kernels/vocab_parallel.py``); exactly 0 on ignored rows (whatever their logits)."""
    per_row = torch.cat([dt1, sum_a - sum_d * sum_big_e / sum_e], dim=-1) * row_scale.unsqueeze(-1)
    return torch.where(kept.unsqueeze(-1), per_row, 0.0)


class _VocabParallelLoss(torch.autograd.Function):
    """The gradients are made in the forward (from the reduced row sums): the logits' and, where
    ``t1`` or ``t2`` (0-d tensors; their values are in ``settings``) requires grad, each row's
    temperature gradients. The backward scales them by the upstream gradient."""

    @staticmethod
    def forward(ctx, logits, t1, t2, rows, labels, settings, reducer, offset, num_classes, compute, weights):
        need_grad = ctx.needs_input_grad[0]
        need_temperature_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        # (in the compute dtype: float32 on the kernels, which take no float64)
        dt = rows.new_empty((rows.shape[0], 2), dtype=native.compute_dtype(rows.dtype)) if need_temperature_grads \
            else None
        loss, grad = compute(rows, labels, *settings, need_grad, reducer, offset, num_classes, weights=weights,
                             temperature_grads=dt)
        ctx.save_for_backward(grad, dt)
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        ctx.temperatures = [TemperatureInput.of(t) for t in (t1, t2)]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, dt = ctx.saved_tensors
        grads = [None] * 11
        if ctx.needs_input_grad[0]:
            grads[0] = scale_stored_grad(grad, grad_loss, ctx.logits_dtype).reshape(ctx.logits_shape)
        if dt is not None:
            grads[1:3] = temperature_gradients(dt, grad_loss, ctx.temperatures, ctx.needs_input_grad[1:3])
        return tuple(grads)


def _group_size(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab-parallel functions need torch.distributed initialized (init_process_group)")
    return dist.get_world_size(group)


def _check_slice(local_logits, dim) -> int:
    """``args.class_logits`` (the class axis ``dim``, returned negative), with what an empty slice
    means here."""
    if isinstance(local_logits, torch.Tensor) and local_logits.dim() > 0:
        axis = check.check_class_axis(dim, local_logits.dim(), "dim")
        if local_logits.shape[axis] == 0:
            raise ValueError(f"local_logits hold no class (shape {tuple(local_logits.shape)}, class axis dim={dim}): "
                             "every rank needs at least one (a DTensor sharded on the classes leaves a rank none when "
                             "C is small next to the mesh: torch gives each rank ceil(C / P) classes)")
    dim = args.class_logits(local_logits, dim)
    if local_logits.dtype not in DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {local_logits.dtype}")
    return dim


def _table_device(local_logits, group) -> torch.device:
    """Where the group check's table lives: on the logits' device (any backend takes it); without
    logits (a rank whose argument is no tensor), on the device the group's backend takes."""
    if isinstance(local_logits, torch.Tensor):
        return local_logits.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def label_checksum(label_rows: torch.Tensor) -> torch.Tensor:
    """A 0-d float64 checksum of class indices (position-weighted, int64 wrapping, exact in float64):
    equal on ranks that hold the same labels, different (but for a 2**-52 chance) otherwise."""
    weights = torch.arange(1, 2 * label_rows.numel(), 2, device=label_rows.device)  # odd: every change shows
    return torch.remainder((label_rows.long() * weights).sum(), 2**52).double()


# The group check's columns (named as its error messages name them)
INDEX_LABELS, LABEL_KIND = "labels (class indices)", "labels' kind (indices or dense)"
ROW_WEIGHTS = "row weights (weight[target] x sample_weight)"
# whether a temperature gradient is made: it changes what the collectives carry, so ranks must agree
LOSS_TEMPERATURE_GRADS, SOFTMAX_TEMPERATURE_GRAD = "whether t1 or t2 requires grad", "whether t requires grad"
LOSS_COLUMNS = ("rows", "C_local", "dtype", INDEX_LABELS, "t1", "t2", "label_smoothing", "num_iters", "ignore_index",
                LABEL_KIND, "reduction", ROW_WEIGHTS, LOSS_TEMPERATURE_GRADS)
SOFTMAX_COLUMNS = ("rows", "C_local", "dtype", "t", "num_iters", SOFTMAX_TEMPERATURE_GRAD)
_SHOWN = {
    "dtype": lambda value: str(DTYPES[int(value)]),
    "reduction": lambda value: repr(check.REDUCTIONS[int(value)]),
    INDEX_LABELS: lambda value: f"checksum {int(value)}",
    ROW_WEIGHTS: lambda value: "none" if value == 0 else f"checksum {value!r}",
    LABEL_KIND: lambda value: "indices" if value else "dense",
    LOSS_TEMPERATURE_GRADS: lambda value: "yes" if value else "no",
    SOFTMAX_TEMPERATURE_GRAD: lambda value: "yes" if value else "no",
}


def _show(name: str, value: float) -> str:
    """A value of the group check's table as its error message shows it."""
    return _SHOWN[name](value) if name in _SHOWN else f"{value:g}"


class _LossCall(NamedTuple):
    """The checked arguments of one vocab-parallel loss call on this rank."""

    checked: args.LossArgs
    logits: torch.Tensor  # the slice with its classes moved last (a view of it): [..., C_local]
    t1: float
    t2: float
    smoothing: float
    label_rows: torch.Tensor | None
    weights: torch.Tensor | None  # each row's weight [N] (args.row_weights)
    need_temperature_grad: bool  # t1 or t2 requires grad (with grad mode on)


def check_one_temperature(value, name: str) -> None:
    """The vocab-parallel functions take one temperature for every row (their kernels and solver
    passes take one value per call): a per-row tensor raises a ValueError naming ``name``."""
    if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and value.numel() != 1:
        raise args.TemperatureShapeError(
            f"{name} must be a float or a 0-d tensor: 0-d temperatures only here (the vocab-parallel functions take "
            f"one temperature for every row), got a tensor of shape {tuple(value.shape)}")


def wants_temperature_grad(*temperatures: torch.Tensor) -> bool:
    """Grad mode on and a temperature tensor that requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in temperatures)


def weights_checksum(weights: torch.Tensor | None) -> float:
    """0 without weights; else a position-weighted float64 sum of the row weights (> 0 once any is),
    equal on ranks that hold the same weights."""
    if weights is None:
        return 0.0
    positions = torch.arange(1, 2 * weights.numel(), 2, device=weights.device, dtype=torch.float64)
    return float((weights.double() * positions).sum()) + 1.0


def _check_loss_call(local_logits, labels, t1, t2, label_smoothing, num_iters, reduction, ignore_index,
                     backend, weight=None, sample_weight=None, dim=-1) -> tuple[_LossCall, dict]:
    """The plain loss's checks on this rank's arguments (its dense label slice and its weights),
    and its row of the group check."""
    dim = _check_slice(local_logits, dim)
    for value, name in ((t1, "t1"), (t2, "t2")):
        check_one_temperature(value, name)
    checked = args.loss_args(local_logits.shape, local_logits.device, local_logits.dtype, labels, t1, t2,
                             label_smoothing, num_iters, reduction, ignore_index, backend, dim=dim)
    need_temperature_grad = wants_temperature_grad(checked.t1, checked.t2)
    ops.check_temperature_grad_iterations(checked.num_iters, need_temperature_grad)
    smoothing = checked.smoothing_value
    if smoothing is None:
        raise TypeError("label_smoothing must be a Python float or a CPU 0-d tensor here")
    # the classes last (views; see the module docstring): every shape below is the moved one's
    local_logits = local_logits.movedim(dim, -1)
    labels = labels if checked.indices else labels.movedim(dim, -1)
    label_rows = args.label_rows(labels, checked.indices) if local_logits.numel() else None
    if label_rows is not None and not checked.indices:
        args.check_dense_labels(label_rows)  # this rank's slice: every rank checks its own
    num_local = local_logits.shape[-1]
    # per-class weights hold every class (the GLOBAL C, known only after the group check): their
    # length is checked there; here the values, and the rows' weights the call uses
    weights = None
    if (weight is not None or sample_weight is not None) and label_rows is not None:
        num_classes = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else num_local
        weights = args.row_weights(weight, sample_weight, label_rows, checked.indices, local_logits.shape[:-1],
                                   num_classes, local_logits.device, native.compute_dtype(local_logits.dtype))
    call = _LossCall(checked, local_logits, _host_value(checked.t1, checked.t1_value),
                     _host_value(checked.t2, checked.t2_value), smoothing, label_rows, weights, need_temperature_grad)
    checksum = label_checksum(label_rows) if checked.indices and label_rows is not None else 0.0
    ignored = math.inf if ignore_index is None else float(ignore_index)  # None: no row ignored
    row = dict(zip(LOSS_COLUMNS, (local_logits.numel() // num_local, num_local, DTYPES.index(local_logits.dtype),
                                  checksum, call.t1, call.t2, smoothing, checked.num_iters, ignored,
                                  float(checked.indices), check.REDUCTIONS.index(reduction),
                                  weights_checksum(weights), float(need_temperature_grad))))
    return call, row


def vocab_parallel_bi_tempered_logistic_loss(local_logits, labels, t1, t2, group=None, label_smoothing=0.0,
                                             num_iters=None, reduction="mean", ignore_index=-100,
                                             backend="auto", *, weight=None, sample_weight=None, dim=-1):
    """Bi-tempered loss of logits whose classes are sharded across ``group`` (default: the world).

    Args:
        local_logits: [..., C_local] (classes on ``dim``), this rank's contiguous slice of the
            classes (rank r of the group holds the r-th slice; slices may differ in size, C = their
            sum; C_local >= 1).
        labels: integer GLOBAL class indices of the logits' shape without the class axis (the same
            on every rank), or dense labels sliced like the logits.
        t1, t2, label_smoothing, num_iters, reduction, ignore_index: as in
            ``bi_tempered_logistic_loss`` (smoothing uses the GLOBAL C); the same on every rank.
            Temperatures are floats or 0-d tensors only here (one per row: ValueError). One that
            requires grad gets its exact gradient (``num_iters`` None), computed with the loss from
            the reduced row sums: the whole gradient, the same on every rank (the temperatures are
            replicated: do not sum it over the group again).
        weight, sample_weight: as in ``bi_tempered_logistic_loss``: ``weight`` holds all C (GLOBAL)
            class weights, ``sample_weight`` one weight per row; the same on every rank (checked).
        backend: "auto" (the vocab-parallel Triton kernels for CUDA tensors, native ops otherwise),
            "torch" (native ops, CPU and CUDA alike) or "triton" (the kernels; CPU tensors only
            under TRITON_INTERPRET=1).
        dim: the class (sharded) axis, keyword only, default -1: as in ``bi_tempered_logistic_loss``
            (moved last here: a copy of the slice unless the classes are innermost in memory).

    Returns the loss (the same on every rank); the gradient flows to this rank's slice. Every rank
    must call it (collectives). A bad argument on any rank raises the same error on every rank
    (the module docstring says what is checked). See the module docstring for the collective count.
    """
    def check_locally():
        return _check_loss_call(local_logits, labels, t1, t2, label_smoothing, num_iters, reduction, ignore_index,
                                backend, weight, sample_weight, dim)

    if _group_size(group) == 1:
        call, _ = check_locally()
        reducer, offset, num_classes = native.LOCAL_ROWS, 0, call.logits.shape[-1]
    else:
        call, table = group_check.agree(group, _table_device(local_logits, group), LOSS_COLUMNS, check_locally,
                                        may_differ=("C_local",), show=_show)
        reducer = GroupRows(group)
        local_sizes = [int(size) for size in table["C_local"]]
        rank = dist.get_rank(group)
        offset, num_classes = sum(local_sizes[:rank]), sum(local_sizes)
    # from here every rank holds the same settings, labels and C: each check below raises on all alike
    checked, local_logits = call.checked, call.logits
    check.check_smoothing_classes(call.smoothing, num_classes)
    if weight is not None:
        check.check_class_weight_shape(weight.shape, num_classes)
    if local_logits.numel() == 0:
        return args.empty_loss(local_logits, local_logits.shape[:-1], reduction)
    if checked.indices:
        args.check_indices(call.label_rows, num_classes, ignore_index)
    local_logits = args.autocast_float32(local_logits)
    rows = args.as_rows(local_logits)
    label_rows, op_ignore_index = args.op_labels(call.label_rows, checked.indices, ignore_index, num_classes)
    settings = (call.t1, call.t2, call.smoothing, checked.num_iters or None, op_ignore_index, reduction)
    compute = kernel_loss_and_grad if checked.backend == "triton" else native_loss.reduced_loss_and_grad
    weights = None if call.weights is None else call.weights.detach()  # their gradient: with_weight_gradient
    if (torch.is_grad_enabled() and local_logits.requires_grad) or call.need_temperature_grad:
        loss = _VocabParallelLoss.apply(local_logits, checked.t1, checked.t2, rows, label_rows, settings, reducer,
                                        offset, num_classes, compute, weights)
    else:
        loss, _ = compute(rows, label_rows, *settings, False, reducer, offset, num_classes, weights=weights)

    def unweighted_rows():  # (every rank takes this path alike: the weights are the same on all)
        loss_rows, _ = compute(rows.detach(), label_rows, *settings[:-1], "none", False, reducer, offset, num_classes)
        return loss_rows, kept_rows(label_rows, op_ignore_index)

    loss = with_weight_gradient(loss, call.weights, reduction, unweighted_rows)
    return loss.reshape(local_logits.shape[:-1]) if reduction == "none" else loss


def _host_value(tensor: torch.Tensor, value: float | None) -> float:
    """A checked scalar as a Python float (a CUDA one costs a sync: every rank needs the value)."""
    return float(tensor) if value is None else value


class _VocabParallelSoftmax(torch.autograd.Function):
    """The probabilities of this rank's slice; ``t`` (a 0-d tensor, its value ``t_value``) gets its
    gradient where it requires grad: the whole one, the same on every rank."""

    @staticmethod
    def forward(ctx, rows, t, t_value: float, num_iters, reducer):
        dtype = native.compute_dtype(rows.dtype)
        p = native.tempered_log_softmax_rows(rows.to(dtype), t_value, num_iters, reducer).exp_()
        ctx.save_for_backward(p)
        ctx.t, ctx.reducer, ctx.temperature = t_value, reducer, TemperatureInput.of(t)
        return p.to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_p):
        # the VJP's two row sums are over every slice: one packed all-reduce; the gradient of t
        # reduces its own four sums in one more
        (p,) = ctx.saved_tensors
        g = grad_p.to(p.dtype)
        grad = dt = None
        if ctx.needs_input_grad[0]:
            grad = native.tempered_softmax_vjp_rows(p, g, ctx.t, ctx.reducer).to(grad_p.dtype)
        if ctx.needs_input_grad[1]:
            dt = ctx.temperature.gradient(temperature.softmax_temperature_grad_rows(p, g, ctx.t, ctx.reducer))
        return grad, dt, None, None, None


class _SoftmaxCall(NamedTuple):
    """The checked arguments of one vocab-parallel softmax call on this rank."""

    t: torch.Tensor  # 0-d
    t_value: float
    num_iters: int | None
    dim: int  # the class axis, negative
    need_temperature_grad: bool  # t requires grad (with grad mode on)


def _check_softmax_call(local_logits, t, num_iters, backend, dim) -> tuple[_SoftmaxCall, dict]:
    dim = _check_slice(local_logits, dim)
    check.check_backend(backend, ("auto", "torch"))
    iters = args.iterations(num_iters)
    check_one_temperature(t, "t")
    t_tensor, t_value = args.temperature_and_value(t, "t", local_logits.device)
    need_temperature_grad = wants_temperature_grad(t_tensor)
    ops.check_temperature_grad_iterations(iters, need_temperature_grad)
    call = _SoftmaxCall(t_tensor, _host_value(t_tensor, t_value), iters or None, dim, need_temperature_grad)
    num_local = local_logits.shape[dim]
    row = dict(zip(SOFTMAX_COLUMNS, (local_logits.numel() // num_local, num_local, DTYPES.index(local_logits.dtype),
                                     call.t_value, iters, float(need_temperature_grad))))
    return call, row


def vocab_parallel_tempered_softmax(local_logits, t, group=None, num_iters=None, backend="auto", *, dim=-1):
    """This rank's slice of ``tempered_softmax`` of logits whose classes are sharded across ``group``.

    Args: ``local_logits`` [..., C_local] (classes on ``dim``, keyword only, default -1) as in
    :func:`vocab_parallel_bi_tempered_logistic_loss`; ``t``, ``num_iters`` as in ``tempered_softmax``
    (the same on every rank; ``t`` a float or a 0-d tensor only here); ``backend``: "auto" or
    "torch" (native ops). Collectives: the argument check, the row max, one per solver pass (the
    support size with the first); the backward one, and one more where ``t`` requires grad (it gets
    its exact gradient, ``num_iters`` None: the whole one, the same on every rank). Another class
    axis than the last is moved last for the solver (a copy, see the module docstring); the
    probabilities come back with the classes on ``dim`` (a view of that layout).
    """
    def check_locally():
        return _check_softmax_call(local_logits, t, num_iters, backend, dim)

    reducer = native.LOCAL_ROWS
    if _group_size(group) == 1:
        call, _ = check_locally()
    else:
        call, _ = group_check.agree(group, _table_device(local_logits, group), SOFTMAX_COLUMNS, check_locally,
                                    may_differ=("C_local",), show=_show)
        reducer = GroupRows(group)
    axis = call.dim
    if local_logits.numel() == 0:
        return torch.empty_like(local_logits)
    moved = local_logits.movedim(axis, -1)  # (a view; as_rows copies where the classes are not innermost)
    probs = _VocabParallelSoftmax.apply(args.as_rows(moved), call.t, call.t_value, call.num_iters,
                                        reducer).reshape(moved.shape)
    return probs.movedim(-1, axis)
