"""Training with PyTorch: an ensemble of M MLPs (see ``mlp.py``), Adam, ``bitempered.torch``'s loss."""

from __future__ import annotations

import numpy as np
import torch

from bitempered.demo.mlp import LossSpec, Recipe, TemperatureRecipe, batch_order, init_params


def _forward(params, x):
    """Logits [M, n, C] of inputs x [M, n, D]."""
    hidden = torch.relu(torch.baddbmm(params["b1"].unsqueeze(1), x, params["w1"]))
    return torch.baddbmm(params["b2"].unsqueeze(1), hidden, params["w2"])


class _FixedTemperatures:
    """The loss's (t1, t2) as plain floats: nothing to learn."""

    def __init__(self, loss: LossSpec, models: int):
        self.t1, self.t2 = loss.t1, loss.t2
        self.models = models

    def for_batch(self, batch_size: int):
        return self.t1, self.t2

    def zero_grad(self):
        pass

    def step(self):
        pass

    def values(self) -> np.ndarray:
        return np.tile([self.t1, self.t2], (self.models, 1))


class _LearnedTemperatures:
    """One learnable (t1, t2) pair per model, [M, 1] each, starting at the loss's values; each batch
    sees them expanded to per-row temperatures [M, b] (the loss's per-row API: the expand's
    backward sums each model's rows back into its pair)."""

    def __init__(self, loss: LossSpec, models: int, recipe: Recipe, learn: TemperatureRecipe, device):
        self.t1 = torch.full((models, 1), float(loss.t1), device=device, requires_grad=True)
        self.t2 = torch.full((models, 1), float(loss.t2), device=device, requires_grad=True)
        self.learn = learn
        self.optimizer = torch.optim.Adam([self.t1, self.t2], lr=learn.lr,
                                          betas=(recipe.beta1, recipe.beta2), eps=recipe.eps)

    def for_batch(self, batch_size: int):
        return self.t1.expand(-1, batch_size), self.t2.expand(-1, batch_size)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def step(self):
        """An Adam step, then the projection into the recipe's box."""
        self.optimizer.step()
        with torch.no_grad():
            self.t1.clamp_(*self.learn.t1_range)
            self.t2.clamp_(*self.learn.t2_range)

    def values(self) -> np.ndarray:
        """The current pairs, [M, 2] float64."""
        return torch.cat([self.t1, self.t2], dim=1).detach().cpu().double().numpy()


def train(x_train, y_train, loss: LossSpec, recipe: Recipe, seeds, num_classes: int,
          device: str | None = None, on_epoch=None, learn_temperatures: TemperatureRecipe | None = None,
          on_temperatures=None):
    """Trains one model per row of ``x_train`` [M, n, D] / ``y_train`` [M, n] (model m uses seed
    ``seeds[m]``); returns ``predict(x [M, k, D]) -> class indices [M, k]`` (NumPy).
    ``device``: a torch device string (default "cpu").
    ``learn_temperatures``: None (default: ``loss``'s fixed temperatures) or a recipe: each model
    then learns its own (t1, t2), starting at ``loss``'s. ``on_temperatures`` (if given) is called
    with the [M, 2] float64 pairs before the first epoch and after every epoch."""
    device = device or "cpu"
    from bitempered.torch import bi_tempered_logistic_loss

    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        # The tensors are tiny: one thread avoids intra-op synchronisation, which costs more than
        # it saves here (and far more on a busy machine).
        torch.set_num_threads(1)
    if learn_temperatures is None:
        temperatures = _FixedTemperatures(loss, len(seeds))
    else:
        temperatures = _LearnedTemperatures(loss, len(seeds), recipe, learn_temperatures, device)
    try:
        return _train(x_train, y_train, temperatures, recipe, seeds, num_classes, device, on_epoch,
                      on_temperatures, bi_tempered_logistic_loss)
    finally:
        torch.set_num_threads(threads)


def _train(x_train, y_train, temperatures, recipe, seeds, num_classes, device, on_epoch,
           on_temperatures, bi_tempered_logistic_loss):
    init = init_params(seeds, x_train.shape[-1], recipe.hidden, num_classes)
    params = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in init.items()}
    optimizer = torch.optim.Adam(params.values(), lr=recipe.lr,
                                 betas=(recipe.beta1, recipe.beta2), eps=recipe.eps)
    x = torch.as_tensor(x_train, device=device)
    y = torch.as_tensor(y_train, device=device)
    models = torch.arange(len(seeds), device=device).unsqueeze(1)
    if on_temperatures is not None:
        on_temperatures(temperatures.values())
    for order in batch_order(seeds, x_train.shape[1], recipe.epochs, recipe.batch_size):
        for idx in torch.as_tensor(order, device=device):          # idx: [M, b]
            logits = _forward(params, x[models, idx])
            t1, t2 = temperatures.for_batch(idx.shape[1])
            # Sum of each model's minibatch mean: the models' gradients stay independent.
            value = bi_tempered_logistic_loss(logits, y[models, idx], t1, t2,
                                              reduction="sum") / idx.shape[1]
            optimizer.zero_grad(set_to_none=True)
            temperatures.zero_grad()
            value.backward()
            optimizer.step()
            temperatures.step()
        if on_temperatures is not None:
            on_temperatures(temperatures.values())
        if on_epoch is not None:
            on_epoch()

    def predict(x_eval) -> np.ndarray:
        with torch.no_grad():
            logits = _forward(params, torch.as_tensor(x_eval, dtype=torch.float32, device=device))
        return logits.argmax(-1).cpu().numpy()

    return predict
