"""The JAX binding (``bitempered.jax`` re-exports its public names).

- ``api``: the public functions; ``args``: argument checks and conversions; ``ops``: the
  ``custom_vjp`` cores (XLA and jax-triton); ``reductions``: the rows a loss counts and its
  "none"/"sum"/"mean" reduction; ``launchers``: the Triton kernels through jax-triton;
- ``native/``: SPEC in jnp (``math``: the solver and the loss terms; ``loss``: the one XLA loss,
  a forward with one residual and a one-pass backward; ``temperature``: the temperatures'
  gradients);
- features: ``linear`` (fused linear head), ``vocab_parallel`` (classes sharded over a mesh axis).

Importing this package imports nothing else: its modules import jax.
"""
