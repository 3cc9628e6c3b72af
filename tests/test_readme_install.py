"""The README's install instructions work for a new user (the package is not on PyPI) and keep CI's
exact test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_no_instruction_installs_bitempered_from_pypi():
    # every `pip install "bitempered[...]"` must name a checkout or a git URL
    from_index = [line for line in README.splitlines()
                  if re.search(r"pip install [\"']?bitempered\b", line) and "git+" not in line
                  and "does not work" not in line]
    assert from_index == []
    assert "pip install -e \".[torch]\"" in README and "@ git+https://github.com/" in README
    assert "not published on PyPI" in README


def test_cpu_build_of_torch_comes_from_pytorchs_cpu_index():
    assert "--index-url https://download.pytorch.org/whl/cpu" in README


def test_the_test_command_is_what_ci_runs():
    command = ('python -m pip install torch==2.13.0 && python -m pip install -e '
               '".[torch,triton,jax,tensorflow-cpu,test,demo,perf]" && python -m pytest -q tests')
    assert command in README
    ci = (ROOT / ".ci" / "run").read_text()
    for step in command.split(" && "):
        assert step.replace("pip install ", "pip install -q ") in ci or step in ci
