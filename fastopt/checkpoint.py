"""Checkpoints: an optimizer (params, state, hyperparameters, step counts) and optionally its
LR scheduler, in one NumPy .npz file, written atomically and read without pickle.

Layout of the file (format version 1), every member a plain NumPy array:
    format_version      int64 scalar
    meta                a JSON document (unicode array): the optimizer's class, its
                        param_groups (hyperparameters, params as indices), per-param shapes
                        and names, step counts, which state buffers each param has, the
                        skip counter, and the scheduler's state_dict
    param/<i>           float32, parameter i in its shape
    state/<i>/<key>     float32, state buffer <key> of parameter i

Writing goes to a temporary file in the same folder, which is flushed, fsynced and renamed
over the target, so a crash mid-save leaves the previous checkpoint whole.  Reading checks
every member's CRC, the structure, the shapes, the dtypes and the version, and only then
changes the live optimizer (and scheduler); any problem is a ValueError naming it, and leaves
both exactly as they were.  Nothing is ever unpickled.
"""
import json
import math
import os
import tempfile
import zipfile
import zlib

import numpy as np

FORMAT_VERSION = 1


def save(path, optimizer, scheduler=None):
    """Write `optimizer` (and `scheduler`) to `path` (.npz), atomically."""
    path = os.fspath(path)
    sd = optimizer.state_dict()
    meta = {
        "class": _kind(optimizer),
        "param_groups": sd["param_groups"],
        "shapes": [list(s) for s in optimizer.layout.shapes],
        "names": optimizer.layout.names,
        "steps": optimizer.step_counts,
        "state_keys": {str(k): sorted(key for key, x in v.items() if isinstance(x, np.ndarray))
                       for k, v in sd["state"].items()},
        "counters": {str(k): {key: x for key, x in v.items()
                              if key != "step" and not isinstance(x, np.ndarray)}
                     for k, v in sd["state"].items()},
        "skipped_steps": optimizer.skipped_steps,
        "scheduler": None if scheduler is None else {
            "class": type(scheduler).__name__, "state": scheduler.state_dict()},
    }
    try:
        text = json.dumps(meta, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: cannot store the hyperparameters or scheduler state as "
                         f"JSON ({e})") from None
    arrays = {"format_version": np.array(FORMAT_VERSION, np.int64), "meta": np.array(text)}
    for i, p in enumerate(optimizer.layout.params):
        arrays[f"param/{i}"] = p
    for i, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, np.ndarray):
                arrays[f"state/{i}/{key}"] = value

    if not getattr(optimizer, "writes_checkpoints", True):
        return      # a sharded optimizer's other ranks: rank 0 writes what all gathered
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastopt-", suffix=".npz.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def load(path, optimizer, scheduler=None):
    """Restore `optimizer` (and `scheduler`) from a checkpoint written by `save`.

    Everything is read and checked first; on any problem a ValueError says what, and neither
    the optimizer nor the scheduler has changed.
    """
    path = os.fspath(path)
    arrays = _read_members(path)
    where = f"checkpoint {path!r}"
    version = arrays.get("format_version")
    if version is None or version.shape != () or version.dtype.kind not in "iu":
        raise ValueError(f"{where}: no format_version; not a fastopt checkpoint")
    if int(version) != FORMAT_VERSION:
        raise ValueError(f"{where}: format version {int(version)}, this fastopt reads "
                         f"{FORMAT_VERSION}")
    meta = _read_meta(arrays, where)
    if meta.get("class") != _kind(optimizer):
        raise ValueError(f"{where} holds a {meta.get('class')!r} optimizer, not a "
                         f"{_kind(optimizer)}")

    layout = optimizer.layout
    shapes = [tuple(s) for s in layout.shapes]
    saved_shapes = meta.get("shapes")
    if not isinstance(saved_shapes, list) or [tuple(s) for s in saved_shapes
                                               if isinstance(s, list)] != shapes:
        raise ValueError(f"{where}: parameter shapes {saved_shapes} do not match the "
                         f"optimizer's {[list(s) for s in shapes]}")
    if meta.get("names") != layout.names:
        raise ValueError(f"{where}: parameter names {meta.get('names')} do not match the "
                         f"optimizer's {layout.names}")
    params = []
    for i, shape in enumerate(shapes):
        a = _member(arrays, f"param/{i}", where)
        if a.shape != shape:
            raise ValueError(f"{where}: param/{i} has shape {a.shape}, expected {shape}")
        params.append(a)

    steps = meta.get("steps")
    if not isinstance(steps, list) or len(steps) != len(optimizer.param_groups) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 2 ** 63 - 1
            for s in steps):
        raise ValueError(f"{where}: bad step counts {steps!r}")
    state_keys = meta.get("state_keys")
    if not isinstance(state_keys, dict):
        raise ValueError(f"{where}: no state_keys table")
    counters = meta.get("counters", {})
    if not isinstance(counters, dict):
        raise ValueError(f"{where}: bad counters table")
    state = {}
    owner = _group_of_each_param(meta.get("param_groups"), where)
    for k, keys in state_keys.items():
        if not (isinstance(k, str) and k.isdigit() and int(k) < len(shapes)) or not (
                isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
            raise ValueError(f"{where}: bad state_keys entry {k!r}: {keys!r}")
        i = int(k)
        entry = {key: _member(arrays, f"state/{i}/{key}", where) for key in keys}
        if optimizer.family.has_step:
            entry["step"] = steps[owner.get(i, 0)]
        extra = counters.get(k, {})
        if not isinstance(extra, dict) or set(extra) & set(entry):
            raise ValueError(f"{where}: bad counters entry {k!r}: {extra!r}")
        entry.update(extra)
        state[i] = entry
    expected = {"format_version", "meta"} | {f"param/{i}" for i in range(len(shapes))} | {
        f"state/{i}/{key}" for i, keys in state_keys.items() for key in keys}
    unexpected = sorted(set(arrays) - expected)
    if unexpected:
        raise ValueError(f"{where}: unexpected members {unexpected[:5]}")
    skipped = meta.get("skipped_steps", 0)
    if not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 0:
        raise ValueError(f"{where}: bad skipped_steps {skipped!r}")

    # The optimizer's own checks of structure, hyperparameters, keys, shapes and dtypes.
    try:
        new_state = optimizer.check_state_dict(
            {"state": state, "param_groups": meta.get("param_groups")})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    for i, gs in enumerate(new_state):
        if gs.buffers and optimizer.family.has_step and gs.step != steps[i]:
            raise ValueError(f"{where}: step counts disagree for group {i}")

    sched_meta = meta.get("scheduler")
    if (scheduler is None) != (sched_meta is None):
        raise ValueError(f"{where}: " + ("holds no scheduler state" if scheduler is not None
                                         else "holds scheduler state; pass the scheduler"))
    if scheduler is not None:
        if not isinstance(sched_meta, dict) or sched_meta.get("class") != type(scheduler).__name__:
            raise ValueError(f"{where}: holds a {sched_meta!r} scheduler, not a "
                             f"{type(scheduler).__name__}")
        _check_scheduler_state(scheduler, sched_meta.get("state"), where)

    # Everything is checked: now change the live objects.
    for view, a in zip(layout.params, params):
        view[...] = a
    optimizer.apply_state(new_state, steps)
    optimizer.skipped_steps = skipped
    if scheduler is not None:
        scheduler.load_state_dict(sched_meta["state"])


def _kind(optimizer):
    """The optimizer's class name in the file (its declaration's, so a sharded AdamW is stored
    as an AdamW, and a checkpoint moves between sharded, replicated and single-process runs)."""
    return optimizer.spec.name


# ---- reading, with every failure turned into a ValueError that says what -----------------

def _read_members(path):
    where = f"checkpoint {path!r}"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()          # reads every member and checks its CRC
        if bad is not None:
            raise ValueError(f"{where}: member {bad!r} is corrupted (CRC mismatch)")
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: unreadable ({e})") from None
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError,
            UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not a valid .npz checkpoint, truncated or corrupted "
                         f"({type(e).__name__}: {e})") from None


def _read_meta(arrays, where):
    m = arrays.get("meta")
    if m is None or m.shape != () or m.dtype.kind != "U":
        raise ValueError(f"{where}: no meta document")
    try:
        meta = json.loads(str(m[()]), parse_constant=_refuse_constant)
    except ValueError as e:
        raise ValueError(f"{where}: meta is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: meta is not a JSON object")
    return meta


def _member(arrays, name, where):
    a = arrays.get(name)
    if a is None:
        raise ValueError(f"{where}: missing member {name!r}")
    if a.dtype != np.float32:
        raise ValueError(f"{where}: {name} has dtype {a.dtype}, expected float32")
    return a


def _group_of_each_param(groups, where):
    owner = {}
    if not isinstance(groups, list):
        raise ValueError(f"{where}: no param_groups list")
    for gi, g in enumerate(groups):
        ids = g.get("params") if isinstance(g, dict) else None
        if not isinstance(ids, list):
            raise ValueError(f"{where}: param_groups[{gi}] has no params list")
        for pid in ids:
            if isinstance(pid, int):
                owner[pid] = gi
    return owner


def _check_scheduler_state(scheduler, state, where):
    """Load the state into a shallow stand-in of the scheduler: its checks run, the real
    scheduler is untouched."""
    probe = object.__new__(type(scheduler))
    probe.__dict__.update({k: (list(v) if isinstance(v, list) else v)
                           for k, v in scheduler.__dict__.items()})
    try:
        probe.load_state_dict(state)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{where}: bad scheduler state ({e})") from None


def _refuse_constant(name):
    raise ValueError(f"non-finite number {name}")


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        x = float(x)
        if math.isfinite(x):
            return x
    if isinstance(x, (np.bool_,)):
        return bool(x)
    raise TypeError(f"{type(x).__name__} {x!r} is not JSON-serializable")


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

