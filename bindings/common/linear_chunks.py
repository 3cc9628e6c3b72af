"""The row-chunk rule of the fused linear + loss (framework-free, shared by the torch and JAX bindings).

Default: as many rows as keep one fp32 chunk x C buffer of logits within ``CHUNK_BYTES`` (64 MiB),
``clamp(CHUNK_BYTES // (4 C), 1, N)`` (335 rows at C = 50000, 130 at C = 128256), then evened out
over the chunks (N = 4096, C = 50000: 13 chunks of 316 rows). Why 64 MiB: on CPU
the native backends hold about six chunk-sized fp32 temporaries, so the peak stays a few hundred
MiB, and a (335 x H) @ (H x C) matmul still runs at full speed (perf/linear.py measures both).
"""

from __future__ import annotations

CHUNK_BYTES = 64 * 2**20


def default_chunk_size(num_rows: int, num_classes: int) -> int:
    """Rows per chunk so that one fp32 chunk x C buffer stays within CHUNK_BYTES (1 <= rows <= N),
    balanced so the last chunk is not a sliver (the JAX scan pads it to a whole chunk)."""
    most = max(1, min(max(num_rows, 1), CHUNK_BYTES // (4 * max(num_classes, 1))))
    num_chunks = -(-max(num_rows, 1) // most)
    return -(-max(num_rows, 1) // num_chunks)


def chunk_size(value, num_rows: int, num_classes: int) -> int:
    """The checked ``chunk_size`` argument (None: the default rule)."""
    if value is None:
        return default_chunk_size(num_rows, num_classes)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"chunk_size must be None or an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {value}")
    return value
