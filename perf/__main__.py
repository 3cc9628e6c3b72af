"""Entry point of ``python -m perf``."""

import os

# Before jax is imported: JAX must not grab 75% of the GPU that torch shares in this process.
# With preallocation off XLA's pool still only grows: cap it at half the GPU so torch keeps the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
os.environ.setdefault("MPLBACKEND", "Agg")

from perf.harness import main  # noqa: E402

raise SystemExit(main())
