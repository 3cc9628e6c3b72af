"""Spawn gloo ranks on 127.0.0.1 for a test, bounded in time (no hang can outlive the test).

``run_ranks(fn, world_size, timeout_s, *args)`` starts ``world_size`` processes with
``torch.multiprocessing`` (spawn), each calling ``fn(rank, world_size, *args)`` inside an
initialized gloo process group on a free port. An exception in any rank fails the test with
that rank's traceback; a rank still running after ``timeout_s`` is killed and fails it too.
``collective_timeout_s``: gloo's limit on one collective (a test of a hang sets a few seconds).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60  # gloo's own limit on one collective (a rank left waiting raises)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


INIT_FAILED = "gloo process group could not be set up on port"


def _entry(rank, fn, world_size, port, args, collective_timeout_s):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # ranks share the few cores of a CI machine
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=collective_timeout_s))
    except Exception as error:  # e.g. the free port was taken again before the store bound it
        raise RuntimeError(f"{INIT_FAILED} {port}: {error}") from error
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    # A rank that passed leaves without the interpreter's teardown: there gloo's threads could abort
    # the process now and then ("terminate called without an active exception", about 1 run in 20
    # of the DTensor tests) after every check had passed. A failed rank raises above, as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, timeout_s: float, *args, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Runs the ranks; a failure to set up the process group itself (an infrastructure race on the
    free port, not the code under test) is retried once on a new port."""
    try:
        _run_once(fn, world_size, timeout_s, args, collective_timeout_s)
    except mp.ProcessRaisedException as error:
        if INIT_FAILED not in str(error):
            raise
        _run_once(fn, world_size, timeout_s, args, collective_timeout_s)


def _run_once(fn, world_size: int, timeout_s: float, args: tuple, collective_timeout_s: float) -> None:
    context = mp.start_processes(_entry, args=(fn, world_size, free_port(), args, collective_timeout_s),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} gloo ranks still running after {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
