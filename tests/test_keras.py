"""``bitempered.keras`` on Keras' jax, torch and tensorflow backends.

Keras picks its backend once, at import (``KERAS_BACKEND``), so each backend's cases run in a
subprocess of their own: this file run as a script (``python tests/test_keras.py tensorflow``)
runs one backend's cases and prints their results as one JSON line; the pytest side starts the
three backends together (bounded in time) and reports each case. Every value is checked against
``bitempered.jax`` (the same batch, the reduction written out by hand: sum(w L) / sum(w)) or the
float64 reference (``tests/reference.py``), and every error message against ``bitempered.jax``'s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback

import numpy as np
import pytest

BACKENDS = ("jax", "torch", "tensorflow")
MARKER = "KERAS-RESULTS "
TIMEOUT_S = 240
CASES = {}  # name -> (function, the backends it runs on)
# (t1, t2): tempered with heavy tails, cross-entropy, finite support with a bounded loss
TEMPERATURES = ((0.8, 1.2), (1.0, 1.0), (0.5, 0.8))


def case(*backends):
    def register(fn):
        CASES[fn.__name__] = (fn, backends or BACKENDS)
        return fn
    return register


def _batch(num_rows=29, num_classes=7, seed=0):
    """Logits (float32), class indices, dense labels (rows in the simplex), sample weights."""
    rng = np.random.default_rng(seed)
    logits = (3 * rng.normal(size=(num_rows, num_classes))).astype(np.float32)
    indices = rng.integers(0, num_classes, num_rows).astype(np.int32)
    dense = rng.dirichlet(np.ones(num_classes), num_rows).astype(np.float32)
    weights = rng.uniform(0.1, 2.0, num_rows).astype(np.float32)
    return logits, indices, dense, weights


def _close(got, want, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol)


def _numpy(x):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x))


def _error_of(fn):
    try:
        fn()
    except (ValueError, TypeError) as error:
        return type(error), str(error)
    raise AssertionError(f"{fn} raised no ValueError/TypeError")


# ------------------------------------------------------------------------------------------------
# Cases, run in the subprocess of one backend
# ------------------------------------------------------------------------------------------------

@case()
def loss_values_equal_bitempered_jax():
    """Keras' default reduction is sum(w L) / sum(w) (bitempered.jax's "mean" with sample_weight),
    "sum" and "none" too; sparse labels (as [N], and once as [N, 1]), dense labels, smoothing, and
    once the original algorithm's num_iters: bitempered.jax's values."""
    import bitempered.jax as bj
    from bitempered.keras import BiTemperedLogisticLoss

    logits, indices, dense, weights = _batch()
    _close(BiTemperedLogisticLoss(0.8, 1.2)(indices, logits, sample_weight=weights),
           bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2, reduction="mean", sample_weight=weights))
    settings = [(t1, t2, labels, labels, smoothing, None) for t1, t2 in TEMPERATURES for labels in (indices, dense)
                for smoothing in (0.0, 0.1)]
    settings += [(0.8, 1.2, indices, indices[:, None], 0.1, None), (0.5, 0.8, dense, dense, 0.0, 3)]
    for t1, t2, labels, keras_labels, smoothing, num_iters in settings:
        kwargs = dict(label_smoothing=smoothing, num_iters=num_iters)
        rows = np.asarray(bj.bi_tempered_logistic_loss(logits, labels, t1, t2, **kwargs))
        _close(BiTemperedLogisticLoss(t1, t2, **kwargs)(keras_labels, logits, sample_weight=weights),
               np.sum(weights * rows) / np.sum(weights))
        _close(BiTemperedLogisticLoss(t1, t2, reduction="sum", **kwargs)(keras_labels, logits), rows.sum())
        _close(BiTemperedLogisticLoss(t1, t2, reduction="none", **kwargs)(keras_labels, logits), rows)


@case()
def ignore_class_is_masked_out_of_the_mean():
    import bitempered.jax as bj
    from bitempered.keras import BiTemperedLogisticLoss

    logits, indices, _, weights = _batch(seed=1)
    indices[[2, 5, 11]] = 255
    want = bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2, ignore_index=255, reduction="mean",
                                        sample_weight=weights)
    _close(BiTemperedLogisticLoss(0.8, 1.2, ignore_class=255)(indices, logits, sample_weight=weights), want)
    rows = BiTemperedLogisticLoss(0.8, 1.2, ignore_class=255, reduction="none")(indices, logits)
    assert np.all(_numpy(rows)[[2, 5, 11]] == 0)


@case()
def binary_loss_values_equal_bitempered_jax():
    """Per example the mean over the last axis (as keras.losses.BinaryCrossentropy): with one
    logit per example, Keras' mean is bitempered.jax's weighted mean over the elements."""
    import bitempered.jax as bj
    from bitempered.keras import BinaryBiTemperedLogisticLoss

    rng = np.random.default_rng(2)
    logits = (2 * rng.normal(size=(23, 3))).astype(np.float32)
    labels = rng.uniform(size=(23, 3)).astype(np.float32)
    weights = rng.uniform(0.1, 2.0, 23).astype(np.float32)
    for t1, t2 in TEMPERATURES:
        for smoothing in (0.0, 0.1):
            elements = np.asarray(bj.bi_tempered_binary_logistic_loss(logits, labels, t1, t2, smoothing))
            loss = BinaryBiTemperedLogisticLoss(t1, t2, smoothing)
            _close(loss(labels, logits, sample_weight=weights),
                   np.sum(weights * elements.mean(axis=-1)) / np.sum(weights))
            _close(loss(labels[:, :1], logits[:, :1], sample_weight=weights),
                   bj.bi_tempered_binary_logistic_loss(logits[:, :1], labels[:, :1], t1, t2, smoothing,
                                                       reduction="mean", sample_weight=weights[:, None]))


@case()
def tempered_softmax_and_sigmoid_equal_bitempered_jax():
    import bitempered.jax as bj
    from bitempered.keras import tempered_sigmoid, tempered_softmax

    logits = _batch()[0]
    for t in (0.7, 1.0, 1.6):
        _close(tempered_softmax(logits, t), bj.tempered_softmax(logits, t))
        _close(tempered_softmax(logits, t, num_iters=4), bj.tempered_softmax(logits, t, num_iters=4))
        _close(tempered_sigmoid(logits, t), bj.tempered_sigmoid(logits, t))


@case()
def compile_and_fit_one_epoch_with_sample_weight():
    """A Dense model trains one epoch with compile + fit; then evaluate() returns sum(w L) / sum(w)
    and one SGD step (learning rate 1) on one batch moves the weights by exactly its gradient (the
    float64 reference's): Keras' sample_weight and reduction reach the loss as the issue asks,
    and the gradient is the closed form's."""
    import keras

    import reference as ref
    from bitempered.keras import BiTemperedLogisticLoss

    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 20)).astype(np.float32)
    y = rng.integers(0, 7, 64).astype(np.int32)
    w = rng.uniform(0.1, 2.0, 64).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(7)])
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=BiTemperedLogisticLoss(0.8, 1.2))
    history = model.fit(x, y, sample_weight=w, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    kernel, bias = (_numpy(v).astype(np.float64) for v in model.weights)
    logits, onehot = x @ kernel + bias, np.eye(7)[y]
    _close(model.evaluate(x, y, sample_weight=w, batch_size=64, verbose=0),
           np.sum(w * ref.loss(logits, onehot, 0.8, 1.2)) / np.sum(w))
    grad_logits = w[:, None] * ref.loss_grad(logits, onehot, 0.8, 1.2) / np.sum(w)
    model.train_on_batch(x, y, sample_weight=w)
    new_kernel, new_bias = (_numpy(v) for v in model.weights)
    _close(kernel - new_kernel, x.T @ grad_logits, atol=1e-5)
    _close(bias - new_bias, grad_logits.sum(axis=0), atol=1e-5)


@case()
def binary_compile_and_fit():
    import keras

    from bitempered.keras import BinaryBiTemperedLogisticLoss

    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 20)).astype(np.float32)
    y = (x[:, :1] + 0.3 * rng.normal(size=(64, 1)) > 0).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=BinaryBiTemperedLogisticLoss(0.8, 1.2))
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, sample_weight=rng.uniform(0.1, 2.0, 64), batch_size=16, epochs=1, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before


def _index_check_library():
    """The library whose out-of-range class index message the backend gives: bitempered.torch's
    differs from bitempered.jax's (which the tensorflow binding shares)."""
    import keras

    if keras.backend.backend() == "torch":
        import bitempered.torch as library
    else:
        import bitempered.jax as library
    return library


def _as_backend_arrays(*arrays):
    import keras

    return tuple(keras.ops.convert_to_tensor(a) if keras.backend.backend() == "torch" else a for a in arrays)


@case()
def bad_input_raises_bitempered_jax_errors():
    import bitempered.jax as bj
    from bitempered.keras import BiTemperedLogisticLoss, BinaryBiTemperedLogisticLoss, tempered_softmax

    logits, indices, dense, _ = _batch()
    out_of_range = np.where(indices == 3, 9, indices)
    expected_and_got = [
        (lambda: bj.bi_tempered_logistic_loss(logits, indices, 2.5, 1.2),
         lambda: BiTemperedLogisticLoss(2.5, 1.2)),
        (lambda: bj.bi_tempered_logistic_loss(logits, indices, 0.8, -1.0),
         lambda: BinaryBiTemperedLogisticLoss(0.8, -1.0)),
        (lambda: bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2, label_smoothing=1.0),
         lambda: BiTemperedLogisticLoss(0.8, 1.2, label_smoothing=1.0)),
        (lambda: bj.bi_tempered_logistic_loss(logits, indices, 0.8, 1.2, num_iters=0),
         lambda: BiTemperedLogisticLoss(0.8, 1.2, num_iters=0)),
        (lambda: bj.bi_tempered_logistic_loss(logits, indices, "0.8", 1.2),
         lambda: BiTemperedLogisticLoss("0.8", 1.2)),
        # valid as given, 2.0 in float32: rejected on every backend (bitempered.torch alone would take it)
        (lambda: bj.bi_tempered_logistic_loss(logits, indices, 1.99999999, 1.2),
         lambda: BiTemperedLogisticLoss(1.99999999, 1.2)(indices, logits)),
        (lambda: bj.bi_tempered_logistic_loss(logits, dense[:, :5], 0.8, 1.2),
         lambda: BiTemperedLogisticLoss(0.8, 1.2)(dense[:, :5], logits)),
        (lambda: bj.bi_tempered_logistic_loss(logits, indices[:-1], 0.8, 1.2),
         lambda: BiTemperedLogisticLoss(0.8, 1.2)(indices[:-1], logits)),
        (lambda: _index_check_library().bi_tempered_logistic_loss(*_as_backend_arrays(logits, out_of_range), 0.8, 1.2,
                                                                  ignore_index=None),
         lambda: BiTemperedLogisticLoss(0.8, 1.2)(out_of_range, logits)),
        (lambda: bj.bi_tempered_logistic_loss(logits, 2 * dense, 0.8, 1.2),
         lambda: BiTemperedLogisticLoss(0.8, 1.2)(2 * dense, logits)),
        (lambda: bj.bi_tempered_binary_logistic_loss(logits, dense[:, :5], 0.8, 1.2),
         lambda: BinaryBiTemperedLogisticLoss(0.8, 1.2)(dense[:, :5], logits)),
        (lambda: bj.tempered_softmax(logits, 0.0), lambda: tempered_softmax(logits, 0.0)),
    ]
    for expected, got in expected_and_got:
        assert _error_of(got) == _error_of(expected), (_error_of(got), _error_of(expected))


@case("tensorflow")
def tensorflow_gradients_equal_reference_under_xla():
    """tf.function(jit_compile=True): the loss and the tf.custom_gradient equal the float64
    reference's, class indices (an ignored row: gradient 0), dense labels, binary; softmax too."""
    import tensorflow as tf

    import reference as ref
    from bitempered.bindings.tensorflow import api

    logits, indices, dense, _ = _batch(num_rows=13, num_classes=11, seed=5)
    indices[4] = -100
    kept = indices != -100
    onehot = np.eye(11)[np.where(kept, indices, 0)] * kept[:, None]

    @tf.function(jit_compile=True)
    def loss_and_grad(fn, a, labels, t1, t2, s):
        with tf.GradientTape() as tape:
            tape.watch(a)
            loss = fn(a, labels, t1, t2, s)
        return loss, tape.gradient(loss, a)  # of the sum of the losses

    a = tf.constant(logits)
    for t1, t2 in TEMPERATURES:
        for s in (0.0, 0.1):
            t1_, t2_, s_ = (tf.constant(v, tf.float32) for v in (t1, t2, s))  # one program for all values
            loss, grad = loss_and_grad(api.bi_tempered_logistic_loss, a, tf.constant(indices), t1_, t2_, s_)
            _close(loss, np.where(kept, ref.loss(logits, onehot, t1, t2, s), 0.0), atol=5e-6)
            _close(grad, ref.loss_grad(logits, onehot, t1, t2, s) * kept[:, None], atol=5e-6)
            loss, grad = loss_and_grad(api.bi_tempered_logistic_loss, a, tf.constant(dense), t1_, t2_, s_)
            _close(loss, ref.loss(logits, dense, t1, t2, s), atol=5e-6)
            _close(grad, ref.loss_grad(logits, dense, t1, t2, s), atol=5e-6)
            x, y = logits[:, 0], dense[:, 0]
            loss, grad = loss_and_grad(api.bi_tempered_binary_logistic_loss, tf.constant(x), tf.constant(y), t1_, t2_,
                                       s_)
            rows, labels = np.stack([0 * x, x], -1), np.stack([1 - y, y], -1)
            _close(loss, ref.binary_loss(x, y, t1, t2, s), atol=5e-6)
            _close(grad, ref.loss_grad(rows, labels, t1, t2, s)[:, 1], atol=5e-6)
    assert loss_and_grad.experimental_get_tracing_count() == 3  # per loss and label kind, not per value

    a64 = tf.constant(logits.astype(np.float64))  # float64 end to end (Python temperatures included)
    with tf.GradientTape() as tape:
        tape.watch(a64)
        loss = api.bi_tempered_logistic_loss(a64, tf.constant(indices), 0.8, 1.2, 0.1)
    _close(loss, np.where(kept, ref.loss(logits, onehot, 0.8, 1.2, 0.1), 0.0), rtol=1e-12, atol=1e-12)
    _close(tape.gradient(loss, a64), ref.loss_grad(logits, onehot, 0.8, 1.2, 0.1) * kept[:, None],
           rtol=1e-10, atol=1e-12)

    @tf.function(jit_compile=True)
    def softmax_vjp(a, t, v):
        with tf.GradientTape() as tape:
            tape.watch(a)
            p = api.tempered_softmax(a, t)
        return p, tape.gradient(p, a, output_gradients=v)

    v = np.random.default_rng(6).normal(size=logits.shape).astype(np.float32)
    for t in (0.7, 1.3):
        p, vjp = softmax_vjp(a, tf.constant(t), tf.constant(v))
        want = ref.tempered_softmax(logits.astype(np.float64), t)
        _close(p, want)
        escort = want ** t
        w = v * escort
        _close(vjp, w - escort / escort.sum(-1, keepdims=True) * w.sum(-1, keepdims=True), atol=5e-6)


@case("tensorflow")
def tensorflow_fit_with_xla():
    """Keras' train step compiled with XLA (jit_compile=True) and an unknown batch size."""
    import keras

    from bitempered.keras import BiTemperedLogisticLoss

    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 20)).astype(np.float32)
    y = np.eye(7, dtype=np.float32)[rng.integers(0, 7, 50)]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(7)])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=BiTemperedLogisticLoss(0.5, 0.8), jit_compile=True)
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)  # batches of 16 and a last one of 2
    assert model.evaluate(x, y, verbose=0) < before


def run_backend(backend: str) -> None:
    """This process: run ``backend``'s cases, print {name: "ok" | traceback} as one JSON line."""
    results = {}
    for name, (fn, backends) in CASES.items():
        if backend not in backends:
            continue
        try:
            fn()
            results[name] = "ok"
        except Exception:  # reported to the pytest side, which fails that case
            results[name] = traceback.format_exc()
    print(MARKER + json.dumps(results), flush=True)


# ------------------------------------------------------------------------------------------------
# pytest side
# ------------------------------------------------------------------------------------------------

REQUIRED = {"jax": ("keras", "jax"), "torch": ("keras", "jax", "torch"), "tensorflow": ("keras", "jax", "tensorflow")}


def _missing(backend: str):
    """The first package ``backend``'s cases need that is not installed (found without importing it:
    importing tensorflow or keras here would cost seconds and pick a Keras backend for pytest)."""
    return next((name for name in REQUIRED[backend] if importlib.util.find_spec(name) is None), None)


@pytest.fixture(scope="module")
def results():
    """Every available backend's subprocess, started together; {backend: results or None}."""
    script = os.path.abspath(__file__)
    processes = {}
    for backend in BACKENDS:
        if _missing(backend) is None:
            env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
            processes[backend] = subprocess.Popen([sys.executable, script, backend], env=env, text=True,
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  cwd=os.path.dirname(script))
    collected = {}
    try:
        for backend, process in processes.items():
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
            lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
            if not lines:
                raise RuntimeError(f"the {backend} subprocess exited with {process.returncode} and no results:\n"
                                   f"{stdout[-3000:]}\n{stderr[-3000:]}")
            collected[backend] = json.loads(lines[-1][len(MARKER):])
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return collected


@pytest.mark.parametrize("backend, name", [(backend, name) for name, (_, backends) in CASES.items()
                                           for backend in backends])
def test_keras_backend(results, backend, name):
    missing = _missing(backend)
    if missing is not None:
        pytest.skip(f"the Keras {backend} backend's cases need `{missing}`, which is not installed")
    assert results[backend][name] == "ok", results[backend][name]


if __name__ == "__main__":
    run_backend(sys.argv[1])
