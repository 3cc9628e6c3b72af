"""Side-by-side benchmarks of bitempered against every alternative (run ``python -m perf --help``).

Providers: bitempered Triton / native torch / JAX XLA / JAX Triton, torch.compile of the native
math, a naive PyTorch port (``perf/naive_port.py``), the original JAX implementation, and at
t1 = t2 = 1 PyTorch's cross-entropy (eager, compiled) and Liger-Kernel's. Results go to
``perf/results/<device-slug>/``: ``results.csv`` (appended), ``results.md`` and ``plot_*.png``.
"""
