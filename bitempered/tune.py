"""``python -m bitempered.tune --shapes NxC ...``: fill the autotune cache ahead of training.

For every shape x dtype x label kind (and kernel family asked for) it launches the torch Triton
launchers once with autotuning on, which times the candidates on those inputs and stores the
fastest (``bindings/common/autotune.py``); keys already cached are kept unless ``--retune`` (which empties this device's cache first).
Prints one line per key: heuristic config and time, tuned config and time. The JAX launchers
read the same cache (same device name). On a machine without CUDA it runs on Triton's
interpreter (tiny shapes only: it checks the mechanism; the times mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

FAMILIES = {"loss": ("loss",), "softmax": ("softmax_fwd", "softmax_bwd"),
            "binary": ("binary_loss", "sigmoid_fwd", "sigmoid_bwd")}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LOGIT_SCALE = 4.0  # logits ~ N(0, 4^2), as perf/ measures


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, c = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: expected NxC (e.g. 4096x32000), got {text!r}")
    if n < 1 or c < 1:
        raise argparse.ArgumentTypeError(f"--shapes: N and C must be >= 1, got {text!r}")
    return n, c


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bitempered.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", type=parse_shape, required=True, help="NxC ...")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--labels", nargs="+", choices=["int", "dense"], default=["int"])
    p.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["loss"])
    p.add_argument("--grad", choices=["yes", "no", "both"], default="yes",
                   help="loss keys with NEED_GRAD (training), without (evaluation), or both")
    p.add_argument("--num-iters", type=int, default=None,
                   help="tune the original algorithm's kernels (ORIGINAL) with this many steps")
    p.add_argument("--t1", type=float, default=0.8)
    p.add_argument("--t2", type=float, default=1.2)
    p.add_argument("--retune", action="store_true", help="time keys that are already cached again")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no new shape after this many seconds")
    args = p.parse_args(argv)
    if args.num_iters is not None and args.num_iters < 1:
        p.error(f"--num-iters must be >= 1, got {args.num_iters}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    from bitempered.bindings.common import autotune
    from bitempered.bindings.torch import launchers as tt

    autotune.set_enabled(True)
    name = tt.device_name(torch.empty(0, device=device))
    print(f"device: {name}   cache: {autotune.cache_path(name)}   triton {autotune.triton_version()}")
    start = time.perf_counter()
    grads = {"yes": [True], "no": [False], "both": [True, False]}[args.grad]
    gen = torch.Generator(device=device).manual_seed(0)
    if args.retune:
        autotune.forget(name)
    reported: set = set()
    for n, c in args.shapes:
        if args.time_budget_s is not None and time.perf_counter() - start > args.time_budget_s:
            print(f"time budget of {args.time_budget_s:g} s reached: stopping before {n}x{c}")
            break
        for dtype_flag in args.dtypes:
            dtype = getattr(torch, DTYPES[dtype_flag])
            logits = (LOGIT_SCALE * torch.randn(n, c, device=device, generator=gen)).to(dtype)
            for kind in args.labels:
                labels = _labels(kind, n, c, dtype, device, gen)
                for family in _families(args.families, first=kind == args.labels[0]):
                    for need_grad in (grads if family in ("loss", "binary_loss") else [False]):
                        with autotune.recording() as looked_up:
                            _launch(tt, family, logits, labels, args, need_grad)
                        for _device, key, tuned_now in looked_up:
                            if key not in reported:
                                reported.add(key)
                                _report(autotune, name, key, f"{n}x{c}", tuned_now)
    return 0


def _families(names, first: bool):
    """Label-independent families are tuned once (with the first label kind asked for)."""
    for name in names:
        for family in FAMILIES[name]:
            if family == "loss" or first:
                yield family


def _labels(kind, n, c, dtype, device, gen):
    import torch

    if kind == "int":
        return torch.randint(0, c, (n,), device=device, generator=gen)
    w = torch.rand(n, c, device=device, generator=gen) ** 8
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def _launch(tt, family, logits, labels, args, need_grad):
    """One launch of ``family`` on these inputs (tunes on a cache miss)."""
    import torch

    t1, t2, k = args.t1, args.t2, args.num_iters
    if family == "loss":
        tt.loss_forward(logits, labels, t1, t2, 0.0, k, -100, need_grad)
    elif family == "softmax_fwd":
        tt.softmax_forward(logits, t2, k)
    elif family == "softmax_bwd":
        probs = tt.softmax_forward(logits, t2, k)
        tt.softmax_backward(probs, torch.randn_like(probs), t2)
    else:
        x = logits.reshape(-1)
        if family == "binary_loss":
            tt.binary_loss_forward(x, torch.rand_like(x), t1, t2, 0.0, k, need_grad)
        elif family == "sigmoid_fwd":
            tt.sigmoid_forward(x, t2, k)
        else:
            probs = tt.sigmoid_forward(x, t2, k)
            tt.sigmoid_backward(probs, torch.randn_like(probs), t2)
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)


def _report(autotune, device, key, shape, tuned_now):
    entry = autotune.cached_entry(device, key)
    gain = entry["heuristic_ms"] / entry["time_ms"] if entry["time_ms"] else float("nan")
    source = f"tuned now on {shape}" if tuned_now else "cached, not timed again"
    print(f"{key}  [{source}]\n    heuristic {_describe(entry['heuristic'])}: {entry['heuristic_ms']:.4f} ms"
          f"\n    tuned     {_describe(entry['config'])}: {entry['time_ms']:.4f} ms   "
          f"(x{gain:.2f}, {entry['candidates']} candidates, {entry['timer']})")


def _describe(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


if __name__ == "__main__":
    raise SystemExit(main())
