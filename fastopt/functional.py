"""Fused in-place optimizer steps on 1-D float32 arrays: sgd_, adam_, rmsprop_.

Each call checks every argument (a TypeError or ValueError names the argument, and nothing is
written), then runs one pass of the C kernel with the GIL released.  `fastopt.reference` has the
same functions in NumPy.
"""
from fastopt import _core
from fastopt._functional import make

sgd_, adam_, rmsprop_ = make(_core)
for _f in (sgd_, adam_, rmsprop_):
    _f.__module__ = __name__
del _f

__all__ = ["sgd_", "adam_", "rmsprop_"]
