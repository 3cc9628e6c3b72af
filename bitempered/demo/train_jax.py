"""Training with plain JAX: the same ensemble, recipe and batches as ``train_torch.py``, with a
hand-written Adam and ``bitempered.jax``'s loss. One jitted ``lax.scan`` runs a whole epoch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bitempered.demo.mlp import LossSpec, Recipe, TemperatureRecipe, batch_order, init_params
from bitempered.jax import bi_tempered_logistic_loss


def _forward(params, x):
    """Logits [M, n, C] of inputs x [M, n, D]."""
    hidden = jax.nn.relu(jnp.einsum("mnd,mdh->mnh", x, params["w1"]) + params["b1"][:, None])
    return jnp.einsum("mnh,mhc->mnc", hidden, params["w2"]) + params["b2"][:, None]


def _per_row(t, rows_shape):
    """A 0-d temperature as is; one per model ([M, 1]) broadcast to the batch's rows [M, b]."""
    return t if t.ndim == 0 else jnp.broadcast_to(t, rows_shape)


def _objective(params, temperatures, x, y):
    """Sum over models of each model's minibatch-mean loss (the models stay independent)."""
    t1, t2 = (_per_row(temperatures[k], y.shape) for k in ("t1", "t2"))
    losses = bi_tempered_logistic_loss(_forward(params, x), y, t1, t2)  # [M, b]
    return losses.mean(axis=1).sum()


def _adam(params, grads, state, lr: float, recipe: Recipe):
    """One Adam step at learning rate ``lr`` (same update as torch.optim.Adam without weight decay)."""
    step, m, v = state
    step = step + 1
    m = jax.tree.map(lambda m_, g: recipe.beta1 * m_ + (1 - recipe.beta1) * g, m, grads)
    v = jax.tree.map(lambda v_, g: recipe.beta2 * v_ + (1 - recipe.beta2) * g * g, v, grads)
    scale_m = 1.0 / (1.0 - recipe.beta1 ** step)
    scale_v = 1.0 / (1.0 - recipe.beta2 ** step)
    params = jax.tree.map(
        lambda p, m_, v_: p - lr * (m_ * scale_m) / (jnp.sqrt(v_ * scale_v) + recipe.eps),
        params, m, v)
    return params, (step, m, v)


def _adam_state(params):
    """Adam's (step, first moment, second moment) at the start: all zeros."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    return jnp.zeros((), jnp.float32), zeros, zeros


def _project(temperatures, learn: TemperatureRecipe):
    """Clips the temperatures into the recipe's box."""
    return {"t1": jnp.clip(temperatures["t1"], *learn.t1_range),
            "t2": jnp.clip(temperatures["t2"], *learn.t2_range)}


@functools.partial(jax.jit, static_argnames=("recipe", "learn"))
def _epoch(params, state, temperatures, temperature_state, x, y, order, recipe: Recipe,
           learn: TemperatureRecipe | None):
    """One epoch: scans over the minibatches ``order`` [steps, M, b]. With ``learn`` the
    temperatures take their own Adam step (and projection) after every weight step."""
    models = jnp.arange(x.shape[0])[:, None]

    def step(carry, idx):
        params, state, temperatures, temperature_state = carry
        batch = (x[models, idx], y[models, idx])
        if learn is None:  # no temperature gradient asked for, so none is computed
            grads = jax.grad(_objective)(params, temperatures, *batch)
        else:
            grads, temperature_grads = jax.grad(_objective, argnums=(0, 1))(params, temperatures, *batch)
            temperatures, temperature_state = _adam(temperatures, temperature_grads,
                                                    temperature_state, learn.lr, recipe)
            temperatures = _project(temperatures, learn)
        params, state = _adam(params, grads, state, recipe.lr, recipe)
        return (params, state, temperatures, temperature_state), None

    carry, _ = jax.lax.scan(step, (params, state, temperatures, temperature_state), order)
    return carry


def train(x_train, y_train, loss: LossSpec, recipe: Recipe, seeds, num_classes: int,
          device: str | None = None, on_epoch=None, learn_temperatures: TemperatureRecipe | None = None,
          on_temperatures=None):
    """Trains one model per row of ``x_train`` [M, n, D] / ``y_train`` [M, n] (model m uses seed
    ``seeds[m]``); returns ``predict(x [M, k, D]) -> class indices [M, k]`` (NumPy).
    ``device``: a JAX platform ("cpu", "gpu", ...; optionally "gpu:1"), default JAX's default.
    ``learn_temperatures`` / ``on_temperatures``: as in ``train_torch.train``."""
    run = functools.partial(_train, x_train, y_train, loss, recipe, seeds, num_classes, on_epoch,
                            learn_temperatures, on_temperatures)
    if device is None:
        return run()
    platform, _, index = device.partition(":")
    with jax.default_device(jax.devices(platform)[int(index or 0)]):
        return run()


def _initial_temperatures(loss: LossSpec, models: int, learn: TemperatureRecipe | None):
    """0-d temperatures when fixed (the loss's usual path); one [M, 1] pair per model when learned."""
    shape = () if learn is None else (models, 1)
    return {"t1": jnp.full(shape, loss.t1, jnp.float32), "t2": jnp.full(shape, loss.t2, jnp.float32)}


def _report_temperatures(on_temperatures, temperatures, models: int):
    """Calls ``on_temperatures`` with the [M, 2] float64 pairs."""
    on_temperatures(np.column_stack([np.broadcast_to(np.asarray(temperatures[k], np.float64), (models, 1))
                                     for k in ("t1", "t2")]))


def _train(x_train, y_train, loss, recipe, seeds, num_classes, on_epoch, learn, on_temperatures):
    params = {k: jnp.asarray(v) for k, v in
              init_params(seeds, x_train.shape[-1], recipe.hidden, num_classes).items()}
    state = _adam_state(params)
    temperatures = _initial_temperatures(loss, len(seeds), learn)
    temperature_state = _adam_state(temperatures)
    x, y = jnp.asarray(x_train), jnp.asarray(y_train)
    if on_temperatures is not None:
        _report_temperatures(on_temperatures, temperatures, len(seeds))
    for order in batch_order(seeds, x_train.shape[1], recipe.epochs, recipe.batch_size):
        params, state, temperatures, temperature_state = _epoch(
            params, state, temperatures, temperature_state, x, y, jnp.asarray(order), recipe, learn)
        if on_temperatures is not None:
            _report_temperatures(on_temperatures, temperatures, len(seeds))
        if on_epoch is not None:
            on_epoch()
    device = next(iter(params["w1"].devices()))

    def predict(x_eval) -> np.ndarray:
        x_eval = jax.device_put(jnp.asarray(x_eval, jnp.float32), device)
        return np.asarray(jnp.argmax(_forward(params, x_eval), -1))

    return predict
