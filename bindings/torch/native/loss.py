"""The native PyTorch loss driver: SPEC's loss and gradient over blocks of rows, for every native
loss (the plain loss through ``ops``, the fused linear head per chunk, the vocab-parallel loss per
class slice).

``native/math.py`` holds the math (the solver, the loss and gradient terms) for whole row sets;
this driver runs it on blocks of about ``BLOCK_ELEMENTS`` logits at a time and writes each block's
gradient, scaled and masked, straight into the one [N, C] output. Why blocks:

- memory: every temporary of the solver and of the loss/gradient terms is block-sized, so the
  loss costs the gradient buffer plus O(block) (measured by ``python -m perf --memory``), instead
  of several N x C temporaries;
- speed on CPU: a block's temporaries stay in cache, so the many elementwise torch ops of each
  solver pass run at cache rather than DRAM bandwidth; only the logits read and the gradient
  write go to memory.

At t1 = t2 = 1 the loss is cross-entropy (SPEC), and the blocks take a lean path
(``_cross_entropy``): the gradient ``p - y`` (dense labels: ``p sum(y) - y``) is written by
torch's fused row kernels (``softmax``; dense labels ``log_softmax`` and its backward). float32
dense labels on the CPU go to one fused C kernel instead where it is built
(``native/cpu_kernel.py``, ``kernels/cross_entropy_cpu.c``): eager ops spend a log, two exps and
about ten passes per element there, the kernel one exp and one log while the row is in cache. Rows
where a shortcut is not SPEC's value (NaN or +inf logits, label mass on a p = 0 class, a
target probability below the normal range) come back non-finite and are recomputed by the general
path, so the result never depends on the path.

A slice of the classes (vocab-parallel): the logits hold classes [offset, offset + C_local) of C,
and a row reducer (``vocab_parallel.GroupRows``) reduces each row statistic over the slices. The
general path runs then (the cross-entropy shortcut needs whole rows: at t1 = t2 = 1 the general
path is one solver pass), and the blocks hold the same rows on every rank (their row count comes
from ceil(C / slices), which every rank knows), so each block's collectives run in lockstep.
"""

from __future__ import annotations

import math

import torch

from bitempered.bindings.torch.native import cpu_kernel
from bitempered.bindings.torch.native import math as native
from bitempered.bindings.torch.native import temperature
from bitempered.bindings.torch.rows import grad_scale, kept_and_bad, kept_rows, masked_scale, reduce, stored_grad_dtype

# Logits per block: 2^19 fp32 values are 2 MiB, so the ~4 block-sized temporaries of a solver
# pass stay in a CPU's L3 cache; a block of at least this size keeps torch's per-op overhead
# small against the work (a pass costs ~12 ops per block; 2^18 was ~10% slower at C = 100 to
# 1000 on 2 cores, from Python and per-op overhead, and 2^20 no faster).
BLOCK_ELEMENTS = 1 << 19
# The t1 = t2 = 1 path's blocks: a few fused row kernels each, no solver temporaries (class indices:
# none in fp32; dense labels: two), so larger blocks cost no speed on an idle CPU, and their 16x
# fewer parallel regions keep it fast when another process holds a core (measured on 2 cores: a
# busy core made 2^18-element blocks 2-5x slower than F.cross_entropy, 2^22 stayed within 1.5x).
CROSS_ENTROPY_BLOCK_ELEMENTS = 1 << 22
# Dense labels need block scratch (log(y / p), and log p where it cannot go into the gradient),
# allocated once per call and reused by every block. Measured at 4096 x 1000 on 2 cores: 2^21
# (8 MiB in fp32) is as fast as one 2^22 block while the allocator reuses its heap, and where it
# maps every large buffer afresh it page-faults half as much scratch (~1 ms per 4 MiB); 2^20 pays
# more per-op overhead.
DENSE_CROSS_ENTROPY_BLOCK_ELEMENTS = 1 << 21
# Blocks of a class slice (vocab-parallel) hold more rows: each block costs passes + 2 collectives.
# Measured with 2 gloo ranks on 2 cores, 4096 x 32000 fp32, (0.8, 1.2): 2^19 elements per slice
# block: 897 all-reduces, 6.4 s; 2^22: 113, 5.3 s; 2^24: 29, 10.4 s (temporaries out of cache).
GROUP_BLOCK_ELEMENTS = 1 << 22


def rows_per_block(num_classes: int, elements: int | None = None) -> int:
    return max(1, (elements or BLOCK_ELEMENTS) // max(num_classes, 1))


def general_block_rows(num_classes: int, slices: int = 1) -> int:
    """Rows per block of the general path: the same on every rank of a class-sharded group (from
    ceil(C / slices), which every rank knows), so each block's collectives run in lockstep."""
    return rows_per_block(-(-num_classes // slices), BLOCK_ELEMENTS if slices == 1 else GROUP_BLOCK_ELEMENTS)


def checks_dense_labels(device: torch.device, t1, t2) -> bool:
    """Whether ``loss_and_grad`` range-checks dense labels itself (ValueError naming ``labels``):
    on CPU at t1 = t2 = 1, where the C kernel counts values outside [0, 1] as it reads them, and the
    eager blocks take their log anyway and one max over it per block finds any (log y > 0 or NaN),
    so the API need not read them once more."""
    return device.type == "cpu" and t1 == 1.0 and t2 == 1.0


def _xlogx(value: float) -> float:
    return value * math.log(value) if value > 0.0 else 0.0


def _cross_entropy(logits, labels, indices: bool, label_smoothing: float, row_scale, grad, check_labels: bool):
    """Per-row loss [N] at t1 = t2 = 1, KL(y || softmax(a)), and (into ``grad``, if given) its
    gradient times the row scale: ``scale (p - y)``; dense labels ``scale (p sum(y) - y)``. A row it
    cannot give exactly comes back with a non-finite loss (the caller redoes it).

    Each block costs torch's fused row kernels and a few passes; the per-row arithmetic runs once on
    [N] vectors after the loop (torch's per-op cost is paid per block).

    - Class indices: one ``softmax`` (one exp per logit, cheaper than log_softmax and a second exp)
      written straight into the gradient; the loss needs only log p_target, read off p_target (a
      target below the normal range, a loss above ~87, is marked for redoing).
    - Dense labels: the C kernel when it applies (``_fused_dense_cross_entropy``); otherwise
      ``log_softmax`` (exact where p underflows) into the gradient's block; the loss
      from it in one log (the labels' own ``sum y log y``, which cross-entropy does not have) and
      two fused passes; then torch's fused log-softmax backward over it in place:
      ``y - p sum(y)``, negated by the scale. Its block scratch is allocated once per call.
    """
    dtype = row_scale.dtype
    num_rows, num_classes = logits.shape
    if not indices:
        fused = _fused_dense_cross_entropy(logits, labels, label_smoothing, row_scale, grad, check_labels)
        if fused is not None:
            return fused
    tiny = torch.finfo(dtype).tiny
    on = 1.0 - label_smoothing if label_smoothing > 0.0 else 1.0
    off = label_smoothing / (num_classes - 1) if label_smoothing > 0.0 else 0.0
    scale = row_scale.unsqueeze(-1)
    stats = torch.empty(2, num_rows, 1, dtype=dtype, device=logits.device)  # per-row sums
    if indices:
        target = labels.unsqueeze(-1)
        p_target, shifted_sum = stats
        target_grad = (-(on - off)) * scale  # the target's -y, scaled
    else:
        # sum y (1 - log(y / p)) = sum y - KL, so SPEC's loss is 1 minus it
        label_minus_kl, suspect = stats
        neg_scale = -scale
        # torch's CPU log-softmax backward reads each element before writing it, so there it runs
        # over log p in place, and log p goes straight into the block's gradient when the dtypes
        # agree; otherwise into block scratch, allocated once per call next to that of log(y / p)
        in_place = logits.device.type == "cpu"
        log_p_in_grad = in_place and grad is not None and grad.dtype == dtype
        scratch_rows = min(num_rows, rows_per_block(num_classes, DENSE_CROSS_ENTROPY_BLOCK_ELEMENTS))
        work = torch.empty(1 if log_p_in_grad else 2, scratch_rows, num_classes, dtype=dtype, device=logits.device)
        if check_labels:
            label_log_max = torch.empty(-(-num_rows // scratch_rows), dtype=torch.float64)
    step = rows_per_block(num_classes, CROSS_ENTROPY_BLOCK_ELEMENTS) if indices else scratch_rows
    for start in range(0, num_rows, step):
        block = slice(start, min(start + step, num_rows))
        a = logits[block].to(dtype)
        # the block's gradient in the compute dtype: the output itself when the dtypes agree
        out = grad[block] if grad is not None and grad.dtype == dtype else None
        if indices:
            p = torch.softmax(a, dim=-1) if out is None else torch.softmax(a, dim=-1, out=out)
            t = target[block]
            torch.gather(p, -1, t, out=p_target[block])
            if off > 0.0:  # sum_i (a_i - a_target), for the smoothed classes' sum of log p
                torch.sum(a - a.gather(-1, t), dim=-1, keepdim=True, out=shifted_sum[block])
            if grad is not None:
                if off > 0.0:
                    p.sub_(off)
                p.mul_(scale[block]).scatter_add_(-1, t, target_grad[block])
        else:
            given = labels[block]
            y = native.smooth_labels(given.to(dtype), label_smoothing)
            rows = y.shape[0]
            log_p = torch.log_softmax(a, dim=-1, out=out if log_p_in_grad else work[0][:rows])
            # y (1 - log(y / p)) in two fused passes after the one log; a y = 0 class gives NaN
            # (0 x -inf), which the NaN-skipping sum drops: SPEC's 0 log 0 = 0, even where p = 0
            log_ratio = torch.log(y, out=work[-1][:rows])
            if check_labels:  # log of the labels as given: > 0 or NaN where one lies outside [0, 1]
                label_log_max[start // step] = torch.amax(log_ratio if y is given else torch.log(given))
            log_ratio.sub_(log_p)
            torch.nansum(torch.addcmul(y, y, log_ratio, value=-1.0, out=log_ratio), dim=-1, keepdim=True,
                         out=label_minus_kl[block])
            if grad is None:  # finite unless the row is to be redone (see below); log p = -inf is exact
                torch.sum(y, dim=-1, keepdim=True, out=suspect[block]).add_(log_p[:, :1].clamp_min(-1.0))
            else:  # y - p sum(y), negated by the scale
                g = log_p if in_place else (out if out is not None else torch.empty_like(log_p))
                p = torch._log_softmax_backward_data(y, log_p, -1, dtype, out=g).mul_(neg_scale[block])
        if grad is not None and out is None:
            grad[block] = p  # the one rounding into the logits' dtype
    if check_labels and not bool((label_log_max <= 0.0).all()):  # (NaN compares False)
        native.check_dense_label_values(labels)  # raises, with their extremes
    if indices:
        log_p_target = torch.where(p_target >= tiny, torch.log(p_target), -math.inf)
        # sum y log y of the smoothed one-hot row; sum p = sum y = 1 cancel in SPEC's loss
        loss = (_xlogx(on) + (num_classes - 1) * _xlogx(off)) - (on - off) * log_p_target
        if off > 0.0:
            loss -= off * (shifted_sum + num_classes * log_p_target)
    else:
        # SPEC's loss at t = 1: sum y log(y / p) - sum y + sum p, with sum p = 1. The NaN-skipping
        # sum also dropped the NaNs of rows to redo, found from one element per row: with NaN/+inf
        # logits every log p is NaN, with non-finite labels every gradient (or sum y). alpha = 0
        # adds 0 x that element: 0 where it is finite, NaN where not.
        loss = (1.0 - label_minus_kl).add_(suspect if grad is None else grad[:, :1], alpha=0.0)
    return loss.squeeze(-1)


def _fused_dense_cross_entropy(logits, labels, label_smoothing: float, row_scale, grad, check_labels: bool):
    """``_cross_entropy`` of dense float32 labels on the CPU by the fused C kernel
    (``native/cpu_kernel.py``), or None where it does not apply (another device or dtype, no
    kernel): then the eager blocks run. Rows to redo come back non-finite, as from the blocks."""
    function = cpu_kernel.dense_cross_entropy() if logits.device.type == "cpu" else None
    num_rows, num_classes = logits.shape
    if function is None or num_rows == 0 or logits.dtype != torch.float32 or labels.dtype != torch.float32 \
            or logits.stride(-1) != 1 or (grad is not None and (grad.dtype != torch.float32 or grad.stride(-1) != 1)):
        return None
    labels = labels if labels.stride(-1) == 1 else labels.contiguous()
    keep, floor = native.smoothing_coefficients(label_smoothing, num_classes)  # the kernel smooths as it reads
    loss = torch.empty(num_rows, dtype=torch.float32)
    grad_pointer, grad_stride = (None, 0) if grad is None else (grad.data_ptr(), grad.stride(0))
    # the kernel takes one scale for every row: a per-row scale (upstream values) is applied after it
    uniform = row_scale.stride(0) == 0
    bad = function(logits.data_ptr(), logits.stride(0), labels.data_ptr(), labels.stride(0), grad_pointer,
                   grad_stride, loss.data_ptr(), num_rows, num_classes, keep, floor,
                   float(row_scale[0]) if uniform else 1.0, torch.get_num_threads())
    if grad is not None and not uniform:
        grad.mul_(row_scale.unsqueeze(-1))
    if bad < 0:
        raise MemoryError(f"bitempered: no memory for a scratch row of {num_classes} floats")
    if check_labels and bad:
        native.check_dense_label_values(labels)  # raises, with their extremes
    return loss


def _general_labels(targets, indices: bool, whole_rows: bool, label_smoothing: float, num_local: int,
                    num_classes: int, dtype):
    """The labels ``_general_block`` takes for some rows: class indices as they are (whole rows),
    else dense rows smoothed over the GLOBAL class count: the given ones, or for class indices on a
    slice the slice's part of the one-hot rows (``targets``: the index within the slice, outside
    [0, C_local) where the target is elsewhere or the row ignored)."""
    if indices and whole_rows:
        return targets
    if indices:
        here = (targets >= 0) & (targets < num_local)
        y = torch.zeros(targets.shape[0], num_local, dtype=dtype, device=targets.device)
        y.scatter_(-1, torch.where(here, targets, 0).unsqueeze(-1), here.to(dtype).unsqueeze(-1))
    else:
        y = targets.to(dtype)
    return native.smooth_labels(y, label_smoothing, num_classes)


def _general_block(a, labels, indices: bool, t1, t2, label_smoothing: float, num_iters, need_grad: bool,
                   reducer=native.LOCAL_ROWS, need_temperature_grads: bool = False):
    """(per-row loss, dL/da or None, per-row (dL/dt1, dL/dt2) [M, 2] or None) of a block, all from
    one solve."""
    log_p = native.tempered_log_softmax_rows(a, t2, num_iters, reducer, compact=False)  # a block: no compaction
    if indices:
        loss, grad = native.loss_and_grad_rows_indices(log_p, labels, label_smoothing, t1, t2, need_grad)
    else:
        loss, grad = native.loss_and_grad_rows(log_p, labels, t1, t2, need_grad, reducer)  # dense labels come smoothed
    if not need_temperature_grads:
        return loss, grad, None
    # the temperature terms read every class's label: a block of one-hot rows for class indices
    y = temperature.one_hot_labels(labels, a.shape[-1], label_smoothing, a.dtype) if indices else labels
    return loss, grad, temperature.loss_temperature_grads_rows(log_p, y, t1, t2, reducer)


def loss_and_grad(logits, labels, t1, t2, label_smoothing: float, num_iters, ignore_index: int,
                  need_grad: bool, grad_scale: torch.Tensor, reducer: native.LocalRows = native.LOCAL_ROWS,
                  class_offset: int = 0, num_classes: int | None = None, temperature_grads: torch.Tensor | None = None):
    """Per-row losses [N] (compute dtype; 0 for ignored rows, NaN for invalid class indices), the
    mask of kept rows [N], and ``grad_scale`` x dL/dlogits [N, C] in ``rows.stored_grad_dtype`` (the
    logits' dtype; float32 for float16 logits) or None.

    ``temperature_grads``: None, or an [N, 2] compute-dtype tensor that receives each row's
    (dL/dt1, dL/dt2) times the row's factor on its gradient (``grad_scale``: 0 for ignored rows,
    NaN for invalid class indices), from the same solve as the loss (``native/temperature.py``;
    defined for the converged normalization: ``num_iters`` None). The t1 = t2 = 1 shortcut is then
    bypassed (the general path gives the same values).

    ``logits`` [N, C] with unit class stride; ``labels`` dense [N, C] or class indices [N];
    temperatures as host floats; ``grad_scale`` a 0-d tensor (e.g. 1/count for "mean") or one
    factor per row [N] (e.g. the rows' weights).
    Each gradient element is computed in the compute dtype and rounded once into its stored dtype.
    Dense labels outside [0, 1] raise ValueError where ``checks_dense_labels`` says so.

    A class slice: ``logits`` [N, C_local] hold classes ``class_offset`` + [0, C_local) of
    ``num_classes`` (default: C_local, every class), dense labels are sliced like them, class
    indices are global, and ``reducer`` reduces the row statistics over the slices (on every rank
    with the same N, C and settings: each block's reductions are collectives).
    """
    t1, t2 = float(t1), float(t2)
    dtype = native.compute_dtype(logits.dtype)
    num_rows, num_local = logits.shape
    num_classes = num_local if num_classes is None else num_classes
    whole_rows = reducer.slices == 1
    indices = not labels.dtype.is_floating_point
    # The reduction's scale per row, applied in the same op that stores each block's gradient:
    # 0 for ignored rows and NaN for invalid class indices; every dense row is kept.
    kept, bad = kept_and_bad(labels, ignore_index, num_classes)  # a bad index: a NaN row
    row_scale = masked_scale(kept, bad, grad_scale, dtype)
    if not indices:
        targets = labels
    elif whole_rows:
        targets = torch.where(kept & ~bad, labels, 0).long()
    else:  # the target's index within this slice (-1: an ignored or bad row)
        targets = torch.where(kept & ~bad, labels.long() - class_offset, -1)
    need_temperature_grads = temperature_grads is not None
    cross_entropy = t1 == 1.0 and t2 == 1.0 and whole_rows and not need_temperature_grads
    grad = torch.empty_like(logits, dtype=stored_grad_dtype(logits.dtype)) if need_grad else None
    if cross_entropy:
        check_labels = not indices and checks_dense_labels(logits.device, t1, t2)
        loss = _cross_entropy(logits, targets, indices, label_smoothing, row_scale, grad, check_labels)
    else:
        loss = torch.empty(num_rows, dtype=dtype, device=logits.device)
        step = general_block_rows(num_classes, reducer.slices)
        for start in range(0, num_rows, step):
            block = slice(start, min(start + step, num_rows))
            y = _general_labels(targets[block], indices, whole_rows, label_smoothing, num_local, num_classes, dtype)
            loss[block], block_grad, block_dt = _general_block(logits[block].to(dtype), y, indices and whole_rows,
                                                               t1, t2, label_smoothing, num_iters, need_grad, reducer,
                                                               need_temperature_grads)
            if need_temperature_grads:
                torch.mul(block_dt, row_scale[block].unsqueeze(-1), out=temperature_grads[block])
            if need_grad:
                scale = row_scale[block].unsqueeze(-1)
                if grad.dtype == dtype:
                    torch.mul(block_grad, scale, out=grad[block])
                else:
                    grad[block] = block_grad.mul_(scale)  # the one rounding into the logits' dtype
    if cross_entropy:
        # Rows the shortcut returned non-finite (NaN/+inf logits, label mass on p = 0, a target
        # below the normal range): SPEC's general path, all of them at once (one host sync per call).
        redo = (~torch.isfinite(loss) & kept).nonzero().squeeze(-1)
        if redo.numel() > 0:
            y = _general_labels(targets[redo], indices, whole_rows, label_smoothing, num_local, num_classes, dtype)
            loss[redo], redo_grad, _ = _general_block(logits[redo].to(dtype), y, indices, t1, t2, label_smoothing,
                                                      num_iters, need_grad)
            if need_grad:
                grad[redo] = redo_grad.mul_(row_scale[redo].unsqueeze(-1)).to(grad.dtype)
    if indices:
        loss = torch.where(kept, torch.where(bad, math.nan, loss), 0.0)
        if (need_grad or need_temperature_grads) and not bool(kept.all()):
            # exactly 0 even where an ignored row's logits are not finite
            for per_row_output in (grad, temperature_grads):
                if per_row_output is not None:
                    per_row_output[~kept] = 0.0
    return loss, kept, grad


def grouped_loss_and_grad(logits, labels, t1, t2, label_smoothing: float, num_iters, ignore_index: int,
                          need_grad: bool, grad_scale: torch.Tensor, reducer: native.LocalRows = native.LOCAL_ROWS,
                          class_offset: int = 0, num_classes: int | None = None,
                          temperature_grads: torch.Tensor | None = None):
    """``loss_and_grad`` for temperatures that are floats, 0-d tensors or one value per row [N]:
    the rows of each distinct (t1, t2) are solved together (``temperature.temperature_groups``, one
    host read), their outputs written back in row order."""
    groups = temperature.temperature_groups(t1, t2)
    settings = (label_smoothing, num_iters, ignore_index, need_grad)
    slices = (reducer, class_offset, num_classes)
    if len(groups) == 1:
        (u1, u2), _ = groups[0]
        return loss_and_grad(logits, labels, u1, u2, *settings, grad_scale, *slices,
                             temperature_grads=temperature_grads)
    per_row = torch.empty(logits.shape[0], dtype=native.compute_dtype(logits.dtype), device=logits.device)
    grad = torch.empty_like(logits, dtype=stored_grad_dtype(logits.dtype)) if need_grad else None
    for (u1, u2), rows in groups:
        group_dt = None if temperature_grads is None else temperature_grads.new_empty(rows.shape[0], 2)
        group_scale = grad_scale[rows] if grad_scale.dim() else grad_scale
        per_row[rows], _, group_grad = loss_and_grad(logits[rows], labels[rows], u1, u2, *settings, group_scale,
                                                     *slices, temperature_grads=group_dt)
        if need_grad:
            grad[rows] = group_grad
        if group_dt is not None:
            temperature_grads[rows] = group_dt
    return per_row, kept_rows(labels, ignore_index), grad


def reduced_loss_and_grad(logits, labels, t1, t2, label_smoothing, num_iters, ignore_index: int, reduction: str,
                          need_grad: bool, reducer: native.LocalRows = native.LOCAL_ROWS, class_offset: int = 0,
                          num_classes: int | None = None, weights: torch.Tensor | None = None,
                          temperature_grads: torch.Tensor | None = None):
    """(the loss reduced by ``reduction``, dL/dlogits scaled by the reduction or None): ``loss_and_grad``
    with the reduction's factor and the reduction (``rows``), each row weighted by ``weights`` [N]
    when given. Temperatures and smoothing: floats or 0-d tensors (read to the host: free for CPU
    tensors, one sync on CUDA); temperatures may also hold one value per row [N]
    (``grouped_loss_and_grad``). ``temperature_grads``: None or the [N, 2] output that receives each
    row's (dL/dt1, dL/dt2) times its factor on the gradient (``loss_and_grad``)."""
    scale = grad_scale(kept_rows(labels, ignore_index), reduction, native.compute_dtype(logits.dtype), weights)
    per_row, kept, grad = grouped_loss_and_grad(logits, labels, t1, t2, float(label_smoothing), num_iters,
                                                ignore_index, need_grad, scale, reducer, class_offset, num_classes,
                                                temperature_grads)
    return reduce(per_row, kept, reduction, weights), grad
