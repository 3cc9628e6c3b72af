"""Per-row temperatures in the row kernels (issue 22): the loss, softmax forward and softmax
backward kernels take t (t1, t2) as one value per row (``tempered_math.program_value``, stride 1,
one row per program). Each row must equal the launch with that row's temperatures as scalars, on
the on-chip and chunked paths, with rows [N, C] and NCHW logits read in place, through both
frameworks' launchers; a wrong length is refused.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from bitempered.bindings.torch import launchers  # noqa: E402
from bitempered.kernels import launch_config  # noqa: E402

from interpreter_warnings import EXPECTED as EXPECTED_INTERPRETER_WARNINGS  # noqa: E402

try:  # the JAX launchers' stand-in for jax-triton on this machine (a fixture)
    from test_jax_triton import triton_backend  # noqa: F401
except ImportError:  # no JAX installed
    pass

pytestmark = EXPECTED_INTERPRETER_WARNINGS

# one row per regime: t = 1 exactly, t < 1 with a finite support, heavy tails, mixed
T1 = [1.0, 0.5, 0.8, 1.3, 0.2, 1.0, 0.9]
T2 = [1.0, 0.7, 1.2, 2.0, 1.0, 0.6, 3.5]


def _forced(chunked: bool):
    return launch_config.override_on_chip_limit(4) if chunked else contextlib.nullcontext()


def _logits(seed: int, shape):
    x = 3.0 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x.view(-1)[0] = 25.0  # a dominant class: at t2 < 1 classes fall outside the support
    return x


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("per_row", ["both", "t1", "t2"])
def test_loss_kernel_per_row_temperatures_equal_scalar_launches(chunked, per_row):
    logits = _logits(1, (7, 9))
    labels = torch.tensor([0, 3, -100, 8, 1, 2, 5])
    t1 = torch.tensor(T1) if per_row != "t2" else torch.tensor(0.8)
    t2 = torch.tensor(T2) if per_row != "t1" else torch.tensor(1.2)
    dt = torch.empty(7, 2)
    with _forced(chunked):
        loss, grad = launchers.loss_forward(logits, labels, t1, t2, 0.1, None, -100, True, temperature_grads=dt)
        for r in range(7):
            u1, u2 = (t.reshape(-1)[r if t.dim() else 0] for t in (t1, t2))
            dt_r = torch.empty(1, 2)
            loss_r, grad_r = launchers.loss_forward(logits[r:r + 1], labels[r:r + 1], u1, u2, 0.1, None, -100, True,
                                                    temperature_grads=dt_r)
            torch.testing.assert_close(loss[r:r + 1], loss_r, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(grad[r:r + 1], grad_r, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(dt[r:r + 1], dt_r, rtol=1e-6, atol=1e-7)
    assert loss[2] == 0 and torch.all(grad[2] == 0) and torch.all(dt[2] == 0)  # the ignored row
    # the rows differ: a kernel that used the first row's temperatures for every row would fail
    assert len({round(float(v), 4) for v in loss[[0, 1, 3, 4]]}) == 4


@pytest.mark.parametrize("chunked", [False, True])
def test_loss_kernel_per_row_temperatures_on_nchw_logits_read_in_place(chunked):
    logits = _logits(2, (2, 5, 3, 2))  # (N, C, H, W): 12 rows, class stride 6
    labels = torch.randint(0, 5, (2, 3, 2), generator=torch.Generator().manual_seed(3))
    t1 = torch.linspace(0.3, 1.4, 12)
    t2 = torch.linspace(0.6, 2.5, 12)
    rows = logits.movedim(1, -1).reshape(12, 5).contiguous()
    with _forced(chunked):
        loss, grad = launchers.loss_forward(logits, labels, t1, t2, 0.0, None, -100, True, class_dim=1)
        want_loss, want_grad = launchers.loss_forward(rows, labels.reshape(-1), t1, t2, 0.0, None, -100, True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.movedim(1, -1).reshape(12, 5), want_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunked", [False, True])
def test_softmax_kernels_per_row_temperature_equal_scalar_launches(chunked):
    logits = _logits(4, (7, 9))
    t = torch.tensor(T2)
    upstream = torch.randn(7, 9, generator=torch.Generator().manual_seed(5))
    dt = torch.empty(7)
    with _forced(chunked):
        probs = launchers.softmax_forward(logits, t, None)
        grad = launchers.softmax_backward(probs, upstream, t, temperature_grad=dt)
        for r in range(7):
            probs_r = launchers.softmax_forward(logits[r:r + 1], float(t[r]), None)
            dt_r = torch.empty(1)
            grad_r = launchers.softmax_backward(probs_r, upstream[r:r + 1], float(t[r]), temperature_grad=dt_r)
            torch.testing.assert_close(probs[r:r + 1], probs_r, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(grad[r:r + 1], grad_r, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(dt[r:r + 1], dt_r, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(7), rtol=0, atol=2e-6)


def test_per_row_temperature_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="one value per row"):
        launchers.softmax_forward(torch.zeros(4, 3), torch.ones(3), None)


def test_one_row_per_program_keeps_the_columns():
    config = launch_config.row_config(10, 4)
    assert config.block_rows > 1
    single = launch_config.one_row_per_program(config)
    assert (single.block_rows, single.block_cols, single.chunked) == (1, config.block_cols, False)
    chunked = launch_config.row_config(100_000, 2)
    assert launch_config.one_row_per_program(chunked) == chunked


def test_jax_launchers_per_row_temperatures_equal_scalar_launches(request):
    pytest.importorskip("jax")
    request.getfixturevalue("triton_backend")  # jax-triton, or its interpreter stand-in
    import jax.numpy as jnp

    from bitempered.bindings.jax import launchers as jax_launchers

    logits = jnp.asarray(_logits(6, (5, 6)).numpy())
    labels = jnp.asarray([0, 5, 2, 3, 1], jnp.int32)
    t1, t2 = jnp.asarray(T1[:5], jnp.float32), jnp.asarray(T2[:5], jnp.float32)
    loss, grad, dt = jax_launchers.loss_rows(logits, labels, t1, t2, 0.0, None, -100, True,
                                             need_temperature_grads=True)
    probs = jax_launchers.softmax_forward(logits, t2, None)
    for r in range(5):
        loss_r, grad_r, dt_r = jax_launchers.loss_rows(logits[r:r + 1], labels[r:r + 1], t1[r], t2[r], 0.0, None,
                                                       -100, True, need_temperature_grads=True)
        np.testing.assert_allclose(loss[r:r + 1], loss_r, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(grad[r:r + 1], grad_r, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(dt[r:r + 1], dt_r, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(probs[r:r + 1], jax_launchers.softmax_forward(logits[r:r + 1], t2[r], None),
                                   rtol=1e-6, atol=1e-7)
