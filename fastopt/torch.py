"""fastopt's optimizers for PyTorch models on the CPU: the arena behind `torch.optim.Optimizer`.

    import fastopt.torch
    opt = fastopt.torch.AdamW(model.parameters(), lr=1e-3)   # or model.named_parameters()
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()     # accumulates straight into the gradient arena
        opt.step()                          # one fused pass over every parameter

Each class takes what its torch.optim namesake takes (params as tensors, (name, tensor) pairs
or param-group dicts with per-group overrides, and the same keywords and defaults) and is a
real subclass of `torch.optim.Optimizer`: torch's lr_scheduler classes, step hooks,
`state_dict()` / `load_state_dict()` in torch's format and `isinstance` checks work unchanged.

Construction moves every parameter into one arena (`fastopt.optim`'s): `p.data` becomes a view
of the params arena and `p.grad` a view of the gradient arena, so backward writes the
gradients where the kernel reads them and `step()` is one C call for the whole model.  Only
leaf CPU float32 dense tensors that require grad can be moved; anything else is refused with
an error naming the parameter, before any parameter is touched.

Where it departs from torch.optim, and why:

* **Every parameter of a group is stepped together** (the arena steps ranges, not tensors).
  torch skips a parameter whose `.grad` is None; here `step()` refuses with a ValueError that
  names it, having changed nothing, because stepping it with the arena's old gradient would
  be silently wrong.  A parameter without a gradient at construction keeps None, as in torch
  (so a step before any backward is refused, not taken on zeros).  `opt.zero_grad()` binds
  every gradient, as zeros, so a loop that uses it never meets the refusal; but then, as with
  torch's `zero_grad(set_to_none=False)`, a parameter that a backward does not reach is
  stepped with its zero gradient (weight decay and momentum still move it).  Parameters that
  never get a gradient belong out of the optimizer; `zero_grad()` refuses one whose
  requires_grad was turned off after construction.
* **A gradient replaced by a new tensor is copied in, never ignored.**  `step()` checks that
  every `.grad` is still the arena's view (one identity test a parameter); one that is not
  (after `model.zero_grad()`, which sets them to None before backward makes new ones, or
  code that assigns `.grad`) is copied into the arena and the view is bound again.  That
  costs one copy of the gradients on such a step; `opt.zero_grad()` avoids it.
* **A replaced storage is refused.**  Code that keeps the tensor objects but swaps their
  storage (`p.data = t`, `vector_to_parameters`, `module.to(memory_format=...)`,
  `share_memory()`, `p.grad.data = t`, a parametrization's right_inverse) cuts the model off
  from the arena.  `state_dict()` checks every parameter for it, `step()` and `zero_grad()` 16
  a call in rotation (about 0.5 us each), so a swap is refused within ceil(n / 16) calls,
  naming the parameter; steps taken meanwhile updated the arena, not the model.  A second
  fastopt.torch optimizer over the same parameters moves them into its own arena, and the
  first then refuses to step.  In-place changes (`p.copy_`, `model.load_state_dict`,
  `clip_grad_norm_`, `p.grad.mul_`) are what the arena expects.
* `zero_grad(set_to_none=True)` zeroes the gradient arena whatever `set_to_none` says, and
  binds the views again where they were replaced or set to None.
* The param groups are fixed at construction: `add_param_group` raises.
* `opt.state` is built from the arena on each access: buffers are live tensor views (as
  torch's state holds its tensors), 'step' (and NAdam's 'mu_product') a new float32 0-dim
  tensor each time; each parameter's entry is read-only (assigning into it would change
  nothing); load a state dict to set the state.
* `state_dict()` is torch's format ('step' as a float32 tensor) with copies of the buffers: a
  snapshot that later steps do not change.  Its param groups carry torch's own keys with
  fastopt's values (`fused=True`, `foreach=None`, ...), so that torch.optim loading it stays
  on the fused path fastopt's numbers match.
* With no step hook registered and no profiler running, `step()` leaves out torch's
  `profile_hook_step` wrapper (a `record_function` range and the hooks, about 15 us a call);
  with either it goes through torch's own.  A tracer that records ranges without enabling
  the autograd profiler (torch's ExecutionTraceObserver alone) does not see fastopt.torch's
  step and zero_grad ranges.

The extras of fastopt's step work here too: `step(zero_grad=True, grad_multiplier=...,
max_grad_norm=..., norm_type=...)`, `skip_nonfinite=True` in the constructor,
`fastopt.set_num_threads`.  `opt.core` is the fastopt optimizer behind it (its `flat_grads`
is one buffer to clip or all-reduce).

`import fastopt` never imports torch; this module does, and says how to install it.
"""
from __future__ import annotations

import importlib
import inspect
import operator
import types
import weakref
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from fastopt import optim as _optim
from fastopt._formats import as_bf16_bits
from fastopt.families import OPTIMIZERS

try:
    # imported by name so that a type checker does not analyse all of torch for this module
    # (the classes below are typed as subclasses of Any)
    torch: Any = importlib.import_module("torch")
except ImportError as _e:   # pragma: no cover - torch is a test peer here
    raise ImportError(
        "fastopt.torch needs PyTorch, which is not installed: `pip install 'fastopt[torch]'` "
        "or `pip install torch` (for the CPU-only build: `pip install torch --index-url "
        "https://download.pytorch.org/whl/cpu`)") from _e

_grad_of = operator.attrgetter("grad")
_requires_grad = operator.attrgetter("requires_grad")
_is = operator.is_
# Reading .grad of a Parameter first looks up its type's __torch_function__ (about 100 ns of
# the 250 a read costs here); with subclass torch functions off the read is the tensor's own
# slot, which is what the binding check wants to see.
_plain_reads = torch._C.DisableTorchFunctionSubclass

# torch wraps a subclass's step() in a profiler range and its step hooks (about 15 us a call
# here, more right after a backward pass).  When no hook is registered and no profiler runs,
# step() skips the wrapper; otherwise it goes through torch's own.  Whether any global hook is
# registered is read from torch's registries: if a later torch moves them, every step takes
# torch's wrapper.
_torch_optimizer = importlib.import_module("torch.optim.optimizer")
_GLOBAL_HOOKS = tuple(getattr(_torch_optimizer, name, None) for name in
                      ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"))
# (if a later torch has no such test, a profiler is taken to be always on)
_profiling: Callable[[], bool] = getattr(getattr(torch._C, "_autograd", None),
                                         "_profiler_enabled", None) or (lambda: True)
_CAN_SKIP_WRAPPER = all(isinstance(h, dict) for h in _GLOBAL_HOOKS)


# Which live optimizer each parameter's storage belongs to: a second optimizer built over the
# same parameters moves them into its own arena, and the first one's steps would no longer
# reach the model; it is told, and refuses to step.
# (keyed by id: tensors compare elementwise, so they cannot be dict keys by value; each entry
# keeps a weak reference to its tensor, to tell a reused id from the same tensor)
_OWNER: Dict[int, Any] = {}

# How many parameters each step() and zero_grad() check for a replaced storage (p.data or
# p.grad.data swapped under the same tensor objects), in rotation: about 0.5 us each here, so
# a replaced storage is found within ceil(n / 16) calls; state_dict() checks them all.
_STORAGE_CHECKS_PER_STEP = 16


def _forget(key):
    """A weakref callback that drops _OWNER's entry for a tensor that is gone."""
    def callback(ref):
        entry = _OWNER.get(key)
        if entry is not None and entry[0] is ref:
            del _OWNER[key]
    return callback


def _bound(params, grads):
    """Whether every params[k].grad is grads[k] (one identity test a parameter)."""
    with _plain_reads():
        return all(map(_is, map(_grad_of, params), grads))


class Optimizer(torch.optim.Optimizer):
    """Base class of fastopt.torch's optimizers: a torch.optim.Optimizer whose parameters and
    gradients live in a fastopt arena (see the module docstring).  Use SGD, Adam, AdamW, ..."""

    _core_class: Any = None
    _collecting = False             # state_dict() is running: `state` gives copies
    __signature__: inspect.Signature

    def __init__(self, params: Any, *args: Any, skip_nonfinite: bool = False,
                 **kwargs: Any) -> None:
        if self._core_class is None:
            raise TypeError("fastopt.torch.Optimizer is a base class: use SGD, Adam, AdamW, ...")
        groups = _parse(params)
        flat = [(t, label) for g in groups for t, label in zip(g["params"], g["labels"])]
        _check_tensors(flat)
        core_groups = []
        for g in groups:
            arrays = [t.detach().numpy() for t in g["params"]]
            items = list(zip(g["names"], arrays)) if g["names"] is not None else arrays
            core_groups.append({"params": items, **g["options"]})
        # every argument and hyperparameter is checked here, before any parameter is touched
        core = self._core_class(core_groups, *args, skip_nonfinite=skip_nonfinite, **kwargs)
        torch_groups = []
        for g, cg in zip(groups, core.param_groups):
            tg = {k: v for k, v in cg.items() if k != "params"}
            tg["params"] = (list(zip(g["names"], g["params"])) if g["names"] is not None
                            else list(g["params"]))
            torch_groups.append(tg)
        self._constructing = True
        try:
            super().__init__(torch_groups, dict(core.defaults))
        finally:
            self._constructing = False
        # the core steps the groups torch's schedulers and user code edit: one dict a group
        core.param_groups = self.param_groups
        self._core = core
        self._params = [t for t, _ in flat]
        self._labels = [label for _, label in flat]
        self._bind()

    # ---- the binding ---------------------------------------------------------------------

    def _bind(self):
        """Move each parameter into the arena: p.data and p.grad become views of it.  A
        gradient already there is copied in; a parameter without one keeps None, as in torch,
        until zero_grad() binds the view (or step() copies in what backward made, or refuses
        if there is still none): a step before any backward is not a step on zero gradients."""
        layout = self._core.layout
        grads = []
        with torch.no_grad():
            for k, p in enumerate(self._params):
                old = p.grad
                g = torch.from_numpy(layout.grads[k])
                p.data = torch.from_numpy(layout.params[k])
                if old is not None:
                    g.copy_(old)
                    p.grad = g
                grads.append(g)
                tensor, previous = _OWNER.get(id(p), (None, None))
                owner = previous() if tensor is not None and tensor() is p else None
                if owner is not None:
                    owner._superseded = self._labels[k]
                _OWNER[id(p)] = (weakref.ref(p, _forget(id(p))), weakref.ref(self))
        self._grads = grads
        self._superseded = None
        self._addresses = [(p.data_ptr(), g.data_ptr()) for p, g in zip(self._params, grads)]
        self._next_check = 0

    def _check_storage(self, what, ks):
        """Refuse if another optimizer took the parameters, or if parameter k's storage (or
        its bound gradient's) is no longer the arena's, for k in ks."""
        if self._superseded is not None:
            raise RuntimeError(
                f"{type(self).__name__}.{what}(): another fastopt.torch optimizer was built over "
                f"{self._superseded} (and moved it into its own arena), so this one no longer "
                "reaches the model; use the new optimizer")
        params, grads, addresses = self._params, self._grads, self._addresses
        for k in ks:
            if (params[k].data_ptr(), grads[k].data_ptr()) != addresses[k]:
                raise RuntimeError(
                    f"{type(self).__name__}.{what}(): {self._labels[k]} no longer lives in the "
                    "arena: its storage or its gradient's was replaced (p.data = ..., "
                    "vector_to_parameters, module.to(memory_format=...), share_memory(), a "
                    "parametrization's right_inverse, ...), so a step would no longer reach "
                    "the model; nothing was changed.  Build a new optimizer over the model as "
                    "it is now (load this one's state_dict() into it)")

    def _rotating(self):
        """The next _STORAGE_CHECKS_PER_STEP parameter indices, in rotation."""
        n, k0 = len(self._params), self._next_check
        m = min(n, _STORAGE_CHECKS_PER_STEP)
        self._next_check = (k0 + m) % n if n else 0
        return [(k0 + i) % n for i in range(m)]

    def _unbound(self, what, copy):
        """The indices of the gradients that are no longer the arena's views, each checked to
        be one the arena can take (copied in before a step: copy=True; zero_grad takes any),
        before anything is changed."""
        ks, missing, bad = [], [], []
        for k, (p, g) in enumerate(zip(self._params, self._grads)):
            now = p.grad
            if now is g:
                continue
            ks.append(k)
            if not _float32_grads(p):
                bad.append(f"{self._labels[k]} has grad_dtype {p.grad_dtype}: its gradient "
                           "is bound to the float32 gradient arena")
            elif now is None:
                missing.append(self._labels[k])
            elif copy and not (isinstance(now, torch.Tensor) and now.shape == p.shape and
                               now.dtype == torch.float32 and now.device.type == "cpu" and
                               now.layout == torch.strided):
                bad.append(f"{self._labels[k]} has a gradient of "
                           f"{_describe(now)}, the parameter is {_describe(p)}")
        if copy and missing:
            raise ValueError(
                f"{what}(): the gradient of {_some(missing)} is None.  torch.optim would skip "
                "such a parameter; fastopt steps every parameter of a group together and will "
                "not step one with the arena's old gradient, so nothing was changed.  Zero "
                "the gradients with this optimizer's zero_grad() (which keeps them bound, as "
                "zeros) rather than model.zero_grad() or set_to_none, or leave parameters "
                "that get no gradient out of the optimizer")
        if bad:
            raise ValueError(f"{what}(): {_some(bad)}; nothing was changed")
        return ks

    def _rebind(self, ks, copy):
        """Bind the arena's views again as the gradients of parameters `ks` (from _unbound),
        copying the gradients they had in first (copy=True)."""
        with torch.no_grad():
            sources = {}
            if copy:        # a gradient that is a view of the arena is read before any write
                arena = self._core.flat_grads
                lo = arena.ctypes.data
                hi = lo + arena.nbytes
                for k in ks:
                    src = self._params[k].grad
                    sources[k] = src.clone() if lo <= src.data_ptr() < hi else src
            for k in ks:
                p, g = self._params[k], self._grads[k]
                if copy:
                    g.copy_(sources[k])
                p.grad = g

    def _frozen(self, what):
        frozen = [label for p, label in zip(self._params, self._labels) if not p.requires_grad]
        raise ValueError(
            f"{type(self).__name__}.{what}(): {_some(frozen)} no longer requires grad.  torch.optim "
            "would skip it (its .grad stays None); fastopt steps every parameter of a group "
            "together and would move it with a zero gradient (weight decay, momentum), so "
            "nothing was changed.  Build the optimizer over the parameters that train, or set "
            "the group's lr and weight_decay to 0 to hold a group still")

    # ---- torch.optim.Optimizer's surface ---------------------------------------------------

    def _step(self, closure: Optional[Callable[[], Any]] = None, *, zero_grad: bool = False,
             grad_multiplier: float = 1.0, max_grad_norm: Optional[float] = None,
             norm_type: float = 2.0) -> Any:
        """One fused update of every parameter; `closure` (as in torch) recomputes the loss,
        which is returned.  The keywords are fastopt's (`fastopt.Optimizer.step`): zero_grad=
        True zeroes the gradients in the same pass, grad_multiplier scales them first,
        max_grad_norm clips by their global norm_type-norm.  With skip_nonfinite, a NaN or
        infinite gradient skips the update (`skipped_steps` counts it)."""
        core = self._core
        core.hold("step")
        try:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            checked = core.check_step(zero_grad, grad_multiplier, max_grad_norm, norm_type)
            self._check_storage("step", self._rotating())
            if not _bound(self._params, self._grads):
                self._rebind(self._unbound("step", copy=True), copy=True)
            core.apply_step(*checked)
        finally:
            core.release()
        return loss

    # torch's wrapper around _step, for when hooks or a profiler want it
    _hooked_step = torch.optim.Optimizer.profile_hook_step(_step)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if type(self).step is not Optimizer.step:
            # a subclass's own step(), which torch wrapped (hooks and profiler range): calling
            # super().step() from it must not run them a second time
            return self._step(*args, **kwargs)
        if _CAN_SKIP_WRAPPER and not (self._optimizer_step_pre_hooks or
                                      self._optimizer_step_post_hooks or _GLOBAL_HOOKS[0]
                                      or _GLOBAL_HOOKS[1] or _profiling()):
            return self._step(*args, **kwargs)
        return self._hooked_step(*args, **kwargs)

    step.__doc__ = _step.__doc__
    step.__signature__ = inspect.signature(_step)  # type: ignore[attr-defined]
    step.hooked = True      # type: ignore[attr-defined]   # torch: do not wrap it again

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient: one fill of the gradient arena.  The gradients stay bound as
        views of the arena whatever `set_to_none` says (None would unbind them); any that were
        replaced or set to None are bound again."""
        if _profiling():
            with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
                self._zero_grad()
        else:
            self._zero_grad()

    def _zero_grad(self):
        core = self._core
        with core.exclusive("zero_grad"):
            self._check_storage("zero_grad", self._rotating())
            if not all(map(_requires_grad, self._params)):
                self._frozen("zero_grad")
            ks = ([] if _bound(self._params, self._grads)
                  else self._unbound("zero_grad", copy=False))
            core.zero_grad()
            self._rebind(ks, copy=False)

    @property
    def state(self) -> Dict[Any, Dict[str, Any]]:
        """{param tensor: {'step': float32 tensor, buffer: live tensor view}}, like torch's;
        each parameter's entry is read-only (the state lives in the arena: assigning into it
        would change nothing, so it raises)."""
        out: Dict[Any, Any] = defaultdict(dict)
        scalars = self._scalar_keys()
        copies = self._collecting
        for k, entry in self._core.state.items():
            e = {key: (torch.tensor(float(v), dtype=torch.float32) if key in scalars
                       else _tensor(v.copy() if copies else v))
                 for key, v in entry.items()}
            out[self._params[k]] = e if copies else types.MappingProxyType(e)
        return out

    @state.setter
    def state(self, value: Any) -> None:
        if not getattr(self, "_constructing", False):
            raise AttributeError("the state lives in the arena: use load_state_dict()")

    def _scalar_keys(self):
        """The state keys that are numbers, not buffers: 'step' and the family's counters
        (torch keeps them as 0-dim float32 tensors)."""
        return ("step",) + tuple(self._core.family.counter_defaults)

    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's state_dict() (its hooks run), with copies of the state: a snapshot
        that later steps do not change (torch's holds live tensors, its 'step' among them; here
        'step' is a number kept outside the tensors, so live buffers beside it would fall out
        of step with it)."""
        with self._core.exclusive("state_dict"):
            self._check_storage("state_dict", range(len(self._params)))
            self._collecting = True
            try:
                return super().state_dict()
            finally:
                self._collecting = False

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load `state_dict()`'s output, or torch.optim's namesake's (torch's step tensors and
        buffers; floating buffers are cast to float32 as torch casts them to the param's
        dtype).  torch's load_state_dict pre- and post-hooks run as in torch.  Everything is
        checked before anything is written: on any problem a TypeError or ValueError, and
        nothing has changed."""
        core = self._core
        with core.exclusive("load_state_dict"):
            state_dict = state_dict.copy()      # shallow, as torch
            for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
                result = pre_hook(self, state_dict)
                if result is not None:
                    state_dict = result
            plan = core.check_state_dict(_as_numpy(state_dict, self._scalar_keys(),
                                                    core.family.has_step, self.defaults))
            names = [g.get("param_names") for g in self.param_groups]
            core.apply_state(plan)
            for g, n in zip(self.param_groups, names):
                if n is not None and "param_names" not in g:
                    g["param_names"] = n        # as torch: a state dict without names keeps ours
            for post_hook in self._optimizer_load_state_dict_post_hooks.values():
                post_hook(self)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if getattr(self, "_constructing", False):
            super().add_param_group(param_group)
            return
        raise RuntimeError(f"{type(self).__name__}.add_param_group: the arena is laid out "
                           "once, at construction, and cannot grow; give every param group to "
                           "the constructor (a group may start with lr=0)")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"a fastopt.torch.{type(self).__name__} cannot be pickled or copied (its "
                        "parameters live in its arena): save and load its state_dict()")

    # ---- fastopt's extras ------------------------------------------------------------------

    @property
    def core(self) -> Any:
        """The fastopt optimizer (fastopt.optim) that holds the arena and steps it."""
        return self._core

    @property
    def skip_nonfinite(self) -> bool:
        return bool(self._core.skip_nonfinite)

    @skip_nonfinite.setter
    def skip_nonfinite(self, value: bool) -> None:
        self._core.skip_nonfinite = value

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by skip_nonfinite."""
        return int(self._core.skipped_steps)

    @property
    def last_grad_norm(self) -> Optional[float]:
        """The gradient norm the last step computed (max_grad_norm or skip_nonfinite)."""
        return self._core.last_grad_norm

    @property
    def step_counts(self) -> List[int]:
        """Steps taken by each param group."""
        return list(self._core.step_counts)

    @property
    def state_nbytes(self) -> int:
        """Bytes of optimizer state held."""
        return int(self._core.state_nbytes)


# ---- parsing torch's `params` ----------------------------------------------------------------

def _parse(params):
    """torch's `params` -> [{'params': tensors, 'names': names or None, 'labels': for
    messages, 'options': the group's other keys}], as torch.optim reads it."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of Tensors, (name, Tensor) pairs or dicts, "
                        f"got a single {torch.typename(params)}; wrap it in a list")
    if isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
        raise TypeError("params must be an iterable of Tensors, (name, Tensor) pairs or dicts, "
                        f"got {type(params).__name__}")
    raw = list(params)
    if not raw:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(raw[0], dict):
        raw = [{"params": raw}]
    groups = []
    for i, g in enumerate(raw):
        where = f"param_groups[{i}]"
        if not isinstance(g, dict):
            raise TypeError(f"{where} must be a dict (params mixes dicts with other items)")
        if "params" not in g:
            raise ValueError(f"{where} has no 'params' entry")
        items = g["params"]
        if isinstance(items, torch.Tensor):
            items = [items]
        elif isinstance(items, set):
            raise TypeError(f"{where}.params is a set, whose order changes between runs: "
                            "use a list")
        else:
            items = list(items)
        if not items:
            raise ValueError(f"{where}.params is an empty parameter list")
        tensors, names = [], []
        for x in items:
            if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str):
                names.append(x[0])
                tensors.append(x[1])
            else:
                tensors.append(x)
        if names and len(names) != len(tensors):
            raise ValueError(f"{where}.params mixes named and unnamed parameters")
        labels = [f"{where}.params[{j}]" + (f" ({names[j]!r})" if names else "")
                  for j in range(len(tensors))]
        options = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        groups.append({"params": tensors, "names": names or None, "labels": labels,
                       "options": options})
    named = {g["names"] is not None for g in groups}
    if len(named) > 1:
        raise ValueError("all param groups must be given with names ((name, Tensor) pairs, as "
                         "named_parameters() yields) or all without")
    return groups


def _check_tensors(flat):
    """Every parameter is a leaf CPU float32 dense tensor that requires grad, each once, and
    any gradient it has already is one the arena can take."""
    seen = {}
    for t, label in flat:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} is a {type(t).__name__}: an optimizer optimizes Tensors")
        if id(t) in seen:
            raise ValueError(f"{label} is the same tensor as {seen[id(t)]}: each parameter may "
                             "appear once")
        seen[id(t)] = label
        if not t.is_leaf:
            raise ValueError(f"{label}: can't optimize a non-leaf Tensor")
        if isinstance(t, torch.nn.parameter.UninitializedParameter):
            raise ValueError(f"{label} is an uninitialized parameter (a lazy module's): run a "
                             "forward pass first, so that it has a shape, then build the "
                             "optimizer")
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.layout != torch.strided:
            raise TypeError(f"{label} is {_describe(t)}: fastopt.torch steps dense CPU "
                            "float32 parameters only")
        if not t.requires_grad:
            raise ValueError(f"{label} does not require grad, so it never gets a gradient; "
                             "torch.optim would skip it on every step, fastopt steps every "
                             "parameter of a group: leave it out of the optimizer")
        if t.is_conj() or t.is_neg():
            raise TypeError(f"{label} is a lazily conjugated or negated view: pass a "
                            "materialized tensor")
        if not _float32_grads(t):
            raise TypeError(f"{label} has grad_dtype {t.grad_dtype}: its gradient is bound to "
                            "the float32 gradient arena; set its grad_dtype to torch.float32 "
                            "(or None) first")
        g = t.grad
        if g is not None and not (isinstance(g, torch.Tensor) and g.shape == t.shape and
                                  g.device.type == "cpu" and g.layout == torch.strided and
                                  g.dtype.is_floating_point):
            raise TypeError(f"{label} already has a gradient of {_describe(g)}, which the "
                            f"gradient arena cannot take (the parameter is {_describe(t)})")


def _float32_grads(t):
    """Whether a float32 tensor can be t's .grad: recent torch lets a leaf take gradients of
    another dtype (Tensor.grad_dtype, leaves only), and binding the arena's float32 view as its
    .grad would then fail half-way through a binding, with some parameters already bound."""
    grad_dtype = getattr(t, "grad_dtype", None) if t.is_leaf else None
    return grad_dtype is None or grad_dtype == torch.float32


def _describe(t):
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" + (
        "" if t.layout == torch.strided else f" ({t.layout})")


def _some(items, shown=3):
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more} more" if more > 0 else "")


def _as_numpy(state_dict, scalars, has_step, defaults):
    """A torch-format state dict -> fastopt's (NumPy arrays; the `scalars`, 'step' and the
    family's counters, as numbers), for fastopt's check; anything it cannot read is passed on
    for the check to name."""
    state = state_dict.get("state") if hasattr(state_dict, "get") else None
    groups = state_dict.get("param_groups") if hasattr(state_dict, "get") else None
    if not isinstance(state, dict) or not isinstance(groups, (list, tuple)):
        return state_dict
    new_groups = []
    for g in groups:
        if isinstance(g, dict):
            # as torch's __setstate__: flags a state dict from an older torch lacks take the
            # class's defaults; 0-dim tensor hyperparameters (a tensor lr) become numbers
            g = {key: _number(v) for key, v in g.items()}
            for key, value in defaults.items():
                if key not in g and (value is None or isinstance(value, bool)):
                    g[key] = value
        new_groups.append(g)
    out = {}
    for pid, entry in state.items():
        if isinstance(entry, dict):
            # a buffer torch stored as None (SGD's momentum_buffer with momentum 0) is absent
            entry = {key: _value(v, key in scalars) for key, v in entry.items()
                     if v is not None}
            step = entry.get("step")
            if has_step and type(step) in (int, float) and step == 0:
                raise ValueError(
                    f"state_dict['state'][{pid!r}]['step'] is 0: a state from before the first "
                    "step (torch's Adagrad creates one in its constructor); fastopt creates a "
                    "parameter's state on its first step, so it loads states saved after one")
        out[pid] = entry
    return {**state_dict, "state": out, "param_groups": new_groups}


def _number(v):
    """A 0-dim tensor as a Python number, a tuple of them (betas) as a tuple; else v."""
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        return v.item()
    if isinstance(v, tuple) and any(isinstance(x, torch.Tensor) for x in v):
        return tuple(_number(x) for x in v)
    return v


def _tensor(a):
    """A state array as a torch tensor sharing its memory: bfloat16 state (uint16 bits, or an
    ml_dtypes view) as torch.bfloat16, the same bits."""
    bits = as_bf16_bits(a)
    if bits.dtype == np.uint16:
        return torch.from_numpy(bits).view(torch.bfloat16)
    return torch.from_numpy(a)


def _value(v, scalar):
    if not isinstance(v, torch.Tensor):
        return v
    v = v.detach()
    if scalar and v.dim() == 0:             # 'step', NAdam's mu_product: numbers
        return v.item()
    if v.dtype == torch.bfloat16:           # bfloat16 state: its bits, as fastopt keeps them
        return v.cpu().view(torch.int16).numpy().view(np.uint16)
    if v.is_floating_point():
        v = v.to(device="cpu", dtype=torch.float32)
    return v.cpu().numpy()


# ---- the classes ------------------------------------------------------------------------------

def _bridge_class(name):
    core_class = getattr(_optim, name)
    sig = core_class.__signature__
    doc = (f"torch.optim.{name}'s interface over a fastopt arena (fastopt.optim.{name}: its "
           "math and departures from torch follow).  See fastopt.torch for how the parameters "
           "are bound.\n\n" + (core_class.__doc__ or ""))
    cls = type(name, (Optimizer,), {"__doc__": doc, "__module__": __name__,
                                    "__qualname__": name, "_core_class": core_class,
                                    "__signature__": sig})

    def __init__(self, params, *args, **kwargs):
        Optimizer.__init__(self, params, *args, **kwargs)
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined,unused-ignore]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + list(sig.parameters.values()))
    __init__.__qualname__ = f"{name}.__init__"
    cls.__init__ = __init__
    return cls


globals().update({name: _bridge_class(name) for name in OPTIMIZERS})
__all__ = ["Optimizer", *OPTIMIZERS]
