"""The reductions of a JAX loss's rows, written once for the plain loss (``ops``), the fused linear
head (``linear``) and the vocab-parallel loss: which rows count, each row's weight (per-class
``weight[target]`` times ``sample_weight``), the reduction ("none"; "sum"; "mean" over the counted
rows, as ``torch.nn.functional.cross_entropy``) and its factor on each row's gradient.

A row's weight multiplies its loss outside the differentiable cores, so the cores' backward gets it
with the upstream gradient (one value per row: no N x C buffer), and a weight differentiated
explicitly gets its exact gradient (the row's unweighted loss, through the reduction).
"""

from __future__ import annotations

import jax.numpy as jnp

from bitempered.bindings.common.validation import without_axis


def kept_rows(labels, ignore_index: int | None, axis: int = -1):
    """The rows a loss counts (the rows' shape): every row of dense labels (classes on ``axis``),
    the class indices other than ``ignore_index`` (every one for None)."""
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        return jnp.ones(without_axis(labels.shape, axis), bool)
    if ignore_index is None:
        return jnp.ones(labels.shape, bool)
    return labels != ignore_index


def row_factors(labels, kept, class_weight, sample_weight, dtype):
    """Each row's weight [...] in ``dtype``: ``class_weight[target]`` (class indices) times
    ``sample_weight``, 0 on the rows not kept; None when both are None (each kept row counts 1)."""
    if class_weight is None and sample_weight is None:
        return None
    factors = jnp.ones(kept.shape, dtype)
    if class_weight is not None:
        # an ignored or out-of-range index reads a clipped entry: its row is masked below, or NaN
        factors = class_weight.astype(dtype)[jnp.clip(labels, 0, class_weight.shape[0] - 1)]
    if sample_weight is not None:
        factors = factors * sample_weight.astype(dtype)
    return jnp.where(kept, factors, 0.0)


def reduce(loss_rows, kept, reduction: str, factors=None):
    """Per-row losses (times ``factors``, each row's weight, when given) reduced over every axis:
    "none" keeps them, "sum", "mean" over the kept rows: sum / #kept, or with ``factors``
    sum(factor loss) / sum(factor), F.cross_entropy's weighted mean (NaN when nothing counts)."""
    if factors is not None:
        loss_rows = loss_rows * factors
    if reduction == "none":
        return loss_rows
    total = jnp.sum(loss_rows)
    if reduction == "sum":
        return total
    count = jnp.sum(kept) if factors is None else jnp.sum(factors)
    return total / count.astype(total.dtype)


def mean_factor(kept, dtype, factors=None):
    """1 / what "mean" divides by in :func:`reduce` (the kept rows' count, or the sum of
    ``factors``), 0 when that is 0."""
    count = (jnp.sum(kept) if factors is None else jnp.sum(factors)).astype(dtype)
    return jnp.where(count > 0, 1.0 / jnp.where(count > 0, count, 1.0), 0.0)


def row_weights(kept, reduction: str, dtype, factors=None):
    """Each row's factor on its gradient for "sum" (its weight: 1, or ``factors``) and "mean" (its
    weight x :func:`mean_factor`): the upstream value of a loss that computes its gradient in the
    forward pass."""
    weights = jnp.ones(kept.shape, dtype) if factors is None else factors.astype(dtype)
    return weights if reduction == "sum" else weights * mean_factor(kept, dtype, factors)
