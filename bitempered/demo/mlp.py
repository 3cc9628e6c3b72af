"""The model and training recipe shared by both frameworks.

A one-hidden-layer ReLU MLP, trained with Adam on minibatches. Everything random is drawn here,
with NumPy, so the PyTorch and JAX trainers start from the same weights and see the same batches:
the frameworks differ only by floating-point rounding.

The trainers train an *ensemble* of M independent models at once (one per noise setting and
seed): weights carry a leading model axis and each model sums its own minibatch mean. Adam is
elementwise, so this is exactly M separate trainings, just with fewer, larger kernel calls.
Every loss gets the same recipe (epochs, learning rate, batch size, initial weights, batches);
nothing is tuned per loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Recipe:
    hidden: int = 64
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-2
    # Adam's usual constants.
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass(frozen=True)
class LossSpec:
    """A loss: cross-entropy is the bi-tempered loss at t1 = t2 = 1."""

    t1: float
    t2: float

    @property
    def label(self) -> str:
        if self.t1 == 1 and self.t2 == 1:
            return "cross-entropy"
        return f"bi-tempered ({_number(self.t1)}, {_number(self.t2)})"

    @staticmethod
    def parse(text: str) -> "LossSpec":
        """"ce" -> (1, 1); "0.8,1.2" (or "0.8:1.2", "0.8/1.2") -> t1 = 0.8, t2 = 1.2."""
        text = text.strip().lower()
        if text in ("ce", "cross-entropy", "xent"):
            return LossSpec(1.0, 1.0)
        for sep in (",", ":", "/"):
            if sep in text:
                t1, t2 = text.split(sep)
                return LossSpec(float(t1), float(t2))
        raise ValueError(f"a loss is 'ce' or 't1,t2', got {text!r}")


def _number(x: float) -> str:
    return f"{x:.1f}" if round(x, 1) == x else f"{x:g}"


DEFAULT_LOSSES = (LossSpec(1.0, 1.0), LossSpec(0.8, 1.2), LossSpec(0.5, 2.0), LossSpec(0.2, 4.0))


@dataclass(frozen=True)
class TemperatureRecipe:
    """Learnable temperatures: one (t1, t2) pair per model, trained jointly with its weights by
    their own Adam (the recipe's betas and eps, learning rate ``lr``) on the same training loss,
    then clipped into ``t1_range`` x ``t2_range`` after every step. The box keeps the loss finite
    and the solver well conditioned: t1 < 2 is the loss's domain (1.95 leaves a margin), and t2 in
    [0.2, 4] spans the paper's settings without the very light or very heavy tails."""

    lr: float = 0.02
    t1_range: tuple[float, float] = (0.0, 1.95)
    t2_range: tuple[float, float] = (0.2, 4.0)


def init_params(seeds, n_in: int, n_hidden: int, n_out: int) -> dict:
    """Stacked initial weights [M, ...] (PyTorch's default uniform(+-1/sqrt(fan_in)) init)."""
    def layer(rng, fan_in, fan_out):
        bound = 1.0 / np.sqrt(fan_in)
        return (rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
                rng.uniform(-bound, bound, (fan_out,)).astype(np.float32))

    w1, b1, w2, b2 = [], [], [], []
    for seed in seeds:
        rng = np.random.default_rng([seed, 1])
        a, b = layer(rng, n_in, n_hidden)
        c, d = layer(rng, n_hidden, n_out)
        w1.append(a), b1.append(b), w2.append(c), b2.append(d)
    return {"w1": np.stack(w1), "b1": np.stack(b1), "w2": np.stack(w2), "b2": np.stack(b2)}


def batch_order(seeds, n: int, epochs: int, batch_size: int):
    """Yields, per epoch, minibatch indices [n // batch_size, M, batch_size] (int64).

    Each model reshuffles its own training set every epoch; the last partial batch is dropped
    (a different one each epoch), so every step has the same shape.
    """
    rngs = [np.random.default_rng([seed, 2]) for seed in seeds]
    steps = max(n // batch_size, 1)
    size = min(batch_size, n)
    for _ in range(epochs):
        perm = np.stack([rng.permutation(n)[:steps * size] for rng in rngs])  # [M, steps * size]
        yield perm.reshape(len(rngs), steps, size).transpose(1, 0, 2)
