"""The data: scikit-learn's bundled handwritten digits, a per-seed split, and synthetic label noise.

Noise is applied to the TRAINING labels only; every accuracy in the demo is measured on clean test
labels. Two kinds of noise:

- symmetric ``sym`` at rate r: exactly round(r * n) training examples, chosen at random, get a label
  drawn uniformly from the OTHER nine classes (so at r = 0.6 the true class still has 40% of an
  image's labels, and each wrong class about 6.7%: learnable, but easy to memorise wrongly);
- class flip ``flip`` at rate r: in every class exactly round(r * n_c) examples are relabelled as
  one fixed, look-alike class (``FLIP_TO``, e.g. 7 -> 1, 3 -> 8). This noise is structured and
  hurts more than symmetric noise at the same rate, since one wrong class gets all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_CLASSES = 10
# The class each digit is flipped to under class-flip noise: pairs that look alike in 8x8 pixels.
FLIP_TO = {0: 6, 1: 7, 2: 7, 3: 8, 4: 9, 5: 6, 6: 5, 7: 1, 8: 3, 9: 4}


@dataclass(frozen=True)
class Noise:
    """One noise setting: ``kind`` is "sym" or "flip", ``rate`` in [0, 1)."""

    kind: str
    rate: float

    @property
    def label(self) -> str:
        if self.rate == 0:
            return "clean"
        name = "symmetric" if self.kind == "sym" else "class-flip"
        return f"{name} {round(100 * self.rate)}%"

    @staticmethod
    def parse(text: str) -> "Noise":
        """"0.4" -> symmetric 40%; "flip:0.4" (or "flip0.4") -> class-flip 40%."""
        text = text.strip().lower()
        kind = "sym"
        for prefix in ("flip", "sym"):
            if text.startswith(prefix):
                kind, text = prefix, text[len(prefix):].lstrip(":=")
        rate = float(text)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"noise rate must be in [0, 1), got {rate}")
        if kind == "flip" and rate >= 0.5:
            raise ValueError(f"class-flip noise rate must be < 0.5 (else the flip wins), got {rate}")
        return Noise(kind, rate)


def load_digits_split(seed: int, test_fraction: float = 0.3):
    """Stratified train/test split of the 1797 8x8 digits, pixels scaled to [0, 1].

    Returns float32 ``x_train, x_test`` ([n, 64]) and int64 ``y_train, y_test``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype(np.int64), test_size=test_fraction, stratify=y, random_state=seed)
    return x_train, x_test, y_train, y_test


def add_noise(labels: np.ndarray, noise: Noise, rng: np.random.Generator,
              num_classes: int = NUM_CLASSES) -> np.ndarray:
    """A noisy copy of ``labels`` (the input is not modified)."""
    noisy = labels.copy()
    if noise.rate == 0:
        return noisy
    if noise.kind == "sym":
        chosen = rng.choice(len(labels), size=round(noise.rate * len(labels)), replace=False)
        shift = rng.integers(1, num_classes, size=len(chosen))  # never the true class
        noisy[chosen] = (labels[chosen] + shift) % num_classes
    elif noise.kind == "flip":
        for c in range(num_classes):
            members = np.flatnonzero(labels == c)
            chosen = rng.choice(members, size=round(noise.rate * len(members)), replace=False)
            noisy[chosen] = FLIP_TO[c]
    else:
        raise ValueError(f"unknown noise kind {noise.kind!r}")
    return noisy
