"""Learnable temperatures in JAX (issue 22): ``jax.grad`` of the loss with respect to t1 and t2, and
of tempered_softmax / tempered_sigmoid with respect to t, against float64 central finite
differences of the converged functions (the XLA backend in float64, where the solver is exact to a
few ulp: the differences resolve the derivatives to ~1e-9, the bar is 1e-7 relative); per-row
temperatures; the Triton backend (jax-triton on a GPU, else the interpreter stand-in of
tests/test_jax_triton.py) against the float64 values at float32 tolerance; compile counts; bad
input.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from bitempered import jax as bj
from bitempered.bindings.jax.native import temperature as native_temperature
from interpreter_warnings import EXPECTED as pytestmark  # noqa: E402,F401  (the interpreter's expected warnings)
from test_jax_triton import triton_backend  # noqa: F401  (the fixture)

T1S = [0.5, 0.8, 1.0]
T2S = [0.7, 1.0, 1.5, 2.0]
ROWS, C = 5, 6
STEP = 1e-5
INDICES = np.asarray([0, 3, -100, 5, 1])  # row 2 ignored


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _logits(seed, shape=(ROWS, C), scale=3.0):
    """Random logits; the first row has a dominant class, so that at t2 < 1 its smallest classes
    fall outside the finite support (p = 0 exactly)."""
    a = np.random.default_rng(seed).standard_normal(shape) * scale
    a.reshape(-1, shape[-1])[0, 0] = 12.0
    return a


def _dense_labels(a, t2, seed):
    """Dense labels that need not sum to 1; zero where p = 0 (t2 < 1), so that the loss stays finite
    at every t1 (a label on a class outside the support makes it +inf for t1 >= 1)."""
    y = np.random.default_rng(seed).random(a.shape)
    return np.where(ref.tempered_softmax(a, t2) > 0, y, 0.0)


def _indices_inside_support(a, t2):
    """INDICES with each target outside the support of t2 < 1 moved to the row's top class (a
    target with p = 0 makes the loss +inf for t1 >= 1)."""
    rows = np.arange(len(INDICES))
    inside = ref.tempered_softmax(a, t2)[rows, np.maximum(INDICES, 0)] > 0
    return np.where(inside | (INDICES == -100), INDICES, np.argmax(a, axis=-1))


def _assert_close(got, want, rtol=1e-7):
    """Relative to the largest derivative (a small one is a difference of O(1) terms)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1e-3)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


@functools.partial(jax.jit, static_argnames=("reduction",))
def _loss_total(a, labels, t1, t2, smoothing, cotangent, weight=None, sample_weight=None, reduction="none"):
    """cotangent . loss ("none": per row) or the reduced loss."""
    loss = bj.bi_tempered_logistic_loss(a, labels, t1, t2, label_smoothing=smoothing, reduction=reduction,
                                        weight=weight, sample_weight=sample_weight)
    return jnp.sum(cotangent * loss)


_loss_temperature_grads = jax.jit(jax.grad(_loss_total, argnums=(2, 3)), static_argnames=("reduction",))


def _central_differences(f, t1, t2):
    """(df/dt1, df/dt2) of f(t1, t2) for 0-d temperatures."""
    return ((f(t1 + STEP, t2) - f(t1 - STEP, t2)) / (2 * STEP), (f(t1, t2 + STEP) - f(t1, t2 - STEP)) / (2 * STEP))


def _check_scalar_temperatures(a, labels, t1, t2, smoothing, cotangent, **options):
    grads = _loss_temperature_grads(a, labels, t1, t2, smoothing, cotangent, **options)
    want = _central_differences(lambda u1, u2: _loss_total(a, labels, u1, u2, smoothing, cotangent, **options),
                                t1, t2)
    assert np.isfinite(want).all()
    _assert_close(grads, want)


@pytest.mark.parametrize("labels_kind", ["indices", "dense"])
def test_loss_temperature_grads_match_finite_differences(labels_kind):
    """SPEC's grid, t2 < 1 with classes outside the support, t = 1 exactly; class indices with
    smoothing (none where t1 >= 1 > t2: a smoothed label outside the support makes the loss +inf)
    and ignore_index, dense labels; a random upstream gradient per row."""
    cotangent = np.random.default_rng(1).standard_normal(ROWS)
    for t2 in T2S:
        a = _logits(seed=int(10 * t2))
        labels = _indices_inside_support(a, t2) if labels_kind == "indices" else _dense_labels(a, t2, seed=2)
        for t1 in T1S:
            smoothing = 0.0 if t1 >= 1.0 > t2 else 0.1
            _check_scalar_temperatures(a, labels, t1, t2, smoothing, cotangent)


def test_classes_outside_the_support_give_the_limit_term():
    """t1 < 1, t2 < 1, smoothing: labels > 0 on classes with p = 0 exactly contribute the finite
    limit y / (1 - t1)^2 to dL/dt1 (and nothing to dL/dt2)."""
    a = _logits(seed=3)
    p = ref.tempered_softmax(a, 0.6)
    assert (p == 0).any()
    _check_scalar_temperatures(a, INDICES, 0.5, 0.6, 0.2, np.ones(ROWS))


@pytest.mark.parametrize("reduction,weighted", [("sum", False), ("mean", False), ("mean", True)])
def test_reductions_and_weights(reduction, weighted):
    """The temperatures' gradient is each row's derivative times the factor the logits' gradient
    gets: the reduction's, the class and sample weights, 0 for ignored rows ("none" with an
    upstream gradient per row: the tests above)."""
    a = _logits(seed=4)
    options = {}
    if weighted:
        options = {"weight": np.random.default_rng(5).uniform(0.5, 2.0, C),
                   "sample_weight": np.random.default_rng(6).uniform(0.0, 2.0, ROWS)}
    _check_scalar_temperatures(a, INDICES, 0.8, 1.5, 0.1, np.asarray(1.0), reduction=reduction, **options)


def test_ignored_rows_get_no_temperature_gradient():
    a = _logits(seed=7)
    kept = INDICES != -100
    row_grads = jax.vmap(lambda r: jnp.stack(_loss_temperature_grads(
        a, INDICES, 0.8, 1.5, 0.1, jnp.zeros(ROWS).at[r].set(1.0))))(jnp.arange(ROWS))
    np.testing.assert_array_equal(row_grads[~kept], 0.0)
    assert np.all(row_grads[kept] != 0.0)
    # "mean": the ignored row is not counted, its loss 0 does not pull the temperature
    grads = _loss_temperature_grads(a, INDICES, 0.8, 1.5, 0.1, np.asarray(1.0), reduction="mean")
    np.testing.assert_allclose(grads, row_grads[kept].sum(0) / kept.sum(), rtol=1e-12)


def test_underflowed_probabilities_keep_finite_derivatives():
    """A target logit 800 below the maximum: p underflows float64 (t2 >= 1) or is outside the support
    (t2 < 1); the derivatives come from log p (or the p = 0 limit) and stay finite."""
    a = np.zeros((3, 4))
    a[:, 0] = 800.0
    labels = np.asarray([1, 2, 3])
    for t1, t2 in [(1.0, 1.0), (0.8, 0.8), (0.5, 1.5), (0.7, 0.5)]:
        grads = _loss_temperature_grads(a, labels, t1, t2, 0.0, np.ones(3))
        assert np.isfinite(grads).all(), (t1, t2, grads)
    # t1 > 1, labels on the top class: the other classes' p^(1 - t1) overflows (log p = -1500); with
    # y = 0 there they contribute nothing (no 0 x inf), and the loss is ~0
    confident = np.asarray([[1500.0, 0.0, 0.0]])
    grads = _loss_temperature_grads(confident, np.asarray([0]), 1.5, 1.0, 0.0, np.ones(1))
    np.testing.assert_allclose(grads, 0.0, atol=1e-300)
    # the logits' gradient there too: d = p^(1 + t2 - t1) = e^-750 from log p, not 0 x inf
    logits_grad = jax.grad(lambda a: _loss_total(a, np.asarray([0]), 1.5, 1.0, 0.0, np.ones(1)))(confident)
    np.testing.assert_allclose(logits_grad, 0.0, atol=1e-300)
    # t1 = t2 = 0.8 < 1: the targets lie outside the support: dL/dt1 is the limit y / (1 - t1)^2 plus
    # the p part (the max class, p = 1: 1 / (2 - t1)^2) minus the label's power term per row
    grads = _loss_temperature_grads(a, labels, 0.8, 0.8, 0.0, np.ones(3))
    row = 1 / 0.2**2 - 1 / 1.2**2 + 1 / 1.2**2
    np.testing.assert_allclose(grads[0], 3 * row, rtol=1e-12)


def test_derivatives_are_continuous_through_one():
    """At t = 1 +- 1e-8 the closed forms would cancel catastrophically (their numerators are
    ~ s^2 / 2 with s ~ 1e-8): the series keeps the derivatives within 1e-6 of their t = 1 values."""
    a = _logits(seed=20)
    cotangent = np.ones(ROWS)
    at_one = np.asarray(_loss_temperature_grads(a, INDICES, 1.0, 1.0, 0.1, cotangent))
    for offset in (-1e-8, 1e-8):
        near = _loss_temperature_grads(a, INDICES, 1.0 + offset, 1.0 + offset, 0.1, cotangent)
        np.testing.assert_allclose(near, at_one, rtol=1e-6)
        softmax_near = jax.grad(lambda t: bj.tempered_softmax(a, t)[:, 1].sum())(1.0 + offset)
        np.testing.assert_allclose(softmax_near, jax.grad(lambda t: bj.tempered_softmax(a, t)[:, 1].sum())(1.0),
                                   rtol=1e-6)


def _per_row_differences(f, t1, t2):
    """Each row's (dL_r/dt1_r, dL_r/dt2_r) of per-row losses f(t1, t2): the rows are independent,
    so all rows' temperatures move at once."""
    return ((f(t1 + STEP, t2) - f(t1 - STEP, t2)) / (2 * STEP), (f(t1, t2 + STEP) - f(t1, t2 - STEP)) / (2 * STEP))


@jax.jit
def _per_row_losses(a, labels, t1, t2):
    return bj.bi_tempered_logistic_loss(a, labels, t1, t2, label_smoothing=0.1, axis=1)


def test_per_row_temperatures():
    """Segmentation-shaped logits (N, C, H, W) with axis=1 and one (t1, t2) per pixel (N, H, W): the
    gradient has the rows' shape and is each row's own derivative; the loss equals the 0-d loss
    row by row; t = 1 rows next to t2 < 1 rows with classes outside the support."""
    rng = np.random.default_rng(8)
    a = _logits(seed=9, shape=(2, 4, 3, C))
    a = np.moveaxis(a, -1, 1)  # (2, C, 4, 3)
    labels = rng.integers(0, C, (2, 4, 3))
    labels[0, 1, 1] = -100
    t1 = rng.choice([0.5, 0.8, 1.0], (2, 4, 3))
    t2 = rng.choice([0.7, 1.0, 1.5, 2.0], (2, 4, 3))
    t2[0, 0, 0] = 0.7  # the dominant-class row: classes outside the support
    t1 = np.where(t2 < 1, np.minimum(t1, 0.8), t1)  # smoothed labels outside the support: t1 < 1 keeps L finite
    cotangent = rng.standard_normal((2, 4, 3))
    losses = _per_row_losses(a, labels, t1, t2)
    grads = jax.jit(jax.grad(lambda u1, u2: jnp.sum(cotangent * _per_row_losses(a, labels, u1, u2)),
                             argnums=(0, 1)))(t1, t2)
    assert grads[0].shape == grads[1].shape == t1.shape
    want = _per_row_differences(lambda u1, u2: _per_row_losses(a, labels, u1, u2), t1, t2)
    _assert_close(grads[0], cotangent * want[0])
    _assert_close(grads[1], cotangent * want[1])
    for n, h, w in [(0, 0, 0), (1, 2, 1), (0, 3, 2)]:  # the 0-d loss of single rows [C]
        alone = bj.bi_tempered_logistic_loss(a[n, :, h, w], labels[n, h, w], float(t1[n, h, w]), float(t2[n, h, w]),
                                             label_smoothing=0.1)
        np.testing.assert_allclose(losses[n, h, w], alone, rtol=1e-12)


def test_per_row_temperatures_under_vmap_and_per_example_temperatures():
    """A per-row temperature folds with the rows under vmap; a vmapped 0-d temperature (one per
    example) takes the per-example path; both differentiate."""
    a = jnp.asarray(np.stack([_logits(seed=10), _logits(seed=11)]))
    t2_rows = jnp.asarray([[0.7, 1.0, 1.5, 2.0, 1.2], [1.1, 0.9, 1.0, 1.3, 0.8]])

    def example(a, t1, t2):
        return jnp.sum(bj.bi_tempered_logistic_loss(a, INDICES, t1, t2, label_smoothing=0.1))

    example_grads = jax.jit(jax.grad(example, argnums=(1, 2)))
    grad = jax.jit(jax.vmap(example_grads, in_axes=(0, None, 0)))(a, 0.8, t2_rows)
    for k in range(2):
        want = example_grads(a[k], 0.8, t2_rows[k])
        np.testing.assert_allclose(grad[0][k], want[0], rtol=1e-12)
        np.testing.assert_allclose(grad[1][k], want[1], rtol=1e-12)
    t1s = jnp.asarray([0.6, 1.0])
    grad = jax.jit(jax.vmap(example_grads, in_axes=(0, 0, None)))(a, t1s, 1.5)
    for k in range(2):
        want = example_grads(a[k], t1s[k], 1.5)
        np.testing.assert_allclose([grad[0][k], grad[1][k]], want, rtol=1e-12)


def test_vocab_parallel_loss_and_softmax_temperature_grads_under_eager_shard_map():
    """The vocab-parallel XLA loss and softmax (the same custom VJPs, row sums through the mesh
    axis) differentiate their temperatures, also in a shard_map called outside jit (a one-device
    mesh here; tests/test_vocab_parallel_jax.py shards the classes over 4)."""
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    a = _logits(seed=25)
    g = np.random.default_rng(26).standard_normal(a.shape)

    def parallel_loss(t1, t2):
        losses = jax.shard_map(lambda a: bj.vocab_parallel_bi_tempered_logistic_loss(
            a, INDICES, t1, t2, "model", label_smoothing=0.1), mesh=mesh, in_specs=P(None, "model"), out_specs=P())
        return jnp.sum(losses(a))

    def parallel_softmax(t):
        p = jax.shard_map(lambda a: bj.vocab_parallel_tempered_softmax(a, t, "model"), mesh=mesh,
                          in_specs=P(None, "model"), out_specs=P(None, "model"))
        return jnp.sum(g * p(a))

    # the values, without differentiation: the rules are bound by the eager shard_map itself
    np.testing.assert_allclose(parallel_loss(0.8, 0.7), _loss_total(a, INDICES, 0.8, 0.7, 0.1, np.ones(ROWS)),
                               rtol=1e-12)
    np.testing.assert_allclose(parallel_softmax(1.3), jnp.sum(g * bj.tempered_softmax(a, 1.3)), rtol=1e-12)
    want = _loss_temperature_grads(a, INDICES, 0.8, 0.7, 0.1, np.ones(ROWS))
    np.testing.assert_allclose(jax.grad(parallel_loss, argnums=(0, 1))(0.8, 0.7), want, rtol=1e-12)
    want = jax.grad(lambda t: jnp.sum(g * bj.tempered_softmax(a, t)))(1.3)
    np.testing.assert_allclose(jax.grad(parallel_softmax)(1.3), want, rtol=1e-12)


def test_binary_loss_temperature_grads():
    x = np.random.default_rng(12).standard_normal(7) * 4
    y = np.random.default_rng(13).uniform(size=7)

    @jax.jit
    def losses(t1, t2):
        return bj.bi_tempered_binary_logistic_loss(x, y, t1, t2, label_smoothing=0.05)

    def total(t1, t2):
        return jnp.sum(losses(t1, t2))

    total_grads = jax.jit(jax.grad(total, argnums=(0, 1)))
    for t1, t2 in [(0.5, 0.7), (1.0, 1.0), (0.8, 2.0)]:
        _assert_close(total_grads(t1, t2), _central_differences(total, t1, t2))
    # one temperature per element: each element's own derivative
    t1_elements, t2_elements = np.linspace(0.5, 1.0, 7), np.linspace(0.7, 2.0, 7)
    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(t1_elements, t2_elements)
    want = _per_row_differences(losses, t1_elements, t2_elements)
    _assert_close(grads[0], want[0])
    _assert_close(grads[1], want[1])


@pytest.mark.parametrize("t", [0.6, 1.0, 1.7])
def test_softmax_and_sigmoid_temperature_grads(t):
    a = _logits(seed=14)
    g = np.random.default_rng(15).standard_normal(a.shape)

    @jax.jit
    def softmax_total(t):
        return jnp.sum(g * bj.tempered_softmax(a, t))

    _assert_close(jax.grad(softmax_total)(t), (softmax_total(t + STEP) - softmax_total(t - STEP)) / (2 * STEP))
    # one t per row (classes on axis 0 here: the rows are the columns)
    t_rows = np.linspace(t, t + 0.3, ROWS)
    per_row = jax.grad(lambda t: jnp.sum(g.T * bj.tempered_softmax(a.T, t, axis=0)))(t_rows)
    want = (jnp.sum(g.T * bj.tempered_softmax(a.T, t_rows + STEP, axis=0), axis=0)
            - jnp.sum(g.T * bj.tempered_softmax(a.T, t_rows - STEP, axis=0), axis=0)) / (2 * STEP)
    assert per_row.shape == (ROWS,)
    _assert_close(per_row, want)
    x = a[:, 1]

    @jax.jit
    def sigmoid_total(t):
        return jnp.sum(g[:, 0] * bj.tempered_sigmoid(x, t))

    _assert_close(jax.grad(sigmoid_total)(t), (sigmoid_total(t + STEP) - sigmoid_total(t - STEP)) / (2 * STEP))


def test_tempered_functions_temperature_derivatives():
    """log_t, exp_t (elementwise, at fixed argument) and compute_normalization (through the
    converged normalizer) differentiate with respect to t; x = 0 takes log_t's limit -1/(1-t)^2."""
    x = jnp.asarray([0.0, 1e-5, 0.3, 1.0, 2.5])
    u = jnp.asarray([-5.0, -1.0, 0.0, 0.7, 1.5])
    a = _logits(seed=23)
    for t in (0.5, 1.0, 1.5):
        for fn, arg in ((bj.log_t, x[1:]), (bj.exp_t, u)):
            derivative = jax.jacfwd(fn, argnums=1)(arg, t)
            _assert_close(derivative, (fn(arg, t + STEP) - fn(arg, t - STEP)) / (2 * STEP))

        def total(t):
            return jnp.sum(bj.compute_normalization(a, t))

        _assert_close(jax.grad(total)(t), (total(t + STEP) - total(t - STEP)) / (2 * STEP))
    assert jax.grad(lambda t: bj.log_t(x, t)[0])(0.5) == -4.0
    with pytest.raises(ValueError, match="num_iters"):
        jax.grad(lambda t: jnp.sum(bj.compute_normalization(a, t, num_iters=3)))(1.5)


def test_num_iters_with_a_differentiated_temperature_raises():
    a = _logits(seed=16)
    with pytest.raises(ValueError, match="num_iters"):
        jax.grad(lambda t1: bj.bi_tempered_logistic_loss(a, INDICES, t1, 1.5, num_iters=5).sum())(0.8)
    with pytest.raises(ValueError, match="num_iters"):
        jax.grad(lambda t: bj.tempered_softmax(a, t, num_iters=5)[:, 0].sum())(1.5)
    # the logits' gradient at num_iters=k needs no temperature derivative
    grad = jax.grad(lambda a: bj.bi_tempered_logistic_loss(a, INDICES, 0.8, 1.5, num_iters=5).sum())(a)
    assert np.isfinite(grad).all()


def test_original_algorithm_with_per_row_temperatures():
    """num_iters=k takes each row's method (bisection, logsumexp, fixed point) at run time."""
    a = _logits(seed=17)
    t2 = np.asarray([0.7, 1.0, 1.5, 0.5, 2.0])
    together = bj.bi_tempered_logistic_loss(a, INDICES, 0.8, t2, num_iters=6)
    alone = [bj.bi_tempered_logistic_loss(a[r], INDICES[r], 0.8, t2[r], num_iters=6) for r in range(ROWS)]
    np.testing.assert_allclose(together, alone, rtol=1e-12)
    p = bj.tempered_softmax(a, t2, num_iters=6)
    np.testing.assert_allclose(p[3], bj.tempered_softmax(a[3], 0.5, num_iters=6), rtol=1e-12)


def test_one_compile_for_every_temperature_and_no_extra_work_without_their_gradient(monkeypatch):
    """A jitted step with traced temperatures compiles once for new temperature values, whether or
    not it differentiates them; the temperature terms are traced only where a temperature is
    differentiated."""
    traced_terms = []
    terms = native_temperature.loss_temperature_terms
    monkeypatch.setattr(native_temperature, "loss_temperature_terms",
                        lambda *args: traced_terms.append(1) or terms(*args))
    a = jnp.asarray(_logits(seed=18, shape=(3, 11)))  # a shape no other test uses: fresh traces
    labels = jnp.asarray([0, 4, 10])

    def loss(a, t1, t2):
        return bj.bi_tempered_logistic_loss(a, labels, t1, t2).sum()

    logits_only = jax.jit(jax.grad(loss))
    with_temperatures = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for t1, t2 in [(0.5, 1.5), (0.9, 0.7)]:
        logits_only(a, t1, t2)
    assert logits_only._cache_size() == 1 and not traced_terms
    for t1, t2 in [(0.5, 1.5), (0.9, 0.7)]:
        grads = with_temperatures(a, t1, t2)
    assert with_temperatures._cache_size() == 1 and len(traced_terms) == 1
    np.testing.assert_allclose(grads[0], logits_only(a, 0.9, 0.7), rtol=1e-12)


def test_bad_temperature_shapes_and_values():
    a = _logits(seed=19)
    with pytest.raises(ValueError, match=r"t1 .*\(5,\).*got shape \(4,\)"):
        bj.bi_tempered_logistic_loss(a, INDICES, np.full(4, 0.8), 1.5)
    with pytest.raises(ValueError, match=r"t2 .*\(5,\).*got shape \(5, 1\)"):
        bj.bi_tempered_logistic_loss(a, INDICES, 0.8, np.full((5, 1), 1.5))
    with pytest.raises(ValueError, match=r"t .*\(5,\).*got shape \(6,\)"):
        bj.tempered_softmax(a, np.full(C, 1.5))
    with pytest.raises(ValueError, match=r"t .*\(6,\).*got shape \(5,\)"):
        bj.tempered_sigmoid(a[0], np.full(ROWS, 1.5))
    with pytest.raises(ValueError, match="t1 must be in"):
        bj.bi_tempered_logistic_loss(a, INDICES, np.asarray([0.5, 0.8, 2.0, 1.0, 1.0]), 1.5)
    with pytest.raises(ValueError, match="t2 must be > 0"):
        bj.bi_tempered_logistic_loss(a, INDICES, 0.8, np.asarray([1.5, np.nan, 1.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="t1"):
        bj.bi_tempered_logistic_loss(a, INDICES, np.ones(ROWS, bool), 1.5)
    # traced per-row temperatures are not checked (no host sync), but their shape is
    jax.jit(lambda t: bj.bi_tempered_logistic_loss(a, INDICES, 0.8, t))(jnp.full(ROWS, 1.5))


# --------------------------------------------------------------------------------------------
# Triton (float32) against the float64 XLA values
# --------------------------------------------------------------------------------------------

def _float32(x):
    """float32 data, and the same values in float64 for the reference."""
    x32 = np.asarray(x, np.float32)
    return x32, x32.astype(np.float64)


def _assert_float32_close(got, want):
    """float32 against float64: relative 3e-5 and 2e-6 of the largest derivative (a row's
    derivative can be a small difference of O(1) sums, computed in float32)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=3e-5, atol=2e-6 * max(np.abs(want).max(), 1.0))


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
def test_triton_loss_temperature_grads(triton_backend, per_row):  # noqa: F811
    a32, a64 = _float32(_logits(seed=20, shape=(4, 7)))
    labels = np.asarray([0, 3, -100, 6])
    cotangent = np.asarray([1.0, -0.5, 2.0, 0.7])
    temperatures = [(0.8, 1.2), (0.5, 0.7), (1.0, 1.0)]
    if per_row:
        temperatures = [tuple(np.asarray(t, np.float32) for t in zip(*temperatures, (0.9, 2.0)))]

    def grads(a, t1, t2, backend, smoothing):
        def total(t1, t2):
            return jnp.sum(cotangent * bj.bi_tempered_logistic_loss(a, labels, t1, t2, label_smoothing=smoothing,
                                                                     backend=backend))
        return jax.grad(total, argnums=(0, 1))(t1, t2)

    for t1, t2 in temperatures:
        want = grads(a64, np.float64(t1), np.float64(t2), "xla", 0.1)
        got = grads(a32, np.float32(t1), np.float32(t2), "triton", 0.1)
        assert got[0].dtype == jnp.float32 and got[0].shape == np.shape(t1)
        _assert_float32_close(got, want)


def test_triton_softmax_sigmoid_and_binary_temperature_grads(triton_backend):  # noqa: F811
    a32, a64 = _float32(_logits(seed=21, shape=(3, 7)))
    g = np.random.default_rng(22).standard_normal(a32.shape).astype(np.float32)

    def softmax_grad(a, t, backend):
        return jax.grad(lambda t: jnp.sum(g * bj.tempered_softmax(a, t, backend=backend)))(t)

    for t in (0.6, 1.0, 1.7):
        _assert_float32_close(softmax_grad(a32, np.float32(t), "triton"), softmax_grad(a64, t, "xla"))
    t_rows = np.asarray([0.6, 1.0, 1.7], np.float32)
    _assert_float32_close(softmax_grad(a32, t_rows, "triton"), softmax_grad(a64, t_rows.astype(np.float64), "xla"))
    x32, x64 = a32[:, 1], a64[:, 1]
    y = np.asarray([0.2, 0.9, 0.5], np.float32)

    def sigmoid_grad(x, t, backend):
        return jax.grad(lambda t: jnp.sum(g[:, 0] * bj.tempered_sigmoid(x, t, backend=backend)))(t)

    def binary_grads(x, t1, t2, backend):
        return jax.grad(lambda t1, t2: jnp.sum(bj.bi_tempered_binary_logistic_loss(x, y, t1, t2, backend=backend)),
                        argnums=(0, 1))(t1, t2)

    _assert_float32_close(sigmoid_grad(x32, np.float32(1.4), "triton"), sigmoid_grad(x64, 1.4, "xla"))
    _assert_float32_close(binary_grads(x32, np.float32(0.7), np.float32(1.3), "triton"),
                          binary_grads(x64, 0.7, 1.3, "xla"))


def test_triton_elementwise_temperatures(triton_backend):  # noqa: F811
    """One temperature per element for the binary loss and the sigmoid on the Triton backend (the
    binary kernels take one per call: the row kernels run on the two-class rows [0, x]): the
    values, the logits' gradient and the temperatures', with ignored elements and weights; a 0-d
    t1 next to a per-element t2."""
    x32, x64 = _float32(np.random.default_rng(24).standard_normal(5) * 3)
    y = np.asarray([0.2, 0.9, -1.0, 0.0, 1.0], np.float32)  # the third ignored (ignore_index=-1)
    weights = np.asarray([1.0, 0.5, 2.0, 1.5, 0.7], np.float32)
    t1, t2 = np.linspace(0.5, 1.0, 5, dtype=np.float32), np.linspace(0.7, 2.0, 5, dtype=np.float32)

    def binary(x, t1, t2, backend):
        def total(x, t1, t2):
            return bj.bi_tempered_binary_logistic_loss(x, y, t1, t2, label_smoothing=0.05, ignore_index=-1,
                                                       reduction="mean", sample_weight=weights, backend=backend)
        return total(x, t1, t2), jax.grad(total, argnums=(0, 1, 2))(x, t1, t2)

    def sigmoid(x, t, backend):
        def total(x, t):
            return jnp.sum(weights * bj.tempered_sigmoid(x, t, backend=backend))
        return bj.tempered_sigmoid(x, t, backend=backend), jax.grad(total, argnums=(0, 1))(x, t)

    def assert_all_close(got, want):
        for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert got_leaf.dtype == jnp.float32 and got_leaf.shape == want_leaf.shape
            _assert_float32_close(got_leaf, want_leaf)

    for u1 in (t1, np.float32(0.8)):
        assert_all_close(binary(x32, u1, t2, "triton"), binary(x64, u1.astype(np.float64), t2.astype(np.float64),
                                                               "xla"))
    assert_all_close(sigmoid(x32, t2, "triton"), sigmoid(x64, t2.astype(np.float64), "xla"))
