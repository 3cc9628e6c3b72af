"""DTensor logits sharded on the class dimension (``Shard(-1)``, like ``loss_parallel()``; or
``Shard(dim)`` for the class axis ``dim``): the plain ``bi_tempered_logistic_loss`` and
``tempered_softmax`` send them here, and this runs the vocab-parallel functions
(``vocab_parallel.py``) on the mesh dimension's process group.
"""

from __future__ import annotations

import sys

from bitempered.bindings.common import validation as check
from bitempered.bindings.torch.vocab_parallel import (
    vocab_parallel_bi_tempered_logistic_loss, vocab_parallel_tempered_softmax,
)


def is_dtensor(x) -> bool:
    """True for a DTensor (checked without importing torch.distributed.tensor when it is unused)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _class_group(logits, dim):
    """The process group of the mesh dimension that shards the class dimension ``dim`` of ``logits``."""
    from torch.distributed.tensor import Replicate, Shard

    classes = check.check_class_axis(dim, logits.dim(), "dim") % logits.dim()
    sharded = [i for i, p in enumerate(logits.placements) if isinstance(p, Shard) and p.dim % logits.dim() == classes]
    others_replicated = all(isinstance(p, Replicate) for i, p in enumerate(logits.placements) if i not in sharded)
    if len(sharded) != 1 or not others_replicated:
        which = "(last) dimension" if classes == logits.dim() - 1 else f"dimension dim={classes}"
        raise ValueError(f"a DTensor of logits must be sharded on the class {which} over one mesh "
                         f"dimension (Shard({dim})) and replicated over the others, got "
                         f"{logits.placements}")
    return logits.device_mesh.get_group(sharded[0])


def _local(value):
    """A replicated DTensor argument (a temperature, a weight) as the full tensor every rank holds
    (differentiable: a temperature that requires grad gets its gradient back as a DTensor); anything
    else as it is."""
    return value.full_tensor() if is_dtensor(value) else value


def dtensor_loss(logits, labels, t1, t2, label_smoothing=0.0, num_iters=None, reduction="mean",
                 ignore_index=-100, backend="auto", inplace_backward=False, *, weight=None, sample_weight=None, dim=-1):
    """``bi_tempered_logistic_loss`` of a DTensor sharded on the classes (the class axis ``dim``).

    Labels: class indices (a tensor or a replicated DTensor), or dense labels of the full shape (a
    tensor, or a DTensor placed like the logits). ``weight`` and ``sample_weight``: tensors (or
    replicated DTensors) of the full C / row shape. ``t1``, ``t2``: floats or 0-d tensors (or
    replicated DTensors); one that requires grad gets the vocab-parallel loss's gradient (the whole
    one on every rank). Returns a replicated DTensor.
    """
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    if inplace_backward:
        raise ValueError("inplace_backward=True is not supported for DTensor logits")
    group = _class_group(logits, dim)
    if labels.dtype.is_floating_point:
        if not is_dtensor(labels):
            labels = distribute_tensor(labels, logits.device_mesh, logits.placements)
        labels = labels.redistribute(logits.device_mesh, logits.placements).to_local()
    elif is_dtensor(labels):
        labels = labels.full_tensor()
    weight, sample_weight, t1, t2 = (_local(value) for value in (weight, sample_weight, t1, t2))
    loss = vocab_parallel_bi_tempered_logistic_loss(
        logits.to_local(), labels, t1, t2, group=group, label_smoothing=label_smoothing, num_iters=num_iters,
        reduction=reduction, ignore_index=ignore_index, backend=backend, weight=weight, sample_weight=sample_weight,
        dim=dim)
    return DTensor.from_local(loss, logits.device_mesh, [Replicate()] * logits.device_mesh.ndim, run_check=False)


def dtensor_softmax(logits, t, num_iters=None, backend="auto", *, dim=-1):
    """``tempered_softmax`` of a DTensor sharded on the classes (the class axis ``dim``); the result
    is placed like it. ``t``: a float or a 0-d tensor (or a replicated DTensor), learnable."""
    from torch.distributed.tensor import DTensor

    group = _class_group(logits, dim)
    probs = vocab_parallel_tempered_softmax(logits.to_local(), _local(t), group=group, num_iters=num_iters,
                                            backend=backend, dim=dim)
    return DTensor.from_local(probs, logits.device_mesh, logits.placements, run_check=False, shape=logits.shape,
                              stride=logits.stride())
