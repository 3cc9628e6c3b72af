"""Launch configuration of every kernel family: one heuristic per family, keyed on C and dtype.

Framework-free (sizes and element sizes in bytes, no torch). By default every call gets exactly
one configuration, on a GPU and under the Triton interpreter alike. Opt-in autotuning
(``bindings/common/autotune.py``) times the candidate sets below (``row_candidates``,
``binary_candidates``) and caches the fastest; the heuristic is always the first candidate.

Where the numbers come from. NONE of them has been timed on a GPU yet. They come from the
register budget, checked without a GPU by ``tests/test_triton_compile.py`` (Triton 3.9 + its
bundled ptxas, sm_90 and sm_80: registers per thread and zero spills for every shipped config;
run ``python tests/test_triton_compile.py 90`` for the table). Re-tune them on an H100:

- ``ELEMS_PER_THREAD = 4``: the on-chip loss kernel keeps the tile plus log2 p, p, q of the last
  solver pass live (4 fp32 arrays) and adds the loss/gradient epilogue. Measured (ptxas):
  4 elements per thread -> 56-84 registers; the 4096 tile (capped at 16 warps, so 8 per thread)
  -> 100-118. With 8 per thread on 4 warps ptxas spilled 4-8 bytes ([2x512] tile, sm_90).
- ``MAX_WARPS = 16``: 512 threads. With ``MAX_REGISTERS`` this caps the on-chip tile at
  16 * 32 * 8 = 4096 elements: 8192 at 16 warps hit the 128-register cap and spilled (sm_90).
- ``MAX_REGISTERS = 128`` (passed as ``maxnreg``): lets ptxas use up to the 64K-register file
  / 512 threads, i.e. keeps >= 16 warps resident per SM for any num_warps <= 16. Without it
  ptxas chose 64 registers and spilled 8 bytes (original-algorithm variant, 16 warps, sm_80).
- Wide tiles (``NARROW_TILE`` = 4096 < elements <= 8192): ``MAX_BLOCK_WARPS = 32`` (1024
  threads, 8 per thread) at ``WIDE_TILE_REGISTERS = 64`` (the whole 65536-register file, one block
  per SM, as the 4096 tile at 111 x 512). ptxas fits the lean variants in 64 registers with zero
  spills, sm_90 and sm_80: the loss with class indices (fp32, bf16, the original algorithm),
  softmax forward and backward (with d/dt too), the vocab-parallel kernels (40-64). It spills the
  loss kernel's dense-label variant (16 bytes) and temperature-gradient variants (200-232 bytes),
  so those stream such rows (``fit_loss_variant``). Measured and left: 8192 at 16 warps / 128
  registers spilled 8-16 bytes; 16384 spilled at 16 warps / 128 (568 bytes) and 32 warps / 64
  (288); keeping only the tile live across the solver passes (an experiment: the passes carry
  row sums, the epilogue evaluates the tile again) did not help (4096: the same 111 registers;
  8192: 112 bytes spilled): the registers go to the ~10 per element per thread of one pass's
  unrolled evaluation (4 per thread: 72 registers, 8: 111), not to the carried arrays.
- ``ON_CHIP_LIMIT``: the largest C kept in registers = the 8192 wide tile, for every dtype: the tile
  is converted to fp32 on load, so 16-bit logits need the same registers (a per-dtype dict so a GPU
  measurement can change it); 4096 (``NARROW_TILE``) for the loss's dense-label and
  temperature-gradient variants. Above it the chunked path streams the row once per sweep
  (kernels/README.md, "Memory traffic": 2 reads per logit at t1 = t2 = 1 with gradient, the
  solver passes + 2 tempered; reads beyond the first may hit L2: ~130 rows of 16K fp32 in
  flight is ~8 MB). Its loss kernel (issue 20: fused sums, online max + sum-exp, the start
  estimate's 4 tiles of 2048 lanes in the max sweep, Halley sums), ptxas, 16 warps, zero spills:
  80 registers bf16 / class indices / sm_90 (78 on sm_80), 86 dense (85), 110 with temperature
  gradients (111); the chunked softmax forward 65 (68).
- ``CHUNK_COLS = 2048``: chunk width of the chunked path (16 warps x 4 per thread). Not timed.
- ``SMALL_ROW_TILE = 1024``: rows with C below it are packed several per program
  (BLOCK_ROWS = 1024 // BLOCK_COLS) so that a program still has >= 1024 elements of work; every
  row of a program runs as many solver passes as the slowest one. Not timed.
- ``BINARY_BLOCK = 1024``: elements per program of the binary kernels ([1024, 2] tile). Not timed.
- Strided classes (``row_config(..., strided=True)``: F.cross_entropy's (N, C, H, W), read in place
  with class stride H W and consecutive positions contiguous): a program takes at least
  ``STRIDED_MIN_ROWS`` = 16 consecutive positions (up to 64 for small C, a ``STRIDED_TILE`` = 2048
  element tile), so every class's load is a contiguous run of 64-256 bytes across positions
  instead of one element per row. On chip up to C = 256 (a 16 x 256 tile, within the 4096
  elements of the on-chip tile); above, chunks of 16 positions x 128 classes. Not timed, not tuned
  (the autotuner's candidates are for rows with unit class stride).

Candidate sets (what the tuner may pick; ``python -m bitempered.tune --report DIR``
record the times, so a tuned table can be folded back into the constants above):
- rows per program: the packed tile of small rows at ``TUNE_ROW_TILES`` elements;
- ``num_warps``: the heuristic's and twice it (half of it spills: 8 fp32 values per thread and more);
- on-chip versus chunked: above ``TUNE_CHUNKED_FROM`` classes both paths are timed, which moves the
  ``ON_CHIP_LIMIT`` threshold per C bucket;
- chunk width ``TUNE_CHUNK_COLS``; ``maxnreg`` left to ptxas (None) on the heuristic's config;
  ``num_stages=1`` (no software pipelining of the chunk loops) on the chunked heuristic.
Under the interpreter (no GPU) the sets shrink to a few cheap configurations, so that the tuning
logic is tested on CPU in seconds (the times there say nothing about a GPU).
Checked without a GPU (2026-12-01, Triton 3.9 + bundled ptxas, sm_90, bf16 loss kernel, class
indices, converged): every candidate of C = 1000, 2000 and 32000 compiles with zero spills,
45-117 registers; 1.2-5.3 s per compile on a loaded 2-core CPU, so a GPU sweep costs ~2 s per
candidate the first time (Triton's disk cache keeps them) and C buckets >= 32K share binaries.
"""

from __future__ import annotations

import contextlib
import dataclasses

MAX_PASSES = 30  # the solver's safety cap, of every backend (the native solvers import it)
ELEMS_PER_THREAD = 4
MAX_WARPS = 16
MAX_REGISTERS = 128
NARROW_TILE = MAX_WARPS * 32 * 8  # 4096: the widest on-chip tile every loss variant fits
MAX_BLOCK_WARPS = 32       # 1024 threads, the hardware's limit: the wide on-chip tiles
WIDE_TILE_REGISTERS = 64   # the 65536-register file / 1024 threads
ON_CHIP_LIMIT = {4: 8192, 2: 8192}  # element size in bytes -> largest on-chip C (lean variants)
CHUNK_COLS = 2048
SMALL_ROW_TILE = 1024
BINARY_BLOCK = 1024
STRIDED_MIN_ROWS = 16
STRIDED_MAX_ROWS = 64
STRIDED_TILE = 2048

TUNE_ROW_TILES = (512, 1024, 2048, 4096)  # elements per program of the packed on-chip path
TUNE_CHUNKED_FROM = 1024                  # C above which the chunked path is timed too
TUNE_CHUNK_COLS = (1024, 2048, 4096)
TUNE_BINARY_BLOCKS = (512, 1024, 2048, 4096)
INTERPRETER_MIN_CHUNK = 16                # the chunked candidate under the interpreter: 4 chunks

_on_chip_limit_override: int | None = None


@dataclasses.dataclass(frozen=True)
class RowConfig:
    """One launch of a row kernel (loss, softmax forward/backward)."""

    chunked: bool
    block_rows: int
    block_cols: int
    num_warps: int
    maxnreg: int | None = MAX_REGISTERS   # None: ptxas chooses
    num_stages: int | None = None         # None: Triton's default

    @property
    def path(self) -> str:
        return "chunked" if self.chunked else "on_chip"

    def launch_options(self) -> dict:
        return _launch_options(self)

    def describe(self) -> str:
        return (f"{self.path} block_rows={self.block_rows} block_cols={self.block_cols} "
                f"num_warps={self.num_warps} maxnreg={self.maxnreg} num_stages={self.num_stages}")


@dataclasses.dataclass(frozen=True)
class BinaryConfig:
    block: int
    num_warps: int
    maxnreg: int | None = MAX_REGISTERS
    num_stages: int | None = None

    def launch_options(self) -> dict:
        return _launch_options(self)

    def describe(self) -> str:
        return (f"block={self.block} num_warps={self.num_warps} maxnreg={self.maxnreg} "
                f"num_stages={self.num_stages}")


def _launch_options(config) -> dict:
    """Triton launch keywords of a config; unset ones are left to Triton (and ptxas)."""
    options = {"num_warps": config.num_warps}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    if config.num_stages is not None:
        options["num_stages"] = config.num_stages
    return options


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def warps_for(elements: int) -> int:
    return max(1, min(MAX_WARPS, elements // (32 * ELEMS_PER_THREAD)))


def on_chip_limit(elem_bytes: int) -> int:
    if _on_chip_limit_override is not None:
        return _on_chip_limit_override
    return ON_CHIP_LIMIT.get(elem_bytes, ON_CHIP_LIMIT[4])


@contextlib.contextmanager
def override_on_chip_limit(limit: int):
    """Temporarily sets the on-chip limit for every dtype (tests force the chunked path)."""
    global _on_chip_limit_override
    saved, _on_chip_limit_override = _on_chip_limit_override, int(limit)
    try:
        yield
    finally:
        _on_chip_limit_override = saved


def row_config(n_cols: int, elem_bytes: int, strided: bool = False) -> RowConfig:
    """Configuration of the row kernels for C = n_cols classes of ``elem_bytes``-byte logits;
    ``strided``: the classes are not contiguous (class stride != 1, e.g. NCHW logits read in place)."""
    limit = on_chip_limit(elem_bytes)
    if strided:
        return _strided_config(n_cols, limit)
    if n_cols > limit:
        return _chunked_config(limit)
    block_cols = next_power_of_2(n_cols)
    block_rows = max(1, SMALL_ROW_TILE // block_cols)
    return _on_chip_config(block_rows, block_cols)


def _on_chip_config(block_rows: int, block_cols: int) -> RowConfig:
    """An on-chip tile: ELEMS_PER_THREAD per thread up to MAX_WARPS, then up to 8 per thread;
    a wide tile (above NARROW_TILE) takes 1024 threads at WIDE_TILE_REGISTERS each."""
    elements = block_rows * block_cols
    if elements > NARROW_TILE:
        return RowConfig(False, block_rows, block_cols, MAX_BLOCK_WARPS, maxnreg=WIDE_TILE_REGISTERS)
    return RowConfig(False, block_rows, block_cols, warps_for(elements))


def _chunked_config(limit: int) -> RowConfig:
    block_cols = min(CHUNK_COLS, next_power_of_2(limit))
    return RowConfig(True, 1, block_cols, warps_for(block_cols))


def is_wide(config: RowConfig) -> bool:
    """An on-chip tile of more than NARROW_TILE elements."""
    return not config.chunked and config.block_rows * config.block_cols > NARROW_TILE


def fit_loss_variant(config: RowConfig, dense_labels: bool, temperature_grads: bool) -> RowConfig:
    """``config`` for the loss kernel's variant: the dense-label and temperature-gradient variants
    keep more per element live in their epilogue and spill on a wide tile (module docstring), so
    they stream those rows (the chunked heuristic) instead; every other config is kept."""
    if is_wide(config) and (dense_labels or temperature_grads):
        return _chunked_config(NARROW_TILE)
    return config


def one_row_per_program(config: RowConfig) -> RowConfig:
    """``config`` with one row per program, its warps sized to one row's tile: the launch of
    per-row temperatures, which a program loads as one scalar (``tempered_math.program_value``)."""
    if config.block_rows == 1:
        return config
    return dataclasses.replace(config, block_rows=1, num_warps=warps_for(config.block_cols))


def temperature_sums_config(n_cols: int) -> RowConfig:
    """The vocab-parallel epilogue's NEED_TEMP_GRAD variant (three more row sums): one row per
    program, at most CHUNK_COLS classes per chunk. Its tiles of several rows (1024 x 1, 64 x 16) and
    the 4096-wide one spill on sm_90 at MAX_REGISTERS; these use 62-110 registers, no stack
    (tests/test_triton_compile.py)."""
    block_cols = min(next_power_of_2(n_cols), CHUNK_COLS)
    return RowConfig(True, 1, block_cols, warps_for(block_cols))


def _strided_config(n_cols: int, limit: int) -> RowConfig:
    """Strided classes: tiles of consecutive positions x classes (module docstring)."""
    block_cols = next_power_of_2(n_cols)
    if n_cols <= limit and block_cols * STRIDED_MIN_ROWS <= min(limit, 2 * STRIDED_TILE):
        rows = max(STRIDED_MIN_ROWS, min(STRIDED_MAX_ROWS, STRIDED_TILE // block_cols))
        return RowConfig(False, rows, block_cols, warps_for(rows * block_cols))
    chunk = min(STRIDED_TILE // STRIDED_MIN_ROWS, next_power_of_2(max(1, limit // STRIDED_MIN_ROWS)))
    return RowConfig(True, STRIDED_MIN_ROWS, chunk, warps_for(STRIDED_MIN_ROWS * chunk))


def binary_config() -> BinaryConfig:
    return BinaryConfig(BINARY_BLOCK, warps_for(2 * BINARY_BLOCK))


def row_candidates(n_cols: int, elem_bytes: int, interpreted: bool = False) -> list[RowConfig]:
    """Configurations the tuner times for C = n_cols (heuristic first; all valid for every C of
    the same power-of-two bucket, the cache key). Every candidate computes the same function:
    they differ only in how rows and classes are split into blocks (rounding-level differences
    between the on-chip and chunked sums, none between configs of the same path and width)."""
    heuristic = row_config(n_cols, elem_bytes)
    block = next_power_of_2(n_cols)
    candidates = [heuristic]
    if interpreted:
        if not heuristic.chunked:
            rows = max(1, heuristic.block_rows // 2)
            candidates.append(RowConfig(False, rows, block, warps_for(rows * block)))
            candidates.append(dataclasses.replace(
                heuristic, num_warps=min(MAX_WARPS, 2 * heuristic.num_warps), maxnreg=None))
        chunk = max(INTERPRETER_MIN_CHUNK, block // 4)
        if n_cols > chunk:
            candidates.append(RowConfig(True, 1, chunk, 1))
        return _unique(candidates)
    if block <= max(ON_CHIP_LIMIT.values()):
        for tile in TUNE_ROW_TILES:
            if tile >= block:
                warps = warps_for(tile)
                for num_warps in (warps, min(MAX_WARPS, 2 * warps)):
                    candidates.append(RowConfig(False, tile // block, block, num_warps))
        if not heuristic.chunked:
            candidates.append(dataclasses.replace(heuristic, maxnreg=None))
    if n_cols > TUNE_CHUNKED_FROM:
        for chunk in TUNE_CHUNK_COLS:
            warps = warps_for(chunk)
            for num_warps in (warps, min(MAX_WARPS, 2 * warps)):
                candidates.append(RowConfig(True, 1, chunk, num_warps))
        chunked = row_config(max(n_cols, on_chip_limit(elem_bytes) + 1), elem_bytes)
        candidates.append(dataclasses.replace(chunked, num_stages=1))
    return _unique(candidates)


def binary_candidates(interpreted: bool = False) -> list[BinaryConfig]:
    heuristic = binary_config()
    if interpreted:
        return _unique([heuristic, BinaryConfig(256, 2), BinaryConfig(64, 1, maxnreg=None)])
    candidates = [heuristic]
    for block in TUNE_BINARY_BLOCKS:
        warps = warps_for(2 * block)
        for num_warps in (warps, min(MAX_WARPS, 2 * warps)):
            candidates.append(BinaryConfig(block, num_warps))
    return _unique(candidates)


def _unique(configs: list) -> list:
    return list(dict.fromkeys(configs))


def shipped_row_configs() -> list[RowConfig]:
    """Every RowConfig the default heuristic can return (for the compile test)."""
    configs = []
    for elem_bytes in sorted(ON_CHIP_LIMIT):
        limit = ON_CHIP_LIMIT[elem_bytes]
        n = 1
        while n <= limit:
            configs.append(row_config(n, elem_bytes))
            n *= 2
        configs.append(row_config(limit + 1, elem_bytes))
    return sorted(set(configs), key=lambda c: (c.chunked, c.block_cols, c.block_rows))


def shipped_strided_row_configs() -> list[RowConfig]:
    """Every RowConfig the heuristic returns for strided classes (``row_config(strided=True)``)."""
    configs = set()
    for elem_bytes in sorted(ON_CHIP_LIMIT):
        n = 1
        while n <= 2 * ON_CHIP_LIMIT[elem_bytes]:
            configs.add(row_config(n, elem_bytes, strided=True))
            n *= 2
    return sorted(configs, key=lambda c: (c.chunked, c.block_cols, c.block_rows))


def shipped_binary_configs() -> list[BinaryConfig]:
    return [binary_config()]
