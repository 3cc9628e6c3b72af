"""Public JAX API of bitempered (the implementation: the ``bindings/jax/`` package, see its ``__init__``).

Beside the losses, the tempered functions themselves are public: :func:`log_t`, :func:`exp_t` and
:func:`compute_normalization` (``bindings/jax/tempered.py``).
"""

from bitempered.extras import require

require("jax", "jax", "bitempered.jax")  # without jax: an ImportError naming the extra

from bitempered.bindings.jax.api import (
    bi_tempered_binary_logistic_loss,
    bi_tempered_logistic_loss,
    tempered_sigmoid,
    tempered_softmax,
)
from bitempered.bindings.jax.linear import linear_bi_tempered_logistic_loss
from bitempered.bindings.jax.tempered import compute_normalization, exp_t, log_t
from bitempered.bindings.jax.vocab_parallel import (
    vocab_parallel_bi_tempered_logistic_loss,
    vocab_parallel_tempered_softmax,
)

__all__ = [
    "linear_bi_tempered_logistic_loss",
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
