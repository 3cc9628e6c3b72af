"""The PyTorch binding (``bitempered.torch`` re-exports its public names).

- ``api``: the public functions and modules; ``args``: argument checks and conversions;
  ``rows``: kept rows, the reduction and the stored-gradient backward, written once;
- ``ops``: the ``torch.library`` custom ops and their autograd; ``func``: torch.func (vmap) rules;
  ``second_order``: the softmax's double backward; ``launchers``: the Triton kernel launchers;
- ``native/``: SPEC in plain torch ops (``math``: the solver and the loss terms; ``loss``: the one
  blocked loss driver; ``temperature``: the temperatures' gradients; ``cpu_kernel``: the CPU C
  kernel's loader);
- features: ``linear`` (fused linear head), ``vocab_parallel`` (classes sharded over a group;
  ``group_check``: one rank's error raised on every rank, none left waiting in a collective),
  ``dtensor`` (a DTensor sharded on the classes takes the vocab-parallel path).

Importing this package imports nothing else: its modules import torch.
"""
