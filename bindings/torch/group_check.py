"""Argument checks that every rank of a process group agrees on before any rank raises.

A rank that raises before a collective leaves the others waiting in it until the process group's
timeout (30 min on gloo by default). So a function whose every rank must run the same collectives
first runs its local checks with the error caught, then makes ONE all-reduce of a P x K float64
table: rank r writes row r (an error code, then its values: sizes, settings, a checksum of the
labels) and reads every row. From the same table every rank decides the same way:

- a rank's checks failed: every rank raises that rank's error, the same type and message, naming
  the rank (when every rank failed alike, the error as it is). The message travels in a second
  collective, which only this error path makes (every rank knows by then that it is taken);
- values that must agree differ: every rank raises ValueError naming the value and each rank's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

ERRORS = (ValueError, TypeError, RuntimeError)  # what a check raises; column 0 holds 1 + the index
MESSAGE_BYTES = 2048  # per rank, on the error path only


def agree(group, device: torch.device, columns: Sequence[str], check_locally: Callable,
          may_differ: Sequence[str] = (), show: Callable[[str, float], str] = lambda name, value: f"{value:g}"):
    """Runs ``check_locally()`` -> (result, row) on this rank, where ``row`` maps each name of
    ``columns`` to a float or a 0-d tensor (a device value costs no sync here), then agrees with
    the other ranks of ``group`` (module docstring). Returns (result, {column: [value of each rank]}).
    ``may_differ``: the columns that are per-rank (sizes of a slice); ``show(name, value)``: how a
    value reads in the error message."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    table = torch.zeros(size, 1 + len(columns), dtype=torch.float64, device=device)
    try:
        result, row = check_locally()
    except ERRORS as error:
        result, problem = None, error
        table[rank, 0] = 1 + next(i for i, kind in enumerate(ERRORS) if isinstance(error, kind))
    else:
        problem = None
        for i, name in enumerate(columns, start=1):
            table[rank, i] = row[name]
    dist.all_reduce(table, group=group)
    table = table.cpu()
    failed = [r for r in range(size) if table[r, 0] > 0]
    if failed:
        _raise_on_every_rank(group, device, rank, failed, table[:, 0].long().tolist(), problem)
    values = {name: table[:, i].tolist() for i, name in enumerate(columns, start=1)}
    for name in columns:
        if name not in may_differ and len(set(values[name])) > 1:
            ranks = ", ".join(f"rank {r}: {show(name, v)}" for r, v in enumerate(values[name]))
            raise ValueError(f"the ranks of the group disagree on {name} ({ranks}); every rank must pass the same "
                             f"{name}")
    return result, values


def _raise_on_every_rank(group, device, rank: int, failed: list[int], codes: list[int], problem):
    """Every rank raises the error of the first failed rank (its message from a second collective)."""
    messages = _exchange(group, device, rank, str(problem) if problem is not None else "")
    first = failed[0]
    kind = ERRORS[codes[first] - 1]
    if len(failed) == len(codes) and len(set(messages)) == 1 and len(set(codes)) == 1:
        error = kind(messages[0])  # every rank failed alike: the plain function's error
    else:
        others = f"; ranks {failed[1:]} failed too" if len(failed) > 1 else ""
        error = kind(f"rank {first} of {len(codes)} in the group: {messages[first]} (every rank raises this error, "
                     f"so that none waits in a collective{others})")
    if problem is not None:
        raise error from problem
    raise error


def _exchange(group, device, rank: int, message: str) -> list[str]:
    """Every rank's ``message`` (UTF-8, cut to MESSAGE_BYTES): one all-reduce of P x MESSAGE_BYTES."""
    size = dist.get_world_size(group)
    encoded = message.encode()[:MESSAGE_BYTES]
    table = torch.zeros(size, MESSAGE_BYTES, dtype=torch.uint8, device=device)
    if encoded:
        table[rank, :len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
    dist.all_reduce(table, group=group)
    return [bytes(row).rstrip(b"\0").decode(errors="ignore") for row in table.cpu().tolist()]
