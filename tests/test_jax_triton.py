"""JAX Triton backend: the kernels of kernels/ through jax-triton, inside the custom VJPs.

On a CUDA GPU with jax-triton installed these tests run the real path. Everywhere else they run
the same binding code with a stand-in for ``jax_triton.triton_call`` that launches the same
kernel, with the same positional arguments, under Triton's interpreter (through
``jax.pure_callback``): this checks the argument order, output shapes, dtype handling, the custom
VJPs and the vmap folding, but not GPU compilation. Whether the real jax-triton is used is
printed in the test names ("real" / "interpreted").
"""

import os
import sys
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import reference as ref
from bitempered import jax as bj
from bitempered.bindings.common import interpreter
from interpreter_warnings import EXPECTED as pytestmark  # noqa: E402  (the interpreter's expected warnings)


def _real_jax_triton() -> bool:
    if jax.default_backend() != "gpu":
        return False
    try:
        import jax_triton  # noqa: F401
    except Exception:
        return False
    return True


REAL = _real_jax_triton()


def _to_torch(array):
    import torch

    array = np.asarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _from_torch(tensor):
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _torch_dtype(dtype):
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
            np.dtype(ml_dtypes.bfloat16): torch.bfloat16}[np.dtype(dtype)]



def interpreted_triton_call(*args, kernel, out_shape, grid, num_warps=None, **metaparams):
    """Stand-in for jax_triton.triton_call: same calling convention, runs on the interpreter."""
    import torch

    several = isinstance(out_shape, (list, tuple))
    out_shapes = tuple(out_shape) if several else (out_shape,)
    array_positions = [i for i, arg in enumerate(args) if not isinstance(arg, (bool, int, float))]

    def host(*arrays):
        call_args = list(args)
        for position, array in zip(array_positions, arrays):
            call_args[position] = _to_torch(array)
        outs = [torch.empty(s.shape, dtype=_torch_dtype(s.dtype)) for s in out_shapes]
        # Triton's interpreter is not thread-safe (XLA runs the callbacks of several devices on
        # parallel threads, user threads launch too): the torch launchers' process-wide lock.
        with interpreter.launch_scope():
            kernel[grid](*call_args, *outs, num_warps=num_warps, **metaparams)
        return tuple(_from_torch(out) for out in outs)

    results = jax.pure_callback(host, out_shapes, *[args[i] for i in array_positions])
    return list(results) if several else results[0]


@pytest.fixture
def triton_backend(monkeypatch):
    """Makes backend='triton' runnable here: the real jax-triton on a GPU, else the stand-in."""
    if not REAL:
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no jax-triton on a JAX GPU here, and the interpreter stand-in needs TRITON_INTERPRET=1 "
                        "(conftest sets it only on machines without CUDA)")
        fake = types.ModuleType("jax_triton")
        fake.triton_call = interpreted_triton_call
        monkeypatch.setitem(sys.modules, "jax_triton", fake)
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    return "real" if REAL else "interpreted"


def _data(shape, seed, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(shape) * scale).astype(np.float32)
    indices = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
    return logits, indices


@pytest.mark.parametrize("t1,t2", [(0.8, 1.2), (0.5, 0.8), (1.0, 1.0)])
def test_loss_and_grad_match_xla_and_reference(triton_backend, t1, t2):
    logits, idx = _data((3, 5, 37), seed=1)
    idx[0, 1] = -100

    def total(a, backend):
        return bj.bi_tempered_logistic_loss(a, idx, t1, t2, label_smoothing=0.1, backend=backend).sum()

    triton_loss = bj.bi_tempered_logistic_loss(logits, idx, t1, t2, label_smoothing=0.1, backend="triton")
    xla_loss = bj.bi_tempered_logistic_loss(logits, idx, t1, t2, label_smoothing=0.1, backend="xla")
    dense, kept = ref.one_hot(idx, 37)
    truth = ref.loss(logits, dense, t1, t2, 0.1) * kept
    np.testing.assert_allclose(triton_loss, truth, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(triton_loss, xla_loss, rtol=1e-5, atol=1e-6)
    grad_triton = jax.grad(total)(logits, "triton")
    grad_xla = jax.grad(total)(logits, "xla")
    truth_grad = ref.loss_grad(logits, dense, t1, t2, 0.1) * kept[..., None]
    np.testing.assert_allclose(grad_triton, truth_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grad_triton, grad_xla, rtol=1e-4, atol=1e-6)


def test_dense_labels_bf16_jit_traced_temperatures_and_vmap(triton_backend):
    logits, _ = _data((2, 4, 9), seed=2)
    labels = np.random.default_rng(3).dirichlet(np.ones(9), size=(2, 4)).astype(np.float32)
    logits16 = jnp.asarray(logits, jnp.bfloat16)

    @jax.jit
    def per_example(a, y, t1, t2):
        return bj.bi_tempered_logistic_loss(a, y, t1, t2, backend="triton")

    batched = jax.vmap(per_example, in_axes=(0, 0, None, None))(logits16, labels, 0.7, 1.3)
    direct = per_example(logits16, labels, 0.7, 1.3)
    truth = ref.loss(np.asarray(logits16, np.float64), labels, 0.7, 1.3)
    np.testing.assert_allclose(batched, direct, rtol=1e-6)
    np.testing.assert_allclose(direct, truth, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda a: per_example(a, labels, 0.7, 1.3).sum())(logits16)
    assert grad.dtype == jnp.bfloat16
    nested = jax.vmap(jax.vmap(per_example, in_axes=(0, 0, None, None)), in_axes=(0, 0, None, None))(
        logits16[:, :, None], labels[:, :, None], 0.7, 1.3)
    np.testing.assert_allclose(nested[..., 0], direct, rtol=1e-6)
    # A vmapped temperature (one per example) takes the per-example fallback.
    temps = jnp.asarray([1.1, 1.5])
    per_t = jax.vmap(per_example, in_axes=(0, 0, None, 0))(logits16, labels, 0.7, temps)
    np.testing.assert_allclose(per_t[1], per_example(logits16[1], labels[1], 0.7, 1.5), rtol=1e-6)


def test_softmax_sigmoid_and_binary_loss(triton_backend):
    logits, _ = _data((4, 11), seed=4)
    p = bj.tempered_softmax(logits, 1.4, backend="triton")
    np.testing.assert_allclose(p, ref.tempered_softmax(logits, 1.4), rtol=1e-5, atol=1e-7)
    cotangent = np.random.default_rng(5).standard_normal(logits.shape).astype(np.float32)
    vjp_triton = jax.vjp(lambda a: bj.tempered_softmax(a, 1.4, backend="triton"), logits)[1](cotangent)[0]
    vjp_xla = jax.vjp(lambda a: bj.tempered_softmax(a, 1.4, backend="xla"), logits)[1](cotangent)[0]
    np.testing.assert_allclose(vjp_triton, vjp_xla, rtol=1e-4, atol=1e-6)
    x = logits[:, 0]
    np.testing.assert_allclose(bj.tempered_sigmoid(x, 2.0, backend="triton"), ref.tempered_sigmoid(x, 2.0),
                               rtol=1e-5)
    y = np.random.default_rng(6).uniform(size=x.shape).astype(np.float32)
    binary = bj.bi_tempered_binary_logistic_loss(x, y, 0.5, 1.5, backend="triton")
    np.testing.assert_allclose(binary, ref.binary_loss(x, y, 0.5, 1.5), rtol=1e-5, atol=1e-7)
    g_triton = jax.grad(lambda v: bj.bi_tempered_binary_logistic_loss(v, y, 0.5, 1.5, backend="triton").sum())(x)
    g_xla = jax.grad(lambda v: bj.bi_tempered_binary_logistic_loss(v, y, 0.5, 1.5, backend="xla").sum())(x)
    np.testing.assert_allclose(g_triton, g_xla, rtol=1e-4, atol=1e-6)
    gs = jax.grad(lambda v: bj.tempered_sigmoid(v, 2.0, backend="triton").sum())(x)
    gs_xla = jax.grad(lambda v: bj.tempered_sigmoid(v, 2.0, backend="xla").sum())(x)
    np.testing.assert_allclose(gs, gs_xla, rtol=1e-4, atol=1e-6)


def test_auto_picks_xla_on_cpu():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU 'auto' picks the Triton path")
    from bitempered.bindings.jax import args

    assert args.resolve_backend("auto", jnp.float32) == "xla"
    # (that "auto" never imports jax_triton on CPU is checked in a clean subprocess in test_jax.py)


def test_jax_and_torch_threads_take_turns_on_the_interpreter(triton_backend):
    """JAX (the stand-in's callbacks) and torch launch on Triton's interpreter from many threads at
    once: both take ``bindings/common/interpreter.py``'s lock, so every thread gets the
    single-threaded result and no InterpreterError (issue 28 item 5)."""
    if triton_backend == "real":
        pytest.skip("compiled launches on the GPU: no interpreter to share")
    import torch
    from concurrent.futures import ThreadPoolExecutor

    from bitempered import torch as bt

    def work(seed):
        logits, idx = _data((3, 6), seed)
        if seed % 2:
            return np.asarray(bj.bi_tempered_logistic_loss(logits, idx, 0.8, 1.2, backend="triton"))
        return bt.bi_tempered_logistic_loss(torch.from_numpy(logits), torch.from_numpy(idx).long(), 0.8, 1.2,
                                            backend="triton").numpy()

    seeds = list(range(16))
    want = [work(seed) for seed in seeds]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(work, seeds))  # re-raises a thread's error here
    for seed, expected, result in zip(seeds, want, got):
        np.testing.assert_array_equal(result, expected, err_msg=str(seed))
