"""``python -m perf.linear``: fused linear + bi-tempered loss against materialized logits.

Every provider computes ``loss = mean_i L(hidden @ W.T + b, labels)`` and its gradients with respect to
hidden, W and b (fwd+bwd, one step). Each (provider, cell) runs in a FRESH subprocess, so that one
provider's caches and allocator pools never count against another. Reported per provider:

- time: min and median wall-clock (CUDA: synchronized) over ``--repeats`` steps after a warm-up step
  (on CPU the memory-measured step counts as one more).
- peak extra memory, above what the inputs and the parameters' ``.grad`` buffers already hold:
  torch CPU: peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up step,
  which also holds torch.compile's compilation) minus the RSS before the measured step;
  torch CUDA: ``max_memory_allocated`` minus the allocated bytes before the step;
  JAX: ``memory_analysis().temp_size_in_bytes`` of the compiled ``jit(value_and_grad)`` program.
- gradient errors: ``max |g - g64| / max |g64|`` for the loss, grad_hidden, grad_weight and grad_bias,
  g64 from bitempered's fused torch path in float64 (tested against tests/reference.py and the
  materialized loss in tests/test_linear_torch.py), on the same inputs.

Shapes ``NxHxC``; CPU default: the issue's acceptance cell 4096x256x50000 fp32. GPU (``--device cuda``)
defaults: the issue's bf16 targets 8192x4096x128256 and 16384x2048x262144 (peak extra memory <= 1/8 of
materialized; at t1 = t2 = 1 time within 1.2x of Liger's fused linear cross-entropy).
Results: rows (JSON lines) appended to ``<out>/linear.jsonl`` (default ``perf/out/<device-slug>/``, git-ignored) and the table of this run
printed (markdown) and written to ``linear_last.md`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

CPU_SHAPES = [(4096, 256, 50000)]
GPU_SHAPES = [(8192, 4096, 128256), (16384, 2048, 262144)]
LOGIT_SCALE = 4.0  # logits ~ N(0, 4^2), as in the perf harness
TORCH_PROVIDERS = ("torch-fused", "torch-materialized", "torch-compile-materialized", "liger-flce", "cce")
JAX_PROVIDERS = ("jax-fused", "jax-materialized")
PROVIDERS = TORCH_PROVIDERS + JAX_PROVIDERS
CE_ONLY = ("liger-flce", "cce")  # cross-entropy kernels: t1 = t2 = 1 only
DTYPES = ("fp32", "bf16")


def make_inputs(n, h, c, seed=0):
    """NumPy float64 inputs of a cell (hidden, weight, bias, class indices)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, h))
    weight = rng.standard_normal((c, h)) * (LOGIT_SCALE / np.sqrt(h))
    bias = rng.standard_normal(c) * 0.1
    labels = rng.integers(0, c, n)
    return hidden, weight, bias, labels


# --------------------------------------------------------------------------------------------
# Child process: one provider on one cell
# --------------------------------------------------------------------------------------------

def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _torch_step(provider, t1, t2, device):
    import torch
    import torch.nn.functional as F

    from bitempered import torch as bt

    if provider == "torch-fused":
        return lambda x, w, b, y: bt.linear_bi_tempered_logistic_loss(x, w, y, t1, t2, bias=b)
    if provider in ("torch-materialized", "torch-compile-materialized"):
        def materialized(x, w, b, y):
            return bt.bi_tempered_logistic_loss(F.linear(x, w, b), y, t1, t2)
        return torch.compile(materialized) if provider.startswith("torch-compile") else materialized
    if provider == "liger-flce":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return lambda x, w, b, y: liger_fused_linear_cross_entropy(x, w, y, b)
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy
        return lambda x, w, b, y: linear_cross_entropy(x, w, y, bias=b)
    raise ValueError(provider)


def run_torch(args, arrays, truth):
    import torch

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[args.dtype]
    hidden, weight, bias, labels = arrays
    x = torch.tensor(hidden, dtype=dtype, device=device, requires_grad=True)
    w = torch.tensor(weight, dtype=dtype, device=device, requires_grad=True)
    b = torch.tensor(bias, dtype=dtype, device=device, requires_grad=True)
    y = torch.tensor(labels, device=device)
    t1 = torch.tensor(args.t1, dtype=torch.float64)
    t2 = torch.tensor(args.t2, dtype=torch.float64)
    loss_fn = _torch_step(args.provider, t1, t2, device)

    def step():
        for p in (x, w, b):
            p.grad = None
        loss = loss_fn(x, w, b, y)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss

    step()  # warm-up: compilation, lazy initialization, the .grad buffers' first allocation
    grads_bytes = sum(p.grad.numel() * p.grad.element_size() for p in (x, w, b))
    if device.type == "cuda":
        for p in (x, w, b):
            p.grad = None
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) + grads_bytes
        loss = step()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        for p in (x, w, b):
            p.grad = None
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base_kb = _rss_kb("VmRSS")
        start = time.perf_counter()
        loss = step()
        measured = time.perf_counter() - start
        peak = (_rss_kb("VmHWM") - base_kb) * 1024 - grads_bytes
    times = [measured] if device.type == "cpu" else []  # a steady-state step too (after the warm-up)
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    values = {"loss": float(loss), "hidden": x.grad.double().cpu().numpy(), "weight": w.grad.double().cpu().numpy(),
              "bias": b.grad.double().cpu().numpy()}
    return times, peak, values


def _jax_loss_fn(provider, labels):
    import jax.numpy as jnp

    from bitempered import jax as bj

    if provider == "jax-fused":
        return lambda x, w, b, t1, t2: bj.linear_bi_tempered_logistic_loss(x, w, labels, t1, t2, bias=b,
                                                                             reduction="mean")
    if provider == "jax-materialized":
        return lambda x, w, b, t1, t2: jnp.mean(bj.bi_tempered_logistic_loss(x @ w.T + b, labels, t1, t2))
    raise ValueError(provider)


def run_jax(args, arrays, truth):
    import jax
    import jax.numpy as jnp
    import numpy as np

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.dtype]
    hidden, weight, bias, labels = arrays
    x, w, b = (jnp.asarray(a, dtype) for a in (hidden, weight, bias))
    y = jnp.asarray(labels, jnp.int32)
    t1, t2 = jnp.float32(args.t1), jnp.float32(args.t2)
    step = jax.jit(jax.value_and_grad(_jax_loss_fn(args.provider, y), argnums=(0, 1, 2)))
    compiled = step.lower(x, w, b, t1, t2).compile()
    peak = compiled.memory_analysis().temp_size_in_bytes
    loss, grads = jax.block_until_ready(compiled(x, w, b, t1, t2))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(x, w, b, t1, t2))
        times.append(time.perf_counter() - start)
    values = {"loss": float(loss)} | {k: np.asarray(g.astype(jnp.float32), np.float64)
                                      for k, g in zip(("hidden", "weight", "bias"), grads)}
    return times, peak, values


def child(args) -> dict:
    import numpy as np

    arrays = make_inputs(*args.shape)
    truth = dict(np.load(args.truth)) if args.truth else None
    if args.provider in JAX_PROVIDERS:
        times, peak, values = run_jax(args, arrays, truth)
    else:
        times, peak, values = run_torch(args, arrays, truth)
    row = {"time_min_s": min(times, default=None), "time_median_s": float(np.median(times)) if times else None,
           "peak_extra_bytes": int(peak)}
    if args.save_truth:
        np.savez(args.save_truth, loss=values["loss"], **{k: np.asarray(values[k], np.float64)
                                                           for k in ("hidden", "weight", "bias")})
    if truth is not None:
        for key in ("loss", "hidden", "weight", "bias"):
            ref = np.asarray(truth[key], np.float64)
            got = np.asarray(values[key], np.float64)
            row[f"err_{key}"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-300))
    return row


# --------------------------------------------------------------------------------------------
# Parent: one subprocess per provider x cell, then the table
# --------------------------------------------------------------------------------------------

def _spawn(argv, timeout_s) -> dict:
    cmd = [sys.executable, "-m", "perf.linear", "--child", *argv]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout_s} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    if "ModuleNotFoundError" in tail or "ImportError" in tail:
        return {"status": "skipped: " + tail[:120]}
    return {"status": "error: " + tail[:160]}


def _mib(value):
    return "-" if value is None else f"{value / 2**20:.0f}"


def table(rows) -> str:
    lines = ["| shape NxHxC | dtype | t1:t2 | provider | time min (s) | vs materialized | peak extra (MiB) | "
             "vs materialized | err loss | err grad_hidden | err grad_weight | err grad_bias | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((o for o in rows if o["cell"] == r["cell"] and o.get("time_min_s") is not None and
                     o["provider"] == ("jax-materialized" if r["provider"].startswith("jax") else "torch-materialized")),
                    None)
        t, m = r.get("time_min_s"), r.get("peak_extra_bytes")
        ratio_t = f"{t / base['time_min_s']:.2f}x" if base and t is not None else "-"
        ratio_m = f"{m / base['peak_extra_bytes']:.3f}x" if base and m is not None and base["peak_extra_bytes"] else "-"
        errs = [f"{r[k]:.1e}" if r.get(k) is not None else "-" for k in ("err_loss", "err_hidden", "err_weight", "err_bias")]
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['temps']} | {r['provider']} | "
                     f"{'-' if t is None else f'{t:.3f}'} | {ratio_t} | {_mib(m)} | {ratio_m} | {' | '.join(errs)} | "
                     f"{r.get('status', 'ok')} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m perf.linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--shapes", nargs="+", help="NxHxC (default: CPU 4096x256x50000; GPU the issue's targets)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--temps", nargs="+", default=["0.8:1.2", "1:1"], help="t1:t2 pairs")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=900, help="per provider x cell subprocess")
    p.add_argument("--no-truth", action="store_true", help="skip the float64 gradients (no error columns)")
    p.add_argument("--out", type=Path, help="default perf/out/<device-slug> (git-ignored); perf/results/... to record")
    # child mode (one provider, one cell; prints one JSON line)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--provider", help=argparse.SUPPRESS)
    p.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split("x")), help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--t1", type=float, help=argparse.SUPPRESS)
    p.add_argument("--t2", type=float, help=argparse.SUPPRESS)
    p.add_argument("--truth", help=argparse.SUPPRESS)
    p.add_argument("--save-truth", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    import torch

    from . import measure

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = args.shapes or ["x".join(map(str, s)) for s in (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)]
    dtypes = args.dtypes or (["bf16"] if device.type == "cuda" else ["fp32"])
    out = args.out or measure.REPO / "perf" / "out" / measure.device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    rows, scratch = [], Path(tempfile.mkdtemp(prefix="perf-linear-"))
    for shape, dtype, temps in ((s, d, t) for s in shapes for d in dtypes for t in args.temps):
        t1, t2 = temps.split(":")
        common = ["--device", device.type, "--shape", shape, "--t1", t1, "--t2", t2]
        truth = scratch / f"truth-{shape}-{temps.replace(':', '_')}.npz"
        if not args.no_truth and not truth.exists():
            status = _spawn(["--provider", "torch-fused", "--dtype", "fp64", "--repeats", "0",
                             "--save-truth", str(truth), *common], args.timeout_s)
            if "status" in status:
                print(f"float64 truth failed: {status['status']}", file=sys.stderr)
        for provider in args.providers:
            row = {"shape": shape, "dtype": dtype, "temps": temps, "provider": provider, "cell": (shape, dtype, temps)}
            if provider in CE_ONLY and (float(t1), float(t2)) != (1.0, 1.0):
                continue
            if provider in CE_ONLY and device.type != "cuda":
                row["status"] = "skipped: CUDA only"
            else:
                extra = ["--truth", str(truth)] if truth.exists() else []
                row |= _spawn(["--provider", provider, "--dtype", dtype, "--repeats", str(args.repeats),
                               *common, *extra], args.timeout_s)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "cell"}), flush=True)
    report = (f"Device: {measure.device_name(device)}; git {measure.git_sha()}; {measure.timestamp()}\n\n"
              + table(rows) + "\n")
    (out / "linear_last.md").write_text(report)
    with open(out / "linear.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "cell"} | {"device": measure.device_name(device),
                                                                              "git": measure.git_sha()}) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
