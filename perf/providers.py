"""Every implementation the harness compares, behind one small interface.

A provider says why it cannot run a cell (``skip_reason``) or builds a ``Runner``: one blocking-free
callable per direction taking the index of a rotating input set, an accuracy probe, and notes.
Directions: "fwd" (loss only, no autograd graph), "fwdbwd" (loss and dL/dlogits), "bwd" (only the
backward of a forward that was run beforehand, for providers with a separate backward).
Every loss is reduced with a sum (torch) or summed per-example losses (JAX), so the upstream
gradient is 1.0 for all of them.

Temperatures are passed the way users pass them: JAX providers take them as traced arguments of
``jit(value_and_grad(loss))`` (a temperature schedule never recompiles), except the ``-const``
variant, which closes over Python floats; PyTorch providers take Python floats, or 0-d tensors
for the ``-tensor-t`` variant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import numpy as np
import torch

from . import naive_port
from .model import Cell

DIRECTIONS = ("fwd", "bwd", "fwdbwd")


@dataclasses.dataclass
class Inputs:
    """Rotating input sets of one cell (torch tensors on the benchmark device)."""

    cell: Cell
    device: torch.device
    logits: list[torch.Tensor]      # [N, C] in the cell's dtype
    labels: list[torch.Tensor]      # int64 [N] or dense [N, C] in the cell's dtype
    acc_rows: int                   # rows of set 0 used for accuracy (rows are independent)

    @functools.cached_property
    def dense_fp32(self) -> list[torch.Tensor]:
        """Dense fp32 labels (one-hot for class indices): for the original JAX code."""
        out = []
        for y in self.labels:
            if y.dtype.is_floating_point:
                out.append(y.float())
            else:
                out.append(torch.nn.functional.one_hot(y, self.cell.c).float())
        return out


@dataclasses.dataclass
class Runner:
    calls: dict[str, Callable[[int], Any]]       # direction -> call(set index); see measure
    evaluate: Callable[[int], tuple[np.ndarray, float | None]]  # rows R of set 0 -> (losses, |sum p - 1|)
    output_bytes: dict[str, int]                 # bytes a call returns (for peak extra memory)
    blocking: bool = False                       # calls block until done (JAX); torch ones do not
    memory: dict[str, tuple[float, str]] = dataclasses.field(default_factory=dict)  # precomputed
    notes: str = ""
    config: str = ""
    # entered around every timed region: torch.compile providers forbid recompiling there
    timed_region: Callable[[], Any] = contextlib.nullcontext
    # JAX: direction -> the compiled executable that is timed, and its temperature arguments
    executables: dict[str, Any] = dataclasses.field(default_factory=dict)
    temperatures: tuple = ()


class Provider:
    name = ""
    framework = "torch"
    solver = "converged"
    ce_only = False          # a cross-entropy: only cells with t1 = t2 = 1
    smoke_default = True     # part of --smoke runs unless asked for explicitly
    run_default = True       # part of runs that name no providers (False: an opt-in variant)

    def skip_reason(self, cell: Cell, device: torch.device) -> str | None:
        return None

    def build(self, inputs: Inputs, directions: tuple[str, ...]) -> Runner:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _rows64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _residual(p) -> float:
    """max |sum_i p_i - 1| over rows, summed in float64."""
    return float(np.abs(_rows64(p).sum(-1) - 1.0).max())


def _grad_bytes(inputs: Inputs) -> int:
    return inputs.logits[0].numel() * inputs.logits[0].element_size()


def torch_autograd_runner(loss_fn, rows_fn, probs_fn, inputs: Inputs, directions, **extra) -> Runner:
    """Runner for a torch loss differentiated by autograd.

    ``loss_fn(x, y)`` -> scalar (sum) loss; ``rows_fn(x, y)`` -> per-row losses;
    ``probs_fn(x)`` -> the probabilities the loss uses, or None.
    """
    xs, ys = inputs.logits, inputs.labels
    leaves = [x.detach().requires_grad_(True) for x in xs]  # same storage, autograd leaves
    graphs: list[torch.Tensor] = []

    def fwd(i):
        with torch.no_grad():
            return loss_fn(xs[i], ys[i])

    def fwdbwd(i):
        loss = loss_fn(leaves[i], ys[i])
        return torch.autograd.grad(loss, leaves[i])[0]

    def bwd(i):
        if not graphs:
            graphs.extend(loss_fn(leaf, y) for leaf, y in zip(leaves, ys))
        return torch.autograd.grad(graphs[i], leaves[i], retain_graph=True)[0]

    def evaluate(num_rows):
        x, y = xs[0][:num_rows], ys[0][:num_rows]
        with torch.no_grad():
            rows = _rows64(rows_fn(x, y))
            p = probs_fn(x) if probs_fn is not None else None
        return rows, (None if p is None else _residual(p))

    calls = {"fwd": fwd, "fwdbwd": fwdbwd, "bwd": bwd}
    return Runner({d: calls[d] for d in directions}, evaluate,
                  {"fwd": 4, "fwdbwd": _grad_bytes(inputs), "bwd": _grad_bytes(inputs)}, **extra)


# --------------------------------------------------------------------------------------------
# bitempered, PyTorch
# --------------------------------------------------------------------------------------------

class BitemperedTorch(Provider):
    """The public API: ``bitempered.torch.bi_tempered_logistic_loss(..., backend=...)``, with the
    temperatures as Python floats, or as 0-d tensors (``tensor_temperatures``: how a schedule
    held in a tensor passes them)."""

    def __init__(self, backend: str, tensor_temperatures: bool = False, cpu_kernel: bool = True,
                 weighted: bool = False):
        self.backend = backend
        self.tensor_temperatures = tensor_temperatures
        self.cpu_kernel = cpu_kernel  # False: the eager torch ops the C kernel replaces
        self.weighted = weighted  # per-class weight= and per-row sample_weight= (class indices)
        self.name = f"bitempered-{backend}" if backend == "triton" else "bitempered-torch"
        if tensor_temperatures:
            self.name += "-tensor-t"
        if not cpu_kernel:
            self.name += "-eager"
            self.smoke_default = False
        if weighted:
            self.name += "-weighted"
            self.smoke_default = self.run_default = False

    def skip_reason(self, cell, device):
        where_it_differs = device.type == "cpu" and (cell.t1, cell.t2, cell.labels, cell.dtype) == (1, 1, "dense", "fp32")
        if not self.cpu_kernel and not where_it_differs:
            return ("the C kernel's eager fallback: it differs from bitempered-torch only on CPU at t1 = t2 = 1 "
                    "with fp32 dense labels")
        if self.weighted and cell.labels != "int":
            return "per-class weights need class indices"
        if self.backend == "triton":
            if device.type != "cuda":
                return "needs a CUDA GPU (on CPU Triton would run its slow interpreter)"
            try:
                import triton  # noqa: F401
            except ImportError:
                return "triton is not installed"
        return None

    def build(self, inputs, directions):
        from bitempered import torch as bt

        cell = inputs.cell
        t1, t2 = cell.t1, cell.t2
        if self.tensor_temperatures:  # 0-d tensors on the logits' device
            t1, t2 = (torch.tensor(t, dtype=torch.float32, device=inputs.device) for t in (t1, t2))
        plain = functools.partial(bt.bi_tempered_logistic_loss, t1=t1, t2=t2, backend=self.backend)
        loss = plain
        if self.weighted:  # deterministic positive weights on the logits' device (rows: as many as x has)
            weight = torch.linspace(0.5, 2.0, cell.c, device=inputs.device)
            sample_weight = torch.linspace(0.25, 1.0, cell.n, device=inputs.device)
            loss = lambda x, y, **kw: plain(x, y, weight=weight, sample_weight=sample_weight[:x.shape[0]], **kw)  # noqa: E731
        probs = functools.partial(bt.tempered_softmax, t=t2, backend=self.backend)
        # (the accuracy check compares the unweighted rows: the reference knows no weights)
        runner = torch_autograd_runner(
            lambda x, y: loss(x, y, reduction="sum"), lambda x, y: plain(x, y, reduction="none"),
            lambda x: probs(x.float()), inputs, directions)
        if not self.cpu_kernel:
            from bitempered.bindings.torch.native import cpu_kernel as cpu_kernels

            runner.calls = {d: _inside(cpu_kernels.switched_off, call) for d, call in runner.calls.items()}
            runner.evaluate = _inside(cpu_kernels.switched_off, runner.evaluate)
        # The gradient is computed in the forward and the eager backward scales it in place; "bwd"
        # alone backpropagates a retained graph, which multiplies out of place instead (another N x C
        # buffer): it would time a different backward than a training step's, so it is reported as n/a.
        runner.calls.pop("bwd", None)
        if self.backend == "triton":
            runner.config = triton_config(cell)
        return runner


def _inside(context, call):
    def wrapped(*args):
        with context():
            return call(*args)
    return wrapped


def triton_config(cell: Cell) -> str:
    """The kernel configuration chosen for this cell: an autotune hook if the kernels expose one,
    else the launch heuristic's choice (``kernels/launch_config.row_config``)."""
    from bitempered.kernels import launch_config

    for hook in ("chosen_config", "autotune_report", "best_config"):
        fn = getattr(launch_config, hook, None)
        if callable(fn):
            try:
                return str(fn(cell.c, cell.elem_bytes))
            except Exception as err:  # noqa: BLE001 - a report, never fatal
                return f"{hook} failed: {err}"
    cfg = launch_config.row_config(cell.c, cell.elem_bytes)
    return (f"{cfg.path} block_rows={cfg.block_rows} block_cols={cfg.block_cols} "
            f"num_warps={cfg.num_warps} (heuristic, no autotuning)")


def native_math(a, labels, t1, t2, need_grad: bool):
    """bitempered's native math, straight from bindings/torch/native/math (the public API is an opaque
    custom op, so this is what torch.compile can see): (summed loss, gradient in a's dtype)."""
    from bitempered.bindings.torch.native import math as native

    a32 = a.float()
    log_p = native.tempered_log_softmax_rows(a32, t2, None)
    if labels.dtype.is_floating_point:
        y = labels.float()
    else:
        y, _kept = native.dense_labels_from_indices(labels, a.shape[-1], torch.float32, -100)
    loss, grad = native.loss_and_grad_rows(log_p, y, t1, t2, need_grad)
    if need_grad:
        return loss.sum(), grad.to(a.dtype)
    return loss.sum()


def _raise_dynamo_limits() -> None:
    """Every shape/dtype/labels cell recompiles the same code objects: keep them all cached.
    Also quiets dynamo's per-compile graph-break warnings (the break is documented in the notes)."""
    import logging

    import torch._dynamo

    torch._logging.set_logs(dynamo=logging.ERROR)

    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))


STEADY_STATE_NOTE = ("compiled for the cell's static shape (dynamic=False), warmed up on every input set; "
                     "a recompile while timing is an error (fail_on_recompile)")


def compiled_steady_state(runner: Runner, n_sets: int) -> Runner:
    """Runs every call on every input set twice (compiling whatever the data needs: the solver's
    pass count differs between sets), then forbids recompiling in the timed region, so what is
    timed is the compiled steady state, never a compilation."""
    for _ in range(2):
        for call in runner.calls.values():
            for i in range(n_sets):
                call(i)
    runner.timed_region = lambda: torch.compiler.set_stance("fail_on_recompile")
    return runner


class CompiledNative(Provider):
    """``torch.compile`` of the native math; its gradient is the closed form computed in the same
    compiled forward (no separate backward). The solver's convergence test (``bool(done.all())``)
    is a graph break: dynamo compiles the pieces between the breaks. ``compile_backend`` other
    than inductor is for tests (dynamo's guards, hence its recompiles, are the same)."""

    name = "torch-compile-native"
    smoke_default = False

    def __init__(self, compile_backend: str = "inductor"):
        self.compile_backend = compile_backend

    def build(self, inputs, directions):
        _raise_dynamo_limits()
        from bitempered.bindings.torch.native import math as native

        cell, device = inputs.cell, inputs.device
        t1 = torch.tensor(cell.t1, dtype=torch.float32, device=device)
        t2 = torch.tensor(cell.t2, dtype=torch.float32, device=device)
        compiled = {need: torch.compile(functools.partial(native_math, need_grad=need), dynamic=False,
                                        backend=self.compile_backend)
                    for need in (False, True)}
        xs, ys = inputs.logits, inputs.labels
        calls = {"fwd": lambda i: compiled[False](xs[i], ys[i], t1, t2),
                 "fwdbwd": lambda i: compiled[True](xs[i], ys[i], t1, t2)}

        def evaluate(num_rows):  # eager run of the same math (no recompile for the subset shape)
            x, y = xs[0][:num_rows], ys[0][:num_rows]
            with torch.no_grad():
                log_p = native.tempered_log_softmax_rows(x.float(), t2, None)
                dense = y.float() if y.dtype.is_floating_point else \
                    native.dense_labels_from_indices(y, cell.c, torch.float32, -100)[0]
                rows, _ = native.loss_and_grad_rows(log_p, dense, t1, t2, False)
            return _rows64(rows), _residual(log_p.exp())

        runner = Runner({d: calls[d] for d in directions if d in calls}, evaluate,
                        {"fwd": 4, "fwdbwd": _grad_bytes(inputs)},
                        notes=STEADY_STATE_NOTE + "; graph break at the solver's convergence test; "
                              "accuracy from the eager run of the same math")
        return compiled_steady_state(runner, len(xs))


class NaivePort(Provider):
    name = "naive-port"
    solver = "original-5"

    def build(self, inputs, directions):
        cell = inputs.cell
        loss = functools.partial(naive_port.bi_tempered_logistic_loss, t1=cell.t1, t2=cell.t2)
        return torch_autograd_runner(
            lambda x, y: loss(x, y, reduction="sum"), lambda x, y: loss(x, y, reduction="none"),
            lambda x: naive_port.tempered_softmax(x, cell.t2), inputs, directions,
            notes="eager, input dtype, 5 iterations, autograd")


# --------------------------------------------------------------------------------------------
# Cross-entropy baselines (t1 = t2 = 1 only)
# --------------------------------------------------------------------------------------------

def _entropy_term(y: torch.Tensor, c: int) -> torch.Tensor:
    """sum y log y per row (0 for one-hot rows): CE + this = KL, the bi-tempered loss at t = 1."""
    if not y.dtype.is_floating_point:
        return torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    y64 = y.double()
    return torch.where(y64 > 0, y64 * torch.log(torch.where(y64 > 0, y64, 1.0)), 0.0).sum(-1)


class TorchCE(Provider):
    ce_only = True

    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.name = "torch-compile-ce" if compiled else "torch-ce"
        self.smoke_default = not compiled
        self.solver = "exact (logsumexp)"

    def build(self, inputs, directions):
        ce = torch.nn.functional.cross_entropy
        loss = functools.partial(ce, reduction="sum")
        if self.compiled:
            _raise_dynamo_limits()
            loss = torch.compile(loss, dynamic=False)
        c = inputs.cell.c
        notes = ["class indices" if inputs.cell.labels == "int" else
                 "dense probability targets; accuracy adds sum y log y (not timed)"]
        runner = torch_autograd_runner(
            loss, lambda x, y: ce(x, y, reduction="none").double() + _entropy_term(y, c),
            lambda x: torch.softmax(x.float(), -1), inputs, directions)
        if self.compiled:
            notes.append(STEADY_STATE_NOTE)
            compiled_steady_state(runner, len(inputs.logits))
        runner.notes = "; ".join(notes)
        return runner


class LigerCE(Provider):
    name = "liger-ce"
    ce_only = True
    solver = "exact (logsumexp)"

    def skip_reason(self, cell, device):
        if device.type != "cuda":
            return "GPU only (Triton kernels)"
        if cell.labels != "int":
            return "Liger's cross-entropy takes class indices only"
        try:
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss  # noqa: F401
        except ImportError as err:
            return f"liger-kernel is not installed ({err})"
        return None

    def build(self, inputs, directions):
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        # Liger writes the gradient into its input in place: give it its own copies.
        own = dataclasses.replace(inputs, logits=[x.clone() for x in inputs.logits])
        sum_loss = LigerCrossEntropyLoss(reduction="sum")
        ce = torch.nn.functional.cross_entropy
        try:  # per-row losses of Liger itself where its version has reduction="none"
            row_loss = LigerCrossEntropyLoss(reduction="none")
            row_loss(own.logits[0][:2].clone(), own.labels[0][:2])
            rows_fn, note = (lambda x, y: row_loss(x.clone(), y)), ""
        except Exception:  # noqa: BLE001
            rows_fn, note = (lambda x, y: ce(x.float(), y, reduction="none")), "; accuracy from torch CE"
        return torch_autograd_runner(sum_loss, rows_fn, None, own, directions,
                                     notes="writes the gradient into its input (given copies)" + note)


# --------------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------------

def _jax_platform_mismatch(device: torch.device) -> str | None:
    try:
        import jax
    except ImportError as err:
        return f"jax is not installed ({err})"
    platform = jax.default_backend()
    wanted = "cpu" if device.type == "cpu" else "gpu"
    if (platform == "cpu") != (wanted == "cpu"):
        return f"JAX runs on {platform} but the benchmark device is {device.type}"
    return None


def _to_jax(t: torch.Tensor):
    import jax

    return jax.dlpack.from_dlpack(t.contiguous())


def jax_runner(rows_fn, inputs: Inputs, labels, directions, probs_fn=None, temperatures=(), **extra) -> Runner:
    """Runner for a JAX loss: ``rows_fn(a, y, *temperatures)`` -> per-example losses (jit-able).

    fwd = jit(rows_fn); fwdbwd = jit(value_and_grad(sum rows_fn)), a training step; bwd = jit of
    the VJP closure of a jitted jax.vjp run beforehand. ``temperatures`` are passed as arguments
    of every program, so they are traced (one program for every value); with () the loss closes
    over its temperatures. Each program is compiled ahead of time once (``lower().compile()``)
    and that executable is timed; XLA's memory analysis of it gives the temporary buffer size
    (the "peak extra memory" of a JAX provider).
    """
    import jax
    import jax.numpy as jnp

    xs = [_to_jax(x) for x in inputs.logits]
    ys = [_to_jax(y) for y in labels]
    temps = tuple(jnp.asarray(t, jnp.float32) for t in temperatures)

    def total(a, y, *t):
        return rows_fn(a, y, *t).sum()

    jitted = {"fwd": jax.jit(rows_fn), "fwdbwd": jax.jit(jax.value_and_grad(total))}
    calls, memory, executables = {}, {}, {}
    for direction in directions:
        if direction == "bwd":
            forward = jax.jit(lambda a, y, *t: jax.vjp(lambda a_: total(a_, y, *t), a))
            pulls = [forward(x, y, *temps)[1] for x, y in zip(xs, ys)]
            one = jnp.ones((), jnp.float32)
            exe = jax.jit(lambda pull, g: pull(g)[0]).lower(pulls[0], one).compile()
            calls["bwd"] = (lambda exe_, pulls_: lambda i: exe_(pulls_[i], one).block_until_ready())(exe, pulls)
        else:
            exe = jitted[direction].lower(xs[0], ys[0], *temps).compile()
            calls[direction] = (lambda exe_: lambda i: jax.block_until_ready(exe_(xs[i], ys[i], *temps)))(exe)
        executables[direction] = exe
        analysis = exe.memory_analysis()
        if analysis is not None:
            memory[direction] = (float(analysis.temp_size_in_bytes), "xla-temp")

    def evaluate(num_rows):
        a, yy = xs[0][:num_rows], ys[0][:num_rows]
        rows = _rows64(np.asarray(jitted["fwd"](a, yy, *temps)))
        p = probs_fn(a, *temps) if probs_fn is not None else None
        return rows, (None if p is None else _residual(np.asarray(p)))

    return Runner(calls, evaluate, {"fwd": 4, "fwdbwd": _grad_bytes(inputs), "bwd": _grad_bytes(inputs)},
                  blocking=True, memory=memory, executables=executables, temperatures=temps, **extra)


def _jax_labels(inputs: Inputs) -> list[torch.Tensor]:
    """int32 class indices (JAX's default integer width) or the dense labels as they are."""
    return [y.to(torch.int32) if not y.dtype.is_floating_point else y for y in inputs.labels]


class BitemperedJax(Provider):
    """``jit(value_and_grad(loss))`` with the temperatures as traced arguments (the README's
    training step); ``closed_over=True`` bakes them in as Python constants instead (``-const``)."""

    framework = "jax"

    def __init__(self, backend: str, closed_over: bool = False):
        self.backend = backend
        self.closed_over = closed_over
        self.name = f"bitempered-jax-{backend}" + ("-const" if closed_over else "")

    def skip_reason(self, cell, device):
        if self.backend == "triton":
            if device.type != "cuda":
                return "needs a CUDA GPU (jax-triton)"
            try:
                import jax_triton  # noqa: F401
            except Exception as err:  # noqa: BLE001 - ImportError, or a CPU-only jaxlib inside it
                return f"jax-triton does not import ({type(err).__name__}: {err})"
        mismatch = _jax_platform_mismatch(device)
        if mismatch:
            return mismatch
        try:
            import bitempered.jax  # noqa: F401
        except Exception as err:  # noqa: BLE001 - being written concurrently; skip, never crash
            return f"bitempered.jax does not import: {type(err).__name__}: {err}"
        return None

    def build(self, inputs, directions):
        import jax.numpy as jnp

        import bitempered.jax as bj

        cell = inputs.cell
        loss = functools.partial(bj.bi_tempered_logistic_loss, backend=self.backend)
        softmax = functools.partial(bj.tempered_softmax, backend=self.backend)
        notes = ["int32 class indices"] if cell.labels == "int" else []
        if self.closed_over:
            notes.append("temperatures closed over as Python constants")
            return jax_runner(lambda a, y: loss(a, y, cell.t1, cell.t2), inputs, _jax_labels(inputs), directions,
                              lambda a: softmax(a.astype(jnp.float32), cell.t2), notes="; ".join(notes))
        notes.append("temperatures traced")
        return jax_runner(loss, inputs, _jax_labels(inputs), directions,
                          lambda a, t1, t2: softmax(a.astype(jnp.float32), t2),
                          temperatures=(cell.t1, cell.t2), notes="; ".join(notes))


class OriginalJax(Provider):
    """Google's jax-bitempered-loss 0.0.2 (num_iters=5) under jit(value_and_grad), temperatures
    traced (its functions take them as traced values; its own benchmark passed them that way)."""

    name = "original-jax"
    framework = "jax"
    solver = "original-5"

    def skip_reason(self, cell, device):
        mismatch = _jax_platform_mismatch(device)
        if mismatch:
            return mismatch
        try:
            import jax_bitempered_loss.loss  # noqa: F401
        except ImportError as err:
            return f"jax-bitempered-loss is not installed ({err})"
        return None

    def build(self, inputs, directions):
        from jax_bitempered_loss import loss as original

        cell = inputs.cell

        # The original fails on bf16 logits (its lax.cond branches disagree on the dtype): a user
        # has to upcast, so the cast is done inside the jitted program (bf16 is still what is read).
        upcast = cell.dtype != "fp32"

        def rows(a, y, t1, t2):
            return original.bi_tempered_logistic_loss(a.astype("float32") if upcast else a, y, t1, t2)

        def probs(a, t1, t2):
            return original.tempered_softmax(a.astype("float32") if upcast else a, t2, 5)

        note = "temperatures traced; fp32 dense labels (one-hot built outside the timing; it takes no class indices)"
        if upcast:
            note += "; bf16 logits cast to fp32 inside the jit (it fails on bf16)"
        return jax_runner(rows, inputs, inputs.dense_fp32, directions, probs, temperatures=(cell.t1, cell.t2),
                          notes=note)


class OptaxCE(Provider):
    """optax's cross-entropy under jit(value_and_grad): ``softmax_cross_entropy_with_integer_labels``
    for class indices, ``softmax_cross_entropy`` for dense labels."""

    name = "optax-ce"
    framework = "jax"
    ce_only = True
    solver = "exact (logsumexp)"

    def skip_reason(self, cell, device):
        mismatch = _jax_platform_mismatch(device)
        if mismatch:
            return mismatch
        try:
            import optax  # noqa: F401
        except ImportError as err:
            return f"optax is not installed ({err})"
        return None

    def build(self, inputs, directions):
        import jax
        import jax.numpy as jnp
        import optax

        dense = inputs.cell.labels == "dense"
        ce = optax.softmax_cross_entropy if dense else optax.softmax_cross_entropy_with_integer_labels
        runner = jax_runner(ce, inputs, _jax_labels(inputs), directions,
                            lambda a: jax.nn.softmax(a.astype(jnp.float32), axis=-1),
                            notes="softmax_cross_entropy (dense labels); accuracy adds sum y log y (not timed)"
                            if dense else "softmax_cross_entropy_with_integer_labels (int32 class indices)")
        plain = runner.evaluate
        entropy = _entropy_term(inputs.labels[0], inputs.cell.c).cpu().numpy()

        def evaluate(num_rows):  # CE + sum y log y = KL, the bi-tempered loss at t1 = t2 = 1
            rows, residual = plain(num_rows)
            return rows + entropy[:num_rows], residual

        runner.evaluate = evaluate
        return runner


def all_providers() -> list[Provider]:
    return [BitemperedTorch("triton"), BitemperedTorch("torch"), BitemperedTorch("torch", tensor_temperatures=True),
            BitemperedTorch("torch", cpu_kernel=False), BitemperedTorch("torch", weighted=True),
            BitemperedTorch("triton", weighted=True),
            CompiledNative(), BitemperedJax("xla"), BitemperedJax("xla", closed_over=True), BitemperedJax("triton"),
            NaivePort(), OriginalJax(), TorchCE(False), TorchCE(True), LigerCE(), OptaxCE()]
