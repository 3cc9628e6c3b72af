"""``bitempered.original.{jax,torch}``: the original package's API, computed by this library.

- The original package's own test file (``jax_bitempered_loss/loss_test.py``) runs unchanged but
  for its ``import loss`` line, against ``bitempered.original.jax``. None of its cases hits a value
  the original gets wrong, so all of them must pass (no xfail).
- The same published cases through ``bitempered.original.torch``, compared with the JAX drop-in.
- Signatures, keyword calls, defaults (num_iters=5: the installed original's numbers on random
  inputs), ``num_iters=None`` (converged: tests/reference.py), gradients, the sparse loss, and the
  documented differences (SPEC values where the originals give NaN or drop the label entropy).
- The public ``log_t``, ``exp_t``, ``compute_normalization`` of bitempered.jax / bitempered.torch
  against the float64 reference, with their gradients.
"""

from __future__ import annotations

import importlib.util
import inspect
import types
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import jax.numpy as jnp  # noqa: E402

import reference as ref  # noqa: E402
from bitempered import jax as bj  # noqa: E402
from bitempered import torch as bt  # noqa: E402
from bitempered.original import jax as oj  # noqa: E402
from bitempered.original import torch as ot  # noqa: E402

NAMES = ["log_t", "exp_t", "compute_normalization", "compute_normalization_fixed_point",
         "compute_normalization_binary_search", "tempered_softmax", "tempered_sigmoid",
         "bi_tempered_logistic_loss", "bi_tempered_binary_logistic_loss", "sparse_bi_tempered_logistic_loss"]
# The TensorFlow original's function (google/bi-tempered-loss, tensorflow/loss.py); the JAX package lacks it.
SPARSE_PARAMETERS = [("activations", None), ("labels", None), ("t1", None), ("t2", None), ("num_iters", 5)]
PUBLISHED_ACTIVATIONS = [[-0.5, 0.1, 2.0], [0.1, 1.5, -5.0], [4.0, -3.0, -6.0]]
PUBLISHED_LABELS = [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.2, 0.8, 0.0]]


def rng(seed):
    return np.random.default_rng(seed)


def as_torch(x, dtype=torch.float32):
    return torch.tensor(np.asarray(x), dtype=dtype)


def parameters(function):
    return [(p.name, None if p.default is inspect.Parameter.empty else p.default)
            for p in inspect.signature(function).parameters.values()]


# --- The original package's test file, unchanged but for its import -------------------------------

def _published_test_module():
    """The original's loss_test.py executed with ``import loss`` pointed at the drop-in, or None
    when the package (the ``test`` extra) is not installed."""
    spec = importlib.util.find_spec("jax_bitempered_loss")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "loss_test.py"
    source = path.read_text()
    assert source.count("\nimport loss\n") == 1, "the published test file's import line changed"
    source = source.replace("\nimport loss\n", "\nfrom bitempered.original import jax as loss\n")
    module = types.ModuleType("published_loss_test_on_bitempered")
    exec(compile(source, str(path), "exec"), module.__dict__)
    assert module.loss is oj
    return module


PUBLISHED = _published_test_module()
PUBLISHED_CASES = sorted(n for n in dir(PUBLISHED.LossTest) if n.startswith("test")) if PUBLISHED else []


def test_the_published_test_file_is_found_and_complete():
    if PUBLISHED is None:
        pytest.skip("jax-bitempered-loss is not installed (pip install -e '.[test]')")
    assert PUBLISHED_CASES == ["test_binary_logistic_loss", "test_constant_shift", "test_dynamic_temperatures",
                               "test_label_smoothing", "test_limit_case_logistic_loss", "test_loss_value",
                               "test_normalization", "test_tempered_sigmoid", "test_tempered_softmax"]


@pytest.mark.parametrize("case", PUBLISHED_CASES)
def test_published_case_passes_through_the_drop_in(case):
    PUBLISHED.LossTest(case).debug()  # setUp, the test, tearDown; any failure raises here


# --- API: names, signatures, keywords --------------------------------------------------------------

@pytest.mark.parametrize("module", [oj, ot], ids=["jax", "torch"])
def test_drop_in_exposes_exactly_the_original_names(module):
    assert sorted(module.__all__) == sorted(NAMES)
    assert all(callable(getattr(module, name)) for name in NAMES)
    assert parameters(module.sparse_bi_tempered_logistic_loss) == SPARSE_PARAMETERS


@pytest.mark.parametrize("name", NAMES[:-1])
def test_signatures_are_the_original_packages(name):
    original = pytest.importorskip("jax_bitempered_loss.loss")
    assert parameters(getattr(oj, name)) == parameters(getattr(original, name))
    assert parameters(getattr(ot, name)) == parameters(getattr(original, name))


def _keyword_calls(module, a, y, indices, x, xy, t1, t2):
    """Every function of a drop-in module called with keywords only, defaults otherwise."""
    calls = {
        "log_t": module.log_t(u=y + 0.5, t=t1),
        "exp_t": module.exp_t(u=-abs(a), t=t2),  # inside the support for t2 > 1
        "compute_normalization": module.compute_normalization(activations=a, t=t2),
        "tempered_softmax": module.tempered_softmax(activations=a, t=t2),
        "tempered_sigmoid": module.tempered_sigmoid(activations=x, t=t2),
        "bi_tempered_logistic_loss": module.bi_tempered_logistic_loss(activations=a, labels=y, t1=t1, t2=t2,
                                                                      label_smoothing=0.1),
        "bi_tempered_binary_logistic_loss": module.bi_tempered_binary_logistic_loss(activations=x, labels=xy, t1=t1,
                                                                                    t2=t2),
    }
    if indices is not None:  # the JAX package lacks the TensorFlow original's sparse loss
        calls["sparse_bi_tempered_logistic_loss"] = module.sparse_bi_tempered_logistic_loss(
            activations=a, labels=indices, t1=t1, t2=t2)
    return calls


def _random_inputs(seed, rows=6, classes=7, scale=2.0):
    a = (rng(seed).standard_normal((rows, classes)) * scale).astype(np.float32)
    y = rng(seed + 1).dirichlet(np.ones(classes), rows).astype(np.float32)
    indices = rng(seed + 2).integers(0, classes, rows)
    x = (rng(seed + 3).standard_normal(5) * scale).astype(np.float32)
    xy = rng(seed + 4).uniform(size=5).astype(np.float32)
    return a, y, indices, x, xy


@pytest.mark.parametrize("t1,t2", [(0.8, 1.2), (0.5, 2.0), (0.5, 0.7), (1.0, 1.0)])
def test_defaults_and_keywords_give_the_original_packages_numbers(t1, t2):
    """num_iters=5 by default: the installed original's outputs to rounding, in both frameworks."""
    original = pytest.importorskip("jax_bitempered_loss.loss")
    a, y, indices, x, xy = _random_inputs(10, scale=0.5 if t2 < 1 else 2.0)
    ours_jax = _keyword_calls(oj, jnp.asarray(a), jnp.asarray(y), jnp.asarray(indices), jnp.asarray(x),
                              jnp.asarray(xy), t1, t2)
    ours_torch = _keyword_calls(ot, as_torch(a), as_torch(y), torch.as_tensor(indices), as_torch(x), as_torch(xy),
                                t1, t2)
    theirs = _keyword_calls(original, jnp.asarray(a), jnp.asarray(y), None, jnp.asarray(x), jnp.asarray(xy), t1, t2)
    one_hot = jnp.asarray(np.eye(a.shape[-1], dtype=np.float32)[indices])
    theirs["sparse_bi_tempered_logistic_loss"] = original.bi_tempered_logistic_loss(jnp.asarray(a), one_hot, t1, t2)
    for name, expected in theirs.items():
        for framework, value in [("jax", ours_jax[name]), ("torch", ours_torch[name].numpy())]:
            assert np.shape(value) == np.shape(expected), (name, framework)
            np.testing.assert_allclose(value, expected, rtol=4e-6, atol=4e-6, err_msg=f"{name} ({framework})")


@pytest.mark.parametrize("t", [0.6, 1.7])
def test_method_names_keep_their_defaults_and_follow_t(t):
    original = pytest.importorskip("jax_bitempered_loss.loss")
    a = jnp.asarray(rng(11).standard_normal((5, 9)), jnp.float32)
    method = "compute_normalization_binary_search" if t < 1 else "compute_normalization_fixed_point"
    expected = getattr(original, method)(a, t)
    np.testing.assert_allclose(getattr(oj, method)(activations=a, t=t), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(getattr(ot, method)(activations=as_torch(a), t=t), expected, rtol=1e-6, atol=1e-6)
    # the other method's name, outside its stated domain: still the normalization
    other = "compute_normalization_fixed_point" if t < 1 else "compute_normalization_binary_search"
    for module, convert in [(oj, jnp.asarray), (ot, as_torch)]:
        lam = getattr(module, other)(convert(a), t, num_iters=None)
        np.testing.assert_allclose(np.asarray(module.exp_t(convert(a) - lam, t)).sum(-1), 1.0, atol=2e-6)


# --- The published cases through the torch drop-in --------------------------------------------------

def test_published_loss_values_through_torch():
    a, y = as_torch(PUBLISHED_ACTIVATIONS), as_torch(PUBLISHED_LABELS)
    cases = [((0.5, 1.5), {}, [0.02301914, 0.18972909, 0.93874922], 1e-4),
             ((0.5, 0.8), {"num_iters": 20}, [0.21646356, 0.41836615, 1.33997854], 1e-4)]
    for (t1, t2), options, expected, atol in cases:
        value = ot.bi_tempered_logistic_loss(a, y, t1, t2, **options)
        np.testing.assert_allclose(value, expected, atol=atol)
        np.testing.assert_allclose(value, oj.bi_tempered_logistic_loss(a.numpy(), y.numpy(), t1, t2, **options),
                                   rtol=1e-6, atol=1e-6)
    one_hot = torch.eye(3)
    smoothed = ot.bi_tempered_logistic_loss(a, one_hot, 0.5, 1.5, label_smoothing=0.1)
    np.testing.assert_allclose(smoothed, [0.76652711, 0.08627685, 1.35443510], atol=1e-5)
    np.testing.assert_allclose(smoothed, oj.bi_tempered_logistic_loss(a.numpy(), one_hot.numpy(), 0.5, 1.5,
                                                                      label_smoothing=0.1), rtol=1e-6, atol=1e-6)
    binary = ot.bi_tempered_binary_logistic_loss(torch.zeros(2), torch.tensor([1.0, 0.0]), 1.0, 1.0)
    np.testing.assert_allclose(binary, [0.69314718, 0.69314718], atol=1e-5)


def test_published_dynamic_temperatures_through_torch():
    a, y = torch.tensor([[-0.5, 0.1, 2.0]]), torch.tensor([[0.2, 0.5, 0.3]])
    for t1, t2, expected in [(1.0, 1.0, 0.628705), (0.9, 1.1, 0.45677936), (0.8, 1.2, 0.34298314),
                             (0.7, 1.3, 0.26295574)]:
        value = ot.bi_tempered_logistic_loss(a, y, torch.tensor(t1), torch.tensor(t2), num_iters=5)
        np.testing.assert_allclose(value, [expected], atol=1e-5)
        np.testing.assert_allclose(value, oj.bi_tempered_logistic_loss(a.numpy(), y.numpy(), t1, t2), atol=1e-6)


def test_tensorflow_value_at_t1_t2_1_drops_the_label_entropy():
    """TF's published 1.6583576 (soft labels, t1 = t2 = 1) is -sum y log p; SPEC (and the JAX
    original) is KL(y || p) = that + sum y log y: ours plus the label entropy is TF's number."""
    y = np.array([[0.2, 0.5, 0.3]])
    entropy = -(y * np.log(y)).sum()
    for value in [ot.bi_tempered_logistic_loss(torch.tensor([[-0.5, 0.1, 2.0]]), as_torch(y), 1.0, 1.0),
                  oj.bi_tempered_logistic_loss(jnp.array([[-0.5, 0.1, 2.0]]), jnp.asarray(y, jnp.float32), 1.0, 1.0)]:
        np.testing.assert_allclose(np.asarray(value) + entropy, [1.6583576], atol=1e-5)


def test_published_softmax_sigmoid_and_normalization_through_torch():
    a = as_torch(PUBLISHED_ACTIVATIONS)
    np.testing.assert_allclose(ot.tempered_softmax(a, t=1.0), torch.softmax(a, -1), atol=1e-6)
    np.testing.assert_allclose(ot.tempered_softmax(a, t=4.0),
                               [[0.3205458, 0.32714278, 0.3523402], [0.3430056, 0.36491093, 0.29220778],
                                [0.41369352, 0.30534995, 0.28299212]], atol=1e-6)
    x = torch.tensor([0.0, 3.0, 6.0])
    np.testing.assert_allclose(ot.tempered_sigmoid(x, t=1.0), torch.sigmoid(x), atol=1e-6)
    np.testing.assert_allclose(ot.tempered_sigmoid(x, t=4.0), [0.5, 0.58516014, 0.6421035], atol=1e-6)
    # the original's normalization check (k = 20: |sum p - 1| <= 1e-5), on fewer rows and classes
    big = as_torch(jax.random.normal(jax.random.PRNGKey(1335), (10, 5003)))
    for t in [0.1, 0.99, 1.01, 2.0]:
        lam = ot.compute_normalization(big, t, num_iters=20)
        assert lam.shape == (10, 1)
        np.testing.assert_allclose(ot.exp_t(big - lam, t).sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(lam, oj.compute_normalization(big.numpy(), t, num_iters=20), rtol=1e-5, atol=1e-5)


def test_published_shift_invariance_and_limit_case_through_torch():
    labels = as_torch([[0.2, 0.3, 0.5], [0.4, 0.4, 0.2], [0.7, 0.2, 0.1]])
    a = as_torch(rng(12).standard_normal((3, 3)))
    bias = as_torch(rng(13).standard_normal((3, 1)))
    for t2 in [0.8, 1.2]:
        np.testing.assert_allclose(ot.bi_tempered_logistic_loss(a, labels, 0.5, t2),
                                   ot.bi_tempered_logistic_loss(a + bias, labels, 0.5, t2), atol=1e-6)
    one_hot = torch.eye(3)
    np.testing.assert_allclose(ot.bi_tempered_logistic_loss(a, one_hot, 1.0, 1.0),
                               torch.nn.functional.cross_entropy(a, torch.arange(3), reduction="none"), atol=1e-6)


@pytest.mark.parametrize("module,convert", [(oj, jnp.asarray), (ot, torch.as_tensor)], ids=["jax", "torch"])
def test_published_sparse_cases(module, convert):
    """TensorFlow's test_sparse_loss: class indices equal the dense loss of their one-hot rows."""
    cases = [([0, 2, 1, 0], [[-0.5, 0.1, 2.0], [0.1, 1.5, -5.0], [4.0, -3.0, -6.0], [-1.5, 0.7, 5.2]]),
             ([[0, 2], [1, 0]], [[[-0.5, 0.1, 2.0], [0.1, 1.5, -5.0]], [[4.0, -3.0, -6.0], [-1.5, 0.7, 5.2]]])]
    for labels, activations in cases:
        labels, activations = np.array(labels), np.array(activations, np.float32)
        one_hot = np.eye(3, dtype=np.float32)[labels]
        for t1, t2 in [(0.5, 1.5), (1.0, 1.0), (0.7, 0.6)]:
            sparse = module.sparse_bi_tempered_logistic_loss(convert(activations), convert(labels), t1, t2)
            dense = module.bi_tempered_logistic_loss(convert(activations), convert(one_hot), t1, t2)
            assert sparse.shape == labels.shape
            np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), rtol=1e-5, atol=1e-6)


# --- Converged results, gradients, differences from the originals -------------------------------------

@pytest.mark.parametrize("t1,t2", [(0.7, 1.6), (0.5, 0.6), (1.0, 1.0)])
def test_num_iters_none_is_converged_and_gradients_flow(t1, t2):
    a, y, indices, _, _ = _random_inputs(20, rows=5, classes=11, scale=3.0 if t2 > 1 else 0.7)
    expected_loss, expected_grad = ref.loss(a, y, t1, t2, 0.1), ref.loss_grad(a, y, t1, t2, 0.1)
    a64 = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    loss = ot.bi_tempered_logistic_loss(a64, torch.tensor(y, dtype=torch.float64), t1, t2, 0.1, num_iters=None)
    (loss * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(loss.detach(), expected_loss, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(a64.grad, expected_grad * np.arange(1.0, 6.0)[:, None], rtol=1e-8, atol=1e-10)
    value, grad = jax.value_and_grad(
        lambda a: oj.bi_tempered_logistic_loss(activations=a, labels=jnp.asarray(y), t1=t1, t2=t2, label_smoothing=0.1,
                                               num_iters=None).sum())(jnp.asarray(a))
    np.testing.assert_allclose(value, expected_loss.sum(), rtol=2e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(oj.tempered_softmax(a, t2, num_iters=None), np.exp(ref.log_tempered_softmax(a, t2)),
                               atol=2e-6)
    np.testing.assert_allclose(ot.tempered_softmax(as_torch(a, torch.float64), t2, num_iters=None),
                               np.exp(ref.log_tempered_softmax(a, t2)), atol=1e-12)
    sparse_grad = jax.grad(lambda a: oj.sparse_bi_tempered_logistic_loss(a, jnp.asarray(indices), t1, t2, None).sum())
    np.testing.assert_allclose(sparse_grad(jnp.asarray(a)),
                               ref.loss_grad(a, np.eye(a.shape[-1])[indices], t1, t2), rtol=1e-4, atol=2e-6)


def test_spec_value_where_the_original_gives_nan():
    """(t1, t2) = (1.0, 0.8), one-hot labels, classes outside the finite support: the original's
    0 * log 0 is NaN; SPEC's limit is finite (a zero label contributes 0)."""
    original = pytest.importorskip("jax_bitempered_loss.loss")
    a = np.array([[4.0, -3.0, -6.0], [0.1, 1.5, -5.0]], np.float32)
    y = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    theirs = original.bi_tempered_logistic_loss(jnp.asarray(a), jnp.asarray(y), 1.0, 0.8, num_iters=20)
    assert np.isnan(theirs).all()
    expected = ref.loss(a, y, 1.0, 0.8)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(oj.bi_tempered_logistic_loss(a, y, 1.0, 0.8, num_iters=None), expected, atol=1e-6)
    np.testing.assert_allclose(ot.bi_tempered_logistic_loss(as_torch(a), as_torch(y), 1.0, 0.8, num_iters=None),
                               expected, atol=1e-6)
    np.testing.assert_allclose(ot.sparse_bi_tempered_logistic_loss(as_torch(a), torch.tensor([0, 1]), 1.0, 0.8,
                                                                   num_iters=None), expected, atol=1e-6)
    # at the original's k = 20 the value is the original's where it is finite
    ours = oj.bi_tempered_logistic_loss(a, y, 1.0, 0.8, num_iters=20)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    grad = jax.grad(lambda a: oj.bi_tempered_logistic_loss(a, y, 1.0, 0.8, num_iters=None).sum())(jnp.asarray(a))
    np.testing.assert_allclose(grad, ref.loss_grad(a, y, 1.0, 0.8), atol=1e-6)


@pytest.mark.parametrize("module,convert", [(oj, jnp.asarray), (ot, torch.as_tensor)], ids=["jax", "torch"])
def test_bad_input_raises_naming_the_argument(module, convert):
    a = convert(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="labels"):
        module.sparse_bi_tempered_logistic_loss(a, convert(np.zeros(2, np.float32)), 0.5, 1.5)
    with pytest.raises(ValueError, match="t1"):
        module.bi_tempered_logistic_loss(a, convert(np.eye(2, 3, dtype=np.float32)), 2.5, 1.5)
    with pytest.raises(ValueError, match="out of range|outside|\\[0, 3\\)"):
        module.sparse_bi_tempered_logistic_loss(a, convert(np.array([0, -100])), 0.5, 1.5)


# --- Public log_t, exp_t, compute_normalization of bitempered.jax / bitempered.torch -----------------

@pytest.mark.parametrize("t", [0.0, 0.4, 1.0, 1.0 + 1e-7, 1.7])
def test_log_t_and_exp_t_match_the_reference_with_their_derivatives(t):
    x = rng(30).uniform(0.05, 3.0, (4, 5))
    u = rng(31).uniform(-3.0, 1.2, (4, 5))  # partly outside the finite support for t < 1
    expected_log, expected_exp = ref.log_t(x, t), ref.exp_t(u, t)
    expected_slope = np.where(expected_exp > 0, expected_exp ** t, 0.0)  # 0 outside the support, also at t = 0
    np.testing.assert_allclose(bj.log_t(x.astype(np.float32), t), expected_log, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(bj.exp_t(u.astype(np.float32), t), expected_exp, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(jax.grad(lambda x: bj.log_t(x, t).sum())(x.astype(np.float32)), x ** -t, rtol=2e-6)
    exp_slope = jax.grad(lambda u: bj.exp_t(u, t).sum())(u.astype(np.float32))
    np.testing.assert_allclose(exp_slope, expected_slope, rtol=2e-6, atol=1e-7)
    x64 = torch.tensor(x, requires_grad=True)
    u64 = torch.tensor(u, requires_grad=True)
    # the reference's (x^(1-t) - 1) / (1-t) and base^(1/(1-t)) lose ~eps / |1-t| near t = 1
    tol = 1e-12 if t == 1.0 else max(1e-12, 4 * np.finfo(float).eps / abs(1.0 - t))
    np.testing.assert_allclose(bt.log_t(x64, t).detach(), expected_log, rtol=tol, atol=tol)
    np.testing.assert_allclose(bt.exp_t(u64, t).detach(), expected_exp, rtol=tol, atol=1e-300)
    (grad_x,) = torch.autograd.grad(bt.log_t(x64, t).sum(), x64)
    (grad_u,) = torch.autograd.grad(bt.exp_t(u64, t).sum(), u64)
    np.testing.assert_allclose(grad_x, x ** -t, rtol=1e-12)
    np.testing.assert_allclose(grad_u, expected_slope, rtol=tol, atol=1e-300)
    assert np.all(np.isfinite(grad_u.numpy())) and np.all(np.isfinite(np.asarray(exp_slope)))
    inside = u > -1 / (1 - t) if t < 1 else np.ones_like(u, bool)
    torch.autograd.gradcheck(lambda v: bt.exp_t(v, t), (torch.tensor(u[inside], requires_grad=True),))
    torch.autograd.gradgradcheck(lambda v: bt.log_t(v, t), (torch.tensor(x[0], requires_grad=True),))


def test_log_t_and_exp_t_keep_16_bit_dtypes_and_check_arguments():
    x = torch.tensor([0.5, 2.0], dtype=torch.bfloat16)
    assert bt.log_t(x, 0.5).dtype == torch.bfloat16 and bt.exp_t(x, 1.5).dtype == torch.bfloat16
    assert bj.log_t(jnp.asarray(x.float().numpy(), jnp.float16), 0.5).dtype == jnp.float16
    for function, name in [(bt.log_t, "x"), (bt.exp_t, "u")]:
        with pytest.raises(TypeError, match=name):
            function(torch.tensor([1, 2]), 0.5)
        with pytest.raises(ValueError, match="t must be finite"):
            function(x, float("inf"))
    for function, name in [(bj.log_t, "x"), (bj.exp_t, "u")]:
        with pytest.raises(TypeError, match=name):
            function(jnp.array([1, 2]), 0.5)
        with pytest.raises(ValueError, match="t must be finite"):
            function(jnp.array([1.0]), float("nan"))


@pytest.mark.parametrize("t", [0.3, 0.9, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("num_iters", [None, 3])
def test_compute_normalization_matches_the_reference_and_the_original_algorithm(t, num_iters):
    a = rng(40).standard_normal((2, 3, 13)) * (0.8 if t < 1 else 3.0)
    a0 = ref.shift_by_max(a)
    if num_iters is None:
        expected = a.max(-1, keepdims=True) + ref.normalizer_of_shifted(a0, t)
    else:  # the original's k steps, in float64 (their sum of p is not 1)
        original = pytest.importorskip("jax_bitempered_loss.loss")
        expected = np.asarray(original.compute_normalization(jnp.asarray(a, jnp.float32), t, num_iters))
    lam_torch = bt.compute_normalization(torch.tensor(a), t, num_iters)
    lam_jax = bj.compute_normalization(a.astype(np.float32), t, num_iters)
    assert lam_torch.shape == lam_jax.shape == (2, 3, 1)
    assert lam_torch.dtype == torch.float64 and lam_jax.dtype == jnp.float32
    np.testing.assert_allclose(lam_torch, expected, rtol=1e-10 if num_iters is None else 2e-6, atol=1e-10)
    np.testing.assert_allclose(lam_jax, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("t", [0.4, 1.0, 2.5])
def test_compute_normalization_gradient_is_the_escort(t):
    a = rng(50).standard_normal((3, 9)) * 2.0
    log_p = ref.log_tempered_softmax(a, t)
    escort = np.exp(t * log_p) / np.exp(t * log_p).sum(-1, keepdims=True)
    weights = np.array([[1.0], [-2.0], [0.5]])
    grad_jax = jax.grad(lambda a: (bj.compute_normalization(a, t) * weights).sum())(a.astype(np.float32))
    np.testing.assert_allclose(grad_jax, escort * weights, rtol=2e-5, atol=1e-7)
    a64 = torch.tensor(a, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: bt.compute_normalization(a, t), (a64,))
    (grad_torch,) = torch.autograd.grad((bt.compute_normalization(a64, t) * torch.tensor(weights)).sum(), a64)
    np.testing.assert_allclose(grad_torch, escort * weights, rtol=1e-10, atol=1e-14)


def test_compute_normalization_jits_once_for_every_temperature_and_checks_arguments():
    a = jnp.asarray(rng(60).standard_normal((4, 6)), jnp.float32)
    lam = jax.jit(lambda t: bj.compute_normalization(a, t))
    for t in [0.5, 1.0, 1.5]:
        np.testing.assert_allclose(bj.exp_t(a - lam(t), t).sum(-1), 1.0, atol=2e-6)
    assert lam._cache_size() == 1
    assert bj.compute_normalization(jnp.zeros((0, 6)), 1.5).shape == (0, 1)
    assert bt.compute_normalization(torch.zeros(0, 6), 1.5).shape == (0, 1)
    for function, convert in [(bj.compute_normalization, jnp.asarray), (bt.compute_normalization, torch.as_tensor)]:
        with pytest.raises(ValueError, match="t must be > 0"):
            function(convert(np.zeros((2, 3), np.float32)), 0.0)
        with pytest.raises(ValueError, match="num_iters"):
            function(convert(np.zeros((2, 3), np.float32)), 1.5, 0)
