"""Shared @triton.jit device math: accurate elementary functions, tempered helpers and THE solver.

Every kernel in this folder calls these helpers; there is one normalization solver (``solve``),
used on a tile held in registers (``CHUNKED=False``) or streamed over a long row in chunks
(``CHUNKED=True``). The algorithm is the one in ``kernels/README.md``, written in base 2:

    Y = -log2(p_max) = y / ln 2,   c = 2^(-(1-t) Y) = p_max^(1-t),   z_i = (1-t) a0_i / c
    log2 p_i = -Y + log2(1 + z_i) / (1-t)          (-Y + a0_i log2(e) at t = 1)
    f = sum p_i,  g = sum p_i / (1 + z_i) = c sum p_i^t,  y_newton = Y + log2(f) f / g

plus the README's monotone safeguard step y_safe and bracket, from Y = 0 on a tile in registers,
from the max sweep's start estimate with Halley steps on a streamed row (see ``newton_step``).
Base 2 makes every per-element exponential one ``ex2`` with no multiply-and-round in front of
it. All tiles are 2-D ``[rows, cols]``; per-row values are ``[rows, 1]`` so they broadcast.

Precision notes (what each helper lowers to with Triton 3.9 on NVIDIA, checked in the PTX):
``tl.exp2`` -> ``ex2.approx.ftz.f32`` (~2 ulp relative), ``tl.log2`` -> libdevice ``log2f``
(~1 ulp, FMA-only: no SFU op), ``/`` -> ``div.full.f32`` (one ``rcp`` + FMAs). Nothing here
calls libdevice explicitly, so the Triton interpreter (numpy) runs the same code; it does NOT
reproduce ex2.approx's rounding or flush-to-zero, which only the GPU run can check.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
INF = tl.constexpr(float("inf"))
# Stop rules of kernels/README.md (float32): |sum p - 1| <= TOL, or a Newton step below 4 ulp.
TOL = tl.constexpr(1e-6)
ULP4 = tl.constexpr(4.0 * 2.0**-23)
# Cap of the start estimate's in-register solve (about 4 steps on SPEC's grid, 9 at worst).
START_ITERS = tl.constexpr(12)


# --------------------------------------------------------------------------------------------
# Elementary functions
# --------------------------------------------------------------------------------------------

@triton.jit
def log2_1p(z):
    """(log2(1 + z), 1 / (1 + z)) for z >= -1, accurate to a few ulp also for tiny |z|.

    u = 1 + z rounds; the exact rounding error (z - (u - 1)) enters as a first-order
    correction (z - (u - 1)) / u. The reciprocal is returned because the solver needs
    p / (1 + z) anyway: log1p costs one lg2 (FMA-only libdevice) plus one rcp, shared.
    Where 1 + z is 0 or +inf the reciprocal is returned as 1 (the caller's p is 0 there).
    """
    u = 1.0 + z
    finite = (u > 0.0) & (u < INF)
    rinv = 1.0 / tl.where(finite, u, 1.0)
    corr = tl.where(finite, (z - (u - 1.0)) * rinv, 0.0)
    return tl.log2(u) + corr * LOG2E, rinv


@triton.jit
def expm1_series(x):
    """e^x - 1 by its Taylor series to degree 9: truncation < 1e-8 relative for |x| < ln 2."""
    poly = 1.0 / 362880.0
    poly = poly * x + 1.0 / 40320.0
    poly = poly * x + 1.0 / 5040.0
    poly = poly * x + 1.0 / 720.0
    poly = poly * x + 1.0 / 120.0
    poly = poly * x + 1.0 / 24.0
    poly = poly * x + 1.0 / 6.0
    poly = poly * x + 0.5
    poly = poly * x + 1.0
    return poly * x


@triton.jit
def exp2m1(w):
    """2^w - 1, accurate for small |w| (needed by log_t near t = 1).

    |w| < 1: the series in x = w ln 2; otherwise exp2(w) - 1, where the ex2 error is amplified at
    most 2x. One ex2 + 10 FMAs.
    """
    return tl.where(tl.abs(w) < 1.0, expm1_series(w * LN2), tl.exp2(w) - 1.0)


@triton.jit
def exp2_accurate(w):
    """2^w to ~1 ulp without ex2.approx: for per-row scalars (c = p_max^(1-t)) only.

    2^w = 2^n 2^f with n = round(w), |f| <= 1/2: 2^f = 1 + expm1_series(f ln 2), 2^n built from
    exponent bits (n clamped to the normal range).
    """
    n = tl.floor(w + 0.5)
    poly = 1.0 + expm1_series((w - n) * LN2)
    n_int = tl.minimum(tl.maximum(n, -126.0), 127.0).to(tl.int32)
    scale = ((n_int + 127) << 23).to(tl.float32, bitcast=True)
    # outside the normal range (|c| never gets there for valid inputs) fall back to ex2
    return tl.where((w > -126.0) & (w < 127.0), poly * scale, tl.exp2(w))


@triton.jit
def safe_reciprocal(x):
    """1 / x, and 0 where x == 0 (used for 1/(1-t) next to an explicit t == 1 branch)."""
    return tl.where(x == 0.0, 0.0, 1.0 / tl.where(x == 0.0, 1.0, x))


@triton.jit
def log_t_from_log2(log2_x, one_minus_t, inv_one_minus_t):
    """log_t(x) = (x^(1-t) - 1) / (1-t) from log2(x); log(x) at t = 1 (continuous)."""
    tempered = exp2m1(one_minus_t * log2_x) * inv_one_minus_t
    return tl.where(one_minus_t == 0.0, log2_x * LN2, tempered)


# --------------------------------------------------------------------------------------------
# Row set-up
# --------------------------------------------------------------------------------------------

@triton.jit
def nan_max(a, axis: tl.constexpr):
    """Row maximum that is NaN when the row holds a NaN (so the whole row turns NaN)."""
    mx = tl.max(a, axis=axis, keep_dims=True)
    has_nan = tl.max((a != a).to(tl.int32), axis=axis, keep_dims=True) > 0
    return tl.where(has_nan, float("nan"), mx)


@triton.jit
def shift(a, mx, mask):
    """a - max(a): a +inf logit becomes 0 and every other class -inf (the limit); -inf off mask."""
    return tl.where(mask, tl.where(a == mx, 0.0, a - mx), -INF)


@triton.jit
def row_block(n_inner, BLOCK_ROWS: tl.constexpr):
    """This program's rows: BLOCK_ROWS consecutive inner positions of one outer index.

    The rows of logits with the class axis removed are (outer, inner) pairs in row-major order:
    for rows [N, C], outer 0 and inner the row; for F.cross_entropy's (N, C, H, W), outer n and
    inner h W + w. Consecutive inner positions make a tile contiguous along its rows when the
    classes are strided (NCHW: class stride H W, inner stride 1), so its loads coalesce across
    positions. The grid has n_outer x cdiv(n_inner, BLOCK_ROWS) programs. Returns (rows: linear
    row numbers for per-row inputs/outputs, int64 [BLOCK_ROWS, 1]; row mask; outer: int64 scalar;
    inner: int64 [BLOCK_ROWS, 1]); a tensor's row offset is outer * its outer stride + inner * its
    inner stride.
    """
    blocks = tl.cdiv(n_inner, BLOCK_ROWS)
    pid = tl.program_id(0)
    outer = (pid // blocks).to(tl.int64)
    inner = ((pid % blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]).to(tl.int64)
    return outer * n_inner + inner, inner < n_inner, outer, inner


@triton.jit
def program_value(ptr, stride_row, n_inner, BLOCK_ROWS: tl.constexpr):
    """A runtime value of this program's rows (a temperature): one value for every row
    (``stride_row`` 0), or one per row (``stride_row`` 1; the launcher then runs one row per program,
    BLOCK_ROWS = 1). Loaded as a scalar either way, so the solver's branches on it (t = 1, the
    support of t < 1) stay uniform per program and cost nothing per row."""
    blocks = tl.cdiv(n_inner, BLOCK_ROWS)
    pid = tl.program_id(0)
    first_row = (pid // blocks).to(tl.int64) * n_inner + (pid % blocks) * BLOCK_ROWS
    return tl.load(ptr + first_row * stride_row)


@triton.jit
def load_shifted(row_ptr, stride_class, row_mask, cols, n_cols, mx):
    """Loads one chunk of rows (native dtype -> fp32) shifted by the row max; returns (a0, mask).
    ``stride_class``: elements between classes (1 for rows; H x W for F.cross_entropy's NCHW)."""
    mask = row_mask & (cols < n_cols)
    a = tl.load(row_ptr + cols * stride_class, mask=mask, other=-INF).to(tl.float32)
    return shift(a, mx, mask), mask


@triton.jit
def row_max_chunked(row_ptr, stride_class, row_mask, n_cols, one_minus_t, inv_one_minus_t,
                    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """The first sweep over a long row: (max, Y_start, n_pos, f0), NaN-propagating max; n_pos =
    #{p > 0} (the +inf logits if any, else the finite ones).

    At t == 1 it is also the solver's first pass, online: f0 = sum p at Y = 0, i.e.
    sum 2^((a - max) log2 e), rescaled whenever the running max grows, and Y_start = log2 f0 is
    the root (f0 itself is for the vocab-parallel max sweep, which adds the slices' f0; 0 at
    t != 1). At t != 1 the sum at Y = 0 depends on the final max, so it needs its own sweep; the
    sweep keeps, per lane of the chunk, the two largest logits it saw and one sampled logit, and
    ``start_estimate`` solves the row on them: the solver's first pass starts at that Y
    (kernels/README.md, "Start estimate"; ALU only per element, no special-function op).
    """
    cols = tl.arange(0, BLOCK_COLS)[None, :]
    mx = tl.full([BLOCK_ROWS, 1], -INF, tl.float32)
    f0 = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    n_finite = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    n_pos_inf = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    top1 = tl.full([BLOCK_ROWS, BLOCK_COLS], -INF, tl.float32)
    top2 = tl.full([BLOCK_ROWS, BLOCK_COLS], -INF, tl.float32)
    sample = tl.full([BLOCK_ROWS, BLOCK_COLS], -INF, tl.float32)
    sample_rank = tl.zeros([BLOCK_ROWS, BLOCK_COLS], tl.int32)
    # lane j samples chunk j n_chunks / BLOCK_COLS: one logit per lane, in n_chunks evenly spread
    # runs of about BLOCK_COLS / n_chunks classes (recomputed per chunk: a shift, no tile held)
    n_chunks = tl.cdiv(n_cols, BLOCK_COLS)
    for start in range(0, n_cols, BLOCK_COLS):
        mask = row_mask & (start + cols < n_cols)
        a = tl.load(row_ptr + (start + cols) * stride_class, mask=mask, other=-INF).to(tl.float32)
        chunk_max = nan_max(a, 1)
        # maximum() may drop a NaN operand: keep NaN sticky explicitly
        has_nan = (mx != mx) | (chunk_max != chunk_max)
        new_max = tl.where(has_nan, float("nan"), tl.maximum(mx, chunk_max))
        if one_minus_t == 0.0:
            rescale = tl.where(new_max == mx, 1.0, tl.exp2((mx - new_max) * LOG2E))
            chunk_sum = tl.sum(tl.exp2(shift(a, new_max, mask) * LOG2E), axis=1, keep_dims=True)
            f0 = f0 * rescale + chunk_sum
        else:
            above1 = a > top1
            above2 = a > top2
            top2 = tl.where(above1, top1, tl.where(above2, a, top2))
            top1 = tl.where(above1, a, top1)
            # where the sampled logit ranks in its lane: 1 or 2 (one of the tops), 0 (neither);
            # by position, so a tie with a top does not hide it
            sampled = (cols * n_chunks) // BLOCK_COLS == start // BLOCK_COLS
            sample = tl.where(sampled, a, sample)
            pushed_down = tl.where(above1, tl.where(sample_rank == 1, 2, 0),
                                   tl.where(above2 & (sample_rank == 2), 0, sample_rank))
            sample_rank = tl.where(sampled, tl.where(above1, 1, tl.where(above2, 2, 0)), pushed_down)
        mx = new_max
        n_finite += tl.sum(((a > -INF) & (a < INF)).to(tl.float32), axis=1, keep_dims=True)
        n_pos_inf += tl.sum((a == INF).to(tl.float32), axis=1, keep_dims=True)
    n_pos = tl.where(n_pos_inf > 0.0, n_pos_inf, n_finite)
    y_start = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    if one_minus_t == 0.0:
        y_start = tl.log2(f0)
    else:
        y_start = start_estimate(top1, top2, tl.where(sample_rank > 0, -INF, sample), mx, n_pos, one_minus_t,
                                 inv_one_minus_t)
    return mx, y_start, n_pos, f0


@triton.jit
def tile_sums(a0, y2, one_minus_t, inv_one_minus_t):
    """(sum p, sum q, h) of one max-shifted tile at Y (``evaluate_halley``)."""
    _log2_p, p, q, r = evaluate_halley(a0, y2, one_minus_t, inv_one_minus_t)
    return tl.sum(p, axis=1, keep_dims=True), tl.sum(q, axis=1, keep_dims=True), tl.sum(r, axis=1, keep_dims=True)


@triton.jit
def estimate_sums(y2, top1, top2, sample, weight, one_minus_t, inv_one_minus_t):
    """(f, g, h) of ``start_estimate``'s row model at Y: the lanes' two largest logits exactly,
    the other logits as ``weight`` x the sampled ones (all max-shifted; -inf where not used)."""
    f = tl.zeros_like(y2)
    g = tl.zeros_like(y2)
    h = tl.zeros_like(y2)
    for k in range(3):  # a loop, not unrolled: one tile's evaluation live at a time (registers)
        tile = tl.where(k == 0, top1, tl.where(k == 1, top2, sample))
        tile_f, tile_g, tile_h = tile_sums(tile, y2, one_minus_t, inv_one_minus_t)
        w = tl.where(k == 2, weight, 1.0)
        f += w * tile_f
        g += w * tile_g
        h += w * tile_h
    return f, g, h


@triton.jit
def start_estimate(top1, top2, sample, mx, n_pos, one_minus_t, inv_one_minus_t):
    """Y_start of a long row at t != 1 (kernels/README.md, "Start estimate"), from the max sweep's
    per-lane tiles: the two largest logits of every lane (which hold the row's top logits, those
    that set the root at t < 1) count exactly; ``sample`` holds each lane's sampled logit where
    it is not one of those two (-inf elsewhere), each standing for (n_pos - #tops) / #samples of
    the other logits. The solver (``newton_step`` with Halley steps) runs on that model in
    registers; its root is within ~1e-2 of the row's on SPEC's grid (exact when the row has at
    most two chunks), so the streamed passes start next to the root."""
    a_top1 = shift(top1, mx, top1 > -INF)
    a_top2 = shift(top2, mx, top2 > -INF)
    a_sample = shift(sample, mx, sample > -INF)
    n_tops = tl.sum((a_top1 > -INF).to(tl.float32) + (a_top2 > -INF).to(tl.float32), axis=1, keep_dims=True)
    n_samples = tl.sum((a_sample > -INF).to(tl.float32), axis=1, keep_dims=True)
    weight = tl.where(n_samples > 0.0, tl.maximum(n_pos - n_tops, 0.0) / tl.maximum(n_samples, 1.0), 0.0)
    zero = tl.zeros_like(mx)
    y2 = zero
    lo = zero
    y_max = tl.log2(tl.maximum(n_pos, 1.0))  # every p <= 2^-Y: the model's root is below log2 n_pos
    hi = y_max
    lo_evaluated = zero != zero
    done = mx != mx  # a NaN row: its passes turn it NaN
    it = 0
    n_active = tl.sum((~done).to(tl.int32))
    while (it < START_ITERS) & (n_active > 0):
        f, g, h = estimate_sums(y2, a_top1, a_top2, a_sample, weight, one_minus_t, inv_one_minus_t)
        y2, lo, hi, lo_evaluated, done = newton_step(y2, f, g, h, lo, hi, lo_evaluated, done, one_minus_t,
                                                     inv_one_minus_t, True)
        it += 1
        n_active = tl.sum((~done).to(tl.int32))
    return tl.where(y2 == y2, tl.minimum(tl.maximum(y2, 0.0), y_max), 0.0)


# --------------------------------------------------------------------------------------------
# The solver (kernels/README.md), shared by every kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def evaluate(a0, y2, one_minus_t, inv_one_minus_t):
    """One pass at Y = -log2 p_max (per row): returns (log2 p, p, q = p / (1 + z)) per element.

    SFU cost per element: one rcp (inside log2_1p) and one ex2; lg2 is FMA-only libdevice.
    At t = 1, z = 0 and q = p (no special case except the t = 1 limit of log1p(z)/(1-t)).
    ``evaluate_halley``'s fourth output is unused here and compiled away.
    """
    log2_p, p, q, _ = evaluate_halley(a0, y2, one_minus_t, inv_one_minus_t)
    return log2_p, p, q


@triton.jit
def evaluate_halley(a0, y2, one_minus_t, inv_one_minus_t):
    """``evaluate`` plus r = q (1 + (1-t) z) / (1 + z) per element, whose sum h gives the second
    derivative of f: d2f/dY2 = ln(2)^2 h (df/dY = -ln 2 g). FMAs only: no special-function op."""
    c = exp2_accurate(-one_minus_t * y2)
    z = a0 * (one_minus_t / c)
    z = tl.where(z < -1.0, -1.0, z)  # clamp, keeping NaN (maximum() may drop it)
    log2_u, rinv = log2_1p(z)
    log2_p = tl.where(one_minus_t == 0.0, a0 * LOG2E, log2_u * inv_one_minus_t) - y2
    p = tl.exp2(log2_p)
    q = p * rinv
    return log2_p, p, q, q * rinv * (1.0 + one_minus_t * z)


@triton.jit
def escort_powers(log2_p, p, power):
    """(p^(1 + k), [p > 0] p^k) per element, k = ``power`` (t2 - t1 in the loss: sum d of SPEC's
    gradient is built from their sums). p^k comes from log2 p (an underflowed p keeps its true
    power, SPEC "Zero versus underflow"); no special-function op at k = 0."""
    positive = log2_p > -INF
    if power == 0.0:
        p_k = positive.to(tl.float32)
    else:
        p_k = tl.where(positive, tl.exp2(power * tl.where(positive, log2_p, 0.0)), 0.0)
    return p * p_k, p_k


@triton.jit
def streamed_sums(y2, row_ptr, stride_class, row_mask, mx, n_cols, one_minus_t, inv_one_minus_t, power,
                  BLOCK_COLS: tl.constexpr):
    """One pass over a long row at Y, streamed in chunks: (f, g, h, s1 = sum p^(1+k),
    s0 = sum_{p > 0} p^k, D = the support count of kernels/README.md); h: ``evaluate_halley``.

    The sums the loss needs at the converged Y (s1, s0; g = sum p^t2 / c, the escort's
    normaliser) and the bracket's D ride along every pass, so the pass that converges already has
    them and the row is not read again for them (the solver uses the first pass's D only)."""
    cols = tl.arange(0, BLOCK_COLS)[None, :]
    f = tl.zeros_like(y2)
    g = tl.zeros_like(y2)
    h = tl.zeros_like(y2)
    s1 = tl.zeros_like(y2)
    s0 = tl.zeros_like(y2)
    count = tl.zeros_like(y2)
    for start in range(0, n_cols, BLOCK_COLS):
        a0, _ = load_shifted(row_ptr + start * stride_class, stride_class, row_mask, cols,
                             n_cols - start, mx)
        log2_p, p, q, r = evaluate_halley(a0, y2, one_minus_t, inv_one_minus_t)
        p_k1, p_k = escort_powers(log2_p, p, power)
        f += tl.sum(p, axis=1, keep_dims=True)
        g += tl.sum(q, axis=1, keep_dims=True)
        h += tl.sum(r, axis=1, keep_dims=True)
        s1 += tl.sum(p_k1, axis=1, keep_dims=True)
        s0 += tl.sum(p_k, axis=1, keep_dims=True)
        count += tl.sum((a0 > -inv_one_minus_t).to(tl.float32), axis=1, keep_dims=True)
    support = tl.where(one_minus_t > 0.0, count, tl.zeros_like(y2) + n_cols)
    return f, g, h, s1, s0, support


@triton.jit
def sums_at(y2, a0, row_ptr, stride_class, row_mask, mx, n_cols, one_minus_t, inv_one_minus_t,
            CHUNKED: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """(f, g, log2 p, p, q) at Y: from the register tile a0, or streamed over the row (CHUNKED,
    where the per-element outputs are returned as a0 unchanged and mean nothing)."""
    if CHUNKED:
        f, g, _h, _s1, _s0, _d = streamed_sums(y2, row_ptr, stride_class, row_mask, mx, n_cols, one_minus_t,
                                               inv_one_minus_t, 0.0, BLOCK_COLS)
        log2_p = a0
        p = a0
        q = a0
    else:
        log2_p, p, q = evaluate(a0, y2, one_minus_t, inv_one_minus_t)
        f = tl.sum(p, axis=1, keep_dims=True)
        g = tl.sum(q, axis=1, keep_dims=True)
    return f, g, log2_p, p, q


@triton.jit
def support_size(a0, row_ptr, stride_class, row_mask, mx, n_cols, one_minus_t, inv_one_minus_t,
                 CHUNKED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """D = #{i : a0_i > -1/(1-t)} for t < 1 (classes that can have p > 0), C for t >= 1; >= 1.
    The chunked path spends one extra read pass on it, only when t < 1 and only for the original
    algorithm's bisection (the converged solver counts D in its first pass: ``streamed_sums``)."""
    d = tl.full([BLOCK_ROWS, 1], 0.0, tl.float32) + n_cols
    if one_minus_t > 0.0:
        if CHUNKED:
            cols = tl.arange(0, BLOCK_COLS)[None, :]
            count = tl.zeros([BLOCK_ROWS, 1], tl.float32)
            for start in range(0, n_cols, BLOCK_COLS):
                a0_chunk, _ = load_shifted(row_ptr + start * stride_class, stride_class, row_mask,
                                           cols, n_cols - start, mx)
                in_support = (a0_chunk > -inv_one_minus_t).to(tl.float32)
                count += tl.sum(in_support, axis=1, keep_dims=True)
        else:
            count = tl.sum((a0 > -inv_one_minus_t).to(tl.float32), axis=1, keep_dims=True)
        d = count
    return tl.maximum(d, 1.0)


@triton.jit
def newton_step(y2, f, g, h, lo, hi, lo_evaluated, done, one_minus_t, inv_one_minus_t, HALLEY: tl.constexpr):
    """One safeguarded Newton update of kernels/README.md, in base 2 (Y = y log2 e).

    HALLEY (the streamed passes and the start estimate, which have h = ``evaluate_halley``'s sum):
    the root of log f's second-order Taylor expansion in place of Newton's, y_newton +
    (ln 2 / 2) n^2 (f h / g^2 - 1) / (f / g) with n = log2(f) f / g the Newton step (0 at t = 1,
    where Newton on log f is exact); outside the bracket the Newton step, then the safeguard.

    y_newton = Y + log2(f) f/g (Newton on log f); y_safe = Y - log2(1 + (f/g)(f^-(1-t) - 1))/(1-t)
    (Newton on f^(1-t) in c, which never passes the root from f > 1; Y + log2(f) f/g at t = 1).
    The 4-ulp step test uses max(|Y|, log2 e), i.e. max(|y|, 1) in natural units, as the README.
    """
    r = f - 1.0
    done = done | (tl.abs(r) <= TOL) | ~(tl.abs(r) < INF)  # a NaN row stays NaN
    log2_f = tl.log2(f)
    f_over_g = f / g
    above = r > 0.0
    w = f_over_g * exp2m1(-one_minus_t * log2_f)
    log2_w, _rinv = log2_1p(tl.where(w < -1.0, -1.0, w))
    y_safe = y2 - tl.where(one_minus_t == 0.0, -f_over_g * log2_f, log2_w * inv_one_minus_t)
    lo = tl.where(above, tl.minimum(tl.maximum(tl.maximum(lo, y2), y_safe), hi), lo)
    lo_evaluated = tl.where(above, y_safe <= y2, lo_evaluated)
    hi = tl.where(above, hi, tl.minimum(hi, y2))
    newton = log2_f * f_over_g
    y_newton = y2 + newton
    inside = (y_newton > lo) & (y_newton < hi)
    if HALLEY:
        y_halley = y_newton + (0.5 * LN2) * newton * newton * (f * h / (g * g) - 1.0) / f_over_g
        halley_inside = (y_halley > lo) & (y_halley < hi)
        y_newton = tl.where(halley_inside, y_halley, y_newton)
        inside = halley_inside | inside
    y_new = tl.where(inside, y_newton, tl.where(lo_evaluated, 0.5 * (lo + hi), lo))
    done = done | (tl.abs(y_new - y2) <= ULP4 * tl.maximum(tl.abs(y2), LOG2E))
    return tl.where(done, y2, y_new), lo, hi, lo_evaluated, done


@triton.jit
def solve(a0, row_ptr, stride_class, row_mask, mx, y_start, n_pos, inactive, n_cols, one_minus_t, inv_one_minus_t,
          power, num_iters, ORIGINAL: tl.constexpr, CHUNKED: tl.constexpr,
          MAX_PASSES: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """THE normalization solver. Returns (Y, log2 p, p, q, f, g, s1, s0) of the last evaluation.

    On-chip (CHUNKED=False): ``a0`` is the max-shifted tile [rows, cols] in registers and the
    per-element results are those of the last pass (no extra pass); ``y_start``, ``n_pos``, ``power``
    and the per-row sums returned after q are unused. Chunked: ``a0`` is a placeholder, ``mx``,
    ``y_start``, ``n_pos`` come from ``row_max_chunked``, each pass streams the row from ``row_ptr``
    (``streamed_sums``: D rides along the first pass) and returns per-row sums: f, g and
    s1 = sum p^(1+k), s0 = sum_{p>0} p^k with k = ``power`` at the returned Y. At t == 1 the
    first sweep already solved the row (Y = log2 f0); with k = 0 its sums are known in closed
    form (f = g = s1 = 1, s0 = n_pos) and no pass runs, else one pass evaluates them. At t != 1
    the passes start at the first sweep's estimate and take Halley steps (``newton_step``).
    ``inactive`` rows (padding, ignored labels) start as converged and cost no extra passes.

    ORIGINAL=False: converged safeguarded Newton (the default). ORIGINAL=True: SPEC's original
    algorithm with ``num_iters`` steps, selected at run time from t: the fixed point
    z <- a0 Z^(1-t) is exactly Y <- Y + log2 f(Y) from Y = 0, run num_iters + 1 times (t > 1;
    once at t == 1, which is logsumexp); t < 1 bisects lam with Y = -log2(1 - (1-t) lam)/(1-t).
    ORIGINAL streams its passes without the loss sums (s1 = f, s0 = 0: not for the loss).
    """
    zero = tl.zeros([BLOCK_ROWS, 1], tl.float32)
    if ORIGINAL:
        if one_minus_t <= 0.0:
            y2 = zero
            n_steps = tl.where(one_minus_t == 0.0, 1, num_iters + 1)
            for _step in range(n_steps):
                f, g, log2_p, p, q = sums_at(y2, a0, row_ptr, stride_class, row_mask, mx, n_cols, one_minus_t,
                                             inv_one_minus_t, CHUNKED, BLOCK_COLS)
                y2 = y2 + tl.log2(f)
        else:
            support = support_size(a0, row_ptr, stride_class, row_mask, mx, n_cols, one_minus_t, inv_one_minus_t,
                                   CHUNKED, BLOCK_ROWS, BLOCK_COLS)
            lo = zero
            # hi = -log_t(1/D) = -expm1((1-t) log(1/D)) / (1-t)
            hi = -exp2m1(-one_minus_t * tl.log2(support)) * inv_one_minus_t
            for _step in range(num_iters):
                mid = 0.5 * (lo + hi)
                log2_c, _rinv = log2_1p(-one_minus_t * mid)  # c = 1 - (1-t) lam
                y_mid = -log2_c * inv_one_minus_t
                f, g, log2_p, p, q = sums_at(y_mid, a0, row_ptr, stride_class, row_mask, mx, n_cols, one_minus_t,
                                             inv_one_minus_t, CHUNKED, BLOCK_COLS)
                below = f < 1.0
                hi = tl.where(below, mid, hi)
                lo = tl.where(below, lo, mid)
            log2_c, _rinv = log2_1p(-one_minus_t * (0.5 * (lo + hi)))
            y2 = -log2_c * inv_one_minus_t
        f, g, log2_p, p, q = sums_at(y2, a0, row_ptr, stride_class, row_mask, mx, n_cols, one_minus_t,
                                     inv_one_minus_t, CHUNKED, BLOCK_COLS)
        s1 = f
        s0 = zero
    else:
        lo = zero
        done = inactive
        log2_p = a0
        p = a0
        q = a0
        if CHUNKED:
            solved = one_minus_t == 0.0
            y2 = y_start  # the root at t == 1; next to it otherwise (``row_max_chunked``)
            f = tl.where(solved, 1.0, zero)  # sum p at the t == 1 root
            g = f
            s1 = f
            s0 = n_pos
            hi = zero + INF  # log2 D, from the first pass
            done = tl.where(solved & (power == 0.0), zero == zero, done)
        else:
            y2 = zero  # f(0) >= 1: the start is left of the root
            f = zero
            g = zero
            s1 = zero
            s0 = zero
            hi = tl.log2(support_size(a0, row_ptr, stride_class, row_mask, mx, n_cols, one_minus_t,
                                      inv_one_minus_t, CHUNKED, BLOCK_ROWS, BLOCK_COLS))
        lo_evaluated = zero != zero
        y_evaluated = y2
        n_pass = 0
        n_active = tl.sum((~done).to(tl.int32))
        while (n_pass < MAX_PASSES) & (n_active > 0):
            y_evaluated = y2
            if CHUNKED:
                f, g, h, s1, s0, support = streamed_sums(y2, row_ptr, stride_class, row_mask, mx, n_cols,
                                                         one_minus_t, inv_one_minus_t, power, BLOCK_COLS)
                hi = tl.where(n_pass == 0, tl.log2(tl.maximum(support, 1.0)), hi)
            else:
                f, g, log2_p, p, q = sums_at(y2, a0, row_ptr, stride_class, row_mask, mx, n_cols, one_minus_t,
                                             inv_one_minus_t, CHUNKED, BLOCK_COLS)
                h = g
            y2, lo, hi, lo_evaluated, done = newton_step(y2, f, g, h, lo, hi, lo_evaluated, done,
                                                         one_minus_t, inv_one_minus_t, CHUNKED)
            n_pass += 1
            n_active = tl.sum((~done).to(tl.int32))
        y2 = y_evaluated  # (differs from y2 only for a row stopped by the cap)
    return y2, log2_p, p, q, f, g, s1, s0


# --------------------------------------------------------------------------------------------
# Loss and gradient terms (SPEC "The loss", "The gradient")
# --------------------------------------------------------------------------------------------

@triton.jit
def label_powers(y, one_minus_t1, inv_one_minus_t1, two_minus_t1):
    """(log_t1(y), y^(2-t1)) of labels y >= 0; log_t1(0) is only used where y > 0."""
    log2_y = tl.log2(y)
    return log_t_from_log2(log2_y, one_minus_t1, inv_one_minus_t1), tl.exp2(two_minus_t1 * log2_y)


@triton.jit
def loss_terms(y, log_t_y, pow_y, log2_p, one_minus_t1, inv_one_minus_t1, two_minus_t1,
               inv_two_minus_t1):
    """Per-class loss y (log_t1 y - log_t1 p) - (y^(2-t1) - p^(2-t1)) / (2-t1), 0 log_t1 0 = 0.

    Uses log2 p, never p, so an underflowed p keeps a finite log_t1(p); only an exact zero
    (log2 p = -inf, t2 < 1) gives +inf for t1 >= 1 and y > 0.
    """
    log_t_p = log_t_from_log2(log2_p, one_minus_t1, inv_one_minus_t1)
    pow_p = tl.exp2(two_minus_t1 * log2_p)
    cross = tl.where(y > 0.0, y * (log_t_y - log_t_p), 0.0)
    return cross - (pow_y - pow_p) * inv_two_minus_t1


@triton.jit
def grad_terms(y, log2_p, p, t2_minus_t1):
    """d = (p - y) p^(t2 - t1) (SPEC "Zero versus underflow").

    d is 0 only where p is exactly 0 (log2 p = -inf: outside the finite support, a -inf logit,
    a masked column). A p that underflows (log2 p finite, p = 0 in fp32, also ex2.approx's
    flush-to-zero) is not zero: p^(t2 - t1) comes from log2 p, so a confidently wrong row keeps
    d_target = -y at t1 = t2 and the large true value at t2 < t1.

    At t2 < t1, p^(t2 - t1) of an underflowed p can overflow, and p x inf (or 0 x inf of a zero
    label) would be NaN: there the p part is its own power, p^(1 + t2 - t1) from log2 p (one more
    EX2 per element, only at t2 < t1; the branch is on a per-program scalar), and y p^(t2 - t1)
    counts only where y > 0.
    """
    positive = log2_p > -INF
    log2_p_or_0 = tl.where(positive, log2_p, 0.0)
    power = tl.exp2(t2_minus_t1 * log2_p_or_0)
    if t2_minus_t1 < 0.0:
        d = tl.exp2((1.0 + t2_minus_t1) * log2_p_or_0) - tl.where(y > 0.0, y * power, 0.0)
    else:
        d = (p - y) * power
    return tl.where(positive, d, 0.0)


@triton.jit
def smoothing_coefficients(label_smoothing, n_cols):
    """y <- scale * y + add with scale = 1 - C/(C-1) s, add = s/(C-1) (SPEC; identity at s = 0)."""
    safe_c1 = tl.maximum(n_cols - 1, 1).to(tl.float32)
    add = tl.where(label_smoothing > 0.0, label_smoothing / safe_c1, 0.0)
    scale = tl.where(label_smoothing > 0.0, 1.0 - n_cols * add, 1.0)
    return scale, add


@triton.jit
def softmax_vjp_terms(p, grad_p, t):
    """(w = g p^t, p^t) of the tempered-softmax VJP w - p^t / sum(p^t) * sum(w)."""
    p_t = tl.where(p > 0.0, tl.exp2(t * tl.log2(tl.where(p > 0.0, p, 1.0))), 0.0)
    return grad_p * p_t, p_t
