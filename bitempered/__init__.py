"""bitempered: the Bi-Tempered Logistic Loss (Amid et al., NeurIPS 2019), converged and fused.

Import the framework you use: ``bitempered.torch`` or ``bitempered.jax``. Importing this
package imports neither framework (nor Triton).
"""

__version__ = "0.1.0"
__all__ = ["__version__", "autotune"]


def autotune(enabled: bool | None = True) -> bool:
    """Switches autotuning of the Triton kernels' launch configurations on or off (None: follow
    ``$BITEMPERED_AUTOTUNE``); returns the previous state. Off by default. See
    ``bindings/common/autotune.py`` and ``python -m bitempered.tune``."""
    from .bindings.common import autotune as _autotune  # lazy: keeps ``import bitempered`` light

    return _autotune.set_enabled(enabled)
