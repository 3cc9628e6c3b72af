"""The noisy-label demo (``python -m bitempered.demo``) at a tiny configuration.

Runs ``--quick`` (3 epochs, 2 seeds, 3 noise settings, the 4 default losses, a few 2-D epochs) for
each installed framework, writing into tmp_path, and checks the table, CSV and PNGs.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from bitempered.demo.data import FLIP_TO, Noise, add_noise, load_digits_split  # noqa: E402
from bitempered.demo.mlp import DEFAULT_LOSSES, LossSpec  # noqa: E402
from bitempered.demo.report import CSV_COLUMNS  # noqa: E402

QUICK_NOISES = ["clean", "symmetric 40%", "class-flip 40%"]
QUICK_SEEDS = 2
FRAMEWORKS = [f for f in ("torch", "jax") if importlib.util.find_spec(f) is not None]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def _check_outputs(out, with_boundaries=True):
    header, rows = _read_csv(out / "results.csv")
    assert tuple(header) == CSV_COLUMNS
    labels = [loss.label for loss in DEFAULT_LOSSES]
    assert [(r["noise"], r["loss"]) for r in rows] == [(n, l) for n in QUICK_NOISES for l in labels]
    for r in rows:
        mean, std = float(r["mean_accuracy"]), float(r["std_accuracy"])
        per_seed = [float(a) for a in r["per_seed_accuracy"].split(";")]
        assert int(r["num_seeds"]) == QUICK_SEEDS == len(per_seed)
        for a in per_seed + [mean]:
            assert math.isfinite(a) and 0.0 <= a <= 1.0
        assert math.isfinite(std) and std >= 0.0
        assert mean == pytest.approx(np.mean(per_seed), abs=1e-3)
        assert r["best_in_row"] in ("0", "1")
    for noise in QUICK_NOISES:
        in_row = [r for r in rows if r["noise"] == noise]
        best = max(round(float(r["mean_accuracy"]), 3) for r in in_row)
        marked = {r["loss"] for r in in_row if r["best_in_row"] == "1"}
        assert marked == {r["loss"] for r in in_row if round(float(r["mean_accuracy"]), 3) == best}

    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(QUICK_NOISES)                    # header, rule, one row per noise
    assert all(line.count("|") == len(labels) + 2 for line in table)
    assert all("**" in line for line in table[2:])                # a best cell in every row

    pngs = ["accuracy_vs_noise.png"] + (["decision_boundaries.png"] if with_boundaries else [])
    for name in pngs:
        data = (out / name).read_bytes()
        assert len(data) > 10_000 and data.startswith(PNG_MAGIC)
    return {(r["noise"], r["loss"]): float(r["mean_accuracy"]) for r in rows}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """framework -> (output folder, printed text) of one ``--quick`` run each, in-process."""
    from bitempered.demo.__main__ import main

    runs = {}
    for framework in FRAMEWORKS:
        out = tmp_path_factory.mktemp(f"demo_{framework}")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["--quick", "--framework", framework, "--out", str(out)]) == 0
        runs[framework] = out, printed.getvalue()
    return runs


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_quick_outputs(framework, quick_runs):
    out, printed = quick_runs[framework]
    for name in QUICK_NOISES + [loss.label for loss in DEFAULT_LOSSES]:
        assert name in printed
    assert " *" in printed                                        # the best of each row is marked
    _check_outputs(out)


@pytest.mark.skipif(len(FRAMEWORKS) < 2, reason="needs both torch and jax")
def test_frameworks_agree(quick_runs):
    """Same initial weights and batches: after 3 epochs the two frameworks score alike."""
    means = {f: _check_outputs(quick_runs[f][0]) for f in FRAMEWORKS}
    for key, value in means["torch"].items():
        assert abs(value - means["jax"][key]) < 0.1, key


def test_module_entry_point(tmp_path):
    """`python -m bitempered.demo` with explicit small flags, as a subprocess, from tmp_path."""
    cmd = [sys.executable, "-m", "bitempered.demo", "--no-boundaries", "--noise-rates", "0", "0.6",
           "--seeds", "1", "--epochs", "1", "--losses", "ce", "0.5,2", "--out", "res"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    header, rows = _read_csv(tmp_path / "res" / "results.csv")
    assert [(r["noise"], r["loss"]) for r in rows] == [
        (n, l) for n in ("clean", "symmetric 60%") for l in ("cross-entropy", "bi-tempered (0.5, 2.0)")]
    assert all(r["std_accuracy"] == "0.0000" for r in rows)      # one seed
    assert (tmp_path / "res" / "accuracy_vs_noise.png").stat().st_size > 10_000
    assert not (tmp_path / "res" / "decision_boundaries.png").exists()
    bad = subprocess.run([sys.executable, "-m", "bitempered.demo", "--framework", "numpy"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--framework" in bad.stderr


def test_noise_models():
    _, _, labels, _ = load_digits_split(seed=0)
    rng = np.random.default_rng(0)
    for rate in (0.2, 0.6):
        noisy = add_noise(labels, Noise("sym", rate), rng)
        changed = noisy != labels
        assert changed.sum() == round(rate * len(labels))        # exactly that many, never the same class
        assert set(np.unique(noisy)) <= set(range(10))
    noisy = add_noise(labels, Noise("flip", 0.4), rng)
    for c in range(10):
        members = labels == c
        assert (noisy[members] != c).sum() == round(0.4 * members.sum())
        assert set(np.unique(noisy[members & (noisy != c)])) <= {FLIP_TO[c]}
    assert (add_noise(labels, Noise("sym", 0.0), rng) == labels).all()


def test_parsing():
    assert Noise.parse("0.4") == Noise("sym", 0.4)
    assert Noise.parse("flip:0.4") == Noise("flip", 0.4)
    assert Noise.parse("0").label == "clean"
    with pytest.raises(ValueError):
        Noise.parse("flip:0.6")
    with pytest.raises(ValueError):
        Noise.parse("1.2")
    assert LossSpec.parse("ce") == LossSpec(1.0, 1.0)
    assert LossSpec.parse("0.2,4") == LossSpec(0.2, 4.0)
    assert LossSpec.parse("0.2,4").label == "bi-tempered (0.2, 4.0)"


def test_a_missing_extra_names_the_extra(monkeypatch):
    """Without tqdm (or scikit-learn, matplotlib) the demo says which extra to install, before any work."""
    from bitempered.demo.__main__ import main

    monkeypatch.setitem(sys.modules, "tqdm", None)  # None in sys.modules: `import tqdm` raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[demo\]"'):
        main(["--quick", "--out", "/nonexistent/never-written"])


def test_the_readme_table_is_the_committed_run():
    """README's demo table is docs/demo/results.md's, row for row (one run makes both)."""
    root = Path(__file__).resolve().parents[1]

    def table(text):
        return [line for line in text.splitlines() if line.startswith("| ")]

    readme = (root / "README.md").read_text()
    demo_section = readme[readme.index("## The demo"):readme.index("## Layout")]
    committed = table((root / "docs" / "demo" / "results.md").read_text())
    assert len(committed) == 6 and table(demo_section)[:6] == committed
    # the learned-temperatures table: its first five columns are docs/demo/learned_temperatures.md's
    learned = [line.split("|")[1:6] for line in table(demo_section)[6:]]
    committed_learned = [line.split("|")[1:6] for line in
                         table((root / "docs" / "demo" / "learned_temperatures.md").read_text())]
    assert len(learned) == 6 and learned == committed_learned


LEARNED = "learned (t1, t2)"


def _table_cells(markdown: str):
    """The Markdown table's rows as lists of cells (header first, the rule dropped)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip().strip("*") for c in line.strip("|").split("|")] for line in lines]


def _mean_std(cell: str):
    mean, std = cell.split(" ± ")
    return float(mean), float(std)


@pytest.fixture(scope="module")
def learned_runs(tmp_path_factory):
    """framework -> (output folder, printed text) of one ``--quick --learn-temperatures`` run each,
    against cross-entropy only (to stay fast)."""
    from bitempered.demo.__main__ import main

    runs = {}
    for framework in FRAMEWORKS:
        out = tmp_path_factory.mktemp(f"learned_{framework}")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["--quick", "--learn-temperatures", "--framework", framework, "--losses", "ce",
                         "--out", str(out)]) == 0
        runs[framework] = out, printed.getvalue()
    return runs


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_learned_temperatures_quick(framework, learned_runs):
    """Both files are written, every model's temperatures left (1, 1) and stayed in the box, and the
    table's numbers are the CSV's."""
    from bitempered.demo.learned_temperatures import CSV_COLUMNS as LEARNED_COLUMNS
    from bitempered.demo.mlp import TemperatureRecipe

    out, printed = learned_runs[framework]
    assert "loss VALUE" in printed                                # the honest reading is printed
    assert not (out / "decision_boundaries.png").exists()
    epochs, box = 3, TemperatureRecipe()
    header, rows = _read_csv(out / "learned_temperatures.csv")
    assert tuple(header) == LEARNED_COLUMNS
    assert [(r["noise"], r["loss"], int(r["epoch"])) for r in rows] == [
        (n, l, e) for n in QUICK_NOISES
        for l, e in [(LEARNED, e) for e in range(epochs + 1)] + [("cross-entropy", epochs)]]

    table = _table_cells((out / "learned_temperatures.md").read_text())
    assert table[0] == ["noise (train labels)", "final t1", "final t2", LEARNED, "cross-entropy"]
    assert [r[0] for r in table[1:]] == QUICK_NOISES
    for noise, cells in zip(QUICK_NOISES, table[1:]):
        learned = [r for r in rows if r["noise"] == noise and r["loss"] == LEARNED]
        start, final = learned[0], learned[-1]
        assert [start[k] for k in ("t1_mean", "t2_mean", "per_seed_t1", "per_seed_t2")] == \
            ["1.0000", "1.0000", "1.0000;1.0000", "1.0000;1.0000"]
        for r in learned[1:]:                                     # moved, and inside the box
            t1 = [float(v) for v in r["per_seed_t1"].split(";")]
            t2 = [float(v) for v in r["per_seed_t2"].split(";")]
            assert len(t1) == len(t2) == QUICK_SEEDS
            assert all(box.t1_range[0] <= t <= box.t1_range[1] and t != 1.0 for t in t1)
            assert all(box.t2_range[0] <= t <= box.t2_range[1] and t != 1.0 for t in t2)
            assert float(r["t1_mean"]) == pytest.approx(np.mean(t1), abs=1e-3)
        assert all(r["accuracy_mean"] == "" for r in learned[:-1])  # accuracy at the last epoch only
        ce = next(r for r in rows if r["noise"] == noise and r["loss"] == "cross-entropy")
        expected = [(final["t1_mean"], final["t1_std"]), (final["t2_mean"], final["t2_std"]),
                    (final["accuracy_mean"], final["accuracy_std"]),
                    (ce["accuracy_mean"], ce["accuracy_std"])]
        for cell, (mean, std) in zip(cells[1:], expected):
            assert _mean_std(cell) == pytest.approx((float(mean), float(std)), abs=5.1e-4), (noise, cell)
    # The fixed cross-entropy models are the main table's, trained once.
    _, main_rows = _read_csv(out / "results.csv")
    assert [r["mean_accuracy"] for r in main_rows] == \
        [r["accuracy_mean"] for r in rows if r["loss"] == "cross-entropy"]


@pytest.mark.skipif(len(FRAMEWORKS) < 2, reason="needs both torch and jax")
def test_learned_temperatures_frameworks_agree(learned_runs):
    """Same weights, batches and temperature recipe: the two frameworks' trajectories agree."""
    trajectories = {}
    for framework in FRAMEWORKS:
        _, rows = _read_csv(learned_runs[framework][0] / "learned_temperatures.csv")
        trajectories[framework] = np.array([[float(r[k]) for k in ("t1_mean", "t2_mean")]
                                            for r in rows if r["loss"] == LEARNED])
    np.testing.assert_allclose(trajectories["torch"], trajectories["jax"], atol=0.05)


def test_learned_temperatures_flags():
    from bitempered.demo.__main__ import parse_args

    assert parse_args(["--learn-temperatures", "--temperature-lr", "0.05"]).temperature_recipe.lr == 0.05
    for bad in (["--learn-temperatures", "--boundaries-only"], ["--temperature-lr", "0"]):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            parse_args(bad)
