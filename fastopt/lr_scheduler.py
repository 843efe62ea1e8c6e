"""Learning-rate schedules: torch.optim.lr_scheduler's classes, and each schedule as a pure
function of the step count.

    opt = fastopt.AdamW(params, lr=1e-3)
    sched = fastopt.lr_scheduler.warmup_cosine(opt, warmup_steps=100, total_steps=10_000)
    for step in range(10_000):
        ...write the gradients...
        opt.step()
        sched.step()          # writes the next lr into every opt.param_groups[i]["lr"]

The classes take torch's arguments and defaults and give torch's lr sequences (to 1e-12
relative, tested over 1000 steps; most are bitwise).  As in torch, construction records
``group["initial_lr"]`` (the base lr; kept if already there) and sets each group's lr to the
schedule's value at step 0; each `step()` advances one step.  Each group follows the schedule
from its own base lr.

Every schedule is also a pure function ``f(step, base_lr, ...) -> lr`` (`step_lr`,
`cosine_annealing_lr`, `one_cycle_lr`, ...: the class name in snake case), which the classes
call, so a class's sequence is exactly its function's.  The exception is CosineAnnealingLR,
which reproduces torch's recursive update (see its docstring).

Several schedulers on one optimizer compose as torch's do: their effects multiply, e.g.

    sched = ChainedScheduler([ExponentialLR(opt, 0.99), MultiStepLR(opt, [100, 250], 0.1)])

or the two stepped one after the other.  A scheduler alone computes the lr from the base lr
and the step count (torch's closed forms, which agree with its chainable forms to 1.5e-14 on
1000-step runs); the chainable ones (StepLR, MultiStepLR, ExponentialLR, LinearLR, ConstantLR,
CosineAnnealingLR) switch to torch's chainable forms, which scale the group's current lr, when
another scheduler of the optimizer (or a hand edit of ``group["lr"]``) changes it, and start
in them when built while the lr is not the group's ``initial_lr``.  LambdaLR,
OneCycleLR and WarmupCosineLR compute the lr from the base lr alone, as torch's, which then
overwrite the other's change without a word: here that step raises a ValueError instead.  See
LRScheduler.

Departures from torch, common to every class:

* Where torch's would silently overwrite another scheduler's (or a hand edit's) change of the
  lr, a ValueError says so (above).
* Bad arguments raise TypeError/ValueError naming the argument, before the optimizer is
  touched; torch checks few of them and fails later (or divides by zero) on some.
* ``state_dict()`` holds only JSON-plain values (for checkpoints without pickle); its keys are
  the constructor's argument names plus ``last_epoch``, ``base_lrs``, ``_last_lr`` and
  ``_chained``.  ``load_state_dict`` checks everything before it changes anything, and takes
  torch's state dict of the same class too (OneCycleLR's into one built with the same
  arguments: torch keeps them in the optimizer's groups).
* ``step(epoch)`` (deprecated in torch) jumps to that step without a warning.  The scheduler
  does not wrap ``optimizer.step`` to warn about call order.

``last_epoch=k >= 0`` (resuming; needs ``initial_lr`` in every group, as torch) is torch's,
quirks included: construction takes the step to k+1 from each group's current lr by the
chainable form, and a chainable scheduler follows the group's lr from then on, so that
schedulers resumed together compose.  So StepLR, MultiStepLR and ConstantLR apply their change
at step k+1 (right when the restored lr is the one at step k), while ExponentialLR, LinearLR
and CosineAnnealingLR keep the lr (right when it is the one at step k+1): resumed with the
other k, torch's and these apply a change twice or lag a step.  LambdaLR, OneCycleLR (as
torch's) and WarmupCosineLR set their value at step k+1 from the base lr.  ConstantLR with
factor=0 raises a ValueError where the chainable form would divide by the factor (torch's
raises ZeroDivisionError).
"""
from __future__ import annotations

import bisect
import math
import numbers
import types
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from fastopt import _validate as V
from fastopt._typing import HasParamGroups

# lr_lambda of LambdaLR and lambda_lr: step -> factor
LRLambda = Callable[[int], float]

__all__ = [
    "LRScheduler", "LambdaLR", "StepLR", "MultiStepLR", "ExponentialLR", "LinearLR",
    "ConstantLR", "CosineAnnealingLR", "OneCycleLR", "SequentialLR", "ChainedScheduler",
    "WarmupCosineLR", "warmup_cosine",
    "lambda_lr", "step_lr", "multi_step_lr", "exponential_lr", "linear_lr", "constant_lr",
    "cosine_annealing_lr", "one_cycle_lr", "one_cycle_momentum", "linear_warmup_lr",
    "warmup_cosine_lr",
]


# ---- argument checks ------------------------------------------------------------------------

def _int(name, x, lo=None):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")
    x = int(x)
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    return x


_real = V.real
_flag = V.flag


def _per_group(name, x, n, check):
    """A scalar for every group, or a list/tuple with one value per group (torch's rule)."""
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{name} has {len(x)} values, the optimizer has {n} param groups")
        return [check(f"{name}[{i}]", v) for i, v in enumerate(x)]
    return [check(name, x)] * n


def _milestones(name, x, lo, repeats=False):
    """Strictly increasing ints >= lo, as a list; with `repeats`, non-decreasing."""
    if isinstance(x, (str, bytes, Mapping)) or not hasattr(x, "__iter__"):
        raise TypeError(f"{name} must be a list of ints, got {type(x).__name__} {x!r}")
    out = [_int(f"{name}[{i}]", m, lo) for i, m in enumerate(x)]
    for i in range(1, len(out)):
        if out[i] < out[i - 1] or (out[i] == out[i - 1] and not repeats):
            rule = "non-decreasing" if repeats else "strictly increasing"
            raise ValueError(f"{name} must be {rule}, got {out}")
    return out


def _milestone_counts(name, x, lo):
    """torch's MultiStepLR.milestones, a Counter {milestone: repeats}, as a sorted list."""
    out = []
    for m, n in x.items():
        m = _int(f"{name} key {m!r}", m, lo)
        out += [m] * _int(f"{name}[{m}]", n, 1)
    return sorted(out)


def _param_groups(optimizer):
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise TypeError("optimizer must be an optimizer with param_groups (a fastopt "
                        f"optimizer), got {type(optimizer).__name__}")
    if not groups:
        raise ValueError("optimizer has no param groups")
    for i, g in enumerate(groups):
        if "lr" not in g:
            raise ValueError(f"optimizer.param_groups[{i}] has no 'lr'")
        _real(f"optimizer.param_groups[{i}]['lr']", g["lr"], lo=0.0)
    return groups


def _last_epoch(x):
    return _int("last_epoch", x, -1)


def _check_step(step):
    return _int("step", step, 0)


def _plain(name, x):
    """x as JSON-plain data (tuples become lists); TypeError naming the first offender."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"{name} must be finite, got {x!r}")
        return x
    if isinstance(x, (list, tuple)):
        return [_plain(f"{name}[{i}]", v) for i, v in enumerate(x)]
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(f"{name} has a key {k!r} that is not a str")
            out[k] = _plain(f"{name}[{k!r}]", v)
        return out
    raise TypeError(f"{name} must hold only None, bool, int, float, str, lists and dicts with "
                    f"str keys, got {type(x).__name__}")


def _keys(where, sd, expected, optional=()):
    if not isinstance(sd, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(sd).__name__}")
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"{where} is missing {missing}")
    unknown = sorted(set(sd) - set(expected) - set(optional), key=repr)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}")


# Keys of torch's state dicts that hold its call bookkeeping, not the schedule: checked, and
# otherwise ignored, so that a torch scheduler's state_dict() loads.
_TORCH_KEYS = {"_step_count": lambda k, v: _int(k, v, 0), "_is_initial": _flag,
               "_get_lr_called_within_step": _flag}


def _without_torch_keys(where, sd):
    if not isinstance(sd, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(sd).__name__}")
    for k, check in _TORCH_KEYS.items():
        if k in sd:
            check(f"{where}[{k!r}]", sd[k])
    return {k: v for k, v in sd.items() if k not in _TORCH_KEYS}


def _float_list(name, x, n, lo=None):
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a list of floats, got {type(x).__name__}")
    if len(x) != n:
        raise ValueError(f"{name} has {len(x)} values, the optimizer has {n} param groups")
    return [_real(f"{name}[{i}]", v, lo=lo) for i, v in enumerate(x)]


# ---- the schedules as pure functions ----------------------------------------------------------
# Each public function checks its arguments and calls the unchecked twin the classes use; the
# expressions are torch's, operation for operation, so the results are torch's to the bit.

def _step_lr(step, base_lr, step_size, gamma):
    return base_lr * gamma ** (step // step_size)


def _multi_step_lr(step, base_lr, milestones, gamma):
    return base_lr * gamma ** bisect.bisect_right(milestones, step)


def _exponential_lr(step, base_lr, gamma):
    return base_lr * gamma ** step


def _linear_lr(step, base_lr, start_factor, end_factor, total_iters):
    return base_lr * (start_factor + (end_factor - start_factor) * min(total_iters, step)
                      / total_iters)


def _constant_lr(step, base_lr, factor, total_iters):
    return base_lr * (factor + (step >= total_iters) * (1 - factor))


def _cosine_annealing_lr(step, base_lr, T_max, eta_min):
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * step / T_max)) / 2


def _linear_warmup_lr(step, base_lr, warmup_steps):
    # base_lr itself from the last warm-up step on: base_lr*W/W can be off by an ulp
    if step + 1 >= warmup_steps:
        return base_lr
    return base_lr * (step + 1) / warmup_steps


def _warmup_cosine_lr(step, base_lr, warmup_steps, total_steps, min_lr):
    if step < warmup_steps:
        return _linear_warmup_lr(step, base_lr, warmup_steps)
    if step >= total_steps:
        return min_lr
    return _cosine_annealing_lr(step - warmup_steps, base_lr, total_steps - warmup_steps, min_lr)


def lambda_lr(step: int, base_lr: float, lr_lambda: LRLambda) -> float:
    """LambdaLR's lr at `step`: base_lr * lr_lambda(step)."""
    step = _check_step(step)
    base_lr = _real("base_lr", base_lr, lo=0.0)
    return base_lr * _real(f"lr_lambda({step})", lr_lambda(step), lo=0.0)


def step_lr(step: int, base_lr: float, step_size: int, gamma: float = 0.1) -> float:
    """StepLR's lr at `step`: base_lr * gamma ** (step // step_size)."""
    a = _step_args(dict(step_size=step_size, gamma=gamma), str)
    return _step_lr(_check_step(step), _real("base_lr", base_lr, lo=0.0), **a)


def multi_step_lr(step: int, base_lr: float, milestones: Sequence[int],
                  gamma: float = 0.1) -> float:
    """MultiStepLR's lr at `step`: base_lr * gamma ** (number of milestones <= step)."""
    a = _multi_step_args(dict(milestones=milestones, gamma=gamma), str)
    return _multi_step_lr(_check_step(step), _real("base_lr", base_lr, lo=0.0), **a)


def exponential_lr(step: int, base_lr: float, gamma: float) -> float:
    """ExponentialLR's lr at `step`: base_lr * gamma ** step."""
    a = _exponential_args(dict(gamma=gamma), str)
    return _exponential_lr(_check_step(step), _real("base_lr", base_lr, lo=0.0), **a)


def linear_lr(step: int, base_lr: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
              total_iters: int = 5) -> float:
    """LinearLR's lr at `step`: base_lr times a factor going linearly from start_factor at
    step 0 to end_factor at step total_iters, then staying there."""
    a = _linear_args(dict(start_factor=start_factor, end_factor=end_factor,
                          total_iters=total_iters), str)
    return _linear_lr(_check_step(step), _real("base_lr", base_lr, lo=0.0), **a)


def constant_lr(step: int, base_lr: float, factor: float = 1.0 / 3,
                total_iters: int = 5) -> float:
    """ConstantLR's lr at `step`: base_lr * factor before step total_iters, base_lr from it
    on (computed as torch's closed form, base_lr * (factor + (1 - factor)))."""
    a = _constant_args(dict(factor=factor, total_iters=total_iters), str)
    return _constant_lr(_check_step(step), _real("base_lr", base_lr, lo=0.0), **a)


def cosine_annealing_lr(step: int, base_lr: float, T_max: int, eta_min: float = 0.0) -> float:
    """CosineAnnealingLR's closed form at `step`:
    eta_min + (base_lr - eta_min) * (1 + cos(pi * step / T_max)) / 2.

    As torch's, it is periodic: past T_max the lr rises again (back to base_lr at 2*T_max).
    """
    a = _cosine_args(dict(T_max=T_max, eta_min=eta_min), str)
    return _cosine_annealing_lr(_check_step(step), _real("base_lr", base_lr, lo=0.0), **a)


def one_cycle_lr(step: int, max_lr: float, total_steps: int, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False) -> float:
    """OneCycleLR's lr at `step` (0 <= step <= total_steps); see OneCycleLR for the phases."""
    c = _one_cycle_args(dict(total_steps=total_steps, pct_start=pct_start,
                             anneal_strategy=anneal_strategy, div_factor=div_factor,
                             final_div_factor=final_div_factor, three_phase=three_phase), str)
    max_lr = _real("max_lr", max_lr, lo=0.0)
    step = _one_cycle_step("step", _check_step(step), c["total_steps"])
    ends = _one_cycle_ends(c["total_steps"], c["pct_start"], c["three_phase"])
    lrs = _one_cycle_lr_points(max_lr, c["div_factor"], c["final_div_factor"], c["three_phase"])
    return _one_cycle_at(step, ends, lrs, c["anneal_strategy"])


def one_cycle_momentum(step: int, total_steps: int, pct_start: float = 0.3,
                       anneal_strategy: str = "cos", base_momentum: float = 0.85,
                       max_momentum: float = 0.95, three_phase: bool = False) -> float:
    """OneCycleLR's momentum (or beta1) at `step`: max_momentum where the lr is lowest,
    base_momentum at its peak, annealed like the lr."""
    c = _one_cycle_args(dict(total_steps=total_steps, pct_start=pct_start,
                             anneal_strategy=anneal_strategy, three_phase=three_phase), str)
    base_momentum = _real("base_momentum", base_momentum, lo=0.0)
    max_momentum = _real("max_momentum", max_momentum, lo=0.0)
    step = _one_cycle_step("step", _check_step(step), c["total_steps"])
    ends = _one_cycle_ends(c["total_steps"], c["pct_start"], c["three_phase"])
    points = _one_cycle_momentum_points(base_momentum, max_momentum, c["three_phase"])
    return _one_cycle_at(step, ends, points, c["anneal_strategy"])


def linear_warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """base_lr * (step + 1) / warmup_steps during the warm-up, base_lr from step
    warmup_steps - 1 on: the first step already trains, at base_lr / warmup_steps.

    LinearLR(opt, start_factor=1/warmup_steps, total_iters=warmup_steps - 1) gives the same
    sequence to a few ulp.
    """
    return _linear_warmup_lr(_check_step(step), _real("base_lr", base_lr, lo=0.0),
                             _int("warmup_steps", warmup_steps, 1))


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float = 0.0) -> float:
    """WarmupCosineLR's lr at `step`, with W = warmup_steps and T = total_steps:

        step < W:       base_lr * (step + 1) / W            (linear_warmup_lr)
        W <= step < T:  min_lr + (base_lr - min_lr) * (1 + cos(pi * (step - W) / (T - W))) / 2
        step >= T:      min_lr
    """
    a = _warmup_cosine_args(dict(warmup_steps=warmup_steps, total_steps=total_steps,
                                 min_lr=min_lr), str)
    return _warmup_cosine_lr(_check_step(step), _real("base_lr", base_lr, lo=0.0), **a)


# ---- checks of each schedule's arguments (constructors, functions and load_state_dict) -------
# Each takes {argument: value} and `name`, which turns an argument into how the error names it.

def _step_args(a, name):
    return dict(step_size=_int(name("step_size"), a["step_size"], 1),
                gamma=_real(name("gamma"), a["gamma"], lo=0.0, lo_open=True))


def _multi_step_args(a, name):
    # a repeated milestone applies gamma once per repeat, as torch's Counter does; a Counter
    # (torch's state_dict holds one) is taken as the list it counts
    m = a["milestones"]
    m = (_milestone_counts(name("milestones"), m, 0) if isinstance(m, Mapping) else
         _milestones(name("milestones"), m, 0, repeats=True))
    return dict(milestones=m,
                gamma=_real(name("gamma"), a["gamma"], lo=0.0, lo_open=True))


def _exponential_args(a, name):
    return dict(gamma=_real(name("gamma"), a["gamma"], lo=0.0, lo_open=True))


def _linear_args(a, name):
    # total_iters = 0 divides by zero in torch's closed form (and its chainable form then
    # keeps start_factor forever)
    return dict(start_factor=_real(name("start_factor"), a["start_factor"], lo=0.0,
                                   lo_open=True, hi=1.0),
                end_factor=_real(name("end_factor"), a["end_factor"], lo=0.0, hi=1.0),
                total_iters=_int(name("total_iters"), a["total_iters"], 1))


def _constant_args(a, name):
    # total_iters = 0: torch's chainable form applies the factor forever, its closed form never
    return dict(factor=_real(name("factor"), a["factor"], lo=0.0, hi=1.0),
                total_iters=_int(name("total_iters"), a["total_iters"], 1))


def _cosine_args(a, name):
    return dict(T_max=_int(name("T_max"), a["T_max"], 1),
                eta_min=_real(name("eta_min"), a["eta_min"], lo=0.0))


def _warmup_cosine_args(a, name):
    w = _int(name("warmup_steps"), a["warmup_steps"], 0)
    t = _int(name("total_steps"), a["total_steps"], 1)
    if w > t:
        raise ValueError(f"{name('warmup_steps')} must be <= total_steps, got {w} > {t}")
    return dict(warmup_steps=w, total_steps=t,
                min_lr=_real(name("min_lr"), a["min_lr"], lo=0.0))


_ANNEAL = ("cos", "linear")


def _one_cycle_args(a, name):
    """Checks the arguments one_cycle_lr and one_cycle_momentum share (those present)."""
    out = {}
    t = out["total_steps"] = _int(name("total_steps"), a["total_steps"], 1)
    p = out["pct_start"] = _real(name("pct_start"), a["pct_start"], lo=0.0, hi=1.0)
    s = a["anneal_strategy"]
    if s not in _ANNEAL:
        raise ValueError(f"{name('anneal_strategy')} must be 'cos' or 'linear', got {s!r}")
    out["anneal_strategy"] = s
    three = out["three_phase"] = _flag(name("three_phase"), a["three_phase"])
    if "div_factor" in a:
        out["div_factor"] = _real(name("div_factor"), a["div_factor"], lo=0.0, lo_open=True)
        out["final_div_factor"] = _real(name("final_div_factor"), a["final_div_factor"],
                                        lo=0.0, lo_open=True)
    # torch divides 0 by 0 where a phase that a step reaches has no length
    ends = _one_cycle_ends(t, p, three)
    if ends[0] == 0.0:
        raise ValueError(f"{name('pct_start')} * total_steps is 1, so the first phase has zero "
                         f"length (torch divides by zero there); got pct_start={p!r}, "
                         f"total_steps={t}")
    if ends[-1] == ends[-2] and t > ends[-2]:
        raise ValueError(f"{name('pct_start')}={p!r} leaves the last phase of the cycle zero "
                         f"steps long (torch divides by zero at step {t})")
    return out


def _one_cycle_step(name, step, total_steps):
    if step > total_steps:
        raise ValueError(f"{name} {step} is past total_steps={total_steps} (torch: 'Tried to "
                         f"step {step} times')")
    return step


def _one_cycle_ends(total_steps, pct_start, three_phase):
    """torch's phase ends (its `end_step`s)."""
    if three_phase:
        return (float(pct_start * total_steps) - 1, float(2 * pct_start * total_steps) - 2,
                total_steps - 1)
    return (float(pct_start * total_steps) - 1, total_steps - 1)


def _one_cycle_lr_points(max_lr, div_factor, final_div_factor, three_phase):
    """(start, end) lr of each phase, computed as torch computes its group entries."""
    initial = max_lr / div_factor
    low = initial / final_div_factor
    if three_phase:
        return ((initial, max_lr), (max_lr, initial), (initial, low))
    return ((initial, max_lr), (max_lr, low))


def _one_cycle_momentum_points(base_momentum, max_momentum, three_phase):
    if three_phase:
        return ((max_momentum, base_momentum), (base_momentum, max_momentum),
                (max_momentum, max_momentum))
    return ((max_momentum, base_momentum), (base_momentum, max_momentum))


def _one_cycle_at(step, ends, points, strategy):
    start = 0.0
    last = len(ends) - 1
    for i, end in enumerate(ends):
        if step <= end or i == last:
            pct = (step - start) / (end - start)
            a, b = points[i]
            if strategy == "cos":
                return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)
            return (b - a) * pct + a
        start = end


# ---- the scheduler classes ---------------------------------------------------------------------

# The live schedulers of each optimizer.  A chainable scheduler built while another one of the
# same optimizer is alive starts from the lr the others left, as torch's does (whichever of them
# wrote last, and even if the last writer is gone).
_live: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _register(optimizer, scheduler):
    try:
        _live.setdefault(optimizer, weakref.WeakSet()).add(scheduler)
    except TypeError:           # an optimizer without weak references or a hash: no record
        pass


def _others_alive(optimizer, scheduler):
    try:
        live = _live.get(optimizer)
    except TypeError:
        return False
    return live is not None and any(s is not scheduler for s in live)


_CHAINABLE = ("StepLR, MultiStepLR, ExponentialLR, LinearLR, ConstantLR, CosineAnnealingLR, "
              "and SequentialLR or ChainedScheduler of those")


class LRScheduler:
    """Base class: owns `optimizer`, `base_lrs`, `last_epoch`; writes each group's lr.

    A subclass sets its hyperparameters, calls ``super().__init__(optimizer, last_epoch)`` and
    defines ``get_lr()``: the lr of every group at step ``self.last_epoch`` (torch's protocol;
    ``get_lr`` is called by `step`, read the lr with `get_last_lr`).  Hyperparameters named in
    ``_config`` are saved by `state_dict`.  `step()` computes every group's value before it
    writes any, and on an error leaves the optimizer and the scheduler as they were.

    Several schedulers on one optimizer.  While a scheduler is the only one writing the lrs it
    follows its closed form, ``get_lr()``.  A chainable one (``_chainable``; it also defines
    ``_chained_lr(lrs)``, torch's ``get_lr``: the next lrs from the groups' current ones)
    switches for good to torch's chainable form when it finds a group's lr other than the one
    it wrote last, when it is built while another scheduler of the optimizer is alive or while
    a group's lr is not its initial_lr (an earlier scheduler, now gone, or a hand edit moved
    it), or when it is built with last_epoch >= 0 (resuming; see the module's docstring): it
    then scales whatever the others (or a hand edit) left, as torch's does, so that the
    effects multiply.  A jump to a step (``step(epoch)``, a SequentialLR milestone) uses the closed
    form, as torch's, and starts it over.  A scheduler that is not chainable (LambdaLR,
    OneCycleLR, WarmupCosineLR) raises a ValueError at such a step, where torch's would
    overwrite the other's change without a word.
    """

    _config: Tuple[str, ...] = ()       # attribute names saved by state_dict
    optimizer: HasParamGroups
    base_lrs: List[float]
    last_epoch: int
    _chainable = False      # True where _chained_lr gives torch's chainable form
    _chained = False        # True once the lr has been found changed by someone else
    _is_initial = False     # True while construction computes the first value (as torch)
    _jump = False           # True when the value at last_epoch is wanted without its history

    def __init__(self, optimizer: HasParamGroups, last_epoch: int = -1) -> None:
        groups = _param_groups(optimizer)
        last_epoch = _last_epoch(last_epoch)
        base_lrs = self._initial_base_lrs(groups, last_epoch)
        self.optimizer = optimizer
        self.base_lrs = base_lrs
        self.last_epoch = last_epoch
        self._last_lr = [float(g["lr"]) for g in groups]
        # Resuming (last_epoch >= 0), torch's step to last_epoch + 1 scales the group's lr by
        # its chainable form, and its scheduler follows the group's lr from then on: so does a
        # chainable one here (else the second of two schedulers resumed erases the first's).
        # So it does when another scheduler is alive, or when the lr is not where a schedule
        # starts (an earlier scheduler, now gone, or a hand edit moved it from initial_lr):
        # torch's scales the lr it finds.
        chained = self._chainable and (
            last_epoch >= 0 or _others_alive(optimizer, self)
            or any(float(g["lr"]) != base for g, base in zip(groups, base_lrs)))
        _, commit = self._plan(last_epoch + 1, jump=not chained, initial=True, chained=chained)
        # Everything above may raise; from here on the optimizer is written.
        self._write_initial(groups, last_epoch)
        commit()
        _register(optimizer, self)

    def _initial_base_lrs(self, groups, last_epoch):
        if last_epoch == -1:
            return [_real(f"optimizer.param_groups[{i}]['lr']", g.get("initial_lr", g["lr"]),
                          lo=0.0) for i, g in enumerate(groups)]
        for i, g in enumerate(groups):
            if "initial_lr" not in g:
                raise ValueError(f"last_epoch={last_epoch} resumes a schedule, but "
                                 f"optimizer.param_groups[{i}] has no 'initial_lr' (load the "
                                 "optimizer's state first, or use last_epoch=-1)")
        return [_real(f"optimizer.param_groups[{i}]['initial_lr']", g["initial_lr"], lo=0.0)
                for i, g in enumerate(groups)]

    def _write_initial(self, groups, last_epoch):
        if last_epoch == -1:
            for g, base in zip(groups, self.base_lrs):
                g.setdefault("initial_lr", base)

    # ---- stepping ----

    def get_lr(self) -> List[float]:
        """Every group's lr at step `last_epoch` (subclasses define it; `step` calls it)."""
        raise NotImplementedError

    def get_last_lr(self) -> List[float]:
        """The lr of every group that the last step (or construction) wrote."""
        return list(self._last_lr)

    def step(self, epoch: Optional[int] = None) -> None:
        """Advance one step and write the new lr into every param group.

        Call it after `optimizer.step()`, as in torch.  `epoch` (deprecated in torch) jumps to
        that step instead.
        """
        if epoch is None:
            self._step_plan()[1]()
        else:
            self._plan(_int("epoch", epoch, 0), jump=True)[1]()

    def _values(self):
        """(lrs, per-group dicts of other keys to write or None) at step `last_epoch`."""
        return self.get_lr(), None

    def _step_plan(self, current=None):
        """`_plan` of the next step, from the group lrs `current` (default: the optimizer's)."""
        return self._plan(self.last_epoch + 1, current=current)

    def _plan(self, epoch, jump=False, initial=False, current=None, chained=None):
        """Compute the values at `epoch`, changing nothing; return them and a function that
        writes them.  `current`: the group lrs to start from (a ChainedScheduler passes the
        lrs its previous member would write); `chained`: whether to use the chainable form
        (default: if this scheduler already does, or finds an lr it did not write)."""
        groups = self.optimizer.param_groups
        if current is None:
            current = [g["lr"] for g in groups]
        if chained is None:
            # a change in the number of groups is left to the check of get_lr's length below
            chained = not jump and (self._chained or (len(current) == len(self._last_lr)
                                                      and current != self._last_lr))
        if chained and not self._chainable:
            self._refuse_to_chain(current)
        saved = self.last_epoch
        self.last_epoch, self._jump, self._is_initial = epoch, jump, initial
        try:
            lrs, extras = (self._chained_lr(current), None) if chained else self._values()
            if not isinstance(lrs, (list, tuple)) or len(lrs) != len(groups):
                raise ValueError(f"{type(self).__name__}.get_lr() must return one lr per param "
                                 f"group ({len(groups)}), got {lrs!r}")
            lrs = [lr if type(lr) is float and math.isfinite(lr) else
                   _real(f"{type(self).__name__}: the lr of param_groups[{i}] at step {epoch}", lr)
                   for i, lr in enumerate(lrs)]
        finally:
            self.last_epoch, self._jump, self._is_initial = saved, False, False

        def commit():
            for i, g in enumerate(groups):
                g["lr"] = lrs[i]
                if extras is not None:
                    g.update(extras[i])
            self.last_epoch = epoch
            self._last_lr = lrs
            self._chained = chained
        return lrs, commit

    def _refuse_to_chain(self, current):
        name = type(self).__name__
        i = next(i for i, (a, b) in enumerate(zip(current, self._last_lr)) if a != b)
        raise ValueError(
            f"{name}: optimizer.param_groups[{i}]['lr'] is {current[i]!r}, not the "
            f"{self._last_lr[i]!r} this scheduler wrote last: another scheduler (or a hand "
            f"edit) changed it, and {name} computes the lr from the base lr alone, so it cannot "
            f"compose with that change (torch's would overwrite it without a word).  Step it "
            f"alone, or step only chainable schedulers together ({_CHAINABLE})")

    # ---- state ----

    def state_dict(self) -> Dict[str, Any]:
        """{'last_epoch', 'base_lrs', '_last_lr', '_chained', and each hyperparameter}:
        JSON-plain values.  torch's load_state_dict takes it too (but for MultiStepLR, whose
        milestones torch keeps in a Counter)."""
        sd = {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs),
              "_last_lr": list(self._last_lr), "_chained": self._chained}
        for key in self._config:
            sd[key] = _plain(key, getattr(self, key))
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore `state_dict()`'s output (hyperparameters included, as torch), or the
        state_dict() of torch's scheduler of the same class (its call bookkeeping,
        ``_step_count``, ``_is_initial`` and ``_get_lr_called_within_step``, is checked and
        ignored).

        Every key and value is checked first; on a problem a TypeError/ValueError names it and
        nothing has changed.  As in torch, the optimizer's lrs are not written (load the
        optimizer's state for those); the next `step()` continues the schedule.
        """
        self._load_plan(state_dict, "state_dict")()

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> Any:
        """The checks of `load_state_dict` without the load: raises as it would, changes
        nothing (a checkpoint checks its scheduler's state before it changes anything)."""
        self._load_plan(state_dict, "state_dict")

    def _load_plan(self, sd, where):
        from_torch = isinstance(sd, Mapping) and "_step_count" in sd
        sd = _without_torch_keys(where, sd)
        # optional: torch's state dicts and older fastopt checkpoints lack it.  torch's
        # schedulers always follow the group's lr: a chainable one loaded from torch does too.
        _keys(where, sd, ("last_epoch", "base_lrs", "_last_lr") + tuple(self._config),
              optional=("_chained",))
        chained = _flag(f"{where}['_chained']",
                        sd.get("_chained", from_torch and self._chainable))
        if chained and not self._chainable:
            raise ValueError(f"{where}['_chained'] is True, but {type(self).__name__} is not "
                             "chainable")
        n = len(self.optimizer.param_groups)
        # -1: not started (torch's SequentialLR saves its later schedulers so)
        last_epoch = _int(f"{where}['last_epoch']", sd["last_epoch"], -1)
        base_lrs = _float_list(f"{where}['base_lrs']", sd["base_lrs"], n, lo=0.0)
        last_lr = _float_list(f"{where}['_last_lr']", sd["_last_lr"], n)
        config = self._check_config({k: sd[k] for k in self._config},
                                    lambda k: f"{where}[{k!r}]")

        def commit():
            self.last_epoch, self.base_lrs, self._last_lr = last_epoch, base_lrs, last_lr
            self._chained = chained
            for k, v in config.items():
                setattr(self, k, v)
        return commit

    def _check_config(self, values, name):
        return {}


class LambdaLR(LRScheduler):
    """lr = base_lr * lr_lambda(step), with one function for all groups or one per group.

    As torch's, `state_dict` does not store the functions: it stores None for each plain
    function (and lambda), and for a callable object its attributes, which must be JSON-plain;
    a loading scheduler must be built with the same functions.  A factor that is negative or
    not finite raises a ValueError at the step that computes it (torch passes it on).
    """

    lr_lambdas: List[LRLambda]

    def __init__(self, optimizer: HasParamGroups,
                 lr_lambda: Union[LRLambda, Sequence[LRLambda]], last_epoch: int = -1) -> None:
        n = len(_param_groups(optimizer))
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(f"lr_lambda has {len(lr_lambda)} functions, the optimizer has "
                                 f"{n} param groups")
            fns = list(lr_lambda)
        else:
            fns = [lr_lambda] * n
        for i, f in enumerate(fns):
            if not callable(f):
                raise TypeError(f"lr_lambda[{i}] must be callable, got {type(f).__name__}")
        self.lr_lambdas = fns
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        e = self.last_epoch
        return [base * _real(f"lr_lambda[{i}]({e})", f(e), lo=0.0)
                for i, (f, base) in enumerate(zip(self.lr_lambdas, self.base_lrs))]

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        saved: List[Any] = []
        for i, f in enumerate(self.lr_lambdas):
            if isinstance(f, types.FunctionType) or not hasattr(f, "__dict__"):
                saved.append(None)
            else:
                saved.append(_plain(f"lr_lambdas[{i}].__dict__", dict(vars(f))))
        sd["lr_lambdas"] = saved
        return sd

    def _load_plan(self, sd, where):
        if not isinstance(sd, Mapping) or "lr_lambdas" not in sd:
            _keys(where, sd, ("lr_lambdas",))      # says which: not a dict, or no lr_lambdas
        commit_base = super()._load_plan({k: v for k, v in sd.items() if k != "lr_lambdas"},
                                         where)
        saved = sd["lr_lambdas"]
        name = f"{where}['lr_lambdas']"
        if not isinstance(saved, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(saved).__name__}")
        if len(saved) != len(self.lr_lambdas):
            raise ValueError(f"{name} has {len(saved)} entries, this scheduler has "
                             f"{len(self.lr_lambdas)} functions")
        updates = []
        for i, (d, f) in enumerate(zip(saved, self.lr_lambdas)):
            if d is None:
                continue
            if not isinstance(d, Mapping):
                raise TypeError(f"{name}[{i}] must be None or a dict, got {type(d).__name__}")
            if isinstance(f, types.FunctionType) or not hasattr(f, "__dict__"):
                raise ValueError(f"{name}[{i}] holds attributes, but lr_lambda[{i}] is a plain "
                                 "function, which has none to restore")
            updates.append((f, _plain(f"{name}[{i}]", d)))

        def commit():
            commit_base()
            for f, d in updates:
                f.__dict__.update(d)
        return commit


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (step // step_size)  (`step_lr`; torch's closed form)."""

    _config = ("step_size", "gamma")

    step_size: int
    gamma: float

    def __init__(self, optimizer: HasParamGroups, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.__dict__.update(self._check_config(dict(step_size=step_size, gamma=gamma), str))
        super().__init__(optimizer, last_epoch)

    _check_config = staticmethod(_step_args)
    _chainable = True

    def get_lr(self) -> List[float]:
        return [_step_lr(self.last_epoch, b, self.step_size, self.gamma) for b in self.base_lrs]

    def _chained_lr(self, lrs):
        e = self.last_epoch
        if e == 0 or e % self.step_size != 0:
            return list(lrs)
        return [lr * self.gamma for lr in lrs]


class MultiStepLR(LRScheduler):
    """lr = base_lr * gamma ** (number of milestones <= step)  (`multi_step_lr`).

    milestones must be non-decreasing; a milestone given n times decays by gamma ** n there, as
    torch's (which keeps them in a Counter, and also takes them unsorted).  A Counter is taken
    as the list it counts.
    """

    _config = ("milestones", "gamma")

    milestones: List[int]
    gamma: float

    def __init__(self, optimizer: HasParamGroups, milestones: Sequence[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.__dict__.update(self._check_config(dict(milestones=milestones, gamma=gamma), str))
        super().__init__(optimizer, last_epoch)

    _check_config = staticmethod(_multi_step_args)
    _chainable = True

    def get_lr(self) -> List[float]:
        return [_multi_step_lr(self.last_epoch, b, self.milestones, self.gamma)
                for b in self.base_lrs]

    def _chained_lr(self, lrs):
        e = self.last_epoch
        repeats = bisect.bisect_right(self.milestones, e) - bisect.bisect_left(self.milestones, e)
        if not repeats:
            return list(lrs)
        return [lr * self.gamma ** repeats for lr in lrs]


class ExponentialLR(LRScheduler):
    """lr = base_lr * gamma ** step  (`exponential_lr`; torch's closed form)."""

    _config = ("gamma",)

    gamma: float

    def __init__(self, optimizer: HasParamGroups, gamma: float, last_epoch: int = -1) -> None:
        self.__dict__.update(self._check_config(dict(gamma=gamma), str))
        super().__init__(optimizer, last_epoch)

    _check_config = staticmethod(_exponential_args)
    _chainable = True

    def get_lr(self) -> List[float]:
        return [_exponential_lr(self.last_epoch, b, self.gamma) for b in self.base_lrs]

    def _chained_lr(self, lrs):
        if self._is_initial:
            return list(lrs)
        return [lr * self.gamma for lr in lrs]


class LinearLR(LRScheduler):
    """lr = base_lr * (start_factor + (end_factor - start_factor) * min(step, total_iters)
    / total_iters)  (`linear_lr`): a linear warm-up (end_factor=1) or decay.

    torch's closed form; with end_factor=0 it ends at exactly 0, where torch's chainable form
    leaves a residue of about 1e-17 * base_lr, which can be negative.  Composed with another
    scheduler it follows torch's chainable form, with such a residue raised to 0.
    """

    _config = ("start_factor", "end_factor", "total_iters")

    start_factor: float
    end_factor: float
    total_iters: int

    def __init__(self, optimizer: HasParamGroups, start_factor: float = 1.0 / 3,
                 end_factor: float = 1.0, total_iters: int = 5, last_epoch: int = -1) -> None:
        self.__dict__.update(self._check_config(dict(
            start_factor=start_factor, end_factor=end_factor, total_iters=total_iters), str))
        super().__init__(optimizer, last_epoch)

    _check_config = staticmethod(_linear_args)
    _chainable = True

    def get_lr(self) -> List[float]:
        return [_linear_lr(self.last_epoch, b, self.start_factor, self.end_factor,
                           self.total_iters) for b in self.base_lrs]

    def _chained_lr(self, lrs):
        e, s, f, n = self.last_epoch, self.start_factor, self.end_factor, self.total_iters
        if e == 0:
            return [lr * s for lr in lrs]
        if self._is_initial or e > n:
            return list(lrs)
        # max: where end_factor = 0 torch's form leaves a residue that can be below 0
        return [max(0.0, lr * (1.0 + (f - s) / (n * s + (e - 1) * (f - s)))) for lr in lrs]


class ConstantLR(LRScheduler):
    """lr = base_lr * factor for step < total_iters, then base_lr  (`constant_lr`).

    torch's closed form; factor=0 works alone (torch's chainable form divides by it), but not
    composed or resumed with last_epoch up to step total_iters (a ValueError there).
    """

    _config = ("factor", "total_iters")

    factor: float
    total_iters: int

    def __init__(self, optimizer: HasParamGroups, factor: float = 1.0 / 3, total_iters: int = 5,
                 last_epoch: int = -1) -> None:
        self.__dict__.update(self._check_config(dict(factor=factor, total_iters=total_iters),
                                                str))
        super().__init__(optimizer, last_epoch)

    _check_config = staticmethod(_constant_args)
    _chainable = True

    def get_lr(self) -> List[float]:
        return [_constant_lr(self.last_epoch, b, self.factor, self.total_iters)
                for b in self.base_lrs]

    def _chained_lr(self, lrs):
        e = self.last_epoch
        if e == 0:
            return [lr * self.factor for lr in lrs]
        if e != self.total_iters:
            return list(lrs)
        if self.factor == 0:
            raise ValueError(f"ConstantLR with factor=0 cannot end its factor at step "
                             f"total_iters={self.total_iters} while another scheduler also "
                             "sets the lr, or after resuming with last_epoch (torch's "
                             "chainable form, used then, divides by the factor there)")
        return [lr * (1.0 / self.factor) for lr in lrs]


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from base_lr to eta_min over T_max steps, by torch's recursion:

        lr(t) = eta_min + (lr(t-1) - eta_min) * (1 + cos(pi*t/T_max)) / (1 + cos(pi*(t-1)/T_max))

    (at t = T_max+1, 3*T_max+1, ..., where the denominator is 0:
    lr(t) = lr(t-1) + (base_lr - eta_min) * (1 - cos(pi/T_max)) / 2), starting from base_lr.
    It approximates `cosine_annealing_lr`, torch's closed form, to a few 1e-13 relative (the
    recursion accumulates rounding), and like it rises again past T_max.  The recursion runs
    from the lr this scheduler last wrote, and, once another scheduler or a hand edit has changed
    it, from ``group["lr"]``, as torch's.
    """

    _config = ("T_max", "eta_min")

    T_max: int
    eta_min: float

    def __init__(self, optimizer: HasParamGroups, T_max: int, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.__dict__.update(self._check_config(dict(T_max=T_max, eta_min=eta_min), str))
        super().__init__(optimizer, last_epoch)

    _check_config = staticmethod(_cosine_args)
    _chainable = True

    def get_lr(self) -> List[float]:
        e, T, eta = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial and e == 0:
            return list(self.base_lrs)         # torch keeps the lr, which is the base lr
        if self._jump:                         # no history to recurse from: torch's closed form
            return [_cosine_annealing_lr(e, b, T, eta) for b in self.base_lrs]
        return self._recurse(self._last_lr)

    def _chained_lr(self, lrs):
        if self._is_initial:
            return list(lrs)
        return self._recurse(lrs)

    def _recurse(self, lrs):
        e, T, eta = self.last_epoch, self.T_max, self.eta_min
        if (e - 1 - T) % (2 * T) == 0:
            return [lr + (b - eta) * (1 - math.cos(math.pi / T)) / 2
                    for b, lr in zip(self.base_lrs, lrs)]
        return [(1 + math.cos(math.pi * e / T)) / (1 + math.cos(math.pi * (e - 1) / T))
                * (lr - eta) + eta for lr in lrs]


class OneCycleLR(LRScheduler):
    """The 1cycle policy (`one_cycle_lr`, `one_cycle_momentum`), torch's arithmetic exactly.

    With initial_lr = max_lr / div_factor and min_lr = initial_lr / final_div_factor, the lr is
    annealed ('cos': end + (start - end) * (1 + cos(pi*pct)) / 2, or 'linear') from initial_lr
    to max_lr over the first pct_start * total_steps steps, then to min_lr at step
    total_steps - 1 (three_phase: back to initial_lr first, then to min_lr).  With
    cycle_momentum, the momentum (SGD, RMSprop) or betas[0] (Adam, AdamW) goes the other way,
    between max_momentum and base_momentum.  As torch, construction writes initial_lr, max_lr,
    min_lr (and max_momentum, base_momentum) into each group, and step total_steps, the last
    one allowed, extrapolates the last phase (with 'linear' its lr can be below 0, as torch's).
    The schedule is computed from the scheduler's own arguments, saved in its state_dict, not
    read back from the groups; arguments torch accepts but then divides by zero on
    (pct_start * total_steps == 1; pct_start = 1 with two phases) are refused, and so are
    total_steps and epochs * steps_per_epoch given together and different.

    torch's state dict holds the phases, not max_lr, the factors or the momenta (those are in
    its optimizer's groups): one loads into a OneCycleLR built with the same arguments, and the
    phases, total_steps, anneal_strategy and cycle_momentum must agree with its own.
    """

    _config = ("total_steps", "pct_start", "anneal_strategy", "div_factor", "final_div_factor",
               "three_phase", "max_lr", "cycle_momentum", "base_momentum", "max_momentum")

    total_steps: int
    pct_start: float
    anneal_strategy: str
    div_factor: float
    final_div_factor: float
    three_phase: bool
    max_lr: List[float]
    cycle_momentum: bool
    base_momentum: List[float]
    max_momentum: List[float]

    def __init__(self, optimizer: HasParamGroups, max_lr: Union[float, Sequence[float]],
                 total_steps: Optional[int] = None, epochs: Optional[int] = None,
                 steps_per_epoch: Optional[int] = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: Union[float, Sequence[float]] = 0.85,
                 max_momentum: Union[float, Sequence[float]] = 0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False,
                 last_epoch: int = -1) -> None:
        _param_groups(optimizer)
        self.optimizer = optimizer
        if epochs is not None or steps_per_epoch is not None:
            if epochs is None or steps_per_epoch is None:
                raise ValueError("epochs and steps_per_epoch must be given together, got "
                                 f"epochs={epochs!r}, steps_per_epoch={steps_per_epoch!r}")
            product = (_int("epochs", epochs, 1) * _int("steps_per_epoch", steps_per_epoch, 1))
            if total_steps is None:
                total_steps = product
            elif _int("total_steps", total_steps, 1) != product:
                raise ValueError(f"total_steps={total_steps} disagrees with epochs * "
                                 f"steps_per_epoch = {product}; give one or the other")
        elif total_steps is None:
            raise ValueError("total_steps is required, or epochs and steps_per_epoch")
        self.__dict__.update(self._check_config(dict(
            total_steps=total_steps, pct_start=pct_start, anneal_strategy=anneal_strategy,
            div_factor=div_factor, final_div_factor=final_div_factor, three_phase=three_phase,
            max_lr=max_lr, cycle_momentum=cycle_momentum, base_momentum=base_momentum,
            max_momentum=max_momentum), str))
        super().__init__(optimizer, last_epoch)

    def _check_config(self, a, name):
        groups = self.optimizer.param_groups
        n = len(groups)
        c = _one_cycle_args(a, name)
        c["max_lr"] = _per_group(name("max_lr"), a["max_lr"], n,
                                 lambda k, v: _real(k, v, lo=0.0))
        cycle = c["cycle_momentum"] = _flag(name("cycle_momentum"), a["cycle_momentum"])
        if not cycle:
            c["base_momentum"] = c["max_momentum"] = None
            c["_momentum_key"] = None
            return c
        defaults = getattr(self.optimizer, "defaults", None)
        keys = defaults if isinstance(defaults, Mapping) else groups[0]
        if "betas" in keys:
            key, hi = "betas", 1.0          # beta1 must stay below 1
        elif "momentum" in keys:
            key, hi = "momentum", None
        else:
            raise ValueError(f"{name('cycle_momentum')}=True needs an optimizer with 'momentum' "
                             "or 'betas' (SGD, RMSprop, the Adam family, Lion); pass "
                             "cycle_momentum=False")
        for m in ("base_momentum", "max_momentum"):
            c[m] = _per_group(name(m), a[m], n,
                              lambda k, v: _real(k, v, lo=0.0, hi=hi, hi_open=True))
        c["_momentum_key"] = key        # derived from the optimizer: not saved
        return c

    def _initial_base_lrs(self, groups, last_epoch):
        if last_epoch == -1:
            return [m / self.div_factor for m in self.max_lr]
        return super()._initial_base_lrs(groups, last_epoch)

    def _write_initial(self, groups, last_epoch):
        if last_epoch != -1:
            return
        for i, g in enumerate(groups):
            g["initial_lr"] = self.max_lr[i] / self.div_factor
            g["max_lr"] = self.max_lr[i]
            g["min_lr"] = g["initial_lr"] / self.final_div_factor
            if self.cycle_momentum:
                g["max_momentum"] = self.max_momentum[i]
                g["base_momentum"] = self.base_momentum[i]

    def _values(self):
        step = _one_cycle_step(f"{type(self).__name__}: step", self.last_epoch, self.total_steps)
        ends = _one_cycle_ends(self.total_steps, self.pct_start, self.three_phase)
        lrs, extras = [], ([] if self.cycle_momentum else None)
        for i, g in enumerate(self.optimizer.param_groups):
            points = _one_cycle_lr_points(self.max_lr[i], self.div_factor,
                                          self.final_div_factor, self.three_phase)
            lrs.append(_one_cycle_at(step, ends, points, self.anneal_strategy))
            if self.cycle_momentum:
                points = _one_cycle_momentum_points(self.base_momentum[i], self.max_momentum[i],
                                                    self.three_phase)
                m = _one_cycle_at(step, ends, points, self.anneal_strategy)
                if self._momentum_key == "betas":
                    extras.append({"betas": (m,) + tuple(g["betas"][1:])})
                else:
                    extras.append({"momentum": m})
        return lrs, extras

    def get_lr(self) -> List[float]:
        return self._values()[0]

    _TORCH_ONLY = ("_schedule_phases", "_anneal_func_type", "use_beta1")

    def _load_plan(self, sd, where):
        if isinstance(sd, Mapping) and "_schedule_phases" in sd:
            sd = self._from_torch(sd, where)
        return super()._load_plan(sd, where)

    def _from_torch(self, sd, where):
        """torch's OneCycleLR state dict as ours, if it describes this scheduler's cycle."""
        _keys(where, sd, ("last_epoch", "base_lrs", "_last_lr", "total_steps",
                          "cycle_momentum") + self._TORCH_ONLY, optional=_TORCH_KEYS)
        phases = sd["_schedule_phases"]
        if (not isinstance(phases, (list, tuple))
                or not all(isinstance(p, Mapping) and "end_step" in p for p in phases)):
            raise TypeError(f"{where}['_schedule_phases'] must be a list of dicts with "
                            f"'end_step', got {phases!r}")
        ends = list(_one_cycle_ends(self.total_steps, self.pct_start, self.three_phase))
        theirs = {"total_steps": sd["total_steps"], "_anneal_func_type": sd["_anneal_func_type"],
                  "cycle_momentum": sd["cycle_momentum"],
                  "_schedule_phases' end steps": [p["end_step"] for p in phases]}
        ours = {"total_steps": self.total_steps, "_anneal_func_type": self.anneal_strategy,
                "cycle_momentum": self.cycle_momentum, "_schedule_phases' end steps": ends}
        if self.cycle_momentum:
            theirs["use_beta1"] = sd["use_beta1"]
            ours["use_beta1"] = self._momentum_key == "betas"
        for k, v in ours.items():
            if theirs[k] != v or isinstance(theirs[k], bool) != isinstance(v, bool):
                raise ValueError(f"{where}['{k}'] is {theirs[k]!r}, this OneCycleLR's is {v!r} "
                                 "(torch's state dict loads into a OneCycleLR built with the "
                                 "same arguments)")
        out = {k: v for k, v in sd.items() if k not in self._TORCH_ONLY}
        out.update({k: _plain(k, getattr(self, k)) for k in self._config})
        return out


class WarmupCosineLR(LRScheduler):
    """Linear warm-up then cosine decay to a floor (`warmup_cosine_lr`), W = warmup_steps,
    T = total_steps:

        step < W:       base_lr * (step + 1) / W
        W <= step < T:  min_lr + (base_lr - min_lr) * (1 + cos(pi * (step - W) / (T - W))) / 2
        step >= T:      min_lr

    min_lr is one absolute floor for every group (as torch's eta_min).  Not in torch: its
    nearest is SequentialLR([LinearLR(opt, 1/W, 1.0, W - 1), CosineAnnealingLR(opt, T - W,
    min_lr)], [W]), whose sequence this matches to 1e-12 relative up to step T; past T that one
    rises again, this one stays at min_lr.
    """

    _config = ("warmup_steps", "total_steps", "min_lr")

    warmup_steps: int
    total_steps: int
    min_lr: float

    def __init__(self, optimizer: HasParamGroups, warmup_steps: int, total_steps: int,
                 min_lr: float = 0.0, last_epoch: int = -1) -> None:
        self.__dict__.update(self._check_config(dict(
            warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr), str))
        super().__init__(optimizer, last_epoch)

    _check_config = staticmethod(_warmup_cosine_args)

    def get_lr(self) -> List[float]:
        return [_warmup_cosine_lr(self.last_epoch, b, self.warmup_steps, self.total_steps,
                                  self.min_lr) for b in self.base_lrs]


def warmup_cosine(optimizer: HasParamGroups, warmup_steps: int, total_steps: int,
                  min_lr: float = 0.0, last_epoch: int = -1) -> WarmupCosineLR:
    """The common recipe in one line: WarmupCosineLR(optimizer, warmup_steps, total_steps,
    min_lr), i.e. lr = base_lr * (step+1)/warmup_steps for the first warmup_steps steps, then a
    cosine from base_lr down to min_lr at step total_steps, and min_lr after."""
    return WarmupCosineLR(optimizer, warmup_steps, total_steps, min_lr, last_epoch)


def _member_plans(owner, subs, where):
    """The load plans of a SequentialLR's or ChainedScheduler's schedulers from their saved
    states `subs` (each checked, nothing committed)."""
    if not isinstance(subs, (list, tuple)):
        raise TypeError(f"{where}['_schedulers'] must be a list, got {type(subs).__name__}")
    if len(subs) != len(owner._schedulers):
        raise ValueError(f"{where}['_schedulers'] has {len(subs)} entries, this "
                         f"{type(owner).__name__} has {len(owner._schedulers)} schedulers")
    return [s._load_plan(d, f"{where}['_schedulers'][{i}]")
            for i, (s, d) in enumerate(zip(owner._schedulers, subs))]


class SequentialLR(LRScheduler):
    """schedulers[i] runs from milestones[i-1] (0 for the first) until milestones[i]; each
    starts over from its step 0 at its milestone.

    torch's semantics: at a milestone the scheduler jumps to its step 0 by its closed form, and
    steps on from there.  Departures: the schedulers must be fastopt schedulers on this
    optimizer (torch only compares optimizers); milestones must be strictly increasing and
    >= 1 (a milestone at 0 would skip schedulers[0]); schedulers may be SequentialLRs, not
    ChainedSchedulers (which have no step count to restart; torch's fail at the milestone).
    It is chainable when all its schedulers are.  last_epoch >= 0 is refused: torch's resets
    the lrs to initial_lr and restarts schedulers[0] whatever last_epoch says (0.5, 0.45, ...
    for a run resumed at step 6); resume with load_state_dict, which both do alike.
    """

    def __init__(self, optimizer: HasParamGroups, schedulers: Sequence[LRScheduler],
                 milestones: Sequence[int], last_epoch: int = -1) -> None:
        _param_groups(optimizer)
        last_epoch = _last_epoch(last_epoch)
        if last_epoch != -1:
            raise ValueError(f"SequentialLR(last_epoch={last_epoch}): resuming by last_epoch "
                             "restarts the first scheduler in torch, whatever the step; build "
                             "it with last_epoch=-1 and load_state_dict(saved) to resume")
        if isinstance(schedulers, LRScheduler) or not isinstance(schedulers, (list, tuple)):
            raise TypeError(f"schedulers must be a list of schedulers, got "
                            f"{type(schedulers).__name__}")
        if not schedulers:
            raise ValueError("schedulers is empty; SequentialLR needs at least one scheduler")
        for i, s in enumerate(schedulers):
            if not isinstance(s, LRScheduler):
                raise TypeError(f"schedulers[{i}] must be a fastopt.lr_scheduler scheduler, got "
                                f"{type(s).__name__}")
            if s.optimizer is not optimizer:
                raise ValueError(f"schedulers[{i}] ({type(s).__name__}) is bound to a different "
                                 "optimizer than the one given to SequentialLR")
            if isinstance(s, ChainedScheduler):
                raise TypeError(f"schedulers[{i}] is a ChainedScheduler, which SequentialLR "
                                "cannot restart at a milestone; chain SequentialLRs instead")
        milestones = _milestones("milestones", milestones, 1)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"milestones must have len(schedulers) - 1 = {len(schedulers) - 1} "
                             f"entries, got {len(milestones)}")
        self.optimizer = optimizer
        self._schedulers = list(schedulers)
        self._milestones = milestones
        self.last_epoch = last_epoch
        self._last_lr = list(self._schedulers[0]._last_lr)
        self._plan(last_epoch + 1, jump=True, initial=True)[1]()

    @property
    def _chainable(self):
        return all(s._chainable for s in self._schedulers)

    def _plan(self, epoch, jump=False, initial=False, current=None, chained=None):
        idx = bisect.bisect_right(self._milestones, epoch)
        sub = self._schedulers[idx]
        start = self._milestones[idx - 1] if idx else 0
        if jump or epoch == start:
            lrs, sub_commit = sub._plan(epoch - start, jump=True, initial=initial)
        else:
            lrs, sub_commit = sub._plan(sub.last_epoch + 1, current=current)

        def commit():
            sub_commit()
            self.last_epoch = epoch
            self._last_lr = list(sub._last_lr)
        return lrs, commit

    def get_lr(self) -> List[float]:
        return self._schedulers[bisect.bisect_right(self._milestones, self.last_epoch)].get_lr()

    def state_dict(self) -> Dict[str, Any]:
        """{'last_epoch', '_milestones', '_last_lr', '_schedulers': [their state dicts]}."""
        return {"last_epoch": self.last_epoch, "_milestones": list(self._milestones),
                "_last_lr": list(self._last_lr),
                "_schedulers": [s.state_dict() for s in self._schedulers]}

    def _load_plan(self, sd, where):
        sd = _without_torch_keys(where, sd)
        _keys(where, sd, ("last_epoch", "_milestones", "_last_lr", "_schedulers"))
        n = len(self.optimizer.param_groups)
        last_epoch = _int(f"{where}['last_epoch']", sd["last_epoch"], 0)
        last_lr = _float_list(f"{where}['_last_lr']", sd["_last_lr"], n)
        milestones = _milestones(f"{where}['_milestones']", sd["_milestones"], 1)
        if len(milestones) != len(self._schedulers) - 1:
            raise ValueError(f"{where}['_milestones'] has {len(milestones)} entries, this "
                             f"SequentialLR has {len(self._schedulers)} schedulers")
        commits = _member_plans(self, sd["_schedulers"], where)

        def commit():
            for c in commits:
                c()
            self.last_epoch, self._milestones, self._last_lr = last_epoch, milestones, last_lr
        return commit


class ChainedScheduler(LRScheduler):
    """Steps several schedulers of one optimizer at once, each from the lrs the one before it
    wrote, so that their effects multiply (torch's ``ChainedScheduler(schedulers,
    optimizer=None)``):

        sched = ChainedScheduler([ConstantLR(opt, 0.1, total_iters=2), ExponentialLR(opt, 0.9)])

    is the same as stepping the two one after the other (see LRScheduler on schedulers that
    share an optimizer).  Departures: with more than one scheduler every one must be chainable
    (StepLR, MultiStepLR, ExponentialLR, LinearLR, ConstantLR, CosineAnnealingLR, SequentialLR
    and ChainedScheduler of those); LambdaLR, OneCycleLR and WarmupCosineLR set the lr from the
    base lr alone, so torch's would overwrite the others' effect: they are refused, and so is a
    scheduler listed twice.  `step()` takes no epoch (as torch's) and computes every
    scheduler's values before it writes any.
    """

    def __init__(self, schedulers: Sequence[LRScheduler],
                 optimizer: Optional[HasParamGroups] = None) -> None:
        if isinstance(schedulers, LRScheduler) or not isinstance(schedulers, (list, tuple)):
            raise TypeError(f"schedulers must be a list of schedulers, got "
                            f"{type(schedulers).__name__}")
        if not schedulers:
            raise ValueError("schedulers is empty; ChainedScheduler needs at least one scheduler")
        for i, s in enumerate(schedulers):
            if not isinstance(s, LRScheduler):
                raise TypeError(f"schedulers[{i}] must be a fastopt.lr_scheduler scheduler, got "
                                f"{type(s).__name__}")
        if optimizer is None:
            optimizer = schedulers[0].optimizer
        groups = _param_groups(optimizer)
        for i, s in enumerate(schedulers):
            if s.optimizer is not optimizer:
                raise ValueError(f"schedulers[{i}] ({type(s).__name__}) is bound to a different "
                                 "optimizer than " + ("the one given to ChainedScheduler"
                                                      if i else "the optimizer given"))
            if any(s is t for t in schedulers[:i]):
                raise ValueError(f"schedulers[{i}] is listed twice; it would step twice")
            if len(schedulers) > 1 and not s._chainable:
                raise ValueError(f"schedulers[{i}] ({type(s).__name__}) is not chainable: it "
                                 "sets the lr from the base lr alone, which would overwrite the "
                                 f"other schedulers' effect; chainable are {_CHAINABLE}")
        self.optimizer = optimizer
        self._schedulers = list(schedulers)
        self._last_lr = [float(g["lr"]) for g in groups]

    @property
    def _chainable(self):
        return all(s._chainable for s in self._schedulers)

    def step(self) -> None:  # type: ignore[override]   # torch's ChainedScheduler takes no epoch
        """Step every scheduler, in order, each from the lrs the one before it wrote."""
        self._step_plan()[1]()

    def _step_plan(self, current=None):
        lrs, commits = current, []
        for s in self._schedulers:
            lrs, c = s._step_plan(lrs)
            commits.append(c)

        def commit():
            for c in commits:
                c()
            self._last_lr = list(lrs)
        return lrs, commit

    def state_dict(self) -> Dict[str, Any]:
        """{'_last_lr', '_schedulers': [their state dicts]}, torch's keys."""
        return {"_last_lr": list(self._last_lr),
                "_schedulers": [s.state_dict() for s in self._schedulers]}

    def _load_plan(self, sd, where):
        sd = _without_torch_keys(where, sd)
        _keys(where, sd, ("_last_lr", "_schedulers"))
        last_lr = _float_list(f"{where}['_last_lr']", sd["_last_lr"],
                              len(self.optimizer.param_groups))
        commits = _member_plans(self, sd["_schedulers"], where)

        def commit():
            for c in commits:
                c()
            self._last_lr = last_lr
        return commit
