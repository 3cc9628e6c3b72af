"""Every shipped launch configuration compiles for sm_90 and sm_80 with zero register spills.

No GPU needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the
whole NVIDIA pipeline down to a cubin with Triton's bundled ptxas, and the bundled cuobjdump
reports registers, stack frame and local memory of the cubin Triton produced (spills live in the
stack frame / local memory). The compile runs in a subprocess with a clean environment, because
TRITON_INTERPRET (set by tests/conftest.py on CPU machines) replaces compilation by the
interpreter. Skips with the reason when Triton's CUDA backend, ptxas or cuobjdump is missing.

Run this file as a script (``python tests/test_triton_compile.py 90``) to print the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ARCHS = (90, 80)
SKIP = "SKIP:"


# ------------------------------------------------------------------------------------------------
# Worker (runs in the clean subprocess)
# ------------------------------------------------------------------------------------------------

def _jobs():
    """(label, kernel, pointer dtypes, constexprs, launch config) to compile.

    Every shipped row config: the loss kernel in its default variant (fp32, dense labels,
    converged solver, gradient on) and the softmax backward kernel. On the configs at the edges
    (most rows per program, the largest narrow and the wide on-chip tiles, chunked) also the other
    loss variants (16-bit logits; class indices with the original algorithm; temperature
    gradients) and the softmax forward kernel, whose code is a subset of the loss kernel's on the
    same config. A wide tile gets only the loss variants launched on it (class indices without
    temperature gradients: ``launch_config.fit_loss_variant``). The binary config: all four kernels.
    The vocab-parallel kernels (launched with the loss kernel's config) on the edge configs: the
    max and sum-exp (t = 1), the partial sums with the support count, the epilogue sums and the
    gradient (16-bit logits, class indices / fp32 logits, dense labels). The third element maps pointer arguments to their
    types (default *fp32; every other argument is an i32).
    """
    from bitempered.kernels import launch_config as lc
    from bitempered.kernels.binary import (
        tempered_binary_loss_kernel, tempered_sigmoid_bwd_kernel, tempered_sigmoid_fwd_kernel,
    )
    from bitempered.kernels.loss import tempered_loss_kernel
    from bitempered.kernels.softmax import tempered_softmax_bwd_kernel, tempered_softmax_fwd_kernel
    from bitempered.kernels.vocab_parallel import (
        epilogue_sums_kernel, gradient_kernel, max_sumexp_kernel, partial_sums_kernel,
    )

    configs = lc.shipped_row_configs()
    on_chip = [c for c in configs if not c.chunked]
    narrow = [c for c in on_chip if not lc.is_wide(c)]
    edges = {on_chip[0], narrow[-1], on_chip[-1]} | {c for c in configs if c.chunked}
    jobs = []
    # rows [N, C]: the runtime specializes the unit class strides (an int argument equal to 1 is a
    # constant in Triton's launches), so these compiles do too
    unit_class = dict(stride_logits_class=1, stride_grad_class=1)
    for cfg in configs:
        blocks = dict(CHUNKED=cfg.chunked, BLOCK_ROWS=cfg.block_rows, BLOCK_COLS=cfg.block_cols)
        name = f"{cfg.path}[{cfg.block_rows}x{cfg.block_cols}]"
        # (logits, labels, INDICES, ORIGINAL, NEED_TEMP_GRAD: the learnable-temperature variant)
        loss_variants = [("fp32", "*fp32", False, False, False)]
        if cfg in edges:
            loss_variants += [("bf16", "*bf16", False, False, False), ("bf16", "*i64", True, False, False),
                              ("fp16", "*i64", True, True, False), ("bf16", "*i64", True, False, True),
                              ("fp32", "*fp32", False, False, True)]
        if lc.is_wide(cfg):  # only the variants launched on it (``lc.fit_loss_variant``)
            loss_variants = [("fp32", "*i64", True, False, False)] + [
                v for v in loss_variants if v[2] and not v[4]]
        for dtype, labels, indices, original, temp_grad in loss_variants:
            jobs.append((f"loss {name} {dtype} {'indices' if indices else 'dense'}"
                         f"{' original' if original else ''}{' temp_grad' if temp_grad else ''}",
                         tempered_loss_kernel,
                         {"logits_ptr": "*" + dtype, "grad_ptr": "*" + dtype, "labels_ptr": labels},
                         dict(blocks, **unit_class, **({} if indices else {"stride_labels_class": 1}),
                              LABELS_ARE_INDICES=indices, NEED_GRAD=True, NEED_TEMP_GRAD=temp_grad,
                              ORIGINAL=original, MAX_PASSES=lc.MAX_PASSES), cfg))
        for original in (False, True) if cfg in edges else ():
            jobs.append((f"softmax_fwd {name}{' original' if original else ''}",
                         tempered_softmax_fwd_kernel, {},
                         dict(blocks, stride_logits_class=1, stride_probs_class=1, ORIGINAL=original,
                              MAX_PASSES=lc.MAX_PASSES), cfg))
        for temp_grad in (False, True) if cfg in edges else (False,):
            jobs.append((f"softmax_bwd {name}{' temp_grad' if temp_grad else ''}", tempered_softmax_bwd_kernel, {},
                         dict(blocks, stride_probs_class=1, stride_grad_class=1, stride_out_class=1,
                              NEED_TEMP_GRAD=temp_grad), cfg))
        if cfg in edges:
            tiles = dict(BLOCK_ROWS=cfg.block_rows, BLOCK_COLS=cfg.block_cols)
            jobs.append((f"vp_partial_sums {name} bf16", partial_sums_kernel, {"logits_ptr": "*bf16"},
                         dict(tiles, stride_logits_class=1, COUNT_SUPPORT=True), cfg))
            jobs.append((f"vp_max_sumexp {name} bf16", max_sumexp_kernel, {"logits_ptr": "*bf16"},
                         dict(tiles, stride_logits_class=1), cfg))
            for dtype, labels, indices in (("bf16", "*i64", True), ("fp32", "*fp32", False)):
                kind = "indices" if indices else "dense"
                types = {"logits_ptr": "*" + dtype, "labels_ptr": labels, "grad_ptr": "*" + dtype}
                unit = dict(stride_logits_class=1, **({} if indices else {"stride_labels_class": 1}))
                jobs.append((f"vp_epilogue {name} {dtype} {kind}", epilogue_sums_kernel, types,
                             dict(tiles, **unit, LABELS_ARE_INDICES=indices, NEED_TEMP_GRAD=False), cfg))
                # the temperature variant's own tile for this config's class counts
                temp = lc.temperature_sums_config(cfg.block_cols if not cfg.chunked else 1 << 20)
                jobs.append((f"vp_epilogue temp_grad [1x{temp.block_cols}] {dtype} {kind}", epilogue_sums_kernel,
                             types, dict(BLOCK_ROWS=1, BLOCK_COLS=temp.block_cols, **unit,
                                         LABELS_ARE_INDICES=indices, NEED_TEMP_GRAD=True), temp))
                jobs.append((f"vp_gradient {name} {dtype} {kind}", gradient_kernel, types,
                             dict(tiles, **unit, stride_grad_class=1, LABELS_ARE_INDICES=indices), cfg))
    # Strided classes (NCHW read in place): the runtime specializes the unit inner strides, as it
    # does the unit class strides of rows above (Triton makes an int argument equal to 1 a constant)
    unit_inner = dict(stride_logits_inner=1, stride_labels_inner=1, stride_grad_inner=1)
    for cfg in lc.shipped_strided_row_configs():
        blocks = dict(CHUNKED=cfg.chunked, BLOCK_ROWS=cfg.block_rows, BLOCK_COLS=cfg.block_cols)
        name = f"strided {cfg.path}[{cfg.block_rows}x{cfg.block_cols}]"
        for dtype, labels, indices in (("bf16", "*i64", True), ("fp32", "*fp32", False)):
            jobs.append((f"loss {name} {dtype} {'indices' if indices else 'dense'}", tempered_loss_kernel,
                         {"logits_ptr": "*" + dtype, "grad_ptr": "*" + dtype, "labels_ptr": labels},
                         dict(blocks, **unit_inner, LABELS_ARE_INDICES=indices, NEED_GRAD=True,
                              NEED_TEMP_GRAD=False, ORIGINAL=False, MAX_PASSES=lc.MAX_PASSES), cfg))
        jobs.append((f"softmax_fwd {name}", tempered_softmax_fwd_kernel, {},
                     dict(blocks, stride_logits_inner=1, stride_probs_inner=1, ORIGINAL=False,
                          MAX_PASSES=lc.MAX_PASSES), cfg))
        jobs.append((f"softmax_bwd {name}", tempered_softmax_bwd_kernel, {},
                     dict(blocks, stride_probs_inner=1, stride_grad_inner=1, stride_out_inner=1,
                          NEED_TEMP_GRAD=False), cfg))
    for cfg in lc.shipped_binary_configs():
        name = f"[{cfg.block}x2]"
        for original in (False, True):
            jobs.append((f"binary_loss {name}{' original' if original else ''}",
                         tempered_binary_loss_kernel, {},
                         dict(NEED_GRAD=True, ORIGINAL=original, BLOCK=cfg.block,
                              MAX_PASSES=lc.MAX_PASSES), cfg))
        jobs.append((f"sigmoid_fwd {name}", tempered_sigmoid_fwd_kernel, {},
                     dict(ORIGINAL=False, BLOCK=cfg.block, MAX_PASSES=lc.MAX_PASSES), cfg))
        jobs.append((f"sigmoid_bwd {name}", tempered_sigmoid_bwd_kernel, {}, dict(BLOCK=cfg.block),
                     cfg))
    return jobs


def _resources(cubin: bytes, cuobjdump: str) -> dict:
    import re
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    return {key: int(re.search(key + r":(\d+)", out).group(1)) for key in ("REG", "STACK", "LOCAL")}


def worker(arch: int) -> None:
    """Compiles every job for ``arch`` and prints one JSON list (or a SKIP line)."""
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(arch).path
        cuobjdump = knobs.nvidia.cuobjdump.path
    except Exception as exc:  # noqa: BLE001  (any failure here means: no CUDA backend)
        print(f"{SKIP} Triton's CUDA backend is unavailable: {exc!r}")
        return
    for tool in (ptxas, cuobjdump):
        if not tool or not os.access(tool, os.X_OK):
            print(f"{SKIP} {tool!r} is not an executable")
            return

    results = []
    for label, kernel, types, constexprs, cfg in _jobs():
        signature, attrs = {}, {}
        for i, arg in enumerate(kernel.arg_names):
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = types.get(arg, "*fp32")
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            else:
                signature[arg] = "i32"
        start = time.perf_counter()
        src = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg.num_warps, "maxnreg": cfg.maxnreg})
        results.append(dict(label=label, arch=arch, num_warps=cfg.num_warps,
                            seconds=round(time.perf_counter() - start, 2),
                            **_resources(compiled.asm["cubin"], cuobjdump)))
    print(json.dumps(results))


# ------------------------------------------------------------------------------------------------
# Test
# ------------------------------------------------------------------------------------------------

def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of Triton <= 3.9, stated
    return env


def test_every_shipped_config_compiles_without_spills():
    pytest.importorskip("triton")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(arch)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_clean_env(), cwd=os.path.dirname(os.path.dirname(__file__)))
             for arch in ARCHS]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        last = out.strip().splitlines()[-1] if out.strip() else ""
        if last.startswith(SKIP):
            pytest.skip(last[len(SKIP):].strip())
        assert proc.returncode == 0, err[-4000:]
        results += json.loads(last)
    print()
    print(f"{'kernel / config':50s} {'arch':>4s} {'warps':>5s} {'regs':>4s} {'stack':>5s} "
          f"{'local':>5s} {'compile_s':>9s}")
    for r in results:
        print(f"{r['label']:50s} {r['arch']:4d} {r['num_warps']:5d} {r['REG']:4d} {r['STACK']:5d} "
              f"{r['LOCAL']:5d} {r['seconds']:9.2f}")
    spilled = [r for r in results if r["STACK"] or r["LOCAL"]]
    assert not spilled, spilled
    assert {r["arch"] for r in results} == set(ARCHS)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    for a in sys.argv[1:] or ["90"]:
        worker(int(a))
