"""``python -m perf.tuning`` (also ``python -m perf --tune``): heuristic versus tuned launch configs.

Per cell (kernel family x dtype x labels x N x C) it lets the autotuner pick a config (cached, or
timed now on these inputs: ``bindings/common/autotune.py``), then times the heuristic config
and the tuned one side by side with the harness's timer (CUDA: ``do_bench`` median with L2
flushes; CPU: wall clock under Triton's interpreter, meaningless except as a test), each pinned
with ``autotune.pinned``. Rows are appended to ``<out>/tuning.csv`` and ``<out>/tuning.md`` is
rebuilt from all of them: heuristic config and time, tuned config and time, the speedup, and the
cache key, so a tuned table can be folded back into ``kernels/launch_config.py``.
The loss is timed as training runs it (NEED_GRAD, class-index or dense labels).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

from bitempered.tune import _labels  # the tuner's own inputs

from . import measure

GPU_SHAPES = [(65536, 1000), (16384, 32000), (8192, 128256), (4096, 262144)]
CPU_SHAPES = [(64, 100)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FAMILIES = {"loss": ("loss",), "softmax": ("softmax_fwd", "softmax_bwd"),
            "binary": ("binary_loss", "sigmoid_fwd", "sigmoid_bwd")}
LOGIT_SCALE = 4.0  # as perf/harness.py
COLUMNS = ["timestamp", "git_sha", "device", "family", "key", "dtype", "labels", "N", "C", "t1", "t2",
           "heuristic_config", "heuristic_ms", "tuned_config", "tuned_ms", "speedup", "source",
           "tuner_heuristic_ms", "tuner_best_ms", "candidates", "timer"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m perf.tuning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", help="NxC ... (default: 4 GPU shapes; CPU: 64x100)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--labels", nargs="+", choices=["int", "dense"], default=["int"])
    p.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["loss"])
    p.add_argument("--temps", default="0.8:1.2", help="t1:t2 (one pair)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--out", type=Path, help="output folder (default perf/out/<device-slug>)")
    p.add_argument("--retune", action="store_true", help="time cached keys again")
    p.add_argument("--min-time-s", type=float, default=0.5, help="CPU: timed seconds per config")
    p.add_argument("--time-budget-s", type=float, default=None, help="start no new cell after this")
    return p.parse_args(argv)


def _shape(text: str) -> tuple[int, int]:
    n, c = text.lower().split("x")
    return int(n), int(c)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    from bitempered.bindings.common import autotune

    shapes = [_shape(s) for s in args.shapes] if args.shapes else (
        GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    t1, t2 = (float(v) for v in args.temps.split(":"))
    out = args.out or Path(__file__).resolve().parent / "out" / measure.device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "tuning.csv", out / "tuning.md"

    def write(row):  # after every cell: a run cut short keeps what it measured
        append_rows(csv_path, [row])
        write_markdown(md_path, read_rows(csv_path))

    was = autotune.set_enabled(True)
    try:
        _run(args, device, shapes, t1, t2, write)
    finally:
        autotune.set_enabled(was)
    print(f"wrote {csv_path}\nwrote {md_path}")
    return 0


def _run(args, device, shapes, t1, t2, write) -> None:
    from bitempered.bindings.common import autotune
    from bitempered.bindings.torch import launchers as tt

    name = tt.device_name(torch.empty(0, device=device))
    base = dict(timestamp=measure.timestamp(), git_sha=measure.git_sha(), device=name, t1=t1, t2=t2)
    if args.retune:
        autotune.forget(name)
    start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    for n, c in shapes:
        for dtype_flag in args.dtypes:
            for kind in args.labels:
                if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
                    print(f"time budget of {args.time_budget_s:g} s reached")
                    return
                dtype = DTYPES[dtype_flag]
                logits = (LOGIT_SCALE * torch.randn(n, c, device=device, generator=gen)).to(dtype)
                labels = _labels(kind, n, c, dtype, device, gen)
                for family in (f for name_ in args.families for f in FAMILIES[name_]):
                    if family != "loss" and kind != args.labels[0]:
                        continue  # label-independent kernels: once per shape and dtype
                    call = _call(tt, family, logits, labels, t1, t2)
                    with autotune.recording() as looked_up:
                        call()
                    _device, key, tuned_now = next(r for r in looked_up if r[1].startswith(family + "|"))
                    entry = autotune.cached_entry(name, key)
                    kind_of = type(launch_config_of(family, c, dtype))
                    heuristic, tuned = kind_of(**entry["heuristic"]), kind_of(**entry["config"])
                    (h_ms, timer), (t_ms, _) = _time(call, heuristic, device, args), _time(call, tuned, device, args)
                    row = dict(base, family=family, key=key, dtype=dtype_flag, labels=kind, N=n, C=c,
                               heuristic_config=heuristic.describe(), heuristic_ms=h_ms,
                               tuned_config=tuned.describe(), tuned_ms=t_ms, speedup=h_ms / t_ms,
                               source="tuned now" if tuned_now else "cache",
                               tuner_heuristic_ms=entry["heuristic_ms"], tuner_best_ms=entry["time_ms"],
                               candidates=entry["candidates"], timer=timer)
                    write(row)
                    print(f"{family:12s} {dtype_flag} {kind:5s} {n}x{c}: heuristic {h_ms:.4f} ms "
                          f"[{heuristic.describe()}]  tuned {t_ms:.4f} ms [{tuned.describe()}]  "
                          f"x{h_ms / t_ms:.2f} ({row['source']})")
                del logits, labels


def launch_config_of(family, c, dtype):
    from bitempered.kernels import launch_config

    if family in ("loss", "softmax_fwd", "softmax_bwd"):
        return launch_config.row_config(c, dtype.itemsize)
    return launch_config.binary_config()


def _call(tt, family, logits, labels, t1, t2):
    """The launch that users run for this family (inputs prepared outside the timed call)."""
    if family == "loss":
        return lambda: tt.loss_forward(logits, labels, t1, t2, 0.0, None, -100, True)
    if family == "softmax_fwd":
        return lambda: tt.softmax_forward(logits, t2, None)
    if family == "softmax_bwd":
        probs = tt.softmax_forward(logits, t2, None)
        upstream = torch.randn_like(probs)
        return lambda: tt.softmax_backward(probs, upstream, t2)
    x = logits.reshape(-1)
    y = torch.rand_like(x)
    if family == "binary_loss":
        return lambda: tt.binary_loss_forward(x, y, t1, t2, 0.0, None, True)
    if family == "sigmoid_fwd":
        return lambda: tt.sigmoid_forward(x, t2, None)
    probs = tt.sigmoid_forward(x, t2, None)
    return lambda: tt.sigmoid_backward(probs, y, t2)


def _time(call, config, device, args) -> tuple[float, str]:
    """Median ms of ``call`` with ``config`` pinned (the perf harness's timers)."""
    from bitempered.bindings.common import autotune

    def pinned_call(_i):
        with autotune.pinned(config):
            call()

    if device.type == "cuda":
        return measure.cuda_events(pinned_call, 1, 25, 100)[0], "cuda-events (do_bench)"
    median = measure.wall_clock(pinned_call, 1, warmup=1, min_reps=2, max_reps=20,
                                min_time_s=args.min_time_s)[0]
    return median, "perf_counter (interpreter)"


def append_rows(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_markdown(path: Path, rows: list[dict]) -> Path:
    """The latest row per (device, family, dtype, labels, N, C); speedup = heuristic / tuned."""
    latest = {}
    for row in rows:
        latest[(row["device"], row["family"], row["dtype"], row["labels"], row["N"], row["C"])] = row
    lines = ["# Autotuning: heuristic versus tuned launch configuration", "",
             "Written by `python -m perf.tuning` (`python -m perf --tune`). Times are medians of the "
             "same call with each config pinned; speedup = heuristic ms / tuned ms. `source`: tuned "
             "now on these inputs, or read from the autotune cache. Fold a winning config back into "
             "`kernels/launch_config.py` by its C bucket (the key).", "",
             "| device | family | dtype | labels | N | C | heuristic | heuristic ms | tuned | tuned ms "
             "| speedup | source | key |", "|" + "---|" * 13]
    for row in latest.values():
        lines.append(f"| {row['device']} | {row['family']} | {row['dtype']} | {row['labels']} | {row['N']} "
                     f"| {row['C']} | {row['heuristic_config']} | {float(row['heuristic_ms']):.4f} "
                     f"| {row['tuned_config']} | {float(row['tuned_ms']):.4f} | {float(row['speedup']):.2f} "
                     f"| {row['source']} | `{row['key']}` |")
    lines += ["", f"Timer: {', '.join(sorted({r['timer'] for r in latest.values()}))}; "
              f"git {', '.join(sorted({r['git_sha'] for r in latest.values()}))}.", ""]
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
