"""How a tensor with a class axis maps onto the row kernels' (outer, inner, class) addressing.

The row kernels (``kernels/tempered_math.row_block``) read row r = (o, i) of a tensor at
``o * stride_outer + i * stride_inner`` and its classes every ``stride_class`` elements. The rows
are the tensor's elements with the class axis removed, in row-major order. Any layout whose other
axes merge into at most two (outer, inner) is read in place, without a copy:

- rows [N, C], any row stride: inner = the row (outer unused);
- F.cross_entropy's (N, C, d1, ..., dk), contiguous: outer n, inner the flattened d1...dk (stride 1),
  class stride d1 x ... x dk;
- channels_last (N, C, H, W): every non-class axis merges into one with stride C, class stride 1
  (the [N H W, C] rows case);
- a batch slice or a cropped image, as long as the spatial axes still merge.

Tensors read together (logits, dense labels, the gradient) must split the rows the same way, so
axes merge only where they merge in every one of them. Framework-free: shapes and strides in
elements (torch's ``Tensor.stride()``; row-major strides for JAX arrays).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class RowLayout:
    n_outer: int
    n_inner: int
    strides: tuple[tuple[int, int, int], ...]  # (outer, inner, class) of each tensor, in call order

    @property
    def n_rows(self) -> int:
        return self.n_outer * self.n_inner


def row_layout(shape, axis: int, *strides) -> RowLayout | None:
    """The shared (outer, inner, class) addressing of tensors of ``shape`` with classes on ``axis``
    and the given per-tensor ``strides``; None where the rows do not merge into two axes in all of
    them (the caller then copies)."""
    ndim = len(shape)
    axis %= ndim
    merged: list[tuple[int, tuple[int, ...]]] = []  # (size, stride in each tensor), outermost first
    for dim in range(ndim):
        if dim == axis or shape[dim] == 1:  # a size-1 axis holds no step: its stride is irrelevant
            continue
        size, step = shape[dim], tuple(s[dim] for s in strides)
        if merged and all(outer == size * inner for outer, inner in zip(merged[-1][1], step)):
            merged[-1] = (merged[-1][0] * size, step)
        else:
            merged.append((size, step))
    if len(merged) > 2:
        return None
    unused = (0,) * len(strides)
    while len(merged) < 2:
        merged.insert(0, (1, unused))
    (n_outer, outer), (n_inner, inner) = merged
    classes = tuple(s[axis] for s in strides)
    return RowLayout(n_outer, n_inner, tuple(zip(outer, inner, classes)))


def row_major_strides(shape) -> tuple[int, ...]:
    """Strides in elements of a row-major (C-order) array, e.g. a JAX array."""
    return tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))


def rows_shape(shape, axis: int) -> tuple[int, ...]:
    axis %= len(shape)
    return tuple(shape[:axis]) + tuple(shape[axis + 1:])
