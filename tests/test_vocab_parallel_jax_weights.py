"""Weights, reductions and ``ignore_index=None`` of the JAX vocab-parallel loss on 4 host devices
(issues 23 and 25 item 4).

Inside ``shard_map`` with the classes sharded over "model": ``weight=`` (the GLOBAL C weights,
replicated), ``sample_weight=`` (sharded like the rows) and ``reduction=`` give the plain
``bi_tempered_logistic_loss`` with the same weights on the whole logits: values, the gradient of
each slice and the weights' own gradients, XLA and the Triton kernels (the jax-triton stand-in of
test_jax_triton.py on the interpreter); ``ignore_index=None`` counts every row; a weight vector of
the local C, or weights with dense labels, raise naming ``weight``. The cases run in one subprocess
with 4 fake devices (``multidevice.py``).
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


def _mesh(shape, names):
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()).reshape(shape), names)


def _inputs(num_rows, num_classes, ignore=-100):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((num_rows, num_classes)) * 2.0
    logits[2, -1] += 30.0  # a confident row, its max in the last slice
    indices = (np.arange(num_rows) * 5 % num_classes).astype(np.int32)
    indices[1] = ignore
    weight = rng.uniform(0.2, 3.0, num_classes)
    sample_weight = rng.uniform(0.0, 2.0, num_rows)
    return logits, indices, weight, sample_weight


def _compare(mesh, rows_spec, dtype_name, backend, reductions=("none", "sum", "mean"), ignore_index=-100,
             temperatures=((0.8, 1.2), (1.0, 1.0))):
    """Sharded against plain: (value, d/dlogits, d/dweight, d/dsample_weight) of each reduction."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import bitempered.jax as bj

    num_rows, num_classes = 8, C_LOCAL * mesh.shape["model"]
    logits, indices, weight, sample_weight = _inputs(num_rows, num_classes,
                                                     ignore=-100 if ignore_index == -100 else 0)
    dtype = jnp.dtype(dtype_name)
    logits, weight, sample_weight = (jnp.asarray(v, dtype) for v in (logits, weight, sample_weight))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype_name == "float64" else dict(rtol=2e-5, atol=2e-6)
    for reduction in reductions:
        def sharded(a, y, w, sw, t1, t2, reduction=reduction):
            return jax.shard_map(
                lambda a, y, w, sw: bj.vocab_parallel_bi_tempered_logistic_loss(
                    a, y, t1, t2, "model", label_smoothing=0.1, ignore_index=ignore_index, backend=backend,
                    reduction=reduction, weight=w, sample_weight=sw),
                mesh=mesh, in_specs=(P(rows_spec, "model"), P(rows_spec), P(), P(rows_spec)),
                out_specs=P(rows_spec) if reduction == "none" else P())(a, y, w, sw)

        def plain(a, y, w, sw, t1, t2, reduction=reduction):
            return bj.bi_tempered_logistic_loss(a, y, t1, t2, label_smoothing=0.1, ignore_index=ignore_index,
                                                reduction=reduction, weight=w, sample_weight=sw)

        def value_and_grads(loss):
            return jax.jit(lambda *xs: (loss(*xs), jax.grad(lambda a, w, sw: loss(a, xs[1], w, sw, *xs[4:]).sum(),
                                                            argnums=(0, 1, 2))(xs[0], xs[2], xs[3])))

        for t1, t2 in temperatures:
            got = value_and_grads(sharded)(logits, indices, weight, sample_weight, t1, t2)
            want = value_and_grads(plain)(logits, indices, weight, sample_weight, t1, t2)
            where = f"{dtype_name} {backend} {reduction} t1={t1} t2={t2} ignore_index={ignore_index}"
            for name, g, w in zip(("value", "d/dlogits", "d/dweight", "d/dsample_weight"), (got[0], *got[1]),
                                  (want[0], *want[1])):
                np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                           err_msg=f"{where} {name}", **tol)


@register
def weights_and_reductions_match_plain_loss():
    import jax

    jax.config.update("jax_enable_x64", True)
    _compare(_mesh((4,), ("model",)), None, "float64", "xla")
    _compare(_mesh((4,), ("model",)), None, "float32", "xla", reductions=("mean",), ignore_index=None)
    # rows sharded over "data": the reduction is over each device's rows (here: "none" only)
    _compare(_mesh((2, 2), ("data", "model")), "data", "float32", "xla", reductions=("none",))


@register
def weights_on_the_triton_kernels_interpreted():
    """backend="triton" through the stand-in (skipped where the interpreter is off: a GPU run)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import sys
    import types

    import jax

    from bitempered.bindings.jax import launchers as jax_kernels
    from test_jax_triton import interpreted_triton_call

    fake = types.ModuleType("jax_triton")
    fake.triton_call = interpreted_triton_call
    sys.modules["jax_triton"] = fake
    platform, jax.default_backend = jax.default_backend, lambda: "gpu"
    launches = []
    launch = jax_kernels.vocab_parallel_gradient
    jax_kernels.vocab_parallel_gradient = lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs)
    try:
        _compare(_mesh((4,), ("model",)), None, "float32", "triton", reductions=("none", "mean"),
                 temperatures=((0.8, 1.2),))
        _compare(_mesh((4,), ("model",)), None, "float32", "triton", reductions=("sum",), ignore_index=None,
                 temperatures=((0.8, 1.2),))
        assert launches, "the kernel path was not taken"
    finally:
        jax.default_backend = platform
        jax_kernels.vocab_parallel_gradient = launch
        del sys.modules["jax_triton"]


@register
def ignore_index_none_and_bad_weights():
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import bitempered.jax as bj

    mesh = _mesh((4,), ("model",))
    logits, indices, weight, _ = _inputs(6, 12)

    def loss(y, w=None, ignore_index=None, labels_spec=P()):
        """The weights closed over: concrete inside shard_map, hence checked (an operand is traced)."""
        return jax.shard_map(lambda a, y: bj.vocab_parallel_bi_tempered_logistic_loss(
            a, y, 0.8, 1.2, "model", ignore_index=ignore_index, weight=w),
            mesh=mesh, in_specs=(P(None, "model"), labels_spec), out_specs=P())(jnp.asarray(logits, jnp.float32), y)

    # None: the -100 row is a bad index (NaN), not ignored; every other row is the plain loss
    out = np.asarray(loss(jnp.asarray(indices)))
    assert np.isnan(out[1]) and np.isfinite(np.delete(out, 1)).all(), out
    plain = bj.bi_tempered_logistic_loss(logits.astype(np.float32), np.where(indices < 0, 0, indices), 0.8, 1.2,
                                         ignore_index=None)
    np.testing.assert_allclose(np.delete(out, 1), np.delete(np.asarray(plain), 1), rtol=2e-5, atol=2e-6)
    for bad, match in ((np.ones(C_LOCAL), r"weight must be a 1-D array of the 12 class weights \(shape \(12,\)\), "
                                           r"got shape \(3,\)"),
                       (-np.ones(12), "weight must hold finite values >= 0")):
        try:
            loss(jnp.asarray(indices), bad, -100)
        except ValueError as e:
            assert re.search(match, str(e)), str(e)
        else:
            raise AssertionError(f"{bad} did not raise")
    dense = jnp.full((6, 12), 1.0 / 12, jnp.float32)
    try:
        loss(dense, weight, -100, labels_spec=P(None, "model"))
    except ValueError as e:
        assert str(e).startswith("weight= (per-class weights) is supported with class-index labels only"), str(e)
    else:
        raise AssertionError("weight with dense labels did not raise")


@pytest.fixture(scope="module")
def results():
    return run_cases(os.path.abspath(__file__), NUM_DEVICES, timeout_s=420)


@pytest.mark.parametrize("name", list(CASES))
def test_vocab_parallel_weights(results, name):
    assert results[name] == "ok", results[name]


if __name__ == "__main__":
    main(CASES, NUM_DEVICES)
