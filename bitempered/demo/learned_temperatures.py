"""``--learn-temperatures`` (issue 22): the temperatures as parameters, learned with the model.

Every (noise setting, seed) model gets its own (t1, t2), starting at (1, 1) (cross-entropy), trained
jointly with its weights by gradient descent on the same TRAINING loss (its own Adam and learning
rate) and clipped into a box after every step (``TemperatureRecipe``: t1 in [0, 1.95], t2 in
[0.2, 4]). The loss receives them as per-row temperatures: each model's pair [M, 1] expanded to
its batch's rows [M, b]; the library's exact temperature gradients flow back through the
converged normalization.

What the objective does: the temperatures minimise the training loss VALUE, which depends on
them directly, not only through the fit; the loss is a different function at every (t1, t2). For
one-hot labels and any fixed prediction the loss only grows with t1 (dL/dt1 >= 0, checked
numerically over random logits and temperatures: the bounded t1 < 1 losses are smaller), so t1
falls from its first step on, towards the box's lower edge, whatever that does to accuracy (and,
t1 being below 1 from then on, the loss stays finite even where t2 < 1 gives a class probability
exactly 0). t2 moves the predictions themselves; below 1
the tempered softmax has finite support and a confidently fitted example's loss can be exactly 0,
which favours a small t2 on training labels the model can fit. Nothing here looks at held-out
data: the run reports where the temperatures end and the clean-test accuracy that results, next
to the fixed-temperature losses, and says so.

Outputs: a table (terminal, ``learned_temperatures.md``) and ``learned_temperatures.csv`` with the
final values and, per epoch, the trajectory of (t1, t2) (mean and std over seeds).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np

from bitempered.demo.data import NUM_CLASSES, Noise
from bitempered.demo.experiment import Results, build_data, trainer
from bitempered.demo.mlp import LossSpec, Recipe, TemperatureRecipe

START = LossSpec(1.0, 1.0)   # cross-entropy: the temperatures start where the usual loss is
LEARNED_LABEL = "learned (t1, t2)"
CSV_COLUMNS = ("noise", "noise_kind", "noise_rate", "loss", "epoch", "t1_mean", "t1_std", "t2_mean",
               "t2_std", "accuracy_mean", "accuracy_std", "num_seeds", "per_seed_t1", "per_seed_t2",
               "per_seed_accuracy")


@dataclass
class LearnedResults:
    noises: list[Noise]
    seeds: list[int]
    learn: TemperatureRecipe
    trajectory: np.ndarray   # [epochs + 1, noises, seeds, 2]: (t1, t2) at the start and after each epoch
    accuracy: np.ndarray     # [noises, seeds], clean test accuracy of the learned-temperature models
    fixed: Results | None    # the fixed-temperature losses on the same models, if they were run

    @property
    def final(self) -> np.ndarray:
        """[noises, seeds, 2]: the temperatures after the last epoch."""
        return self.trajectory[-1]


def run(framework: str, noises, seeds, recipe: Recipe, learn: TemperatureRecipe, device=None,
        progress=None, fixed: Results | None = None) -> LearnedResults:
    """Trains one ensemble of len(noises) * len(seeds) models, each with its own learned (t1, t2),
    on the same data, initial weights and batches as ``experiment.run`` (whose results, if given as
    ``fixed``, are carried along for the table). ``progress`` advances once per epoch."""
    train = trainer(framework)
    x_train, y_train, x_test, y_test = build_data(noises, seeds)
    model_seeds = [seed for _ in noises for seed in seeds]
    trajectory = []
    if progress is not None:
        progress.set_postfix_str(LEARNED_LABEL)
    predict = train(x_train, y_train, START, recipe, model_seeds, NUM_CLASSES, device=device,
                    on_epoch=None if progress is None else progress.update,
                    learn_temperatures=learn, on_temperatures=trajectory.append)
    accuracy = (predict(x_test) == y_test).mean(axis=1).reshape(len(noises), len(seeds))
    trajectory = np.stack(trajectory).reshape(-1, len(noises), len(seeds), 2)
    return LearnedResults(list(noises), list(seeds), learn, trajectory, accuracy, fixed)


def _mean_std(values: np.ndarray, axis: int = -1):
    """Mean and sample std (ddof=1; 0 for a single seed) over ``axis``."""
    std = values.std(axis=axis, ddof=1) if values.shape[axis] > 1 else np.zeros_like(values.mean(axis=axis))
    return values.mean(axis=axis), std


def _accuracy_columns(results: LearnedResults):
    """(labels, accuracy [noises, columns, seeds]): the learned models first, then each fixed loss."""
    labels = [LEARNED_LABEL]
    accuracy = [results.accuracy]
    if results.fixed is not None:
        labels += [loss.label for loss in results.fixed.losses]
        accuracy += list(results.fixed.accuracy)
    return labels, np.stack(accuracy, axis=1)


def _rows(results: LearnedResults, mark):
    """Header and one row of cells per noise setting; ``mark(text, is_best)`` decorates accuracies
    (the best mean of a row, rounded to 3 digits, as in the main table)."""
    labels, accuracy = _accuracy_columns(results)
    t_mean, t_std = _mean_std(results.final, axis=1)                # [noises, 2]
    a_mean, a_std = _mean_std(accuracy)                             # [noises, columns]
    rounded = np.round(a_mean, 3)
    best = rounded == rounded.max(axis=1, keepdims=True)
    header = ["noise (train labels)", "final t1", "final t2"] + labels
    rows = []
    for i, noise in enumerate(results.noises):
        temperatures = [f"{t_mean[i, k]:.3f} ± {t_std[i, k]:.3f}" for k in (0, 1)]
        accuracies = [mark(f"{m:.3f} ± {s:.3f}", b) for m, s, b in zip(a_mean[i], a_std[i], best[i])]
        rows.append([noise.label] + temperatures + accuracies)
    return header, rows


def text_table(results: LearnedResults) -> str:
    """A fixed-width table for the terminal; '*' marks the best mean accuracy of each row."""
    header, rows = _rows(results, lambda s, b: s + (" *" if b else "  "))
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def markdown_table(results: LearnedResults) -> str:
    """The same table in Markdown; the best mean accuracy of each row is bold."""
    header, rows = _rows(results, lambda s, b: f"**{s}**" if b else s)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _edge_counts(results: LearnedResults) -> str:
    """How many models ended on the box's edges, e.g. "t1 = 0: 12 of 15 models"."""
    final, learn = results.final.reshape(-1, 2), results.learn
    models = len(final)
    parts = []
    for k, name, (low, high) in ((0, "t1", learn.t1_range), (1, "t2", learn.t2_range)):
        for edge in (low, high):
            count = int(np.isclose(final[:, k], edge, atol=1e-6).sum())
            if count:
                parts.append(f"{name} = {edge:g}: {count} of {models} models")
    return "; ".join(parts) if parts else f"none of the {models} models"


def explanation(results: LearnedResults) -> str:
    """The honest reading of the table: what was minimised, and where the temperatures went."""
    t_mean = results.final.reshape(-1, 2).mean(axis=0)
    learn = results.learn
    return (
        f"Each model started at (t1, t2) = ({START.t1:g}, {START.t2:g}) and learned its own pair by "
        f"Adam (lr {learn.lr:g}) on the TRAINING loss, clipped after every step to t1 in "
        f"[{learn.t1_range[0]:g}, {learn.t1_range[1]:g}], t2 in [{learn.t2_range[0]:g}, "
        f"{learn.t2_range[1]:g}]. Over all models they ended at t1 = {t_mean[0]:.3f}, "
        f"t2 = {t_mean[1]:.3f} on average; on the box's edges: {_edge_counts(results)}.\n"
        "What is minimised is the training loss VALUE, and that value depends on (t1, t2) directly, "
        "not only through the fit. For one-hot labels and any fixed prediction the loss only grows "
        "with t1, so t1 drifts down towards the box's lower edge whatever that does to accuracy. t2 "
        "moves the predictions themselves; below 1 the tempered softmax has finite support and a "
        "confidently fitted example's loss can be exactly 0, which favours a small t2 on training "
        "labels the model can fit. Nothing here selects the temperatures for accuracy (no held-out "
        "data is used): read the accuracy column as the outcome of minimising the loss value, not "
        "as tuned temperatures." + _versus_best_fixed(results))


def _versus_best_fixed(results: LearnedResults) -> str:
    """" Learned minus the best fixed loss, ...: clean -0.004, ..." (empty without fixed losses)."""
    if results.fixed is None or not results.fixed.losses:
        return ""
    _, accuracy = _accuracy_columns(results)
    mean = accuracy.mean(axis=2)                                     # [noises, columns]
    gaps = mean[:, 0] - mean[:, 1:].max(axis=1)
    return (" Learned minus the best fixed loss of the row, mean clean-test accuracy: " +
            ", ".join(f"{noise.label} {gap:+.3f}" for noise, gap in zip(results.noises, gaps)) + ".")


def trajectory_summary(results: LearnedResults) -> str:
    """A few epochs of the mean (t1, t2) per noise setting, for the terminal."""
    epochs = len(results.trajectory) - 1
    shown = sorted({0, 1, epochs // 4, epochs // 2, (3 * epochs) // 4, epochs} & set(range(epochs + 1)))
    mean = results.trajectory.mean(axis=2)                           # [epochs + 1, noises, 2]
    width = max(len(n.label) for n in results.noises)
    lines = [f"{'mean (t1, t2) after epoch':<{width}}  " + "  ".join(f"{e:>12d}" for e in shown)]
    for i, noise in enumerate(results.noises):
        cells = [f"({mean[e, i, 0]:.2f}, {mean[e, i, 1]:.2f})" for e in shown]
        lines.append(f"{noise.label:<{width}}  " + "  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def _joined(values) -> str:
    return ";".join(f"{v:.4f}" for v in values)


def write_csv(results: LearnedResults, path) -> None:
    """Per noise setting: one ``learned (t1, t2)`` row per epoch (epoch 0 = the start; the accuracy
    columns are filled at the last epoch only), then one row per fixed loss (at the last epoch)."""
    labels, accuracy = _accuracy_columns(results)
    epochs = len(results.trajectory) - 1
    seeds = len(results.seeds)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for i, noise in enumerate(results.noises):
            for epoch in range(epochs + 1):
                t = results.trajectory[epoch, i]                      # [seeds, 2]
                (t1_mean, t2_mean), (t1_std, t2_std) = _mean_std(t, axis=0)
                acc = [""] * 3
                if epoch == epochs:
                    a_mean, a_std = _mean_std(accuracy[i, 0])
                    acc = [f"{a_mean:.4f}", f"{a_std:.4f}", _joined(accuracy[i, 0])]
                writer.writerow([noise.label, noise.kind, noise.rate, LEARNED_LABEL, epoch,
                                 f"{t1_mean:.4f}", f"{t1_std:.4f}", f"{t2_mean:.4f}", f"{t2_std:.4f}",
                                 acc[0], acc[1], seeds, _joined(t[:, 0]), _joined(t[:, 1]), acc[2]])
            for k, loss in enumerate(results.fixed.losses if results.fixed is not None else [], start=1):
                a_mean, a_std = _mean_std(accuracy[i, k])
                writer.writerow([noise.label, noise.kind, noise.rate, loss.label, epochs,
                                 f"{loss.t1:.4f}", "0.0000", f"{loss.t2:.4f}", "0.0000", f"{a_mean:.4f}",
                                 f"{a_std:.4f}", seeds, _joined([loss.t1] * seeds),
                                 _joined([loss.t2] * seeds), _joined(accuracy[i, k])])


def write_markdown(results: LearnedResults, path, footer: str = "") -> None:
    """The table, the explanation and the trajectory, with an optional footer line."""
    with open(path, "w") as f:
        f.write("# Learned temperatures: where (t1, t2) end, and the clean test accuracy (digits)\n\n")
        f.write(f"Final-epoch values, mean ± std (sample std) over {len(results.seeds)} seed(s): the "
                f"learned t1 and t2, then the clean test accuracy of the learned-temperature models "
                f"and of each fixed loss (the best mean of each row bold). Noise is applied to the "
                f"training labels only.\n\n")
        f.write(markdown_table(results) + "\n\n")
        f.write(explanation(results).replace("\n", "\n\n") + "\n\n")
        f.write("Trajectory (mean over seeds; every epoch is in learned_temperatures.csv):\n\n```\n"
                + trajectory_summary(results) + "\n```\n")
        if footer:
            f.write("\n" + footer + "\n")
