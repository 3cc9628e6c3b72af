"""Framework-free @triton.jit kernels of bitempered (pointers, strides, sizes, runtime scalars)."""
