"""bitempered: the Bi-Tempered Logistic Loss (Amid et al., NeurIPS 2019), converged and fused.

Import the framework you use: ``bitempered.torch`` or ``bitempered.jax``. Importing this
package imports neither framework (nor Triton).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
