"""Fused in-place optimizer steps on 1-D float32 arrays: one function a family (sgd_, adam_,
rmsprop_, ...), built from fastopt.families.

Each call checks every argument (a TypeError or ValueError names the argument, and nothing is
written), then runs one pass of the C kernel with the GIL released.  `fastopt.reference` has the
same functions in NumPy.
"""
from fastopt import _core
from fastopt._functional import make
from fastopt.families import FAMILIES

for _fam in FAMILIES.values():
    _f = make(_core, _fam)
    _f.__module__ = __name__
    globals()[_f.__name__] = _f
del _fam, _f

__all__ = [name + "_" for name in FAMILIES]
