"""Every Python block of README.md is a complete program that runs on a CPU machine, as written.

A block whose first line is a ``# torchrun ...`` comment is launched that way (the distributed
examples, on gloo); every other block runs with ``python``. Each in a fresh process, in a temporary
folder, bounded in time.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.M | re.S)
TIMEOUT_S = 240


def _first_line(code: str) -> str:
    return code.splitlines()[0] if code.strip() else ""


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 6  # a failed extraction would make every test below vacuous


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: _first_line(BLOCKS[i])[:40])
def test_readme_block_runs(index, tmp_path):
    code = BLOCKS[index]
    script = tmp_path / "snippet.py"
    script.write_text(code)
    first = _first_line(code)
    if first.startswith("# torchrun "):
        args = shlex.split(first[2:])
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"] + args[1:-1] + [str(script)]
    else:
        command = [sys.executable, str(script)]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "XLA_FLAGS")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"README block {index} failed:\n{code}\n--- output ---\n{done.stdout}{done.stderr}"
