"""Framework-free @triton.jit kernels of bitempered (pointers, strides, sizes, runtime scalars), and
one C kernel for the CPU (``cross_entropy_cpu.c``, compiled on first use by ``bindings/torch/native/cpu_kernel.py``)."""
