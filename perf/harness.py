"""``python -m perf``: run the benchmark grid, append CSV rows, rewrite the markdown and plots.

Modes:
  (default)  the issue's grid: 5 shapes x 5 temperature pairs x fp32/bf16 x fwd/bwd/fwdbwd x
             int/dense labels. Meant for a GPU, in pieces (each piece appends to the CSV and the
             report is rebuilt from every row), e.g.
                 python -m perf --dtypes bf16 --directions fwdbwd --time-budget-s 540
  --quick    a CPU-sized subset (a few minutes on 2 cores), t1 = t2 = 1 next to the cross-entropies.
  --memory   peak memory of one fwd+bwd per temperature (perf/memory.py), a few minutes on 2 cores.
  --smoke    one tiny shape, 1-2 repeats, no torch.compile providers unless named (for tests).
Every axis can be narrowed with flags (--providers, --shapes, --temps, --dtypes, --directions,
--labels); --list prints the providers.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import sys
import time
import traceback
import types
from pathlib import Path

import torch

from . import measure, model, report
from .accuracy import max_relative_error, truth_and_passes
from .model import Cell
from .providers import DIRECTIONS, Inputs, all_providers

GPU_SHAPES = [(65536, 1000), (16384, 32000), (8192, 128256), (4096, 262144), (512, 1048576)]
QUICK_SHAPES = [(4096, 1000), (128, 32000), (32, 128256)]  # ~4M logits each (2 CPU cores)
SMOKE_SHAPES = [(64, 100)]
TEMPERATURES = [(1.0, 1.0), (0.8, 1.2), (0.5, 1.5), (0.2, 4.0), (0.5, 0.8)]
QUICK_TEMPERATURES = [(1.0, 1.0), (0.8, 1.2), (0.5, 0.8)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPES = ["fp32", "bf16"]  # the timing grid; fp16 on request (and in --memory: float16's float32 store)
LOGIT_SCALE = 4.0  # logits ~ N(0, 4^2): trained-classifier-like spread (SPEC's grid spans 0.1 .. 100)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized subset (~2 min on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="one tiny shape, 1-2 repeats (tests)")
    p.add_argument("--providers", nargs="+", help="provider names (default: all; see --list)")
    p.add_argument("--shapes", nargs="+", help="NxC, e.g. 4096x1000 512x32000")
    p.add_argument("--temps", nargs="+", help="t1:t2 pairs, e.g. 1:1 0.8:1.2 0.5:0.8")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    p.add_argument("--directions", nargs="+", choices=DIRECTIONS)
    p.add_argument("--labels", nargs="+", choices=["int", "dense"])
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--out", type=Path, help="output folder (default perf/out/<device-slug>, git-ignored; "
                   "pass --out perf/results/<device-slug> to record the tracked results)")
    p.add_argument("--fresh", action="store_true", help="start a new CSV instead of appending")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no new cell after this many seconds (rows so far are kept)")
    p.add_argument("--min-time-s", type=float, default=None, help="CPU: timed seconds per measurement")
    p.add_argument("--acc-elements", type=int, default=None,
                   help="accuracy/pass-count rows are capped at this many N x C elements")
    p.add_argument("--scale", type=float, default=LOGIT_SCALE, help="logits ~ N(0, scale^2)")
    p.add_argument("--sfu-clock-ghz", type=float, default=model.SFU_CLOCK_GHZ)
    p.add_argument("--sfu-ops-per-pass", type=float, default=model.SFU_OPS_PER_PASS)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild results.md and the plots from the CSV in --out (or this device's folder)")
    p.add_argument("--memory", action="store_true",
                   help="memory mode: peak memory of one fwd+bwd per temperature (default 4096x50000 fp32, "
                        "every temperature pair, int labels; --shapes/--temps/--labels narrow it), "
                        "written to memory.md / memory.csv (perf/memory.py)")
    p.add_argument("--list", action="store_true", help="list the providers and exit")
    return p.parse_args(argv)


def _shape(text: str) -> tuple[int, int]:
    n, c = text.lower().split("x")
    return int(n), int(c)


def _temps(text: str) -> tuple[float, float]:
    t1, t2 = text.split(":")
    return float(t1), float(t2)


def grid(args, device: torch.device):
    """(directions, groups): each group is (dtype, (N, C), labels, [(t1, t2), ...]) sharing inputs.

    Full and smoke runs are the product of their axes. --quick is the product for C = 1000 and only
    t = (0.8, 1.2) at the larger C (the curve over C), with dense labels only at C = 1000 and
    t1 = t2 = 1 (next to the frameworks' dense cross-entropy), so it fits in a few minutes on 2
    cores; --shapes or --temps turn it into a plain product again.
    """
    if args.smoke:
        shapes, temps, dtypes, directions, labels = SMOKE_SHAPES, [(0.8, 1.2)], ["fp32"], list(DIRECTIONS), ["int"]
    elif args.quick:
        shapes, temps, dtypes, directions, labels = (QUICK_SHAPES, QUICK_TEMPERATURES, ["fp32"], ["fwdbwd"],
                                                     ["int", "dense"])
    else:
        shapes = GPU_SHAPES if device.type == "cuda" else QUICK_SHAPES
        temps, dtypes, directions, labels = TEMPERATURES, DEFAULT_DTYPES, list(DIRECTIONS), ["int", "dense"]
    sparse = args.quick and not args.smoke and not (args.shapes or args.temps)
    shapes = [_shape(s) for s in args.shapes] if args.shapes else shapes
    temps = [_temps(t) for t in args.temps] if args.temps else temps
    groups = []
    for dtype, shape, kind in itertools.product(args.dtypes or dtypes, shapes, args.labels or labels):
        cell_temps = [t for t in temps if not sparse or _in_quick_subset(shape, kind, t)]
        if cell_temps:
            groups.append((dtype, shape, kind, cell_temps))
    return args.directions or directions, groups


def _in_quick_subset(shape, labels: str, temps) -> bool:
    if labels == "dense":
        return shape[1] == 1000 and temps == (1.0, 1.0)
    return shape[1] == 1000 or temps == (0.8, 1.2)


def choose_providers(args):
    providers = all_providers()
    names = [p.name for p in providers]
    if args.providers:
        unknown = sorted(set(args.providers) - set(names))
        if unknown:
            sys.exit(f"unknown providers {unknown}; known: {names}")
        return [p for p in providers if p.name in args.providers]
    if args.smoke:
        return [p for p in providers if p.smoke_default]
    return [p for p in providers if p.run_default]


def make_inputs(cell: Cell, device, n_sets: int, acc_elements: int, scale: float, seed: int) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    logits, labels = [], []
    for _ in range(n_sets):
        a = torch.randn(cell.n, cell.c, device=device, generator=gen) * scale
        logits.append(a.to(DTYPES[cell.dtype]))
        del a
        if cell.labels == "int":
            labels.append(torch.randint(0, cell.c, (cell.n,), device=device, generator=gen))
        else:  # a random distribution per row: a sharp row plus a uniform floor, sums to 1
            w = torch.rand(cell.n, cell.c, device=device, generator=gen) ** 8
            labels.append((w / w.sum(-1, keepdim=True)).to(DTYPES[cell.dtype]))
            del w
    acc_rows = max(1, min(cell.n, acc_elements // cell.c))
    return Inputs(cell, device, logits, labels, acc_rows)


def input_sets(cell: Cell, device, flush_bytes: int, memory_cap: int) -> int:
    """Rotating sets so that all of them together exceed ``flush_bytes`` (2 to 4 sets), within
    ``memory_cap`` bytes of inputs (>= 1 set)."""
    set_bytes = model.bytes_moved(cell, "fwd")
    wanted = min(4, max(2, math.ceil(flush_bytes / set_bytes)))
    return max(1, min(wanted, memory_cap // max(set_bytes, 1)))


def is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return isinstance(err, torch.cuda.OutOfMemoryError) or "RESOURCE_EXHAUSTED" in text \
        or "out of memory" in text.lower()


def default_out(slug: str) -> Path:
    """perf/out/<device-slug>/ (git-ignored): a run never rewrites the tracked perf/results/
    unless ``--out perf/results/<slug>`` asks for it."""
    return Path(__file__).resolve().parent / "out" / slug


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Session:
    """Run-wide facts: device, roof, timers, output."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.cuda = device.type == "cuda"
        self.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
        self.name = measure.device_name(device)
        self.slug = measure.device_slug(device)
        self.sha = measure.git_sha()
        self.run_id = measure.timestamp()
        copy_bytes = (1 << 30) if self.cuda else (16 << 20 if args.smoke else 256 << 20)
        self.bandwidth = measure.copy_bandwidth(device, copy_bytes)
        if self.cuda:
            props = torch.cuda.get_device_properties(device)
            self.sfu_rate = model.sfu_rate(props.multi_processor_count, args.sfu_clock_ghz)
            self.sfu_note = (f"{model.SFU_OPS_PER_CLK_PER_SM} MUFU ops/clk/SM x {props.multi_processor_count} "
                             f"SMs x {args.sfu_clock_ghz} GHz = {self.sfu_rate / 1e12:.2f} Tops/s")
            self.flush_bytes, self.memory_cap = 200 << 20, props.total_memory // 5
        else:
            self.sfu_rate, self.sfu_note = None, "n/a (CPU: memory roofline only)"
            self.flush_bytes, self.memory_cap = 64 << 20, 2 << 30
        self.roof = model.Roof(self.bandwidth, self.sfu_rate)
        self.acc_elements = args.acc_elements or (1 << 14 if args.smoke else 1 << 20 if not self.cuda else 1 << 24)
        self.min_time = args.min_time_s if args.min_time_s is not None else (0.0 if args.smoke else 1.0)
        self.reps = (1, 2) if args.smoke else (3, 50) if self.cuda else (3, 100)
        self.out = args.out or default_out(self.slug)

    def allocators(self, cell) -> list[str]:
        """The CPU allocator regimes a cell is timed in (measure.ALLOCATORS): a reused heap for every
        cell, and fresh pages too at t1 = t2 = 1, where the frameworks' cross-entropies (several
        N x C buffers a call) and ours (one) meet; on a GPU none ("")."""
        if self.cuda:
            return [""]
        return ["heap", "fresh"] if (cell.t1, cell.t2) == (1.0, 1.0) and not self.args.smoke else ["heap"]

    def time_calls(self, runners: dict, direction, n_sets, allocator: str = "") -> dict:
        """{name: ((median, p20, p80, repeats), timer, allocator)} of the runners' ``direction``
        calls; on CPU interleaved with ``allocator`` pinned (see measure.py), on a GPU one runner
        at a time."""
        if self.cuda:
            return {name: self._time_on_gpu(runner, direction, n_sets) + ("",) for name, runner in runners.items()}
        pinned = measure.pin_allocator(allocator)
        calls = {name: _in_timed_region(runner, runner.calls[direction]) for name, runner in runners.items()}
        stats = measure.interleaved_wall_clock(calls, n_sets, warmup=1, min_reps=self.reps[0],
                                               max_reps=self.reps[1], min_time_s=self.min_time)
        return {name: (values, "perf_counter, interleaved", pinned) for name, values in stats.items()}

    def _time_on_gpu(self, runner, direction, n_sets):
        call = runner.calls[direction]
        with runner.timed_region():  # torch.compile providers: recompiling here is an error
            if not runner.blocking:
                warmup, rep = (1, 5) if self.args.smoke else (25, 100)
                return measure.cuda_events(call, n_sets, warmup, rep), "cuda-events (do_bench)"
            stats = measure.wall_clock(call, n_sets, warmup=1 if self.args.smoke else 3, min_reps=self.reps[0],
                                       max_reps=self.reps[1], min_time_s=self.min_time)
        return stats, "perf_counter"

    def peak_extra(self, runner, direction):
        if direction in runner.memory:
            return runner.memory[direction]
        if self.cuda and not runner.blocking:
            return measure.cuda_peak_extra(lambda: runner.calls[direction](0), self.device,
                                           runner.output_bytes.get(direction, 0)), "cuda-peak"
        return None, "n/a (CPU torch)"


def _in_timed_region(runner, call):
    def timed(i):
        with runner.timed_region():  # torch.compile providers: recompiling here is an error
            return call(i)
    return timed


def run_cell(session: Session, providers, cell: Cell, directions, inputs: Inputs, printed: set):
    """Measures every provider on one cell; returns CSV rows (speedups filled in).

    On CPU the providers of one framework are built first and timed interleaved
    (``Session.time_calls``): their ratios then hold on a shared machine. Frameworks are timed one
    after the other: each keeps its worker threads spinning for a while after a call (OpenMP,
    XLA's pool), which on a few cores slows the other framework's next call. On a GPU each
    provider is built, timed and freed in turn (CUDA events are not disturbed by other processes,
    and two providers' inputs and executables might not fit at once)."""
    args = session.args
    truth, passes = truth_and_passes(inputs)
    passes_mean, passes_max = float(passes.mean()), int(passes.max())
    sfu_ops = {d: model.sfu_ops_per_element(cell, d, passes_mean, args.sfu_ops_per_pass) for d in directions}
    base = dict(timestamp=measure.timestamp(), run_id=session.run_id, git_sha=session.sha, device=session.name,
                device_slug=session.slug, mode=session.mode, dtype=cell.dtype, labels=cell.labels, N=cell.n,
                C=cell.c, t1=cell.t1, t2=cell.t2, bandwidth_GBps=session.bandwidth / 1e9,
                sfu_rate_Tops=(session.sfu_rate / 1e12 if session.sfu_rate else None),
                n_input_sets=len(inputs.logits), acc_rows=inputs.acc_rows)
    wanted = [p for p in providers if not p.ce_only or (cell.t1 == 1.0 and cell.t2 == 1.0)]
    rows = []
    frameworks = list(dict.fromkeys(p.framework for p in wanted))
    groups = [[p] for p in wanted] if session.cuda else \
        [[p for p in wanted if p.framework == framework] for framework in frameworks]
    for group in groups:
        built = {}  # provider name -> (runner, row fields of every direction)
        for provider in group:
            common = dict(base, provider=provider.name, framework=provider.framework)
            result = _build(session, provider, cell, directions, inputs, printed, common, truth)
            if isinstance(result, list):  # skipped or failed: its rows
                rows += result
                continue
            runner, loss_err, residual = result
            built[provider.name] = runner, dict(
                common, solver=provider.solver, passes=_solver_passes(provider, cell, passes_mean, passes_max),
                loss_rel_err=loss_err, sum_p_residual=residual, notes=runner.notes, config=runner.config)
        for direction, allocator in itertools.product(directions, session.allocators(cell)):
            timed = {name: runner for name, (runner, _) in built.items() if direction in runner.calls}
            try:
                stats = session.time_calls(timed, direction, len(inputs.logits), allocator) if timed else {}
            except Exception:  # noqa: BLE001 - then each provider alone, to name the one failing
                stats = {}
                for name, runner in timed.items():
                    try:
                        stats.update(session.time_calls({name: runner}, direction, len(inputs.logits), allocator))
                    except Exception as err:  # noqa: BLE001
                        stats[name] = err
            for name, (runner, fields) in built.items():
                row = dict(fields, direction=direction, allocator=allocator)
                if direction not in runner.calls:
                    rows.append(dict(row, status="n/a: gradient is computed in the forward (no separate backward)"))
                    continue
                try:
                    if isinstance(stats[name], Exception):
                        raise stats[name]
                    (median, p20, p80, reps), timer, row["allocator"] = stats[name]
                    extra, memory_method = session.peak_extra(runner, direction)
                except Exception as err:  # noqa: BLE001
                    status = "oom" if is_oom(err) else f"error: {type(err).__name__}: {_first_line(err)}"
                    print(f"  {name} {direction}: {status}")
                    rows.append(dict(row, status=status))
                    free(session.device)
                    continue
                rows.append(_timed_row(session, cell, row, direction, median, p20, p80, reps, timer, extra,
                                       memory_method, sfu_ops[direction]))
        del built
        free(session.device)
    report.fill_speedups(rows)
    return rows


def _build(session, provider, cell, directions, inputs, printed, common, truth):
    """(runner, loss error, sum-p residual), or the provider's rows when it is skipped or fails."""
    reason = provider.skip_reason(cell, session.device)
    if reason:
        if (provider.name, reason) not in printed:  # each reason once per run
            print(f"  skip {provider.name}: {reason}")
            printed.add((provider.name, reason))
        return [dict(common, direction=d, status=f"skipped: {reason}") for d in directions]
    runner = None
    try:
        runner = provider.build(inputs, tuple(directions))
        losses, residual = runner.evaluate(inputs.acc_rows)
        loss_err = max_relative_error(losses, truth)
    except Exception as err:  # noqa: BLE001 - one provider failing never stops the run
        status = "oom" if is_oom(err) else f"error: {type(err).__name__}: {_first_line(err)}"
        if isinstance(err, NotImplementedError):
            status = f"skipped: not implemented: {_first_line(err)}"
        print(f"  {provider.name}: {status}")
        if status.startswith("error"):
            traceback.print_exc(limit=3)
        del runner
        free(session.device)
        return [dict(common, direction=d, status=status) for d in directions]
    if runner.config and (provider.name, cell.dtype, cell.c) not in printed:
        printed.add((provider.name, cell.dtype, cell.c))
        print(f"  {provider.name} config for {cell.dtype} C={cell.c}: {runner.config}")
    return runner, loss_err, residual


def _timed_row(session, cell, row, direction, median, p20, p80, reps, timer, extra, memory_method, ops):
    nbytes = model.bytes_moved(cell, direction)
    seconds = median * 1e-3
    sfu_total = None if ops is None else ops * cell.n * cell.c
    row.update(status="ok", time_ms=median, time_ms_p20=p20, time_ms_p80=p80, reps=reps, timer=timer,
               bytes_model=nbytes, GBps=nbytes / seconds / 1e9,
               pct_bandwidth=100 * nbytes / seconds / session.bandwidth,
               sfu_ops_per_elem=ops, roofline_ms=session.roof.time_s(nbytes, sfu_total) * 1e3,
               pct_sfu_roof=(100 * sfu_total / session.sfu_rate / seconds
                             if session.sfu_rate and sfu_total is not None else None),
               peak_extra_MiB=None if extra is None else extra / 2**20, memory_method=memory_method)
    row["pct_roofline"] = 100 * row["roofline_ms"] / median
    print(report.terminal_row(row))
    return row


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:160] if lines else ""


def _solver_passes(provider, cell: Cell, mean: float, worst: int) -> str:
    if provider.solver == "converged":
        return f"{mean:.2f}/{worst}"
    if provider.solver == "original-5":
        if cell.t2 == 1.0:
            return "1"
        return "6" if cell.t2 > 1.0 else "5"  # fixed point: 5 steps + the final sum; bisection: 5
    return "1"


def report_only(args, device) -> int:
    """Rebuilds the markdown and plots from an existing CSV (device facts from its last row)."""
    out = args.out or default_out(measure.device_slug(device))
    csv_path = out / "results.csv"
    if not csv_path.exists():
        sys.exit(f"no {csv_path}")
    last = report.read_rows(csv_path)[-1]
    rate = last["sfu_rate_Tops"]
    session = types.SimpleNamespace(
        name=last["device"], slug=last["device_slug"], bandwidth=last["bandwidth_GBps"] * 1e9, args=args,
        sfu_note=f"{rate:.2f} Tops/s (from the CSV)" if rate else "n/a (CPU: memory roofline only)")
    md_path = report.write_report(session, csv_path, plots=not args.no_plots)
    print(report.summary(csv_path, session.slug))
    print(f"wrote {md_path}")
    return 0


def memory_mode(args, device) -> int:
    """``--memory``: perf/memory.py's table; results.md picks it up when rebuilt."""
    from . import memory

    start = time.perf_counter()
    session = types.SimpleNamespace(name=measure.device_name(device), slug=measure.device_slug(device),
                                    sha=measure.git_sha(), run_id=measure.timestamp())
    out = args.out or default_out(session.slug)
    shapes = [_shape(s) for s in args.shapes] if args.shapes else memory.MEMORY_SHAPES
    temps = [_temps(t) for t in args.temps] if args.temps else TEMPERATURES
    md_path = memory.run(session, shapes, temps, args.labels or ["int"], out, args.dtypes or ["fp32"])
    print(f"wrote {md_path}\nelapsed {time.perf_counter() - start:.0f} s")
    if (out / "results.csv").exists():  # the timing report of this folder shows the memory table too
        report_only(args, device)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--tune" in argv:  # heuristic vs tuned launch configs: python -m bitempered.tune --report (its flags)
        from .tuning import main as tuning_main
        return tuning_main([a for a in argv if a != "--tune"])
    args = parse_args(argv)
    if args.list:
        for p in all_providers():
            notes = ("t1=t2=1 only " if p.ce_only else "") + ("" if p.run_default else "(opt-in: name it)")
            print(f"{p.name:26s} {p.framework:6s} {notes}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if args.report_only:
        return report_only(args, device)
    if args.memory:
        return memory_mode(args, device)
    directions, groups = grid(args, device)
    providers = choose_providers(args)
    start = time.perf_counter()
    session = Session(args, device)
    print(f"device: {session.name}   git {session.sha}   mode {session.mode}")
    print(f"measured copy bandwidth: {session.bandwidth / 1e9:.1f} GB/s   SFU roof: {session.sfu_note}")
    print(f"providers: {', '.join(p.name for p in providers)}")
    regimes = {a for dtype, (n, c), labels, temps in groups for t in temps
               for a in session.allocators(Cell(n, c, dtype, labels, *t))}
    print("\n".join(report.terminal_legend(sorted(regimes - {""}))))
    csv_path = session.out / "results.csv"
    report.prepare_csv(csv_path, fresh=args.fresh)
    printed: set = set()
    done = 0
    for dtype, (n, c), labels, temps in groups:
        if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
            print(f"time budget of {args.time_budget_s:.0f} s reached: {len(groups) - done} input groups left")
            break
        first = Cell(n, c, dtype, labels, *temps[0])
        n_sets = input_sets(first, device, session.flush_bytes, session.memory_cap)
        try:
            inputs = make_inputs(first, device, n_sets, session.acc_elements, args.scale, seed=n * 7 + c)
        except Exception as err:  # noqa: BLE001
            print(f"{dtype} {n}x{c} {labels}: inputs do not fit ({type(err).__name__}); skipped")
            free(device)
            continue
        for t1, t2 in temps:
            if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
                break
            cell = Cell(n, c, dtype, labels, t1, t2)
            inputs.cell = cell
            print(f"[{time.perf_counter() - start:6.1f}s] {dtype} N={n} C={c} labels={labels} t=({t1:g},{t2:g})")
            rows = run_cell(session, providers, cell, directions, inputs, printed)
            report.append_rows(csv_path, rows)
        done += 1
        del inputs
        free(device)
    elapsed = time.perf_counter() - start
    md_path = report.write_report(session, csv_path, plots=not args.no_plots)
    print(report.summary(csv_path, session.slug))
    print(f"wrote {csv_path}\nwrote {md_path}\nelapsed {elapsed:.0f} s")
    return 0
