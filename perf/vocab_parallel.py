"""``python -m perf.vocab_parallel``: the vocab-parallel loss on 1, 2, 4 ranks (classes sharded).

Each rank holds logits [N, C/P] (its slice; the slices differ by at most one class) and runs one
fwd+bwd step of ``vocab_parallel_bi_tempered_logistic_loss`` (class-index labels, "mean"),
``--repeats`` times after a warm-up step. P = 1 runs the same code with no collective.
Ranks are spawned processes on 127.0.0.1: gloo on CPU (``--device cpu``), NCCL with one GPU per
rank (``--device cuda``, the same code path). Reported (rank 0): min and median wall-clock of a
step (CUDA: synchronized), the solver passes (P > 1: per block of rows, from the all-reduce
count that ``tests/test_vocab_parallel_torch.py`` checks: 1 + per block passes + 2), and per call the number of all-reduces and the bytes
one rank sends into them (the sum of their tensors' sizes: O(N), never N x C). At P = 1 it also
times the plain ``bi_tempered_logistic_loss`` on the same logits ("plain" column: on CUDA the fused
kernel, so the ratio is the cost of the vocab-parallel kernels' split launches). ``--backend``
picks the per-slice math (default auto: the vocab-parallel Triton kernels on CUDA, native on CPU).

CPU default: N = 4096, C = 32000, fp32, (t1, t2) = (0.8, 1.2). Note that P ranks on a machine with
fewer than P free cores share them: CPU times show the overhead of the collectives, not a speed-up.
Rows (JSON lines) are appended to ``<out>/vocab_parallel.jsonl`` (default ``perf/out/<device-slug>/``, git-ignored) and the table
of the run is printed (markdown).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

LOGIT_SCALE = 4.0  # logits ~ N(0, 4^2), as in the perf harness


def _rank_main(rank, world_size, port, args, results_path):
    import torch
    import torch.distributed as dist

    from bitempered.bindings.torch.native import loss as native_loss
    from bitempered.bindings.torch.native import math as native
    from bitempered.torch import bi_tempered_logistic_loss, vocab_parallel_bi_tempered_logistic_loss

    threads = max(1, (os.cpu_count() or 1) // world_size)
    torch.set_num_threads(threads)
    backend = "nccl" if args.device == "cuda" else "gloo"
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=600))
    try:
        n, c = args.rows, args.classes
        bounds = [c * r // world_size for r in range(world_size + 1)]
        local_c = bounds[rank + 1] - bounds[rank]
        gen = torch.Generator().manual_seed(1000 + rank)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        logits = (torch.randn(n, local_c, generator=gen) * LOGIT_SCALE).to(device=device, dtype=dtype)
        labels = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(7)).to(device)
        calls = []
        original = dist.all_reduce

        def counting(tensor, *a, **k):
            calls.append(tensor.numel() * tensor.element_size())
            return original(tensor, *a, **k)

        dist.all_reduce = counting

        def step(loss=vocab_parallel_bi_tempered_logistic_loss):
            x = logits.detach().requires_grad_()
            loss(x, labels, args.t1, args.t2, backend=args.backend).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def timed(run):
            run()  # warm-up
            times = []
            for _ in range(args.repeats):
                dist.barrier()
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            return times

        step()  # the collective count of one call
        count, sent = len(calls), sum(calls)
        times = timed(step)
        dist.all_reduce = original
        plain = timed(lambda: step(bi_tempered_logistic_loss)) if world_size == 1 else None
        if rank == 0:
            # solver passes per block of rows: the kernels run one block (all-reduces = 1 check +
            # max + passes + epilogue); the native driver 1 check + per block (max + passes +
            # epilogue) over blocks of general_block_rows(C, P) rows. P = 1 sends none.
            kernels = device.type == "cuda" and args.backend != "torch"
            blocks = 1 if kernels else -(-n // native_loss.general_block_rows(c, world_size))
            passes = round((count - 1) / blocks - 2, 2) if world_size > 1 else int(
                native.solve_converged(native.shift_by_max(logits.float()), args.t2)[1].max())
            row = dict(ranks=world_size, backend=backend, rows=n, classes=c, dtype=args.dtype, t1=args.t1,
                       t2=args.t2, min_s=min(times), median_s=statistics.median(times), collectives=count,
                       bytes_sent=sent, threads_per_rank=threads, passes=passes, per_slice=args.backend,
                       plain_median_s=statistics.median(plain) if plain else None)
            with open(results_path, "w") as f:
                json.dump(row, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(world_size: int, args) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        context = mp.start_processes(_rank_main, args=(world_size, _free_port(), args, path), nprocs=world_size,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + args.timeout
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks still running after {args.timeout} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        with open(path) as f:
            return json.load(f)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m perf.vocab_parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--t1", type=float, default=0.8)
    parser.add_argument("--t2", type=float, default=1.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per rank count")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                        help="the per-slice math (auto: the Triton kernels on CUDA, native ops on CPU)")
    parser.add_argument("--out", help="default perf/out/<device-slug> (git-ignored); perf/results/... to record")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    import torch

    from perf import measure

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    out = args.out or str(measure.REPO / "perf" / "out" / measure.device_slug(device))
    os.makedirs(out, exist_ok=True)
    rows = []
    for world_size in args.ranks:
        row = run_ranks(world_size, args)
        row.update(device=measure.device_name(device), timestamp=measure.timestamp(), git=measure.git_sha())
        rows.append(row)
        with open(os.path.join(out, "vocab_parallel.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    base = rows[0]["median_s"]
    lines = [f"vocab-parallel fwd+bwd, N={args.rows}, C={args.classes}, {args.dtype}, t1={args.t1}, t2={args.t2}, "
             f"{rows[0]['device']}, git {rows[0]['git']}, {rows[0]['timestamp']}", "",
             "| ranks | backend | median s | min s | vs first | plain loss, median s | passes | all-reduces/call | "
             "bytes sent/call/rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        plain = "-" if row["plain_median_s"] is None else (
            f"{row['plain_median_s']:.3f} (vocab-parallel {row['median_s'] / row['plain_median_s']:.2f}x)")
        lines.append(f"| {row['ranks']} | {row['backend']} | {row['median_s']:.3f} | {row['min_s']:.3f} | "
                     f"{row['median_s'] / base:.2f}x | {plain} | {row['passes']} | {row['collectives']} | "
                     f"{row['bytes_sent']} |")
    print("\n".join(lines))
    with open(os.path.join(out, "vocab_parallel_last.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
