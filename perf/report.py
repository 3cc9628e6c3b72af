"""CSV rows, speedups, the markdown report and the plots.

The CSV is append-only (one row per provider x cell x direction, with device, timestamp and git
SHA); the markdown and the plots are rebuilt from ALL of its rows, keeping the latest row of each
(provider, cell, direction), so a GPU grid can be measured in several pieces.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from . import measure
from .providers import all_providers

PROVIDERS = [p.name for p in all_providers()]
OURS_TORCH, OURS_JAX = "bitempered-triton", "bitempered-jax-xla"
NAIVE, ORIGINAL, COMPILED, LIGER = "naive-port", "original-jax", "torch-compile-native", "liger-ce"

COLUMNS = [
    "timestamp", "run_id", "git_sha", "device", "device_slug", "mode", "provider", "framework",
    "direction", "dtype", "labels", "N", "C", "t1", "t2", "status", "time_ms", "time_ms_p20",
    "time_ms_p80", "reps", "timer", "allocator", "n_input_sets", "bytes_model", "GBps", "bandwidth_GBps",
    "pct_bandwidth", "sfu_ops_per_elem", "sfu_rate_Tops", "pct_sfu_roof", "roofline_ms",
    "pct_roofline", "peak_extra_MiB", "memory_method", "solver", "passes", "acc_rows",
    "loss_rel_err", "sum_p_residual", "config", "notes",
] + [f"speedup_vs_{name}" for name in PROVIDERS]
NUMERIC = {"N", "C", "t1", "t2", "time_ms", "time_ms_p20", "time_ms_p80", "reps", "n_input_sets",
           "bytes_model", "GBps", "bandwidth_GBps", "pct_bandwidth", "sfu_ops_per_elem",
           "sfu_rate_Tops", "pct_sfu_roof", "roofline_ms", "pct_roofline", "peak_extra_MiB",
           "acc_rows", "loss_rel_err", "sum_p_residual"} | {f"speedup_vs_{n}" for n in PROVIDERS}
KEY = ("provider", "direction", "dtype", "labels", "N", "C", "t1", "t2", "allocator")


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------

def _cell_key(row):
    return (row["dtype"], row["labels"], row["N"], row["C"], row["t1"], row["t2"], row["direction"],
            row.get("allocator", ""))


def primary(rows: list[dict]) -> list[dict]:
    """One row per provider x cell x direction: the reused-heap regime where a cell was also timed
    with fresh pages (perf/measure.py: ALLOCATORS), for the plots and the comparisons across
    frameworks; the tables show both regimes, each row labelled."""
    return [r for r in rows if r.get("allocator") != "fresh"]


def fill_speedups(rows: list[dict]) -> None:
    """speedup_vs_P = time(P) / time(row) within the same cell and direction."""
    times = {}
    for row in rows:
        if row.get("status") == "ok":
            times[(_cell_key(row), row["provider"])] = row["time_ms"]
    for row in rows:
        if row.get("status") != "ok":
            continue
        for name in PROVIDERS:
            other = times.get((_cell_key(row), name))
            row[f"speedup_vs_{name}"] = None if other is None else other / row["time_ms"]


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def prepare_csv(path: Path, fresh: bool) -> None:
    """Creates the CSV with its header; an old file with other columns is kept aside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not fresh:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header == COLUMNS:
            return
        aside = path.with_name(f"results-old-columns-{int(path.stat().st_mtime)}.csv")
        os.replace(path, aside)
        print(f"{path.name} had other columns: kept as {aside.name}")
    with path.open("w", newline="") as f:
        csv.writer(f).writerow(COLUMNS)


def append_rows(path: Path, rows: list[dict]) -> None:
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        for row in rows:
            writer.writerow([_fmt(row.get(col)) for col in COLUMNS])


def read_rows(path: Path) -> list[dict]:
    """All rows, numbers parsed (empty -> None)."""
    rows = []
    with path.open(newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for col in COLUMNS:
                text = raw.get(col, "")
                row[col] = (float(text) if text else None) if col in NUMERIC else text
            for col in ("N", "C"):
                row[col] = int(row[col])
            rows.append(row)
    return rows


def latest(rows: list[dict]) -> list[dict]:
    """The last row of each (provider, cell, direction), in first-seen order."""
    table = {}
    for row in rows:
        table.pop(tuple(row[k] for k in KEY), None)
        table[tuple(row[k] for k in KEY)] = row
    return list(table.values())


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _num(value, spec=".3g", none="-"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def _temps(row) -> str:
    return f"{row['t1']:g},{row['t2']:g}"


def _ok(row) -> bool:
    return row["status"] == "ok"


# ---- how steady a row's repeats were --------------------------------------------------------

NOISY_SPREAD = 1.5  # p80 / p20 above this: the repeats disagree, most often because the machine was busy
NOISY_MARK = "!"


def spread_legend(mark: str = NOISY_MARK) -> str:
    """The one-line legend of the spread and of its marker (``mark`` as it is written there)."""
    return (f"spread = p80 / p20 of a row's repeated timings (1.00 = every repeat alike); {mark} = above "
            f"{NOISY_SPREAD:g}x: the repeats disagree (most often the machine was busy), rerun that cell before "
            "trusting it")


def spread(row) -> float | None:
    """p80 / p20 of the row's repeated timings, or None when the row has no percentiles."""
    p20, p80 = row.get("time_ms_p20"), row.get("time_ms_p80")
    return p80 / p20 if p20 and p80 is not None else None


def is_noisy(row) -> bool:
    value = spread(row)
    return value is not None and value > NOISY_SPREAD


def _ms(row) -> str:
    """The median time, marked when its repeats spread too much to trust it."""
    return f"{row['time_ms']:.3f}" + (f" {NOISY_MARK}" if is_noisy(row) else "")


def terminal_legend(allocators: list[str]) -> list[str]:
    """What the printed rows' columns are (``terminal_row``), with the allocator regimes timed."""
    lines = [f"  {spread_legend()}"]
    lines += [f"  alloc {a}: {measure.ALLOCATORS[a]}" for a in allocators if a in measure.ALLOCATORS]
    return lines + [f"  {'provider':26s} {'dir':6s} {'alloc':5s} {'median ms':>10s}  {'p20 - p80 ms (spread)':>26s}  "
                    f"{'GB/s':>8s}  {'% roof':>6s}  loss err"]


def terminal_row(row) -> str:
    """One timed row as ``python -m perf`` prints it (columns: ``terminal_legend``)."""
    value = spread(row)
    band = f"{row['time_ms_p20']:.3f} - {row['time_ms_p80']:.3f} ({value:.2f}x)" if value is not None else "-"
    mark = NOISY_MARK if is_noisy(row) else " "
    return (f"  {row['provider']:26s} {row['direction']:6s} {row['allocator'] or '-':5s} {row['time_ms']:10.3f}  "
            f"{band:>26s}{mark} {row['GBps']:8.2f}  {row['pct_roofline']:5.1f}%  {row['loss_rel_err']:.1e}")


# ---- t1 = t2 = 1: bitempered next to the framework's own cross-entropy ----------------------

CROSS_ENTROPY = {"torch": "torch-ce", "jax": "optax-ce"}
TEMPERATURE_FORM = {  # how each of our providers passes the temperatures
    "bitempered-triton": "Python floats", "bitempered-torch": "Python floats",
    "bitempered-torch-tensor-t": "0-d tensors", "bitempered-torch-eager": "Python floats",
    "bitempered-jax-xla": "traced (jit arguments)",
    "bitempered-jax-triton": "traced (jit arguments)", "bitempered-jax-xla-const": "Python constants (closed over)",
}


def cross_entropy_pairs(rows: list[dict]) -> list[dict]:
    """At t1 = t2 = 1: every bitempered row next to its framework's cross-entropy on the same cell."""
    ce = {(_cell_key(r), r["provider"]): r for r in rows if _ok(r) and r["provider"] in CROSS_ENTROPY.values()}
    out = []
    for r in rows:
        if not (_ok(r) and r["provider"] in TEMPERATURE_FORM and r["t1"] == 1 and r["t2"] == 1):
            continue
        other = ce.get((_cell_key(r), CROSS_ENTROPY[r["framework"]]))
        if other is not None:
            out.append(dict(ours=r, ce=other, ratio=r["time_ms"] / other["time_ms"]))
    out.sort(key=lambda p: (p["ours"]["framework"] != "torch",
                            group_order((p["ours"]["dtype"], p["ours"]["direction"], p["ours"]["labels"])),
                            p["ours"]["C"], p["ours"]["allocator"] == "fresh", PROVIDERS.index(p["ours"]["provider"])))
    return out


def cross_entropy_section(rows: list[dict]) -> list[str]:
    pairs = cross_entropy_pairs(rows)
    if not pairs:
        return []
    lines = ["## At t1 = t2 = 1: bitempered next to the framework's own cross-entropy", "",
             "At t1 = t2 = 1 the bi-tempered loss equals cross-entropy. `ratio` = bitempered's time / the "
             "cross-entropy's time on the same inputs (1.00 = as fast; below 1 = faster). The cross-entropies: "
             "PyTorch `F.cross_entropy` (class indices, or dense probability targets); JAX optax "
             "`softmax_cross_entropy_with_integer_labels` (class indices) or `softmax_cross_entropy` (dense), "
             "under `jax.jit(jax.value_and_grad(...))` like ours."]
    allocators = sorted({p["ours"]["allocator"] for p in pairs} - {""})
    if allocators:
        lines += ["", "`allocator` (CPU): how the C library's malloc served the large buffers of both losses while "
                  "they were timed, pinned because it decides how much a fresh buffer costs and a process's history "
                  "decides it otherwise: " + "; ".join(f"`{a}`: {measure.ALLOCATORS.get(a, 'as the C library chose')}"
                                                      for a in allocators) + ". The cross-entropies allocate "
                  "several N x C buffers a call, bitempered one (its gradient), so fresh pages cost them more."]
    column = " allocator |" if allocators else ""
    lines += ["", "| dtype | direction | N x C | labels |" + column + " bitempered | temperatures passed as | ms | "
              "cross-entropy | ms | ratio |", "|---|---|---|---|" + ("---|" if allocators else "") + "---|---|---|---|---|---|"]
    for p in pairs:
        r, c = p["ours"], p["ce"]
        regime = f" {r['allocator']} |" if allocators else ""
        lines.append(f"| {r['dtype']} | {r['direction']} | {r['N']} x {r['C']} | {r['labels']} |{regime} {r['provider']} | "
                     f"{TEMPERATURE_FORM[r['provider']]} | {_ms(r)} | {c['provider']} | {_ms(c)} | "
                     f"**{p['ratio']:.2f}** |")
    return lines + [""]


# ---- bitempered JAX against the original JAX implementation ---------------------------------

def jax_vs_original(rows: list[dict]) -> list[dict]:
    """bitempered JAX (converged) vs the original JAX (5 iterations), fp32 fwd+bwd, int labels."""
    out = []
    for row in rows:
        if (row["provider"] == OURS_JAX and _ok(row) and row["dtype"] == "fp32"
                and row["direction"] == "fwdbwd" and row["labels"] == "int"):
            original = next((r for r in rows if r["provider"] == ORIGINAL and _ok(r)
                             and _cell_key(r) == _cell_key(row)), None)
            if original is None:
                continue
            out.append(dict(N=row["N"], C=row["C"], temps=_temps(row), ours=row, original=original,
                            ratio=row["time_ms"] / original["time_ms"],
                            ours_err=row["loss_rel_err"], original_err=original["loss_rel_err"]))
    return out


def original_section(rows: list[dict]) -> list[str]:
    found = jax_vs_original(rows)
    if not found:
        return []
    lines = ["## bitempered JAX next to the original JAX implementation", "",
             "fp32, class-index labels, `jax.jit(jax.value_and_grad(lambda a, t1, t2: loss(a, y, t1, t2).sum()))` "
             "with traced temperatures for both. bitempered solves the normalization to convergence; the original "
             "(jax-bitempered-loss 0.0.2) runs 5 fixed iterations, hence its larger loss error. `ratio` = "
             "bitempered's time / the original's time (below 1 = bitempered is faster).", "",
             "| N x C | t1,t2 | bitempered ms | original ms | ratio | bitempered loss error | original loss error |",
             "|---|---|---|---|---|---|---|"]
    for item in found:
        lines.append(f"| {item['N']} x {item['C']} | {item['temps']} | {_ms(item['ours'])} | {_ms(item['original'])} | "
                     f"**{item['ratio']:.2f}** | {_num(item['ours_err'], '.1e')} | {_num(item['original_err'], '.1e')} |")
    return lines + [""]


def summary(csv_path: Path, slug: str) -> str:
    """The two comparisons above and the rows too noisy to trust, for the terminal."""
    rows = latest(read_rows(csv_path))
    lines = ["", "=" * 78, f"SUMMARY ({slug})"]
    for p in cross_entropy_pairs(rows):
        r = p["ours"]
        regime = f" {r['allocator']}" if r["allocator"] else ""
        lines.append(f"  t=1,1 {r['dtype']} {r['direction']} {r['N']}x{r['C']} {r['labels']:5s}{regime:6s} "
                     f"{r['provider']:26s} ({TEMPERATURE_FORM[r['provider']]}) / {p['ce']['provider']}: "
                     f"{p['ratio']:.2f}x{_pair_mark(r, p['ce'])}")
    for item in jax_vs_original(primary(rows)):
        lines.append(f"  bitempered-jax-xla / original-jax, fp32 fwdbwd {item['N']}x{item['C']} t={item['temps']}: "
                     f"{item['ratio']:.2f}x{_pair_mark(item['ours'], item['original'])} (loss error "
                     f"{_num(item['ours_err'], '.1e')} vs {_num(item['original_err'], '.1e')})")
    if len(lines) == 3:
        lines.append("  (no comparisons in these results)")
    noisy = [r for r in rows if _ok(r) and is_noisy(r)]
    if noisy:
        shown = 10
        lines.append(f"  {len(noisy)} of {sum(_ok(r) for r in rows)} timed rows marked {NOISY_MARK}: their repeats "
                     f"spread more than {NOISY_SPREAD:g}x (p80 / p20); rerun those cells:")
        lines += [f"    {r['provider']} {r['dtype']} {r['direction']} {r['N']}x{r['C']} {r['labels']} t={_temps(r)}"
                  f"{' ' + r['allocator'] if r['allocator'] else ''}: {spread(r):.2f}x" for r in noisy[:shown]]
        if len(noisy) > shown:
            lines.append(f"    and {len(noisy) - shown} more (the `spread` column of results.md)")
    lines.append("=" * 78)
    return "\n".join(lines)


def _pair_mark(a, b) -> str:
    """A ratio of two times is as noisy as the noisier of them."""
    return f" {NOISY_MARK}" if is_noisy(a) or is_noisy(b) else ""


# ---- GPU: the Triton kernels against the alternatives --------------------------------------

def _ratio_goal(rows, other, bar, accuracy=False):
    """(measured text, all cells reach it) of 'ours >= bar x other' over the bf16 fwd+bwd cells, or None."""
    vals = []
    for r in rows:
        if (r["provider"] == OURS_TORCH and _ok(r) and r["dtype"] == "bf16"
                and r["direction"] == "fwdbwd" and r.get(f"speedup_vs_{other}") is not None):
            ok = r[f"speedup_vs_{other}"] >= bar
            if accuracy:
                peer = next((p for p in rows if p["provider"] == other and _cell_key(p) == _cell_key(r)), None)
                ok = ok and peer is not None and r["loss_rel_err"] <= peer["loss_rel_err"]
            vals.append((r[f"speedup_vs_{other}"], ok, r))
    if not vals:
        return None
    worst = min(vals, key=lambda v: v[0])
    reached = sum(ok for _, ok, _ in vals)
    r = worst[2]
    return (f"slowest cell {worst[0]:.2f}x (N={r['N']} C={r['C']} t={_temps(r)}); {reached} of {len(vals)} cells "
            f"at or above", reached == len(vals))


def gpu_comparisons(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """(what, measured, reached) for the Triton kernels; only what these rows can measure (a GPU)."""
    out = []
    roof = [r for r in rows if r["provider"] == OURS_TORCH and _ok(r) and r["dtype"] == "bf16"
            and r["direction"] == "fwdbwd"]
    if roof:
        worst = min(roof, key=lambda r: r["pct_roofline"])
        reached = sum(r["pct_roofline"] >= 80 for r in roof)
        out.append(("bf16 fwd+bwd: at least 80% of the roofline max(bytes/bandwidth, SFU ops/SFU rate)",
                    f"lowest {worst['pct_roofline']:.1f}% (N={worst['N']} C={worst['C']} t={_temps(worst)}); "
                    f"{reached} of {len(roof)} cells", reached == len(roof)))
    for what, other, bar, acc in (("at least 20x faster than the naive port", NAIVE, 20, False),
                                  ("at least 3x faster than torch.compile of the native math", COMPILED, 3, False),
                                  ("at least 5x faster than the original JAX, equally accurate or better",
                                   ORIGINAL, 5, True)):
        got = _ratio_goal(rows, other, bar, acc)
        if got:
            out.append((f"bf16 fwd+bwd: {what}", *got))
    ce = [r for r in rows if r["provider"] == OURS_TORCH and _ok(r) and r["t1"] == 1 and r["t2"] == 1
          and r.get(f"speedup_vs_{LIGER}") is not None]
    if ce:
        worst = min(ce, key=lambda r: r[f"speedup_vs_{LIGER}"])
        reached = sum(r[f"speedup_vs_{LIGER}"] >= 1.0 for r in ce)
        out.append(("t1 = t2 = 1: as fast as Liger-Kernel's cross-entropy or faster",
                    f"slowest cell {worst[f'speedup_vs_{LIGER}']:.2f}x ({worst['dtype']} {worst['direction']} "
                    f"N={worst['N']} C={worst['C']}); {reached} of {len(ce)} cells", reached == len(ce)))
    mem = [r for r in rows if r["provider"] == OURS_TORCH and _ok(r) and r["direction"] == "fwdbwd"
           and r["peak_extra_MiB"] is not None]
    if mem:
        limit = lambda r: 1.0 + 16 * r["N"] / 2**20  # noqa: E731 - per-row fp32 scalars + 1 MiB slack
        worst = max(mem, key=lambda r: r["peak_extra_MiB"] - limit(r))
        reached = sum(r["peak_extra_MiB"] <= limit(r) for r in mem)
        out.append(("GPU memory: nothing allocated beyond the gradient (at most 1 MiB + 16 bytes per row)",
                    f"largest {worst['peak_extra_MiB']:.1f} MiB extra (N={worst['N']} C={worst['C']} {worst['dtype']}); "
                    f"{reached} of {len(mem)} cells", reached == len(mem)))
    return out


def gpu_section(rows: list[dict], on_gpu: bool) -> list[str]:
    found = gpu_comparisons(rows)
    if not found and on_gpu:
        return ["No bitempered-triton rows in these results: the Triton kernel comparisons are left out.", ""]
    if not found:
        return ["Comparisons of the Triton kernels (share of the roofline, Liger-Kernel, GPU memory) and the "
                "special-function (SFU) columns need a CUDA GPU: this run has none, so they are left out.", ""]
    lines = ["## Triton kernels (GPU)", "", "| comparison | measured | reached |", "|---|---|---|"]
    lines += [f"| {what} | {measured} | {'yes' if reached else 'no'} |" for what, measured, reached in found]
    return lines + [""]


# ---- the full tables ------------------------------------------------------------------------

def group_order(group):
    dtype, direction, labels = group
    return (["fp32", "bf16"].index(dtype), ["fwdbwd", "fwd", "bwd"].index(direction), labels != "int")


def _extra(r) -> str:
    return _num(r["peak_extra_MiB"], ".1f") + (" (xla)" if r["memory_method"] == "xla-temp" else "")


def _speedup(name):
    return lambda r: _num(r.get(f"speedup_vs_{name}"), ".2f")


# (header, cell text, shown when): None = always; "sfu" = only with SFU data (a GPU); "allocator" = only
# where the rows were timed under pinned allocator regimes (CPU).
TABLE_COLUMNS = [
    ("N x C", lambda r: f"{r['N']} x {r['C']}", None),
    ("t1,t2", _temps, None),
    ("provider", lambda r: r["provider"], None),
    ("allocator", lambda r: r["allocator"] or "-", "allocator"),
    ("ms", _ms, None),
    ("spread", lambda r: _num(spread(r), ".2f"), None),
    ("x naive", _speedup(NAIVE), None),
    ("x orig-jax", _speedup(ORIGINAL), None),
    ("x compile", _speedup(COMPILED), None),
    ("GB/s", lambda r: _num(r["GBps"], ".1f"), None),
    ("% BW", lambda r: _num(r["pct_bandwidth"], ".1f"), None),
    ("SFU ops/el", lambda r: _num(r["sfu_ops_per_elem"], ".1f"), "sfu"),
    ("% SFU", lambda r: _num(r["pct_sfu_roof"], ".1f"), "sfu"),
    ("% roof", lambda r: _num(r["pct_roofline"], ".1f"), "sfu"),
    ("passes", lambda r: r["passes"] or "-", None),
    ("loss rel err", lambda r: _num(r["loss_rel_err"], ".1e"), None),
    ("max abs(sum p - 1)", lambda r: _num(r["sum_p_residual"], ".1e"), None),
    ("extra MiB", _extra, None),
]

COLUMN_MEANINGS = [  # (text, shown when: as in TABLE_COLUMNS)
    ("`allocator` (CPU): how the C library's malloc served the large buffers while the row was timed: "
     + "; ".join(f"`{a}`: {text}" for a, text in measure.ALLOCATORS.items()) + " (at t1 = t2 = 1 only, next to "
     "the cross-entropies). Compare rows of the same regime; the plots show `heap`.", "allocator"),
    ("`ms`: median time of one call (fwdbwd = loss and gradient; fwd = loss only; bwd = the backward alone); "
     f"`spread`: p80 / p20 of its repeats, with `{NOISY_MARK}` after `ms` when that is above {NOISY_SPREAD:g}x "
     "(see Spread above).", None),
    ("`x naive`, `x orig-jax`, `x compile`: how many times faster the row is than the naive PyTorch port, the "
     "original JAX implementation and torch.compile of the native math on the same cell (above 1 = faster; the "
     "CSV has one such column per provider).", None),
    ("`GB/s`: the bytes the operation must move (read logits and labels, write the per-row loss and, with the "
     "gradient, the gradient) divided by the time; `% BW`: that as a share of the measured copy bandwidth.", None),
    ("`SFU ops/el`, `% SFU`, `% roof` (GPU only): special-function operations per logit of the Triton kernel, "
     "their share of the SFU rate, and the share of the roofline max(bytes/bandwidth, SFU ops/SFU rate).", "sfu"),
    ("`passes`: passes over a row of the normalization solver (mean/worst for the converged solver).", None),
    ("`loss rel err`: the largest relative error of the per-row loss against a float64 converged reference "
     "on the same inputs; `max abs(sum p - 1)`: how far the probabilities the loss uses are from summing to 1.", None),
    ("`extra MiB`: memory a call needs beyond its inputs and outputs: on a GPU the CUDA allocator's peak; for "
     "JAX (xla) the temporary buffers of the compiled program; PyTorch on CPU: see the memory section.", None),
]


def shown_columns(ok: list[dict], gpu_columns: bool) -> set:
    """Which optional columns (TABLE_COLUMNS' last field) these rows fill."""
    return {None} | ({"sfu"} if gpu_columns else set()) | ({"allocator"} if any(r["allocator"] for r in ok) else set())


def results_tables(ok: list[dict], shown: set) -> list[str]:
    """One table per (dtype, direction, labels); every allocator regime of a cell, the reused heap first."""
    columns = [c for c in TABLE_COLUMNS if c[2] in shown]
    lines = []
    for dtype, direction, labels in sorted({(r["dtype"], r["direction"], r["labels"]) for r in ok}, key=group_order):
        lines += [f"### {dtype}, {direction}, {labels} labels", "",
                  "| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
        group = [r for r in ok if (r["dtype"], r["direction"], r["labels"]) == (dtype, direction, labels)]
        group.sort(key=lambda r: (r["C"], r["N"], r["t1"], r["t2"], r["allocator"] == "fresh",
                                  PROVIDERS.index(r["provider"])))
        lines += ["| " + " | ".join(c[1](r) for c in columns) + " |" for r in group] + [""]
    return lines


def memory_section(out: Path) -> list[str]:
    path = out / "memory.csv"
    if not path.exists():
        return ["Memory per temperature: `python -m perf --memory` (not run for this folder yet).", ""]
    from . import memory

    return ["## Memory", ""] + memory.markdown(memory.read(path))


def write_report(session, csv_path: Path, plots: bool = True) -> Path:
    all_rows = read_rows(csv_path)
    both = latest(all_rows)  # the tables show each allocator regime, labelled
    rows = primary(both)  # the comparisons and plots: one regime per cell
    out = csv_path.parent
    ok = [r for r in rows if _ok(r)]
    timed = [r for r in both if _ok(r)]
    noisy = sum(is_noisy(r) for r in timed)
    gpu_columns = any(r["sfu_ops_per_elem"] is not None and r["pct_sfu_roof"] is not None for r in ok)
    runs = sorted({(r["run_id"], r["git_sha"], r["mode"]) for r in rows})
    bandwidths = sorted({r["bandwidth_GBps"] for r in rows if r["bandwidth_GBps"]})
    lines = [f"# bitempered benchmarks: {session.name}", ""]
    lines += [
        f"- Device: **{session.name}** (results folder `{session.slug}`)",
        f"- Measured copy bandwidth (`dst.copy_(src)`, read + write bytes): **{session.bandwidth / 1e9:.1f} GB/s** "
        f"in the latest run" + (f" (runs in this table: {bandwidths[0]:.1f} to {bandwidths[-1]:.1f} GB/s; "
                                "each row uses its own run's value)" if len(bandwidths) > 1 else ""),
        "- Runs in this table (run id, git SHA, mode): " + "; ".join(f"{a} {b} {c}" for a, b, c in runs),
        f"- Built from `{csv_path.name}` ({len(all_rows)} rows; the latest row of each provider x cell x direction).",
        "- What is timed: what a training step runs. JAX: `jax.jit(jax.value_and_grad(loss))` with the "
        "temperatures as traced arguments (`bitempered-jax-xla-const` closes over them as constants instead); "
        "PyTorch: `loss.sum()` and its gradient with temperatures as Python floats (`-tensor-t`: 0-d tensors; "
        "`-eager`: the CPU C kernel switched off, i.e. the eager torch ops it replaces at t1 = t2 = 1 with dense labels). "
        "torch.compile rows are compiled for the cell's static shape and warmed up on every input set first; "
        "recompiling while timing would be an error, so they show the compiled steady state.",
        "- Timer: CUDA torch providers `triton.testing.do_bench` (median of CUDA events, L2 flushed per call); "
        "JAX and CPU: `time.perf_counter` median after warm-up (JAX `block_until_ready`); 2 to 4 input sets "
        "used in turn, so caches do not hold the next call's inputs. On CPU the providers of one framework "
        "take turns in short slices, so a slow moment of the machine slows them alike: compare PyTorch rows "
        "with PyTorch rows and JAX rows with JAX rows. On CPU the C library's allocator is pinned to reuse its heap "
        "(at t1 = t2 = 1 also to fresh pages; the `allocator` column says which), so a run's allocation history "
        "does not decide the times.",
        f"- {spread_legend(f'`{NOISY_MARK}`')}. "
        + (f"**{noisy} of {len(timed)} rows are marked `{NOISY_MARK}`.**" if noisy else "No row is marked."),
        f"- Logits ~ N(0, {session.args.scale:g}^2); class-index labels uniform; dense labels: random rows summing to 1.",
    ]
    if gpu_columns:
        lines.append(f"- SFU roof: {session.sfu_note}; SFU model (kernels/README.md): "
                     f"{session.args.sfu_ops_per_pass:g} ops per solver pass x mean converged passes + the loss "
                     "and gradient epilogue.")
    lines.append("")
    lines += cross_entropy_section(both) + original_section(rows) + memory_section(out) + gpu_section(rows, gpu_columns)
    shown = shown_columns(timed, gpu_columns)
    lines += ["## All results", "", "Columns:", ""] + [f"- {text}" for text, when in COLUMN_MEANINGS if when in shown]
    lines += [""] + results_tables(timed, shown)
    other = [r for r in rows if not _ok(r)]
    if other:
        lines += ["## Skipped, failed, not applicable", "", "| provider | status | cells |", "|---|---|---|"]
        counts: dict = {}
        for r in other:
            counts[(r["provider"], r["status"])] = counts.get((r["provider"], r["status"]), 0) + 1
        lines += [f"| {p} | {s} | {n} |" for (p, s), n in counts.items()] + [""]
    configs = sorted({(r["dtype"], r["C"], r["config"]) for r in rows if r["config"]})
    if configs:
        lines += ["## Triton launch configuration per shape", "", "| dtype | C | config |", "|---|---|---|"]
        lines += [f"| {d} | {c} | {cfg} |" for d, c, cfg in configs] + [""]
    if plots and ok:
        from . import plots as plotting

        names = plotting.plot_groups(ok, out)
        lines += ["## Plots", ""] + [f"![{n}]({n})" for n in names] + [""]
    md_path = out / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path
