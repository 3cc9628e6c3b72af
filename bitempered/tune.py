"""``python -m bitempered.tune --shapes NxC ...``: fill the autotune cache ahead of training.

For every shape x dtype x label kind (and kernel family asked for) it launches the torch Triton
launchers once with autotuning on, which times the candidates on those inputs and stores the
fastest (``bindings/common/autotune.py``); keys already cached are kept unless ``--retune``
(which empties this device's cache first). Prints one line per key: heuristic config and time,
tuned config and time, as the tuner measured them. The JAX launchers read the same cache (same
device name). On a machine without CUDA it runs on Triton's interpreter (tiny shapes only: it
checks the mechanism; the times mean nothing).

``--report DIR`` then times, per cell, the heuristic config and the tuned one side by side, each
pinned (``autotune.pinned``), with longer timing windows than the tuner's: rows are appended to
``DIR/tuning.csv`` and ``DIR/tuning.md`` is rebuilt from all of them (heuristic and tuned config and
time, the speedup, the cache key), so a tuned table can be folded back into
``kernels/launch_config.py``. ``python -m perf --tune`` is this, with perf's output folder.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import math
import os
import sys
import time
from pathlib import Path

FAMILIES = {"loss": ("loss",), "softmax": ("softmax_fwd", "softmax_bwd"),
            "binary": ("binary_loss", "sigmoid_fwd", "sigmoid_bwd")}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LOGIT_SCALE = 4.0  # logits ~ N(0, 4^2), as perf/ measures
# --report's timing windows (ms; do_bench on a GPU): longer than the tuner's, one pair of numbers
REPORT_WARMUP_MS = 25
REPORT_REP_MS = 100
REPORT_COLUMNS = ["timestamp", "device", "triton", "kernels", "family", "key", "dtype", "labels", "N",
                  "C", "t1", "t2", "heuristic_config", "heuristic_ms", "tuned_config", "tuned_ms",
                  "speedup", "source", "tuner_heuristic_ms", "tuner_best_ms", "candidates", "timer"]


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, c = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: expected NxC (e.g. 4096x32000), got {text!r}")
    if n < 1 or c < 1:
        raise argparse.ArgumentTypeError(f"--shapes: N and C must be >= 1, got {text!r}")
    return n, c


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bitempered.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", type=parse_shape, required=True, help="NxC ...")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--labels", nargs="+", choices=["int", "dense"], default=["int"])
    p.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["loss"])
    p.add_argument("--grad", choices=["yes", "no", "both"], default="yes",
                   help="loss keys with NEED_GRAD (training), without (evaluation), or both")
    p.add_argument("--num-iters", type=int, default=None,
                   help="tune the original algorithm's kernels (ORIGINAL) with this many steps")
    p.add_argument("--t1", type=float, default=0.8)
    p.add_argument("--t2", type=float, default=1.2)
    p.add_argument("--retune", action="store_true", help="time keys that are already cached again")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no new cell (shape x dtype x labels) after this many seconds")
    p.add_argument("--report", type=Path, metavar="DIR", default=None,
                   help="also time heuristic and tuned config side by side: DIR/tuning.csv, .md")
    args = p.parse_args(argv)
    if args.num_iters is not None and args.num_iters < 1:
        p.error(f"--num-iters must be >= 1, got {args.num_iters}")
    return args


def torch_device(args):
    """The device asked for (default: CUDA when available); exits when CUDA is asked for and
    absent. On the CPU Triton's interpreter is switched on here, before the kernels are imported."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    return device


def main(argv=None) -> int:
    return run(parse_args(argv))


def run(args) -> int:
    """The sweep (and report) of parsed arguments; autotuning is switched back afterwards."""
    device = torch_device(args)
    from bitempered.bindings.common import autotune

    was = autotune.set_enabled(True)
    try:
        _sweep(args, device)
    finally:
        autotune.set_enabled(was)
    if args.report is not None:
        print(f"wrote {args.report / 'tuning.csv'}\nwrote {args.report / 'tuning.md'}")
    return 0


def _sweep(args, device) -> None:
    import torch

    from bitempered.bindings.common import autotune
    from bitempered.bindings.torch import launchers as tt

    name = tt.device_name(torch.empty(0, device=device))
    print(f"device: {name}   cache: {autotune.cache_path(name)}   triton {autotune.triton_version()}")
    if args.retune:
        autotune.forget(name)
    if args.report is not None:
        args.report.mkdir(parents=True, exist_ok=True)
    grads = {"yes": [True], "no": [False], "both": [True, False]}[args.grad]
    start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    reported: set = set()
    for n, c in args.shapes:
        for dtype_flag in args.dtypes:
            dtype = getattr(torch, DTYPES[dtype_flag])
            logits = (LOGIT_SCALE * torch.randn(n, c, device=device, generator=gen)).to(dtype)
            for kind in args.labels:
                if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
                    print(f"time budget of {args.time_budget_s:g} s reached: stopping before "
                          f"{n}x{c} {dtype_flag} {kind}")
                    return
                labels = _labels(kind, n, c, dtype, device, gen)
                for family in _families(args.families, first=kind == args.labels[0]):
                    for need_grad in (grads if family in ("loss", "binary_loss") else [False]):
                        call = _call(tt, family, logits, labels, args, need_grad)
                        with autotune.recording() as looked_up:
                            call()  # tunes on a cache miss
                        key, tuned_now = next((k, tuned) for _d, k, tuned in looked_up
                                              if k.startswith(family + "|"))
                        configs = _configs(autotune, name, key, family, c, dtype.itemsize)
                        if key not in reported:
                            reported.add(key)
                            _print_entry(autotune, name, key, configs, f"{n}x{c}", tuned_now)
                        if args.report is not None:
                            _report_cell(autotune, args, name, key, configs, tuned_now, call,
                                         dict(family=family, dtype=dtype_flag, labels=kind, N=n, C=c))
            del logits


def _families(names, first: bool):
    """Label-independent families are tuned once (with the first label kind asked for)."""
    for name in names:
        for family in FAMILIES[name]:
            if family == "loss" or first:
                yield family


def _labels(kind, n, c, dtype, device, gen):
    import torch

    if kind == "int":
        return torch.randint(0, c, (n,), device=device, generator=gen)
    w = torch.rand(n, c, device=device, generator=gen) ** 8
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def _call(tt, family, logits, labels, args, need_grad):
    """The one launch users run for ``family`` on these inputs (its inputs prepared here, outside
    the call, so that the call looks up one key and times one kernel)."""
    import torch

    t1, t2, k = args.t1, args.t2, args.num_iters
    x = logits.reshape(-1)
    if family == "loss":
        launch = functools.partial(tt.loss_forward, logits, labels, t1, t2, 0.0, k, -100, need_grad)
    elif family == "softmax_fwd":
        launch = functools.partial(tt.softmax_forward, logits, t2, k)
    elif family == "softmax_bwd":
        launch = functools.partial(tt.softmax_backward, tt.softmax_forward(logits, t2, k),
                                   torch.randn_like(logits), t2)
    elif family == "binary_loss":
        launch = functools.partial(tt.binary_loss_forward, x, torch.rand_like(x), t1, t2, 0.0, k, need_grad)
    elif family == "sigmoid_fwd":
        launch = functools.partial(tt.sigmoid_forward, x, t2, k)
    else:
        launch = functools.partial(tt.sigmoid_backward, tt.sigmoid_forward(x, t2, k), torch.rand_like(x), t2)

    def call():
        launch()
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)

    return call


def _configs(autotune, name, key, family, n_cols, elem_bytes):
    """(heuristic, the config the launch took: cached best or, where none is valid, heuristic)."""
    from bitempered.kernels import launch_config

    if family in autotune.ROW_FAMILIES:
        heuristic, kind = launch_config.row_config(n_cols, elem_bytes), launch_config.RowConfig
    else:
        heuristic, kind, n_cols = launch_config.binary_config(), launch_config.BinaryConfig, None
    return heuristic, autotune.cached_config(kind, name, key, n_cols) or heuristic


def _tuner_times(entry) -> tuple:
    """(heuristic ms, best ms, candidates, timer) as the tuner recorded them ('' where absent:
    an entry written by hand holds only its config)."""
    entry = entry if isinstance(entry, dict) else {}
    return tuple(entry.get(field, "") for field in ("heuristic_ms", "time_ms", "candidates", "timer"))


def _ms(value) -> str:
    return f"{value:.4f} ms" if _number(value) else "? ms"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _print_entry(autotune, name, key, configs, shape, tuned_now):
    heuristic, tuned = configs
    heuristic_ms, best_ms, candidates, timer = _tuner_times(autotune.cached_entry(name, key))
    gain = heuristic_ms / best_ms if _number(heuristic_ms) and _number(best_ms) and best_ms else math.nan
    source = f"tuned now on {shape}" if tuned_now else "cached, not timed again"
    print(f"{key}  [{source}]\n    heuristic {heuristic.describe()}: {_ms(heuristic_ms)}"
          f"\n    tuned     {tuned.describe()}: {_ms(best_ms)}   "
          f"(x{gain:.2f}, {candidates} candidates, {timer})")


def _report_cell(autotune, args, name, key, configs, tuned_now, call, cell):
    """Times the heuristic and the tuned config, each pinned, and adds a row to the report."""
    heuristic, tuned = configs

    def timed(config):
        def pinned_call():
            with autotune.pinned(config):
                call()
        return autotune.measure_ms(pinned_call, REPORT_WARMUP_MS, REPORT_REP_MS)

    heuristic_ms, tuned_ms = timed(heuristic), timed(tuned)
    tuner_heuristic_ms, tuner_best_ms, candidates, timer = _tuner_times(autotune.cached_entry(name, key))
    fingerprint = autotune.fingerprint(name)
    row = dict(cell, timestamp=_now(), device=name, triton=fingerprint["triton"],
               kernels=fingerprint["kernels"], key=key, t1=args.t1, t2=args.t2,
               heuristic_config=heuristic.describe(), heuristic_ms=heuristic_ms,
               tuned_config=tuned.describe(), tuned_ms=tuned_ms, speedup=heuristic_ms / tuned_ms,
               source="tuned now" if tuned_now else "cache", tuner_heuristic_ms=tuner_heuristic_ms,
               tuner_best_ms=tuner_best_ms, candidates=candidates,
               timer="wall clock, one run (interpreter)" if autotune.interpreted() else "do_bench median")
    csv_path = args.report / "tuning.csv"
    append_rows(csv_path, [row])  # after every cell: a run cut short keeps what it measured
    write_markdown(args.report / "tuning.md", read_rows(csv_path))
    print(f"    side by side ({cell['dtype']} {cell['labels']} {cell['N']}x{cell['C']}): heuristic "
          f"{heuristic_ms:.4f} ms, tuned {tuned_ms:.4f} ms: x{heuristic_ms / tuned_ms:.2f}")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_rows(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REPORT_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_markdown(path: Path, rows: list[dict]) -> Path:
    """The latest row per device, cache key (family, dtype, labels, NEED_GRAD, ORIGINAL), N and C;
    speedup = heuristic / tuned."""
    latest = {}
    for row in rows:
        latest[(row["device"], row["key"], row["N"], row["C"])] = row
    lines = ["# Autotuning: heuristic versus tuned launch configuration", "",
             "Written by `python -m bitempered.tune --report DIR` (`python -m perf --tune`). Times are "
             "medians of the same call with each config pinned; speedup = heuristic ms / tuned ms. "
             "`source`: tuned now on these inputs, or read from the autotune cache. Fold a winning "
             "config back into `kernels/launch_config.py` by its C bucket (the key).", "",
             "| device | family | dtype | labels | N | C | heuristic | heuristic ms | tuned | tuned ms "
             "| speedup | source | key |", "|" + "---|" * 13]
    for row in latest.values():
        lines.append(f"| {row['device']} | {row['family']} | {row['dtype']} | {row['labels']} | {row['N']} "
                     f"| {row['C']} | {row['heuristic_config']} | {float(row['heuristic_ms']):.4f} "
                     f"| {row['tuned_config']} | {float(row['tuned_ms']):.4f} | {float(row['speedup']):.2f} "
                     f"| {row['source']} | `{row['key']}` |")
    versions = sorted({f"triton {r['triton']}, kernels {r['kernels']}" for r in latest.values()})
    lines += ["", f"Timer: {', '.join(sorted({r['timer'] for r in latest.values()}))}; "
              f"{'; '.join(versions)}.", ""]
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
