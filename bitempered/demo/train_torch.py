"""Training with PyTorch: an ensemble of M MLPs (see ``mlp.py``), Adam, ``bitempered.torch``'s loss."""

from __future__ import annotations

import numpy as np
import torch

from bitempered.demo.mlp import LossSpec, Recipe, batch_order, init_params


def _forward(params, x):
    """Logits [M, n, C] of inputs x [M, n, D]."""
    hidden = torch.relu(torch.baddbmm(params["b1"].unsqueeze(1), x, params["w1"]))
    return torch.baddbmm(params["b2"].unsqueeze(1), hidden, params["w2"])


def train(x_train, y_train, loss: LossSpec, recipe: Recipe, seeds, num_classes: int,
          device: str | None = None, on_epoch=None):
    """Trains one model per row of ``x_train`` [M, n, D] / ``y_train`` [M, n] (model m uses seed
    ``seeds[m]``); returns ``predict(x [M, k, D]) -> class indices [M, k]`` (NumPy).
    ``device``: a torch device string (default "cpu")."""
    device = device or "cpu"
    from bitempered.torch import bi_tempered_logistic_loss

    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        # The tensors are tiny: one thread avoids intra-op synchronisation, which costs more than
        # it saves here (and far more on a busy machine).
        torch.set_num_threads(1)
    try:
        return _train(x_train, y_train, loss, recipe, seeds, num_classes, device, on_epoch,
                      bi_tempered_logistic_loss)
    finally:
        torch.set_num_threads(threads)


def _train(x_train, y_train, loss, recipe, seeds, num_classes, device, on_epoch,
           bi_tempered_logistic_loss):
    init = init_params(seeds, x_train.shape[-1], recipe.hidden, num_classes)
    params = {k: torch.tensor(v, device=device, requires_grad=True) for k, v in init.items()}
    optimizer = torch.optim.Adam(params.values(), lr=recipe.lr,
                                 betas=(recipe.beta1, recipe.beta2), eps=recipe.eps)
    x = torch.as_tensor(x_train, device=device)
    y = torch.as_tensor(y_train, device=device)
    models = torch.arange(len(seeds), device=device).unsqueeze(1)
    for order in batch_order(seeds, x_train.shape[1], recipe.epochs, recipe.batch_size):
        for idx in torch.as_tensor(order, device=device):          # idx: [M, b]
            logits = _forward(params, x[models, idx])
            # Sum of each model's minibatch mean: the models' gradients stay independent.
            value = bi_tempered_logistic_loss(logits, y[models, idx], loss.t1, loss.t2,
                                              reduction="sum") / idx.shape[1]
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch()

    def predict(x_eval) -> np.ndarray:
        with torch.no_grad():
            logits = _forward(params, torch.as_tensor(x_eval, dtype=torch.float32, device=device))
        return logits.argmax(-1).cpu().numpy()

    return predict
