"""The CPU path's C kernel (``kernels/cross_entropy_cpu.c``), compiled on first use and cached.

Eager torch ops cannot fuse a row's passes on the CPU, and at t1 = t2 = 1 with dense labels that
costs SPEC's loss 1.3-1.6x ``F.cross_entropy`` (the labels' own log, which cross-entropy does not
take, plus ten passes). The fused C kernel reads each row while it is in the core's cache.

It is built the first time it is needed, with the system's GCC (``$CC``, else ``cc``),
OpenMP (the same libgomp torch's CPU build loads, so it shares torch's threads) and glibc's vector
math library (SIMD ``expf``/``logf``, one clone per x86-64 level), into the cache directory the
autotuner uses (``$BITEMPERED_CACHE_DIR``, else ``$XDG_CACHE_HOME/bitempered``, else
``~/.cache/bitempered``; a per-user temporary folder if that is read-only), under a name hashed
from the source, the compiler and the flags (~0.3 s, once). After loading it must reproduce a
float64 evaluation of a small fixed problem.

Where any of that is missing (another OS or architecture, no GCC, a failed build, load or
self-check) or ``BITEMPERED_CPU_KERNELS=0`` is set (or inside ``switched_off()``),
``dense_cross_entropy()`` is None and the callers keep their eager torch path, which gives the same
values to float32 rounding.
``status()`` says which, and why.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bitempered import kernels

ENV_SWITCH = "BITEMPERED_CPU_KERNELS"
SOURCE = Path(kernels.__file__).resolve().parent / "cross_entropy_cpu.c"
FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
LIBS = ("-lmvec", "-lm")
COMPILE_TIMEOUT_S = 120

_lock = threading.Lock()
_state: dict = {}  # "function" (or None) and "reason", once decided in this process
_switched_off = contextvars.ContextVar("bitempered_cpu_kernels_off", default=False)


def enabled() -> bool:
    return not _switched_off.get() and \
        os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def switched_off():
    """Runs the eager path inside (benchmarks and tests compare the two)."""
    token = _switched_off.set(True)
    try:
        yield
    finally:
        _switched_off.reset(token)


def dense_cross_entropy():
    """The C function ``bitempered_dense_cross_entropy_f32`` (ctypes; it releases the GIL), or None
    where it is unavailable (see ``status``). Built and checked once per process."""
    if not enabled():
        return None
    if "function" not in _state:
        with _lock:
            if "function" not in _state:
                _state["function"], _state["reason"] = _load()
    return _state["function"]


def status() -> str:
    """Whether the C kernel is in use, and if not, why."""
    if not enabled():
        return f"off: {ENV_SWITCH}={os.environ.get(ENV_SWITCH)}" if not _switched_off.get() else "off: switched_off()"
    dense_cross_entropy()
    return _state["reason"]


def _compiler() -> list[str] | None:
    command = shlex.split(os.environ.get("CC") or "cc")
    return command if command and shutil.which(command[0]) else None


def _load():
    if not (sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")):
        return None, f"unavailable: the C kernel is built for x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    compiler = _compiler()
    if compiler is None:
        return None, "unavailable: no C compiler ($CC or cc)"
    try:
        path = _build(compiler)
        function = _bind(ctypes.CDLL(str(path)))
        error = _self_check(function)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the eager path runs and status() says why
        return None, f"unavailable: {type(exc).__name__}: {exc}"
    if error:
        return None, f"unavailable: the built kernel failed its self-check ({error})"
    return function, f"in use: {path}"


def _build(compiler: list[str]) -> Path:
    version = subprocess.run(compiler + ["--version"], capture_output=True, text=True,
                             timeout=COMPILE_TIMEOUT_S).stdout
    if "clang" in version.lower() or not ("gcc" in version.lower() or "free software foundation" in version.lower()):
        # OpenMP must be the libgomp torch loads (clang's libomp would add a second thread pool),
        # and only GCC's vectorizer is known to call glibc's SIMD expf/logf from these loops
        raise RuntimeError(f"the kernel is built with GCC only; {' '.join(compiler)} is "
                           f"{(version.splitlines() or ['unknown'])[0]!r}")
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(compiler).encode(), version.encode(), " ".join(FLAGS + LIBS).encode()):
        digest.update(part)
    name = f"cross_entropy_cpu-{digest.hexdigest()[:16]}.so"
    for directory in _cache_dirs():
        if (directory / name).exists():
            return directory / name
    for directory in _cache_dirs():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            return _compile(compiler, directory / name)
        except PermissionError:  # a read-only cache directory: the next one
            continue
    raise RuntimeError(f"no writable cache directory among {[str(d) for d in _cache_dirs()]}")


def _cache_dirs() -> list[Path]:
    from bitempered.bindings.common import autotune  # the cache directory the autotuner uses, then a per-user temporary one

    return [autotune.cache_dir(), Path(tempfile.gettempdir()) / f"bitempered-{os.getuid()}"]


def _compile(compiler: list[str], path: Path) -> Path:
    directory = path.parent
    # build under a temporary name and rename: processes that build at once (DDP ranks) never
    # load a half-written library
    handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(handle)
    try:
        done = subprocess.run(compiler + list(FLAGS) + [str(SOURCE), "-o", partial] + list(LIBS),
                              capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return path


def _bind(library):
    function = library.bitempered_dense_cross_entropy_f32
    pointer, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    function.argtypes = [pointer, i64, pointer, i64, pointer, i64, pointer, i64, i64, f32, f32, f32, ctypes.c_int]
    function.restype = i64
    return function


def _self_check(function) -> str:
    """'' if the kernel gives what the eager blocks it replaces give (the native backend's ground
    truth, ``torch_native_loss._cross_entropy``) on fixed rows long enough for the SIMD loops and
    their tails: y = 0 classes, with smoothing, and without it a 0 label at a -inf logit; else what
    differed."""
    import torch

    from bitempered.bindings.torch.native import loss as native_loss

    generator = torch.Generator().manual_seed(0)
    n, c = 3, 37
    for smoothing in (0.05, 0.0):
        logits = torch.randn(n, c, generator=generator) * 4.0
        labels = torch.softmax(torch.randn(n, c, generator=generator), -1)
        labels[:, ::5] = 0.0
        if smoothing == 0.0:
            logits[1, 5] = -math.inf
        grad, want_grad = torch.empty_like(logits), torch.empty_like(logits)
        with switched_off():
            want = native_loss._cross_entropy(logits, labels, False, smoothing, torch.tensor(0.25).expand(n),
                                              want_grad, False)
        keep, floor = native_loss.native.smoothing_coefficients(smoothing, c)
        loss = torch.empty(n)
        bad = function(logits.data_ptr(), c, labels.data_ptr(), c, grad.data_ptr(), c, loss.data_ptr(), n, c,
                       keep, floor, 0.25, 1)
        if bad != 0:
            return f"{bad} labels reported outside [0, 1]"
        if not torch.allclose(loss, want, rtol=1e-5, atol=1e-5):
            return f"smoothing {smoothing}: losses {loss.tolist()} != {want.tolist()}"
        if not torch.allclose(grad, want_grad, rtol=1e-5, atol=1e-7):
            return f"smoothing {smoothing}: gradients differ by up to {float((grad - want_grad).abs().max()):.3g}"
    return ""
