"""Public PyTorch API of bitempered (see ``bindings/torch/api.py`` for the implementation).

Beside the losses, the tempered functions themselves are public: :func:`log_t`, :func:`exp_t` and
:func:`compute_normalization` (``bindings/torch/tempered.py``).
"""

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
from bitempered.bindings.torch.tempered import compute_normalization, exp_t, log_t
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
    "compute_normalization",
    "exp_t",
    "log_t",
    "tempered_sigmoid",
    "tempered_softmax",
    "vocab_parallel_bi_tempered_logistic_loss",
    "vocab_parallel_tempered_softmax",
]
