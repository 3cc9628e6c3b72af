"""The float64 converged truth of a cell, the solver's pass count, and error metrics.

Truth: bitempered's native math in float64 (``bindings/torch/native/math``: the safeguarded Newton solver
run to its float64 stop rule, residual ~1e-14) on the SAME logits (bf16 values upcast exactly)
and labels. Per-row losses are independent, so the truth and every provider's accuracy are taken
on the first ``acc_rows`` rows of input set 0 (a cap on N x C keeps float64 affordable).

Passes: ``torch_native.solve_converged`` in float32 (the compute dtype of every fast path) on those
rows, i.e. the pass counts the converged kernels run.
"""

from __future__ import annotations

import numpy as np
import torch

from .providers import Inputs


def truth_and_passes(inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    from bitempered.bindings.torch.native import math as native

    cell, rows = inputs.cell, inputs.acc_rows
    x = inputs.logits[0][:rows]
    y = inputs.labels[0][:rows]
    with torch.no_grad():
        a64 = x.double()
        t1 = torch.tensor(cell.t1, dtype=torch.float64, device=x.device)
        t2 = torch.tensor(cell.t2, dtype=torch.float64, device=x.device)
        log_p = native.tempered_log_softmax_rows(a64, t2, None)
        if y.dtype.is_floating_point:
            dense = y.double()
        else:
            dense = native.dense_labels_from_indices(y, cell.c, torch.float64, -100)[0]
        truth, _ = native.loss_and_grad_rows(log_p, dense, t1, t2, False)
        del log_p, dense, a64
        _, passes = native.solve_converged(native.shift_by_max(x.float()), t2.float())
    return truth.cpu().numpy(), passes.reshape(-1).cpu().numpy()


RELATIVE_FLOOR = 1e-3  # of the mean |truth|: the smallest denominator of the relative error


def max_relative_error(values: np.ndarray, truth: np.ndarray) -> float:
    """max_i |value_i - truth_i| / max(|truth_i|, RELATIVE_FLOOR * mean |truth|).

    The floor matters only for rows whose loss is almost exactly 0 (a label class that takes all
    the probability, e.g. t2 < 1 with every other class outside the support: truth ~1e-11), where
    float32 rounding of an O(1) sum would otherwise read as a relative error of 1e6.
    0 where both are the same infinity; inf for NaN.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1)
    if values.shape != truth.shape:
        raise ValueError(f"accuracy: {values.shape} losses for {truth.shape} truth rows")
    finite = np.abs(truth[np.isfinite(truth)])
    floor = max(RELATIVE_FLOOR * float(finite.mean()) if finite.size else 0.0, np.finfo(np.float64).tiny)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        err = np.abs(values - truth) / np.maximum(np.abs(truth), floor)
    err = np.where(values == truth, 0.0, err)  # covers inf == inf
    err = np.where(np.isnan(err), np.inf, err)
    return float(err.max()) if err.size else float("nan")
