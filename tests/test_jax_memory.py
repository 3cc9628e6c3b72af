"""Memory of the XLA loss's training step, and the row blocks that bound it.

``jit(value_and_grad(loss))`` holds, beyond its inputs, XLA's temporary buffers and what it
returns (the gradient, 1x the logits). Issue 10's bound: temporaries + gradient <= 3x the logits
(fp32, class indices and dense labels), checked from shapes alone (nothing runs) at the shape of
``python -m perf --memory`` (N = 4096, C = 50000), with the temperatures traced (one program for
every value) and closed over (a program per value: t1 = t2 = 1 takes the cross-entropy branch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitempered import jax as bj
from bitempered.bindings.jax.native import loss as jax_native_loss

N, C = 4096, 50000
TEMPERATURES = [(1.0, 1.0), (0.8, 1.2), (0.5, 0.8)]


def _extra_over_logits(labels: str, temperatures=None) -> float:
    """(temp + returned bytes) / logits bytes of the compiled fwd+bwd of the summed loss."""
    logits = jax.ShapeDtypeStruct((N, C), jnp.float32)
    y = jax.ShapeDtypeStruct((N,), jnp.int32) if labels == "int" else jax.ShapeDtypeStruct((N, C), jnp.float32)
    t = jax.ShapeDtypeStruct((), jnp.float32)
    if temperatures is None:
        step = jax.jit(jax.value_and_grad(
            lambda a, y_, t1, t2: bj.bi_tempered_logistic_loss(a, y_, t1, t2, backend="xla").sum()))
        compiled = step.lower(logits, y, t, t).compile()
    else:
        t1, t2 = temperatures
        step = jax.jit(jax.value_and_grad(
            lambda a, y_: bj.bi_tempered_logistic_loss(a, y_, t1, t2, backend="xla").sum()))
        compiled = step.lower(logits, y).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("XLA gives no memory analysis on this platform")
    return (analysis.temp_size_in_bytes + analysis.output_size_in_bytes) / (4 * N * C)


@pytest.mark.parametrize("labels", ["int", "dense"])
def test_training_step_holds_at_most_3x_the_logits(labels):
    assert _extra_over_logits(labels) <= 3.0  # traced temperatures: every value, one program
    for temperatures in TEMPERATURES:
        assert _extra_over_logits(labels, temperatures) <= 3.0, temperatures


@pytest.mark.parametrize("labels", ["int", "dense"])
def test_row_blocks_give_the_unblocked_values(monkeypatch, labels):
    """Small blocks (the last one moved back over rows already done) change no value."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((37, 5, 19)) * 3, jnp.float32)  # a shape no other test uses
    a = a.at[3, 1, 4].set(jnp.inf).at[5, 2, :3].set(-jnp.inf)
    y = (jnp.asarray(rng.integers(0, 19, (37, 5)), jnp.int32) if labels == "int"
         else jax.nn.softmax(jnp.asarray(rng.standard_normal((37, 5, 19)), jnp.float32) * 2))

    def loss_and_grad(t1, t2):
        return jax.jit(jax.value_and_grad(
            lambda a_, t1_, t2_: bj.bi_tempered_logistic_loss(a_, y, t1_, t2_, 0.05, backend="xla").sum()))(a, t1, t2)

    whole = {t: loss_and_grad(*t) for t in TEMPERATURES}
    monkeypatch.setattr(jax_native_loss, "BLOCK_ELEMENTS", 19 * 16)  # 16 rows a block: 12 blocks
    jax.clear_caches()
    try:
        for t, (loss, grad) in whole.items():
            loss_b, grad_b = loss_and_grad(*t)
            np.testing.assert_allclose(loss_b, loss, rtol=1e-6)
            np.testing.assert_allclose(grad_b, grad, rtol=1e-6, atol=1e-7)
    finally:
        jax.clear_caches()
