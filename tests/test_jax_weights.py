"""Per-class ``weight=`` and per-example ``sample_weight=`` of the JAX losses (issue 23).

- Tempered settings: the plain loss (XLA and the Triton path: real jax-triton on a GPU, else the
  interpreter stand-in of tests/test_jax_triton.py) and the fused linear loss (``class_weight=``)
  equal the float64 reference's weighted sums, every reduction, with ignored rows and smoothing,
  values and gradients ("mean" = sum(w L) / sum(w) over the kept rows, w = weight[target] x
  sample_weight).
- t1 = t2 = 1: ``torch.nn.functional.cross_entropy(weight=..., ignore_index=...)`` to rounding,
  every reduction, values and gradients; with smoothing (our convention: target 1 - s, others
  s/(C-1)) a dense-label F.cross_entropy of the smoothed rows weighted by weight[target] (plus the
  label entropy: this loss is the KL divergence); optax per row.
- The weights' own gradient, when asked for, is exact (float64 finite differences); none otherwise.
- New weight values never retrace (traced operands); bad weights raise naming the argument.
The vocab-parallel loss: tests/test_vocab_parallel_jax_weights.py (host devices).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from bitempered import jax as bj
from bitempered.bindings.jax import ops
from interpreter_warnings import EXPECTED as pytestmark  # noqa: F401  (the interpreter's expected warnings)
from test_jax_triton import triton_backend  # noqa: F401  (the fixture: real jax-triton or the stand-in)

C = 7
SHAPE = (2, 5)  # rows; N = 10
REDUCTIONS = ("none", "sum", "mean")


@pytest.fixture(params=["xla", "triton"])
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    return request.param


def _data(seed=0, ignore=-100):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(SHAPE + (C,)) * 2.0).astype(np.float32)
    indices = rng.integers(0, C, SHAPE).astype(np.int32)
    indices[0, 3] = indices[1, 0] = ignore
    weight = rng.uniform(0.2, 3.0, C).astype(np.float32)
    weight[2] = 0.0  # a class with weight 0
    sample_weight = rng.uniform(0.0, 2.0, SHAPE).astype(np.float32)
    return logits, indices, weight, sample_weight


def _factors(indices, weight, sample_weight, ignore=-100):
    """Each row's weight in float64, 0 on ignored rows (the reference's side)."""
    kept = indices != ignore
    w = np.ones(indices.shape)
    if weight is not None:
        w = w * np.asarray(weight, np.float64)[np.where(kept, indices, 0)]
    if sample_weight is not None:
        w = w * np.asarray(sample_weight, np.float64)
    return w * kept


def _weighted_truth(logits, indices, weight, sample_weight, t1, t2, s, reduction):
    """(reduced loss, gradient of its sum) of the float64 reference weighted by hand."""
    dense, kept = ref.one_hot(indices, C)
    w = _factors(indices, weight, sample_weight)
    per_row = ref.loss(logits, dense, t1, t2, s) * kept * w
    grad = ref.loss_grad(logits, dense, t1, t2, s) * (kept * w)[..., None]
    if reduction == "none":
        return per_row, grad
    if reduction == "sum":
        return per_row.sum(), grad
    return per_row.sum() / w.sum(), grad / w.sum()


WEIGHTINGS = [("weight", True, False), ("sample_weight", False, True), ("both", True, True)]


def value_and_grad_of_sum(loss):
    """jit((loss(a, t1, t2, s), d sum(loss) / da)): the temperatures and smoothing traced, so one
    program serves every setting of a test."""
    return jax.jit(lambda a, *scalars: (loss(a, *scalars), jax.grad(lambda a: loss(a, *scalars).sum())(a)))


SETTINGS = [(0.8, 1.2, 0.1), (0.5, 0.7, 0.0), (1.0, 1.0, 0.1)]  # (t1, t2, label_smoothing)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_plain_matches_weighted_reference(backend, reduction):
    logits, indices, all_weights, all_sample_weights = _data()
    for which, use_weight, use_sample in WEIGHTINGS:
        weight, sample_weight = (all_weights if use_weight else None), (all_sample_weights if use_sample else None)
        run = value_and_grad_of_sum(lambda a, t1, t2, s: bj.bi_tempered_logistic_loss(
            a, indices, t1, t2, label_smoothing=s, backend=backend, reduction=reduction, weight=weight,
            sample_weight=sample_weight))
        for t1, t2, s in SETTINGS:
            value, grad = run(logits, t1, t2, s)
            want, want_grad = _weighted_truth(logits, indices, weight, sample_weight, t1, t2, s, reduction)
            where = f"{which} {reduction} t1={t1} t2={t2} s={s}"
            assert value.dtype == jnp.float32 and grad.dtype == jnp.float32, where
            np.testing.assert_allclose(value, want, rtol=2e-5, atol=1e-6, err_msg=where)
            np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6, err_msg=where)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_matches_weighted_reference(reduction):
    """class_weight= (``weight`` is the projection there) and sample_weight=, chunked (3 rows per
    chunk, a padded tail), float64; gradients of hidden, weight and bias by the chain rule."""
    logits, indices, weight, sample_weight = _data(1)
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        hidden = rng.standard_normal(SHAPE + (4,))
        proj, bias = rng.standard_normal((C, 4)), rng.standard_normal(C)
        a = hidden @ proj.T + bias

        def loss(x, w, b):
            return bj.linear_bi_tempered_logistic_loss(x, w, indices, 0.8, 1.2, bias=b, label_smoothing=0.1,
                                                       reduction=reduction, chunk_size=3, class_weight=weight,
                                                       sample_weight=sample_weight)
        value = loss(hidden, proj, bias)
        grads = jax.grad(lambda *p: loss(*p).sum(), argnums=(0, 1, 2))(hidden, proj, bias)
    want, dlogits = _weighted_truth(a, indices, weight, sample_weight, 0.8, 1.2, 0.1, reduction)
    np.testing.assert_allclose(value, want, rtol=1e-10, atol=1e-12)
    flat = dlogits.reshape(-1, C)
    for got, expected in zip(grads, (dlogits @ proj, flat.T @ hidden.reshape(-1, 4), flat.sum(0))):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_linear_triton_path(triton_backend):  # noqa: F811
    logits, indices, weight, sample_weight = _data(3)
    proj = np.eye(C, dtype=np.float32)
    for reduction in REDUCTIONS:
        def loss(a):
            return bj.linear_bi_tempered_logistic_loss(a, proj, indices, 0.8, 1.2, label_smoothing=0.1,
                                                       reduction=reduction, chunk_size=4, backend="triton",
                                                       class_weight=weight, sample_weight=sample_weight)
        want, want_grad = _weighted_truth(logits, indices, weight, sample_weight, 0.8, 1.2, 0.1, reduction)
        np.testing.assert_allclose(loss(logits), want, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(jax.grad(lambda a: loss(a).sum())(logits), want_grad, rtol=1e-4, atol=1e-6)


def test_binary_sample_weight_with_ignored_elements(backend):
    """The binary loss's sample_weight (the logits' shape), with elements skipped by ignore_index."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((3, 7)) * 2.0).astype(np.float32)
    y = rng.uniform(size=x.shape).astype(np.float32)
    y[0, 2] = y[2, 5] = 255
    kept = y != 255
    sample_weight = rng.uniform(0.0, 2.0, x.shape).astype(np.float32)
    logits2 = np.stack([np.zeros_like(x), x], -1).astype(np.float64)
    y_kept = np.where(kept, y, 0.0)
    labels2 = np.stack([1.0 - y_kept, y_kept], -1)
    w = sample_weight * kept
    for reduction in REDUCTIONS:
        run = value_and_grad_of_sum(lambda v, t1, t2, s: bj.bi_tempered_binary_logistic_loss(
            v, y, t1, t2, label_smoothing=s, backend=backend, ignore_index=255, reduction=reduction,
            sample_weight=sample_weight))
        for t1, t2, s in SETTINGS:
            per_element = ref.loss(logits2, labels2, t1, t2, s) * w
            grad = ref.loss_grad(logits2, labels2, t1, t2, s)[..., 1] * w
            scale = 1.0 / w.sum() if reduction == "mean" else 1.0
            want = per_element if reduction == "none" else per_element.sum() * scale
            value, got_grad = run(x, t1, t2, s)
            where = f"{reduction} t1={t1} t2={t2} s={s}"
            np.testing.assert_allclose(value, want, rtol=2e-5, atol=1e-6, err_msg=where)
            np.testing.assert_allclose(got_grad, grad * scale, rtol=1e-4, atol=1e-7, err_msg=where)
    with pytest.raises(ValueError, match=r"sample_weight must have the logits' shape \(3, 7\), got shape \(3,\)"):
        bj.bi_tempered_binary_logistic_loss(x, y, 0.8, 1.2, ignore_index=255, sample_weight=sample_weight[:, 0])


# ---------------------------------------------------------------------------------------------
# t1 = t2 = 1: torch's F.cross_entropy(weight=...) and optax
# ---------------------------------------------------------------------------------------------

def _torch_cross_entropy(logits, indices, weight, reduction, smoothing=0.0):
    """F.cross_entropy(weight=..., ignore_index=-100) and its logits gradient (of its sum), float64.
    With smoothing: the smoothed one-hot rows of our convention as probability targets, each row
    times weight[target] plus its label entropy, ignored rows dropped, reduced by hand."""
    import torch
    import torch.nn.functional as F

    a = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    flat, idx = a.reshape(-1, C), torch.tensor(indices.reshape(-1), dtype=torch.long)
    w = torch.tensor(weight, dtype=torch.float64)
    if smoothing == 0.0:
        out = F.cross_entropy(flat, idx, weight=w, ignore_index=-100, reduction=reduction)
    else:
        kept = idx != -100
        target = torch.where(kept, idx, 0)
        y = torch.tensor(ref.smooth(ref.one_hot(indices.reshape(-1), C)[0], smoothing))
        entropy = torch.special.xlogy(y, y).sum(-1)
        row_w = w[target] * kept
        per_row = (F.cross_entropy(flat, y, reduction="none") + entropy) * row_w
        out = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / row_w.sum()}[reduction]
    out.sum().backward()
    return out.detach().numpy().reshape(indices.shape if reduction == "none" else ()), a.grad.numpy()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_weight_equals_torch(reduction):
    logits, indices, weight, _ = _data(4)
    with jax.enable_x64(True):
        a = jnp.asarray(logits, jnp.float64)
        losses = {
            "plain": lambda a, s: bj.bi_tempered_logistic_loss(a, indices, 1.0, 1.0, label_smoothing=s,
                                                               reduction=reduction, weight=weight),
            "linear": lambda a, s: bj.linear_bi_tempered_logistic_loss(
                a, jnp.eye(C, dtype=jnp.float64), indices, 1.0, 1.0, label_smoothing=s, reduction=reduction,
                chunk_size=4, class_weight=weight),
        }
        for name, loss in losses.items():
            run = value_and_grad_of_sum(loss)
            for smoothing in (0.0, 0.2):
                want, want_grad = _torch_cross_entropy(logits, indices, weight, reduction, smoothing)
                value, grad = run(a, jnp.float64(smoothing))
                where = f"{name} smoothing={smoothing}"
                np.testing.assert_allclose(value, want, rtol=1e-12, atol=1e-14, err_msg=where)
                np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-14, err_msg=where)


def test_cross_entropy_weights_equal_optax_rows():
    """optax's per-row cross-entropy (no weights of its own) times weight[target] x sample_weight."""
    optax = pytest.importorskip("optax")
    logits, indices, weight, sample_weight = _data(5, ignore=3)
    indices[0, 3] = indices[1, 0] = 0  # no ignored rows here (optax has no ignore_index)
    w = weight[indices] * sample_weight
    want = optax.softmax_cross_entropy_with_integer_labels(logits, indices) * w
    got = bj.bi_tempered_logistic_loss(logits, indices, 1.0, 1.0, ignore_index=None, weight=weight,
                                       sample_weight=sample_weight)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    mean = jax.grad(lambda a: bj.bi_tempered_logistic_loss(a, indices, 1.0, 1.0, reduction="mean", weight=weight,
                                                           sample_weight=sample_weight))(logits)
    want_mean = jax.grad(lambda a: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(a, indices) * w)
                         / jnp.sum(w))(logits)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# gradients of the weights, recompilation, bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weight_gradients_are_exact(reduction):
    """d loss / d weight and d loss / d sample_weight equal float64 central differences (the loss is
    a ratio of linear functions of the weights: differences exact to rounding), plain and linear."""
    logits, indices, weight, sample_weight = _data(6)
    with jax.enable_x64(True):
        weight, sample_weight = np.asarray(weight, np.float64) + 0.1, np.asarray(sample_weight, np.float64)
        a = jnp.asarray(logits, jnp.float64)
        losses = {
            "plain": lambda w, sw: bj.bi_tempered_logistic_loss(a, indices, 0.8, 1.2, label_smoothing=0.1,
                                                                reduction=reduction, weight=w,
                                                                sample_weight=sw).sum(),
            "linear": lambda w, sw: bj.linear_bi_tempered_logistic_loss(
                a, jnp.eye(C, dtype=jnp.float64), indices, 0.8, 1.2, label_smoothing=0.1, reduction=reduction,
                chunk_size=3, class_weight=w, sample_weight=sw).sum(),
        }
        for name, loss in losses.items():
            loss = jax.jit(loss)  # one program for every weight value of the differences
            grads = jax.grad(loss, argnums=(0, 1))(weight, sample_weight)
            for which, (values, grad) in enumerate(zip((weight, sample_weight), grads)):
                flat = values.reshape(-1)
                numeric = np.zeros(flat.shape)
                for k in range(flat.size):
                    step = np.zeros(flat.shape)
                    step[k] = 1e-6
                    args_plus = [weight, sample_weight]
                    args_minus = [weight, sample_weight]
                    args_plus[which] = (flat + step).reshape(values.shape)
                    args_minus[which] = (flat - step).reshape(values.shape)
                    numeric[k] = (float(loss(*args_plus)) - float(loss(*args_minus))) / 2e-6
                np.testing.assert_allclose(np.asarray(grad).reshape(-1), numeric, rtol=1e-7, atol=1e-9,
                                           err_msg=f"{name} argument {which}")
    # not asked for: grad of the logits only (weights are constants); ignored rows: exact 0
    grad = jax.grad(lambda a: bj.bi_tempered_logistic_loss(a, indices, 0.8, 1.2, weight=weight).sum())(logits)
    assert (np.asarray(grad)[indices == -100] == 0).all()


def test_new_weight_values_do_not_retrace():
    logits, indices, weight, sample_weight = _data(7)
    traces = []

    @jax.jit
    def step(a, w, sw):
        traces.append(1)
        return jax.value_and_grad(lambda a: bj.bi_tempered_logistic_loss(a, indices, 0.8, 1.2, reduction="mean",
                                                                         weight=w, sample_weight=sw))(a)

    first = step(logits, weight, sample_weight)
    second = step(logits, weight * 2.0 + 1.0, sample_weight[::-1].copy())
    assert len(traces) == 1
    assert not np.allclose(first[0], second[0])
    # the public call outside a user jit: the compiled core is reused for new weight values
    bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2, reduction="mean", weight=weight)
    size = ops.loss_jit._cache_size()
    bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2, reduction="mean", weight=weight + 0.5)
    assert ops.loss_jit._cache_size() == size


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_weights_add_no_n_by_c_buffer(reduction):
    """The compiled XLA training step with both weights holds O(N) more bytes than without them
    (measured: one [N] fp32 vector), never an N x C buffer (4 N C bytes); compiled, not run."""
    n, c = 1024, 8192
    shapes = (jax.ShapeDtypeStruct((n, c), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32),
              jax.ShapeDtypeStruct((c,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32),
              jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))

    def held_bytes(weighted):
        def loss(a, y, w, sw, t1, t2):
            weights = dict(weight=w, sample_weight=sw) if weighted else {}
            return bj.bi_tempered_logistic_loss(a, y, t1, t2, backend="xla", reduction=reduction, **weights).sum()
        analysis = jax.jit(jax.value_and_grad(loss)).lower(*shapes).compile().memory_analysis()
        if analysis is None:
            pytest.skip("XLA gives no memory analysis on this platform")
        return analysis.temp_size_in_bytes + analysis.output_size_in_bytes

    assert held_bytes(True) - held_bytes(False) <= 16 * n


def _calls(logits, indices):
    """Each loss as a function of (labels, weight, sample_weight), naming its class weights."""
    proj = np.eye(C, dtype=np.float32)
    return {
        "weight": lambda y, w, sw: bj.bi_tempered_logistic_loss(logits, y, 0.8, 1.2, weight=w, sample_weight=sw),
        "class_weight": lambda y, w, sw: bj.linear_bi_tempered_logistic_loss(logits, proj, y, 0.8, 1.2,
                                                                             class_weight=w, sample_weight=sw),
    }


BAD_WEIGHTS = [  # (weight, error, message after the name)
    (np.ones(C - 1), ValueError, rf"must be a 1-D array of the {C} class weights \(shape \({C},\)\), got shape "
                                 rf"\({C - 1},\)"),
    (np.ones((1, C)), ValueError, rf"must be a 1-D array of the {C} class weights .*got shape \(1, {C}\)"),
    (np.float32(2.0), ValueError, rf"must be a 1-D array of the {C} class weights .*got shape \(\)"),
    (-np.ones(C), ValueError, r"must hold finite values >= 0, got values from -1.0 to -1.0"),
    (np.r_[np.ones(C - 1), np.nan], ValueError, "must hold finite values >= 0, got NaN"),
    (np.r_[np.ones(C - 1), np.inf], ValueError, "must hold finite values >= 0, got values from 1.0 to inf"),
    (jnp.asarray(np.r_[np.ones(C - 1), -0.5]), ValueError, "must hold finite values >= 0, got values from -0.5"),
    (np.ones(C, bool), TypeError, r"must be a real \(floating or integer\) array, got dtype bool"),
    (np.ones(C, np.complex64), TypeError, "must be a real"),
]


@pytest.mark.parametrize("bad,error,match", BAD_WEIGHTS)
def test_bad_class_weights_name_the_argument(bad, error, match):
    logits, indices, _, _ = _data(8)
    for name, call in _calls(logits, indices).items():
        with pytest.raises(error, match=f"^{name} {match}"):
            call(indices, bad, None)


@pytest.mark.parametrize("bad,error,match", [
    (np.ones(SHAPE[::-1]), ValueError, r"sample_weight must have the logits' shape without the class axis "
                                       r"\(2, 5\), got shape \(5, 2\)"),
    (np.ones(SHAPE + (1,)), ValueError, r"got shape \(2, 5, 1\)"),
    (-np.ones(SHAPE), ValueError, "sample_weight must hold finite values >= 0"),
    (np.full(SHAPE, np.nan), ValueError, "sample_weight must hold finite values >= 0, got NaN"),
    (np.ones(SHAPE, bool), TypeError, "sample_weight must be a real"),
])
def test_bad_sample_weights(bad, error, match):
    logits, indices, _, _ = _data(9)
    for call in _calls(logits, indices).values():
        with pytest.raises(error, match=match):
            call(indices, None, bad)


def test_class_weights_need_class_indices():
    """Dense labels with per-class weights raise (see bindings/common/validation.py for why);
    sample_weight works with dense labels."""
    logits, indices, weight, sample_weight = _data(10)
    dense = ref.one_hot(indices, C)[0].astype(np.float32)
    for name, call in _calls(logits, indices).items():
        with pytest.raises(ValueError, match=rf"^{name}= \(per-class weights\) is supported with class-index "
                                             "labels only: .*not a proper loss.*"
                                             "weight rows with sample_weight= instead$"):
            call(dense, weight, None)
    got = bj.bi_tempered_logistic_loss(logits, dense, 0.8, 1.2, sample_weight=sample_weight, reduction="mean")
    per_row = ref.loss(logits, dense, 0.8, 1.2)
    np.testing.assert_allclose(got, (per_row * sample_weight).sum() / sample_weight.sum(), rtol=2e-5)


def test_traced_weights_and_empty_batch():
    """Traced weights are not checked (a host sync): they run as given; an empty batch reduces
    to 0 ("sum") and NaN ("mean") with weights too; integer weights are accepted."""
    logits, indices, weight, _ = _data(11)
    traced = jax.jit(lambda w: bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2, weight=w))(-weight)
    np.testing.assert_allclose(traced, -bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2, weight=weight),
                               rtol=1e-6)
    empty = np.zeros((0, C), np.float32)
    no_rows = np.zeros((0,), np.int32)
    assert float(bj.bi_tempered_logistic_loss(empty, no_rows, 0.8, 1.2, reduction="sum", weight=weight)) == 0.0
    assert np.isnan(float(bj.bi_tempered_logistic_loss(empty, no_rows, 0.8, 1.2, reduction="mean", weight=weight,
                                                       sample_weight=np.zeros((0,)))))
    integer = bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2, weight=np.arange(C))
    np.testing.assert_allclose(integer, bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2,
                                                                     weight=np.arange(C, dtype=np.float32)))
