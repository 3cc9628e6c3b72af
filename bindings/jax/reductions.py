"""The reductions of a JAX loss's rows, written once for the plain loss (``ops``) and the fused
linear head (``linear``): which rows count, the reduction ("none"; "sum"; "mean" over the counted
rows, as ``torch.nn.functional.cross_entropy``) and its factor on each row's gradient.
"""

from __future__ import annotations

import jax.numpy as jnp


def kept_rows(labels, ignore_index: int):
    """The rows a loss counts [...]: every row of dense labels [..., C], the class indices [...]
    other than ``ignore_index``."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return labels != ignore_index
    return jnp.ones(labels.shape[:-1], bool)


def reduce(loss_rows, kept, reduction: str):
    """Per-row losses reduced over every axis: "none" keeps them, "sum", "mean" over the kept rows
    (NaN when none is kept)."""
    if reduction == "none":
        return loss_rows
    total = jnp.sum(loss_rows)
    return total if reduction == "sum" else total / jnp.sum(kept).astype(total.dtype)


def row_weights(kept, reduction: str, dtype):
    """Each row's factor on its gradient for "sum" (1) and "mean" (1 / #kept rows, 0 when none is
    kept): the upstream value of a loss that computes its gradient in the forward pass."""
    if reduction == "sum":
        return jnp.ones(kept.shape, dtype)
    count = jnp.sum(kept).astype(dtype)
    return jnp.full(kept.shape, jnp.where(count > 0, 1.0 / jnp.maximum(count, 1), 0.0), dtype)
