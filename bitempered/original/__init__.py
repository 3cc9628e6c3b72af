"""Drop-ins for the package this library replaces: the original Bi-Tempered Logistic Loss API.

``bitempered.original.jax`` has the public names, argument names and defaults of
jax-bitempered-loss 0.0.2 (``from jax_bitempered_loss import loss``), plus the TensorFlow
original's ``sparse_bi_tempered_logistic_loss``; ``bitempered.original.torch`` has the same API for
torch tensors. Both compute with this library (``num_iters=5`` by default, the original algorithm;
``num_iters=None`` solves the normalization to convergence). Importing this package imports
neither framework.
"""
