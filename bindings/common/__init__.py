"""Framework-free parts of the bindings: argument checks, the fused linear head's row chunking,
and the kernels' autotuner (imports no framework)."""
