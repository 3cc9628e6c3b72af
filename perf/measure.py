"""Device facts, timers, the copy-bandwidth measurement and peak-memory probes.

Timers:
- CUDA, torch providers: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
  call, warm-up by time) with quantiles (median, p20, p80), over rotating input sets.
- CUDA, JAX providers: wall clock around the call + ``block_until_ready`` (CUDA events of torch's
  stream do not see XLA's streams); includes Python dispatch (tens of microseconds).
- CPU: ``time.perf_counter`` around each call (JAX results ``block_until_ready``), after warm-up;
  median, p20, p80 of the repeats. The providers of a cell are timed INTERLEAVED
  (``interleaved_wall_clock``): in rounds, each provider taking a short slice of calls in turn,
  so that a slow stretch of a shared machine hits all of them alike and their ratios hold.
- CPU allocator: glibc serves a large buffer either from a heap it keeps or by mapping fresh pages
  (page-faulted on first touch), and which one depends on the process's allocation history (its
  threshold adapts), so one provider can time 2x apart in two runs. ``pin_allocator`` fixes one of
  two regimes (``ALLOCATORS``) with ``mallopt`` before a CPU measurement.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Device, run identity
# --------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\b(cpu|processor)\b|@.*$", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return "cpu-" + slugify(cpu_model())


def git_sha() -> str:
    """Short HEAD SHA, with "-dirty" when the tree has changes; "unknown" outside a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Timers
# --------------------------------------------------------------------------------------------

def _quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    if len(samples_ms) == 1:
        return samples_ms[0], samples_ms[0], samples_ms[0]
    cuts = statistics.quantiles(samples_ms, n=10, method="inclusive")
    return statistics.median(samples_ms), cuts[1], cuts[7]


def wall_clock(call, n_sets: int, warmup: int, min_reps: int, max_reps: int, min_time_s: float):
    """(median, p20, p80 in ms, repeats) of ``call(i)`` (which must block until done): the
    interleaved timer with one call."""
    return interleaved_wall_clock({"call": call}, n_sets, warmup, min_reps, max_reps, min_time_s)["call"]


def interleaved_wall_clock(calls: dict, n_sets: int, warmup: int, min_reps: int, max_reps: int,
                           min_time_s: float, slice_s: float = 0.05) -> dict:
    """{name: (median, p20, p80 in ms, repeats)} of the ``calls`` (name -> ``call(i)``, each
    blocking until done), timed in rounds: in each round every call runs for a slice of about
    ``slice_s`` (at least once), in an order that rotates from round to round. Rounds go on until
    every call has ``min_reps`` repeats and has spent ``min_time_s`` (or has ``max_reps``)."""
    for call in calls.values():
        for i in range(warmup):
            call(i % n_sets)
    samples = {name: [] for name in calls}
    spent = dict.fromkeys(calls, 0.0)
    names = list(calls)

    def wanted(name):
        reps = len(samples[name])
        return reps < max_reps and (reps < min_reps or spent[name] < min_time_s)

    rounds = 0
    while any(wanted(name) for name in names):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            slice_start = time.perf_counter()
            while wanted(name):
                t0 = time.perf_counter()
                calls[name](len(samples[name]) % n_sets)
                elapsed = time.perf_counter() - t0
                samples[name].append(elapsed * 1e3)
                spent[name] += elapsed
                if time.perf_counter() - slice_start >= slice_s:
                    break
        rounds += 1
    return {name: (*_quantiles(values), len(values)) for name, values in samples.items()}


ALLOCATORS = {
    "heap": "large buffers come from a heap that is kept and reused: no page faults once warm",
    "fresh": "every large buffer is mapped afresh and page-faulted on first touch",
}
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters


def pin_allocator(regime: str) -> str:
    """Pins glibc malloc to ``regime`` (a key of ``ALLOCATORS``) for the allocations that follow;
    returns it, or "default" where that is not possible (no glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return "default"
    # heap: nothing below 1 GiB is mapped, the heap is never trimmed and grows 64 MiB at a time
    # (after a few calls the freed buffers are reused, their pages already touched); fresh: every
    # buffer from 128 KiB up is mapped (a fixed threshold also stops glibc adapting it) and
    # returned when freed
    settings = {_M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: 2**31 - 1, _M_TOP_PAD: 64 << 20} if regime == "heap" \
        else {_M_MMAP_THRESHOLD: 128 << 10, _M_TRIM_THRESHOLD: 128 << 10, _M_TOP_PAD: 128 << 10}
    pinned = all(mallopt(param, value) == 1 for param, value in settings.items())
    return regime if pinned else "default"


def cuda_events(call, n_sets: int, warmup_ms: int, rep_ms: int):
    """(median, p20, p80 in ms, repeats) by triton.testing.do_bench over rotating input sets."""
    import triton.testing

    counter = [0]

    def rotating():
        call(counter[0] % n_sets)
        counter[0] += 1

    times = triton.testing.do_bench(rotating, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return (*times, counter[0])


# --------------------------------------------------------------------------------------------
# Copy bandwidth (the memory roof)
# --------------------------------------------------------------------------------------------

def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of ``dst.copy_(src)`` on ``nbytes``-byte fp32 tensors: 2 * nbytes per copy."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, quantiles=[0.5])[0]
    else:
        ms = wall_clock(lambda i: dst.copy_(src), 1, warmup=2, min_reps=7, max_reps=30, min_time_s=0.5)[0]
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


# --------------------------------------------------------------------------------------------
# Peak extra memory
# --------------------------------------------------------------------------------------------

def cuda_peak_extra(call, device: torch.device, output_bytes: int) -> float:
    """Bytes allocated at peak by one ``call()`` beyond what was live before it and its outputs."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = call()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return float(max(0, peak - before - output_bytes))
