"""Optional dependencies: import one, or raise an ImportError that says which extra installs it."""

from __future__ import annotations

import importlib


def require(module: str, extra: str, purpose: str):
    """``importlib.import_module(module)``, or ImportError naming ``pip install -e ".[extra]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the `{module.split('.')[0]}` package, which is not installed: install the "
            f"'{extra}' extra (in a checkout of bitempered: pip install -e \".[{extra}]\")") from error
