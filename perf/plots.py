"""Matplotlib (Agg) figures: per (dtype, direction, labels) group, one column per temperature pair
and three rows: time vs C, achieved GB/s vs C with the measured bandwidth line, % of roofline vs C."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import PROVIDERS, group_order  # noqa: E402

LEGEND_INCHES = 2.6
MARKERS = "os^Dv<>ph*XP8"


def plot_groups(rows: list[dict], out: Path) -> list[str]:
    names = []
    groups = sorted({(r["dtype"], r["direction"], r["labels"]) for r in rows}, key=group_order)
    for dtype, direction, labels in groups:
        group = [r for r in rows if (r["dtype"], r["direction"], r["labels"]) == (dtype, direction, labels)]
        temps = sorted({(r["t1"], r["t2"]) for r in group}, key=lambda t: (t != (1.0, 1.0), t))
        c_range = (min(r["C"] for r in group) / 1.5, max(r["C"] for r in group) * 1.5)  # shared x axis
        width = 4.2 * len(temps) + LEGEND_INCHES
        fig, axes = plt.subplots(3, len(temps), figsize=(width, 10), squeeze=False)
        for col, (t1, t2) in enumerate(temps):
            cell_rows = [r for r in group if (r["t1"], r["t2"]) == (t1, t2)]
            for provider in [p for p in PROVIDERS if any(r["provider"] == p for r in cell_rows)]:
                pts = sorted((r["C"], r["time_ms"], r["GBps"], r["pct_roofline"], r["N"])
                             for r in cell_rows if r["provider"] == provider)
                cs = [p[0] for p in pts]
                index = PROVIDERS.index(provider)  # a fixed color per provider across every panel
                style = dict(marker=MARKERS[index % len(MARKERS)], color=plt.get_cmap("tab20")(index % 20),
                             label=provider,
                             linewidth=2.2 if provider.startswith("bitempered") else 1.2)
                axes[0][col].plot(cs, [p[1] for p in pts], **style)
                axes[1][col].plot(cs, [p[2] for p in pts], **style)
                axes[2][col].plot(cs, [p[3] for p in pts], **style)
            bandwidth = max(r["bandwidth_GBps"] for r in cell_rows)
            axes[1][col].axhline(bandwidth, color="black", linestyle="--", linewidth=1,
                                 label=f"measured copy BW {bandwidth:.0f} GB/s")
            axes[2][col].axhline(100, color="black", linestyle="--", linewidth=1)
            shapes = sorted({(r["C"], r["N"]) for r in cell_rows})
            axes[0][col].set_title(f"t1={t1:g}, t2={t2:g}\n" + ", ".join(f"{n}x{c}" for c, n in shapes), fontsize=9)
            for row, ylabel in enumerate(["median time (ms)", "achieved GB/s (byte model)", "% of roofline"]):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_xlim(*c_range)
                ax.set_yscale("log")
                ax.grid(True, which="both", alpha=0.3)
                if col == 0:
                    ax.set_ylabel(ylabel)
                if row == 2:
                    ax.set_xlabel("C (classes)")
        handles, labels_ = [], []
        for ax in (axes[0][0], axes[1][0]):
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels_:
                    handles.append(h)
                    labels_.append(lab)
        fig.legend(handles, labels_, loc="center right", fontsize=8)
        fig.suptitle(f"{dtype}, {direction}, {labels} labels")
        fig.tight_layout(rect=(0, 0, 1 - LEGEND_INCHES / width, 0.97))
        name = f"plot_{dtype}_{direction}_{labels}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
    return names
