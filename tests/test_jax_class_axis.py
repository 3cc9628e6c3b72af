"""The class axis ``axis=`` of the JAX multi-class functions (issue 21).

Logits with the classes on ``axis`` (e.g. (N, C, H, W) with ``axis=1``; C not a power of two)
give the values and gradients of the moved-axis computation (``jnp.moveaxis(logits, axis, -1)``
and the last-axis function), on the XLA backend and on the Triton path (the jax-triton stand-in of
``test_jax_triton.py`` running the kernels on the interpreter, or the real jax-triton on a GPU):
the loss under every reduction with class indices (ignore_index rows), dense labels, label
smoothing, class and sample weights; ``tempered_softmax``; ``jax.jit`` with the axis static;
``jax.vmap`` over an extra leading batch; the float64 reference (``reference.py``) on the XLA path;
bad axes and shapes; and the vocab-parallel loss and softmax (2 host devices, a subprocess).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from bitempered import jax as bj
from interpreter_warnings import EXPECTED as pytestmark  # noqa: F401  (the interpreter's expected warnings)
from multidevice import case, main, run_cases
from test_jax_triton import interpreted_triton_call, triton_backend  # noqa: F401  (a fixture)

T1, T2, SMOOTHING = 0.8, 1.3, 0.1
# (logits shape, class axis): (N, C, H, W) with axis 1, (N, C, L) with a negative axis, axis 0
LAYOUTS = [((2, 5, 3, 7), 1), ((3, 6, 4), -2), ((3, 4, 2), 0)]
LAYOUT_IDS = [f"{'x'.join(map(str, shape))}-axis{axis}" for shape, axis in LAYOUTS]
TOL = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(params=["xla", "triton"])
def backend(request):
    """Each backend; "triton" through the ``triton_backend`` fixture (stand-in or real)."""
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    return request.param


def _rows_shape(shape, axis):
    axis %= len(shape)
    return shape[:axis] + shape[axis + 1:]


def _inputs(shape, axis, seed):
    """Fresh logits, class indices (two rows ignored), dense labels (summing to 1 along ``axis``),
    per-class and per-row weights."""
    rng = np.random.default_rng(seed)
    num_classes, rows = shape[axis], _rows_shape(shape, axis)
    logits = (rng.standard_normal(shape) * 2.0).astype(np.float32)
    indices = rng.integers(0, num_classes, rows).astype(np.int32)
    indices.reshape(-1)[[1, -2]] = -100
    dense = np.moveaxis(rng.dirichlet(np.ones(num_classes), size=rows), -1, axis).astype(np.float32)
    class_weight = rng.uniform(0.5, 2.0, num_classes).astype(np.float32)
    sample_weight = rng.uniform(0.5, 2.0, rows).astype(np.float32)
    return logits, indices, dense, class_weight, sample_weight


def _moved_labels(labels, axis):
    return labels if np.issubdtype(labels.dtype, np.integer) else np.moveaxis(labels, axis, -1)


def _cotangent(shape):
    """A non-uniform upstream gradient, so that a gradient in the wrong layout or row order fails."""
    return np.linspace(0.5, 1.5, int(np.prod(shape)), dtype=np.float32).reshape(shape)


def _values_and_vjps(fns, logits):
    """[(fn(logits), the gradient of <fn(logits), _cotangent>) for each fn], in ONE jitted program
    (one compilation instead of two per function: the test's time is compilation)."""
    def run(a):
        out = []
        for fn in fns:
            value, vjp = jax.vjp(fn, a)
            out.append((value, vjp(jnp.asarray(_cotangent(value.shape), value.dtype))[0]))
        return out

    return jax.jit(run)(jnp.asarray(logits))


@pytest.mark.parametrize("kind", ["indices", "dense"])
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_loss_and_gradient_equal_the_moved_axis_computation(backend, shape, axis, kind):
    logits, indices, dense, class_weight, sample_weight = _inputs(shape, axis, seed=len(shape) + axis)
    labels = indices if kind == "indices" else dense
    weights = dict(weight=class_weight if kind == "indices" else None, sample_weight=sample_weight)
    moved_logits, moved = np.moveaxis(logits, axis, -1), _moved_labels(labels, axis)
    configs = [(reduction, weighted) for reduction in ("none", "sum", "mean") for weighted in (False, True)]
    fns = []
    for reduction, weighted in configs:
        kwargs = dict(label_smoothing=SMOOTHING, backend=backend, reduction=reduction, **(weights if weighted else {}))
        fns.append(lambda a, kwargs=kwargs: bj.bi_tempered_logistic_loss(a, labels, T1, T2, axis=axis, **kwargs))
        fns.append(lambda a, kwargs=kwargs: bj.bi_tempered_logistic_loss(jnp.moveaxis(a, axis, -1), moved, T1, T2,
                                                                         **kwargs))
    results = _values_and_vjps(fns, logits)
    for (reduction, weighted), (got, grad), (want, want_grad) in zip(configs, results[::2], results[1::2]):
        where = f"{reduction} weighted={weighted}"
        assert got.shape == (_rows_shape(shape, axis) if reduction == "none" else ()), where
        assert grad.shape == logits.shape and grad.dtype == logits.dtype, where
        np.testing.assert_allclose(got, want, err_msg=where, **TOL)
        np.testing.assert_allclose(grad, want_grad, err_msg=where, **TOL)
        assert np.all(np.isfinite(got)) and np.any(grad != 0), where
    # independent of the last-axis path: the float64 reference on the moved rows ("none", unweighted)
    got, grad = results[0]
    y, kept = ref.one_hot(indices, shape[axis]) if kind == "indices" else (moved, np.ones(got.shape))
    truth = ref.loss(moved_logits.astype(np.float64), y, T1, T2, SMOOTHING) * kept
    np.testing.assert_allclose(got, truth, rtol=1e-4, atol=1e-5)
    truth_grad = ref.loss_grad(moved_logits.astype(np.float64), y, T1, T2, SMOOTHING) * (
        kept * _cotangent(got.shape))[..., None]
    np.testing.assert_allclose(grad, np.moveaxis(truth_grad, -1, axis), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_tempered_softmax_and_gradient(backend, shape, axis):
    logits = _inputs(shape, axis, seed=11)[0]
    temperatures = (0.6, 1.4)
    results = _values_and_vjps([fn for t in temperatures for fn in (
        lambda a, t=t: bj.tempered_softmax(a, t, backend=backend, axis=axis),
        lambda a, t=t: jnp.moveaxis(bj.tempered_softmax(jnp.moveaxis(a, axis, -1), t, backend=backend), -1, axis))],
        logits)
    for t, (got, grad), (want, want_grad) in zip(temperatures, results[::2], results[1::2]):
        assert got.shape == logits.shape and grad.shape == logits.shape
        np.testing.assert_allclose(got, want, **TOL)
        np.testing.assert_allclose(grad, want_grad, **TOL)
        truth = np.moveaxis(ref.tempered_softmax(np.moveaxis(logits, axis, -1).astype(np.float64), t), -1, axis)
        np.testing.assert_allclose(got, truth, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.sum(got, axis=axis), 1.0, rtol=1e-5)


def test_jit_with_the_axis_static(backend):
    logits, indices, dense, class_weight, sample_weight = _inputs((2, 5, 3, 7), 1, seed=5)

    @jax.jit
    def unjitted_axis(a, y, axis):  # a traced axis is not an int: TypeError naming it
        return bj.bi_tempered_logistic_loss(a, y, T1, T2, backend=backend, axis=axis)

    with pytest.raises(TypeError, match="axis must be an int"):
        unjitted_axis(logits, indices, 1)

    @jax.jit
    def step(a, y, w, sw, t1):
        def total(a):
            return bj.bi_tempered_logistic_loss(a, y, t1, T2, label_smoothing=SMOOTHING, backend=backend,
                                                reduction="mean", weight=w, sample_weight=sw, axis=1)
        return jax.value_and_grad(total)(a)

    @jax.jit
    def moved_step(a, y, w, sw, t1):
        def total(a):
            return bj.bi_tempered_logistic_loss(jnp.moveaxis(a, 1, -1), y, t1, T2, label_smoothing=SMOOTHING,
                                                backend=backend, reduction="mean", weight=w, sample_weight=sw)
        return jax.value_and_grad(total)(a)

    for t1 in (T1, 0.5):  # a traced temperature: one compiled program for both
        got, want = step(logits, indices, class_weight, sample_weight, t1), moved_step(
            logits, indices, class_weight, sample_weight, t1)
        np.testing.assert_allclose(got[0], want[0], **TOL)
        np.testing.assert_allclose(got[1], want[1], **TOL)
    assert step._cache_size() == 1

    softmax = jax.jit(bj.tempered_softmax, static_argnames=("num_iters", "backend", "axis"))
    np.testing.assert_allclose(softmax(logits, 1.2, backend=backend, axis=1),
                               bj.tempered_softmax(logits, 1.2, backend=backend, axis=-3), **TOL)


def test_vmap_over_a_leading_batch(backend):
    """A per-example class axis under vmap (1 of (N, C, L), 0 of (C, N, L) examples): the batch is
    folded in front of the rows, the class axis stays: the stack of the per-example calls."""
    rng = np.random.default_rng(4)
    batch = rng.standard_normal((3, 2, 5, 4)).astype(np.float32)

    def loss(a, y, axis):
        return bj.bi_tempered_logistic_loss(a, y, T1, T2, label_smoothing=SMOOTHING, backend=backend, axis=axis)

    def softmax(a, axis):
        return bj.tempered_softmax(a, 1.3, backend=backend, axis=axis)

    fns = []
    for axis in (1, 0):
        indices = rng.integers(0, batch.shape[1 + axis], _rows_shape(batch.shape, 1 + axis)).astype(np.int32)
        indices.reshape(-1)[3] = -100
        fns += [lambda a, axis=axis, y=indices: jax.vmap(lambda a, y: loss(a, y, axis))(a, y),
                lambda a, axis=axis, y=indices: jnp.stack([loss(a[b], y[b], axis) for b in range(len(batch))]),
                lambda a, axis=axis: jax.vmap(lambda a: softmax(a, axis))(a),
                lambda a, axis=axis: jnp.stack([softmax(a[b], axis) for b in range(len(batch))])]
    results = _values_and_vjps(fns, batch)
    for (got, grad), (want, want_grad) in zip(results[::2], results[1::2]):
        np.testing.assert_allclose(got, want, **TOL)
        np.testing.assert_allclose(grad, want_grad, **TOL)


def test_the_default_axis_is_the_last_axis():
    """axis -1 (the default) and its positive spelling compile the last-axis program."""
    logits, _, dense = _inputs((3, 4, 5), -1, seed=8)[:3]

    def program(**kwargs):
        return jax.jit(lambda a: bj.bi_tempered_logistic_loss(a, dense, T1, T2, backend="xla",
                                                              **kwargs)).lower(logits).as_text()

    assert program() == program(axis=-1) == program(axis=2)
    assert program(axis=1) != program()  # (a control: the text does tell the axes apart)


@pytest.mark.parametrize("fn", ["loss", "softmax", "vocab_parallel_loss", "vocab_parallel_softmax"])
@pytest.mark.parametrize("axis,error,match", [
    (1.0, TypeError, r"axis must be an int"), (True, TypeError, r"axis must be an int"),
    (None, TypeError, r"axis must be an int"), ("1", TypeError, r"axis must be an int"),
    (4, ValueError, r"axis must be in \[-4, 4\) for 4-axis logits"), (-5, ValueError, r"axis must be in \[-4, 4\)"),
])
def test_bad_axis(fn, axis, error, match):
    logits, indices = _inputs((2, 5, 3, 7), 1, seed=9)[:2]
    call = {
        "loss": lambda: bj.bi_tempered_logistic_loss(logits, indices, T1, T2, backend="xla", axis=axis),
        "softmax": lambda: bj.tempered_softmax(logits, 1.2, backend="xla", axis=axis),
        # the axis is checked before the mesh axis (no shard_map needed to see it)
        "vocab_parallel_loss": lambda: bj.vocab_parallel_bi_tempered_logistic_loss(logits, indices, T1, T2, "model",
                                                                                   axis=axis),
        "vocab_parallel_softmax": lambda: bj.vocab_parallel_tempered_softmax(logits, 1.2, "model", axis=axis),
    }[fn]
    with pytest.raises(error, match=match):
        call()


def test_shapes_are_checked_on_the_class_axis():
    logits, indices, dense, class_weight, sample_weight = _inputs((2, 5, 3, 7), 1, seed=10)

    def loss(labels=indices, **kwargs):
        return bj.bi_tempered_logistic_loss(logits, labels, T1, T2, backend="xla", **{"axis": 1, **kwargs})

    # class indices of the last-axis rows' shape, dense labels moved: wrong for axis=1
    with pytest.raises(ValueError, match=r"without the class axis 1, \(2, 3, 7\): labels shape \(2, 5, 3\)"):
        loss(indices.reshape(-1)[:30].reshape(2, 5, 3))
    with pytest.raises(ValueError, match=r"dense \(floating\) labels must have the logits' shape"):
        loss(np.moveaxis(dense, 1, -1))
    with pytest.raises(ValueError, match=r"sample_weight must have the logits' shape without the class axis "
                                         r"\(2, 3, 7\), got shape \(2, 5, 3\)"):
        loss(sample_weight=np.ones((2, 5, 3), np.float32))
    with pytest.raises(ValueError, match=r"weight must be a 1-D array of the 5 class weights"):
        loss(weight=np.ones(7, np.float32))
    with pytest.raises(ValueError, match=r"class indices\) must be in \[0, 5\) or equal ignore_index=-100, got 6"):
        loss(np.where(indices == 0, 6, indices))  # 6 < 7 = the last axis: the class count is the axis'
    loss(weight=class_weight, sample_weight=sample_weight)  # the right shapes pass
    # smoothing needs C >= 2 on the class axis (here 1; the last axis has 7)
    one_class = logits[:, :1]
    with pytest.raises(ValueError, match=r"label_smoothing > 0 needs at least 2 classes, got 1"):
        bj.bi_tempered_logistic_loss(one_class, indices * 0, T1, T2, label_smoothing=0.1, backend="xla", axis=1)
    with pytest.raises(ValueError, match=r"at least one class \(size >= 1 on the class axis 1\)"):
        bj.tempered_softmax(logits[:, :0], 1.2, axis=1)
    with pytest.raises(ValueError, match=r"at least one axis"):
        bj.tempered_softmax(np.float32(1.0), 1.2, axis=0)
    # empty rows: the rows' shape
    assert bj.bi_tempered_logistic_loss(logits[:0], indices[:0], T1, T2, backend="xla", axis=1).shape == (0, 3, 7)
    assert bj.tempered_softmax(logits[:0], 1.2, axis=1).shape == (0, 5, 3, 7)


def test_elementwise_functions_take_no_axis():
    with pytest.raises(TypeError, match="axis"):
        bj.tempered_sigmoid(np.zeros(3, np.float32), 1.2, axis=0)
    with pytest.raises(TypeError, match="axis"):
        bj.bi_tempered_binary_logistic_loss(np.zeros(3, np.float32), np.zeros(3, np.float32), T1, T2, axis=0)


# --------------------------------------------------------------------------------------------
# vocab-parallel (2 host devices, in a subprocess: multidevice.py)
# --------------------------------------------------------------------------------------------

NUM_DEVICES = 2
CASES = {}
register = case(CASES)


def _vocab_parallel_matches_plain(backend):
    """C = 6 classes sharded over "model" on a middle axis (class indices, class and sample
    weights, "none") and on the first axis, spelled negative (dense labels, sample weights,
    "mean"): the sharded loss and softmax, with their slices' gradients, equal the plain
    functions on the whole logits (all in one jitted program)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("model",))
    for shape, axis, kind, reduction in (((3, 6, 4), 1, "indices", "none"), ((6, 3, 4), -3, "dense", "mean")):
        logits, indices, dense, class_weight, sample_weight = _inputs(shape, axis, seed=12)
        labels = indices if kind == "indices" else dense
        weights = dict(weight=class_weight if kind == "indices" else None, sample_weight=sample_weight)
        sliced = P(*("model" if i == axis % len(shape) else None for i in range(len(shape))))

        def sharded(a, y, w, sw, axis=axis, reduction=reduction):
            return bj.vocab_parallel_bi_tempered_logistic_loss(
                a, y, T1, T2, "model", label_smoothing=SMOOTHING, backend=backend, reduction=reduction,
                weight=w, sample_weight=sw, axis=axis)

        sharded = jax.shard_map(sharded, mesh=mesh, in_specs=(sliced, P() if kind == "indices" else sliced, P(), P()),
                                out_specs=P())
        softmax = jax.shard_map(lambda a, axis=axis: bj.vocab_parallel_tempered_softmax(a, 1.3, "model", axis=axis),
                                mesh=mesh, in_specs=sliced, out_specs=sliced)
        fns = [
            lambda a: sharded(a, labels, weights["weight"], sample_weight),
            lambda a: bj.bi_tempered_logistic_loss(a, labels, T1, T2, label_smoothing=SMOOTHING, backend="xla",
                                                   reduction=reduction, axis=axis, **weights),
            softmax,
            lambda a: bj.tempered_softmax(a, 1.3, backend="xla", axis=axis),
        ]
        results = _values_and_vjps(fns, logits)
        for what, (got, grad), (want, want_grad) in zip(("loss", "softmax"), results[::2], results[1::2]):
            where = f"{backend} {what} shape={shape} axis={axis}"
            np.testing.assert_allclose(got, want, err_msg=where, **TOL)
            np.testing.assert_allclose(grad, want_grad, err_msg=where, **TOL)


@register
def vocab_parallel_xla():
    _vocab_parallel_matches_plain("xla")


@register
def vocab_parallel_triton_interpreted():
    """The vocab-parallel kernels through the jax-triton stand-in (interpreter runs only)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import sys
    import types

    fake = types.ModuleType("jax_triton")
    fake.triton_call = interpreted_triton_call
    sys.modules["jax_triton"] = fake
    default_backend = jax.default_backend
    jax.default_backend = lambda: "gpu"
    try:
        _vocab_parallel_matches_plain("triton")
    finally:
        jax.default_backend = default_backend
        del sys.modules["jax_triton"]


@pytest.fixture(scope="module")
def vocab_parallel_results():
    return run_cases(os.path.abspath(__file__), NUM_DEVICES, timeout_s=300)


@pytest.mark.parametrize("name", sorted(CASES))
def test_vocab_parallel(vocab_parallel_results, name):
    assert vocab_parallel_results[name] == "ok", vocab_parallel_results[name]


if __name__ == "__main__":
    main(CASES, NUM_DEVICES)
