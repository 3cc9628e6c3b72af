"""Vocab-parallel loss on torch.distributed: gloo ranks on 127.0.0.1 (spawned, bounded in time).

Each rank holds an uneven slice of the classes (C = 11 split 4 + 7 and 2 + 5 + 4); the loss and
each slice's gradient must equal the unsharded loss on the whole logits (float64: to rounding,
float32/bfloat16: the unsharded result of the same dtype to float32 rounding), for every
reduction, class-index and dense labels, ignore_index, smoothing (global C), t2 < 1 and t2 > 1,
num_iters=k, and rows with -inf, NaN and a far-off maximum. Then the collective count per call
(passes + 3 for rows within one block; 1 + per block (passes + 2) over several), bad input (a
clear ValueError on every rank, no hang; the plain loss's messages), a group of one rank (the
plain loss's driver), and a DTensor sharded on the class dimension through the plain
``bi_tempered_logistic_loss``.
"""

import itertools
import os

import pytest
import torch

from distributed import run_ranks

C = 11
SPLITS = {2: [4, 7], 3: [2, 5, 4]}
TEMPERATURES = [(0.8, 1.2), (0.5, 0.7), (1.0, 1.0), (0.2, 0.3), (1.5, 3.0)]
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),  # gradients rounded to bfloat16 (one ulp apart at most)
}
TIMEOUT_S = 240
# (dtype, smoothing, reduction) of the grid also run on the vocab-parallel Triton kernels
# (backend="triton", interpreted here): every temperature, num_iters, label kind; kept small
# because the interpreter is slow
# because the interpreter is slow. Gloo ranks hold CPU tensors, so without the interpreter (a GPU
# run) the kernels are checked by the single-rank test below instead.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_CASES = {(torch.float32, 0.1, "none"), (torch.float32, 0.0, "mean"), (torch.bfloat16, 0.1, "none")}
if not INTERPRETED:
    KERNEL_CASES = set()


def _logits(dtype, seed=0):
    """[2, 3, C]: ordinary rows, a wide row, a confident row (its max in the last slice), a row
    with -inf logits, and a NaN row."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 3, C, generator=g, dtype=torch.float64) * 2.0
    a[0, 2] *= 4.0
    a[1, 0, -1] += 40.0
    a[1, 1, [0, 5, 9]] = float("-inf")
    a[1, 2, 3] = float("nan")
    return a.to(dtype)


def _labels(kind, seed=1):
    if kind == "indices":
        return torch.tensor([[0, 4, 10], [3, -100, 7]])  # a target in every slice, an ignored row
    g = torch.Generator().manual_seed(seed)  # the same labels on every rank
    weights = -torch.log(torch.rand(2, 3, C, generator=g, dtype=torch.float64))
    return weights / weights.sum(dim=-1, keepdim=True)  # Dirichlet(1, ..., 1) rows


def _slice(rank, world_size):
    splits = SPLITS[world_size]
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


def _loss_and_grad(fn, logits, labels, upstream, **kwargs):
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits, labels, **kwargs)
    loss.backward(upstream if loss.dim() else None)
    return loss.detach(), logits.grad


def _matches_unsharded(rank, world_size):
    import bitempered.torch as bt
    from bitempered.bindings.torch.vocab_parallel import (vocab_parallel_bi_tempered_logistic_loss,
                                                          vocab_parallel_tempered_softmax)

    cols = _slice(rank, world_size)
    grid = list(itertools.product((torch.float64, torch.float32), TEMPERATURES, (0.0, 0.1), (None, 5),
                                  ("none", "sum", "mean"), ("indices", "dense")))
    grid += itertools.product((torch.bfloat16,), TEMPERATURES, (0.1,), (None,), ("none",), ("indices", "dense"))
    checked = 0
    for dtype, (t1, t2), smoothing, num_iters, reduction, kind in grid:
        logits, labels = _logits(dtype), _labels(kind)
        if kind == "dense":
            labels = labels.to(torch.float64 if dtype == torch.float64 else torch.float32)
        upstream = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).reshape(2, 3)
        kwargs = dict(t1=t1, t2=t2, label_smoothing=smoothing, num_iters=num_iters, reduction=reduction)
        upstream = upstream.to(torch.float64 if dtype == torch.float64 else torch.float32)
        want, want_grad = _loss_and_grad(bt.bi_tempered_logistic_loss, logits, labels, upstream, **kwargs)
        local_labels = labels if kind == "indices" else labels[..., cols]
        for backend in ("torch", "triton") if (dtype, smoothing, reduction) in KERNEL_CASES else ("torch",):
            got, got_grad = _loss_and_grad(vocab_parallel_bi_tempered_logistic_loss, logits[..., cols],
                                           local_labels, upstream, backend=backend, **kwargs)
            where = f"rank {rank}/{world_size}: {dtype} {kwargs} {kind} backend={backend}"
            assert got.dtype == want.dtype and got_grad.dtype == dtype, where
            message = lambda m: f"{where}\n{m}"  # noqa: E731
            torch.testing.assert_close(got, want, equal_nan=True, **TOLERANCES[dtype], msg=message)
            torch.testing.assert_close(got_grad, want_grad[..., cols], equal_nan=True, **TOLERANCES[dtype],
                                       msg=message)
            checked += 1
    assert checked == 2 * 5 * 2 * 2 * 3 * 2 + 5 * 2 + (5 * 2 * 2 * 2 + 5 * 2 if KERNEL_CASES else 0)
    for dtype, t, num_iters in itertools.product((torch.float64, torch.float32), (0.3, 1.0, 1.6), (None, 4)):
        logits = _logits(dtype)
        upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        want, want_grad = _loss_and_grad(lambda a, _: bt.tempered_softmax(a, t, num_iters), logits, None,
                                         upstream.to(dtype))
        got, got_grad = _loss_and_grad(lambda a, _: vocab_parallel_tempered_softmax(a, t, num_iters=num_iters),
                                       logits[..., cols], None, upstream[..., cols].to(dtype))
        where = f"rank {rank}/{world_size}: tempered_softmax {dtype} t={t} num_iters={num_iters}"
        message = lambda m: f"{where}\n{m}"  # noqa: E731
        torch.testing.assert_close(got, want[..., cols], equal_nan=True, **TOLERANCES[dtype], msg=message)
        torch.testing.assert_close(got_grad, want_grad[..., cols], equal_nan=True, **TOLERANCES[dtype], msg=message)


def _count_collectives(monkeypatch_target, fn):
    """(number of all-reduces, values they carried) during ``fn()``."""
    calls = []
    original = monkeypatch_target.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    monkeypatch_target.all_reduce = counting
    try:
        fn()
    finally:
        monkeypatch_target.all_reduce = original
    return len(calls), sum(calls)


def _collective_count(rank, world_size):
    import torch.distributed as dist

    from bitempered.bindings.torch.native import math as native
    from bitempered.bindings.torch.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss

    cols = _slice(rank, world_size)
    logits = _logits(torch.float64)[:, :2].reshape(4, C)  # finite rows
    labels = torch.tensor([1, 4, 8, 10])
    for t2 in (0.3, 0.7, 1.0, 1.2, 3.0):
        passes = int(native.solve_converged(native.shift_by_max(logits), t2)[1].max())
        local = logits[:, cols].clone().requires_grad_()

        def call(num_iters=None):
            vocab_parallel_bi_tempered_logistic_loss(local, labels, 0.8, t2, num_iters=num_iters).backward()

        count, values = _count_collectives(dist, call)
        assert count == passes + 3, (t2, count, passes)  # check, max, passes, loss/gradient sums
        # O(rows) values each: the P x 14 group check (an error code, 13 values), N maxima and NaN flags, N x 3
        # per pass (at most), N x 3 sums
        assert values <= world_size * 14 + 4 * (2 + 3 * passes + 3), values
        count, _ = _count_collectives(dist, lambda: call(num_iters=5))
        assert count == (4 if t2 == 1.0 else 5 + 4), (t2, count)


def _kernel_collective_count(rank, world_size):
    """The kernel path (interpreted): the same count, one partial-sums launch per solver pass."""
    import torch.distributed as dist

    from bitempered.bindings.torch.native import math as native
    from bitempered.bindings.torch import launchers as torch_triton
    from bitempered.bindings.torch.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss

    cols = _slice(rank, world_size)
    logits = _logits(torch.float32)[:, :2].reshape(4, C)  # finite rows
    labels = torch.tensor([1, 4, 8, 10])
    launches = []
    launch = torch_triton.vocab_parallel_sums
    torch_triton.vocab_parallel_sums = lambda *args: launches.append(args) or launch(*args)
    try:
        for t2 in (0.3, 1.2, 1.0):
            launches.clear()
            local = logits[:, cols].clone().requires_grad_()
            count, _ = _count_collectives(dist, lambda: vocab_parallel_bi_tempered_logistic_loss(
                local, labels, 0.8, t2, backend="triton").backward())
            if t2 == 1.0:  # the max launch also gives the pass's sums: check, max, that pass, loss sums
                assert (count, len(launches)) == (4, 0), (count, len(launches))
                continue
            passes = int(native.solve_converged(native.shift_by_max(logits), t2)[1].max())
            assert count == len(launches) + 3, (t2, count, len(launches))
            assert abs(len(launches) - passes) <= 1, (t2, len(launches), passes)  # fp32 sums, rounded differently
    finally:
        torch_triton.vocab_parallel_sums = launch


def _single_rank_kernels(rank, world_size):
    """A group of one rank on the kernel path equals the plain loss: on a GPU this runs the
    COMPILED vocab-parallel kernels (CUDA tensors), here the interpreter."""
    import bitempered.torch as bt
    from bitempered.bindings.torch.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not INTERPRETED:
        return
    tolerance = dict(rtol=1e-4, atol=1e-5) if device == "cuda" else TOLERANCES[torch.float32]  # ex2.approx
    for (t1, t2), num_iters, kind in itertools.product(TEMPERATURES, (None, 5), ("indices", "dense")):
        logits, labels = _logits(torch.float32).to(device), _labels(kind).to(device)
        labels = labels.float() if kind == "dense" else labels
        kwargs = dict(t1=t1, t2=t2, label_smoothing=0.1, num_iters=num_iters, reduction="sum")
        want, want_grad = _loss_and_grad(bt.bi_tempered_logistic_loss, logits, labels, None, backend="torch",
                                         **kwargs)
        got, got_grad = _loss_and_grad(vocab_parallel_bi_tempered_logistic_loss, logits, labels, None,
                                       backend="triton", **kwargs)
        message = lambda m: f"{device} {kwargs} {kind}\n{m}"  # noqa: E731
        torch.testing.assert_close(got, want, equal_nan=True, **tolerance, msg=message)
        torch.testing.assert_close(got_grad, want_grad, equal_nan=True, **tolerance, msg=message)


def _bad_input_group_of_one_and_dtensor(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import bitempered.torch as bt
    from bitempered.bindings.torch.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss as loss

    cols = _slice(rank, world_size)
    logits = _logits(torch.float32)[0]  # [3, C], finite
    labels = torch.tensor([0, 5, 10])
    with pytest.raises(ValueError, match=r"outside \[0, 11\)"):
        loss(logits[:, cols], torch.tensor([0, 11, 3]), 0.8, 1.2)  # 11 is past the GLOBAL C
    loss(logits[:, cols], torch.tensor([0, 7, 3]), 0.8, 1.2)  # in range globally, outside rank 0's slice
    with pytest.raises(ValueError, match="disagree"):  # rank 1 has one row less: every rank raises
        loss(logits[: 3 - rank, cols], labels[: 3 - rank], 0.8, 1.2)
    with pytest.raises(ValueError, match="disagree"):
        loss(logits[:, cols], labels, 0.8, 1.2 + rank)
    with pytest.raises(ValueError, match="t2"):
        loss(logits[:, cols], labels, 0.8, 0.0)
    # a group of one rank is the plain loss (and sends nothing)
    alone = [dist.new_group([r]) for r in range(world_size)][rank]
    torch.testing.assert_close(loss(logits, labels, 0.8, 0.7, group=alone, label_smoothing=0.1),
                               bt.bi_tempered_logistic_loss(logits, labels, 0.8, 0.7, label_smoothing=0.1))
    # DTensor sharded on the classes (torch's chunking: 6 + 5): the plain function takes this path
    mesh = init_device_mesh("cpu", (world_size,))
    full = _logits(torch.float64)[0]
    sharded = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_()
    got = bt.bi_tempered_logistic_loss(sharded, labels, 0.5, 0.7, label_smoothing=0.1)
    got.backward()
    want, want_grad = _loss_and_grad(bt.bi_tempered_logistic_loss, full, labels, None, t1=0.5, t2=0.7,
                                     label_smoothing=0.1)
    torch.testing.assert_close(got.full_tensor(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sharded.grad.full_tensor(), want_grad, rtol=1e-10, atol=1e-12)
    probs = bt.tempered_softmax(distribute_tensor(full, mesh, [Shard(-1)]), 0.7)
    torch.testing.assert_close(probs.full_tensor(), bt.tempered_softmax(full, 0.7), rtol=1e-12, atol=1e-12)


def _blocks_of_rows(rank, world_size):
    """Rows over several blocks of the native driver (a tiny block budget here): every rank blocks
    the same rows (rows per block from ceil(C / P)), each block reduces its own rows, and the result
    still equals the unsharded loss, with 1 + per block (passes + 2) collectives; at t1 = t2 = 1
    the general path runs one pass per block."""
    import torch.distributed as dist

    import bitempered.torch as bt
    from bitempered.bindings.torch.native import loss as native_loss
    from bitempered.bindings.torch.native import math as native
    from bitempered.bindings.torch.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss

    cols = _slice(rank, world_size)
    logits = _logits(torch.float64)[:, :2].reshape(4, C)  # finite rows
    budget = native_loss.GROUP_BLOCK_ELEMENTS
    native_loss.GROUP_BLOCK_ELEMENTS = 2 * -(-C // world_size)  # 2 rows per block: 2 blocks
    try:
        for (t1, t2), kind in itertools.product(((0.8, 1.2), (1.0, 1.0), (0.5, 0.7)), ("indices", "dense")):
            labels = torch.tensor([1, 4, 8, -100]) if kind == "indices" else _labels(kind).reshape(6, C)[:4]
            kwargs = dict(t1=t1, t2=t2, label_smoothing=0.1, reduction="mean")
            want, want_grad = _loss_and_grad(bt.bi_tempered_logistic_loss, logits, labels, None, **kwargs)
            local_labels = labels if kind == "indices" else labels[:, cols]
            results = []
            count, _ = _count_collectives(dist, lambda: results.append(_loss_and_grad(
                vocab_parallel_bi_tempered_logistic_loss, logits[:, cols], local_labels, None, **kwargs)))
            (got, got_grad), = results
            where = f"rank {rank}/{world_size}: t = {(t1, t2)} {kind}"
            torch.testing.assert_close(got, want, **TOLERANCES[torch.float64], msg=lambda m: f"{where}\n{m}")
            torch.testing.assert_close(got_grad, want_grad[:, cols], **TOLERANCES[torch.float64],
                                       msg=lambda m: f"{where}\n{m}")
            passes = [int(native.solve_converged(native.shift_by_max(logits[i:i + 2]), t2)[1].max()) for i in (0, 2)]
            assert count == 1 + sum(p + 2 for p in passes), (where, count, passes)
    finally:
        native_loss.GROUP_BLOCK_ELEMENTS = budget


def _one_driver_and_the_plain_loss_errors(rank, world_size):
    """A group of one rank runs the plain loss's native driver (the same bits); a bad argument
    gives the plain loss's error (one check, written once); the stored gradient is scaled in place,
    so a second backward fails loudly, as for the plain loss."""
    import torch.distributed as dist

    import bitempered.torch as bt
    from bitempered.bindings.torch.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss as loss

    alone = [dist.new_group([r]) for r in range(world_size)][rank]
    logits = _logits(torch.float32)
    for (t1, t2), kind in itertools.product(((0.8, 1.2), (1.0, 1.0)), ("indices", "dense")):
        labels = _labels(kind).float() if kind == "dense" else _labels(kind)
        upstream = torch.linspace(0.5, 2.0, 6).reshape(2, 3)
        kwargs = dict(t1=t1, t2=t2, label_smoothing=0.1, reduction="none")
        want, want_grad = _loss_and_grad(bt.bi_tempered_logistic_loss, logits, labels, upstream, **kwargs)
        got, got_grad = _loss_and_grad(loss, logits, labels, upstream, group=alone, **kwargs)
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), (t1, t2, kind)
        assert torch.equal(got_grad.nan_to_num(), want_grad.nan_to_num()), (t1, t2, kind)
    cols = _slice(rank, world_size)
    labels = torch.tensor([0, 5, 10])
    hidden, weight = torch.randn(3, 4), torch.randn(C, 4)
    for bad in (dict(ignore_index=True), dict(reduction="avg"), dict(num_iters=0), dict(t1=2.5), dict(t2=-1.0),
                dict(label_smoothing=1.0), dict(backend="gpu")):
        settings = dict(dict(t1=0.8, t2=1.2), **bad)
        errors = []
        for call in (lambda: bt.bi_tempered_logistic_loss(logits[0], labels, **settings),
                     lambda: bt.linear_bi_tempered_logistic_loss(hidden, weight, labels, **settings),
                     lambda: loss(logits[0][:, cols], labels, **settings)):
            with pytest.raises((ValueError, TypeError)) as error:
                call()
            errors.append((error.type, str(error.value)))
        assert errors[0] == errors[1] == errors[2], (bad, errors)
    local = logits[0][:, cols].clone().requires_grad_()
    result = loss(local, labels, 0.8, 1.2)
    result.backward(retain_graph=True)  # the stored gradient is kept for the second backward
    first = local.grad.clone()
    result.backward()
    torch.testing.assert_close(local.grad, 2 * first)


def _weights_and_float16(rank, world_size):
    """Per-class and per-row weights (issue #23) equal the plain loss's; weights that differ
    between ranks raise on every rank; float16 gradients survive a loss scale (issue #25)."""
    import bitempered.torch as bt
    from bitempered.bindings.torch.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss as loss

    cols = _slice(rank, world_size)
    labels = _labels("indices")
    gen = torch.Generator().manual_seed(7)  # the same weights on every rank
    weight, sample_weight = torch.rand(C, generator=gen) + 0.1, torch.rand(2, 3, generator=gen)
    logits = _logits(torch.float32)[..., :C]
    logits[1, 2, 3] = 0.0  # (no NaN row here: the sums below compare finite values)
    for backend in ("torch", "triton") if INTERPRETED else ("torch",):
        for reduction in ("mean", "none"):
            kwargs = dict(t1=0.8, t2=1.2, label_smoothing=0.1, reduction=reduction, weight=weight,
                          sample_weight=sample_weight)
            upstream = torch.linspace(0.5, 2.0, 6).reshape(2, 3)
            want, want_grad = _loss_and_grad(bt.bi_tempered_logistic_loss, logits, labels, upstream, **kwargs)
            got, got_grad = _loss_and_grad(loss, logits[..., cols], labels, upstream, backend=backend, **kwargs)
            torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
            torch.testing.assert_close(got_grad, want_grad[..., cols], **TOLERANCES[torch.float32])
    # weights that require grad get the plain loss's (exact) gradient, the same on every rank
    grads = []
    for fn, local in ((bt.bi_tempered_logistic_loss, logits), (loss, logits[..., cols])):
        w = weight.clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(local, labels, 0.8, 1.2, weight=w, sample_weight=sample_weight), w)[0])
    torch.testing.assert_close(grads[1], grads[0], **TOLERANCES[torch.float32])
    with pytest.raises(ValueError, match="row weights"):
        loss(logits[..., cols], labels, 0.8, 1.2, sample_weight=sample_weight + rank)
    with pytest.raises(ValueError, match="weight must be a 1-D array of the 11 class weights"):
        loss(logits[..., cols], labels, 0.8, 1.2, weight=weight[:-1])  # the same short vector on every rank
    # float16 under a loss scale: the gradient is stored in float32 until the backward
    half = (3.0 * torch.randn(64, C, generator=gen)).half()
    targets = torch.randint(0, C, (64,), generator=gen)
    scale = 65536.0
    grads = []
    for x in (half[:, cols].clone(), half[:, cols].float()):
        x.requires_grad_()
        (loss(x, targets, 0.8, 1.2) * scale).backward()
        grads.append(x.grad.float())
    normal = grads[1].abs() >= 2.0**-14
    assert int(((grads[0] == 0) & normal).sum()) == 0
    assert float(((grads[0] - grads[1]).abs() / grads[1].abs())[normal].max()) <= 2e-3


# One spawn per world size (starting ranks costs far more than the cases): each runs several checks.
def _two_ranks(rank, world_size):
    _matches_unsharded(rank, world_size)
    _weights_and_float16(rank, world_size)
    _bad_input_group_of_one_and_dtensor(rank, world_size)
    _one_driver_and_the_plain_loss_errors(rank, world_size)


def _three_ranks(rank, world_size):
    _matches_unsharded(rank, world_size)
    _collective_count(rank, world_size)
    _blocks_of_rows(rank, world_size)
    if INTERPRETED:
        _kernel_collective_count(rank, world_size)


def test_two_ranks_match_unsharded_bad_input_group_of_one_dtensor():
    run_ranks(_two_ranks, 2, TIMEOUT_S)


def test_three_ranks_match_unsharded_collectives_are_passes_plus_three():
    run_ranks(_three_ranks, 3, TIMEOUT_S)


def test_single_rank_kernel_path_matches_plain_loss():
    run_ranks(_single_rank_kernels, 1, TIMEOUT_S)


def test_perf_workload_reports_collectives_and_bytes(tmp_path):
    import json

    from perf import vocab_parallel

    vocab_parallel.main(["--ranks", "2", "--rows", "16", "--classes", "50", "--repeats", "1", "--timeout",
                         str(TIMEOUT_S), "--out", str(tmp_path)])
    (row,) = [json.loads(line) for line in (tmp_path / "vocab_parallel.jsonl").read_text().splitlines()]
    # (its "passes" are derived from the count; the count itself is checked in _collective_count)
    assert row["ranks"] == 2 and 4 <= row["collectives"] <= 3 + 30 and row["min_s"] > 0, row
    # the P x 14 fp64 group check, then O(N) fp32 values per collective: far below the 16 x 25 logits per pass
    assert row["bytes_sent"] <= 2 * 14 * 8 + 4 * 16 * (2 + 3 * row["passes"] + 3), row
    assert (tmp_path / "vocab_parallel_last.md").exists()
