"""The source distribution is complete: its tests run from it (the float64 reference, the conftest),
and it carries the license, the math contract and the kernels' notes that the README links to."""

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(the names in the sdist of a copy of the tracked tree, the folder it unpacks to)."""
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("sdist")
    source = out / "src"
    # a copy of the tracked tree only: the sdist must not depend on build leftovers
    for name in _tracked():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; b.build_sdist('dist')"],
                   cwd=source, check=True, capture_output=True, timeout=300)
    (archive,) = (source / "dist").glob("bitempered-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(out / "unpacked", filter="data")
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    (unpacked,) = (out / "unpacked").iterdir()
    return names, unpacked


def test_the_sdists_tests_run_from_it(sdist):
    """From the unpacked sdist: every test module imports (its helpers are there) and the layout
    tests pass on the sdist's own sources."""
    unpacked = sdist[1]
    run = lambda *args: subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                                       cwd=unpacked, capture_output=True, text=True, timeout=600)
    collected = run("--collect-only", "tests")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    layout = run("tests/test_layout.py")
    assert layout.returncode == 0, layout.stdout[-3000:]


@pytest.mark.parametrize("name", ["LICENSE", "README.md", "docs/math.md", "kernels/README.md",
                                  "kernels/cross_entropy_cpu.c", "tests/reference.py", "tests/conftest.py",
                                  "tests/distributed.py", "tests/multidevice.py", "perf/harness.py"])
def test_sdist_holds(sdist, name):
    assert name in sdist[0]


def test_every_tracked_test_module_is_in_the_sdist(sdist):
    tests = {name for name in _tracked() if name.startswith("tests/") and name.endswith(".py")}
    assert len(tests) > 20 and tests <= sdist[0], sorted(tests - sdist[0])
