"""PyTorch native backend: SPEC computed with plain torch ops (no Triton).

It is the CPU fallback, the backend for float64, and the ground truth the Triton kernels are
tested against. Functions here take flattened rows ``[N, C]`` in the compute dtype and return
plain tensors; the loss driver over row blocks is ``native/loss.py``, autograd lives in ``ops.py``.
The solver is the one described in ``kernels/README.md``.

Temperatures are read to the host once per call (Python floats or 0-d tensors are accepted):
that costs nothing for CPU tensors and lets each call take only the branch its t needs (t = 1 is
a plain logsumexp). On CUDA this backend is only the float64/explicit fallback, and the read is one
host sync per call.
"""

from __future__ import annotations

import math

import torch

from bitempered.bindings.common import validation as check
from bitempered.bindings.torch.rows import kept_rows
from bitempered.kernels.launch_config import MAX_PASSES  # every backend's cap (SPEC's grid needs at most 8)


class LocalRows:
    """Row reductions across ranks: the identity for rows that hold every class.

    The solver reduces each row statistic (the max, the packed per-pass sums) through such an
    object; ``vocab_parallel.GroupRows`` all-reduces over the process group that shards the
    classes, so the solver stays one.
    """

    slices = 1  # the slices each row's classes are split into (the same on every rank)

    def max(self, x: torch.Tensor) -> torch.Tensor:  # row maxima [N, 1]
        return x

    def sum(self, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:  # partial sums [N, 1], reduced together
        return parts


LOCAL_ROWS = LocalRows()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tolerance(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps


def shift_by_max(a: torch.Tensor, rows: LocalRows = LOCAL_ROWS) -> torch.Tensor:
    """a - max(a) per row; a +inf logit maps to 0 and the other classes to -inf (the limit)."""
    mx = rows.max(a.amax(dim=-1, keepdim=True))
    return torch.where(a == mx, torch.zeros_like(a), a - mx)


def log_t(x: torch.Tensor, t) -> torch.Tensor:
    """log_t(x) = (x^(1-t) - 1) / (1-t), accurate near t = 1."""
    return log_t_from_log(torch.log(x), t)


def exp_flushed(x: torch.Tensor) -> torch.Tensor:
    """exp(x), with results below ~4.5 x the smallest normal float flushed to 0 (what the GPU's
    ex2.approx.ftz does too). torch's CPU exp takes a slow path for subnormal results and for -inf
    or huge negative inputs (measured 4-9x slower per element); here every input reaching exp is
    in the fast range, for two cheap elementwise ops. Used where -inf log p (classes outside the
    finite support) and huge negative exponents are common."""
    floor = math.log(torch.finfo(x.dtype).tiny) + 1.0
    # Inputs below the floor give exp(floor) after the clamp; threshold_ zeroes every result up to
    # exp(floor + 0.5) (a margin no rounding of exp crosses) and keeps NaN, in one vectorized pass
    # (a boolean mask and masked_fill_ cost ~10x more on CPU).
    return torch.threshold_(torch.exp(x.clamp(min=floor)), math.exp(floor + 0.5), 0.0)


def _has_zero_p(log_p: torch.Tensor) -> bool:
    """Whether some p is exactly 0 (log p = -inf): a float reduction per row (cheaper than a
    boolean mask over N x C; a NaN row, NaN throughout, counts as none); always True while
    torch.compile traces (no data-dependent branch there)."""
    return torch.compiler.is_compiling() or bool(torch.isneginf(log_p.amin(dim=-1)).any())


def _exp_for(has_zero_p: bool):
    """The exp for powers of p: ``exp_flushed`` where some p is exactly 0 (log p = -inf, e.g.
    outside the finite support), plain ``torch.exp`` otherwise (cheaper on ordinary inputs)."""
    return exp_flushed if has_zero_p else torch.exp


def log_t_from_log(log_x: torch.Tensor, t) -> torch.Tensor:
    one_minus_t = 1.0 - float(t)
    if one_minus_t == 0.0:
        return log_x
    return torch.expm1(one_minus_t * log_x).div_(one_minus_t)


def _log_p_and_z(a0: torch.Tensor, y: torch.Tensor, one_minus_t: float):
    """(log p, z) at y, z = (1-t) a0 / c clamped to >= -1 (kernels/README.md), t != 1."""
    z = (a0 * (one_minus_t * torch.exp(one_minus_t * y))).clamp_(min=-1.0)
    log1p_z = torch.log1p(z)
    # log1p(z) / (1-t) - y in one pass (the solver runs this on every pass)
    return torch.add(-y, log1p_z, alpha=1.0 / one_minus_t, out=log1p_z), z


def _evaluate(a0: torch.Tensor, y: torch.Tensor, one_minus_t: float):
    """One solver pass at y: (log p, f = sum p, g = sum p / (1 + z)), t != 1."""
    log_p, z = _log_p_and_z(a0, y, one_minus_t)
    # t < 1: classes outside the support have log p = -inf, which torch's exp handles slowly
    p = exp_flushed(log_p) if one_minus_t > 0.0 else torch.exp(log_p)
    f = p.sum(dim=-1, keepdim=True)
    # where 1 + z = 0, p = 0 too: clamping the divisor keeps that term 0 instead of 0/0
    g = p.div_(z.add_(1.0).clamp_(min=torch.finfo(a0.dtype).tiny)).sum(dim=-1, keepdim=True)
    return log_p, f, g


class ShiftedRows:
    """The solver's row evaluations (``RowSums``) on max-shifted rows a0 [N, C] held in memory.

    It keeps each row's log p of its last evaluation, stored once, when the row leaves the working
    set (or at the end): ``log_p()`` after the solver returns. t != 1.
    """

    def __init__(self, a0: torch.Tensor, t: float):
        self.a0, self.one_minus_t = a0, 1.0 - t
        self.live, self.active = a0, None  # the rows still iterating (None: every row)
        self.last = None                   # log p of the live rows at their last evaluation
        self.stored = None                 # log p of the rows that left

    def support(self) -> torch.Tensor:
        if self.one_minus_t > 0.0:  # the classes that can have p > 0
            return (self.live > -1.0 / self.one_minus_t).sum(dim=-1, keepdim=True).to(self.a0.dtype)
        return torch.full((self.live.shape[0], 1), self.a0.shape[-1], dtype=self.a0.dtype, device=self.a0.device)

    def sums(self, y, keep=None, support=False):
        if keep is not None:
            self._drop(keep)
        count = self.support() if support else None
        self.last, f, g = _evaluate(self.live, y, self.one_minus_t)
        return (f, g, count) if support else (f, g)

    def _drop(self, keep: torch.Tensor) -> None:
        if self.active is None:
            self.active = torch.arange(self.a0.shape[0], device=self.a0.device)
            self.stored = torch.empty_like(self.a0)
        self.stored.index_copy_(0, self.active[~keep], self.last[~keep])
        self.active, self.live, self.last = self.active[keep], self.live[keep], self.last[keep]

    def log_p(self) -> torch.Tensor:
        if self.active is None:  # every row ran every pass: no copy
            return self.last
        return self.stored.index_copy_(0, self.active, self.last)


def _newton_update(y, f, g, lo, hi, lo_evaluated, one_minus_t: float):
    """One safeguarded step of kernels/README.md for per-row scalars; returns the new state."""
    r = f - 1.0
    log_f, f_over_g = torch.log(f), f / g
    above = r > 0
    # Newton on f^(1-t) in c: from a point with f > 1 it never passes the root (convexity).
    y_safe = y - torch.log1p(f_over_g * torch.expm1(-one_minus_t * log_f)) / one_minus_t
    lo = torch.where(above, torch.minimum(torch.maximum(torch.maximum(lo, y), y_safe), hi), lo)
    lo_evaluated = torch.where(above, y_safe <= y, lo_evaluated)
    hi = torch.where(above, hi, torch.minimum(hi, y))
    y_newton = y + log_f * f_over_g  # Newton on log f in y: fast, but may leave the bracket
    inside = (y_newton > lo) & (y_newton < hi)
    y_new = torch.where(inside, y_newton, torch.where(lo_evaluated, 0.5 * (lo + hi), lo))
    return y_new, lo, hi, lo_evaluated


def solve_normalizers(row_sums, t, num_rows: int, dtype, device, rows: LocalRows = LOCAL_ROWS,
                      compact: bool = True):
    """THE solver of every torch path: the safeguarded Newton iteration of kernels/README.md on
    per-row scalars, driven by an evaluation object. Returns (y [N, 1], passes [N, 1] int32): each
    row's y = -log p_max at its last evaluation (the y its log p is taken at).

    ``row_sums`` evaluates this rank's classes (``ShiftedRows`` on a0 in memory; the vocab-parallel
    Triton kernels, ``vocab_parallel.KernelRows``):
        ``sums(y, keep=None, support=False)`` -> (f, g[, D]): the partial sums f = sum p and
        g = sum p / (1 + z) at y [M, 1] of the M rows still iterating, and (``support``) the
        support size D (t < 1; the class count for t >= 1). ``keep``: when compacting and some
        rows finished, the rows of the previous working set that stay (drop the others first).
    ``rows`` reduces those sums across ranks (classes sharded): one packed (f, g) reduction per pass;
    D rides along with the first one (the bracket's upper end log D is first needed by the first
    update). All ranks get the same reduced sums, so they take the same decisions.

    ``compact`` drops finished rows from the working set; otherwise (torch.compile, which would
    recompile on a shrinking row count, or an evaluator that always runs every row) finished rows
    are frozen at their y and evaluated again (same values). The caller decides it: evaluated in
    here, ``torch.compiler.is_compiling()`` was seen False under torch.compile (cause not pinned
    down; graph breaks precede it), and dynamo then traced the compact path. t = 1 is one pass.
    """
    t = float(t)
    zeros = torch.zeros(num_rows, 1, dtype=dtype, device=device)
    if t == 1.0:  # softmax: y = log sum exp(a0) exactly (the max of a0 is 0: the sum is >= 1)
        f, _ = rows.sum(*row_sums.sums(zeros))
        return torch.log(f), torch.ones(num_rows, 1, dtype=torch.int32, device=device)
    one_minus_t = 1.0 - t
    tol = tolerance(dtype)
    ulp4 = 4 * torch.finfo(dtype).eps
    passes = torch.zeros(num_rows, 1, dtype=torch.int32, device=device)
    y_out = zeros.clone()
    active = torch.arange(num_rows, device=device)
    y, lo, hi = zeros, zeros, zeros
    lo_evaluated = torch.zeros_like(y, dtype=torch.bool)
    finished = torch.zeros_like(lo_evaluated)
    keep = None  # compacting: the rows of the last working set that stay, when some leave
    for step in range(MAX_PASSES):
        if step == 0:
            f, g, support = rows.sum(*row_sums.sums(y, support=True))
            hi = torch.log(support.clamp_(min=1.0))
        else:
            f, g = rows.sum(*row_sums.sums(y, keep))
        r = f - 1.0
        done = (r.abs() <= tol) | ~torch.isfinite(r)  # a NaN row stays NaN
        y_new, lo, hi, lo_evaluated = _newton_update(y, f, g, lo, hi, lo_evaluated, one_minus_t)
        done |= (y_new - y).abs() <= ulp4 * torch.clamp(y.abs(), min=1.0)
        if compact:
            passes.index_add_(0, active, torch.ones_like(active, dtype=torch.int32).unsqueeze(-1))
            keep = ~done.squeeze(-1)
            staying = int(keep.sum())  # the one host read of the pass
            if step == MAX_PASSES - 1 or staying == 0:
                y_out.index_copy_(0, active, y)
                break
            if staying < active.numel():
                y_out.index_copy_(0, active[~keep], y[~keep])
                active = active[keep]
                y, lo, hi, lo_evaluated = y_new[keep], lo[keep], hi[keep], lo_evaluated[keep]
            else:
                y, keep = y_new, None
        else:
            passes += (~finished).int()
            finished |= done
            y_out = y
            y = torch.where(finished, y, y_new)
            if bool(finished.all()):
                break
    return y_out, passes


def original_normalizers(row_sums, t, num_iters: int, num_rows: int, dtype, device,
                         rows: LocalRows = LOCAL_ROWS) -> torch.Tensor:
    """y [N, 1] of SPEC's original algorithm with exactly ``num_iters`` steps, in the solver's
    variable (as the kernels' ORIGINAL mode, ``kernels/tempered_math.solve``):

    - t > 1: the fixed point z <- a0 Z^(1-t), Z = sum exp_t(z), is exactly y <- y + log f(y) from
      y = 0 (y = log Z), run num_iters + 1 times (the original's last partition sum included);
    - t = 1: y = log f(0), the logsumexp;
    - t < 1: bisection of lam in [0, -log_t(1/D)] on f < 1, at y(lam) = -log(1 - (1-t) lam)/(1-t),
      ending at the bracket's midpoint.

    ``row_sums`` and ``rows`` as in ``solve_normalizers`` (every row, every step: no ``keep``).
    """
    t = float(t)
    y = torch.zeros(num_rows, 1, dtype=dtype, device=device)
    if t >= 1.0:
        for _ in range(1 if t == 1.0 else num_iters + 1):
            f, _ = rows.sum(*row_sums.sums(y))
            y = y + torch.log(f)
        return y
    one_minus_t = 1.0 - t
    (support,) = rows.sum(row_sums.support())
    lo = torch.zeros_like(y)
    hi = -log_t(1.0 / support.clamp(min=1.0), t)

    def y_of(lam):  # y(lam) = -log(1 - (1-t) lam) / (1-t)
        return -torch.log1p(-one_minus_t * lam) / one_minus_t

    for _ in range(num_iters):
        mid = 0.5 * (lo + hi)
        f, _ = rows.sum(*row_sums.sums(y_of(mid)))
        below = f < 1.0
        hi = torch.where(below, mid, hi)
        lo = torch.where(below, lo, mid)
    return y_of(0.5 * (lo + hi))


def solve_converged(a0: torch.Tensor, t, rows: LocalRows = LOCAL_ROWS, compact: bool | None = None):
    """Converged log-probabilities for max-shifted rows ``a0`` [N, C]; returns (log_p, passes).

    ``solve_normalizers`` on the rows in memory. With ``compact`` (default: unless torch.compile
    traces) rows that have converged drop out of the working set, so each pass only touches the
    rows still iterating; each row's log p is stored once. On small row blocks (the loss driver)
    the compaction's indexing costs more than the passes it saves (measured on CPU: ~17%), so
    there it is off.
    """
    t = float(t)
    num_rows = a0.shape[0]
    if t == 1.0:  # softmax: the normalizer is exact in one pass (the max of a0 is 0: the sum is >= 1)
        (total,) = rows.sum(torch.exp(a0).sum(dim=-1, keepdim=True))
        return a0 - torch.log(total), torch.ones(num_rows, 1, dtype=torch.int32, device=a0.device)
    row_sums = ShiftedRows(a0, t)
    if compact is None:
        compact = not torch.compiler.is_compiling()
    _, passes = solve_normalizers(row_sums, t, num_rows, a0.dtype, a0.device, rows, compact=compact)
    return row_sums.log_p(), passes


def tempered_log_softmax_rows(a: torch.Tensor, t, num_iters: int | None, rows: LocalRows = LOCAL_ROWS,
                              compact: bool | None = None):
    """log of SPEC's tempered softmax of rows ``a`` [N, C] (compute dtype); -inf where p = 0.

    ``rows`` reduces row statistics across ranks when the classes are sharded (``LocalRows``);
    ``compact`` as in ``solve_converged``.
    """
    a0 = shift_by_max(a, rows)
    t = float(t)
    if num_iters is None or t == 1.0:  # (at t = 1 the original algorithm is the same logsumexp)
        return solve_converged(a0, t, rows, compact)[0]
    y = original_normalizers(ShiftedRows(a0, t), t, num_iters, a0.shape[0], a0.dtype, a0.device, rows)
    return _log_p_and_z(a0, y, 1.0 - t)[0]


def smoothing_coefficients(label_smoothing: float, num_classes: int) -> tuple[float, float]:
    """SPEC's smoothing as ``keep * y + floor``: (1, 0) without smoothing."""
    if label_smoothing == 0.0:
        return 1.0, 0.0
    return 1.0 - num_classes / (num_classes - 1) * label_smoothing, label_smoothing / (num_classes - 1)


def smooth_labels(y: torch.Tensor, label_smoothing: float, num_classes: int | None = None) -> torch.Tensor:
    """SPEC's smoothing over ``num_classes`` classes (default: y's last axis; a vocab-parallel slice
    passes the GLOBAL count, Megatron's partition-local count being a known bug)."""
    if label_smoothing == 0.0:
        return y
    keep, floor = smoothing_coefficients(label_smoothing, y.shape[-1] if num_classes is None else num_classes)
    return keep * y + floor


def check_dense_label_values(labels: torch.Tensor) -> None:
    """ValueError naming ``labels`` unless every value lies in [0, 1] (concrete values: one pass,
    NaN propagating to both extremes)."""
    low, high = (float(v) for v in torch.aminmax(labels))
    check.check_dense_label_range(low, high, math.isnan(low) or math.isnan(high), "labels")


def dense_labels_from_indices(indices: torch.Tensor, num_classes: int, dtype, ignore_index: int):
    """One-hot rows for class indices (ignored rows all zero) and the mask of kept rows."""
    kept = kept_rows(indices, ignore_index)
    safe = torch.where(kept, indices, 0).long()
    onehot = torch.zeros(indices.shape + (num_classes,), dtype=dtype, device=indices.device)
    onehot.scatter_(-1, safe.unsqueeze(-1), 1.0)
    return onehot, kept


def _zero_where_p_is_zero_(d: torch.Tensor, log_p: torch.Tensor, has_zero_p: bool) -> torch.Tensor:
    """d = 0 where p is exactly 0 (SPEC "Zero versus underflow"): log p = -inf, i.e. outside the
    finite support (t2 < 1) or a -inf logit (the formula would give 0 * inf there). A p that merely
    underflows keeps p^(t2 - t1) from its finite log p, so a confidently wrong row still gets
    d_target = -y at t1 = t2 (cross-entropy's gradient). ``has_zero_p``: the caller's
    ``_has_zero_p(log_p)`` (the fill is skipped when no p is 0)."""
    if has_zero_p:
        d.masked_fill_(torch.isneginf(log_p), 0.0)
    return d


def loss_and_grad_rows(log_p: torch.Tensor, y: torch.Tensor, t1, t2, need_grad: bool,
                       rows: LocalRows = LOCAL_ROWS):
    """Per-row loss [N] and dL/da for unit upstream gradient [N, C] (or None).

    Its row sums (loss, sum e, sum d) are reduced by ``rows`` in one step (classes sharded).
    """
    t1, t2 = float(t1), float(t2)
    two_minus_t1 = 2.0 - t1
    # y log_t1(y) - y^(2-t1)/(2-t1) - y log_t1(p) + p^(2-t1)/(2-t1), with y log(.) = 0 at y = 0
    y_log_ratio = torch.where(y > 0, y * (log_t(y, t1) - log_t_from_log(log_p, t1)), 0.0)
    terms = y_log_ratio.sub_(y.pow(two_minus_t1).div_(two_minus_t1))
    has_zero_p = _has_zero_p(log_p)  # one check (a reduction and a host read) for both uses below
    exp = _exp_for(has_zero_p)
    terms.add_(exp(two_minus_t1 * log_p).div_(two_minus_t1))
    if not need_grad:
        (loss,) = rows.sum(terms.sum(dim=-1, keepdim=True))
        return loss.squeeze(-1), None
    p = exp(log_p)
    forget = exp((t2 - t1) * log_p.clamp(min=torch.finfo(log_p.dtype).min))
    label_part = torch.where(y > 0, y * forget, 0.0) if t2 < t1 else y * forget  # (0 x inf of y = 0: 0)
    d = _zero_where_p_is_zero_(_p_part(p, log_p, t2 - t1, exp).sub_(label_part), log_p, has_zero_p)
    escort = exp(t2 * log_p)
    loss, escort_sum, d_sum = rows.sum(terms.sum(dim=-1, keepdim=True), escort.sum(dim=-1, keepdim=True),
                                       d.sum(dim=-1, keepdim=True))
    escort.div_(escort_sum)
    return loss.squeeze(-1), d.sub_(escort.mul_(d_sum))


def _p_part(p: torch.Tensor, log_p: torch.Tensor, power: float, exp) -> torch.Tensor:
    """p x p^power of the gradient's (p - y) p^power, a new tensor: at power < 0 (t2 < t1) from log p
    as p^(1 + power), since p^power of an underflowed p may overflow and 0 x inf is NaN."""
    if power >= 0.0:
        return p * exp(power * log_p)
    return exp((1.0 + power) * log_p.clamp(min=torch.finfo(log_p.dtype).min))


def _label_term(value: float, t1: float) -> float:
    """y log_t1(y) - y^(2-t1) / (2-t1) of one label value (0 at y = 0)."""
    if value == 0.0:
        return 0.0
    log_t1 = math.log(value) if t1 == 1.0 else math.expm1((1.0 - t1) * math.log(value)) / (1.0 - t1)
    return value * log_t1 - value ** (2.0 - t1) / (2.0 - t1)


def loss_and_grad_rows_indices(log_p: torch.Tensor, indices: torch.Tensor, label_smoothing: float, t1, t2,
                               need_grad: bool):
    """``loss_and_grad_rows`` for one-hot (smoothed) rows given by class indices [N] in [0, C).

    Every label is one of two values (target ``on``, others ``off``), so the label terms are
    per-row constants and no dense label array is built.
    """
    t1, t2 = float(t1), float(t2)
    num_classes = log_p.shape[-1]
    off = label_smoothing / (num_classes - 1) if label_smoothing > 0.0 else 0.0
    on = 1.0 - label_smoothing if label_smoothing > 0.0 else 1.0
    two_minus_t1 = 2.0 - t1
    target = indices.long().unsqueeze(-1)
    log_p_target = log_p.gather(-1, target).squeeze(-1)
    labels_part = _label_term(on, t1) + (num_classes - 1) * _label_term(off, t1)
    loss = labels_part - (on - off) * log_t_from_log(log_p_target, t1)
    if off > 0.0:
        loss = loss - off * log_t_from_log(log_p, t1).sum(dim=-1)
    has_zero_p = _has_zero_p(log_p)  # one check (a reduction and a host read) for both uses below
    exp = _exp_for(has_zero_p)
    p = exp(log_p)
    # p^(2-t1); the powers below equal p (or 1) in the common t1 = 1 / t2 = t1 / t2 = 1 cases
    p_power = p if t1 == 1.0 else exp(two_minus_t1 * log_p)
    loss = loss + p_power.sum(dim=-1) / two_minus_t1
    if not need_grad:
        return loss, None
    if t2 == t1:
        d = p - off
        d.scatter_add_(-1, target, torch.full_like(target, -(on - off), dtype=d.dtype))
    else:
        forget = exp((t2 - t1) * log_p.clamp(min=torch.finfo(log_p.dtype).min))
        d = _p_part(p, log_p, t2 - t1, exp)
        if off > 0.0:
            d.sub_(off * forget)
        d.scatter_add_(-1, target, -(on - off) * forget.gather(-1, target))
    _zero_where_p_is_zero_(d, log_p, has_zero_p)
    escort = p.clone() if t2 == 1.0 else exp(t2 * log_p)
    escort.div_(escort.sum(dim=-1, keepdim=True))
    return loss, d.sub_(escort.mul_(d.sum(dim=-1, keepdim=True)))


def tempered_softmax_vjp_rows(p: torch.Tensor, grad_p: torch.Tensor, t, rows: LocalRows = LOCAL_ROWS):
    """Vector-Jacobian product of the tempered softmax: w - e * sum(w), w = g p^t, e = p^t / sum p^t.
    ``t``: a float or 0-d tensor, or one value per row [N, 1] (elementwise math: no grouping)."""
    t = t if isinstance(t, torch.Tensor) and t.dim() > 0 else float(t)
    p_t = torch.where(p > 0, torch.exp(t * torch.log(p)), 0.0)
    w = grad_p * p_t
    sum_p_t, sum_w = rows.sum(p_t.sum(dim=-1, keepdim=True), w.sum(dim=-1, keepdim=True))
    return w - p_t / sum_p_t * sum_w


def exp_t(u: torch.Tensor, t) -> torch.Tensor:
    """exp_t(u) = [1 + (1-t) u]_+^(1/(1-t)), accurate near t = 1 (the inverse of ``log_t`` on its
    range); 0 outside the finite support (t < 1). Out of place."""
    one_minus_t = 1.0 - float(t)
    if one_minus_t == 0.0:
        return torch.exp(u)
    return torch.exp(torch.log1p((one_minus_t * u).clamp(min=-1.0)) / one_minus_t)
