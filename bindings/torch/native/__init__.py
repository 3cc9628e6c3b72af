"""SPEC with plain torch ops: the CPU/float64 backend and the kernels' ground truth."""
