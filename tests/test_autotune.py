"""Autotuning (bindings/common/autotune.py) and its cache, on CPU under Triton's interpreter.

The interpreter times candidates with a wall clock, so every piece of the mechanism runs here:
the default never tunes, selection of the fastest candidate, the cache file (write, reload in a
second process without timing, invalidation by Triton version and kernel-source hash, C bucketing),
the in-place gradient intact after tuning, every candidate computing the same numbers, the JAX
launchers reading the same cache, ``python -m bitempered.tune`` (and its ``--report``, which
``python -m perf --tune`` runs); a damaged, foreign or unwritable cache never failing nor changing
the loss (issues 27, 28).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import reference as ref  # noqa: E402
from bitempered.bindings.common import autotune  # noqa: E402
from bitempered.bindings.torch.native import math as native  # noqa: E402
from bitempered.bindings.torch import launchers as tt  # noqa: E402
from bitempered.kernels import launch_config  # noqa: E402
from test_triton_kernels import TOLERANCES, check_loss, random_logits, scaled_error  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy log2(0) (interpreter)

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = autotune.interpreted()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DEVICE = tt.device_name(torch.empty(0, device=DEV))  # the cache's device name
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs the CPU tuner in a subprocess")
SMALL = True  # the interpreter's small candidate sets (valid compiled configs too: fast GPU runs)


def on(x: torch.Tensor) -> torch.Tensor:
    return x.to(DEV)


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """Autotuning on, an empty cache folder, and a count of the timing runs."""
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    autotune.clear_memory()
    autotune.set_enabled(True)
    timed = []
    real = autotune.measure_ms

    def counting(run, *windows):
        timed.append(run)
        return real(run, *windows)

    monkeypatch.setattr(autotune, "measure_ms", counting)
    # a GPU run compiles the small sets too (the full ones are for real tuning)
    rows, binary = launch_config.row_candidates, launch_config.binary_candidates
    monkeypatch.setattr(launch_config, "row_candidates", lambda c, b, _i=False: rows(c, b, SMALL))
    monkeypatch.setattr(launch_config, "binary_candidates", lambda _i=False: binary(SMALL))
    yield timed
    autotune.set_enabled(None)
    autotune.clear_memory()


def fake_timer(monkeypatch, times_ms):
    """measure_ms that runs each candidate (so a timing run that wrote into the caller's buffers
    would show) and reports the given times in candidate order."""
    calls = []

    def fake(run, *_windows):
        run()
        calls.append(run)
        return times_ms[(len(calls) - 1) % len(times_ms)]

    monkeypatch.setattr(autotune, "measure_ms", fake)
    return calls


class Recorder:
    """Wraps a kernel and records the launch keywords (block sizes, num_warps, ...) of each call."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return launch(*args, **kwargs)

        return run


def launched_config(kwargs) -> dict:
    names = ("CHUNKED", "BLOCK_ROWS", "BLOCK_COLS", "BLOCK", "num_warps", "maxnreg", "num_stages")
    return {k: kwargs[k] for k in names if k in kwargs}


def expected_kwargs(config) -> dict:
    if isinstance(config, launch_config.RowConfig):
        out = {"CHUNKED": config.chunked, "BLOCK_ROWS": config.block_rows,
               "BLOCK_COLS": config.block_cols}
    else:
        out = {"BLOCK": config.block}
    return {**out, **config.launch_options()}


# ----------------------------------------------------------------------------------------------
# Candidate sets (framework-free)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("interpreted", [False, True])
def test_candidates_start_with_the_heuristic_and_fit_their_whole_bucket(interpreted):
    for elem_bytes in (4, 2):
        for c in (1, 3, 20, 33, 100, 1000, 1025, 2049, 4096, 4097, 8192, 8193, 32000, 128256):
            heuristic = launch_config.row_config(c, elem_bytes)
            cands = launch_config.row_candidates(c, elem_bytes, interpreted)
            assert cands[0] == heuristic and len(set(cands)) == len(cands)
            lowest = launch_config.next_power_of_2(c) // 2 + 1  # every C of the key's bucket
            for cfg in cands:
                assert 1 <= cfg.num_warps <= launch_config.MAX_BLOCK_WARPS
                assert cfg.block_cols & (cfg.block_cols - 1) == 0
                assert cfg.chunked or cfg.block_cols >= launch_config.next_power_of_2(c) >= lowest
                assert autotune.config_problem(cfg, c) == "" == autotune.config_problem(cfg, lowest)
            paths = {cfg.path for cfg in cands}
            if not interpreted and 1024 < c <= launch_config.ON_CHIP_LIMIT[elem_bytes]:
                assert paths == {"on_chip", "chunked"}, c  # the threshold itself is tuned
            if not interpreted:
                assert len(cands) <= 17  # each is compiled once per key on a GPU
    assert launch_config.binary_candidates()[0] == launch_config.binary_config()
    assert launch_config.binary_candidates(True)[0] == launch_config.binary_config()
    for cfg in launch_config.binary_candidates(interpreted) + launch_config.shipped_row_configs():
        assert autotune.config_problem(cfg) == "", cfg


def test_cache_key_buckets_c_and_names_every_axis():
    key = autotune.cache_key("loss", 1000, "bfloat16", "indices", True, False)
    assert key == "loss|C<=1024|bfloat16|labels=indices|need_grad=1|original=0"
    assert autotune.cache_key("loss", 513, "float32") == autotune.cache_key("loss", 1024, "float32")
    assert autotune.cache_key("loss", 1025, "float32") != autotune.cache_key("loss", 1024, "float32")
    assert autotune.cache_key("sigmoid_fwd", None, "float32").startswith("sigmoid_fwd|C<=-|")


# ----------------------------------------------------------------------------------------------
# The switch and the default path
# ----------------------------------------------------------------------------------------------

def test_switch(monkeypatch):
    import bitempered

    monkeypatch.delenv(autotune.ENV_SWITCH, raising=False)
    try:
        assert not autotune.is_enabled()
        assert bitempered.autotune(True) is False and autotune.is_enabled()
        assert bitempered.autotune(False) is True and not autotune.is_enabled()
        monkeypatch.setenv(autotune.ENV_SWITCH, "1")
        assert not autotune.is_enabled()  # the Python switch wins over the environment
        bitempered.autotune(None)
        assert autotune.is_enabled()
        with pytest.raises(TypeError, match="enabled"):
            bitempered.autotune("yes")
    finally:
        autotune.set_enabled(None)


def test_the_switch_keeps_import_bitempered_light():
    code = ("import sys, bitempered; bitempered.autotune(True); "
            "print(sorted(m for m in ('torch', 'triton', 'jax') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_nothing_to_time_gives_the_heuristic_and_off_costs_no_device_query(tuning, monkeypatch):
    """make_bench returning None (a CUDA graph being captured) takes the heuristic, stores nothing;
    with tuning off the device name is never asked for."""
    heuristic = launch_config.row_config(20, 4)
    assert autotune.row_config("loss", 20, "float32", 4, device="some-gpu",
                               make_bench=lambda: None) == heuristic
    assert not autotune.cache_path("some-gpu").exists() and tuning == []
    autotune.set_enabled(False)

    def no_device():
        raise AssertionError("device name asked for with autotuning off")

    assert autotune.row_config("loss", 20, "float32", 4, device=no_device) == heuristic
    assert autotune.binary_config("sigmoid_fwd", "float32", device=no_device) == \
        launch_config.binary_config()


def test_default_path_never_tunes_nor_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(autotune.ENV_SWITCH, raising=False)
    autotune.set_enabled(None)
    autotune.clear_memory()

    def forbidden(run):
        raise AssertionError("timed with autotuning off")

    monkeypatch.setattr(autotune, "measure_ms", forbidden)
    # a cache entry that a tuned run would take: the default must ignore it
    pinned = launch_config.RowConfig(False, 1, 32, 1)
    autotune._store(DEVICE, autotune.cache_key("softmax_bwd", 20, "float32"),
                    {"config": dataclasses.asdict(pinned)})
    autotune.clear_memory()
    recorder = Recorder(tt.tempered_softmax_bwd_kernel)
    monkeypatch.setattr(tt, "tempered_softmax_bwd_kernel", recorder)
    x = random_logits(5, 20, torch.float32, seed=1)
    tt.loss_forward(x, on(torch.arange(5) % 20), 0.8, 1.2, 0.0, None, -100, True)
    tt.softmax_backward(on(torch.rand(5, 20)), on(torch.rand(5, 20)), 1.2)
    tt.sigmoid_backward(on(torch.rand(7)), on(torch.rand(7)), 1.2)
    assert launched_config(recorder.calls[0]) == expected_kwargs(launch_config.row_config(20, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == [autotune.cache_path(DEVICE).name]


# ----------------------------------------------------------------------------------------------
# Selection, cache, invalidation, bucketing
# ----------------------------------------------------------------------------------------------

def test_selects_the_fastest_candidate_stores_it_and_reuses_it(tuning, monkeypatch):
    cands = launch_config.row_candidates(20, 4, SMALL)
    times = [5.0] * len(cands)
    times[-1] = 1.0  # the last candidate is the fastest
    calls = fake_timer(monkeypatch, times)
    recorder = Recorder(tt.tempered_softmax_bwd_kernel)
    monkeypatch.setattr(tt, "tempered_softmax_bwd_kernel", recorder)
    p, g = on(torch.rand(5, 20)), on(torch.rand(5, 20))
    out = tt.softmax_backward(p, g, 1.2)
    assert len(calls) == len(cands)
    assert launched_config(recorder.calls[-1]) == expected_kwargs(cands[-1])
    content = json.loads(autotune.cache_path(DEVICE).read_text())
    assert content["triton"] == autotune.triton_version()
    assert content["kernels"] == autotune.kernel_source_hash()
    entry = content["entries"][autotune.cache_key("softmax_bwd", 20, "float32")]
    assert entry["config"] == dataclasses.asdict(cands[-1]) and entry["time_ms"] == 1.0
    assert entry["heuristic"] == dataclasses.asdict(cands[0]) and entry["heuristic_ms"] == 5.0
    # the same bucket (C = 17..32) reuses it, with no timing; C = 33 is a new key
    out2 = tt.softmax_backward(p[:, :17].contiguous(), g[:, :17].contiguous(), 1.2)
    assert len(calls) == len(cands) and out2.shape == (5, 17)
    assert launched_config(recorder.calls[-1]) == expected_kwargs(cands[-1])
    tt.softmax_backward(on(torch.rand(3, 33)), on(torch.rand(3, 33)), 1.2)
    assert len(calls) > len(cands)
    assert torch.isfinite(out).all()


def test_in_place_gradient_is_not_corrupted_by_the_timing_runs(tuning, monkeypatch):
    fake_timer(monkeypatch, [1.0, 2.0, 3.0, 4.0])  # runs every candidate, keeps the heuristic
    logits = random_logits(6, 20, torch.float32, seed=3)
    labels = on(torch.tensor([0, 5, 19, 7, 3, 11]))
    loss_ref, grad_ref = tt.loss_forward(logits, labels, 0.7, 1.5, 0.1, None, -100, True)
    autotune.forget(DEVICE)
    buffer = logits.clone()
    loss, grad = tt.loss_forward(buffer, labels, 0.7, 1.5, 0.1, None, -100, True, grad_out=buffer)
    assert grad.data_ptr() == buffer.data_ptr()
    assert torch.equal(loss, loss_ref) and torch.equal(grad, grad_ref)


def test_cache_is_invalidated_by_triton_version_and_kernel_sources(tuning, monkeypatch):
    calls = fake_timer(monkeypatch, [1.0, 2.0, 3.0])
    p, g = on(torch.rand(9)), on(torch.rand(9))
    tt.sigmoid_backward(p, g, 1.2)
    first = len(calls)
    autotune.clear_memory()
    tt.sigmoid_backward(p, g, 1.2)
    assert len(calls) == first  # reloaded from the file, not timed
    monkeypatch.setattr(autotune, "triton_version", lambda: "0.0.0-other")
    tt.sigmoid_backward(p, g, 1.2)
    assert len(calls) == 2 * first
    assert json.loads(autotune.cache_path(DEVICE).read_text())["triton"] == "0.0.0-other"
    monkeypatch.setattr(autotune, "kernel_source_hash", lambda: "edited-kernel")
    tt.sigmoid_backward(p, g, 1.2)
    assert len(calls) == 3 * first
    # a corrupt file is ignored (tuned again, then rewritten)
    autotune.cache_path(DEVICE).write_text("{not json")
    autotune.clear_memory()
    with pytest.warns(autotune.CacheWarning, match="not JSON"):
        tt.sigmoid_backward(p, g, 1.2)
    assert len(calls) == 4 * first
    assert json.loads(autotune.cache_path(DEVICE).read_text())["kernels"] == "edited-kernel"


def test_kernel_source_hash_covers_every_kernel_file():
    names = sorted(p.name for p in Path(launch_config.__file__).parent.glob("*.py"))
    assert {"loss.py", "softmax.py", "binary.py", "tempered_math.py"} <= set(names)
    assert len(autotune.kernel_source_hash()) == 16


@needs_interpreter
def test_a_second_process_reuses_the_cache_without_timing(tuning, tmp_path):
    """``python -m bitempered.tune`` (process 1) fills the cache; this process (2) launches the
    same keys with the timer forbidden."""
    env = dict(os.environ, **{autotune.ENV_CACHE_DIR: str(tmp_path), "TRITON_INTERPRET": "1",
                              "PYTHONWARNINGS": "ignore"})
    done = subprocess.run([sys.executable, "-m", "bitempered.tune", "--shapes", "4x20", "--dtypes",
                           "fp32", "--families", "softmax", "binary", "--grad", "no"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tuned now on 4x20" in done.stdout and "heuristic" in done.stdout
    entries = json.loads(autotune.cache_path(DEVICE).read_text())["entries"]
    assert len(entries) == 5  # softmax fwd/bwd, binary loss, sigmoid fwd/bwd
    tuning.clear()
    autotune.clear_memory()
    x = random_logits(3, 30, torch.float32, seed=5)  # C = 30: the same bucket as 20
    with autotune.recording() as looked_up:
        tt.softmax_forward(x, 1.2, None)
        tt.sigmoid_forward(x[0], 1.2, None)
    assert tuning == [] and [tuned for _d, _k, tuned in looked_up] == [False, False]


def test_tune_cli_rejects_bad_arguments(capsys):
    from bitempered import tune

    for argv in (["--shapes", "12by3"], ["--shapes", "0x5"], ["--shapes", "4x4", "--num-iters", "0"],
                 ["--shapes", "4x4", "--families", "nope"], []):
        with pytest.raises(SystemExit) as exc:
            tune.parse_args(argv)
        assert exc.value.code == 2
    assert "--shapes" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Every candidate computes the same numbers
# ----------------------------------------------------------------------------------------------

def _same_split(a, b) -> bool:
    """Configs that split the classes the same way (only rows per program, warps, registers,
    stages differ): bitwise equal results under the interpreter. (Compiled, num_warps changes the
    order of a row's sums across threads: rounding-level differences only.)"""
    return INTERPRETED and a.chunked == b.chunked and (not a.chunked or a.block_cols == b.block_cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_loss_candidate_gives_the_same_results(dtype, monkeypatch):
    n, c = 7, 20  # masked row tail and class tail; one row with extreme values
    logits = random_logits(n, c, dtype, seed=11)
    logits[2] = on(torch.linspace(-300.0, 300.0, c).to(dtype))
    logits[4, 3] = float("-inf")
    labels = on(torch.tensor([1, 0, 3, 19, 5, 7, 2]))
    dense = on(torch.softmax(torch.randn(n, c, generator=torch.Generator().manual_seed(2)), -1))
    recorder = Recorder(tt.tempered_loss_kernel)
    monkeypatch.setattr(tt, "tempered_loss_kernel", recorder)
    cands = launch_config.row_candidates(c, dtype.itemsize, SMALL)
    assert {cfg.path for cfg in cands} == {"on_chip", "chunked"}
    base = None
    for cfg in cands:
        with autotune.pinned(cfg):
            loss_i, grad_i = check_loss(logits, labels, 0.7, 1.5, 0.1)  # vs float64 truth
            loss_d, grad_d = check_loss(logits, dense, 1.2, 0.8)
        assert launched_config(recorder.calls[-1]) == expected_kwargs(cfg)
        result = (loss_i, grad_i, loss_d, grad_d)
        if base is None:
            base = (cfg, result)
        elif _same_split(cfg, base[0]):
            assert all(torch.equal(r, b) for r, b in zip(result, base[1])), cfg
        else:  # another split of the classes: rounding-level differences only
            for r, b, quantity in zip(result, base[1], ("loss", "out", "loss", "out")):
                assert scaled_error(r, b.double().cpu().numpy()) <= TOLERANCES[dtype][quantity], cfg


def test_every_softmax_and_binary_candidate_gives_the_same_results(monkeypatch):
    n, c, t = 5, 20, 1.3
    logits = random_logits(n, c, torch.float32, seed=21)
    logits[1] = on(torch.linspace(-400.0, 400.0, c))
    upstream = on(torch.randn(n, c, generator=torch.Generator().manual_seed(3)))
    probs_truth = ref.tempered_softmax(logits.double().cpu().numpy(), t)
    results = []
    for cfg in launch_config.row_candidates(c, 4, SMALL):
        with autotune.pinned(cfg):
            probs = tt.softmax_forward(logits, t, None)
            grad = tt.softmax_backward(probs, upstream, t)
        grad_truth = native.tempered_softmax_vjp_rows(probs.double(), upstream.double(),
                                                      torch.tensor(t, dtype=torch.float64)).cpu()
        assert scaled_error(probs, probs_truth) <= TOLERANCES[torch.float32]["out"]
        assert scaled_error(grad, grad_truth.numpy()) <= TOLERANCES[torch.float32]["out"]
        results.append((cfg, probs, grad))
    for cfg, probs, grad in results[1:]:
        if _same_split(cfg, results[0][0]):
            assert torch.equal(probs, results[0][1]) and torch.equal(grad, results[0][2])
    x = on(torch.cat([torch.linspace(-50, 50, 299), torch.tensor([float("inf"), -float("inf")])]))
    y = on(torch.rand(x.shape[0], generator=torch.Generator().manual_seed(4)))
    outs = []
    for cfg in launch_config.binary_candidates(SMALL):
        with autotune.pinned(cfg):
            loss, dx = tt.binary_loss_forward(x, y, 0.8, 1.2, 0.05, None, True)
            p = tt.sigmoid_forward(x, 1.2, None)
            dp = tt.sigmoid_backward(p, y, 1.2)
        outs.append((loss, dx, p, dp))
    assert scaled_error(outs[0][2], ref.tempered_sigmoid(x.double().cpu().numpy(), 1.2)) <= 2e-5
    for other in outs[1:]:  # elementwise kernels: the block size cannot change a single bit
        assert all(torch.equal(a, b) for a, b in zip(other, outs[0]))


def test_pinned_rejects_a_tile_narrower_than_the_row():
    with autotune.pinned(launch_config.RowConfig(False, 1, 16, 1)):
        with pytest.raises(ValueError, match="block_cols=16 < C=20"):
            tt.softmax_forward(on(torch.rand(2, 20)), 1.2, None)
    with pytest.raises(TypeError, match="config"):
        with autotune.pinned({"block": 4}):
            pass


@pytest.mark.parametrize("config, message", [
    (launch_config.RowConfig(False, 0, 32, 1), "block_rows must be an int in"),
    (launch_config.RowConfig(False, 3, 32, 1), "block_rows must be a power of two, got 3"),
    (launch_config.RowConfig(False, 1, 32.0, 1), "block_cols must be an int in"),
    (launch_config.RowConfig(1, 1, 32, 1), "chunked must be a bool, got 1"),
    (launch_config.RowConfig(False, 1024, 2048, 16), "block_rows \\* block_cols = 2097152 > 1048576"),
    (launch_config.RowConfig(False, 1, 32, 3), "num_warps must be a power of two, got 3"),
    (launch_config.RowConfig(False, 1, 32, 64), "num_warps must be an int in \\[1, 32\\]"),
    (launch_config.RowConfig(False, 1, 32, 32), "num_warps=32 x 32 threads x maxnreg=128 > 65536"),
    (launch_config.RowConfig(False, 1, 32, 16, maxnreg=255), "registers per block"),
    (launch_config.RowConfig(True, 1, 32, 1, maxnreg=0), "maxnreg must be an int"),
    (launch_config.RowConfig(True, 1, 32, 1, num_stages=0), "num_stages must be an int"),
    (launch_config.BinaryConfig(True, 1), "block must be an int"),
    (launch_config.BinaryConfig(1 << 20, 1), "block must be an int in \\[1, 524288\\]"),
])
def test_pinned_rejects_a_config_that_cannot_launch(config, message):
    """The checks a cached config gets too: a bad one would raise in the kernel's launch (or,
    for a row tile too narrow, compute a wrong loss)."""
    with pytest.raises(ValueError, match=message) as error:
        with autotune.pinned(config):
            pass
    assert str(error.value).startswith("pinned: ")


# ----------------------------------------------------------------------------------------------
# JAX reads the same cache and never tunes
# ----------------------------------------------------------------------------------------------

def test_jax_launchers_read_the_cache_and_never_time(tuning, monkeypatch):
    jnp = pytest.importorskip("jax.numpy")
    from bitempered.bindings.jax import launchers as jk

    if jk.device_name() != DEVICE:
        pytest.skip("jax and torch see different devices here")

    def forbidden(run):
        raise AssertionError("the JAX path timed a candidate")

    monkeypatch.setattr(autotune, "measure_ms", forbidden)
    logits = jnp.zeros((4, 20), jnp.bfloat16)
    labels = jnp.zeros((4,), jnp.int32)
    key = {"labels": "indices", "need_grad": True, "original": False}
    rows = jk._layout(logits.shape, -1)
    assert jk._row_config("loss", logits, -1, rows, **key) == launch_config.row_config(20, 2)
    assert not autotune.cache_path(DEVICE).exists()  # a miss writes nothing
    tuned = launch_config.RowConfig(True, 1, 16, 2, maxnreg=None, num_stages=1)
    autotune._store(DEVICE, autotune.cache_key("loss", 20, "bfloat16", "indices", True, False),
                    {"config": dataclasses.asdict(tuned)})
    autotune.clear_memory()
    assert jk._row_config("loss", logits, -1, rows, **key) == tuned
    # classes strided (axis 0 of [20, 4]): the strided heuristic, never a tuned row config
    strided = jk._row_config("loss", logits.T, 0, jk._layout(logits.T.shape, 0), **key)
    assert strided == launch_config.row_config(20, 2, strided=True) != tuned
    assert jk._options(tuned) == {"num_warps": 2, "num_stages": 1}  # triton_call takes no maxnreg
    assert jk._binary_config("sigmoid_bwd", labels.astype(jnp.float32)) == launch_config.binary_config()


# ----------------------------------------------------------------------------------------------
# python -m bitempered.tune --report (python -m perf --tune)
# ----------------------------------------------------------------------------------------------

@needs_interpreter
def test_report_times_heuristic_and_tuned_side_by_side(tuning, tmp_path, capsys):
    from bitempered import tune
    from perf import harness

    out = tmp_path / "out"
    # python -m perf --tune
    assert harness.main(["--tune", "--shapes", "3x20", "--dtypes", "fp32", "--device", "cpu", "--report",
                         str(out), "--families", "softmax", "binary", "--grad", "no"]) == 0
    rows = tune.read_rows(out / "tuning.csv")
    assert [r["family"] for r in rows] == ["softmax_fwd", "softmax_bwd", "binary_loss", "sigmoid_fwd",
                                           "sigmoid_bwd"]
    for row in rows:
        assert row["heuristic_config"] and row["tuned_config"] and row["source"] == "tuned now"
        assert float(row["heuristic_ms"]) > 0 and float(row["tuned_ms"]) > 0
        assert float(row["speedup"]) == pytest.approx(float(row["heuristic_ms"]) / float(row["tuned_ms"]))
        assert row["kernels"] == autotune.kernel_source_hash() and row["key"].startswith(row["family"] + "|")
    md = (out / "tuning.md").read_text()
    assert "| softmax_fwd |" in md and "heuristic" in md and "speedup" in md
    assert "side by side" in capsys.readouterr().out
    # a second run reads the cache and appends (one markdown row per cell: the latest)
    assert tune.main(["--shapes", "3x20", "--dtypes", "fp32", "--report", str(out), "--families", "softmax",
                      "--device", "cpu"]) == 0
    rows = tune.read_rows(out / "tuning.csv")
    assert len(rows) == 7 and {r["source"] for r in rows[5:]} == {"cache"}
    assert (out / "tuning.md").read_text().count("| softmax_fwd |") == 1


# ----------------------------------------------------------------------------------------------
# A damaged, foreign or unwritable cache never fails nor changes the loss (issues 27, 28)
# ----------------------------------------------------------------------------------------------

N_ROWS, N_CLASSES = 4, 5  # C = 5: an on-chip tile of 2 or 4 columns would drop classes


def api_losses():
    """The public loss (triton, autotuned) and its gradient, checked against backend="torch"."""
    from bitempered.torch import bi_tempered_logistic_loss

    logits = random_logits(N_ROWS, N_CLASSES, torch.float32, seed=31)
    labels = on(torch.tensor([0, 4, 2, 1]))
    results = []
    for backend in ("triton", "torch"):
        x = logits.clone().requires_grad_(True)
        loss = bi_tempered_logistic_loss(x, labels, 0.8, 1.2, reduction="none", backend=backend)
        loss.sum().backward()
        results.append((loss.detach(), x.grad))
    (loss, grad), (loss_torch, grad_torch) = results
    torch.testing.assert_close(loss, loss_torch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_torch, rtol=1e-5, atol=1e-6)
    return loss


def filled_cache() -> tuple[Path, dict]:
    """A cache file as the tuner writes it for ``api_losses`` (and its content)."""
    api_losses()
    path = autotune.cache_path(DEVICE)
    content = json.loads(path.read_text())
    assert any(key.startswith("loss|C<=8|") for key in content["entries"])
    autotune.clear_memory()
    return path, content


def cache_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, autotune.CacheWarning)]


def loss_warns_once(match: str) -> None:
    """The loss is right twice, and the damage is reported once, by a CacheWarning."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        api_losses()
        api_losses()
    messages = cache_warnings(record)
    assert len(messages) == 1 and match in messages[0], messages


def bad_files(text: str):
    return {
        "truncated to 1 byte": text[:1],
        "truncated to half": text[: len(text) // 2],
        "truncated by 1 byte": text[:-2],
        "empty": "",
        "not UTF-8": b"\xff\xfe{}",
        "not an object": "[]",
        "nested too deep": "[" * 200_000,
    }


@pytest.mark.parametrize("damage", list(bad_files("{}")))
def test_a_damaged_cache_file_is_ignored_with_a_warning(tuning, damage):
    path, _ = filled_cache()
    content = bad_files(path.read_text())[damage]
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    loss_warns_once("ignored")
    assert json.loads(path.read_text())["entries"]  # tuned again and rewritten


@pytest.mark.parametrize("entries", [None, [], "x", 3])
def test_cache_entries_of_another_type_are_ignored_with_a_warning(tuning, entries):
    path, content = filled_cache()
    path.write_text(json.dumps(dict(content, entries=entries)))
    loss_warns_once(f"'entries' is {type(entries).__name__}")


@pytest.mark.parametrize("config, message", [
    ({"chunked": False, "block_rows": 1, "block_cols": 2, "num_warps": 1}, "on-chip block_cols=2 < C=5"),
    ({"chunked": False, "block_rows": 1, "block_cols": 4, "num_warps": 1}, "on-chip block_cols=4 < C=5"),
    ({"chunked": False, "block_rows": 0, "block_cols": 8, "num_warps": 1}, "block_rows must be an int"),
    ({"chunked": False, "block_rows": 1, "block_cols": 8, "num_warps": 3}, "num_warps must be a power"),
    ({"chunked": False, "block_rows": 1, "block_cols": "8", "num_warps": 1}, "block_cols must be an int"),
    ({"chunked": False, "block_rows": 1, "block_cols": 8.0, "num_warps": 1}, "block_cols must be an int"),
    ({"chunked": 0, "block_rows": 1, "block_cols": 8, "num_warps": 1}, "chunked must be a bool"),
    ({"chunked": True, "block_rows": 1, "block_cols": 8, "num_warps": 1, "num_stages": -1}, "num_stages"),
    ({"chunked": False, "block_rows": 1, "block_cols": 8}, "not a RowConfig entry"),
    ({"chunked": False, "block_rows": 1, "block_cols": 8, "num_warps": 1, "speed": 9},
     "not a RowConfig entry"),
    (None, "not a RowConfig entry"),
])
def test_a_cached_config_that_pinned_would_reject_is_ignored(tuning, config, message):
    """Each loss entry replaced: the launch warns, tunes again (the heuristic where nothing may
    be timed) and the loss stays right."""
    path, content = filled_cache()
    loss_keys = [key for key in content["entries"] if key.startswith("loss|")]
    for key in loss_keys:
        content["entries"][key] = {"config": config} if config is not None else "not an entry"
    path.write_text(json.dumps(content))
    loss_warns_once(message)
    autotune.clear_memory()
    path.write_text(json.dumps(content))
    with warnings.catch_warnings(record=True) as record:  # nothing to time (JAX): the heuristic
        warnings.simplefilter("always")
        for _ in range(2):
            assert autotune.row_config("loss", N_CLASSES, "float32", 4, device=DEVICE, labels="indices",
                                       need_grad=True) == launch_config.row_config(N_CLASSES, 4)
    assert len(cache_warnings(record)) == 1


def test_a_read_only_cache_folder_keeps_the_tuned_config_in_the_process(tuning, tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(folder))
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):  # root writes anyway: fail the write as the folder would
            def denied(**_kwargs):
                raise PermissionError(13, "Permission denied", str(folder))

            monkeypatch.setattr(autotune, "tempfile", types.SimpleNamespace(mkstemp=denied))
        loss_warns_once("not written")
        timed = len(tuning)
        assert timed > 0 and not autotune.cache_path(DEVICE).exists()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            api_losses()
            assert len(tuning) == timed  # this process kept what it tuned
            tt.sigmoid_forward(on(torch.rand(7)), 1.2, None)  # another key: tuned, not stored
        assert len(tuning) > timed and cache_warnings(record) == []  # the folder was reported once
    finally:
        folder.chmod(0o700)


def make_foreign(path: Path, how: str) -> str:
    """Makes the cache file (or its folder) one this user may not trust; the expected warning."""
    if how == "group-writable file":
        path.chmod(0o664)
        return "writable by other users"
    if how == "world-writable folder":
        path.parent.chmod(0o777)
        return "writable by other users"
    if how in ("another user's file", "another user's folder"):
        if os.geteuid() != 0:
            pytest.skip("only root can give a file to another uid")
        os.chown(path if how.endswith("file") else path.parent, 4321, -1)
        return "owned by uid 4321"
    if how == "link":
        target = path.with_name("elsewhere.json")
        path.rename(target)
        path.symlink_to(target)
        return "ignored"
    path.unlink()
    os.mkfifo(path)  # a FIFO: must neither block nor be read
    return "not a regular file"


@pytest.mark.parametrize("how", ["group-writable file", "world-writable folder", "another user's file",
                                 "another user's folder", "link", "fifo"])
def test_a_cache_file_others_could_have_written_is_ignored(tuning, how):
    """Issue 28: only a regular file of this user's, in a folder only this user (or root) may
    write, is read. Its entries here would give a wrong loss if they were taken."""
    path, content = filled_cache()
    for key in content["entries"]:
        if key.startswith("loss|"):
            content["entries"][key] = {"config": dataclasses.asdict(launch_config.RowConfig(False, 1, 16, 1))}
    path.write_text(json.dumps(content))
    expected = make_foreign(path, how)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert autotune.row_config("loss", N_CLASSES, "float32", 4, device=DEVICE, labels="indices",
                                       need_grad=True) == launch_config.row_config(N_CLASSES, 4)
            api_losses()
        messages = cache_warnings(record)
        assert messages and expected in messages[0], messages
    finally:
        path.parent.chmod(0o700)


def test_the_cache_folder_is_created_private(tuning, tmp_path, monkeypatch):
    folder = tmp_path / "new" / "cache"
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(folder))
    old_umask = os.umask(0o002)  # a common desktop umask: would make the folder group-writable
    try:
        api_losses()
    finally:
        os.umask(old_umask)
    assert (folder.stat().st_mode & 0o777) == 0o700
    assert (autotune.cache_path(DEVICE).stat().st_mode & 0o077) == 0


@needs_interpreter
def test_a_truncated_cache_gives_the_right_loss_in_a_fresh_process(tuning, tmp_path):
    """Issue 27: a cache file cut short (a full disk) read by the next training process."""
    path, _ = filled_cache()
    path.write_text(path.read_text()[:40])
    code = ("import torch, bitempered.torch as bt\n"
            "x = 4 * torch.randn(6, 5, generator=torch.Generator().manual_seed(0))\n"
            "y = torch.tensor([0, 1, 2, 3, 4, 0])\n"
            "a, b = (bt.bi_tempered_logistic_loss(x, y, 0.8, 1.2, reduction='none', backend=be)\n"
            "        for be in ('triton', 'torch'))\n"
            "print(float((a - b).abs().max()))\n")
    env = dict(os.environ, **{autotune.ENV_CACHE_DIR: str(tmp_path), autotune.ENV_SWITCH: "1",
                              "TRITON_INTERPRET": "1"})
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-5
    assert "CacheWarning" in done.stderr and "not JSON" in done.stderr
    assert json.loads(path.read_text())["entries"]  # tuned and rewritten
