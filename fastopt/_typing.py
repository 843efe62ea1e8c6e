"""The types the public API's annotations and stubs share (fastopt/*.pyi, fastopt._stubs)."""
from typing import Any, Dict, Iterable, List, Mapping, Protocol, Tuple, TypeVar, Union

import numpy as np
import numpy.typing as npt

# A float32 array: a parameter, a gradient, a state buffer, or a view of the arena.
F32 = npt.NDArray[np.float32]

# torch's `params`: float32 arrays, named ones (a mapping, or (name, array) pairs), or param
# groups (dicts with a 'params' entry of either kind, and hyperparameters).
NamedParams = Union[Mapping[str, F32], Iterable[Tuple[str, F32]]]
ParamList = Iterable[F32]
ParamGroups = Iterable[Mapping[str, Any]]
Params = Union[NamedParams, ParamList, ParamGroups]

# What `opt.params` and `opt.grads` are: a dict by name when the params were named, else a
# list in the order given.  The classes are generic in it (fastopt/optim.pyi picks it from the
# `params` argument), so `opt.params["w"]` and `opt.params[0]` both type-check where valid.
Views = TypeVar("Views", covariant=True)


class HasFlatGrads(Protocol):
    """An optimizer, or a wrapper of one (DataParallel): what holds a gradient arena."""
    @property
    def flat_grads(self) -> F32: ...


# What clipping takes: an optimizer's whole gradient arena, or a 1-D float32 array.
Gradients = Union[HasFlatGrads, F32]


class HasParamGroups(Protocol):
    """What a scheduler drives: an optimizer's param groups, each with an 'lr'."""
    param_groups: List[Dict[str, Any]]
