"""Optimizers over one flat arena: torch.optim's names, defaults and semantics.

Every class here is built from its declaration in fastopt.families on the C kernels
(fastopt._core); the arena, the param groups and the step live in fastopt._optimizer.  See
`Optimizer` and each class's docstring.
"""
from fastopt import _core
from fastopt._arena import ALIGN_BYTES  # noqa: F401  (the arena's alignment, as before)
from fastopt._optimizer import Optimizer, optimizer_class  # noqa: F401
from fastopt.families import OPTIMIZERS

globals().update({name: optimizer_class(spec, _core, __name__)
                  for name, spec in OPTIMIZERS.items()})
__all__ = ["Optimizer", "ALIGN_BYTES", *OPTIMIZERS]
