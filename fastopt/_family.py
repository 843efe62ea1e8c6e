"""What an optimizer family is: the one declaration that every other part reads.

A `Family` names the kernel's hyperparameters (the fields of its C struct, with their NumPy
types, defaults and checks), its state buffers (in the order the kernel takes them, with
their initial values and the options that need them), the per-group counters kept beside
the step count, and the values derived per step.  An `OptimizerSpec` is one public class on a
family: torch's name, signature and defaults, and how a param group's keys map to the
kernel's fields.  From these two, fastopt builds the Cython binding's records, the classes,
`fastopt.functional`, `fastopt.reference`, the argument checks, the state-dict keys, the
checkpoint contents and the test tables.  Pure Python and NumPy: no compiled code here.
"""
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from fastopt import _validate as V
from fastopt._formats import STATE_DEFAULTS, check_option

# ---- hyperparameter checks: each takes (name, value) and returns the value normalized ----


def real(*, lo=None, lo_open=False, hi=None, hi_open=False):
    """A finite real number in the given bounds."""
    low = -float("inf") if lo is None else lo
    high = float("inf") if hi is None else hi

    def check(name, x):
        # the common case inline (a float in bounds; x - x is 0 unless x is inf or NaN), else
        # the full check with its messages
        if type(x) is float and x - x == 0.0 and (x > low if lo_open else x >= low) and \
                (x < high if hi_open else x <= high):
            return x
        return V.real(name, x, lo=lo, lo_open=lo_open, hi=hi, hi_open=hi_open)
    check.bounds = (lo, lo_open, hi, hi_open)
    return check


NONNEG = real(lo=0.0)
POSITIVE = real(lo=0.0, lo_open=True)
UNIT = real(lo=0.0, hi=1.0)                 # [0, 1]
UNIT_OPEN = real(lo=0.0, hi=1.0, hi_open=True)   # [0, 1)


flag = V.flag


@dataclass(frozen=True)
class Field:
    """One field of the kernel's hyperparameter struct (C: double or int32_t)."""
    name: str
    default: Any
    check: Callable
    ctype: str = "f8"           # "f8" (double) or "i4" (int32_t: flags)

    @classmethod
    def flag(cls, name, default=False):
        return cls(name, default, flag, "i4")


@dataclass(frozen=True)
class Buffer:
    """A state buffer, parallel to the params.  `init(fields)` is its value when it starts
    (zero unless given); the family's `needs` says when it is used.  `optional`: a loaded
    state may lack it even where the hyperparameters use it; it then starts on the next step
    (SGD's momentum buffer, as torch).  `signed`: it takes both signs (False: never
    negative, like a second moment), which chooses int8 state's map (signed or unsigned)."""
    name: str
    init: Optional[Callable] = None
    optional: bool = False
    when: str = ""       # the options that use it, for messages ("amsgrad=True")
    signed: bool = True

    def initial(self, fields):
        return 0.0 if self.init is None else float(self.init(fields))


@dataclass(frozen=True)
class Family:
    """An optimizer family: one C kernel (csrc/families/<name>.c), one NumPy twin
    (fastopt.reference.<name>), one functional entry point (fastopt.functional.<name>_).

    fields     the kernel's hyperparameters in C struct order, user-given ones first; the
               functional API takes the user-given ones as keywords with these defaults
    buffers    the state buffers in the order the kernel takes them
    needs      fields -> names of the buffers these hyperparameters use (a subset, in order)
    check      fields, prefix -> None: checks across fields (raises ValueError)
    derived    names of fields the caller never gives: `per_step` computes them each step
    per_step   (fields, step, fresh, counters) -> {derived field: value}; `fresh` is the set
               of buffers that start on this step, `counters` the group's counters before it
    counters   per-group scalars kept in the state beside 'step' (name -> initial value); a
               derived field of the same name is the counter's value after the step
    has_step   whether the state records 'step' (torch's SGD does not)
    exact_state  fields -> why these hyperparameters need float32 state (a str), or None:
               a group with another state_dtype is refused with that reason
    torch      how torch.optim has this family (its classes are the OptimizerSpecs' names):
               "fused" (a fused CPU kernel, which this one matches bitwise but for torch's
               per-tensor scalar tail), "single" (only the for-loop and foreach
               implementations, matched within a stated ulp bound), or None (torch has none)
    """
    name: str
    fields: tuple
    buffers: tuple
    needs: Callable
    check: Optional[Callable] = None
    derived: tuple = ()
    per_step: Optional[Callable] = None
    counters: tuple = ()
    has_step: bool = True
    torch: Optional[str] = None
    exact_state: Optional[Callable] = None

    def __post_init__(self):
        names = [f.name for f in self.fields]
        assert len(set(names)) == len(names), self.name
        assert all(d in names for d in self.derived), self.name
        object.__setattr__(self, "dtype", np.dtype(
            {"names": names, "formats": [f.ctype for f in self.fields]}, align=True))
        object.__setattr__(self, "user_fields",
                           tuple(f for f in self.fields if f.name not in self.derived))
        object.__setattr__(self, "buffer_names", tuple(b.name for b in self.buffers))
        object.__setattr__(self, "counter_defaults", dict(self.counters))
        object.__setattr__(self, "signed_mask",
                           sum(1 << k for k, b in enumerate(self.buffers) if b.signed))

    def check_fields(self, values, prefix="", names=None):
        """Check the user-given fields (a mapping by field name) -> dict of normalized values.
        `names` maps a field to the name its messages use (a param group's key)."""
        out = {}
        for f in self.user_fields:
            name = prefix + (names.get(f.name, f.name) if names else f.name)
            x = out[f.name] = f.check(name, values[f.name])
            if f.ctype == "f8" and not -V.FLOAT32_MAX <= x <= V.FLOAT32_MAX:
                raise ValueError(f"{name} must be within float32's range (|x| <= "
                                 f"{V.FLOAT32_MAX:.8g}): the kernels compute in float32; "
                                 f"got {x!r}")
        if self.check is not None:
            self.check(out, prefix)
        return out

    def derive(self, fields, step, fresh, counters):
        """The derived fields for the step being taken."""
        return self.per_step(fields, step, fresh, counters) if self.per_step else {}

    def required(self, fields):
        return tuple(self.needs(fields))


@dataclass(frozen=True)
class OptimizerSpec:
    """A public optimizer class on a family, as torch names it.

    signature  the constructor's parameters after `params`, in torch's order; "*" starts the
               keyword-only ones.  Each is a group key (see keys), or a torch-only option:
               'foreach' and 'fused' are accepted and ignored (every step is fused),
               'capturable' and 'differentiable' must be false.
    defaults   torch's defaults for every name in the signature
    keys       group key -> kernel field(s) it sets, where not the field of the same name: a
               tuple of two fields for a pair (betas), a field name for a rename
    extra      group keys that set no kernel field (checked Fields: Adagrad's
               initial_accumulator_value, which initial values read)
    fixed      group keys set by the class, not by the caller (AdamW's decoupling)
    """
    name: str
    family: Family
    signature: tuple
    defaults: dict
    keys: dict = field(default_factory=dict)
    extra: tuple = ()
    fixed: dict = field(default_factory=dict)
    doc: str = ""

    def group_keys(self):
        """Every key of a param group (besides 'params'), in signature order."""
        sig = [k for k in self.signature if k != "*" and k not in TORCH_ONLY]
        return (tuple(sig) + tuple(k for k in self.fixed if k not in sig)
                + tuple(STATE_DEFAULTS))

    def fields_of(self, group, prefix=""):
        """A param group's hyperparameters -> the kernel's user-given fields, checked; every
        message names the group key (prefix + key)."""
        fam = self.family
        values, names = {}, {}
        missing = [key for key in self.group_keys() if key not in group]
        if missing:
            raise ValueError(f"{prefix.rstrip('.') or 'the group'} has no {missing[0]!r} (every "
                             f"param group holds {list(self.group_keys())})")
        options = {}
        for key in self.group_keys():
            if key in STATE_DEFAULTS:
                options[key] = check_option(key, group[key], prefix + key)
                continue
            target = self.keys.get(key, key)
            if isinstance(target, tuple):
                pair = V.pair(group[key], prefix + key)
                for j, (fname, x) in enumerate(zip(target, pair)):
                    values[fname] = x
                    names[fname] = f"{key}[{j}]"
            elif any(e.name == key for e in self.extra):
                e = next(e for e in self.extra if e.name == key)
                values[key] = e.check(prefix + key, group[key])
            else:
                values[target] = group[key]
                names[target] = key
        fields = fam.check_fields(values, prefix, names)
        for e in self.extra:
            fields[e.name] = values[e.name]
        fields.update(options)
        why = fam.exact_state(fields) if fam.exact_state is not None else None
        if why and options["state_dtype"] != "float32":
            raise ValueError(f"{prefix}state_dtype is {options['state_dtype']!r}, but {why}: "
                             "use state_dtype='float32' for it")
        return fields


TORCH_ONLY = ("foreach", "fused", "capturable", "differentiable")

# What fastopt's groups say for torch's options, in state_dict() too, so that torch loading
# it stays on the path fastopt is on: fused (every step is one fused pass), no foreach, not
# capturable, not differentiable.  Only the ones torch's class has appear (its signature).
TORCH_VALUES = {"foreach": None, "fused": True, "capturable": False, "differentiable": False}


def torch_group_keys(spec):
    """{torch-only key: fastopt's value} for the keys of spec's torch signature."""
    return {k: TORCH_VALUES[k] for k in spec.signature if k in TORCH_VALUES}


def check_group_keys(group, known, where):
    """Keys of a param group beyond its hyperparameters are the caller's (a 'name', say) and
    are kept, as torch keeps them; but a key one edit away from a hyperparameter ('lrr',
    'weight_decya', 'Betas') is refused as the typo it almost surely is.  torch's own options
    are checked (capturable and differentiable must be false)."""
    check_torch_only(group)
    targets = tuple(known) + TORCH_ONLY
    for key in group:
        if key == "params" or key in targets:
            continue
        if not isinstance(key, str):
            raise TypeError(f"{where} has a key {key!r} that is not a string")
        near = [t for t in targets if _one_edit(key.lower(), t)]
        if near:
            raise ValueError(f"{where} has the key {key!r}, one edit away from {near[0]!r}: "
                             f"a typo? (hyperparameters: {sorted(known)})")


def _one_edit(a, b):
    """Whether a and b differ by at most one insertion, deletion, substitution or swap of
    neighbours."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        return a[i + 1:] == b[i + 1:] or (a[i + 2:] == b[i + 2:]
                                          and a[i:i + 2] == b[i:i + 2][::-1])
    return a[i + 1:] == b[i:] if len(a) > len(b) else a[i:] == b[i + 1:]


def check_torch_only(options):
    if options.get("capturable"):
        raise ValueError("capturable=True is a CUDA-graph option of torch; fastopt runs on "
                         "the CPU and does not support it")
    if options.get("differentiable"):
        raise ValueError("differentiable=True (autograd through the step) is not supported")


_F32 = struct.Struct("f")


def f32(x):
    """x rounded to float32, as a Python float (torch's float32 scalar-tensor arithmetic);
    struct's round trip is NumPy's float32 conversion at a third of the cost."""
    return _F32.unpack(_F32.pack(x))[0]
