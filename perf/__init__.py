"""Side-by-side benchmarks of bitempered against every alternative (run ``python -m perf --help``).

Providers: bitempered Triton / native torch / JAX XLA / JAX Triton, torch.compile of the native
math, a naive PyTorch port (``perf/naive_port.py``), the original JAX implementation, and at
t1 = t2 = 1 the frameworks' cross-entropies (PyTorch eager and compiled, optax, Liger-Kernel's).
Results go to ``perf/out/<device-slug>/`` (git-ignored; ``--out perf/results/<slug>`` records the
tracked ones): ``results.csv`` (appended), ``results.md`` and ``plot_*.png``; ``--memory`` adds
``memory.csv`` and ``memory.md``.
"""
