"""Optional dependencies of the ``quant`` extra, imported on first use with a clear error."""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> the package pip installs it from
_PACKAGES = {"bitsandbytes": "bitsandbytes", "compressed_tensors": "compressed-tensors"}


def require(module: str, extra: str = "quant") -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that says which ``pip install`` to run."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = _PACKAGES.get(module, module)
        raise ImportError(
            f"{module} is needed here but is not installed: `pip install 'shears[{extra}]'` "
            f"(or `pip install {package}`)") from e
