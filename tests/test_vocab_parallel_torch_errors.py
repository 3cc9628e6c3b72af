"""An error on ONE rank of the vocab-parallel loss raises the same error on every rank, naming the
argument and the rank, instead of leaving the others in a collective until the process group's
timeout (``bindings/torch/group_check.py``). Two gloo ranks per case, each bounded in time: gloo
gives up on a collective after a few seconds (a hang fails the test instead of stalling it) and
the ranks are killed after ``TIMEOUT_S``. After the error every rank makes a good call, which
matches the plain loss: no rank was left inside a collective.
"""

from pathlib import Path

import torch

from distributed import run_ranks

C = 11
SLICES = [slice(0, 4), slice(4, 11)]  # rank 0 holds classes 0-3, rank 1 classes 4-10
COLLECTIVE_TIMEOUT_S = 5
TIMEOUT_S = 120
LOGITS = torch.linspace(-2.0, 3.0, 3 * C).reshape(3, C).sin() * 3.0
LABELS = torch.tensor([0, 5, 10])


def _error_then_a_good_call(rank, world_size, out_dir, case):
    """Runs ``case`` on this rank, writes the error it raised to ``out_dir/rank<r>.txt``, then
    checks a good call against the plain loss."""
    import bitempered.torch as bt
    from bitempered.bindings.torch.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss as loss

    try:
        CASES[case](rank, loss)
        outcome = "no error"
    except (ValueError, TypeError) as error:
        outcome = f"{type(error).__name__}: {error}"
    (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)
    good = loss(LOGITS[:, SLICES[rank]], LABELS, 0.8, 1.2, label_smoothing=0.1)
    torch.testing.assert_close(good, bt.bi_tempered_logistic_loss(LOGITS, LABELS, 0.8, 1.2, label_smoothing=0.1))


def _bad_dense_labels_on_one_rank(rank, loss):
    labels = torch.full((3, C), 1.0 / C)
    if rank == 1:
        labels[2, 6] = 1.5  # only rank 1's slice is outside [0, 1]
    loss(LOGITS[:, SLICES[rank]], labels[:, SLICES[rank]], 0.8, 1.2)


def _labels_differ_between_ranks(rank, loss):
    loss(LOGITS[:, SLICES[rank]], torch.tensor([0, 5, 10 - rank]), 0.8, 1.2)  # both in [0, C): silently wrong before


def _labels_outside_on_one_rank(rank, loss):
    loss(LOGITS[:, SLICES[rank]], torch.tensor([0, 5, 10 + rank]), 0.8, 1.2)  # 11 on rank 1 only


def _bad_t2_on_one_rank(rank, loss):
    loss(LOGITS[:, SLICES[rank]], LABELS, 0.8, 0.0 if rank == 1 else 1.2)


def _bad_ignore_index_on_one_rank(rank, loss):
    loss(LOGITS[:, SLICES[rank]], LABELS, 0.8, 1.2, ignore_index=1.5 if rank == 1 else -100)


def _per_row_temperature_on_one_rank(rank, loss):
    t1 = torch.full((3,), 0.8) if rank == 1 else 0.8  # one per row: not taken by the vocab-parallel loss
    loss(LOGITS[:, SLICES[rank]], LABELS, t1, 1.2)


def _dtensor_with_fewer_classes_than_ranks(rank, loss):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import bitempered.torch as bt

    mesh = init_device_mesh("cpu", (2,))
    logits = distribute_tensor(LOGITS[:, :1], mesh, [Shard(-1)])  # C = 1: rank 1 holds no class
    bt.bi_tempered_logistic_loss(logits, torch.zeros(3, dtype=torch.long), 0.8, 1.2)


CASES = {f.__name__: f for f in (_bad_dense_labels_on_one_rank, _labels_differ_between_ranks,
                                  _labels_outside_on_one_rank, _bad_t2_on_one_rank, _bad_ignore_index_on_one_rank,
                                  _per_row_temperature_on_one_rank, _dtensor_with_fewer_classes_than_ranks)}


def _errors(tmp_path, case) -> str:
    """The error every rank raised in ``case`` (asserted to be the same on both ranks)."""
    run_ranks(_error_then_a_good_call, 2, TIMEOUT_S, str(tmp_path), case, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    first, second = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert first == second, (first, second)
    return first


def test_bad_dense_labels_on_one_rank_raise_on_every_rank(tmp_path):
    error = _errors(tmp_path, "_bad_dense_labels_on_one_rank")
    assert error.startswith("ValueError: rank 1 of 2") and "labels" in error and "1.5" in error, error


def test_labels_that_differ_between_ranks_raise_on_every_rank(tmp_path):
    error = _errors(tmp_path, "_labels_differ_between_ranks")
    assert error.startswith("ValueError") and "disagree on labels (class indices)" in error, error
    error = _errors(tmp_path, "_labels_outside_on_one_rank")  # the disagreement is found first, on both
    assert error.startswith("ValueError") and "disagree on labels (class indices)" in error, error


def test_a_bad_argument_on_one_rank_raises_on_every_rank(tmp_path):
    error = _errors(tmp_path, "_bad_t2_on_one_rank")
    assert error.startswith("ValueError: rank 1 of 2") and "t2 must be > 0" in error, error
    error = _errors(tmp_path, "_bad_ignore_index_on_one_rank")
    assert error.startswith("TypeError: rank 1 of 2") and "ignore_index must be None or an int" in error, error


def test_a_per_row_temperature_on_one_rank_raises_on_every_rank(tmp_path):
    error = _errors(tmp_path, "_per_row_temperature_on_one_rank")
    assert error.startswith("ValueError: rank 1 of 2") and "t1 must be a float or a 0-d tensor: 0-d temperatures " \
        "only here" in error, error


def test_dtensor_with_fewer_classes_than_ranks_raises_on_every_rank(tmp_path):
    error = _errors(tmp_path, "_dtensor_with_fewer_classes_than_ranks")
    assert error.startswith("ValueError: rank 1 of 2") and "no class" in error, error
