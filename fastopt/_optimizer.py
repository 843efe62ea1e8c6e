"""The optimizer over one flat arena, for any family and either backend.

fastopt.optim builds the public classes on the C kernels from it, fastopt.reference on NumPy.

The constructor copies every parameter into one contiguous float32 buffer (the arena), each
parameter at a 64-byte-aligned offset and each param group one contiguous range of it; the
gradients and every state buffer are parallel arenas with the same offsets.  `opt.params` and
`opt.grads` are views into the arenas with the shapes given: model code reads the params and
writes the gradients through them.  `step()` is one call into C for every group together.

The layout is fixed at construction and the arenas are never reallocated, so the views stay
valid for the optimizer's life; state buffers are allocated the first time a group needs
them.  Every class is built from its declaration in fastopt.families.  Differences from
torch.optim are stated in each class's docstring; the common ones:

* every parameter is stepped, whether its gradient was written or not (there is no
  ``grad is None``); `zero_grad()` writes zeros, it cannot set gradients to None;
* the param groups are fixed at construction (no `add_param_group`): the arena cannot grow;
* a group steps as one unit, so all its parameters share one step count;
* one thread at a time: `step`, `zero_grad`, `state_dict`, `load_state_dict`, `save` and
  `load` raise a RuntimeError when another thread is inside one of them on the same optimizer
  (torch's optimizers are not thread-safe either, but here a kernel runs with the GIL released
  over buffers that a second step could start or replace; refusing keeps every step and
  every checkpoint whole).  A closure may call them: the same thread may re-enter.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import os
import threading
from typing import (TYPE_CHECKING, Any, Callable, Dict, Generic, Iterable, Iterator, List,
                    Mapping, Optional, Tuple, TypeVar, Union, overload)

import numpy as np

from fastopt import _formats
from fastopt import _state_dict
from fastopt import _validate as V
from fastopt._arena import Arena, StateBuffer, StateLayout, parse_params
from fastopt._family import TORCH_ONLY, check_torch_only, torch_group_keys
from fastopt._typing import F32, Params, Views
from fastopt.clip import clip_coefficient, norm_type_arg

if TYPE_CHECKING:
    from fastopt._family import Family, OptimizerSpec
    from fastopt.lr_scheduler import LRScheduler

_Method = TypeVar("_Method", bound=Callable[..., Any])
_Loss = TypeVar("_Loss")


def product_overflows(grads, multiplier):
    """Whether some grads[i] * float32(multiplier), in float32 as the kernels multiply, is
    infinite (the largest magnitude decides it: float32 multiplication is monotonic)."""
    if grads.size == 0:
        return False
    big = max(float(grads.max()), -float(grads.min()))
    with np.errstate(over="ignore"):
        return not np.isfinite(np.float32(big) * np.float32(multiplier))


def _same(snapshot, group, seen):
    """Whether a group's hyperparameters are the ones last sent.  A deleted key, or an
    array where a number belongs, is a change (the check that follows names it)."""
    try:
        return snapshot(group) == seen
    except (KeyError, TypeError, ValueError):
        return False


def _exclusive(method: _Method) -> _Method:
    """Run `method` holding the optimizer (Optimizer.exclusive)."""
    what = method.__name__

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        lock = self._lock
        if not lock.acquire(False):
            raise self._busy(what)
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release()
    return wrapper  # type: ignore[return-value]   # functools.wraps keeps the signature


class Optimizer(Generic[Views]):
    """Base class of every optimizer: the arena, param groups, state and the checks.

    A class is `Optimizer` plus an OptimizerSpec (`_spec`, from fastopt.families) and a
    backend (`_backend`: fastopt._core, or the NumPy one, fastopt.reference); see
    `optimizer_class`.  State lives in `_state` (buffer name -> arena), the counts in `_steps`
    (steps taken, per group: the only step counter; the kernels are handed the step being
    taken) and `_counters` (per group, a family's scalars beside the step).
    """

    _spec: Any = None
    _backend: Any = None
    _lock: Any = None        # one thread at a time: see exclusive()
    skip_nonfinite: bool
    skipped_steps: int
    last_grad_norm: Optional[float]
    defaults: Dict[str, Any]
    param_groups: List[Dict[str, Any]]
    __signature__: inspect.Signature      # each class's: torch's (optimizer_class)

    def __init__(self, params: Params, *args: Any, skip_nonfinite: bool = False,
                 **kwargs: Any) -> None:
        spec = self._spec
        if spec is None:
            raise TypeError("Optimizer is a base class: use SGD, Adam, ... (fastopt.families)")
        self._lock = threading.RLock()
        bound = self.__signature__.bind(params, *args, **kwargs).arguments
        options = {k: bound.get(k, spec.defaults[k]) for k in spec.defaults}
        check_torch_only(options)
        defaults = {k: v for k, v in options.items() if k not in TORCH_ONLY}
        defaults.update(spec.fixed)
        defaults.update({k: bound.get(k, v) for k, v in _formats.STATE_DEFAULTS.items()})
        torch_keys = torch_group_keys(spec)
        defaults.update(torch_keys)
        fam = self._family = spec.family
        spec.fields_of(defaults)                    # names the bad argument without a prefix
        self.skip_nonfinite = V.flag("skip_nonfinite", skip_nonfinite)
        self.skipped_steps = 0          # steps skipped for non-finite gradients
        self.last_grad_norm = None      # the norm the last step computed, if it computed one
        self.defaults = defaults
        groups, names = parse_params(params, spec.group_keys())
        self.param_groups = []
        formats: List[int] = []  # per param: how its state is stored (fastopt._formats)
        for i, (arrays, extra) in enumerate(groups):
            group = dict(defaults)
            group.update(extra)
            group.update(torch_keys)
            for key, value in spec.fixed.items():
                if group[key] != value:
                    raise ValueError(f"param_groups[{i}].{key} must be {value!r} for "
                                     f"{spec.name}")
            checked = spec.fields_of(group, f"param_groups[{i}].")
            formats.extend(_formats.param_format(checked, a.size) for a in arrays)
            self.param_groups.append(group)
        # the options that fix the layout, per group (changing them later is refused)
        self._layout_options = [{k: g[k] for k in _formats.LAYOUT_KEYS}
                                for g in self.param_groups]

        arena = self._arena = Arena([arrays for arrays, _ in groups], names,
                                    blocks=[f == _formats.FMT_INT8 for f in formats])
        self._formats = formats
        for i, group in enumerate(self.param_groups):
            group["params"] = [arena.params[k] for k in arena.param_indices(i)]
        ngroups = len(self.param_groups)
        self._state: Dict[str, StateBuffer] = {}           # buffer name -> its arenas
        self._steps = [0] * ngroups                        # steps taken, per group
        self._counters = [dict(fam.counter_defaults) for _ in range(ngroups)]
        self._live: List[set[str]] = [set() for _ in range(ngroups)]  # buffers started, a group
        self._fields = [None] * ngroups                    # kernel fields sent, per group
        self._derived = [None] * ngroups                   # derived fields sent, per group
        self._fresh = [() for _ in range(ngroups)]         # buffers starting next step
        # whether the next step must (re)compute derived fields: always for a family with
        # counters; for SGD's first_step, from a refresh until the step after it
        self._derive_pending = False
        self._fresh_pending = False     # some group has buffers starting on the next step
        # The part of the arena this optimizer updates and keeps state for: all of it, except
        # in a sharded (ZeRO) optimizer, which holds one rank's contiguous share [lo, hi).
        self._lo, self._hi = lo, hi = self._shard_range(arena)
        self._layout = StateLayout(arena, formats, lo, hi)
        # A group's hyperparameters are checked and sent to the stepper again only when its
        # dict changes (`_seen` is what was sent).
        self._snapshot = operator.itemgetter(*spec.group_keys())
        self._seen = [None] * ngroups
        self._stepper = self._backend.Stepper(fam.name, arena.flat_params[lo:hi],
                                              self._kernel_grads(), arena.local_ranges(lo, hi),
                                              np.zeros(ngroups, fam.dtype),
                                              self._layout.segments, fam.signed_mask, lo)

    # ---- the public surface ------------------------------------------------------------

    @property
    def params(self) -> Views:
        """The parameters: arena views, in the shapes and order given (a dict when named)."""
        a = self._arena
        return (dict(zip(a.names, a.params)) if a.names is not None  # type: ignore[return-value]
                else list(a.params))

    @property
    def grads(self) -> Views:
        """The gradients: views parallel to `params`; write them before each `step()`."""
        a = self._arena
        return (dict(zip(a.names, a.grads)) if a.names is not None  # type: ignore[return-value]
                else list(a.grads))

    @property
    def flat_params(self) -> F32:
        """The whole parameter arena, 1-D (with the zero padding between parameters)."""
        return self._arena.flat_params

    @property
    def flat_grads(self) -> F32:
        """The whole gradient arena, 1-D: one buffer to clip, scale or allreduce."""
        return self._arena.flat_grads

    @property
    def spec(self) -> OptimizerSpec:
        """The class declaration (fastopt.families) this optimizer was built from."""
        return self._spec

    @property
    def family(self) -> Family:
        """The family declaration (fastopt.families) this optimizer steps."""
        return self._spec.family

    @property
    def layout(self) -> Arena:
        """The arena's layout (fastopt._arena.Arena): shapes, names, offsets, group ranges."""
        return self._arena

    @property
    def state_layout(self) -> StateLayout:
        """Where each param's state lives and in which format (fastopt._arena.StateLayout),
        over the whole arena."""
        return self._full_layout()

    @property
    def state(self) -> Dict[int, Dict[str, Any]]:
        """{param index: {'step': int, name: view of the state arena}}, like torch's state.

        The arrays are live views in the parameter's shape; `state_dict()` gives copies.
        """
        return self._collect_state(copy=False)

    @property
    def state_nbytes(self) -> int:
        """Bytes of optimizer state this process holds (a ZeRO rank: its shard's): float32 4
        bytes an element, bfloat16 2, int8 1 plus a float32 absmax per 256."""
        return sum(b.nbytes for b in self._state.values())

    def state_values(self) -> Dict[int, Dict[str, F32]]:
        """`state` with every buffer as float32 values in its param's shape, whatever its
        state_dtype (bfloat16 widened, int8 codes times their block's absmax): copies.  Under
        ZeRO it gathers the state: a collective, which every rank must call."""
        out = {}
        layout, arenas = self._full_state()
        for k, entry in self._collect_state(copy=None).items():
            vals = {}
            for key, x in entry.items():
                if key in self._family.buffer_names:
                    vals[key] = _state_float32(layout, arenas[key], k, key, self._family)
                elif not key.endswith(_formats.ABSMAX_SUFFIX):
                    vals[key] = x
            out[k] = vals
        return out

    @property
    def step_counts(self) -> List[int]:
        """Steps taken by each param group (a copy)."""
        return list(self._steps)

    @_exclusive
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient: one fill of the gradient arena.

        torch's default set_to_none=True frees the gradients; here the gradients are views into
        a fixed arena, so they are always zeroed, whatever the argument says.
        """
        self._arena.flat_grads.fill(0.0)

    @overload
    def step(self, closure: None = None, *, zero_grad: bool = False,
             grad_multiplier: float = 1.0, max_grad_norm: Optional[float] = None,
             norm_type: float = 2.0) -> bool: ...

    @overload
    def step(self, closure: Callable[[], _Loss], *, zero_grad: bool = False,
             grad_multiplier: float = 1.0, max_grad_norm: Optional[float] = None,
             norm_type: float = 2.0) -> Union[_Loss, bool]: ...

    def step(self, closure: Optional[Callable[[], Any]] = None, *, zero_grad: bool = False,
             grad_multiplier: float = 1.0, max_grad_norm: Optional[float] = None,
             norm_type: float = 2.0) -> Any:
        """One fused update of every parameter; `closure` (as in torch) recomputes the loss.

        zero_grad=True writes zeros into the gradients in the same pass that reads them (the
        same as calling zero_grad() after the step, without a second pass over the arena).
        grad_multiplier multiplies every gradient first, inside the same pass: 1/loss_scale,
        say (exactly 1, the default, changes nothing).  max_grad_norm clips: the step is then
        exactly `clip_grad_norm_(opt, max_grad_norm, norm_type)` followed by `step()`, in two
        passes instead of three (with a grad_multiplier too, the norm is taken of the
        multiplied gradients); the norm is kept in `last_grad_norm`.

        With `skip_nonfinite` on, a NaN or infinite gradient skips the update: params, state
        and step counts stay as they were, `skipped_steps` counts it, and step() returns False
        (the gradients are still zeroed if zero_grad=True).  Otherwise step() returns the
        closure's loss when a closure is given, else True.

        Every argument and every group's hyperparameters are checked before anything is
        updated: on a bad value the call raises and nothing has changed.
        """
        lock = self._lock                   # Optimizer.exclusive, inlined: the hot path
        if not lock.acquire(False):
            raise self._busy("step")
        try:
            loss = None
            if closure is not None:
                loss = closure()
            # unpacked and passed by position: a third cheaper than apply_step(*check_step(..))
            zero_grad, grad_multiplier, max_grad_norm, norm_type, changed = self.check_step(
                zero_grad, grad_multiplier, max_grad_norm, norm_type)
            stepped = self.apply_step(zero_grad, grad_multiplier, max_grad_norm, norm_type,
                                      changed)
            return loss if closure is not None else stepped
        finally:
            lock.release()

    def check_step(self, zero_grad: bool = False, grad_multiplier: float = 1.0,
                   max_grad_norm: Optional[float] = None, norm_type: float = 2.0
                   ) -> Tuple[bool, float, Optional[float], float, Optional[List[Any]]]:
        """The first half of step(): check its arguments and the hyperparameters of every group
        whose dict changed since the last step, without changing anything -> (zero_grad,
        grad_multiplier, max_grad_norm, norm_type, changed), what `apply_step` takes: the
        arguments normalized, and `changed`, None when no group's hyperparameters changed.

        A distributed wrapper calls it before any collective, so that a bad value raises before
        the gradients are reduced, then `apply_step`; nothing is checked twice.  The caller
        holds the optimizer (`exclusive("step")`) from check_step to the end of apply_step.
        """
        if grad_multiplier != 1.0 or type(grad_multiplier) is not float:
            grad_multiplier = V.grad_multiplier(grad_multiplier)
        if zero_grad is not False:
            zero_grad = V.flag("zero_grad", zero_grad)
        if max_grad_norm is not None:
            max_grad_norm = V.real("max_grad_norm", max_grad_norm, lo=0.0,
                                   hi=V.FLOAT32_MAX)      # the coefficient is float32
            norm_type = norm_type_arg(norm_type)
        snapshot, seen, changed = self._snapshot, self._seen, None
        for i, group in enumerate(self.param_groups):
            try:                                        # _same, inlined: the hot path
                same = snapshot(group) == seen[i]
            except (KeyError, TypeError, ValueError):
                same = False
            if not same:
                changed = self._changed_groups()       # may raise: nothing has changed yet
                break
        return zero_grad, grad_multiplier, max_grad_norm, norm_type, changed

    def apply_step(self, zero_grad: bool, grad_multiplier: float,
                   max_grad_norm: Optional[float], norm_type: float,
                   changed: Optional[List[Any]],
                   ranges: Optional[Iterable[Tuple[int, int]]] = None) -> bool:
        """The second half of step(): the update `check_step` accepted (its values, unchanged
        but for grad_multiplier, which a wrapper may scale) -> False if skip_nonfinite skipped
        it, else True.

        `ranges`, when given, steps the arena range by range: an iterable of (lo, hi) that
        together cover [0, flat_params.size) once, each yielded when its gradients are ready
        (fastopt.distributed's pipelined step: a bucket is stepped as soon as its reduction
        is done, while it is still in cache).  The result is bit-identical to one pass: each
        element is updated by the same arithmetic, and the step counts advance once, after the
        last range.  A step that needs the norm first (clipping, skip_nonfinite) takes every
        range before it computes the norm, then steps in one pass."""
        if max_grad_norm is not None or self.skip_nonfinite:
            if ranges is not None:
                for _ in ranges:            # every gradient ready before the norm
                    pass
                ranges = None
            norm, nonfinite = self._grad_norm(norm_type if max_grad_norm is not None else 2.0)
            total = norm * grad_multiplier
            self.last_grad_norm = total
            if max_grad_norm is not None and not (nonfinite and self.skip_nonfinite):
                coef = clip_coefficient(total, max_grad_norm)
                if coef != 1.0:
                    grad_multiplier = float(np.float32(grad_multiplier) * np.float32(coef))
            # Finite gradients times the multiplier can still pass float32's range in the
            # kernel's product (1e30 * 1e10): an infinity skip_nonfinite guards against too.
            # Any norm bounds every element, so the exact test (one more pass) runs only when
            # an element might overflow.
            if self.skip_nonfinite and not nonfinite and \
                    norm * grad_multiplier >= 0.5 * V.FLOAT32_MAX:
                nonfinite = self._product_overflows(grad_multiplier)
            if nonfinite and self.skip_nonfinite:
                self.skipped_steps += 1
                if zero_grad:
                    self.flat_grads.fill(0.0)
                return False
        if changed:
            self._refresh(changed)
        derived = self._derive() if self._derive_pending else None
        if ranges is None:
            self._run(grad_multiplier, zero_grad)
        else:
            for lo, hi in ranges:
                self._stepper.run(self._steps, grad_multiplier, zero_grad, lo, hi)
        steps = self._steps
        for i in range(len(steps)):
            steps[i] += 1
        if self._fresh_pending or derived is not None:
            self._advance(derived)
        return True

    @_exclusive
    def state_dict(self) -> Dict[str, Any]:
        """torch-shaped: {'state': {index: {...}}, 'param_groups': [{..., 'params': [index]}]}.

        Arrays are copies in each parameter's shape; 'step' is an int.
        """
        return {"state": self._collect_state(copy=True), "param_groups": self._indexed_groups()}

    def state_outline(self) -> Dict[str, Any]:
        """`state_dict()` without the data: each array is a read-only stand-in of its shape and
        dtype that holds no memory (checkpoints describe the state with it, then write the
        buffers one at a time from `state_buffers()`)."""
        return {"state": self._collect_state(copy=None), "param_groups": self._indexed_groups()}

    def state_buffers(self) -> Iterator[Tuple[str, Optional[BufferMembers]]]:
        """Yield (name, members) for each state buffer: members(k) is {member: array} of param
        k's part of it, live views (not copies) in the form `state_dict()` holds them (one
        float32 or bfloat16 array; int8: the codes and `name + '_absmax'`).  A sharded
        optimizer gathers one buffer at a time to the rank that writes checkpoints, yielding
        None on the others (a collective: every rank iterates to the end)."""
        layout, arenas = self._full_state()
        for key, buf in arenas.items():
            yield key, BufferMembers(buf, layout, key)

    @_exclusive
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state and hyperparameters from `state_dict()`'s output.

        Everything is checked first (structure, group sizes, hyperparameters, keys, shapes,
        dtypes, step counts); on any problem a TypeError/ValueError says what, and nothing in
        the optimizer has changed.  Arrays are copied into the arenas.
        """
        self.apply_state(self.check_state_dict(state_dict))

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> List[Any]:
        """Check a state dict against this optimizer without loading it -> what
        `apply_state` installs (a TypeError/ValueError says what is wrong)."""
        return _state_dict.check(self._spec, self._arena, self.param_groups, state_dict,
                                 self._full_layout())

    def apply_state(self, groups: List[Any], steps: Optional[List[int]] = None,
                    fill: Optional[Callable[[str, int, F32, int], None]] = None) -> None:
        """Install what `check_state_dict` accepted (the second half of load_state_dict);
        `steps`, when given, are the groups' step counts (a checkpoint keeps its own, also for
        groups without state).  `fill(key, k, out, start)`, when given, writes the buffers in
        place of the arrays: elements [start, start + out.size) of param k's buffer `key`
        (flattened) into `out` (a checkpoint streams them from its file)."""
        arena, layout = self._arena, self._layout
        mine = [m for b in self._state.values() for m in b.arrays()]
        for gs in groups:           # arrays that alias the arenas (opt.state's own views, say)
            for key, arrays in gs.buffers.items():      # are copied before anything is written
                gs.buffers[key] = [{m: (a.copy() if any(np.may_share_memory(a, x) for x in mine)
                                        else a) for m, a in members.items()}
                                   for members in arrays]
        # every arena it needs, before anything is written: a MemoryError changes nothing
        # (a new arena is not state until a group's buffers list it)
        for key in sorted({key for gs in groups for key in gs.buffers} - set(self._state)):
            self._new_state_arena(key)
        for i, gs in enumerate(groups):
            for key, arrays in gs.buffers.items():
                buf = self._state[key]
                for k, members in zip(arena.param_indices(i), arrays):
                    for member, a in members.items():
                        arr, at, count, first = buf.storage(layout, k, member)
                        if count:                               # the part held here
                            out = arr[at:at + count]
                            if fill is None:
                                out[...] = _formats.as_bf16_bits(a).reshape(-1)[
                                    first:first + count]
                            else:
                                fill(member, k, out, first)
            self._steps[i] = gs.step if steps is None else steps[i]
            self._counters[i] = dict(gs.counters)
            self._live[i] = set(gs.buffers)
        for group, gs in zip(self.param_groups, groups):
            params = group["params"]
            group.clear()
            group.update(gs.hparams)
            group["params"] = params
        self._seen = [None] * len(self.param_groups)     # resend everything on the next step

    @_exclusive
    def save(self, path: Union[str, os.PathLike[str]],
             scheduler: Optional[LRScheduler] = None) -> None:
        """Write a checkpoint: params, state, hyperparameters, step counts (and the
        scheduler's state) in one .npz file, atomically.  See fastopt.checkpoint."""
        from fastopt import checkpoint
        checkpoint.save(path, self, scheduler)

    @_exclusive
    def load(self, path: Union[str, os.PathLike[str]],
             scheduler: Optional[LRScheduler] = None) -> None:
        """Restore from a checkpoint written by `save`; on any problem a ValueError, and
        nothing has changed.  See fastopt.checkpoint."""
        from fastopt import checkpoint
        checkpoint.load(path, self, scheduler)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[Optimizer[Views]]:
        """Hold this optimizer for one operation `what` (a name for the error message): the
        lock `step`, `zero_grad`, `state_dict`, `load_state_dict`, `save` and `load` take.
        Another thread that tries to enter meanwhile gets a RuntimeError; this thread may
        re-enter."""
        self.hold(what)
        try:
            yield self
        finally:
            self._lock.release()

    def hold(self, what):
        """Take the lock of `exclusive` without waiting (a RuntimeError if another thread
        holds it); `release()` gives it back.  For a caller that must decide together with
        other processes whether to go on (fastopt.distributed)."""
        if not self._lock.acquire(False):
            raise self._busy(what)

    def release(self):
        self._lock.release()

    def check_scalars(self, grad_multiplier, changed):
        """Raise a ValueError if the next step would be refused for its step counts or for
        per-step float32 scalars that overflow (what the C stepper checks as it runs), from
        `check_step`'s `changed` and grad_multiplier (an upper bound: the wrappers and
        clipping only scale it down).  Changes nothing; a distributed wrapper calls it before
        its collective, so that no rank has reduced gradients when the step is refused."""
        fam = self._family
        fields = list(self._fields)
        for i, _, f in changed or ():
            fields[i] = {field.name: f[field.name] for field in fam.user_fields}
        groups = []
        for i, taken in enumerate(self._steps):
            if not 0 <= taken < V.MAX_STEPS:
                raise ValueError(f"group {i} has taken {taken} steps: the count must stay "
                                 "below 2**63 - 1")
            if fields[i] is not None:       # None: never sent, and so in `changed`
                derived = fam.derive(fields[i], taken + 1, self._fresh[i], self._counters[i])
                groups.append((i, {**fields[i], **derived}, taken + 1))
        self._backend.check_scalars(fam.name, groups, grad_multiplier)

    def _busy(self, what):
        return RuntimeError(
            f"{type(self).__name__}.{what}(): another thread is in a call on this optimizer; "
            "an optimizer is used by one thread at a time (step, zero_grad, state_dict, "
            "load_state_dict, save and load refuse to overlap)")

    # ---- stepping ------------------------------------------------------------------------

    def _changed_groups(self):
        """[(i, snapshot, fields)] of the groups whose hyperparameters changed, checked."""
        changed = None
        spec, seen, snapshot = self._spec, self._seen, self._snapshot
        for i, group in enumerate(self.param_groups):
            if not _same(snapshot, group, seen[i]):
                fields = spec.fields_of(group, f"param_groups[{i}].")
                for key, value in self._layout_options[i].items():
                    if fields[key] != value:
                        raise ValueError(
                            f"param_groups[{i}].{key} is {fields[key]!r}, but this optimizer "
                            f"was built with {value!r}: {key} fixes the arena's layout and the "
                            "state's format, so it cannot change after construction (build a "
                            "new optimizer)")
                for key, target in spec.keys.items():
                    if isinstance(target, tuple) and type(group[key]) is not tuple:
                        # a list could change in place, unseen by the snapshot: keep a copy
                        group[key] = tuple(group[key])
                raw = snapshot(group)
                changed = changed or []
                changed.append((i, raw, fields))
        return changed

    def _refresh(self, changed):
        """Send changed groups' hyperparameters to the stepper; start the buffers they need."""
        fam, lo = self._family, self._lo
        for i, raw, fields in changed:
            fresh = [b for b in fam.buffers
                     if b.name in fam.required(fields) and b.name not in self._live[i]]
            for b in fresh:
                if b.name not in self._state:
                    self._new_state_arena(b.name)
                self._state[b.name].fill_group(self._layout, i, b.initial(fields), b.signed)
            if self._layout.has_bf16:
                self._stepper.set_seed(i, fields["state_seed"])
                self._stepper.set_rounding(i, fields["state_rounding"] == "stochastic")
            self._fresh[i] = tuple(b.name for b in fresh)
            self._fresh_pending = self._fresh_pending or bool(fresh)
            kernel = {f.name: fields[f.name] for f in fam.user_fields}
            self._stepper.set_fields(i, {**kernel, **fam.derive(kernel, self._steps[i] + 1,
                                                                 self._fresh[i],
                                                                 self._counters[i])})
            self._fields[i] = kernel
            self._derived[i] = None
            self._seen[i] = raw
        self._derive_pending = fam.per_step is not None

    def _derive(self):
        """The derived fields of this step (SGD's first step, NAdam's mu product), sent to
        the stepper where they changed -> [dict] per group."""
        fam = self._family
        out, changed = [], False
        for i, fields in enumerate(self._fields):
            d = fam.derive(fields, self._steps[i] + 1, self._fresh[i], self._counters[i])
            if d != self._derived[i]:
                self._stepper.set_fields(i, d)
                self._derived[i] = d
                changed = True
            out.append(d)
        if not changed and not fam.counters:
            self._derive_pending = False        # constant from here until the next refresh
        return out

    def _advance(self, derived):
        """After a step that started buffers or derived fields: the buffers that started, and
        the counters."""
        for i in range(len(self._fresh)):
            if self._fresh[i]:
                self._live[i].update(self._fresh[i])
                self._fresh[i] = ()
        self._fresh_pending = False
        for i, d in enumerate(derived or ()):
            for name in self._family.counter_defaults:
                self._counters[i][name] = d[name]

    # ---- internals (and the hooks a sharded optimizer overrides) -------------------------

    def _shard_range(self, arena):
        """The range [lo, hi) of the arena this optimizer updates: all of it."""
        return 0, arena.total

    def _full_layout(self):
        """The state layout of the whole arena (a sharded optimizer's own covers its shard)."""
        return self._layout

    def _kernel_grads(self):
        """The gradients the kernels read for [lo, hi)."""
        return self._arena.flat_grads[self._lo:self._hi]

    def _run(self, grad_multiplier, zero_grad):
        self._stepper.run(self._steps, grad_multiplier, zero_grad)

    def _grad_norm(self, norm_type):
        """(norm, nonfinite) of the gradients the step reads (a sharded optimizer combines
        every shard's)."""
        return self._backend.grad_norm(self.flat_grads, norm_type)

    def _product_overflows(self, grad_multiplier):
        return product_overflows(self.flat_grads, grad_multiplier)

    def _full_state(self):
        """(layout, {name: StateBuffer}) over the whole arena (a sharded optimizer gathers
        them)."""
        return self._layout, self._state

    def _new_state_arena(self, key):
        buf = StateBuffer(self._layout)
        f32, bf16, codes = buf.data
        if f32 is not None and (f32.size or self._layout.all_f32):
            self._stepper.set_buffer(key, f32)
        if bf16 is not None:
            self._stepper.set_buffer(key, bf16, _formats.FMT_BF16)
        if codes is not None:
            self._stepper.set_buffer(key, codes, _formats.FMT_INT8, buf.absmax)
        self._state[key] = buf

    def _indexed_groups(self):
        """The param groups as a state dict holds them: hyperparameters, params as indices."""
        groups, k = [], 0
        for group in self.param_groups:
            g = {key: value for key, value in group.items() if key != "params"}
            g["params"] = list(range(k, k + len(group["params"])))
            k += len(group["params"])
            groups.append(g)
        return groups

    def _collect_state(self, copy):
        """`state`'s entries; arrays are copies (copy=True), live views (False) or stand-ins
        holding no memory (None: no state is read or gathered)."""
        fam, arena = self._family, self._arena
        if copy is not None:
            layout, arenas = self._full_state()
        else:
            layout, arenas = self._full_layout(), None
        state = {}
        for i in range(len(self.param_groups)):
            if not self._steps[i] or not (self._live[i] or fam.has_step):
                continue
            for k in arena.param_indices(i):
                keeps_step = fam.has_step or _formats.counts_steps(self.param_groups[i])
                entry = {"step": self._steps[i]} if keeps_step else {}
                entry.update(self._counters[i])
                for key in fam.buffer_names:
                    if key in self._live[i]:
                        if arenas is None:
                            for member, dtype, shape in layout.members(k, key):
                                entry[member] = np.broadcast_to(np.zeros((), dtype), shape)
                        else:
                            for member, view in arenas[key].members(layout, k, key).items():
                                entry[member] = view.copy() if copy else view
                state[k] = entry
        return state


class BufferMembers:
    """One state buffer as `state_buffers()` yields it: called with a param index k, its
    members {name: live view}; `arrays()` lists the storage arrays themselves."""

    def __init__(self, buf, layout, key):
        self.buf, self.layout, self.key = buf, layout, key

    def __call__(self, k):
        return self.buf.members(self.layout, k, self.key)

    def arrays(self):
        return self.buf.arrays()


def _state_float32(layout, buf, k, key, fam):
    """Param k's buffer `key` as float32 values in the param's shape."""
    shape = layout.arena.shapes[k]
    fmt = layout.formats[k]
    members = buf.members(layout, k, key)
    data = _formats.as_bf16_bits(members[key])
    if fmt == _formats.FMT_INT8:
        signed = next(b.signed for b in fam.buffers if b.name == key)
        values = _formats.dequantize_int8(data, members[key + _formats.ABSMAX_SUFFIX], signed)
        return values[:int(np.prod(shape))].reshape(shape)
    return _formats.widen(fmt, data, None, True).reshape(shape)


def optimizer_class(spec, backend, module):
    """The public class for `spec` (fastopt.families) on `backend`, with torch's signature."""
    params = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    for name in spec.signature:
        if name == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        params.append(inspect.Parameter(name, kind, default=spec.defaults[name]))
    params.append(inspect.Parameter("skip_nonfinite", inspect.Parameter.KEYWORD_ONLY,
                                    default=False))
    for name, default in _formats.STATE_DEFAULTS.items():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default))
    sig = inspect.Signature(params)
    doc = inspect.cleandoc(spec.doc) + _COMMON_DOC
    cls = type(spec.name, (Optimizer,), {
        "__doc__": doc, "__module__": module, "__qualname__": spec.name,
        "_spec": spec, "_backend": backend, "__signature__": sig})
    # the constructor's own signature is torch's, for help() and inspect
    init = _bound_init(sig)
    init.__qualname__ = f"{spec.name}.__init__"
    cls.__init__ = init
    return cls


_COMMON_DOC = """

skip_nonfinite=True skips the whole update when a gradient is NaN or infinite (see step()).

State storage (fastopt-only keywords, also keys of each param group): state_dtype="float32"
(default), "bfloat16" or "int8" (8-bit blockwise dynamic quantization, Dettmers et al.: one
float32 absmax per 256 elements; tensors smaller than min_8bit_size=4096 elements keep float32
state); state_rounding="nearest" or "stochastic" (bfloat16: unbiased rounding from a
counter-based hash of state_seed, the step and the element, so runs and resumes are
reproducible).  The update is the same float32 arithmetic on the widened state, in the same
single pass.  state_dtype and min_8bit_size are fixed at construction (they decide the
arena's layout).  `state_values()` gives every buffer as float32; `state_nbytes` the bytes
held.  The rules: fastopt._formats.
"""


def _bound_init(sig):
    def __init__(self, params, *args, **kwargs):
        Optimizer.__init__(self, params, *args, **kwargs)
    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + list(sig.parameters.values()))
    return __init__
