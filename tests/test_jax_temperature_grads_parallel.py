"""Learnable temperatures in the JAX vocab-parallel loss and softmax (issue 22) on 4 host devices:
the classes sharded over a mesh axis of 4 (1-D mesh) or 2 (a 2 x 2 ("data", "model") mesh, the
rows and per-row temperatures sharded over "data"). The gradients of the logits, t1 and t2 (0-d
or one per row) equal the plain loss's on the whole logits: float64 on the XLA path (to rounding),
float32 on the vocab-parallel Triton kernels (through the interpreter stand-in of
tests/test_jax_triton.py; skipped where it is off, i.e. a GPU run) against the float64 values; the
kernels' temperature variant adds no collective; every reduction, weights, dense labels.

The cases run in one subprocess with 4 fake devices (``multidevice.py``), bounded in time.
"""

import os
import re

import numpy as np
import pytest

from multidevice import case, main, run_cases

NUM_DEVICES = 4
CASES = {}
register = case(CASES)

C_LOCAL = 3
ROWS = 6
TEMPERATURES = [(0.8, 1.2), (0.5, 0.7), (1.0, 1.0)]
TOLERANCES = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=3e-5, atol=3e-6)}


def _mesh(shape, names):
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()).reshape(shape), names)


def _logits(num_classes, seed=0):
    """Normal rows; the first with a dominant class (classes outside the support for t2 < 1)."""
    a = np.random.default_rng(seed).standard_normal((ROWS, num_classes)) * 2.0
    a[0, 0] = 12.0
    return a


def _labels(kind, num_classes, seed=1):
    """Class indices (one ignored row; the dominant row's target is its top class: inside the
    support), or dense labels of rows summing to 1."""
    if kind == "indices":
        indices = np.arange(ROWS, dtype=np.int32) * 5 % num_classes
        indices[0], indices[3] = 0, -100
        return indices
    weights = np.random.default_rng(seed).exponential(size=(ROWS, num_classes))
    weights[0, 1:] = 0.0  # the dominant row: no label outside the support
    return weights / weights.sum(-1, keepdims=True)


def _per_row(seed=2):
    """(t1, t2) one per row, t1 < 1 where t2 < 1 (a smoothed label outside the support: +inf)."""
    rng = np.random.default_rng(seed)
    t2 = rng.choice([0.7, 1.0, 1.5, 2.0], ROWS)
    t1 = np.where(t2 < 1, rng.choice([0.5, 0.8], ROWS), rng.choice([0.5, 0.8, 1.0], ROWS))
    return t1, t2


def _close(got, want, dtype_name, where):
    for g, w, name in zip(got, want, ("logits", "t1", "t2")):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, f"{where}: {name} {g.shape} != {w.shape}"
        tolerance = dict(TOLERANCES[dtype_name])
        tolerance["atol"] *= max(np.abs(w).max(), 1.0)  # a row's derivative can be a small difference
        np.testing.assert_allclose(g, w, err_msg=f"{where}: {name}", **tolerance)


def _gradients(loss_fn, reduction, options):
    """jit(gradients of (logits, t1, t2)) of sum(cotangent * loss) for a loss_fn(a, y, t1, t2,
    reduction=, **options)."""
    import jax
    import jax.numpy as jnp

    def total(a, y, t1, t2, cotangent):
        return jnp.sum(cotangent * loss_fn(a, y, t1, t2, reduction=reduction, **options))

    return jax.jit(jax.grad(total, argnums=(0, 2, 3)))


def _compare(mesh, logits_spec, rows_spec, kinds, temperatures, backend="xla", dtype_name="float64",
             reductions=("none", "sum", "mean"), weighted=True):
    """The sharded loss's gradients (``backend``, logits in ``dtype_name``) against the plain float64
    XLA loss's on the whole logits; temperatures: (t1, t2) pairs of numbers or per-row arrays
    (sharded as ``rows_spec``)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import bitempered.jax as bj

    num_classes = C_LOCAL * mesh.shape["model"]
    logits64 = _logits(num_classes)
    logits = jnp.asarray(logits64, dtype_name)
    cotangent = np.random.default_rng(3).standard_normal(ROWS)
    weights = {"weight": np.linspace(0.5, 2.0, num_classes), "sample_weight": np.linspace(1.5, 0.2, ROWS)}
    for kind in kinds:
        labels = _labels(kind, num_classes)
        labels_spec = logits_spec if kind == "dense" else rows_spec
        for reduction in reductions:
            options = dict(label_smoothing=0.1)
            if weighted and reduction == "mean":
                options["sample_weight"] = weights["sample_weight"]
                if kind == "indices":
                    options["weight"] = weights["weight"]

            def sharded(a, y, t1, t2, reduction, **options):
                sample_weight = options.pop("sample_weight", None)
                per_row_specs = (logits_spec, labels_spec) + tuple(
                    None if value is None else rows_spec if jnp.ndim(value) else P()
                    for value in (t1, t2, sample_weight))

                def local(a, y, t1, t2, sample_weight):
                    return bj.vocab_parallel_bi_tempered_logistic_loss(
                        a, y, t1, t2, "model", backend=backend, reduction=reduction, sample_weight=sample_weight,
                        **options)
                out_spec = rows_spec if reduction == "none" else P()
                if reduction != "none" and "data" in mesh.shape:  # reduced per data shard: sum the shards
                    return jnp.sum(jax.shard_map(
                        lambda *args: local(*args)[None], mesh=mesh, in_specs=per_row_specs,
                        out_specs=P("data"))(a, y, t1, t2, sample_weight))
                return jax.shard_map(local, mesh=mesh, in_specs=per_row_specs, out_specs=out_spec)(
                    a, y, t1, t2, sample_weight)

            def plain(a, y, t1, t2, reduction, **options):
                return bj.bi_tempered_logistic_loss(a, y, t1, t2, reduction=reduction, backend="xla", **options)

            parallel_grads = _gradients(sharded, reduction, options)
            plain_grads = _gradients(plain, reduction, options)
            for t1, t2 in temperatures:
                if "data" in mesh.shape and reduction == "mean":
                    continue  # a mean per data shard is not the whole mean
                t1_, t2_ = (np.broadcast_to(np.asarray(t, np.float64), (ROWS,)) for t in (t1, t2))
                rows_t = (t1_, t2_) if np.ndim(t1) else (np.float64(t1), np.float64(t2))
                want = plain_grads(logits64, labels, *rows_t, cotangent)
                compute = jnp.dtype(dtype_name)
                got = parallel_grads(logits, jnp.asarray(labels, compute if kind == "dense" else jnp.int32),
                                     *(jnp.asarray(t, compute) for t in rows_t), cotangent.astype(compute))
                where = f"{backend} {dtype_name} {kind} {reduction} t1={t1} t2={t2}"
                _close(got, want, dtype_name, where)


@register
def xla_scalar_and_per_row_temperatures_on_4_devices():
    import jax
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    mesh = _mesh((4,), ("model",))
    _compare(mesh, P(None, "model"), P(), ("indices", "dense"), TEMPERATURES + [_per_row()])


@register
def xla_per_row_temperatures_on_a_2d_mesh():
    """The rows (and their temperatures) sharded over "data", the classes over "model" (2 each)."""
    import jax
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    mesh = _mesh((2, 2), ("data", "model"))
    _compare(mesh, P("data", "model"), P("data"), ("indices",), [TEMPERATURES[1], _per_row(seed=4)],
             reductions=("none", "sum"))


def _interpreted_triton():
    """The jax-triton stand-in installed (returns its undo), or None where the interpreter is off."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import sys
    import types

    import jax

    from test_jax_triton import interpreted_triton_call

    fake = types.ModuleType("jax_triton")
    fake.triton_call = interpreted_triton_call
    sys.modules["jax_triton"] = fake
    platform, jax.default_backend = jax.default_backend, lambda: "gpu"

    def undo():
        jax.default_backend = platform
        del sys.modules["jax_triton"]

    return undo


@register
def triton_kernels_temperature_variant():
    """The vocab-parallel kernels' temperature variant (0-d temperatures) on 4 and 2 devices of the
    class axis; per-row temperatures take the XLA path on this backend. (The epilogue launcher is
    wrapped to prove that its temperature variant ran.)"""
    undo = _interpreted_triton()
    if undo is None:
        return
    import jax
    from jax.sharding import PartitionSpec as P

    from bitempered.bindings.jax import launchers as jax_kernels

    jax.config.update("jax_enable_x64", True)
    variants = []
    epilogue = jax_kernels.vocab_parallel_epilogue
    jax_kernels.vocab_parallel_epilogue = lambda *a, **k: variants.append(k.get("need_temperature_grads")) or \
        epilogue(*a, **k)
    try:
        _compare(_mesh((4,), ("model",)), P(None, "model"), P(), ("indices", "dense"), TEMPERATURES,
                 backend="triton", dtype_name="float32", reductions=("none", "mean"))
        assert True in variants, "the epilogue's temperature variant was not traced"
        _compare(_mesh((2, 2), ("data", "model")), P("data", "model"), P("data"), ("indices",),
                 [TEMPERATURES[0], _per_row()], backend="triton", dtype_name="float32", reductions=("sum",))
    finally:
        jax_kernels.vocab_parallel_epilogue = epilogue
        undo()


COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)(-start)?\(")


@register
def triton_temperature_grads_add_no_collective():
    """The compiled kernel path's collectives: differentiating t1 and t2 too adds none (their row
    sums ride in the epilogue's packed psum)."""
    undo = _interpreted_triton()
    if undo is None:
        return
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import bitempered.jax as bj

    try:
        mesh = _mesh((4,), ("model",))
        logits = jnp.asarray(_logits(4 * C_LOCAL), jnp.float32)
        labels = jnp.asarray(_labels("indices", 4 * C_LOCAL))

        def total(a, t1, t2):
            loss = jax.shard_map(lambda a, y, t1, t2: bj.vocab_parallel_bi_tempered_logistic_loss(
                a, y, t1, t2, "model", backend="triton", reduction="sum"), mesh=mesh,
                in_specs=(P(None, "model"), P(), P(), P()), out_specs=P())
            return loss(a, labels, t1, t2)

        def collectives(argnums):
            hlo = jax.jit(jax.grad(total, argnums=argnums)).lower(logits, jnp.float32(0.8),
                                                                  jnp.float32(1.2)).compile().as_text()
            return len(COLLECTIVE.findall(hlo))

        logits_only, with_temperatures = collectives((0,)), collectives((0, 1, 2))
        assert logits_only > 0 and with_temperatures == logits_only, (logits_only, with_temperatures)
    finally:
        undo()


@register
def softmax_temperature_grads():
    """vocab_parallel_tempered_softmax: t's gradient, 0-d and per row, equals tempered_softmax's."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import bitempered.jax as bj

    jax.config.update("jax_enable_x64", True)
    mesh = _mesh((4,), ("model",))
    logits = jnp.asarray(_logits(4 * C_LOCAL))
    cotangent = jnp.asarray(np.random.default_rng(5).standard_normal(logits.shape))

    def sharded(a, t):
        spec = P() if jnp.ndim(t) else None
        p = jax.shard_map(lambda a, t: bj.vocab_parallel_tempered_softmax(a, t, "model"), mesh=mesh,
                          in_specs=(P(None, "model"), spec), out_specs=P(None, "model"))
        return jnp.sum(cotangent * p(a, t))

    def plain(a, t):
        return jnp.sum(cotangent * bj.tempered_softmax(a, t))

    for t in (0.6, 1.0, 1.7, np.linspace(0.6, 1.7, ROWS)):
        got = jax.jit(jax.grad(sharded, argnums=(0, 1)))(logits, t)
        want = jax.grad(plain, argnums=(0, 1))(logits, t)
        _close(got, want, "float64", f"softmax t={t}")


@pytest.fixture(scope="module")
def results():
    return run_cases(os.path.abspath(__file__), NUM_DEVICES, timeout_s=420)


@pytest.mark.parametrize("name", list(CASES))
def test_temperature_grads_parallel(results, name):
    assert results[name] == "ok", results[name]


if __name__ == "__main__":
    main(CASES, NUM_DEVICES)
