"""The experiment loop: every (noise setting, seed) model, trained once per loss, scored on clean
test labels at the final epoch (never the best epoch on test)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitempered.demo.data import NUM_CLASSES, Noise, add_noise, load_digits_split
from bitempered.demo.mlp import LossSpec, Recipe


@dataclass
class Results:
    noises: list[Noise]
    losses: list[LossSpec]
    seeds: list[int]
    accuracy: np.ndarray  # [len(losses), len(noises), len(seeds)], clean test accuracy


def trainer(framework: str):
    """The ``train`` function of a framework (imported only when asked for)."""
    if framework == "torch":
        from bitempered.demo.train_torch import train
    elif framework == "jax":
        from bitempered.demo.train_jax import train
    else:
        raise ValueError(f"framework must be 'torch' or 'jax', got {framework!r}")
    return train


def build_data(noises, seeds):
    """Stacked data for the ensemble: model (i, j) = noise i, seed j. The seed fixes the
    train/test split, the noise draw, the initial weights and the batch order, so at one seed every
    loss and every noise setting starts from the same weights on the same split."""
    x_train, y_train, x_test, y_test = [], [], [], []
    for noise in noises:
        for seed in seeds:
            xtr, xte, ytr, yte = load_digits_split(seed)
            x_train.append(xtr)
            y_train.append(add_noise(ytr, noise, np.random.default_rng([seed, 3])))
            x_test.append(xte)
            y_test.append(yte)
    return tuple(np.stack(a) for a in (x_train, y_train, x_test, y_test))


def run(framework: str, noises, seeds, losses, recipe: Recipe, device=None, progress=None) -> Results:
    """Trains len(losses) ensembles of len(noises) * len(seeds) models. ``progress`` (a tqdm bar
    or None) advances once per epoch of each loss."""
    train = trainer(framework)
    x_train, y_train, x_test, y_test = build_data(noises, seeds)
    model_seeds = [seed for _ in noises for seed in seeds]
    accuracy = np.empty((len(losses), len(noises), len(seeds)))
    for k, loss in enumerate(losses):
        if progress is not None:
            progress.set_postfix_str(loss.label)
        predict = train(x_train, y_train, loss, recipe, model_seeds, NUM_CLASSES, device=device,
                        on_epoch=None if progress is None else progress.update)
        correct = predict(x_test) == y_test                       # [M, n_test], clean labels
        accuracy[k] = correct.mean(axis=1).reshape(len(noises), len(seeds))
    return Results(list(noises), list(losses), list(seeds), accuracy)
