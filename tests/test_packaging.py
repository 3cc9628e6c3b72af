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
