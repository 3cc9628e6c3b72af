"""Cost models of one workload cell: bytes moved, special-function (SFU) ops, roofline time.

The models describe the WORKLOAD (shape, dtype, labels, temperatures, direction), not a provider,
so every provider of a cell is measured against the same roofline.

Byte model (compulsory DRAM traffic of the operation, nothing else):
    fwd     = read logits (N*C*e) + read labels + write per-row loss (N*4)
    fwdbwd  = fwd + write the gradient (N*C*e)
    bwd     = read one saved N x C residual (N*C*e) + write the gradient (N*C*e)
with e = the logits' element size, labels = N*8 bytes for int64 class indices or N*C*e for
dense labels (stored in the logits' dtype). A provider that re-reads a row (the chunked Triton path
re-reads it once per solver pass, unless L2 holds it) pays more than this model; that shows up as
a lower % of roofline, which is the point.

SFU model (kernels/README.md, "Cost per element": MUFU instructions counted in the sm_90 SASS of
the Triton kernels), per element of the logits:
    one solver pass = SFU_OPS_PER_PASS = 2 (rcp of 1 + z, ex2; their log2 is FMA-only libdevice).
    epilogue (on-chip path, C <= the launch config's on-chip limit): 3 ex2 (log_t1 p, p^(2-t1),
    p^(t2-t1)); the gradient itself adds none (the escort reuses the last pass's p / (1 + z)).
    chunked path: its sweeps over the row (``chunked_sweeps``, kernels/README.md "Memory
    traffic"), each with its own ops.
    dense labels: log_t1(y) and y^(2-t1) per element = 2 more ex2.
    passes: the MEAN converged pass count of the rows (the kernel runs one row per program, so the
    mean, not the worst row, sets its throughput).
The SFU rate assumed on NVIDIA sm_80/sm_90: MUFU = 16 ops/clk/SM; H100 SXM: 16 x 132 SMs x
1.755 GHz = 3.71e12 ops/s. The SM count comes from the device, the clock is SFU_CLOCK_GHZ unless
--sfu-clock-ghz overrides it. CPUs have no SFU roof: the roofline is the byte model alone there.
"""

from __future__ import annotations

import dataclasses

SFU_OPS_PER_CLK_PER_SM = 16   # MUFU throughput per SM per clock, sm_80 / sm_90 (CUDA guide, arithmetic instructions)
SFU_CLOCK_GHZ = 1.755         # the H100 SXM clock this harness assumes (override with --sfu-clock-ghz)
SFU_OPS_PER_PASS = 2          # kernels/README.md (sm_90 SASS): rcp of 1 + z, ex2 (log2 is FMA-only)
EPILOGUE_LOSS = 3             # ex2 for log_t1(p), p^(2-t1) and p^(t2-t1) (computed in the loss sweep)
EPILOGUE_GRAD = 0             # the gradient reuses the last pass's p / (1 + z): no MUFU
DENSE_LABEL_OPS = 2           # ex2 for log_t1(y) and y^(2-t1) (log2 y is FMA-only)
LOSS_TERM_OPS = 2             # ex2 for log_t1(p) and p^(2-t1), per element of a sweep summing the loss
GRAD_TERM_OPS = 1             # ex2 for p^(t2-t1) of d, per element of a sweep using d
SUMEXP_OPS = 1                # ex2 of the online sum-exp in the max sweep (t2 = 1 only)
# The chunked path's start estimate at t2 != 1 (kernels/README.md, "Start estimate"): a solve in
# registers on 3 tiles of CHUNK_COLS logits per row (two tops and a sample per lane), about
# START_ITERS_MEAN steps of one pass's ops each: START_ITERS_MEAN x 3 x CHUNK_COLS x 2 / C per logit.
START_TILES = 3
START_ITERS_MEAN = 4
INDEX_BYTES = 8               # int64 class indices (torch's default integer dtype)
LOSS_BYTES = 4                # one fp32 loss per row


@dataclasses.dataclass(frozen=True)
class Cell:
    """One workload: shape, dtype name, labels kind, temperatures."""

    n: int
    c: int
    dtype: str          # "fp32" | "bf16" | "fp16"
    labels: str         # "int" | "dense"
    t1: float
    t2: float

    @property
    def elem_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2


def bytes_moved(cell: Cell, direction: str) -> int:
    """Compulsory bytes of one call (see the module docstring)."""
    nc = cell.n * cell.c * cell.elem_bytes
    labels = cell.n * INDEX_BYTES if cell.labels == "int" else nc
    fwd = nc + labels + cell.n * LOSS_BYTES
    if direction == "fwd":
        return fwd
    if direction == "fwdbwd":
        return fwd + nc
    if direction == "bwd":
        return 2 * nc
    raise ValueError(direction)


def chunked(cell: Cell) -> bool:
    """Whether the Triton loss kernel takes its chunked (streaming) path for this cell (dense
    labels stream a wide on-chip row: ``launch_config.fit_loss_variant``)."""
    from bitempered.kernels import launch_config  # framework-free, no GPU needed

    config = launch_config.row_config(cell.c, cell.elem_bytes)
    return launch_config.fit_loss_variant(config, cell.labels != "int", False).chunked


def chunked_sweeps(cell: Cell, direction: str, passes_mean: float,
                   ops_per_pass: float = SFU_OPS_PER_PASS) -> tuple[float, float]:
    """(logit reads, special-function ops) per logit of the chunked loss kernel, converged solver
    (kernels/README.md, "Memory traffic"; the read count is what tests/test_kernel_memory_traffic.py
    counts under the interpreter, less the one target logit per row):

        max sweep (at t2 = 1 also the online sum-exp: the solve; else the start estimate, solved
        in registers on 3 x CHUNK_COLS logits per row: ``start_estimate_ops``)
      + solver passes (t2 != 1: ``passes_mean``; t2 = 1: none, or one pass for sums the closed
        form does not give: t1 != 1 with the fused gradient)
      + loss sweep, unless fused: with class indices and a gradient the passes gather sum d
        (+1 ex2 per pass when t1 != t2) and the gradient sweep sums the loss
      + gradient sweep (with gradient).
    """
    need_grad = direction == "fwdbwd"
    fused = need_grad and cell.labels == "int"
    extra_pass_ops = GRAD_TERM_OPS if fused and cell.t1 != cell.t2 else 0
    if cell.t2 == 1.0:
        passes = 1.0 if fused and cell.t1 != 1.0 else 0.0
    else:
        passes = passes_mean
    reads = 1 + passes
    ops = (SUMEXP_OPS if cell.t2 == 1.0 else start_estimate_ops(cell.c, ops_per_pass))
    ops += passes * (ops_per_pass + extra_pass_ops)
    if not fused:
        reads += 1
        ops += ops_per_pass + LOSS_TERM_OPS + (GRAD_TERM_OPS if need_grad else 0)
        ops += DENSE_LABEL_OPS if cell.labels == "dense" else 0
    if need_grad:
        reads += 1
        ops += ops_per_pass + GRAD_TERM_OPS + (LOSS_TERM_OPS if fused else 0)
    return reads, ops


def start_estimate_ops(num_classes: int, ops_per_pass: float = SFU_OPS_PER_PASS) -> float:
    """Special-function ops per logit of the chunked path's start estimate (t2 != 1)."""
    from bitempered.kernels import launch_config

    return START_ITERS_MEAN * START_TILES * launch_config.CHUNK_COLS * ops_per_pass / num_classes


def sfu_ops_per_element(cell: Cell, direction: str, passes_mean: float | None,
                        ops_per_pass: float = SFU_OPS_PER_PASS) -> float | None:
    """Special-function ops per logit of the converged bitempered kernel (None if unknown)."""
    if passes_mean is None:
        return None
    if direction == "bwd":
        return 0.0  # the backward scales the gradient stored by the forward: no transcendental
    need_grad = direction == "fwdbwd"
    dense = DENSE_LABEL_OPS if cell.labels == "dense" else 0
    if not chunked(cell):
        return ops_per_pass * passes_mean + EPILOGUE_LOSS + (EPILOGUE_GRAD if need_grad else 0) + dense
    return chunked_sweeps(cell, direction, passes_mean, ops_per_pass)[1]


@dataclasses.dataclass(frozen=True)
class Roof:
    bandwidth: float            # measured copy bandwidth, bytes/s
    sfu_rate: float | None      # SFU ops/s (None on CPU)

    def time_s(self, nbytes: int, sfu_ops: float | None) -> float:
        memory = nbytes / self.bandwidth
        if self.sfu_rate is None or sfu_ops is None:
            return memory
        return max(memory, sfu_ops / self.sfu_rate)


def sfu_rate(num_sms: int, clock_ghz: float = SFU_CLOCK_GHZ) -> float:
    return SFU_OPS_PER_CLK_PER_SM * num_sms * clock_ghz * 1e9
