"""Fused linear + bi-tempered loss (JAX): value and the gradients of hidden, weight and bias against
the float64 NumPy reference and the materialized loss, on small ragged shapes that force several
chunks; jit/grad, every reduction with a random upstream vector, and the Triton path through the
interpreter stand-in of tests/test_jax_triton.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from bitempered import jax as bj
from test_jax_triton import triton_backend  # noqa: F401  (the fixture: real jax-triton or the stand-in)
from interpreter_warnings import EXPECTED as pytestmark  # noqa: E402  (the interpreter's expected warnings)



@pytest.fixture(autouse=True)
def _float64():
    """float64 for this module's tests only (a module-level config switch would leak into every
    later test module of the session)."""
    with jax.enable_x64(True):
        yield

N, H, C, CHUNK = 13, 7, 11, 4  # 4 chunks, the last one of 1 row (padded to 4 inside the scan)
TEMPS = [(0.7, 1.3), (1.0, 1.0), (0.5, 0.8), (1.3, 1.1)]


def _inputs(n=N, h=H, c=C, dtype=jnp.float64, seed=0, dense=False, ignore=(3,)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h))
    w = rng.standard_normal((c, h)) * 1.5
    b = rng.standard_normal(c)
    if dense:
        y = rng.random((n, c))
        y = jnp.asarray(y / y.sum(-1, keepdims=True), dtype)
    else:
        y = rng.integers(0, c, n)
        y[[i for i in ignore if i < n]] = -100
        y = jnp.asarray(y, jnp.int32)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(b, dtype), y


def _reference(x, w, b, y, t1, t2, smoothing, reduction, upstream):
    xs, ws = np.asarray(x, np.float64), np.asarray(w, np.float64)
    a = xs @ ws.T + (0.0 if b is None else np.asarray(b, np.float64))
    if jnp.issubdtype(y.dtype, jnp.floating):
        labels, kept = np.asarray(y, np.float64), np.ones(len(xs), bool)
    else:
        labels, kept = ref.one_hot(np.asarray(y), ws.shape[0])
    rows = ref.loss(a, labels, t1, t2, smoothing) * kept
    dlogits = ref.loss_grad(a, labels, t1, t2, smoothing) * kept[:, None]
    g = np.asarray(upstream, np.float64)
    if reduction == "none":
        value, row_weights = rows, g
    elif reduction == "sum":
        value, row_weights = rows.sum(), np.full(len(xs), g)
    else:
        value, row_weights = rows.sum() / kept.sum(), np.full(len(xs), g / kept.sum())
    dlogits = dlogits * row_weights[:, None]
    return value, dlogits @ ws, dlogits.T @ xs, dlogits.sum(0)


def _upstream(reduction, n=N, dtype=jnp.float64):
    g = np.random.default_rng(1).standard_normal(n) if reduction == "none" else -1.7
    return jnp.asarray(g, dtype)


def _close(actual, expected, tol):
    actual = np.asarray(jnp.asarray(actual, jnp.float64))
    scale = max(np.abs(expected).max(), 1e-12)
    assert np.abs(actual - expected).max() <= tol * scale, (np.abs(actual - expected).max(), scale)


def _vjp(fn, args, upstream):
    value, pullback = jax.vjp(fn, *args)
    return value, pullback(upstream.astype(value.dtype))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(reduction, bias):
    x, w, b, y = _inputs()
    b = b if bias else None
    g = _upstream(reduction)
    for t1, t2 in TEMPS:  # traced temperatures: one compiled program for the whole loop
        fn = lambda x, w, b: bj.linear_bi_tempered_logistic_loss(x, w, y, t1, t2, bias=b,  # noqa: E731
                                                                 reduction=reduction, chunk_size=CHUNK)
        value, grads = _vjp(fn, (x, w, b), g)
        expected = _reference(x, w, b, y, t1, t2, 0.0, reduction, g)
        _close(value, expected[0], 1e-9)
        assert (grads[2] is None) == (not bias)
        for got, want in zip(grads, expected[1:]):
            if got is not None:
                _close(got, want, 1e-8)


@pytest.mark.parametrize("reduction,dense", [("mean", True), ("none", False)])
def test_smoothing_and_dense_labels(reduction, dense):
    x, w, b, y = _inputs(dense=dense)
    g = _upstream(reduction)
    fn = lambda x, w, b: bj.linear_bi_tempered_logistic_loss(x, w, y, 0.8, 1.2, bias=b, label_smoothing=0.15,  # noqa: E731
                                                             reduction=reduction, chunk_size=CHUNK)
    value, grads = _vjp(fn, (x, w, b), g)
    expected = _reference(x, w, b, y, 0.8, 1.2, 0.15, reduction, g)
    _close(value, expected[0], 1e-9)
    for got, want in zip(grads, expected[1:]):
        _close(got, want, 1e-8)


def test_num_iters_matches_materialized():
    """num_iters=k: the materialized plain loss with the same k is the oracle (reference.py converges)."""
    x, w, b, y = _inputs()
    fused = lambda x, w, b: bj.linear_bi_tempered_logistic_loss(x, w, y, 0.6, 1.4, bias=b, num_iters=2,  # noqa: E731
                                                                chunk_size=CHUNK)
    plain = lambda x, w, b: bj.bi_tempered_logistic_loss(x @ w.T + b, y, 0.6, 1.4, num_iters=2)  # noqa: E731
    g = _upstream("none")
    (v1, g1), (v2, g2) = _vjp(fused, (x, w, b), g), _vjp(plain, (x, w, b), g)
    np.testing.assert_allclose(v1, v2, rtol=1e-12, atol=1e-12)
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dense", [False, True])
def test_xla_chunks_run_the_plain_xla_loss(monkeypatch, dense):
    """The chunks run the plain loss's XLA forward and backward (bindings/jax/native/loss.py), its
    cross-entropy fallback included: class indices with one logit 800 above the others (the
    loss-only forward of reduction "none" overflows its target-logit shift), dense labels with a
    -inf logit where the label is 0 (0 * -inf in the fast path). Equal to the materialized loss."""
    from bitempered.bindings.jax.native import loss as native_loss

    forward, calls = native_loss.forward, []
    monkeypatch.setattr(native_loss, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    x, w, b, y = _inputs(dense=dense)
    if dense:
        b = b.at[2].set(-jnp.inf)
        y = y.at[:, 2].set(0.0)
    else:
        b = b.at[2].set(800.0)
    g = _upstream("none")
    for t1, t2 in [(1.0, 1.0), (0.7, 1.3)]:
        fused = lambda x, w, b: bj.linear_bi_tempered_logistic_loss(x, w, y, t1, t2, bias=b,  # noqa: E731
                                                                    chunk_size=CHUNK, backend="xla")
        plain = lambda x, w, b: bj.bi_tempered_logistic_loss(x @ w.T + b, y, t1, t2, backend="xla")  # noqa: E731
        (v1, g1), (v2, g2) = _vjp(fused, (x, w, b), g), _vjp(plain, (x, w, b), g)
        assert np.isfinite(v1).all()
        np.testing.assert_allclose(v1, v2, rtol=1e-12, atol=1e-12)
        for got, want in zip(g1, g2):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert calls, "the fused head did not run native/loss.forward"


def test_jit_grad_traced_temperatures_and_leading_axes():
    x, w, b, y = _inputs(n=12, dtype=jnp.float32)
    x3, y3 = x.reshape(3, 4, H), y.reshape(3, 4)

    @jax.jit
    def objective(x, w, b, t1, t2):
        return jnp.sum(bj.linear_bi_tempered_logistic_loss(x, w, y3, t1, t2, bias=b, chunk_size=5))

    grad_fn = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))
    for t1, t2 in [(0.7, 1.3), (1.0, 1.0)]:
        grads = grad_fn(x3, w, b, jnp.float32(t1), jnp.float32(t2))
        expected = _reference(x, w, b, y, t1, t2, 0.0, "none", np.ones(12))
        _close(grads[0].reshape(12, H), expected[1], 2e-5)
        _close(grads[1], expected[2], 2e-5)
        _close(grads[2], expected[3], 2e-5)
    assert grad_fn._cache_size() == 1  # a new temperature value does not retrace


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_and_all_ignored(reduction):
    x, w, b, y = _inputs(n=0)
    fn = lambda x, w, b: bj.linear_bi_tempered_logistic_loss(x, w, y, 0.7, 1.3, bias=b, reduction=reduction)  # noqa: E731
    value, grads = _vjp(fn, (x, w, b), _upstream(reduction, n=0))
    assert value.shape == ((0,) if reduction == "none" else ())
    if reduction == "mean":
        assert jnp.isnan(value)
    assert grads[0].shape == (0, H) and not jnp.any(grads[1]) and not jnp.any(grads[2])
    x, w, b, y = _inputs(ignore=range(N))
    value, grads = _vjp(lambda x, w, b: bj.linear_bi_tempered_logistic_loss(
        x, w, y, 0.7, 1.3, bias=b, reduction=reduction, chunk_size=CHUNK), (x, w, b), _upstream(reduction))
    if reduction != "mean":
        assert not jnp.any(value)
    assert all(not jnp.any(g) for g in grads)


def test_one_class():
    x, w, b, y = _inputs(c=1, ignore=())
    value, grads = _vjp(lambda x, w, b: bj.linear_bi_tempered_logistic_loss(x, w, y, 0.7, 1.3, bias=b,
                                                                            chunk_size=CHUNK),
                        (x, w, b), _upstream("none"))
    assert np.abs(np.asarray(value)).max() < 1e-12 and all(not jnp.any(g) for g in grads)


@pytest.mark.parametrize("dtype", [jnp.bfloat16])  # float32 and float64: the reference tests above and below
def test_low_precision_no_worse_than_materialized(dtype):
    x, w, b, y = _inputs(n=37, h=19, c=53, dtype=dtype, ignore=(3, 20))
    g = _upstream("none", n=37)
    exact = _reference(x, w, b, y, 0.8, 1.2, 0.1, "none", g)
    fused = lambda x, w, b: bj.linear_bi_tempered_logistic_loss(x, w, y, 0.8, 1.2, bias=b, label_smoothing=0.1,  # noqa: E731
                                                                chunk_size=8)
    plain = lambda x, w, b: bj.bi_tempered_logistic_loss(x @ w.T + b, y, 0.8, 1.2, label_smoothing=0.1)  # noqa: E731
    (v1, g1), (v2, g2) = _vjp(fused, (x, w, b), g), _vjp(plain, (x, w, b), g)
    tol = {jnp.float32: 1e-6, jnp.bfloat16: 2e-2}[dtype]
    for got, base, want in zip((v1,) + g1, (v2,) + g2, exact):
        assert got.dtype == base.dtype
        scale = np.abs(want).max()
        err = np.abs(np.asarray(got, np.float64) - want).max() / scale
        base_err = np.abs(np.asarray(base, np.float64) - want).max() / scale
        assert err <= base_err + tol, (err, base_err)


def test_float16_grad_hidden_survives_loss_scaling():
    """float16 under a loss scale (issue #25): grad_hidden is held in float32 until the backward,
    so every entry the scale brings into float16's normal range comes back there; the old float16
    store of grad_hidden x 1/N (the control) loses those entries' precision."""
    rng = np.random.default_rng(8)
    n, width, c, scale = 2048, 16, 13, 65536.0
    hidden = jnp.asarray(rng.standard_normal((n, width)), jnp.float16)
    weight = jnp.asarray(0.5 * rng.standard_normal((c, width)), jnp.float16)
    labels = jnp.asarray(rng.integers(0, c, n))
    got = jax.grad(lambda h: scale * bj.linear_bi_tempered_logistic_loss(h, weight, labels, 0.8, 1.2,
                                                                         reduction="mean"))(hidden)
    logits = (hidden @ weight.T).astype(jnp.float32)  # the same float16 matmul, then float32
    unit = jax.grad(lambda a: bj.bi_tempered_logistic_loss(a, labels, 0.8, 1.2, reduction="mean"))(logits)
    want = np.asarray(unit @ weight.astype(jnp.float32)) * scale
    normal = np.abs(want) >= 2.0**-14
    error = lambda g: np.abs(np.asarray(g, np.float32) - want)[normal] / np.abs(want)[normal]  # noqa: E731
    old = np.asarray(unit @ weight.astype(jnp.float32)).astype(np.float16).astype(np.float32) * scale
    assert error(old).max() > 2e-2  # the control: float16 g / N is subnormal for many entries
    assert (np.asarray(got)[normal] != 0).all()
    # the chunk's gradient and its matmul round once each in float16 before the last rounding
    assert np.abs(np.asarray(got, np.float32) - want).max() <= 4e-3 * np.abs(want).max()


def test_memory_is_one_chunk_not_n_by_c():
    """XLA's temporaries of jit(value_and_grad): the fused program holds O(chunk x C), not N x C."""
    n, h, c, chunk = 512, 16, 2000, 32
    x, w, b, y = _inputs(n=n, h=h, c=c, dtype=jnp.float32, ignore=())
    t = jnp.float32(0.8), jnp.float32(1.2)
    fused = lambda x, w, b: bj.linear_bi_tempered_logistic_loss(x, w, y, *t, bias=b, reduction="mean",  # noqa: E731
                                                                chunk_size=chunk)
    plain = lambda x, w, b: jnp.mean(bj.bi_tempered_logistic_loss(x @ w.T + b, y, *t))  # noqa: E731
    temp = [jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(x, w, b).compile().memory_analysis()
            .temp_size_in_bytes for f in (fused, plain)]
    assert temp[0] < n * c * 4 / 2 < temp[1], temp


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x[:, :-1], w, y, 1.0, 1.0), ValueError, "last dim"),
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x, w, y, 1.0, 1.0, bias=b[:-1]), ValueError, "bias"),
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x, w.astype(jnp.float32), y, 1.0, 1.0), TypeError,
     "same dtype"),
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x, w, y[:-1], 1.0, 1.0), ValueError, "labels shape"),
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x, w, jnp.full_like(y, C), 1.0, 1.0), ValueError,
     "must be in"),
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x, w, y, 1.0, 1.0, chunk_size=0), ValueError,
     "chunk_size"),
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x, w, y, 1.0, 1.0, chunk_size=1.5), TypeError,
     "chunk_size"),
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x, w, y, 2.0, 1.0), ValueError, "t1"),
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x, w, y, 1.0, -1.0), ValueError, "t2"),
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x, w, y, 1.0, 1.0, reduction="avg"), ValueError,
     "reduction"),
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x, w[0], y, 1.0, 1.0), ValueError, "weight"),
    (lambda x, w, b, y: bj.linear_bi_tempered_logistic_loss(x.astype(jnp.int32), w, y, 1.0, 1.0), TypeError,
     "hidden"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(*_inputs())


def test_triton_path(triton_backend, monkeypatch):
    """The per-chunk Triton kernel (jax_kernels.loss_rows): real jax-triton on a GPU, else the
    interpreter stand-in of tests/test_jax_triton.py (the ``triton_backend`` fixture)."""
    from bitempered.bindings.jax import launchers as jax_kernels

    calls = []
    real = jax_kernels.loss_rows
    monkeypatch.setattr(jax_kernels, "loss_rows", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x, w, b, y = _inputs(n=7, h=5, c=9, dtype=jnp.float32, ignore=(2,))
    for reduction in ("mean", "none"):
        g = _upstream(reduction, n=7, dtype=jnp.float32)
        fn = lambda x, w, b: bj.linear_bi_tempered_logistic_loss(x, w, y, 0.7, 1.3, bias=b, reduction=reduction,  # noqa: E731
                                                                 label_smoothing=0.1, chunk_size=3, backend="triton")
        value, grads = _vjp(fn, (x, w, b), g)
        expected = _reference(x, w, b, y, 0.7, 1.3, 0.1, reduction, g)
        _close(value, expected[0], 1e-5)
        for got, want in zip(grads, expected[1:]):
            _close(got, want, 1e-5)
    assert calls and all(shape == (3, 9) for shape in calls)  # traced once per scan body, chunk-sized


# --------------------------------------------------------------------------------------------
# Learnable temperatures (issue 22): dL/dt1, dL/dt2 of the fused head equal the plain loss's
# --------------------------------------------------------------------------------------------

def _temperature_case(per_row, n=N, seed=30):
    """(t1, t2): 0-d, or one per row (t2 < 1 rows next to t = 1 and t2 > 1 rows)."""
    if not per_row:
        return jnp.float64(0.8), jnp.float64(1.3)
    rng = np.random.default_rng(seed)
    t1, t2 = rng.choice([0.5, 0.8, 1.0], n), rng.choice([0.7, 1.0, 1.5, 2.0], n)
    # t1 < 1 where t2 < 1: a smoothed label outside the finite support makes the loss +inf for t1 >= 1
    return jnp.asarray(np.where(t2 < 1, np.minimum(t1, 0.8), t1)), jnp.asarray(t2)


def _fused_and_plain_grads(x, w, b, y, t1, t2, reduction, chunk, backend="xla", **options):
    """The gradients of (x, w, b, t1, t2) of upstream . loss for the fused head and for the plain
    loss of ``x @ w.T + b``; ``options``: smoothing and the weights."""
    g = _upstream(reduction, n=x.shape[0], dtype=x.dtype)
    smoothing = options.pop("label_smoothing", 0.1)
    class_weight, sample_weight = options.pop("class_weight", None), options.pop("sample_weight", None)

    def fused(x, w, b, t1, t2):
        return jnp.sum(g * bj.linear_bi_tempered_logistic_loss(
            x, w, y, t1, t2, bias=b, label_smoothing=smoothing, reduction=reduction, chunk_size=chunk,
            backend=backend, class_weight=class_weight, sample_weight=sample_weight))

    def plain(x, w, b, t1, t2):
        return jnp.sum(g * bj.bi_tempered_logistic_loss(
            x.astype(jnp.float64) @ w.astype(jnp.float64).T + b.astype(jnp.float64), y, t1.astype(jnp.float64),
            t2.astype(jnp.float64), label_smoothing=smoothing, reduction=reduction, backend="xla",
            weight=class_weight, sample_weight=sample_weight))

    argnums = (0, 1, 2, 3, 4)
    return jax.grad(fused, argnums)(x, w, b, t1, t2), jax.grad(plain, argnums)(x, w, b, t1, t2)


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_temperature_grads_match_plain_loss(reduction, per_row):
    """float64 XLA: several chunk sizes (one row, a ragged tail, one chunk), smoothing, an ignored
    row; with class and sample weights for "mean"; the projection's gradients unchanged."""
    x, w, b, y = _inputs()
    t1, t2 = _temperature_case(per_row)
    options = {}
    if reduction == "mean":
        rng = np.random.default_rng(31)
        options = {"class_weight": jnp.asarray(rng.uniform(0.5, 2.0, C)),
                   "sample_weight": jnp.asarray(rng.uniform(0.0, 2.0, N))}
    for chunk in (1, CHUNK, N + 3):
        got, want = _fused_and_plain_grads(x, w, b, y, t1, t2, reduction, chunk, **dict(options))
        assert got[3].shape == t1.shape and got[4].shape == t2.shape
        for g, e in zip(got, want):
            _close(g, np.asarray(e), 1e-10)


def test_temperature_grads_dense_labels_and_leading_axes():
    """Dense labels; hidden [2, 6, H] with a temperature per row of shape [2, 6]; t = 1 exactly."""
    x, w, b, y = _inputs(n=12, dense=True)
    t1, t2 = _temperature_case(True, n=12)
    t1 = t1.at[:4].set(1.0)
    t2 = t2.at[:4].set(1.0)
    g = jnp.asarray(np.random.default_rng(32).standard_normal((2, 6)))

    def fused(t1, t2):
        return jnp.sum(g * bj.linear_bi_tempered_logistic_loss(x.reshape(2, 6, H), w, y.reshape(2, 6, C), t1, t2,
                                                               bias=b, chunk_size=5))

    def plain(t1, t2):
        return jnp.sum(g.reshape(-1) * bj.bi_tempered_logistic_loss(x @ w.T + b, y, t1.reshape(-1), t2.reshape(-1)))

    got = jax.jit(jax.grad(fused, argnums=(0, 1)))(t1.reshape(2, 6), t2.reshape(2, 6))
    want = jax.grad(plain, argnums=(0, 1))(t1.reshape(2, 6), t2.reshape(2, 6))
    for g_, e in zip(got, want):
        assert g_.shape == (2, 6)
        _close(g_, np.asarray(e), 1e-10)


def test_temperature_terms_only_when_a_temperature_is_differentiated(monkeypatch):
    """The chunks trace the temperature terms only for a differentiated temperature; the
    temperatures alone (no projection gradient) differentiate too; one compile for every value."""
    from bitempered.bindings.jax.native import temperature as native_temperature

    traced = []
    terms = native_temperature.loss_temperature_terms
    monkeypatch.setattr(native_temperature, "loss_temperature_terms", lambda *a: traced.append(1) or terms(*a))
    x, w, b, y = _inputs(n=9, h=5, c=8)  # shapes no other test uses: fresh traces

    def loss(x, w, t1, t2):
        return bj.linear_bi_tempered_logistic_loss(x, w, y, t1, t2, reduction="sum", chunk_size=4)

    jax.jit(jax.grad(loss))(x, w, 0.8, 1.3)
    assert not traced
    temperatures_only = jax.jit(jax.grad(loss, argnums=(2, 3)))
    for t1, t2 in [(0.8, 1.3), (0.6, 0.9)]:
        got = temperatures_only(x, w, t1, t2)
    assert traced and temperatures_only._cache_size() == 1
    want = jax.grad(lambda t1, t2: jnp.sum(bj.bi_tempered_logistic_loss(x @ w.T, y, t1, t2)), argnums=(0, 1))(0.6, 0.9)
    _close(np.asarray(got), np.asarray(want), 1e-10)


def test_temperature_grads_need_converged_normalization_and_a_row_shape():
    x, w, b, y = _inputs()
    with pytest.raises(ValueError, match="num_iters"):
        jax.grad(lambda t: bj.linear_bi_tempered_logistic_loss(x, w, y, t, 1.3, num_iters=4, reduction="sum"))(0.8)
    # the projection's gradient at num_iters=k needs no temperature derivative
    assert np.isfinite(jax.grad(lambda x: bj.linear_bi_tempered_logistic_loss(
        x, w, y, 0.8, 1.3, num_iters=4, reduction="sum"))(x)).all()
    with pytest.raises(ValueError, match=r"t2 .*\(13,\).*hidden's shape.*got shape \(12,\)"):
        bj.linear_bi_tempered_logistic_loss(x, w, y, 0.8, jnp.ones(N - 1))


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
def test_triton_temperature_grads(triton_backend, per_row):  # noqa: F811
    """The per-chunk Triton kernel's temperature variant (float32) against the float64 plain loss."""
    x, w, b, y = _inputs(n=7, h=5, c=9, dtype=jnp.float32, ignore=(2,))
    t1, t2 = _temperature_case(per_row, n=7)
    t1, t2 = t1.astype(jnp.float32), t2.astype(jnp.float32)
    for reduction in ("mean", "none"):
        got, want = _fused_and_plain_grads(x, w, b, y, t1, t2, reduction, 3, backend="triton")
        for g, e in zip(got, want):
            assert g.dtype == jnp.float32
            _close(g, np.asarray(e), 2e-5)
