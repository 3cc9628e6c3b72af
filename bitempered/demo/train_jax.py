"""Training with plain JAX: the same ensemble, recipe and batches as ``train_torch.py``, with a
hand-written Adam and ``bitempered.jax``'s loss. One jitted ``lax.scan`` runs a whole epoch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bitempered.demo.mlp import LossSpec, Recipe, batch_order, init_params
from bitempered.jax import bi_tempered_logistic_loss


def _forward(params, x):
    """Logits [M, n, C] of inputs x [M, n, D]."""
    hidden = jax.nn.relu(jnp.einsum("mnd,mdh->mnh", x, params["w1"]) + params["b1"][:, None])
    return jnp.einsum("mnh,mhc->mnc", hidden, params["w2"]) + params["b2"][:, None]


def _objective(params, x, y, t1, t2):
    """Sum over models of each model's minibatch-mean loss (the models stay independent)."""
    losses = bi_tempered_logistic_loss(_forward(params, x), y, t1, t2)  # [M, b]
    return losses.mean(axis=1).sum()


def _adam(params, grads, state, recipe: Recipe):
    """One Adam step (same update as torch.optim.Adam without weight decay)."""
    step, m, v = state
    step = step + 1
    m = jax.tree.map(lambda m_, g: recipe.beta1 * m_ + (1 - recipe.beta1) * g, m, grads)
    v = jax.tree.map(lambda v_, g: recipe.beta2 * v_ + (1 - recipe.beta2) * g * g, v, grads)
    scale_m = 1.0 / (1.0 - recipe.beta1 ** step)
    scale_v = 1.0 / (1.0 - recipe.beta2 ** step)
    params = jax.tree.map(
        lambda p, m_, v_: p - recipe.lr * (m_ * scale_m) / (jnp.sqrt(v_ * scale_v) + recipe.eps),
        params, m, v)
    return params, (step, m, v)


@functools.partial(jax.jit, static_argnames="recipe")
def _epoch(params, state, x, y, order, t1, t2, recipe: Recipe):
    """One epoch: scans over the minibatches ``order`` [steps, M, b]."""
    models = jnp.arange(x.shape[0])[:, None]

    def step(carry, idx):
        params, state = carry
        grads = jax.grad(_objective)(params, x[models, idx], y[models, idx], t1, t2)
        return _adam(params, grads, state, recipe), None

    (params, state), _ = jax.lax.scan(step, (params, state), order)
    return params, state


def train(x_train, y_train, loss: LossSpec, recipe: Recipe, seeds, num_classes: int,
          device: str | None = None, on_epoch=None):
    """Trains one model per row of ``x_train`` [M, n, D] / ``y_train`` [M, n] (model m uses seed
    ``seeds[m]``); returns ``predict(x [M, k, D]) -> class indices [M, k]`` (NumPy).
    ``device``: a JAX platform ("cpu", "gpu", ...; optionally "gpu:1"), default JAX's default."""
    if device is None:
        return _train(x_train, y_train, loss, recipe, seeds, num_classes, on_epoch)
    platform, _, index = device.partition(":")
    with jax.default_device(jax.devices(platform)[int(index or 0)]):
        return _train(x_train, y_train, loss, recipe, seeds, num_classes, on_epoch)


def _train(x_train, y_train, loss, recipe, seeds, num_classes, on_epoch):
    params = {k: jnp.asarray(v) for k, v in
              init_params(seeds, x_train.shape[-1], recipe.hidden, num_classes).items()}
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = (jnp.zeros((), jnp.float32), zeros, zeros)
    x, y = jnp.asarray(x_train), jnp.asarray(y_train)
    t1, t2 = jnp.float32(loss.t1), jnp.float32(loss.t2)
    for order in batch_order(seeds, x_train.shape[1], recipe.epochs, recipe.batch_size):
        params, state = _epoch(params, state, x, y, jnp.asarray(order), t1, t2, recipe)
        if on_epoch is not None:
            on_epoch()
    device = next(iter(params["w1"].devices()))

    def predict(x_eval) -> np.ndarray:
        x_eval = jax.device_put(jnp.asarray(x_eval, jnp.float32), device)
        return np.asarray(jnp.argmax(_forward(params, x_eval), -1))

    return predict
