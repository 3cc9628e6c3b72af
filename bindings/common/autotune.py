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
from pathlib import Path
from typing import Callable

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

_enabled: bool | None = None  # None: follow the environment variable
_pinned: list = []            # configs forced by ``pinned`` (benchmarks, tests), innermost last
_recorders: list[list] = []   # open ``recording`` blocks
_lock = threading.Lock()
_memory: dict[Path, dict] = {}  # cache file -> its loaded content (this process)


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
    ``perf/tuning.py`` times the heuristic and the tuned config side by side. The config must be
    valid for the launches inside (an on-chip one needs block_cols >= C)."""
    if not isinstance(config, (RowConfig, BinaryConfig)):
        raise TypeError(f"pinned: config must be a RowConfig or BinaryConfig, got {config!r}")
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


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


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
    """The entries of this device's cache file, {} when absent, unreadable or stale."""
    path = cache_path(device)
    current = fingerprint(device)
    cached = _memory.get(path)
    if cached is not None and cached["fingerprint"] == current:
        return cached["entries"]
    entries = {}
    try:
        content = json.loads(path.read_text())
        if {k: content.get(k) for k in current} == current:
            entries = dict(content.get("entries", {}))
    except (OSError, ValueError, AttributeError):
        pass
    _memory[path] = {"fingerprint": current, "entries": entries}
    return entries


def _store(device: str, key: str, entry: dict) -> None:
    """Adds one entry; merges with what other processes wrote meanwhile; atomic replace."""
    path = cache_path(device)
    _memory.pop(path, None)
    entries = dict(_load(device))
    entries[key] = entry
    _write(path, device, entries)


def _write(path: Path, device: str, entries: dict) -> None:
    content = dict(fingerprint(device), entries=dict(sorted(entries.items())))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    _memory[path] = {"fingerprint": fingerprint(device), "entries": dict(entries)}


def cached_entry(device: str, key: str) -> dict | None:
    with _lock:
        return _load(device).get(key)


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
    """Forgets what this process loaded (tests; after editing the file by hand)."""
    _memory.clear()


# --------------------------------------------------------------------------------------------
# Timing and selection
# --------------------------------------------------------------------------------------------

def measure_ms(run: Callable[[], None]) -> float:
    """Time of one run: do_bench median on a GPU, one wall-clock run under the interpreter."""
    if interpreted():
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(run, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


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


def _select(kind, device: str, key: str, heuristic, candidates, make_bench):
    entry = cached_entry(device, key)
    if entry is not None:
        try:
            config = kind(**entry["config"])
            _record(device, key, False)
            return config
        except (KeyError, TypeError):
            pass  # an entry of another layout: tune again
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
               original: bool = False,
               make_bench: Callable[[], Callable[[RowConfig], None] | None] | None = None
               ) -> RowConfig:
    """Launch configuration of a row kernel: the heuristic when autotuning is off; else the cached
    best, or (on a miss, when ``make_bench`` is given) the fastest candidate, timed now.

    ``device``: the cache's device name, or a function giving it (called only when tuning is on).
    ``make_bench()`` returns ``bench(config)``, one launch with ``config`` into scratch outputs,
    or None where nothing may be timed; it is called only on a cache miss with autotuning on.
    """
    heuristic = launch_config.row_config(n_cols, elem_bytes)
    forced = _pinned_of(RowConfig)
    if forced is not None:
        if not forced.chunked and forced.block_cols < n_cols:
            raise ValueError(f"pinned: on-chip block_cols={forced.block_cols} < C={n_cols}")
        return forced
    if not is_enabled():
        return heuristic
    key = cache_key(family, n_cols, dtype, labels, need_grad, original)
    candidates = launch_config.row_candidates(n_cols, elem_bytes, interpreted())
    return _select(RowConfig, _name(device), key, heuristic, candidates, make_bench)


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
    return _select(BinaryConfig, _name(device), key, heuristic, candidates, make_bench)


def _name(device) -> str:
    return device() if callable(device) else device


def entries(device: str) -> dict:
    """Every valid cached entry of ``device`` (for reports)."""
    with _lock:
        return dict(_load(device))
