"""The benchmark harness (perf/): its tiny --smoke and --memory runs are well formed, it times what
users run (traced JAX temperatures, compiled steady state for torch.compile) and writes outside the
tracked results by default. Timings themselves are not checked (CPU, shared machine)."""

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

pytest.importorskip("matplotlib")


def _perf(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "perf", "--device", "cpu", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    stdout = _perf("--smoke", "--out", str(out), "--fresh", "--temps", "1:1", "0.8:1.2", "--providers",
                   "bitempered-torch", "bitempered-triton", "bitempered-jax-xla", "naive-port", "original-jax",
                   "torch-ce", "optax-ce")
    return out, stdout


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
    assert {r["provider"] for r in ok} >= {"bitempered-torch", "naive-port", "bitempered-jax-xla", "original-jax",
                                           "torch-ce", "optax-ce"}
    assert {r["direction"] for r in ok} == {"fwd", "bwd", "fwdbwd"}
    for row in ok:
        for col in ("time_ms", "GBps", "pct_bandwidth", "pct_roofline", "bandwidth_GBps", "bytes_model"):
            assert float(row[col]) > 0, (col, row)
        assert math.isfinite(float(row["loss_rel_err"]))
        assert float(row["speedup_vs_" + row["provider"]]) == pytest.approx(1.0)
        assert row["speedup_vs_naive-port"]
    # the cross-entropies run at t1 = t2 = 1 only, and are as accurate as the float64 KL there
    assert {(r["t1"], r["t2"]) for r in ok if r["provider"] in ("torch-ce", "optax-ce")} == {("1", "1")}
    assert all(float(r["loss_rel_err"]) < 1e-4 for r in ok if r["provider"] in ("torch-ce", "optax-ce"))
    # the converged solver is accurate to float32 rounding; the Triton provider is skipped on CPU
    ours = next(r for r in ok if r["provider"] == "bitempered-torch" and r["t1"] == "0.8")
    assert float(ours["loss_rel_err"]) < 1e-4 and float(ours["sum_p_residual"]) < 1e-5
    assert all(r["status"].startswith("skipped:") for r in rows if r["provider"] == "bitempered-triton")
    assert all("temperatures traced" in r["notes"] for r in ok if r["provider"] in ("bitempered-jax-xla", "original-jax"))


def test_markdown_is_well_formed(smoke):
    out, stdout = smoke
    text = (out / "results.md").read_text()
    assert "Measured copy bandwidth" in text and "GB/s" in text
    assert "## At t1 = t2 = 1" in text and "## bitempered JAX next to the original" in text and "## All results" in text
    for pair in ("| bitempered-torch | Python floats |", "| torch-ce |", "| bitempered-jax-xla | traced",
                 "| optax-ce |"):
        assert pair in text, pair
    # written for users: no internal wording, and no GPU-only column or all-n/a table on a CPU run
    for word in ("acceptance", "issue target", "% SFU", "SFU ops/el", "n/a |"):
        assert word.lower() not in text.lower(), word
    assert "need a CUDA GPU" in text
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:  # every row of a table has the header's number of cells
            assert len({line.count("|") for line in lines}) == 1, block
    assert (out / "plot_fp32_fwdbwd_int.png").stat().st_size > 0
    assert "SUMMARY" in stdout and "optax-ce" in stdout


def test_printed_rows_and_results_md_say_regime_and_spread(smoke):
    out, stdout = smoke
    assert "spread = p80 / p20" in stdout and "alloc heap:" in stdout
    timed = [line for line in stdout.splitlines() if re.search(r"\d - \d+\.\d+ \(\d+\.\d\dx\)", line)]
    assert timed and all(" heap " in line for line in timed)
    text = (out / "results.md").read_text()
    assert "- spread = p80 / p20" in text and "| allocator | ms | spread |" in text


def test_default_output_is_outside_the_tracked_results():
    from perf import harness, measure

    args = harness.parse_args(["--smoke"])
    session = harness.Session(args, torch.device("cpu"))
    assert session.out == REPO / "perf" / "out" / measure.device_slug(torch.device("cpu"))
    assert session.out == harness.default_out(session.slug)
    probe = session.out.relative_to(REPO) / "results.csv"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=REPO)
    assert ignored.returncode == 0, f"{probe} is not git-ignored"
    explicit = harness.Session(harness.parse_args(["--smoke", "--out", "perf/results/x"]), torch.device("cpu"))
    assert explicit.out == Path("perf/results/x")


def test_cpu_providers_are_timed_interleaved():
    """Rounds in which every provider takes its slice in turn, in a rotating order, until each has
    its repeats: a slow stretch of a shared machine then hits every provider alike."""
    from perf import measure

    log = []
    calls = {name: (lambda i, name=name: log.append((name, i))) for name in "abc"}
    stats = measure.interleaved_wall_clock(calls, n_sets=2, warmup=1, min_reps=4, max_reps=9, min_time_s=0.0,
                                           slice_s=0.0)  # a slice of one call
    assert {name: s[3] for name, s in stats.items()} == {"a": 4, "b": 4, "c": 4}
    order = [name for name, _ in log[3:]]  # after one warm-up call each
    assert order == list("abc" "bca" "cab" "abc")
    assert [i for name, i in log[3:] if name == "a"] == [0, 1, 0, 1]  # the input sets rotate
    assert all(s[0] >= 0 for s in stats.values())


ALLOCATOR_PROBE = """
import resource, sys, torch
from perf import measure
print(measure.pin_allocator(sys.argv[1]))
def faults_of_a_step():  # two 16 MiB buffers, as a loss step allocates and frees them
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(1 << 22).fill_(1.0)
    b = torch.empty(1 << 22).fill_(2.0)
    del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min([faults_of_a_step() for _ in range(12)][-4:]))  # the steady state, after warm-up steps
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_regimes_decide_page_faults():
    """Once warm, `heap` reuses freed 16 MiB buffers without page faults; `fresh` maps them anew
    every step (8192 pages of 4 KiB, fewer with huge pages). Each regime in its own process:
    mallopt is process-wide."""
    faults = {}
    for regime in ("heap", "fresh"):
        proc = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, regime], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        pinned, count = proc.stdout.split()
        assert pinned == regime
        faults[regime] = int(count)
    assert faults["heap"] < 64 and faults["fresh"] > 8 * faults["heap"] + 4, faults


def test_cross_entropy_section_shows_both_allocators():
    from perf import report

    def row(provider, framework, allocator, ms):
        return dict(provider=provider, framework=framework, allocator=allocator, time_ms=ms, status="ok",
                    dtype="fp32", direction="fwdbwd", labels="dense", N=8, C=10, t1=1.0, t2=1.0)
    rows = [row("bitempered-torch", "torch", "heap", 2.0), row("torch-ce", "torch", "heap", 1.0),
            row("bitempered-torch", "torch", "fresh", 3.0), row("torch-ce", "torch", "fresh", 6.0)]
    text = "\n".join(report.cross_entropy_section(rows))
    assert "| 8 x 10 | dense | heap | bitempered-torch |" in text and "**2.00**" in text
    assert "| 8 x 10 | dense | fresh | bitempered-torch |" in text and "**0.50**" in text
    assert [r["allocator"] for r in report.primary(rows)] == ["heap", "heap"]


def _timed(provider, allocator, ms, p20, p80, t=1.0):
    return dict(provider=provider, framework="torch", allocator=allocator, status="ok", dtype="fp32",
                direction="fwdbwd", labels="int", N=8, C=10, t1=t, t2=t, time_ms=ms, time_ms_p20=p20,
                time_ms_p80=p80, GBps=1.0, pct_bandwidth=10.0, pct_roofline=10.0, passes="1", loss_rel_err=1e-7,
                sum_p_residual=1e-7, peak_extra_MiB=None, memory_method="", sfu_ops_per_elem=None,
                pct_sfu_roof=None)


def test_rows_say_their_allocator_and_flag_a_wide_spread():
    """Printed rows and the full tables name the allocator regime of each row and the spread of its
    repeats (p80 / p20); a row above NOISY_SPREAD is marked, with its legend."""
    from perf import report

    steady, noisy = _timed("torch-ce", "heap", 2.0, 1.9, 2.1), _timed("torch-ce", "fresh", 2.0, 1.0, 37.0)
    assert report.spread(steady) == pytest.approx(2.1 / 1.9) and not report.is_noisy(steady)
    assert report.is_noisy(noisy) and report.spread(dict(steady, time_ms_p20=None)) is None
    line = report.terminal_row(steady)
    assert " heap " in line and "1.900 - 2.100 (1.11x) " in line
    assert " fresh " in report.terminal_row(noisy) and "(37.00x)!" in report.terminal_row(noisy)
    legend = "\n".join(report.terminal_legend(["heap", "fresh"]))
    assert "alloc heap:" in legend and "alloc fresh:" in legend and f"above {report.NOISY_SPREAD:g}x" in legend
    table = report.results_tables([steady, noisy], report.shown_columns([steady, noisy], gpu_columns=False))
    assert "| provider | allocator | ms | spread |" in table[2]
    assert "| torch-ce | heap | 2.000 | 1.11 |" in table[4] and "| torch-ce | fresh | 2.000 ! | 37.00 |" in table[5]
    # a GPU run has no allocator regimes: no such column
    gpu_row = dict(steady, allocator="")
    assert "allocator" not in report.results_tables([gpu_row], report.shown_columns([gpu_row], True))[2]


def test_summary_lists_the_noisy_rows(tmp_path):
    from perf import report

    path = tmp_path / "results.csv"
    report.prepare_csv(path, fresh=True)
    rows = [_timed("bitempered-torch", "heap", 1.0, 0.9, 1.1), _timed("torch-ce", "heap", 2.0, 1.0, 37.0)]
    report.append_rows(path, rows)
    text = report.summary(path, "slug")
    assert "/ torch-ce: 0.50x !" in text  # a ratio is as noisy as the noisier time
    assert "1 of 2 timed rows marked !" in text and "torch-ce fp32 fwdbwd 8x10 int t=1,1 heap: 37.00x" in text


def _inputs(cell, n_sets=2):
    from perf import harness

    return harness.make_inputs(cell, torch.device("cpu"), n_sets, acc_elements=1 << 12, scale=4.0, seed=3)


def test_jax_temperatures_are_traced_arguments():
    pytest.importorskip("jax")
    import bitempered.jax as bj
    import jax.numpy as jnp
    import numpy as np
    from perf.model import Cell
    from perf.providers import BitemperedJax, OriginalJax, OptaxCE

    inputs = _inputs(Cell(37, 29, "fp32", "int", 0.8, 1.2))
    a = jnp.asarray(inputs.logits[0].numpy())
    y = jnp.asarray(inputs.labels[0].numpy().astype(np.int32))
    runner = BitemperedJax("xla").build(inputs, ("fwd", "fwdbwd"))
    assert len(runner.temperatures) == 2
    # the SAME compiled program, run at other temperatures: they are arguments, not constants
    for t1, t2 in [(0.8, 1.2), (1.0, 1.0), (0.5, 0.8)]:
        value, grad = runner.executables["fwdbwd"](a, y, jnp.float32(t1), jnp.float32(t2))
        want = bj.bi_tempered_logistic_loss(a, y, t1, t2, backend="xla").sum()
        np.testing.assert_allclose(float(value), float(want), rtol=2e-5)
        assert grad.shape == a.shape
        rows = runner.executables["fwd"](a, y, jnp.float32(t1), jnp.float32(t2))
        np.testing.assert_allclose(np.asarray(rows), np.asarray(bj.bi_tempered_logistic_loss(a, y, t1, t2)), rtol=2e-5)
    # the -const variant bakes them in: its program takes the logits and labels only
    const = BitemperedJax("xla", closed_over=True).build(inputs, ("fwd",))
    assert const.temperatures == ()
    with pytest.raises(TypeError):
        const.executables["fwd"](a, y, jnp.float32(1.0), jnp.float32(1.0))
    original = OriginalJax().build(inputs, ("fwdbwd",))
    assert len(original.temperatures) == 2
    dense = jnp.asarray(inputs.dense_fp32[0].numpy())
    v08, _ = original.executables["fwdbwd"](a, dense, jnp.float32(0.8), jnp.float32(1.2))
    v05, _ = original.executables["fwdbwd"](a, dense, jnp.float32(0.5), jnp.float32(0.8))
    assert float(v08) != float(v05)
    ce = OptaxCE().build(_inputs(Cell(37, 29, "fp32", "dense", 1.0, 1.0)), ("fwdbwd",))
    assert "softmax_cross_entropy (dense labels)" in ce.notes


def test_compiled_providers_time_a_steady_state():
    """After build(), no call on any input set compiles again, and a recompile inside the timed
    region is an error rather than a silently timed compilation."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from perf.model import Cell
    from perf.providers import CompiledNative

    torch._dynamo.reset()
    inputs = _inputs(Cell(45, 77, "fp32", "int", 0.8, 1.2), n_sets=3)
    runner = CompiledNative(compile_backend="eager").build(inputs, ("fwdbwd",))
    frames = counters["frames"]["total"]
    assert frames > 0
    with runner.timed_region():
        for _ in range(2):
            for i in range(3):
                runner.calls["fwdbwd"](i)
    assert counters["frames"]["total"] == frames, "recompiled in the timed region"
    assert "fail_on_recompile" in runner.notes
    inputs.logits[0], inputs.labels[0] = inputs.logits[0][:40], inputs.labels[0][:40]  # a new shape: refused
    with pytest.raises(Exception, match="(?i)recompil"):
        with runner.timed_region():
            runner.calls["fwdbwd"](0)
    torch._dynamo.reset()


def test_memory_mode_writes_its_rows(tmp_path):
    stdout = _perf("--memory", "--out", str(tmp_path), "--shapes", "512x2000", "--temps", "1:1", "0.8:1.2")
    from perf import memory

    rows = memory.read(tmp_path / "memory.csv")
    got = {(r["provider"], r["t1"], r["t2"]) for r in rows}
    assert got == {("bitempered-torch", 1.0, 1.0), ("bitempered-torch", 0.8, 1.2), ("torch-ce", 1.0, 1.0),
                   ("bitempered-jax-xla", 1.0, 1.0), ("bitempered-jax-xla", 0.8, 1.2), ("original-jax", 1.0, 1.0),
                   ("original-jax", 0.8, 1.2), ("optax-ce", 1.0, 1.0)}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["logits_MiB"] == pytest.approx(512 * 2000 * 4 / 2**20)
        # the gradient (one logits-sized array) is part of what is reported
        assert r["extra_x_logits"] >= 0.9, r
        assert r["returned_MiB"] >= r["logits_MiB"]
        if r["framework"] == "torch":
            assert r["seconds"] > 0 and r["temp_MiB"] is None
        else:
            assert r["temp_MiB"] is not None and r["extra_MiB"] == pytest.approx(r["temp_MiB"] + r["returned_MiB"], rel=1e-4)
    text = (tmp_path / "memory.md").read_text()
    assert "| torch | torch-ce | 512 x 2000 | int | 1,1 |" and "| original-jax |" in text in text
    assert "memory bitempered-torch" in stdout
