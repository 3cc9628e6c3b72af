"""SPEC in jnp (XLA): the CPU/TPU backend and the kernels' ground truth."""
