"""Every public JAX function inside ``jax.shard_map`` (check_vma=True, the default) on 4 host devices.

Data parallelism: the rows are sharded over a "data" axis; each device computes its rows, which
must equal the unsharded call (values and gradients), under jit, grad and vmap, with temperatures
as traced operands. Before the fix, the ``lax.cond`` branches of the native solver (a constant
next to a data-dependent value) failed the varying-axes check. The cases run in one subprocess with
4 fake devices (``multidevice.py``); run this file as a script to see them directly.
"""

import functools
import os

import numpy as np
import pytest

from multidevice import case, main, run_cases

NUM_DEVICES = 4
CASES = {}
register = case(CASES)


def _setup():
    import jax
    from jax.sharding import Mesh

    return jax, Mesh(np.array(jax.devices()), ("data",))


def _close(got, want, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol)


def _data_parallel(fn, mesh, num_args):
    """jit(shard_map(fn)) with the first ``num_args`` arguments sharded on rows, the rest replicated."""
    import jax
    from jax.sharding import PartitionSpec as P

    def call(*args):
        specs = tuple(P("data") if i < num_args else P() for i in range(len(args)))
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P("data"))(*args)

    return jax.jit(call)


# rows 12 = 4 devices x 3, classes 7 (not a power of two); logits of both signs and a wide range
def _logits(shape=(12, 7), seed=0, scale=2.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


TEMPERATURES = [(0.8, 1.2), (0.5, 0.7), (1.0, 1.0), (1.5, 4.0)]


@register
def loss_value_and_grad_indices():
    jax, mesh = _setup()
    import bitempered.jax as bj

    logits, labels = _logits(), np.array([0, 3, 6, 1, 2, -100, 5, 4, 0, 6, 1, 2], np.int32)

    def per_row(a, y, t1, t2):
        return bj.bi_tempered_logistic_loss(a, y, t1, t2, label_smoothing=0.1)

    def value_and_grad(a, y, t1, t2):
        losses, vjp = jax.vjp(lambda a: per_row(a, y, t1, t2), a)
        return losses, vjp(jax.numpy.ones_like(losses))[0]

    sharded = _data_parallel(value_and_grad, mesh, 2)
    for t1, t2 in TEMPERATURES:
        got = sharded(logits, labels, np.float32(t1), np.float32(t2))
        want = jax.jit(value_and_grad)(logits, labels, np.float32(t1), np.float32(t2))
        _close(got[0], want[0])
        _close(got[1], want[1])


@register
def loss_dense_num_iters_and_grad():
    jax, mesh = _setup()
    import bitempered.jax as bj

    logits = _logits(seed=1)
    labels = np.random.default_rng(2).dirichlet(np.ones(7), size=12).astype(np.float32)
    for num_iters in (None, 5):
        def mean_loss(a, y, t1, t2, num_iters=num_iters):
            return bj.bi_tempered_logistic_loss(a, y, t1, t2, num_iters=num_iters)

        grad = jax.grad(lambda a, y, t1, t2: mean_loss(a, y, t1, t2).sum())
        sharded_loss, sharded_grad = _data_parallel(mean_loss, mesh, 2), _data_parallel(grad, mesh, 2)
        for t1, t2 in TEMPERATURES:  # traced temperatures: one compile for all
            args = (logits, labels, np.float32(t1), np.float32(t2))
            _close(sharded_loss(*args), mean_loss(*args))
            _close(sharded_grad(*args), grad(*args))


@register
def softmax_sigmoid_and_binary():
    jax, mesh = _setup()
    import bitempered.jax as bj

    logits = _logits(seed=3)
    targets = (logits > 0).astype(np.float32)
    binary = jax.grad(lambda x, y, t: bj.bi_tempered_binary_logistic_loss(x, y, 0.7, t).sum())
    checks = [(_data_parallel(binary, mesh, 2), binary, (logits, targets)),
              (_data_parallel(bj.tempered_sigmoid, mesh, 1), bj.tempered_sigmoid, (logits,))]
    for num_iters in (None, 4):
        softmax = functools.partial(bj.tempered_softmax, num_iters=num_iters)
        softmax_grad = jax.grad(lambda a, t, softmax=softmax: (softmax(a, t) ** 2).sum())
        checks += [(_data_parallel(softmax, mesh, 1), softmax, (logits,)),
                   (_data_parallel(softmax_grad, mesh, 1), softmax_grad, (logits,))]
    for t in (0.5, 1.0, 1.7):
        for sharded, plain, args in checks:
            _close(sharded(*args, np.float32(t)), plain(*args, np.float32(t)))


@register
def vmap_inside_shard_map():
    jax, mesh = _setup()
    import bitempered.jax as bj

    logits = _logits((12, 2, 7), seed=4)
    labels = np.random.default_rng(5).integers(0, 7, size=(12, 2)).astype(np.int32)
    per_example = jax.vmap(lambda a, y, t2: bj.bi_tempered_logistic_loss(a, y, 0.8, t2), in_axes=(0, 0, None))
    _close(_data_parallel(per_example, mesh, 2)(logits, labels, np.float32(0.6)),
           per_example(logits, labels, np.float32(0.6)))


@register
def fused_linear_loss():
    jax, mesh = _setup()
    import bitempered.jax as bj

    hidden = _logits((12, 5), seed=6, scale=1.0)
    weight = _logits((7, 5), seed=7, scale=1.0)
    labels = np.random.default_rng(8).integers(0, 7, size=12).astype(np.int32)

    def loss(h, y, w, t2):
        return bj.linear_bi_tempered_logistic_loss(h, w, y, 0.8, t2)

    for t2 in (0.7, 1.3):
        _close(_data_parallel(loss, mesh, 2)(hidden, labels, weight, np.float32(t2)),
               loss(hidden, labels, weight, np.float32(t2)))


@pytest.fixture(scope="module")
def results():
    return run_cases(os.path.abspath(__file__), NUM_DEVICES, timeout_s=300)


@pytest.mark.parametrize("name", list(CASES))
def test_inside_shard_map(results, name):
    assert results[name] == "ok", results[name]


if __name__ == "__main__":
    main(CASES, NUM_DEVICES)
