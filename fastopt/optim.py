"""Optimizers over one flat arena: torch.optim's names, defaults and semantics.

The constructor copies every parameter into one contiguous float32 buffer (the arena), each
parameter at a 64-byte-aligned offset and each param group one contiguous range of it; the
gradients and every state buffer are parallel arenas with the same offsets.  `opt.params` and
`opt.grads` are views into the arenas with the shapes given: model code reads the params and
writes the gradients through them.  `step()` is one call into C for every group together.

The layout is fixed at construction and the arenas are never reallocated, so the views stay
valid for the optimizer's life; state buffers are allocated (zeroed) the first time a group
needs them.  Differences from torch.optim are stated in each class's docstring; the common ones:

* every parameter is stepped, whether its gradient was written or not (there is no
  ``grad is None``); `zero_grad()` writes zeros, it cannot set gradients to None;
* the param groups are fixed at construction (no `add_param_group`): the arena cannot grow;
* a group steps as one unit, so all its parameters share one step count.
"""
import math
import numbers
import operator
from collections.abc import Mapping

import numpy as np

from fastopt import _core
from fastopt import _validate as V
from fastopt.clip import clip_coefficient, norm_type_arg

ALIGN_BYTES = 64
_ALIGN = ALIGN_BYTES // 4  # in float32 elements


def _aligned_zeros(n):
    """A zeroed float32 buffer of n elements whose first element is 64-byte aligned."""
    raw = np.zeros(n + _ALIGN, dtype=np.float32)
    skip = (-raw.ctypes.data % ALIGN_BYTES) // 4
    return raw[skip:skip + n]


def _round_up(n):
    return -(-n // _ALIGN) * _ALIGN


def _split_named(items, where):
    """A list of arrays, or of (name, array) pairs, or a mapping -> (arrays, names or None)."""
    if isinstance(items, np.ndarray):
        return [items], None
    if isinstance(items, Mapping):
        names = list(items.keys())
        for k in names:
            if not isinstance(k, str):
                raise TypeError(f"{where}: parameter names must be str, got {type(k).__name__}")
        return [items[k] for k in names], names
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise TypeError(f"{where} must be an iterable of float32 ndarrays, a mapping "
                        f"name -> ndarray, or an iterable of dicts, got {type(items).__name__}")
    items = list(items)
    if items and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                     for x in items):
        return [x[1] for x in items], [x[0] for x in items]
    return items, None


class Optimizer:
    """Base class: the arena, param groups, state and the checks; subclasses add the math.

    A subclass sets `_backend` (the module with the kernels and the Stepper: fastopt._core, or
    the NumPy one, fastopt.reference) and `_family`, and defines:
      _snapshot(group) -> tuple   the group's hyperparameter values, to see that they changed
      _hparams(group, prefix) -> tuple  validated kernel arguments of one group
      _needs(hp) -> tuple of state keys the kernel needs with these hyperparameters
    """

    _backend = _core
    _state_names = ()       # every state buffer the family can have
    _has_step = True        # whether the per-param state records 'step' (not SGD's, as torch)

    def __init__(self, params, defaults, skip_nonfinite=False):
        self._hparams(defaults, "")                  # names the bad argument without a prefix
        self.skip_nonfinite = V.flag("skip_nonfinite", skip_nonfinite)
        self.skipped_steps = 0          # steps skipped for non-finite gradients
        self.last_grad_norm = None      # the norm the last step computed, if it computed one
        self.defaults = dict(defaults)
        groups, names = self._parse(params)
        self.param_groups = []
        arrays = []
        for i, (group_arrays, extra) in enumerate(groups):
            group = dict(self.defaults)
            group.update(extra)
            self._hparams(group, f"param_groups[{i}].")
            self.param_groups.append(group)
            arrays.append(group_arrays)

        # Fix the layout: each param at an aligned offset, each group one contiguous range.
        offsets, ranges, total = [], [], 0
        for group_arrays in arrays:
            start = total
            for a in group_arrays:
                offsets.append(total)
                total += _round_up(a.size)
            ranges.append((start, total))
        self._ranges = ranges
        self._flat_params = _aligned_zeros(total)
        self._flat_grads = _aligned_zeros(total)
        self._shapes = []
        self._param_views, self._grad_views = [], []
        k = 0
        for group, group_arrays in zip(self.param_groups, arrays):
            views = []
            for a in group_arrays:
                off = offsets[k]
                p = self._flat_params[off:off + a.size].reshape(a.shape)
                p[...] = a
                views.append(p)
                self._grad_views.append(self._flat_grads[off:off + a.size].reshape(a.shape))
                self._shapes.append(a.shape)
                k += 1
            self._param_views.extend(views)
            group["params"] = views
        self._offsets = offsets
        self._names = names
        self._state = {}                                   # key -> state arena
        self._steps = [0] * len(self.param_groups)         # steps taken, per group
        self._live = [set() for _ in self.param_groups]    # state keys in use, per group
        # The part of the arena this optimizer updates and keeps state for: all of it, except
        # in a sharded (ZeRO) optimizer, which holds one rank's contiguous share [lo, hi).
        self._lo, self._hi = lo, hi = self._shard(total)
        local = [(min(max(s, lo), hi) - lo, min(max(e, lo), hi) - lo) for s, e in ranges]
        # The kernels run from a stepper that holds every group's hyperparameters; a group's
        # are checked and sent again only when its dict changes (`_seen` is what was sent).
        self._stepper = self._backend.Stepper(self._family, self._flat_params[lo:hi],
                                              self._kernel_grads(), local)
        self._seen = [None] * len(self.param_groups)

    # ---- construction -------------------------------------------------------------------

    def _parse(self, params):
        """-> ([(arrays, extra group keys)], names or None), every array checked."""
        if isinstance(params, np.ndarray):
            raise TypeError("params must be an iterable of float32 ndarrays (or a mapping "
                            "name -> ndarray, or an iterable of dicts), got a single ndarray; "
                            "wrap it in a list")
        if not isinstance(params, Mapping):
            if isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
                raise TypeError("params must be an iterable of float32 ndarrays, a mapping "
                                "name -> ndarray, or an iterable of dicts, got "
                                f"{type(params).__name__}")
            params = list(params)
        if not isinstance(params, Mapping) and params and all(isinstance(g, Mapping) for g in params):
            raw_groups = []
            for i, g in enumerate(params):
                if "params" not in g:
                    raise ValueError(f"param_groups[{i}] has no 'params' entry")
                unknown = set(g) - set(self.defaults) - {"params"}
                if unknown:
                    raise ValueError(f"param_groups[{i}] has unknown keys {sorted(unknown)}; "
                                     f"known: {sorted(self.defaults)}")
                raw_groups.append((g["params"], {k: v for k, v in g.items() if k != "params"},
                                   f"param_groups[{i}].params"))
        else:
            if not isinstance(params, Mapping) and any(isinstance(g, Mapping) for g in params):
                raise TypeError("params mixes dicts (param groups) with other items")
            raw_groups = [(params, {}, "params")]

        groups, all_names, named = [], [], []
        for items, extra, where in raw_groups:
            arrays, names = _split_named(items, where)
            if not arrays:
                raise ValueError(f"{where} is an empty parameter list")
            for j, a in enumerate(arrays):
                label = f"{where}[{names[j]!r}]" if names else f"{where}[{j}]"
                V.float32_array(label, a)
            groups.append((arrays, extra))
            named.append(names is not None)
            all_names.extend(names or [])
        if all(named):
            if len(set(all_names)) != len(all_names):
                dup = next(n for n in all_names if all_names.count(n) > 1)
                raise ValueError(f"params: the name {dup!r} is used for two parameters")
            names = all_names
        else:
            names = None

        spans, k = [], 0
        for arrays, _ in groups:
            for a in arrays:
                if a.size:
                    lo, hi = V.memory_span(a)
                    spans.append((lo, hi, f"parameter {names[k]!r}" if names else f"parameter {k}"))
                k += 1
        try:
            V.disjoint(spans)
        except ValueError as e:
            raise ValueError(f"params: {e}") from None
        return groups, names

    # ---- the public surface ------------------------------------------------------------

    @property
    def params(self):
        """The parameters: arena views, in the shapes and order given (a dict when named)."""
        if self._names is not None:
            return dict(zip(self._names, self._param_views))
        return list(self._param_views)

    @property
    def grads(self):
        """The gradients: views parallel to `params`; write them before each `step()`."""
        if self._names is not None:
            return dict(zip(self._names, self._grad_views))
        return list(self._grad_views)

    @property
    def flat_params(self):
        """The whole parameter arena, 1-D (with the zero padding between parameters)."""
        return self._flat_params

    @property
    def flat_grads(self):
        """The whole gradient arena, 1-D: one buffer to clip, scale or allreduce."""
        return self._flat_grads

    @property
    def state(self):
        """{param index: {'step': int, name: view of the state arena}}, like torch's state.

        The arrays are live views in the parameter's shape; `state_dict()` gives copies.
        """
        return self._collect_state(copy=False)

    def zero_grad(self, set_to_none=True):
        """Zero every gradient: one fill of the gradient arena.

        torch's default set_to_none=True frees the gradients; here the gradients are views into
        a fixed arena, so they are always zeroed, whatever the argument says.
        """
        self._flat_grads.fill(0.0)

    def step(self, closure=None, *, zero_grad=False, grad_multiplier=1.0, max_grad_norm=None,
             norm_type=2.0):
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
        loss = None
        if closure is not None:
            loss = closure()
        if grad_multiplier != 1.0 or type(grad_multiplier) is not float:
            grad_multiplier = V.real("grad_multiplier", grad_multiplier, lo=0.0)
        if zero_grad is not False:
            zero_grad = V.flag("zero_grad", zero_grad)
        if max_grad_norm is not None:
            max_grad_norm = V.real("max_grad_norm", max_grad_norm, lo=0.0)
            norm_type = norm_type_arg(norm_type)
        seen = self._seen
        changed = None
        for i, group in enumerate(self.param_groups):
            raw = self._snapshot(group)
            if raw != seen[i]:
                hp = self._hparams(group, f"param_groups[{i}].")     # may raise: nothing
                changed = changed or []                             # has changed yet
                changed.append((i, raw, hp))
        if max_grad_norm is not None or self.skip_nonfinite:
            total, nonfinite = self._backend.grad_norm(
                self._flat_grads, norm_type if max_grad_norm is not None else 2.0)
            total *= grad_multiplier
            self.last_grad_norm = total
            if nonfinite and self.skip_nonfinite:
                self.skipped_steps += 1
                if zero_grad:
                    self._flat_grads.fill(0.0)
                return loss if closure is not None else False
            if max_grad_norm is not None:
                coef = clip_coefficient(total, max_grad_norm)
                if coef != 1.0:
                    grad_multiplier = float(np.float32(grad_multiplier) * np.float32(coef))
        if changed:
            self._refresh(changed)
        self._run(grad_multiplier, zero_grad)
        steps = self._steps
        for i in range(len(steps)):
            steps[i] += 1
        return loss if closure is not None else True

    def _refresh(self, changed):
        """Send changed groups' hyperparameters to the stepper, allocating state they need."""
        for i, raw, hp in changed:
            needs = self._needs(hp)
            for key in needs:
                if key not in self._state:
                    self._new_state_arena(key)
            first = "momentum_buffer" not in self._live[i]     # SGD's first momentum step
            self._stepper.set_group(i, hp, self._steps[i], first)
            self._live[i].update(needs)
            self._seen[i] = raw

    def state_dict(self):
        """torch-shaped: {'state': {index: {...}}, 'param_groups': [{..., 'params': [index]}]}.

        Arrays are copies in each parameter's shape; 'step' is an int.
        """
        groups, k = [], 0
        for group in self.param_groups:
            g = {key: value for key, value in group.items() if key != "params"}
            g["params"] = list(range(k, k + len(group["params"])))
            k += len(group["params"])
            groups.append(g)
        return {"state": self._collect_state(copy=True), "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore state and hyperparameters from `state_dict()`'s output.

        Everything is checked first (structure, group sizes, hyperparameters, keys, shapes,
        dtypes, step counts); on any problem a TypeError/ValueError says what, and nothing in
        the optimizer has changed.  Arrays are copied into the arenas.
        """
        self._apply_state_dict(*self._check_state_dict(state_dict))

    def save(self, path, scheduler=None):
        """Write a checkpoint: params, state, hyperparameters, step counts (and the
        scheduler's state) in one .npz file, atomically.  See fastopt.checkpoint."""
        from fastopt import checkpoint
        checkpoint.save(path, self, scheduler)

    def load(self, path, scheduler=None):
        """Restore from a checkpoint written by `save`; on any problem a ValueError, and
        nothing has changed.  See fastopt.checkpoint."""
        from fastopt import checkpoint
        checkpoint.load(path, self, scheduler)

    def _apply_state_dict(self, new_groups, new_state):
        """The second half of load_state_dict: install what _check_state_dict accepted."""
        for arena in self._state.values():   # what the state dict does not set starts at zero
            arena.fill(0.0)
        for i, (step, buffers) in enumerate(new_state):
            for key in buffers:
                if key not in self._state:
                    self._new_state_arena(key)
            k0 = sum(len(g["params"]) for g in self.param_groups[:i])
            lo, hi = self._lo, self._hi
            for key, arrays in buffers.items():
                for j, a in enumerate(arrays):
                    off = self._offsets[k0 + j]
                    a_lo, a_hi = max(off, lo), min(off + a.size, hi)   # the part held here
                    if a_lo < a_hi:
                        self._state[key][a_lo - lo:a_hi - lo] = \
                            a.reshape(-1)[a_lo - off:a_hi - off]
            self._steps[i] = step
            self._live[i] = set(buffers)
        for group, new in zip(self.param_groups, new_groups):
            params = group["params"]
            group.clear()
            group.update(new)
            group["params"] = params
        self._seen = [None] * len(self.param_groups)     # resend everything on the next step

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)

    # ---- internals (and the hooks a sharded optimizer overrides) -------------------------

    def _shard(self, total):
        """The range [lo, hi) of the arena this optimizer updates: all of it."""
        return 0, total

    def _kernel_grads(self):
        """The gradients the kernels read for [lo, hi)."""
        return self._flat_grads[self._lo:self._hi]

    def _run(self, grad_multiplier, zero_grad):
        self._stepper.run(grad_multiplier, zero_grad)

    def _full_state(self):
        """State arenas over the whole arena (a sharded optimizer gathers them)."""
        return self._state

    def _new_state_arena(self, key):
        arena = _aligned_zeros(self._hi - self._lo)
        self._stepper.set_buffer(key, arena)
        self._state[key] = arena

    def _collect_state(self, copy):
        arenas = self._full_state()
        state, k = {}, 0
        for i, group in enumerate(self.param_groups):
            for _ in group["params"]:
                if self._steps[i] and (self._live[i] or self._has_step):
                    entry = {"step": self._steps[i]} if self._has_step else {}
                    off, shape = self._offsets[k], self._shapes[k]
                    size = math.prod(shape)
                    for key in self._state_names:
                        if key in self._live[i]:
                            view = arenas[key][off:off + size].reshape(shape)
                            entry[key] = view.copy() if copy else view
                    state[k] = entry
                k += 1
        return state

    def _check_state_dict(self, sd):
        """-> (new param_groups without 'params', [(step, {key: [arrays]})] per group)."""
        if not isinstance(sd, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
        for key in ("state", "param_groups"):
            if key not in sd:
                raise ValueError(f"state_dict has no {key!r} entry")
        saved_groups, saved_state = sd["param_groups"], sd["state"]
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError("state_dict['param_groups'] must be a list of dicts")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer "
                             f"has {len(self.param_groups)}")
        if not isinstance(saved_state, Mapping):
            raise TypeError("state_dict['state'] must be a dict")

        new_groups, new_hps, owner, k = [], [], {}, 0
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{i}]"
            if not isinstance(saved, Mapping):
                raise TypeError(f"{where} must be a dict")
            ids = saved.get("params")
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"{where} has no 'params' list")
            if len(ids) != len(group["params"]):
                raise ValueError(f"{where} has {len(ids)} params, this optimizer's group has "
                                 f"{len(group['params'])}")
            for j, pid in enumerate(ids):
                if isinstance(pid, bool) or not isinstance(pid, numbers.Integral):
                    raise TypeError(f"{where}['params'] must hold int ids, got {pid!r}")
                if pid in owner:
                    raise ValueError(f"{where}: param id {pid} appears twice")
                owner[pid] = (i, j, k + j)
            k += len(ids)
            missing = [key for key in self.defaults if key not in saved]
            if missing:
                raise ValueError(f"{where} is missing {missing}")
            new = {key: value for key, value in saved.items() if key != "params"}
            new_hps.append(self._hparams(new, where + "."))
            new_groups.append(new)

        per_group = [dict() for _ in self.param_groups]      # j -> entry
        for pid, entry in saved_state.items():
            if pid not in owner:
                raise ValueError(f"state_dict['state'] has an entry for param id {pid!r}, which "
                                 "no param group lists")
            if not isinstance(entry, Mapping):
                raise TypeError(f"state_dict['state'][{pid!r}] must be a dict")
            i, j, _ = owner[pid]
            per_group[i][j] = (pid, entry)

        new_state = []
        for i, entries in enumerate(per_group):
            n = len(self.param_groups[i]["params"])
            hp = new_hps[i]
            if not entries:
                new_state.append((0, {}))
                continue
            if len(entries) != n:
                absent = next(j for j in range(n) if j not in entries)
                raise ValueError(f"state_dict['state'] has state for some params of group {i} "
                                 f"but not for its param {absent}: a group steps as one unit")
            keys0 = None
            steps = set()
            buffers = {}
            for j in range(n):
                pid, entry = entries[j]
                where = f"state_dict['state'][{pid!r}]"
                keys = set(entry) - {"step"}
                unknown = keys - set(self._state_names)
                if unknown:
                    raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
                if keys0 is None:
                    keys0 = keys
                elif keys != keys0:
                    raise ValueError(f"{where} has keys {sorted(keys)}, other params of its "
                                     f"group have {sorted(keys0)}")
                if self._has_step:
                    if "step" not in entry:
                        raise ValueError(f"{where} has no 'step'")
                    steps.add(_check_saved_step(where + "['step']", entry["step"]))
                elif "step" in entry:
                    raise ValueError(f"{where} has a 'step', which {type(self).__name__} "
                                     "does not keep")
                shape = self._shapes[owner[pid][2]]
                for key in keys:
                    a = entry[key]
                    V.float32_array(f"{where}[{key!r}]", a)
                    if a.shape != shape:
                        raise ValueError(f"{where}[{key!r}] has shape {a.shape}, the param has "
                                         f"shape {shape}")
                    buffers.setdefault(key, []).append(a)
            required = set(self._needs(hp)) - set(self._optional_on_load)
            missing = required - keys0
            if missing:
                raise ValueError(f"state_dict['state'] lacks {sorted(missing)} for group {i}, "
                                 "which its hyperparameters need")
            if len(steps) > 1:
                raise ValueError(f"state_dict['state'] has different step counts {sorted(steps)} "
                                 f"within group {i}; a group steps as one unit")
            step = steps.pop() if steps else 1
            new_state.append((step, buffers))
        return new_groups, new_state

    _optional_on_load = ()


def _check_saved_step(where, x):
    if isinstance(x, np.ndarray) and x.shape == ():
        x = x[()]
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{where} must be an int, got {type(x).__name__}")
    if not float(x).is_integer() or x < 1:
        raise ValueError(f"{where} must be a whole number >= 1, got {x!r}")
    return V.step(int(x), where)


def _no_torch_only_options(capturable, differentiable):
    if capturable:
        raise ValueError("capturable=True is a CUDA-graph option of torch; fastopt runs on "
                         "the CPU and does not support it")
    if differentiable:
        raise ValueError("differentiable=True (autograd through the step) is not supported")


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and weight decay.

    torch.optim.SGD's arguments, defaults and per-element math (its fused=True kernel, bitwise
    outside torch's per-tensor scalar tail): with g the gradient (negated when maximize),
        g += weight_decay * p
        buf = g on the first step with momentum, then buf = momentum*buf + (1-dampening)*g
        g = g + momentum*buf if nesterov else buf
        p -= lr * g
    `foreach` and `fused` are accepted and ignored: every step is fused.  As in torch, a
    momentum raised from 0 mid-run starts its buffer from the gradient on that step.
    """

    _state_names = ("momentum_buffer",)
    _has_step = False
    _optional_on_load = ("momentum_buffer",)   # absent: the next step starts it, as torch

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, skip_nonfinite=False):
        _no_torch_only_options(False, differentiable)
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize), skip_nonfinite)

    @staticmethod
    def _hparams(group, prefix):
        return V.sgd_hparams(group["lr"], group["momentum"], group["dampening"],
                             group["weight_decay"], group["nesterov"], group["maximize"], prefix)

    _family = "sgd"
    _snapshot = staticmethod(operator.itemgetter("lr", "momentum", "dampening", "weight_decay",
                                                 "nesterov", "maximize"))

    @staticmethod
    def _needs(hp):
        return ("momentum_buffer",) if hp[1] != 0.0 else ()


class Adam(Optimizer):
    """Adam (and, with decoupled_weight_decay=True, AdamW), with amsgrad and maximize.

    torch.optim.Adam's arguments, defaults and per-element math (its fused=True kernel, bitwise
    outside torch's per-tensor scalar tail): with g the gradient (negated when maximize),
        g += weight_decay * p           (Adam)   or   p *= 1 - lr*weight_decay   (AdamW)
        m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g*g;  amsgrad: vmax = max(vmax, v)
        p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)
    `foreach` and `fused` are accepted and ignored: every step is fused.  The state dict keeps
    'step' as an int, where torch keeps a float tensor.
    """

    _state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 skip_nonfinite=False):
        _no_torch_only_options(capturable, differentiable)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay),
                         skip_nonfinite)

    _family = "adam"
    _snapshot = staticmethod(operator.itemgetter("lr", "betas", "eps", "weight_decay", "amsgrad",
                                                 "maximize", "decoupled_weight_decay"))

    @staticmethod
    def _hparams(group, prefix):
        betas = group["betas"]
        beta1, beta2 = V.betas(betas, prefix + "betas")
        hp = V.adam_hparams(group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                            group["decoupled_weight_decay"], group["amsgrad"],
                            group["maximize"], prefix)
        if type(betas) is not tuple:
            # a list could change in place, unseen by _snapshot: keep an immutable copy
            group["betas"] = tuple(betas)
        return hp

    @staticmethod
    def _needs(hp):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if hp[6] else ("exp_avg", "exp_avg_sq")


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (p *= 1 - lr*weight_decay), torch's defaults
    (weight_decay=1e-2).  See `Adam` for the math and the departures from torch."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, skip_nonfinite=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         capturable=capturable, differentiable=differentiable,
                         decoupled_weight_decay=True, skip_nonfinite=skip_nonfinite)


class RMSprop(Optimizer):
    """RMSprop, plain or centered, with momentum, weight decay and maximize.

    torch.optim.RMSprop's arguments, defaults and per-element math (to a few ulp: torch's loop
    uses an approximate vectorized sqrt): with g the gradient (negated when maximize),
        g += weight_decay * p;   sa = alpha*sa + (1-alpha)*g*g
        centered: ga = lerp(ga, g, 1-alpha);  avg = sqrt(sa - ga*ga) + eps,  else sqrt(sa) + eps
        momentum > 0: buf = momentum*buf + g/avg;  p -= lr*buf     else p -= lr*g/avg
    `foreach` is accepted and ignored.  A momentum raised from 0 (or centered switched on)
    mid-run starts its buffer at zero, as torch's would have been.
    """

    _state_names = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, skip_nonfinite=False):
        _no_torch_only_options(capturable, differentiable)
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered, maximize=maximize),
                         skip_nonfinite)

    @staticmethod
    def _hparams(group, prefix):
        return V.rmsprop_hparams(group["lr"], group["alpha"], group["eps"],
                                 group["weight_decay"], group["momentum"], group["centered"],
                                 group["maximize"], prefix)

    _family = "rmsprop"
    _snapshot = staticmethod(operator.itemgetter("lr", "alpha", "eps", "weight_decay", "momentum",
                                                 "centered", "maximize"))

    @staticmethod
    def _needs(hp):
        return (("square_avg",) + (("momentum_buffer",) if hp[4] > 0.0 else ())
                + (("grad_avg",) if hp[5] else ()))
