"""The results table: mean +- std over seeds per noise setting (rows) and loss (columns), the best
mean of each row marked. Written to the terminal, as Markdown and as CSV."""

from __future__ import annotations

import csv

import numpy as np

from bitempered.demo.experiment import Results

CSV_COLUMNS = ("noise", "noise_kind", "noise_rate", "loss", "t1", "t2", "mean_accuracy",
               "std_accuracy", "num_seeds", "per_seed_accuracy", "best_in_row")


def summary(results: Results):
    """(mean, std, best) arrays of shape [noises, losses]. std is the sample std (ddof=1; 0 for a
    single seed). A row's best is every loss whose mean, rounded to 3 digits, equals the max."""
    acc = results.accuracy.transpose(1, 0, 2)                      # [noises, losses, seeds]
    mean = acc.mean(axis=2)
    std = acc.std(axis=2, ddof=1) if acc.shape[2] > 1 else np.zeros_like(mean)
    rounded = np.round(mean, 3)
    best = rounded == rounded.max(axis=1, keepdims=True)
    return mean, std, best


def _cells(results: Results, mark):
    mean, std, best = summary(results)
    return [[mark(f"{m:.3f} ± {s:.3f}", b) for m, s, b in zip(mr, sr, br)]
            for mr, sr, br in zip(mean, std, best)]


def text_table(results: Results) -> str:
    """A fixed-width table for the terminal; '*' marks the best mean of each row."""
    header = ["noise (train labels)"] + [loss.label for loss in results.losses]
    rows = [[noise.label] + cells for noise, cells in
            zip(results.noises, _cells(results, lambda s, b: s + (" *" if b else "  ")))]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


def markdown_table(results: Results) -> str:
    """The same table in Markdown; the best mean of each row is bold."""
    header = ["noise (train labels)"] + [loss.label for loss in results.losses]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for noise, cells in zip(results.noises, _cells(results, lambda s, b: f"**{s}**" if b else s)):
        lines.append("| " + " | ".join([noise.label] + cells) + " |")
    return "\n".join(lines)


def write_csv(results: Results, path) -> None:
    """One row per (noise setting, loss)."""
    mean, std, best = summary(results)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for i, noise in enumerate(results.noises):
            for k, loss in enumerate(results.losses):
                per_seed = ";".join(f"{a:.4f}" for a in results.accuracy[k, i])
                writer.writerow([noise.label, noise.kind, noise.rate, loss.label, loss.t1, loss.t2,
                                 f"{mean[i, k]:.4f}", f"{std[i, k]:.4f}", len(results.seeds),
                                 per_seed, int(best[i, k])])


def write_markdown(results: Results, path, footer: str = "") -> None:
    """The Markdown table with a one-paragraph header and an optional footer line."""
    with open(path, "w") as f:
        f.write("# Noisy-label demo: clean test accuracy (digits)\n\n")
        f.write(f"Final-epoch accuracy on the clean test labels, mean ± std (sample std) over "
                f"{len(results.seeds)} seed(s); the best mean of each row is bold. Noise is applied "
                f"to the training labels only.\n\n")
        f.write(markdown_table(results) + "\n")
        if footer:
            f.write("\n" + footer + "\n")
