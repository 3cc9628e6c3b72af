"""``python -m perf --memory``: memory of one forward+backward of the loss alone, per temperature.

Reported as a multiple of the logits' size (fp32 N x C by default, 4096 x 50000 = 781 MiB; with
``--dtypes`` also bf16/fp16 logits, PyTorch only):

- PyTorch (``bitempered-torch``, and ``torch-ce`` = ``F.cross_entropy`` at t1 = t2 = 1): a FRESH
  Python process per row builds a leaf logits tensor and the labels, runs one small warm-up call
  (lazy initialisation is not the loss's memory), resets its peak resident set (``VmHWM``, by
  writing 5 to ``/proc/self/clear_refs``), then runs ``loss.backward()`` once. Extra memory =
  peak resident set - resident set before the call: everything beyond the inputs, the gradient
  ``logits.grad`` (1x) included. The seconds of that one call are recorded too.
- JAX (``bitempered-jax-xla``, ``original-jax``, ``optax-ce``): ``jit(value_and_grad(loss))``
  with the temperatures traced, lowered from shapes alone (nothing runs): XLA's temporary
  buffers (``memory_analysis().temp_size_in_bytes``) plus what the program returns (the
  gradient and the loss), the same "beyond the inputs, gradient included" quantity.

Rows are appended to ``memory.csv`` in the output folder; ``memory.md`` (and the memory section of
``results.md``) show the latest row of each provider x cell.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import measure

MEMORY_SHAPES = [(4096, 50000)]
TORCH_PROVIDERS = ("bitempered-torch", "torch-ce")
JAX_PROVIDERS = ("bitempered-jax-xla", "original-jax", "optax-ce")
CE_PROVIDERS = ("torch-ce", "optax-ce")  # cross-entropies: t1 = t2 = 1 only
CHILD_TIMEOUT_S = 600
COLUMNS = ["timestamp", "run_id", "git_sha", "device", "device_slug", "framework", "provider", "labels",
           "dtype", "N", "C", "t1", "t2", "status", "method", "logits_MiB", "extra_MiB", "extra_x_logits",
           "temp_MiB", "returned_MiB", "seconds", "notes"]
NUMERIC = {"N", "C", "t1", "t2", "logits_MiB", "extra_MiB", "extra_x_logits", "temp_MiB", "returned_MiB",
           "seconds"}
KEY = ("provider", "labels", "dtype", "N", "C", "t1", "t2")
MIB = 2**20


# --------------------------------------------------------------------------------------------
# PyTorch: one fresh process per measurement
# --------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _torch_loss(provider: str, t1: float, t2: float):
    import torch

    if provider == "bitempered-torch":
        from bitempered import torch as bt

        return lambda x, y: bt.bi_tempered_logistic_loss(x, y, t1, t2, reduction="sum", backend="torch")
    if provider == "torch-ce":
        return lambda x, y: torch.nn.functional.cross_entropy(x, y, reduction="sum")
    raise ValueError(f"provider must be one of {TORCH_PROVIDERS}, got {provider!r}")


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _torch_inputs(n: int, c: int, labels: str, seed: int = 0, dtype: str = "fp32"):
    import torch

    gen = torch.Generator().manual_seed(seed)
    logits = torch.empty(n, c, dtype=getattr(torch, TORCH_DTYPES[dtype]))  # no temporary
    logits.normal_(0.0, 4.0, generator=gen).requires_grad_(True)
    if labels == "int":
        return logits, torch.randint(0, c, (n,), generator=gen)
    dense = torch.rand(n, c, generator=gen).pow_(8)
    return logits, dense.div_(dense.sum(-1, keepdim=True))


def torch_child(spec: dict) -> dict:
    """Runs in the fresh process: peak resident bytes of one fwd+bwd beyond the inputs."""
    loss_fn = _torch_loss(spec["provider"], spec["t1"], spec["t2"])
    dtype = spec.get("dtype", "fp32")
    small_x, small_y = _torch_inputs(8, min(spec["C"], 16), spec["labels"], dtype=dtype)
    loss_fn(small_x, small_y).backward()  # lazy initialisation (op registration, thread pools)
    x, y = _torch_inputs(spec["N"], spec["C"], spec["labels"], dtype=dtype)
    del small_x, small_y
    gc.collect()
    before = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # peak resident set := current resident set
    start = time.perf_counter()
    loss_fn(x, y).backward()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    return dict(extra_bytes=max(0, peak - before), seconds=seconds, logits_bytes=x.numel() * x.element_size(),
                grad_bytes=x.grad.numel() * x.grad.element_size())


def run_torch_child(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(measure.REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "perf.memory", json.dumps(spec)], cwd=measure.REPO, env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(tail[-1] if tail else f"exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# JAX: XLA's memory analysis of the training step
# --------------------------------------------------------------------------------------------

def _jax_rows_fn(provider: str, labels: str):
    if provider == "bitempered-jax-xla":
        from bitempered import jax as bj

        return lambda a, y, t1, t2: bj.bi_tempered_logistic_loss(a, y, t1, t2, backend="xla"), labels
    if provider == "original-jax":
        from jax_bitempered_loss import loss as original

        return lambda a, y, t1, t2: original.bi_tempered_logistic_loss(a, y, t1, t2), "dense"  # no indices
    if provider == "optax-ce":
        import optax

        ce = optax.softmax_cross_entropy if labels == "dense" else optax.softmax_cross_entropy_with_integer_labels
        return lambda a, y, t1, t2: ce(a, y), labels  # the same signature; the temperatures are unused
    raise ValueError(f"provider must be one of {JAX_PROVIDERS}, got {provider!r}")


def jax_analysis(provider: str, n: int, c: int, labels: str) -> dict:
    """Temp and returned bytes of jit(value_and_grad(sum of losses)) with traced temperatures."""
    import jax
    import jax.numpy as jnp

    rows_fn, label_kind = _jax_rows_fn(provider, labels)
    logits = jax.ShapeDtypeStruct((n, c), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32) if label_kind == "int" else jax.ShapeDtypeStruct((n, c), jnp.float32)
    t = jax.ShapeDtypeStruct((), jnp.float32)
    step = jax.jit(jax.value_and_grad(lambda a, y_, t1, t2: rows_fn(a, y_, t1, t2).sum()))
    analysis = step.lower(logits, y, t, t).compile().memory_analysis()
    if analysis is None:
        raise RuntimeError("XLA gives no memory analysis on this platform")
    return dict(temp_bytes=float(analysis.temp_size_in_bytes), returned_bytes=float(analysis.output_size_in_bytes),
                logits_bytes=4 * n * c, label_kind=label_kind)


# --------------------------------------------------------------------------------------------
# The mode
# --------------------------------------------------------------------------------------------

def cells(shapes, temps, labels, dtypes=("fp32",)):
    """(framework, provider, (N, C), labels, (t1, t2), dtype) in measuring order (JAX: fp32 only)."""
    for dtype in dtypes:
        for shape in shapes:
            for kind in labels:
                for framework, names in (("torch", TORCH_PROVIDERS), ("jax", JAX_PROVIDERS)):
                    if framework == "jax" and dtype != "fp32":
                        continue
                    for name in names:
                        for t in temps:
                            if name in CE_PROVIDERS and t != (1.0, 1.0):
                                continue
                            if name == "original-jax" and kind == "dense":
                                continue  # the same program as its int row (it takes dense labels only)
                            yield framework, name, shape, kind, t, dtype


def measure_row(framework, provider, shape, labels, temps, base: dict, dtype: str = "fp32") -> dict:
    n, c = shape
    row = dict(base, framework=framework, provider=provider, labels=labels, dtype=dtype, N=n, C=c,
               t1=temps[0], t2=temps[1], logits_MiB=(4 if dtype == "fp32" else 2) * n * c / MIB)
    try:
        if framework == "torch":
            got = run_torch_child(dict(provider=provider, N=n, C=c, labels=labels, t1=temps[0], t2=temps[1],
                                       dtype=dtype))
            row.update(status="ok", method="peak RSS of a fresh process (VmHWM)", extra_MiB=got["extra_bytes"] / MIB,
                       returned_MiB=got["grad_bytes"] / MIB, seconds=got["seconds"])
        else:
            got = jax_analysis(provider, n, c, labels)
            extra = got["temp_bytes"] + got["returned_bytes"]
            row.update(status="ok", method="XLA temp buffers + returned arrays", extra_MiB=extra / MIB,
                       temp_MiB=got["temp_bytes"] / MIB, returned_MiB=got["returned_bytes"] / MIB,
                       notes="fp32 dense labels (it takes no class indices)" if got["label_kind"] != labels else "")
        row["extra_x_logits"] = row["extra_MiB"] / row["logits_MiB"]
    except Exception as err:  # noqa: BLE001 - one row failing never stops the mode
        lines = str(err).strip().splitlines()
        row["status"] = f"error: {type(err).__name__}: {lines[-1][:160] if lines else ''}"
    return row


def run(session_like, shapes, temps, labels, out: Path, dtypes=("fp32",)) -> Path:
    """Measures every memory cell, appends memory.csv, writes memory.md; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "memory.csv"
    base = dict(timestamp=measure.timestamp(), run_id=session_like.run_id, git_sha=session_like.sha,
                device=session_like.name, device_slug=session_like.slug)
    start = time.perf_counter()
    for framework, provider, shape, kind, t, dtype in cells(shapes, temps, labels, dtypes):
        row = measure_row(framework, provider, shape, kind, t, base, dtype)
        append(csv_path, row)
        extra = f"{row['extra_x_logits']:.2f}x the logits" if row["status"] == "ok" else row["status"]
        secs = f" in {row['seconds']:.1f} s" if row.get("seconds") is not None else ""
        print(f"[{time.perf_counter() - start:6.1f}s] memory {provider:20s} {dtype} {shape[0]}x{shape[1]} "
              f"{kind:5s} "
              f"t=({t[0]:g},{t[1]:g}): {extra}{secs}")
    md_path = out / "memory.md"
    md_path.write_text("\n".join([f"# bitempered memory: {session_like.name}", ""] + markdown(read(csv_path))) + "\n")
    return md_path


def append(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(COLUMNS)
        writer.writerow([_fmt(row.get(col)) for col in COLUMNS])


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read(path: Path) -> list[dict]:
    """The latest row of each provider x cell (numbers parsed)."""
    table: dict = {}
    with path.open(newline="") as f:
        for raw in csv.DictReader(f):
            row = {col: ((float(raw[col]) if raw.get(col) else None) if col in NUMERIC else raw.get(col, ""))
                   for col in COLUMNS}
            key = tuple(row[k] for k in KEY)
            table.pop(key, None)
            table[key] = row
    return list(table.values())


def markdown(rows: list[dict]) -> list[str]:
    """The memory section (shared by memory.md and results.md)."""
    lines = [
        "Memory of one forward+backward of the loss alone (fp32 logits unless the dtype says), beyond its "
        "inputs and with the "
        "gradient included, as a multiple of the logits' size (1.00x = one more logits-sized array).",
        "",
        "- PyTorch: peak resident memory of a fresh process during one `loss.backward()` on a leaf logits "
        "tensor, minus what was resident before it; `seconds` is that one call's wall time.",
        "- JAX: `jax.jit(jax.value_and_grad(loss))` with traced temperatures: XLA's temporary buffers plus "
        "the arrays it returns (the gradient and the loss), from `compiled.memory_analysis()` (nothing runs).",
        "",
        "| framework | provider | dtype | N x C | labels | t1,t2 | x logits | extra MiB | of which XLA temp MiB "
        "| seconds | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(TORCH_PROVIDERS + JAX_PROVIDERS)}
    ok = sorted((r for r in rows if r["status"] == "ok"),
                key=lambda r: (r["framework"] != "torch", r.get("dtype") or "fp32", r["N"], r["C"],
                               r["labels"] != "int",
                               order.get(r["provider"], 99), (r["t1"], r["t2"]) != (1.0, 1.0), r["t1"], r["t2"]))
    for r in ok:
        num = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {r['framework']} | {r['provider']} | {r.get('dtype') or 'fp32'} | "
                     f"{int(r['N'])} x {int(r['C'])} | {r['labels']} | "
                     f"{r['t1']:g},{r['t2']:g} | **{r['extra_x_logits']:.2f}** | {r['extra_MiB']:.0f} | "
                     f"{num(r['temp_MiB'], '.0f')} | {num(r['seconds'], '.2f')} | {r['notes']} |")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "Not measured: " + "; ".join(f"{r['provider']} t=({r['t1']:g},{r['t2']:g}): {r['status']}"
                                                  for r in failed)]
    return lines + [""]


if __name__ == "__main__":  # the fresh process of one PyTorch measurement
    print(json.dumps(torch_child(json.loads(sys.argv[1]))))
