"""The check of a torch-shaped state dict against an optimizer, before anything is loaded.

`check(spec, arena, groups, sd)` reads everything (structure, group sizes, hyperparameters,
state keys, shapes, dtypes, step counts and counters) and returns what to install; on any
problem it raises a TypeError or ValueError that says what, having changed nothing.
"""
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fastopt import _validate as V
from fastopt._family import check_group_keys, torch_group_keys
from fastopt._formats import (ABSMAX_SUFFIX, BFLOAT16, FMT_F32, LAYOUT_KEYS, STATE_DEFAULTS,
                              as_bf16_bits, counts_steps, format_name)


@dataclass
class GroupState:
    """What a state dict holds for one group: its hyperparameters (without 'params'), their
    kernel fields, the step count, the counters and each buffer's arrays (one a param)."""
    hparams: dict
    fields: dict
    step: int
    counters: dict
    buffers: dict


def check(spec, arena, groups, sd, layout=None):
    """-> [GroupState], one a param group of the optimizer (`groups`: its param_groups);
    `layout` (a StateLayout over the whole arena) says in which form each param's state is
    held (float32, bfloat16 or int8 codes with their absmax: fastopt._formats).
    GroupState.buffers: name -> [{member: array}], one a param."""
    fam = spec.family
    if not isinstance(sd, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
    for key in ("state", "param_groups"):
        if key not in sd:
            raise ValueError(f"state_dict has no {key!r} entry")
    saved_groups, saved_state = sd["param_groups"], sd["state"]
    if not isinstance(saved_groups, (list, tuple)):
        raise TypeError("state_dict['param_groups'] must be a list of dicts")
    if len(saved_groups) != len(groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer "
                         f"has {len(groups)}")
    if not isinstance(saved_state, Mapping):
        raise TypeError("state_dict['state'] must be a dict")

    keys = spec.group_keys()
    hparams, fields, owner, k = [], [], {}, 0
    for i, saved in enumerate(saved_groups):
        where = f"state_dict['param_groups'][{i}]"
        if not isinstance(saved, Mapping):
            raise TypeError(f"{where} must be a dict")
        ids = saved.get("params")
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"{where} has no 'params' list")
        if len(ids) != arena.counts[i]:
            raise ValueError(f"{where} has {len(ids)} params, this optimizer's group has "
                             f"{arena.counts[i]}")
        for j, pid in enumerate(ids):
            if isinstance(pid, bool) or not isinstance(pid, numbers.Integral):
                raise TypeError(f"{where}['params'] must hold int ids, got {pid!r}")
            if pid in owner:
                raise ValueError(f"{where}: param id {pid} appears twice")
            owner[pid] = (i, j, k + j)
        k += len(ids)
        # a state dict from torch, or from before the state options, holds float32 state
        saved = {**STATE_DEFAULTS, **saved}
        missing = [key for key in keys if key not in saved]
        if missing:
            raise ValueError(f"{where} is missing {missing}")
        check_group_keys(saved, keys, where)        # as the constructor: other keys are kept
        new = {key: value for key, value in saved.items() if key != "params"}
        new.update(torch_group_keys(spec))
        for key, value in spec.fixed.items():
            if new[key] != value:
                raise ValueError(f"{where}.{key} must be {value!r} for {spec.name}")
        fields.append(spec.fields_of(new, where + "."))
        for key in LAYOUT_KEYS:
            if fields[-1][key] != groups[i][key]:
                raise ValueError(
                    f"{where}.{key} is {fields[-1][key]!r}, this optimizer's group has "
                    f"{groups[i][key]!r}: the state's format is fixed when an optimizer is "
                    f"built; build it with {key}={fields[-1][key]!r} to load this state")
        hparams.append(new)

    per_group = [dict() for _ in groups]      # j -> (pid, entry)
    for pid, entry in saved_state.items():
        if pid not in owner:
            raise ValueError(f"state_dict['state'] has an entry for param id {pid!r}, which "
                             "no param group lists")
        if not isinstance(entry, Mapping):
            raise TypeError(f"state_dict['state'][{pid!r}] must be a dict")
        i, j, _ = owner[pid]
        per_group[i][j] = (pid, entry)

    out = []
    for i, entries in enumerate(per_group):
        # a family without a step count (SGD) records one where stochastic rounding needs it
        keeps_step = fam.has_step or counts_steps(fields[i])
        scalars = (("step",) if keeps_step else ()) + tuple(fam.counter_defaults)
        n = arena.counts[i]
        if not entries:
            out.append(GroupState(hparams[i], fields[i], 0, dict(fam.counter_defaults), {}))
            continue
        if len(entries) != n:
            absent = next(j for j in range(n) if j not in entries)
            raise ValueError(f"state_dict['state'] has state for some params of group {i} "
                             f"but not for its param {absent}: a group steps as one unit")
        keys0 = None
        seen = {name: set() for name in scalars}
        buffers = {}
        for j in range(n):
            pid, entry = entries[j]
            where = f"state_dict['state'][{pid!r}]"
            kidx = owner[pid][2]
            entry_keys = set(entry) - set(scalars)
            if "step" in entry and not keeps_step:
                raise ValueError(f"{where} has a 'step', which {spec.name} does not keep "
                                 "(but with bfloat16 state rounded stochastically)")
            absmax = {key for key in entry_keys if key.endswith(ABSMAX_SUFFIX)
                      and key[:-len(ABSMAX_SUFFIX)] in fam.buffer_names}
            entry_keys -= absmax
            unknown = entry_keys - set(fam.buffer_names)
            if unknown:
                raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
            if keys0 is None:
                keys0 = entry_keys
            elif entry_keys != keys0:
                raise ValueError(f"{where} has keys {sorted(entry_keys)}, other params of its "
                                 f"group have {sorted(keys0)}")
            for name in scalars:
                if name not in entry:
                    raise ValueError(f"{where} has no {name!r}")
                label = f"{where}[{name!r}]"
                seen[name].add(_step(label, entry[name]) if name == "step"
                               else _counter(label, entry[name]))
            shape = arena.shapes[kidx]
            for key in entry_keys:
                members = {}
                fmt = FMT_F32 if layout is None else layout.formats[kidx]
                want = ([(key, np.dtype(np.float32), shape)] if layout is None
                        else layout.members(kidx, key))
                held = "int8" if key + ABSMAX_SUFFIX in absmax else _held(entry[key])
                if held != format_name(fmt):
                    raise ValueError(
                        f"{where}[{key!r}] holds {held} state, this optimizer keeps "
                        f"{format_name(fmt)} state for this param (its group's state_dtype "
                        f"is {groups[owner[pid][0]]['state_dtype']!r}"
                        + (", and a param smaller than min_8bit_size keeps float32)"
                           if fmt == FMT_F32 and groups[owner[pid][0]]['state_dtype'] == "int8"
                           else ")"))
                for member, dtype, mshape in want:
                    label = f"{where}[{member!r}]"
                    a = entry.get(member)
                    if a is None:
                        raise ValueError(f"{where} has no {member!r} beside {key!r}")
                    if dtype == np.float32:
                        V.float32_array(label, a)
                    else:
                        if not isinstance(a, np.ndarray):
                            raise TypeError(f"{label} must be a NumPy array, got "
                                            f"{type(a).__name__}")
                        a = as_bf16_bits(a)
                        if a.dtype != dtype:
                            raise ValueError(f"{label} has dtype {a.dtype}, expected {dtype}")
                    if a.shape != tuple(mshape):
                        raise ValueError(
                            f"{label} has shape {a.shape}, the param has shape {shape}"
                            if member == key and fmt == FMT_F32 else
                            f"{label} has shape {a.shape}, expected {tuple(mshape)} "
                            f"({format_name(fmt)} state of a param of shape {shape})")
                    if member != key and not np.all((a >= 0) | np.isnan(a)):
                        raise ValueError(f"{label} must hold absmax values >= 0 (NaN or +inf "
                                         "where a block went non-finite)")
                    members[member] = a
                buffers.setdefault(key, []).append(members)
            stray = absmax - {k + ABSMAX_SUFFIX for k in entry_keys}
            if stray:
                raise ValueError(f"{where} has {sorted(stray)} without its codes")
        optional = {b.name for b in fam.buffers if b.optional}
        missing = set(fam.required(fields[i])) - optional - keys0
        if missing:
            raise ValueError(f"state_dict['state'] lacks {sorted(missing)} for group {i}, "
                             "which its hyperparameters need")
        for name, values in seen.items():
            if len(values) > 1:
                what = "step counts" if name == "step" else f"values of {name!r}"
                raise ValueError(f"state_dict['state'] has different {what} "
                                 f"{sorted(values)} within group {i}; a group steps as one unit")
        step = seen["step"].pop() if keeps_step else 1
        counters = {name: seen[name].pop() for name in fam.counter_defaults}
        out.append(GroupState(hparams[i], fields[i], step, counters, buffers))
    return out


def _held(a):
    """The state format an array holds, by its dtype (what the messages name)."""
    dtype = getattr(a, "dtype", None)
    if dtype == np.uint16 or (BFLOAT16 is not None and dtype == BFLOAT16):
        return "bfloat16"
    if dtype == np.uint8:
        return "int8"
    return "float32"


def _step(where, x):
    if isinstance(x, np.ndarray) and x.shape == ():
        x = x[()]
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{where} must be an int, got {type(x).__name__}")
    if not isinstance(x, numbers.Integral) and not (math.isfinite(x) and float(x).is_integer()):
        raise ValueError(f"{where} must be a whole number from 1 to 2**63 - 1, got {x!r}")
    x = int(x)
    if not 1 <= x <= V.MAX_STEPS:
        raise ValueError(f"{where} must be a whole number from 1 to 2**63 - 1, got {x}")
    return x


def _counter(where, x):
    if isinstance(x, np.ndarray) and x.shape == ():
        x = x[()]
    return V.real(where, x)
