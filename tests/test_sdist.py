"""The source distribution is complete: its tests run from it (the float64 reference, the conftest),
and it carries the license, the math contract and the kernels' notes that the README links to."""

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory):
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("sdist")
    source = out / "src"
    # a copy of the tracked tree only: the sdist must not depend on build leftovers
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; b.build_sdist('dist')"],
                   cwd=source, check=True, capture_output=True, timeout=300)
    (archive,) = (source / "dist").glob("bitempered-*.tar.gz")
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


@pytest.mark.parametrize("name", ["LICENSE", "README.md", "docs/math.md", "kernels/README.md",
                                  "kernels/cross_entropy_cpu.c", "tests/reference.py", "tests/conftest.py",
                                  "tests/distributed.py", "tests/multidevice.py", "perf/harness.py"])
def test_sdist_holds(sdist_names, name):
    assert name in sdist_names


def test_every_test_module_is_in_the_sdist(sdist_names):
    tests = {f"tests/{p.name}" for p in (ROOT / "tests").glob("*.py")}
    assert tests <= sdist_names, sorted(tests - sdist_names)
