"""The methods, one module per method in a folder per family, and the fusion pass (`fuse`).

Importing this package (``surgeon`` does) imports every module of every family folder, and each
method class registers itself under its ``name`` (`surgeon.spec.MethodSpec`): adding a method
is adding its file. Installed as ``surgeon.passes``.
"""

import importlib
import pkgutil

from surgeon.spec import METHODS


def _import_families() -> list[str]:
    """Import every module of every family folder; return the families' names."""
    families = [info.name for info in pkgutil.iter_modules(__path__) if info.ispkg]
    for family in families:
        package = importlib.import_module(f"{__name__}.{family}")
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
    return families


FAMILIES = tuple(_import_families())

__all__ = ["FAMILIES", "METHODS"]
