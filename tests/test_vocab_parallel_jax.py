"""JAX vocab-parallel loss on 4 host devices: the classes sharded over a mesh axis.

- ``shard_map`` over a 1-D "model" mesh and a 2-D ("data", "model") mesh: the per-row losses and
  each slice's gradient equal the unsharded ``bi_tempered_logistic_loss`` on the whole logits
  (float64 to rounding, float32/bfloat16 to float32 rounding), for class-index and dense labels,
  ignore_index, smoothing (global C), t2 < 1 and t2 > 1, num_iters=k, rows with -inf, NaN and a
  far-off maximum; a model axis of size 1 is the plain loss; tempered_softmax likewise; the XLA
  loss's row blocks run in lockstep on every device.
- the compiled programs communicate O(rows) values per collective, never the N x C logits: for
  ``shard_map`` and for plain ``jax.jit`` with the logits sharded on the class axis by a
  ``NamedSharding`` (checked in the optimized HLO, which must hold no all-gather or all-to-all).

The cases run in one subprocess with 4 fake devices (``multidevice.py``).
"""

import os
import re

import numpy as np
import pytest

from multidevice import case, main, run_cases

NUM_DEVICES = 4
CASES = {}
register = case(CASES)

C_LOCAL = 3                      # C = 12 on 4 devices, 6 on 2: slices of 3 classes
TEMPERATURES = [(0.8, 1.2), (0.5, 0.7), (1.0, 1.0), (0.2, 0.3), (1.5, 3.0)]
TOLERANCES = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-5, atol=2e-6),
              "bfloat16": dict(rtol=1.6e-2, atol=1e-3)}


def _mesh(shape, names):
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()).reshape(shape), names)


def _logits(num_rows, num_classes, seed=0):
    """Normal rows, a wide row, a confident row (max in the last slice), -inf logits, a NaN row."""
    a = np.random.default_rng(seed).standard_normal((num_rows, num_classes)) * 2.0
    a[1] *= 4.0
    a[2, -1] += 40.0
    a[3, [0, 4 % num_classes, 7 % num_classes]] = -np.inf
    a[4, 1] = np.nan
    return a


def _labels(kind, num_rows, num_classes, seed=1):
    if kind == "indices":
        indices = np.arange(num_rows, dtype=np.int32) * 5 % num_classes
        indices[5] = -100  # ignored
        return indices
    weights = np.random.default_rng(seed).exponential(size=(num_rows, num_classes))
    return weights / weights.sum(-1, keepdims=True)


def _close(got, want, dtype_name, where):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               err_msg=where, **TOLERANCES[dtype_name])


def _per_row_and_vjp(loss_fn):
    """jit((losses, gradient of sum(w * losses))) of a loss_fn(logits, labels, t1, t2, s)."""
    import jax

    def run(logits, labels, weights, t1, t2, s):
        losses, vjp = jax.vjp(lambda a: loss_fn(a, labels, t1, t2, s), logits)
        return losses, vjp(weights.astype(losses.dtype))[0]

    return jax.jit(run)


def _compare_with_unsharded(mesh, logits_spec, rows_spec, class_axis, num_rows, dtypes, kinds=("indices", "dense"),
                            iters=(None, 5), backend="xla", temperatures=TEMPERATURES, batch=None):
    """The sharded loss (``backend``; with ``batch``, vmapped over a leading axis of that size
    inside ``shard_map``) against the plain XLA loss on the whole logits."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import bitempered.jax as bj
    from bitempered.bindings.jax.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss

    num_classes = C_LOCAL * mesh.shape[class_axis]
    weights = np.linspace(0.5, 2.0, num_rows)
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        logits = jnp.asarray(_logits(num_rows, num_classes), dtype)
        if batch:
            logits = jnp.stack([logits * (1.0 + 0.25 * b) for b in range(batch)])
        for kind, num_iters in ((k, i) for k in kinds for i in iters):
            labels = _labels(kind, num_rows, num_classes)
            if batch:
                labels = np.stack([labels] * batch)
            labels = jnp.asarray(labels, jnp.float64 if dtype_name == "float64" else jnp.float32) \
                if kind == "dense" else jnp.asarray(labels)
            labels_spec = logits_spec if kind == "dense" else rows_spec

            def sharded(a, y, t1, t2, s, num_iters=num_iters):
                def loss(a, y):
                    return vocab_parallel_bi_tempered_logistic_loss(a, y, t1, t2, class_axis, label_smoothing=s,
                                                                    num_iters=num_iters, backend=backend)
                return jax.vmap(loss)(a, y) if batch else loss(a, y)

            if batch:
                logits_spec_b, labels_spec_b, rows_spec_b = (P(None, *spec) for spec in (
                    logits_spec, labels_spec, rows_spec))
            else:
                logits_spec_b, labels_spec_b, rows_spec_b = logits_spec, labels_spec, rows_spec

            sharded = jax.shard_map(sharded, mesh=mesh, in_specs=(logits_spec_b, labels_spec_b, None, None, None),
                                    out_specs=rows_spec_b)
            plain = _per_row_and_vjp(lambda a, y, t1, t2, s, num_iters=num_iters: bj.bi_tempered_logistic_loss(
                a, y, t1, t2, label_smoothing=s, num_iters=num_iters))
            parallel = _per_row_and_vjp(sharded)
            row_weights = jnp.asarray(np.broadcast_to(weights, logits.shape[:-1]))
            for (t1, t2), s in ((t, s) for t in temperatures for s in (0.0, 0.1)):
                scalars = tuple(jnp.asarray(v, logits.dtype if dtype_name == "float64" else jnp.float32)
                                for v in (t1, t2, s))
                want = plain(logits, labels, row_weights, *scalars)
                got = parallel(logits, labels, row_weights, *scalars)
                where = f"{dtype_name} {kind} num_iters={num_iters} t1={t1} t2={t2} s={s} backend={backend}"
                assert got[1].dtype == dtype and got[0].dtype == want[0].dtype, where
                _close(got[0], want[0], dtype_name, where)
                _close(got[1], want[1], dtype_name, where)


@register
def shard_map_1d_mesh_matches_unsharded():
    import jax
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    mesh = _mesh((4,), ("model",))
    _compare_with_unsharded(mesh, P(None, "model"), P(), "model", 6, ("float64", "float32"))
    _compare_with_unsharded(mesh, P(None, "model"), P(), "model", 6, ("bfloat16",), iters=(None,))


@register
def shard_map_2d_mesh_data_and_model():
    import jax
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    mesh = _mesh((2, 2), ("data", "model"))
    _compare_with_unsharded(mesh, P("data", "model"), P("data"), "model", 8, ("float32",), iters=(None,))
    # a model axis of one device: the plain loss
    mesh = _mesh((4, 1), ("data", "model"))
    _compare_with_unsharded(mesh, P("data", "model"), P("data"), "model", 8, ("float64",), kinds=("indices",),
                            iters=(None,))


@register
def shard_map_row_blocks_in_lockstep():
    """The XLA loss (bindings/jax/native/loss.py, the plain loss's) in row blocks of 2 rows per
    slice (the last block moved back), so its fori_loop runs the row collectives in lockstep on
    every device, also under vmap: still the unsharded loss."""
    import jax
    from jax.sharding import PartitionSpec as P

    from bitempered.bindings.jax.native import loss as native_loss

    jax.config.update("jax_enable_x64", True)
    block = native_loss.BLOCK_ELEMENTS
    native_loss.BLOCK_ELEMENTS = 2 * C_LOCAL
    jax.clear_caches()
    try:
        _compare_with_unsharded(_mesh((4,), ("model",)), P(None, "model"), P(), "model", 7, ("float64",),
                                iters=(None,), temperatures=TEMPERATURES[:3])
        # and under vmap (folded into the rows) on a 2-D mesh
        _compare_with_unsharded(_mesh((2, 2), ("data", "model")), P("data", "model"), P("data"), "model", 8,
                                ("float32",), kinds=("indices",), iters=(None,), temperatures=TEMPERATURES[:3],
                                batch=2)
    finally:
        native_loss.BLOCK_ELEMENTS = block
        jax.clear_caches()


@register
def shard_map_triton_kernels_interpreted():
    """backend="triton": the vocab-parallel kernels through the jax-triton stand-in of
    test_jax_triton.py (the interpreter on CPU; skipped where it is off, i.e. a GPU run) in
    shard_map over 1-D and 2-D meshes, under vmap, against the plain loss; num_iters=k routes to
    XLA. (The partial-sums launcher is wrapped to prove that the kernel path was traced.)"""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import sys
    import types

    import jax
    from jax.sharding import PartitionSpec as P

    from bitempered.bindings.jax import launchers as jax_kernels
    from test_jax_triton import interpreted_triton_call

    fake = types.ModuleType("jax_triton")
    fake.triton_call = interpreted_triton_call
    sys.modules["jax_triton"] = fake
    platform, jax.default_backend = jax.default_backend, lambda: "gpu"
    launches = []
    launch = jax_kernels.vocab_parallel_sums
    jax_kernels.vocab_parallel_sums = lambda *args, **kwargs: launches.append(args[4]) or launch(*args, **kwargs)
    try:
        mesh = _mesh((4,), ("model",))
        _compare_with_unsharded(mesh, P(None, "model"), P(), "model", 6, ("float32",), backend="triton")
        assert launches, "the kernel path was not taken"
        _compare_with_unsharded(mesh, P(None, "model"), P(), "model", 6, ("bfloat16",), kinds=("indices",),
                                iters=(None,), backend="triton", temperatures=TEMPERATURES[:2])
        mesh = _mesh((2, 2), ("data", "model"))
        _compare_with_unsharded(mesh, P("data", "model"), P("data"), "model", 8, ("float32",), kinds=("dense",),
                                iters=(None,), backend="triton", temperatures=TEMPERATURES[:3], batch=2)
    finally:
        jax.default_backend = platform
        jax_kernels.vocab_parallel_sums = launch
        del sys.modules["jax_triton"]


@register
def shard_map_tempered_softmax_and_its_gradient():
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import bitempered.jax as bj
    from bitempered.bindings.jax.vocab_parallel import vocab_parallel_tempered_softmax

    mesh = _mesh((4,), ("model",))
    logits = jnp.asarray(_logits(6, 12), jnp.float32)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal((6, 12)), jnp.float32)
    def value_and_vjp(fn):
        return jax.jit(lambda a, t: (lambda p, vjp: (p, vjp(cotangent)[0]))(*jax.vjp(lambda a: fn(a, t), a)))

    for num_iters in (None, 4):
        sharded = jax.shard_map(lambda a, t: vocab_parallel_tempered_softmax(a, t, "model", num_iters=num_iters),
                                mesh=mesh, in_specs=(P(None, "model"), None), out_specs=P(None, "model"))
        parallel = value_and_vjp(sharded)
        plain = value_and_vjp(lambda a, t: bj.tempered_softmax(a, t, num_iters=num_iters))
        for t in (0.3, 1.0, 1.6):
            got, want = parallel(logits, jnp.float32(t)), plain(logits, jnp.float32(t))
            _close(got[0], want[0], "float32", f"softmax t={t} num_iters={num_iters}")
            _close(got[1], want[1], "float32", f"softmax gradient t={t} num_iters={num_iters}")


COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s*(all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)"
                        r"(-start)?\(")


def _collectives(hlo: str):
    """[(op, largest operand/result element count)] of the collectives in optimized HLO text."""
    found = []
    for line in hlo.splitlines():
        match = COLLECTIVE.search(line)
        if match:
            sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                     for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1))]
            found.append((match.group(2), max(sizes or [0])))
    return found


@register
def no_n_by_c_communication():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import bitempered.jax as bj
    from bitempered.bindings.jax.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss

    num_rows, num_classes = 64, 4 * 250
    mesh = _mesh((4,), ("model",))
    logits = jnp.asarray(np.random.default_rng(3).standard_normal((num_rows, num_classes)), jnp.float32)
    labels = jnp.arange(num_rows, dtype=jnp.int32) * 7 % num_classes
    sharded_logits = jax.device_put(logits, NamedSharding(mesh, P(None, "model")))

    def mean_loss(a, y, t1, t2):
        return bj.bi_tempered_logistic_loss(a, y, t1, t2, label_smoothing=0.1).mean()

    # plain jit: XLA's partitioner turns the row reductions into all-reduces of [rows] values
    step = jax.jit(jax.value_and_grad(mean_loss))
    temperatures = (jnp.float32(0.8), jnp.float32(0.6))
    hlo = step.lower(sharded_logits, labels, *temperatures).compile().as_text()
    collectives = _collectives(hlo)
    assert collectives and all(op == "all-reduce" for op, _ in collectives), collectives
    assert max(size for _, size in collectives) <= 4 * num_rows, collectives
    value, grad = step(sharded_logits, labels, *temperatures)
    want_value, want_grad = jax.jit(jax.value_and_grad(mean_loss))(logits, labels, *temperatures)
    _close(value, want_value, "float32", "jit + NamedSharding value")
    _close(grad, want_grad, "float32", "jit + NamedSharding gradient")
    assert grad.sharding.is_equivalent_to(sharded_logits.sharding, 2), grad.sharding  # stays class-sharded

    # shard_map: the same, and at most 3 collectives outside the solver loop (max, support, epilogue)
    def parallel_mean(a, y, t1, t2):
        losses = jax.shard_map(lambda a, y: vocab_parallel_bi_tempered_logistic_loss(a, y, t1, t2, "model"),
                               mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P())(a, y)
        return losses.mean()

    hlo = jax.jit(jax.value_and_grad(parallel_mean)).lower(sharded_logits, labels, *temperatures).compile().as_text()
    collectives = _collectives(hlo)
    assert collectives and all(op == "all-reduce" for op, _ in collectives), collectives
    assert max(size for _, size in collectives) <= 3 * num_rows, collectives


@register
def bad_input():
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from bitempered.bindings.jax.vocab_parallel import vocab_parallel_bi_tempered_logistic_loss

    mesh = _mesh((4,), ("model",))
    logits = jnp.zeros((3, 12), jnp.float32)
    loss = jax.shard_map(lambda a, y: vocab_parallel_bi_tempered_logistic_loss(a, y, 0.8, 1.2, "model"),
                         mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P())
    out = np.asarray(loss(logits, jnp.array([0, 12, 11])))  # 12 is past the GLOBAL C: a NaN row
    assert np.isfinite(out[[0, 2]]).all() and np.isnan(out[1]), out
    for bad, error in ((5, TypeError), ((), TypeError)):
        try:
            vocab_parallel_bi_tempered_logistic_loss(logits, jnp.zeros(3, jnp.int32), 0.8, 1.2, bad)
        except error as e:
            assert "axis_name" in str(e)
        else:
            raise AssertionError(f"axis_name={bad!r} did not raise")
    try:
        vocab_parallel_bi_tempered_logistic_loss(logits, jnp.zeros(3, jnp.int32), 2.5, 1.2, "model")
    except ValueError as e:
        assert "t1" in str(e)
    else:
        raise AssertionError("t1 = 2.5 did not raise")


def _raises_naming_axis_name(fn, *args, match="axis_name"):
    """``fn(*args)`` raises a ValueError whose message names ``axis_name`` (and ``match``)."""
    try:
        fn(*args)
    except ValueError as e:
        assert "axis_name" in str(e) and match in str(e), str(e)
    else:
        raise AssertionError(f"{fn} did not raise")


@register
def unknown_axis_name_names_it():
    """An axis that no enclosing shard_map binds: a ValueError naming axis_name (was a bare
    AssertionError from pmax for the softmax, JAX's NameError for the loss)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import bitempered.jax as bj

    mesh = _mesh((4,), ("model",))
    logits, labels = jnp.zeros((3, 12), jnp.float32), jnp.zeros(3, jnp.int32)
    softmax = jax.shard_map(lambda a: bj.vocab_parallel_tempered_softmax(a, 1.2, "nope"), mesh=mesh,
                            in_specs=P(None, "model"), out_specs=P(None, "model"))
    loss = jax.shard_map(lambda a, y: bj.vocab_parallel_bi_tempered_logistic_loss(a, y, 0.8, 1.2, "nope"), mesh=mesh,
                         in_specs=(P(None, "model"), P()), out_specs=P())
    for fn, call_args in ((softmax, (logits,)), (loss, (logits, labels)), (jax.jit(loss), (logits, labels))):
        _raises_naming_axis_name(fn, *call_args, match="'nope'")
    # outside any shard_map
    _raises_naming_axis_name(bj.vocab_parallel_tempered_softmax, logits, 1.2, "model", match="shard_map")
    _raises_naming_axis_name(bj.vocab_parallel_bi_tempered_logistic_loss, logits, labels, 0.8, 1.2, "model",
                             match="shard_map")


@register
def replicated_logits_raise():
    """Logits replicated over the class axis (each device would take the whole rows for its slice:
    a wrong loss) raise a ValueError naming axis_name, for the loss and the softmax, under jit and
    vmap and on a 2-D mesh; a class axis of one device is the plain loss, and with check_vma=False
    (nothing tracks what varies) the check is skipped."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import bitempered.jax as bj

    logits = jnp.asarray(_logits(8, 12), jnp.float32)
    labels = jnp.arange(8, dtype=jnp.int32)

    def loss(a, y):
        return bj.vocab_parallel_bi_tempered_logistic_loss(a, y, 0.8, 1.2, "model")

    def softmax(a):
        return bj.vocab_parallel_tempered_softmax(a, 1.2, "model")

    mesh = _mesh((4,), ("model",))
    replicated = jax.shard_map(loss, mesh=mesh, in_specs=(P(), P()), out_specs=P())
    _raises_naming_axis_name(replicated, logits, labels, match="replicated")
    _raises_naming_axis_name(jax.jit(replicated), logits, labels, match="replicated")
    batched = jax.shard_map(jax.vmap(loss), mesh=mesh, in_specs=(P(), P()), out_specs=P())
    _raises_naming_axis_name(batched, logits[None], labels[None], match="replicated")
    _raises_naming_axis_name(jax.shard_map(softmax, mesh=mesh, in_specs=P(), out_specs=P()), logits,
                             match="replicated")
    # 2-D mesh: the logits sharded over "data" (the rows) but not over "model"
    mesh = _mesh((2, 2), ("data", "model"))
    rows_only = jax.shard_map(loss, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    _raises_naming_axis_name(rows_only, logits, labels, match="'model'")
    # a class axis of one device: replicated over it is the whole row, the plain loss
    mesh = _mesh((4, 1), ("data", "model"))
    one = jax.shard_map(loss, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
    _close(one(logits, labels), bj.bi_tempered_logistic_loss(logits, labels, 0.8, 1.2), "float32", "model axis of 1")
    # check_vma=False: no varying axes are tracked, the call runs (the user's responsibility)
    mesh = _mesh((4,), ("model",))
    unchecked = jax.shard_map(loss, mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P(), check_vma=False)
    _close(unchecked(logits, labels), bj.bi_tempered_logistic_loss(logits, labels, 0.8, 1.2), "float32",
           "check_vma=False")


@pytest.fixture(scope="module")
def results():
    return run_cases(os.path.abspath(__file__), NUM_DEVICES, timeout_s=420)


@pytest.mark.parametrize("name", list(CASES))
def test_vocab_parallel(results, name):
    assert results[name] == "ok", results[name]


if __name__ == "__main__":
    main(CASES, NUM_DEVICES)
