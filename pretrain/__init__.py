"""The pretraining stage: CFS scoring (``cfs``), SpCL (``spcl``, ``memory``, ``clustering``, ``knn``)."""

import sys
import types


class _CallablePackage(types.ModuleType):
    """``reidforge.pretrain`` names both this package and the API function ``reidforge.pretrain(recipe, ...)``.
    Importing any submodule binds the package over the function in ``reidforge``, so the package calls it."""

    def __call__(self, *args, **kwargs):
        from reidforge import _pretrain

        return _pretrain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
