"""Public PyTorch API of bitempered (see ``bindings/torch/api.py`` for the implementation)."""

from bitempered.extras import require

require("torch", "torch", "bitempered.torch")  # without torch: an ImportError naming the extra

from bitempered.bindings.torch.api import (
    BiTemperedLogisticLoss,
    bi_tempered_binary_logistic_loss,
    bi_tempered_logistic_loss,
    tempered_sigmoid,
    tempered_softmax,
)
from bitempered.bindings.torch.linear import LinearBiTemperedLogisticLoss, linear_bi_tempered_logistic_loss

from bitempered.bindings.torch.vocab_parallel import (
    vocab_parallel_bi_tempered_logistic_loss,
    vocab_parallel_tempered_softmax,
)

__all__ = [
    "linear_bi_tempered_logistic_loss",
    "LinearBiTemperedLogisticLoss",
    "BiTemperedLogisticLoss",
    "bi_tempered_binary_logistic_loss",
    "bi_tempered_logistic_loss",
    "tempered_sigmoid",
    "tempered_softmax",
    "vocab_parallel_bi_tempered_logistic_loss",
    "vocab_parallel_tempered_softmax",
]
