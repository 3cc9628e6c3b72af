"""The benchmark harness (perf/) in its tiny --smoke mode: it runs, and its CSV and markdown are
well formed. Timings themselves are not checked (CPU, shared machine)."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "perf", "--smoke", "--device", "cpu", "--out", str(out), "--fresh",
         "--providers", "bitempered-torch", "bitempered-triton", "bitempered-jax-xla", "naive-port",
         "original-jax", "torch-ce"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_csv_is_well_formed(smoke):
    from perf.report import COLUMNS

    out, _ = smoke
    with (out / "results.csv").open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == COLUMNS
    assert body and all(len(row) == len(COLUMNS) for row in body)
    rows = [dict(zip(header, row)) for row in body]
    for row in rows:
        assert row["device"] and row["timestamp"] and row["git_sha"]
        assert row["status"] == "ok" or row["status"].startswith(("skipped:", "n/a:")), row["status"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"bitempered-torch", "naive-port"}
    assert {r["direction"] for r in ok} == {"fwd", "bwd", "fwdbwd"}
    for row in ok:
        for col in ("time_ms", "GBps", "pct_bandwidth", "pct_roofline", "bandwidth_GBps", "bytes_model"):
            assert float(row[col]) > 0, (col, row)
        assert math.isfinite(float(row["loss_rel_err"]))
        assert float(row["speedup_vs_" + row["provider"]]) == pytest.approx(1.0)
        assert row["speedup_vs_naive-port"]
    # the converged solver is accurate to float32 rounding; the Triton provider is skipped on CPU
    ours = next(r for r in ok if r["provider"] == "bitempered-torch")
    assert float(ours["loss_rel_err"]) < 1e-4 and float(ours["sum_p_residual"]) < 1e-5
    assert all(r["status"].startswith("skipped:") for r in rows if r["provider"] == "bitempered-triton")


def test_markdown_is_well_formed(smoke):
    out, stdout = smoke
    text = (out / "results.md").read_text()
    assert "Measured copy bandwidth" in text and "GB/s" in text
    assert "## Acceptance" in text and "## Issue targets" in text and "## Results" in text
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:  # every row of a table has the header's number of cells
            assert len({line.count("|") for line in lines}) == 1, block
    assert (out / "plot_fp32_fwdbwd_int.png").stat().st_size > 0
    assert "JAX ACCEPTANCE" in stdout
