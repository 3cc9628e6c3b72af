"""Accuracy vs noise: clean-test accuracy (mean +- std over seeds) per loss. Symmetric noise is a
line over the noise rate; class-flip noise, if any, gets its own panel."""

from __future__ import annotations

import numpy as np

from bitempered.demo.experiment import Results
from bitempered.demo.report import summary


def plot_accuracy(results: Results, path, title: str = "") -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    mean, std, _ = summary(results)                                 # [noises, losses]
    # The clean setting (rate 0) belongs to both panels: it is the starting point of each.
    sym = [i for i, n in enumerate(results.noises) if n.kind == "sym" or n.rate == 0]
    flip = [i for i, n in enumerate(results.noises) if n.kind == "flip" and n.rate > 0]
    panels = [("symmetric noise", sym)] if len(sym) > 1 or not flip else []
    if flip:
        panels.append(("class-flip noise", [i for i in sym if results.noises[i].rate == 0] + flip))
    ratios = [max(len(rows), 2) for _, rows in panels]
    fig = Figure(figsize=(2.2 * sum(ratios) + 1.5, 4.8))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True,
                        gridspec_kw={"width_ratios": ratios})
    markers = "osD^v<>ph"
    for ax, (name, rows) in zip(axes[0], panels):
        rows = sorted(rows, key=lambda i: results.noises[i].rate)
        rates = np.array([results.noises[i].rate for i in rows]) * 100
        # Small sideways offsets keep the error bars of different losses apart.
        spread = 0.45 * max(np.ptp(rates), 20) / 20
        dodge = spread * (np.arange(len(results.losses)) - (len(results.losses) - 1) / 2)
        for k, loss in enumerate(results.losses):
            ax.errorbar(rates + dodge[k], mean[rows, k], yerr=std[rows, k], marker=markers[k % len(markers)],
                        capsize=3, label=loss.label)
        ax.set_xlabel(f"{name}: % of training labels corrupted")
        ax.set_xticks(rates)
        ax.grid(alpha=0.3)
        ax.set_title(name)
    axes[0][0].set_ylabel(f"clean test accuracy (mean ± std, {len(results.seeds)} seeds)")
    axes[0][-1].legend(loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
