"""Dataset adapters, one file each. Importing this package registers every adapter in
``reidforge.data.source.ADAPTERS``: a new file here with a ``@register``-ed class is all a new dataset needs."""

import importlib
import pkgutil

import reidforge.data.synthetic  # noqa: F401  (registers "synthetic")

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
