"""The CPU C kernel's cache (bindings/torch/native/cpu_kernel.py) maps only what it verified:
a damaged library (issue 27: a truncated one crashed the process with SIGBUS inside dlopen) is
rebuilt, a library of another user (issue 28: its constructor ran) is never loaded, and each time
``status()`` says why and the loss is still right. Each case loads in a fresh process, as the
next training run would."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import reference as ref
from bitempered.bindings.torch.native import cpu_kernel as cpu_kernels
from test_cpu_kernels import BUILDABLE, TOL

pytestmark = pytest.mark.skipif(not BUILDABLE, reason="no C compiler or not x86-64 Linux")

OTHER_USER = 65534  # nobody
FRESH_PROCESS_TIMEOUT_S = 180  # a compile and torch's import, on a busy 2-core machine

# The loss and its gradient through the public API, t1 = t2 = 1, float32 dense labels: the C kernel's case.
CHILD = """
import json, torch
from bitempered import torch as bt
from bitempered.bindings.torch.native import cpu_kernel
generator = torch.Generator().manual_seed(0)
logits = (torch.randn(64, 300, generator=generator) * 3).requires_grad_()
labels = torch.softmax(torch.randn(64, 300, generator=generator), -1)
loss = bt.bi_tempered_logistic_loss(logits, labels, 1.0, 1.0, reduction="none")
loss.sum().backward()
print(json.dumps({"status": cpu_kernel.status(), "loss": loss.tolist(), "grad": logits.grad.tolist()}))
"""


def _fresh_process(cache, temporary) -> str:
    """Runs CHILD with these cache and temporary folders; checks it lived and its values; its status()."""
    env = {**os.environ, "BITEMPERED_CACHE_DIR": str(cache), "TMPDIR": str(temporary)}
    env.pop(cpu_kernels.ENV_SWITCH, None)
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=FRESH_PROCESS_TIMEOUT_S)
    assert done.returncode == 0, f"exit {done.returncode} (-7: SIGBUS): {done.stderr[-3000:]}"
    got = json.loads(done.stdout.strip().splitlines()[-1])
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 300, generator=generator) * 3).double().numpy()
    labels = torch.softmax(torch.randn(64, 300, generator=generator), -1).double().numpy()
    np.testing.assert_allclose(got["loss"], ref.loss(logits, labels, 1.0, 1.0), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(got["grad"], ref.loss_grad(logits, labels, 1.0, 1.0), rtol=TOL, atol=1e-7)
    return got["status"]


@pytest.fixture(scope="module")
def build_key():
    return cpu_kernels._build_key(cpu_kernels._compiler())


@pytest.fixture(scope="module")
def good_library(tmp_path_factory, build_key):
    """A good build: (its file name, its bytes)."""
    path = cpu_kernels._compile(cpu_kernels._compiler(), tmp_path_factory.mktemp("good"), build_key)
    return path.name, path.read_bytes()


@pytest.fixture
def folders(tmp_path):
    """An empty private cache folder and an empty private temporary folder (the per-user fallback
    folder is ``bitempered-<uid>`` inside it)."""
    cache, temporary = tmp_path / "cache", tmp_path / "tmp"
    cache.mkdir(mode=0o700)
    temporary.mkdir(mode=0o700)
    return cache, temporary


@pytest.mark.parametrize("size", [100, 4000, 8000, 20000])
def test_a_truncated_library_is_rebuilt_not_mapped(folders, good_library, size):
    cache, temporary = folders
    name, good = good_library
    assert len(good) > size
    (cache / name).write_bytes(good[:size])  # a disk that filled up, a partial copy of the cache
    (cache / name).chmod(0o700)
    status = _fresh_process(cache, temporary)
    assert status.startswith(f"in use: {cache / name}"), status  # rebuilt, under the same name
    assert f"{cache / name}: damaged: its {size} bytes" in status, status
    assert (cache / name).read_bytes() == good


def test_a_library_of_this_user_that_others_may_write_is_rebuilt(folders, good_library):
    cache, temporary = folders
    name, good = good_library
    (cache / name).write_bytes(good)
    (cache / name).chmod(0o775)
    status = _fresh_process(cache, temporary)
    assert status.startswith(f"in use: {cache / name}") and "writable by other users (-rwxrwxr-x" in status, status
    assert (cache / name).stat().st_mode & 0o777 == 0o700


def _planted_library(directory, build_key, marker):
    """A library owned by another user whose constructor creates ``marker``, under a name the
    loader looks for (the kernel's build key, the sha256 of its own bytes)."""
    source = directory / "planted.c"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) '
                      '{ FILE *f = fopen(MARKER, "w"); if (f) fclose(f); }\n')
    built = directory / "planted.so"
    subprocess.run(cpu_kernels._compiler() + ["-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(built)],
                   check=True, capture_output=True, timeout=120)
    path = directory / cpu_kernels._entry_name(build_key, hashlib.sha256(built.read_bytes()).hexdigest())
    built.rename(path)
    source.unlink()
    path.chmod(0o755)
    os.chown(path, OTHER_USER, OTHER_USER)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="planting a file owned by another user needs root")
@pytest.mark.parametrize("where", ["cache folder", "temporary folder", "temporary folder of another user"])
def test_a_library_of_another_user_is_never_loaded(folders, build_key, tmp_path, where):
    cache, temporary = folders
    marker = tmp_path / "the planted constructor ran"
    fallback = temporary / f"bitempered-{os.getuid()}"
    if where == "cache folder":
        planted = _planted_library(cache, build_key, marker)
    else:
        cache.chmod(0o777)  # refused: anyone could plant there
        fallback.mkdir(mode=0o700)
        planted = _planted_library(fallback, build_key, marker)
        if where == "temporary folder of another user":  # made first by someone predicting its name
            fallback.chmod(0o777)
            os.chown(fallback, OTHER_USER, OTHER_USER)
    status = _fresh_process(cache, temporary)
    assert not marker.exists(), status
    if where == "cache folder":
        assert status.startswith(f"in use: {cache}"), status
        assert f"{planted}: owned by uid {OTHER_USER}, not this user" in status, status
        return
    assert f"folder {cache}: writable by other users (drwxrwxrwx" in status, status
    if where == "temporary folder":
        assert status.startswith(f"in use: {fallback}"), status
        assert f"{planted}: owned by uid {OTHER_USER}, not this user" in status, status
    else:  # no folder left to trust: built into a private folder for this process, then removed
        assert f"folder {fallback}: owned by uid {OTHER_USER}, not this user" in status, status
        assert status.startswith(f"in use: {temporary}") and "(built for this process only)" in status, status
        assert [p.name for p in temporary.iterdir() if p.name.startswith("bitempered-")] == [fallback.name]
