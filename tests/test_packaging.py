"""The installed import package is `bitempered`: no top-level `kernels` or `bindings` module."""

import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_only_bitempered_is_installed_at_top_level():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {name.split(".")[0] for name in config["packages"]} == {"bitempered"}
    assert config["package-dir"] == {"bitempered": "bitempered", "bitempered.kernels": "kernels",
                                     "bitempered.bindings": "bindings"}


def test_the_c_kernel_source_is_shipped(tmp_path):
    """bindings/torch/native/cpu_kernel.py compiles kernels/*.c on the user's machine: the wheel must hold it."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ there
    for name in ("bitempered", "kernels", "bindings"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("bitempered-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bitempered/kernels/cross_entropy_cpu.c" in names
    assert "bitempered/bindings/torch/native/cpu_kernel.py" in names
    assert "bitempered/bindings/jax/native/loss.py" in names
