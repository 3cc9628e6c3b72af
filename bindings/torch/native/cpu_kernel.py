"""The CPU path's C kernel (``kernels/cross_entropy_cpu.c``), compiled on first use and cached.

Eager torch ops cannot fuse a row's passes on the CPU, and at t1 = t2 = 1 with dense labels that
costs SPEC's loss 1.3-1.6x ``F.cross_entropy`` (the labels' own log, which cross-entropy does not
take, plus ten passes). The fused C kernel reads each row while it is in the core's cache.

It is built (~0.3 s) the first time it is needed, with the system's GCC (``$CC``, else ``cc``),
OpenMP (the same libgomp torch's CPU build loads, so it shares torch's threads) and glibc's vector
math library (SIMD ``expf``/``logf``, one clone per x86-64 level), into the cache directory the
autotuner uses (``$BITEMPERED_CACHE_DIR``, else ``$XDG_CACHE_HOME/bitempered``, else
``~/.cache/bitempered``), else a per-user temporary folder (``$TMPDIR/bitempered-<uid>``), else
(neither usable) a fresh private folder, for this process only. After loading it must
reproduce SPEC's general path (``native/math.py``, which also redoes the rows the kernel hands back)
on a small fixed problem.

A cached library is mapped only after it is verified, because mapping runs its code (a library
planted by another user would run its constructors) and a damaged one can kill the process
(a truncated file raises SIGBUS inside ``dlopen``):

- its folder and the file are owned by this user and writable by no one else (not group- or
  world-writable), and the file is a regular file, not a link;
- its bytes hash to the sha256 in its name, ``cross_entropy_cpu-<build key>-<sha256>.so``, recorded
  when it was built (the build key hashes the source, the compiler and the flags).

A folder that fails is not used; a file that fails is bypassed and rebuilt (GCC's output is
reproducible, so the rebuild replaces it under the same name). ``status()`` names each.

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

import torch

from bitempered import kernels
from bitempered.bindings.common import autotune, private_files
from bitempered.bindings.torch.native import math as native

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
    """Whether the C kernel is in use, and if not, why; then each cache folder or file not used, and why."""
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
    refused: list[str] = []  # cache folders and files not used, and why
    try:
        path, private = _verified_or_built(compiler, refused)
        try:  # by path, after the checks: only this user can replace it, by renaming a verified build
            function = _bind(ctypes.CDLL(str(path)))
        finally:
            if private:  # the mapping outlives the file
                shutil.rmtree(path.parent, ignore_errors=True)
        error = _self_check(function)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the eager path runs and status() says why
        return None, _noting(f"unavailable: {type(exc).__name__}: {exc}", refused)
    if error:
        return None, _noting(f"unavailable: the built kernel failed its self-check ({error})", refused)
    return function, _noting(f"in use: {path}" + (" (built for this process only)" if private else ""), refused)


def _noting(reason: str, refused: list[str]) -> str:
    return f"{reason} (not used: {'; '.join(refused)})" if refused else reason


def _verified_or_built(compiler: list[str], refused: list[str]) -> tuple[Path, bool]:
    """A verified cached library, else a new build in the first usable cache folder, else in a fresh
    private folder: (its path, whether it is that private folder's). Appends to ``refused``."""
    key = _build_key(compiler)
    usable = []
    for directory in _cache_dirs():
        problem = private_files.folder_problem(directory)
        if problem:
            refused.append(f"folder {directory}: {problem}")
            continue
        usable.append(directory)
        for entry in sorted(directory.glob(_entry_name(key, "*"))):
            problem = _entry_problem(entry, key)
            if not problem:
                return entry, False
            refused.append(f"{entry}: {problem}")
    for directory in usable:
        try:
            private_files.make_private_folder(directory)
            return _compile(compiler, directory, key), False
        except OSError as exc:  # not private, read-only or full: the next one
            refused.append(str(exc) if exc.strerror is None else f"folder {directory}: {exc.strerror}")
    return _compile(compiler, Path(tempfile.mkdtemp(prefix="bitempered-")), key), True


def _build_key(compiler: list[str]) -> str:
    """A hash of the source, the compiler and the flags: a change to any of them is a new build."""
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
    return digest.hexdigest()[:16]


def _entry_name(key: str, sha256: str) -> str:
    """The cached library's file name: its build key and the sha256 of its bytes ("*": any)."""
    return f"cross_entropy_cpu-{key}-{sha256}.so"


def _cache_dirs() -> list[Path]:
    """The autotuner's cache directory, then a per-user temporary one."""
    return [autotune.cache_dir(), Path(tempfile.gettempdir()) / f"bitempered-{os.getuid()}"]


def _entry_problem(path: Path, key: str) -> str:
    """'' if the cached library may be mapped, else why not: see the module docstring. Its bytes
    are read once, by ``private_files.read_private`` (owner and mode checked on the open file),
    and hashed."""
    try:
        content = private_files.read_private(path)
    except OSError as exc:
        return str(exc) if exc.strerror is None else f"cannot open it ({exc.strerror})"
    if path.name != _entry_name(key, hashlib.sha256(content).hexdigest()):
        return f"damaged: its {len(content)} bytes do not hash to the sha256 in its name"
    return ""


def _compile(compiler: list[str], directory: Path, key: str) -> Path:
    # build under a temporary name and rename: processes that build at once (DDP ranks) never
    # load a half-written library
    handle, partial = tempfile.mkstemp(suffix=".partial", dir=directory)
    os.close(handle)
    try:
        done = subprocess.run(compiler + list(FLAGS) + [str(SOURCE), "-o", partial] + list(LIBS),
                              capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {done.stderr.strip()[-500:]}")
        os.chmod(partial, 0o700)  # whatever the umask: the loader refuses group/world-writable files
        path = directory / _entry_name(key, hashlib.sha256(Path(partial).read_bytes()).hexdigest())
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
    """'' if the kernel gives what SPEC's general path gives (``native/math.py``: the native ground
    truth, which also redoes the rows the kernel hands back) on fixed rows long enough for the SIMD
    loops and their tails: y = 0 classes, with smoothing, and without it a 0 label at a -inf logit;
    else what differed."""
    generator = torch.Generator().manual_seed(0)
    n, c, scale = 3, 37, 0.25
    for smoothing in (0.05, 0.0):
        logits = torch.randn(n, c, generator=generator) * 4.0
        labels = torch.softmax(torch.randn(n, c, generator=generator), -1)
        labels[:, ::5] = 0.0
        if smoothing == 0.0:
            logits[1, 5] = -math.inf
        log_p = native.tempered_log_softmax_rows(logits, 1.0, None, compact=False)
        want, want_grad = native.loss_and_grad_rows(log_p, native.smooth_labels(labels, smoothing), 1.0, 1.0, True)
        keep, floor = native.smoothing_coefficients(smoothing, c)
        loss, grad = torch.empty(n), torch.empty(n, c)
        bad = function(logits.data_ptr(), c, labels.data_ptr(), c, grad.data_ptr(), c, loss.data_ptr(), n, c,
                       keep, floor, scale, 1)
        if bad != 0:
            return f"{bad} labels reported outside [0, 1]"
        if not torch.allclose(loss, want, rtol=1e-5, atol=1e-5):
            return f"smoothing {smoothing}: losses {loss.tolist()} != {want.tolist()}"
        if not torch.allclose(grad, scale * want_grad, rtol=1e-5, atol=1e-7):
            return f"smoothing {smoothing}: gradients differ by up to {float((grad - scale * want_grad).abs().max()):.3g}"
    return ""
