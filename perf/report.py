"""CSV rows, speedups, the markdown report (with the issue's targets) and the plots.

The CSV is append-only (one row per provider x cell x direction, with device, timestamp and git
SHA); the markdown and the plots are rebuilt from ALL of its rows, keeping the latest row of each
(provider, cell, direction), so a GPU grid can be measured in several pieces.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from .providers import all_providers

PROVIDERS = [p.name for p in all_providers()]
OURS_TORCH, OURS_JAX = "bitempered-triton", "bitempered-jax-xla"
NAIVE, ORIGINAL, COMPILED, LIGER = "naive-port", "original-jax", "torch-compile-native", "liger-ce"
JAX_RATIO_BAR = 1.25
JAX_ACCEPTANCE = [(4096, 1000, 0.8, 1.2), (4096, 1000, 0.5, 0.8)]

COLUMNS = [
    "timestamp", "run_id", "git_sha", "device", "device_slug", "mode", "provider", "framework",
    "direction", "dtype", "labels", "N", "C", "t1", "t2", "status", "time_ms", "time_ms_p20",
    "time_ms_p80", "reps", "timer", "n_input_sets", "bytes_model", "GBps", "bandwidth_GBps",
    "pct_bandwidth", "sfu_ops_per_elem", "sfu_rate_Tops", "pct_sfu_roof", "roofline_ms",
    "pct_roofline", "peak_extra_MiB", "memory_method", "solver", "passes", "acc_rows",
    "loss_rel_err", "sum_p_residual", "config", "notes",
] + [f"speedup_vs_{name}" for name in PROVIDERS]
NUMERIC = {"N", "C", "t1", "t2", "time_ms", "time_ms_p20", "time_ms_p80", "reps", "n_input_sets",
           "bytes_model", "GBps", "bandwidth_GBps", "pct_bandwidth", "sfu_ops_per_elem",
           "sfu_rate_Tops", "pct_sfu_roof", "roofline_ms", "pct_roofline", "peak_extra_MiB",
           "acc_rows", "loss_rel_err", "sum_p_residual"} | {f"speedup_vs_{n}" for n in PROVIDERS}
KEY = ("provider", "direction", "dtype", "labels", "N", "C", "t1", "t2")


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------

def _cell_key(row):
    return (row["dtype"], row["labels"], row["N"], row["C"], row["t1"], row["t2"], row["direction"])


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


def jax_acceptance(rows: list[dict]) -> list[dict]:
    """bitempered JAX (converged) vs the original JAX (5 iterations), fp32 fwd+bwd, int labels."""
    out = []
    for row in rows:
        if (row["provider"] == OURS_JAX and row["status"] == "ok" and row["dtype"] == "fp32"
                and row["direction"] == "fwdbwd" and row["labels"] == "int"
                and row.get(f"speedup_vs_{ORIGINAL}")):
            original = next((r for r in rows if r["provider"] == ORIGINAL and r["status"] == "ok"
                             and _cell_key(r) == _cell_key(row)), None)
            ratio = 1.0 / row[f"speedup_vs_{ORIGINAL}"]
            out.append(dict(N=row["N"], C=row["C"], temps=_temps(row), ours=row["time_ms"],
                            original=original["time_ms"] if original else None, ratio=ratio,
                            met=ratio <= JAX_RATIO_BAR, ours_err=row["loss_rel_err"],
                            original_err=original["loss_rel_err"] if original else None,
                            required=(row["N"], row["C"], row["t1"], row["t2"]) in JAX_ACCEPTANCE))
    return out


def acceptance_summary(csv_path: Path, slug: str) -> str:
    found = jax_acceptance(latest(read_rows(csv_path)))
    lines = ["", "=" * 78, f"JAX ACCEPTANCE ({slug}): bitempered JAX XLA (converged) / original JAX "
             f"(5 iterations), fp32 fwd+bwd; must be <= {JAX_RATIO_BAR}"]
    for item in found:
        flag = "  <- required cell" if item["required"] else ""
        lines.append(f"  N={item['N']:6d} C={item['C']:7d} t={item['temps']:8s} ratio {item['ratio']:.3f}x "
                     f"({'MET' if item['met'] else 'NOT MET'}; ours {item['ours']:.2f} ms, original "
                     f"{_num(item['original'], '.2f')} ms; loss err ours {_num(item['ours_err'], '.1e')} vs "
                     f"original {_num(item['original_err'], '.1e')}){flag}")
    if not found:
        lines.append("  not measured in these results")
    lines.append("=" * 78)
    return "\n".join(lines)


def _ratio_target(rows, other, bar, accuracy=False):
    """(measured text, met) of 'ours >= bar x other' over the bf16 fwd+bwd cells."""
    vals = []
    for r in rows:
        if (r["provider"] == OURS_TORCH and r["status"] == "ok" and r["dtype"] == "bf16"
                and r["direction"] == "fwdbwd" and r.get(f"speedup_vs_{other}") is not None):
            ok = r[f"speedup_vs_{other}"] >= bar
            if accuracy:
                peer = next((p for p in rows if p["provider"] == other and _cell_key(p) == _cell_key(r)), None)
                ok = ok and peer is not None and r["loss_rel_err"] <= peer["loss_rel_err"]
            vals.append((r[f"speedup_vs_{other}"], ok, r))
    if not vals:
        return "not measurable here (needs bitempered-triton and " + other + ": CUDA)", None
    worst = min(vals, key=lambda v: v[0])
    met = sum(ok for _, ok, _ in vals)
    r = worst[2]
    return (f"min {worst[0]:.2f}x (N={r['N']} C={r['C']} t={_temps(r)}); {met}/{len(vals)} cells meet it", met == len(vals))


def targets(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    out = []
    roof = [r for r in rows if r["provider"] == OURS_TORCH and r["status"] == "ok" and r["dtype"] == "bf16"
            and r["direction"] == "fwdbwd"]
    if roof:
        worst = min(roof, key=lambda r: r["pct_roofline"])
        met = sum(r["pct_roofline"] >= 80 for r in roof)
        out.append(("bf16 fwd+bwd >= 80% of roofline max(bytes/BW, SFU ops/SFU rate)",
                    f"min {worst['pct_roofline']:.1f}% (N={worst['N']} C={worst['C']} t={_temps(worst)}); "
                    f"{met}/{len(roof)} cells", met == len(roof)))
    else:
        out.append(("bf16 fwd+bwd >= 80% of roofline", "not measurable here (needs bitempered-triton: CUDA)", None))
    out.append(("bf16 fwd+bwd >= 20x the naive port", *_ratio_target(rows, NAIVE, 20)))
    out.append(("bf16 fwd+bwd >= 3x torch.compile of the native math", *_ratio_target(rows, COMPILED, 3)))
    out.append(("bf16 fwd+bwd >= 5x the original JAX at equal or better accuracy",
                *_ratio_target(rows, ORIGINAL, 5, accuracy=True)))
    ce = [r for r in rows if r["provider"] == OURS_TORCH and r["status"] == "ok" and r["t1"] == 1 and r["t2"] == 1
          and r.get(f"speedup_vs_{LIGER}") is not None]
    if ce:
        worst = min(ce, key=lambda r: r[f"speedup_vs_{LIGER}"])
        met = sum(r[f"speedup_vs_{LIGER}"] >= 1.0 for r in ce)
        out.append(("t1 = t2 = 1: no slower than Liger's cross-entropy",
                    f"min {worst[f'speedup_vs_{LIGER}']:.2f}x ({worst['dtype']} {worst['direction']} N={worst['N']} "
                    f"C={worst['C']}); {met}/{len(ce)}", met == len(ce)))
    else:
        out.append(("t1 = t2 = 1: no slower than Liger's cross-entropy",
                    "not measurable here (needs bitempered-triton and liger-kernel: CUDA)", None))
    mem = [r for r in rows if r["provider"] == OURS_TORCH and r["status"] == "ok" and r["direction"] == "fwdbwd"
           and r["peak_extra_MiB"] is not None]
    if mem:
        limit = lambda r: 1.0 + 16 * r["N"] / 2**20  # noqa: E731 - per-row fp32 scalars + 1 MiB slack
        worst = max(mem, key=lambda r: r["peak_extra_MiB"] - limit(r))
        met = sum(r["peak_extra_MiB"] <= limit(r) for r in mem)
        out.append(("peak extra memory: nothing beyond the gradient buffer (<= 1 MiB + 16 B/row)",
                    f"worst {worst['peak_extra_MiB']:.1f} MiB extra (N={worst['N']} C={worst['C']} {worst['dtype']}); "
                    f"{met}/{len(mem)} cells", met == len(mem)))
    else:
        out.append(("peak extra memory: nothing beyond the gradient buffer",
                    "not measurable here (CUDA allocator statistics)", None))
    return out


def group_order(group):
    dtype, direction, labels = group
    return (["fp32", "bf16"].index(dtype), ["fwdbwd", "fwd", "bwd"].index(direction), labels != "int")


TABLE_HEAD = ("| N x C | t1,t2 | provider | ms | x naive | x orig-jax | x compile | GB/s | % BW | "
              "SFU ops/el | % SFU | % roof | passes | loss rel err | max abs(sum p - 1) | extra MiB |")


def _table_row(r) -> str:
    sp = lambda name: _num(r.get(f"speedup_vs_{name}"), ".2f")  # noqa: E731
    extra = _num(r["peak_extra_MiB"], ".1f") + (" (xla)" if r["memory_method"] == "xla-temp" else "")
    return (f"| {r['N']} x {r['C']} | {_temps(r)} | {r['provider']} | {_num(r['time_ms'], '.3f')} | {sp(NAIVE)} | "
            f"{sp(ORIGINAL)} | {sp(COMPILED)} | {_num(r['GBps'], '.1f')} | {_num(r['pct_bandwidth'], '.1f')} | "
            f"{_num(r['sfu_ops_per_elem'], '.1f')} | {_num(r['pct_sfu_roof'], '.1f', 'n/a')} | "
            f"{_num(r['pct_roofline'], '.1f')} | {r['passes'] or '-'} | {_num(r['loss_rel_err'], '.1e')} | "
            f"{_num(r['sum_p_residual'], '.1e')} | {extra} |")


def write_report(session, csv_path: Path, plots: bool = True) -> Path:
    all_rows = read_rows(csv_path)
    rows = latest(all_rows)
    out = csv_path.parent
    ok = [r for r in rows if r["status"] == "ok"]
    runs = sorted({(r["run_id"], r["git_sha"], r["mode"]) for r in rows})
    bandwidths = sorted({r["bandwidth_GBps"] for r in rows if r["bandwidth_GBps"]})
    lines = [f"# bitempered benchmarks: {session.name}", ""]
    lines += [
        f"- Device: **{session.name}** (results folder `{session.slug}`)",
        f"- Measured copy bandwidth (`dst.copy_(src)`, read + write bytes): **{session.bandwidth / 1e9:.1f} GB/s** "
        f"in the latest run" + (f" (runs in this table: {bandwidths[0]:.1f} to {bandwidths[-1]:.1f} GB/s; "
                                "each row uses its own run's value)" if len(bandwidths) > 1 else ""),
        f"- SFU roof: {session.sfu_note}",
        "- Runs in this table (run id, git SHA, mode): " + "; ".join(f"{a} {b} {c}" for a, b, c in runs),
        f"- Built from `{csv_path.name}` ({len(all_rows)} rows; the latest row of each provider x cell x direction).",
        "- Timer: CUDA torch providers `triton.testing.do_bench` (median of CUDA events, L2 flushed per call); "
        "JAX and CPU: `time.perf_counter` median after warm-up (JAX `block_until_ready`); rotating input sets.",
        "- Bytes model: fwd = read logits + read labels (int64 indices, or dense N x C) + write fp32 per-row loss; "
        "fwdbwd = fwd + write grad; bwd = read one saved N x C + write grad. % BW = model bytes / time / bandwidth.",
        f"- SFU model (bitempered kernel, kernels/README.md): {session.args.sfu_ops_per_pass:g} ops per solver pass "
        "x mean converged passes + epilogue (loss 2, gradient 1; chunked path re-sweeps; dense labels +3). "
        "% roof = max(bytes/BW, SFU ops/SFU rate) / time, the same roofline for every provider of a cell.",
        "- Accuracy: max over rows of abs(loss - truth)/abs(truth) against the float64 converged truth on the "
        "first `acc_rows` rows of the same inputs (denominator floored at 1e-3 x the mean abs(truth), for rows "
        "whose loss is ~0); max abs(sum p - 1) of the probabilities the loss uses.",
        "- Speedup columns: time(other) / time(row) on the same cell; the CSV has one column per provider.",
        "- Peak extra memory: CUDA torch = max_memory_allocated during one call minus what was live before and "
        "the returned gradient; JAX = XLA's temp buffer size of the compiled program (xla); CPU torch: n/a.",
        f"- Logits ~ N(0, {session.args.scale:g}^2); int labels uniform; dense labels: random rows summing to 1.",
        "",
        "## Acceptance: bitempered JAX (XLA, converged) vs original JAX (5 iterations)",
        "",
        f"fp32 fwd+bwd (`jax.jit(jax.grad(lambda a: loss(a, y, t1, t2).sum()))`), int labels; target ratio <= {JAX_RATIO_BAR}.",
        "",
        "| N x C | t1,t2 | ours ms | original ms | ratio | met | ours loss err | original loss err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for item in jax_acceptance(rows):
        star = " (required)" if item["required"] else ""
        lines.append(f"| {item['N']} x {item['C']}{star} | {item['temps']} | {item['ours']:.3f} | "
                     f"{_num(item['original'], '.3f')} | **{item['ratio']:.3f}** | {'yes' if item['met'] else 'NO'} | "
                     f"{_num(item['ours_err'], '.1e')} | {_num(item['original_err'], '.1e')} |")
    lines += ["", "## Issue targets (GPU; bitempered-triton)", "", "| target | measured | met |", "|---|---|---|"]
    for name, measured, met in targets(rows):
        lines.append(f"| {name} | {measured} | {'n/a' if met is None else 'yes' if met else 'NO'} |")
    groups = sorted({(r["dtype"], r["direction"], r["labels"]) for r in ok}, key=group_order)
    lines += ["", "## Results", ""]
    for dtype, direction, labels in groups:
        lines += [f"### {dtype}, {direction}, {labels} labels", "", TABLE_HEAD, "|" + "---|" * 16]
        group = [r for r in ok if (r["dtype"], r["direction"], r["labels"]) == (dtype, direction, labels)]
        group.sort(key=lambda r: (r["C"], r["N"], r["t1"], r["t2"], PROVIDERS.index(r["provider"])))
        lines += [_table_row(r) for r in group] + [""]
    other = [r for r in rows if r["status"] != "ok"]
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

