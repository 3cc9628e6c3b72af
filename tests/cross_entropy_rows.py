"""The t1 = t2 = 1 test rows shared by the torch and JAX cross-entropy tests: ordinary rows next
to every case where a cross-entropy shortcut is not SPEC's value and must fall back."""

import numpy as np

C = 9
TARGETS = np.array([1, 2, 0, 5, 3, 1, 1, 1, 1, 1, 1, 1])


def logits() -> np.ndarray:
    """[12, C] float64. Rows 0-3 ordinary (large offsets included); 4 NaN; 5 +inf at the target;
    6 +inf elsewhere; 7 -inf at the target; 8 target 120 below the max (p = 0 in float32;
    exp(a - a_target) overflows); 9 a class 200 below the max (p = 0 in float32, not the target);
    10 a -inf logit off the target; 11 target 101 below the max (p a subnormal float32)."""
    a = np.random.default_rng(0).standard_normal((12, C)) * 3.0
    a[1] += 1000.0  # the loss is shift invariant: no cancellation against a large offset
    a[2] -= 300.0
    a[3] *= 10.0
    a[4, 2] = np.nan
    a[5, 1] = np.inf
    a[6, 4] = np.inf
    a[7, 1] = -np.inf
    a[8, 1] = a[8].max() - 120.0
    a[9, 3] = a[9].max() - 200.0
    a[10, 6] = -np.inf
    a[11, 1] = a[11].max() - 101.0
    return a
