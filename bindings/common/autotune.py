"""Opt-in autotuning of the kernels' launch configurations, with a persistent JSON cache.

Off by default: every launch then takes the heuristic of ``kernels/launch_config.py`` and nothing
is timed or read from disk. Switched on by ``BITEMPERED_AUTOTUNE=1`` or
``bitempered.autotune(True)``; then, per kernel family and key

    (family, C bucketed to the next power of two, logits dtype, label kind, NEED_GRAD, ORIGINAL)

the first launch that misses the cache times every candidate of ``launch_config.row_candidates``
(``binary_candidates``) on the real inputs, keeps the fastest, stores it, and later launches (in
this process or any other) reuse it. The caller supplies the timing runs (``make_bench``): they
write into scratch outputs, never into the caller's buffers (the in-place gradient stays intact).

Timer: ``triton.testing.do_bench`` (CUDA events, median) on a GPU; under ``TRITON_INTERPRET=1``
one wall-clock run per candidate (the interpreter's times say nothing about a GPU; they exist so
the mechanism is tested on CPU).

Cache: ``$BITEMPERED_CACHE_DIR`` (else ``$XDG_CACHE_HOME/bitempered``, else
``~/.cache/bitempered``) / ``autotune-<device>.json``, one file per device name. The file records
the Triton version and a hash of the kernel sources (every ``kernels/*.py``); a file written under
another Triton or for edited kernels is ignored (and replaced by the next write). The JAX launchers
read the same file but never tune (jax-triton cannot time inside a trace): cached best or heuristic.

A cache never fails nor changes the loss: a file that is not this user's own, in a folder that
others may write (group/world-writable), not a regular file, not JSON or of another layout is
ignored, and so is every entry whose config ``config_problem`` rejects (the checks ``pinned``
applies to a user's config); an unwritable folder keeps the tuned configs in this process. Each
case warns once (``CacheWarning``) and the launch takes the heuristic (or tunes again).

Framework-free: the launchers pass device names, dtype names and element sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

from bitempered.bindings.common import private_files
from bitempered.bindings.common.interpreter import interpreted
from bitempered.kernels import launch_config
from bitempered.kernels.launch_config import BinaryConfig, RowConfig

ENV_SWITCH = "BITEMPERED_AUTOTUNE"
ENV_CACHE_DIR = "BITEMPERED_CACHE_DIR"
CACHE_FORMAT = 1
INTERPRETER_DEVICE = "triton-interpreter"
# do_bench's warm-up and repetition windows (ms). Per candidate: ~10 ms of runs after compiling;
# the loss at 16K x 32K fp32 takes ~1 ms, so the median is over ~10 repetitions.
WARMUP_MS = 5
REP_MS = 10
ROW_FAMILIES = ("loss", "softmax_fwd", "softmax_bwd")
BINARY_FAMILIES = ("binary_loss", "sigmoid_fwd", "sigmoid_bwd")
# Bounds of a launchable config (what a pinned or cached one may ask for; the candidate sets stay
# far inside them). Beyond them Triton or ptxas refuses the kernel: an error in the loss.
MAX_TILE = 1 << 20           # elements of one block: Triton's TRITON_MAX_TENSOR_NUMEL
MAX_THREAD_REGISTERS = 255   # PTX's per-thread cap (maxnreg)
BLOCK_REGISTERS = 1 << 16    # registers of one block (sm_80, sm_90): num_warps * 32 * maxnreg
MAX_STAGES = 4               # software-pipelined chunk buffers: more can exceed shared memory


class CacheWarning(UserWarning):
    """A cache file or entry was ignored, or a tuned config could not be stored."""


_enabled: bool | None = None  # None: follow the environment variable
_pinned: list = []            # configs forced by ``pinned`` (benchmarks, tests), innermost last
_recorders: list[list] = []   # open ``recording`` blocks
_lock = threading.Lock()
_memory: dict[Path, dict] = {}  # cache file -> its loaded content (this process)
_warned: set[str] = set()       # problems already reported by a CacheWarning (once each)


# --------------------------------------------------------------------------------------------
# Switch
# --------------------------------------------------------------------------------------------

def set_enabled(enabled: bool | None) -> bool:
    """Turns autotuning on or off for this process (None: back to ``$BITEMPERED_AUTOTUNE``);
    returns whether it was on before."""
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"autotune: enabled must be a bool or None, got {enabled!r}")
    was = is_enabled()
    _enabled = enabled
    return was


def is_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def pinned(config: RowConfig | BinaryConfig):
    """Every launch of a kernel of this config's kind uses ``config`` (tuning on or off): how
    ``python -m bitempered.tune --report`` times the heuristic and the tuned config side by side.
    The config must be valid (``config_problem``), checked here and, for the C of each launch
    inside (an on-chip one needs block_cols >= C), at the launch."""
    if not isinstance(config, (RowConfig, BinaryConfig)):
        raise TypeError(f"pinned: config must be a RowConfig or BinaryConfig, got {config!r}")
    problem = config_problem(config)
    if problem:
        raise ValueError(f"pinned: {problem}")
    _pinned.append(config)
    try:
        yield config
    finally:
        _pinned.pop()


@contextlib.contextmanager
def recording():
    """Collects the (device, key, tuned_now) of every tuned lookup inside the block."""
    keys: list = []
    _recorders.append(keys)
    try:
        yield keys
    finally:
        _recorders.remove(keys)


def _pinned_of(kind):
    return next((c for c in reversed(_pinned) if isinstance(c, kind)), None)


# --------------------------------------------------------------------------------------------
# Validity of a config (pinned by a user or read from a cache)
# --------------------------------------------------------------------------------------------

def config_problem(config: RowConfig | BinaryConfig, n_cols: int | None = None) -> str:
    """'' when ``config`` launches its kernels correctly (for rows of ``n_cols`` classes, when
    given); else what is wrong, naming the field. Blocks are powers of two (``tl.arange``); an
    on-chip row config must hold the whole row (block_cols >= C), else it computes a wrong loss."""
    if isinstance(config, RowConfig):
        if not isinstance(config.chunked, bool):
            return f"chunked must be a bool, got {config.chunked!r}"
        problem = (_power_of_two(config.block_rows, "block_rows", MAX_TILE)
                   or _power_of_two(config.block_cols, "block_cols", MAX_TILE))
        if not problem and config.block_rows * config.block_cols > MAX_TILE:
            problem = (f"block_rows * block_cols = {config.block_rows * config.block_cols} "
                       f"> {MAX_TILE} elements")
        if not problem and n_cols is not None and not config.chunked and config.block_cols < n_cols:
            problem = f"on-chip block_cols={config.block_cols} < C={n_cols}"
    elif isinstance(config, BinaryConfig):
        problem = _power_of_two(config.block, "block", MAX_TILE // 2)  # a [block, 2] tile
    else:
        return f"config must be a RowConfig or BinaryConfig, got {config!r}"
    return problem or _launch_problem(config)


def _launch_problem(config) -> str:
    problem = _power_of_two(config.num_warps, "num_warps", launch_config.MAX_BLOCK_WARPS)
    if not problem and config.maxnreg is not None:
        problem = _integer_in(config.maxnreg, "maxnreg", MAX_THREAD_REGISTERS)
        if not problem and config.num_warps * 32 * config.maxnreg > BLOCK_REGISTERS:
            problem = (f"num_warps={config.num_warps} x 32 threads x maxnreg={config.maxnreg} "
                       f"> {BLOCK_REGISTERS} registers per block")
    if not problem and config.num_stages is not None:
        problem = _integer_in(config.num_stages, "num_stages", MAX_STAGES)
    return problem


def _integer_in(value, name: str, limit: int) -> str:
    if type(value) is not int or not 1 <= value <= limit:  # not a bool, not a float
        return f"{name} must be an int in [1, {limit}], got {value!r}"
    return ""


def _power_of_two(value, name: str, limit: int) -> str:
    problem = _integer_in(value, name, limit)
    if not problem and value & (value - 1):
        problem = f"{name} must be a power of two, got {value}"
    return problem


# --------------------------------------------------------------------------------------------
# Cache identity
# --------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bitempered"


def cache_path(device: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown"
    return cache_dir() / f"autotune-{slug}.json"


def triton_version() -> str:
    import triton

    return triton.__version__


@functools.lru_cache(maxsize=1)
def kernel_source_hash() -> str:
    """sha256 of every kernel source file (name and bytes): an edited kernel invalidates."""
    digest = hashlib.sha256()
    for path in sorted(Path(launch_config.__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(device: str) -> dict:
    return {"format": CACHE_FORMAT, "device": device, "triton": triton_version(),
            "kernels": kernel_source_hash()}


def cache_key(family: str, n_cols: int | None, dtype: str, labels: str = "-",
              need_grad: bool = False, original: bool = False) -> str:
    bucket = "-" if n_cols is None else str(launch_config.next_power_of_2(n_cols))
    return (f"{family}|C<={bucket}|{dtype}|labels={labels}|need_grad={int(bool(need_grad))}"
            f"|original={int(bool(original))}")


# --------------------------------------------------------------------------------------------
# Cache file
# --------------------------------------------------------------------------------------------

def _load(device: str) -> dict:
    """The entries of this device's cache file; {} when absent, stale, untrusted or damaged."""
    path = cache_path(device)
    current = fingerprint(device)
    cached = _memory.get(path)
    if cached is not None and cached["fingerprint"] == current:
        return cached["entries"]
    entries = _read_entries(path, current)
    _memory[path] = {"fingerprint": current, "entries": entries}
    return entries


def _read_entries(path: Path, current: dict) -> dict:
    """A file of another Triton or of edited kernels is stale: silently replaced by the next
    write. One that cannot be trusted or parsed is ignored with a warning."""
    try:
        text = private_files.read_private(path).decode("utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # ValueError: not UTF-8
        _warn(f"autotune cache {path} ignored: {error} (or set ${ENV_CACHE_DIR} to a private folder)")
        return {}
    try:
        content = json.loads(text)
    except (ValueError, RecursionError) as error:
        _warn(f"autotune cache {path} ignored: not JSON ({error})")
        return {}
    if not isinstance(content, dict):
        _warn(f"autotune cache {path} ignored: not a JSON object")
        return {}
    if {k: content.get(k) for k in current} != current:
        return {}
    entries = content.get("entries")
    if not isinstance(entries, dict):
        _warn(f"autotune cache {path} ignored: 'entries' is {type(entries).__name__}, not an object")
        return {}
    return entries


def _store(device: str, key: str, entry: dict) -> None:
    """Adds one entry; merges with what other processes wrote meanwhile; atomic replace."""
    path = cache_path(device)
    _memory.pop(path, None)
    entries = dict(_load(device))
    entries[key] = entry
    _write(path, device, entries)


def _write(path: Path, device: str, entries: dict) -> None:
    """Kept in this process in any case; a folder that cannot be written (read-only, full, not
    private) only costs the other processes a tuning run, with a warning."""
    _memory[path] = {"fingerprint": fingerprint(device), "entries": dict(entries)}
    content = dict(fingerprint(device), entries=dict(sorted(entries.items())))
    try:
        private_files.make_private_folder(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(content, f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as error:
        _warn(f"autotune cache {path} not written ({error}): the tuned configs stay in this "
              f"process only", once=f"not written: {path}")  # the error names a random file


def _warn(message: str, once: str | None = None) -> None:
    """Each problem (``once``, default the message) is reported once per process."""
    once = once or message
    if once not in _warned:
        _warned.add(once)
        warnings.warn(message, CacheWarning, stacklevel=2)


def cached_entry(device: str, key: str) -> dict | None:
    """The entry as stored (any content: ``cached_config`` validates it)."""
    with _lock:
        return _load(device).get(key)


def cached_config(kind, device: str, key: str, n_cols: int | None = None):
    """The cached config of ``key`` if it is a valid ``kind`` (RowConfig or BinaryConfig) for
    rows of ``n_cols`` classes; else None, with a warning when an entry was there."""
    entry = cached_entry(device, key)
    if entry is None:
        return None
    try:
        config = kind(**entry["config"])
        problem = config_problem(config, n_cols)
    except (KeyError, TypeError) as error:  # not a dict, no config, other fields
        problem = f"not a {kind.__name__} entry ({type(error).__name__}: {error})"
    if problem:
        _warn(f"autotune cache {cache_path(device)}: entry {key!r} ignored: {problem}")
        return None
    return config


def forget(device: str, keys=None) -> None:
    """Drops the given keys (all when None) from this device's cache file (retuning)."""
    with _lock:
        path = cache_path(device)
        entries = _load(device)
        kept = {} if keys is None else {k: v for k, v in entries.items() if k not in set(keys)}
        _memory.pop(path, None)
        if path.exists():
            _write(path, device, kept)


def clear_memory() -> None:
    """Forgets what this process loaded and warned about (tests; after editing the file by hand)."""
    _memory.clear()
    _warned.clear()


# --------------------------------------------------------------------------------------------
# Timing and selection
# --------------------------------------------------------------------------------------------

def measure_ms(run: Callable[[], None], warmup_ms: float = WARMUP_MS, rep_ms: float = REP_MS) -> float:
    """Time of one run: do_bench median (L2 flushed before each run, over windows of ``warmup_ms``
    and ``rep_ms``) on a GPU, one wall-clock run under the interpreter."""
    if interpreted():
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _time_candidates(candidates, bench) -> list[float]:
    times = []
    for config in candidates:
        try:
            times.append(measure_ms(lambda config=config: bench(config)))
        except Exception:  # noqa: BLE001 - a candidate that does not compile is not taken
            if config == candidates[0]:
                raise  # the heuristic itself failing is a real error
            times.append(math.inf)
    return times


def _select(kind, device: str, key: str, n_cols, heuristic, candidates, make_bench):
    config = cached_config(kind, device, key, n_cols)
    if config is not None:
        _record(device, key, False)
        return config
    bench = make_bench() if make_bench is not None else None
    if bench is None:  # nothing to time here (JAX, a CUDA graph being captured)
        return heuristic
    _record(device, key, True)
    times = _time_candidates(candidates, bench)
    best = min(range(len(candidates)), key=lambda i: times[i])
    entry = {
        "config": dataclasses.asdict(candidates[best]),
        "time_ms": times[best],
        "heuristic": dataclasses.asdict(heuristic),
        "heuristic_ms": times[0],
        "candidates": len(candidates),
        "timer": "wall-clock (interpreter)" if interpreted() else "do_bench median",
    }
    with _lock:
        _store(device, key, entry)
    return candidates[best]


def _record(device: str, key: str, tuned_now: bool) -> None:
    for keys in _recorders:
        keys.append((device, key, tuned_now))


def row_config(family: str, n_cols: int, dtype: str, elem_bytes: int, *,
               device: str | Callable[[], str], labels: str = "-", need_grad: bool = False,
               original: bool = False, strided: bool = False,
               make_bench: Callable[[], Callable[[RowConfig], None] | None] | None = None
               ) -> RowConfig:
    """Launch configuration of a row kernel: the heuristic when autotuning is off; else the cached
    best, or (on a miss, when ``make_bench`` is given) the fastest candidate, timed now.

    ``device``: the cache's device name, or a function giving it (called only when tuning is on).
    ``make_bench()`` returns ``bench(config)``, one launch with ``config`` into scratch outputs,
    or None where nothing may be timed; it is called only on a cache miss with autotuning on.
    ``strided``: classes not contiguous (NCHW logits read in place): the heuristic, never tuned
    (the candidate sets are for unit class stride).
    """
    heuristic = launch_config.row_config(n_cols, elem_bytes, strided)
    forced = _pinned_of(RowConfig)
    if forced is not None:
        problem = config_problem(forced, n_cols)
        if problem:
            raise ValueError(f"pinned: {problem}")
        return forced
    if strided or not is_enabled():
        return heuristic
    key = cache_key(family, n_cols, dtype, labels, need_grad, original)
    candidates = launch_config.row_candidates(n_cols, elem_bytes, interpreted())
    return _select(RowConfig, _name(device), key, n_cols, heuristic, candidates, make_bench)


def binary_config(family: str, dtype: str, *, device: str | Callable[[], str],
                  need_grad: bool = False, original: bool = False,
                  make_bench: Callable[[], Callable[[BinaryConfig], None] | None] | None = None
                  ) -> BinaryConfig:
    """As ``row_config``, for the elementwise binary kernels (no C in the key)."""
    heuristic = launch_config.binary_config()
    forced = _pinned_of(BinaryConfig)
    if forced is not None:
        return forced
    if not is_enabled():
        return heuristic
    key = cache_key(family, None, dtype, "-", need_grad, original)
    candidates = launch_config.binary_candidates(interpreted())
    return _select(BinaryConfig, _name(device), key, None, heuristic, candidates, make_bench)


def _name(device) -> str:
    return device() if callable(device) else device


def entries(device: str) -> dict:
    """Every valid cached entry of ``device`` (for reports)."""
    with _lock:
        return dict(_load(device))
