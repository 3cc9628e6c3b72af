"""A 2-D picture in the spirit of the paper's synthetic illustration: decision boundaries of each loss on a small
two-class data set (a disk inside a ring), without noise and with three kinds of label noise:

- small-margin: labels flipped near the true boundary (the losses' t2 > 1 heavy tail helps here);
- large-margin: labels flipped far from the boundary, i.e. confident-looking outliers (the bounded
  t1 < 1 loss gives them a bounded, eventually vanishing, pull);
- random: labels flipped uniformly.

Each panel trains the same small MLP with the same recipe, initial weights and batches; only the
loss differs between rows. The dashed circle is the true boundary; crosses mark flipped labels.
"""

from __future__ import annotations

import numpy as np

from bitempered.demo.experiment import trainer
from bitempered.demo.mlp import Recipe

RADIUS = 1.0                       # the true boundary: class 1 outside this circle
RECIPE = Recipe(hidden=32, epochs=120, batch_size=50, lr=1e-2)
NOISES = ("none", "small-margin", "large-margin", "random")


def make_rings(n: int, rng: np.random.Generator):
    """n points: class 0 uniform in a disk of radius 0.9, class 1 in a ring 1.1..2.1."""
    half = n // 2
    r = np.concatenate([0.9 * np.sqrt(rng.uniform(0, 1, half)),
                        np.sqrt(rng.uniform(1.1 ** 2, 2.1 ** 2, n - half))])
    angle = rng.uniform(0, 2 * np.pi, n)
    x = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1).astype(np.float32)
    y = np.concatenate([np.zeros(half), np.ones(n - half)]).astype(np.int64)
    return x, y


def flip_labels(x, y, kind: str, rate: float, rng: np.random.Generator):
    """Flips round(rate * n) labels; returns (noisy labels, flipped mask)."""
    n = len(y)
    count = round(rate * n)
    margin = np.abs(np.linalg.norm(x, axis=1) - RADIUS)
    if kind == "none":
        chosen = np.array([], dtype=np.int64)
    elif kind == "random":
        chosen = rng.choice(n, count, replace=False)
    elif kind in ("small-margin", "large-margin"):
        # In each class: half of its 2 * count / 2 points nearest to (or farthest from) the boundary.
        chosen = []
        for c in (0, 1):
            members = np.flatnonzero(y == c)
            order = members[np.argsort(margin[members] if kind == "small-margin" else -margin[members])]
            chosen.append(rng.choice(order[:count], count // 2, replace=False))
        chosen = np.concatenate(chosen)
    else:
        raise ValueError(kind)
    flipped = np.zeros(n, dtype=bool)
    flipped[chosen] = True
    return np.where(flipped, 1 - y, y), flipped


def plot_boundaries(framework: str, losses, path, device=None, seed: int = 0, n: int = 400,
                    rate: float = 0.2, recipe: Recipe = RECIPE, grid: int = 150, progress=None):
    """Trains len(losses) x len(NOISES) small MLPs and saves the panel grid to ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.patches import Circle

    rng = np.random.default_rng([seed, 4])
    x, y = make_rings(n, rng)
    noisy = [flip_labels(x, y, kind, rate, rng) for kind in NOISES]
    lim = 2.5
    axis = np.linspace(-lim, lim, grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)

    train = trainer(framework)
    m = len(NOISES)
    fig = Figure(figsize=(2.9 * m, 2.9 * len(losses)))
    axes = fig.subplots(len(losses), m, squeeze=False)
    for row, loss in enumerate(losses):
        if progress is not None:
            progress.set_postfix_str(f"2-D, {loss.label}")
        # One ensemble per loss: model j trains on noise setting j (same seed, so same init).
        predict = train(np.stack([x] * m), np.stack([labels for labels, _ in noisy]), loss, recipe,
                        [seed] * m, 2, device=device,
                        on_epoch=None if progress is None else progress.update)
        regions = predict(np.stack([mesh] * m)).reshape(m, grid, grid)
        accuracy = (predict(np.stack([x] * m)) == y).mean(axis=1)   # against the TRUE labels
        for col, kind in enumerate(NOISES):
            ax = axes[row][col]
            labels, flipped = noisy[col]
            ax.contourf(axis, axis, regions[col], levels=[-0.5, 0.5, 1.5], colors=["#cfe3f7", "#f9d9c2"])
            ax.contour(axis, axis, regions[col], levels=[0.5], colors="k", linewidths=1.2)
            ax.add_patch(Circle((0, 0), RADIUS, fill=False, ls="--", lw=0.8, color="0.4"))
            colors = np.where(labels == 0, "#1f77b4", "#d62728")
            ax.scatter(*x[~flipped].T, c=colors[~flipped], s=6, lw=0)
            ax.scatter(*x[flipped].T, c=colors[flipped], s=22, marker="x", lw=1.0)
            ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_aspect("equal")
            ax.text(0.02, 0.02, f"train points, true labels: acc {accuracy[col]:.2f}", transform=ax.transAxes,
                    fontsize=7, bbox=dict(fc="white", alpha=0.7, lw=0))
            if row == 0:
                ax.set_title("no noise" if kind == "none" else f"{kind} noise ({round(100 * rate)}%)",
                             fontsize=10)
            if col == 0:
                ax.set_ylabel(loss.label, fontsize=10)
    fig.suptitle("Decision boundaries on noisy 2-D data (crosses: flipped labels, dashed: true boundary)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
