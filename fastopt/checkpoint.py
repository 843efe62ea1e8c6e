"""Checkpoints: an optimizer (params, state, hyperparameters, step counts) and optionally its
LR scheduler, in one NumPy .npz file, written atomically and read without pickle.

Layout of the file (format version 1), every member a plain NumPy array, stored (not
compressed), so `np.load` reads it:
    format_version      int64 scalar
    meta                a JSON document (unicode array): the optimizer's class, its
                        param_groups (hyperparameters, params as indices), per-param shapes
                        and names, step counts, which state buffers each param has, the
                        skip counter, and the scheduler's state_dict
    param/<i>           float32, parameter i in its shape
    state/<i>/<key>     state buffer <key> of parameter i, as state_dict() holds it: float32
                        in the param's shape; bfloat16 state as uint16 bit patterns in the
                        param's shape; int8 state as uint8 codes (blocks, 256) beside
    state/<i>/<key>_absmax   float32 (blocks,), each block's absmax
                        (the group's state_dtype in meta says which; fastopt._formats)

Saving streams every member from the optimizer's live arenas into the file, 16 MiB at a time
(no copy of the params or the state is made; a ZeRO run gathers one state buffer at a time on
rank 0, which writes).  It writes to a temporary file `.<name>.fastopt-<pid>-<random>.tmp` in
the target's folder, which is flushed, fsynced and renamed over the target, so a crash
mid-save leaves the previous checkpoint whole.  A save that was killed leaves its temporary
behind; the next save to the same target removes every temporary of that target whose writer
is gone: its pid is not a live process on this machine, and its lock (the writer holds an
flock on it from creation until the rename) can be taken.  Each alone has a gap: a pid may be
reused, and a file is created a moment before it is locked.  (O_TMPFILE and linkat would leave
nothing behind, but linkat cannot replace an existing checkpoint, so a named temporary and a
rename are needed anyway, and O_TMPFILE is Linux-only and not on every filesystem.)

Loading goes over the open file three times, holding at most 8 MiB of it at once:
  1. check: the zip's directory (each expected member exactly once and nothing else, stored or
     deflated, not encrypted, its declared size the one its shape gives), the format version,
     the meta document (at most 1 MiB + 1 KiB a param and a group, in characters), every
     structure check, the hyperparameters, the scheduler's state, and each member's .npy
     header (the dtype and shape its param's state format gives, C order), all before any
     array data is read;
  2. verify: every member is read through once and its CRC checked (nothing is kept);
  3. copy: the data is streamed into the params and the state arenas (a ZeRO rank fills its
     shard of the state).
Any problem in 1 or 2 is a ValueError naming it, and neither the optimizer nor the scheduler
has changed.  Step 3 reads from the same open file what step 2 verified; only an I/O error or
an overwrite in place between the two (a save renames a new file, which does not) could fail
it, leaving the optimizer part-loaded.  Nothing is ever unpickled.

Memory, beyond the optimizer's own arenas (params, grads, state): save, a 16 MiB chunk (ZeRO:
one full state buffer on rank 0, nothing on the other ranks); load, an 8 MiB chunk (an
optimizer that has not stepped allocates its state arenas, as its first step would).
bench/checkpoint_memory.py measures it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import tempfile
import zipfile
import zlib
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from fastopt._formats import ABSMAX_SUFFIX, QBLOCK, as_bf16_bits, counts_steps

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the pid alone decides
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1
_CHUNK = 8 << 20            # bytes read at a time when loading
_HEADER_BYTES = 1 << 16     # a .npy header is at most this long (NumPy's own limit is 10000)
_META_CHARS = 1 << 20       # meta: this many characters, plus _META_CHARS_EACH a param and group
_META_CHARS_EACH = 1 << 10


if TYPE_CHECKING:
    from fastopt._optimizer import Optimizer
    from fastopt.lr_scheduler import LRScheduler

PathLike = Union[str, "os.PathLike[str]"]


def _meta_limit(optimizer: Optimizer[Any]) -> int:
    """The most characters the meta document of `optimizer`'s checkpoint may have."""
    return _META_CHARS + _META_CHARS_EACH * (len(optimizer.layout.shapes)
                                             + len(optimizer.param_groups))


def save(path: PathLike, optimizer: Optimizer[Any],
         scheduler: Optional[LRScheduler] = None) -> None:
    """Write `optimizer` (and `scheduler`) to `path` (.npz), atomically.  The optimizer is
    held meanwhile (Optimizer.exclusive): a step from another thread is refused, so the file
    holds one step's params and state."""
    with optimizer.exclusive("save"):
        _save(os.fspath(path), optimizer, scheduler)


def _save(path, optimizer, scheduler):
    outline = optimizer.state_outline()
    meta = {
        "class": _kind(optimizer),
        "param_groups": outline["param_groups"],
        "shapes": [list(s) for s in optimizer.layout.shapes],
        "names": optimizer.layout.names,
        "steps": optimizer.step_counts,
        "state_keys": {str(k): sorted(key for key, x in v.items() if isinstance(x, np.ndarray))
                       for k, v in outline["state"].items()},
        "counters": {str(k): {key: x for key, x in v.items()
                              if key != "step" and not isinstance(x, np.ndarray)}
                     for k, v in outline["state"].items()},
        "skipped_steps": optimizer.skipped_steps,
        "scheduler": None if scheduler is None else {
            "class": type(scheduler).__name__, "state": scheduler.state_dict()},
    }
    try:
        text = json.dumps(meta, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint: cannot store the hyperparameters or scheduler state as "
                         f"JSON ({e})") from None
    limit = _meta_limit(optimizer)
    if len(text) > limit:           # what load would refuse: refused before anything is written
        raise ValueError(f"checkpoint: the hyperparameters and scheduler state take "
                         f"{len(text)} characters of JSON, more than the {limit} a checkpoint "
                         "of this optimizer may hold (keys of your own in the param groups "
                         "must stay small)")
    buffers = optimizer.state_buffers()
    try:
        # a sharded optimizer's other ranks only take part in the gathers
        if getattr(optimizer, "writes_checkpoints", True):
            _write(path, optimizer.layout, outline["state"], text, buffers)
    finally:
        for _ in buffers:     # every gather, also after a failure here: no rank is left waiting
            pass


def _write(path, layout, state, text, buffers):
    folder, name = os.path.split(os.path.abspath(path))
    _remove_stale_temporaries(folder, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.fastopt-{os.getpid()}-", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)     # held until the rename: see above
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                _put(z, "format_version", np.array(FORMAT_VERSION, np.int64))
                _put(z, "meta", np.array(text))
                for i, p in enumerate(layout.params):
                    _put(z, f"param/{i}", p)
                for key, members in buffers:
                    for i, entry in state.items():
                        if key in entry:
                            for member, a in members(i).items():
                                _put(z, f"state/{i}/{member}", as_bf16_bits(a))
                    del members     # before the next buffer is gathered
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)   # pragma: no cover - where an open file cannot be renamed
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def _put(z, name, a):
    with z.open(name + ".npy", "w", force_zip64=True) as out:
        np.lib.format.write_array(out, a, allow_pickle=False)


def _remove_stale_temporaries(folder, name):
    """Remove the temporaries of saves to `name` whose writers are gone (see the module's
    docstring); a temporary a live writer holds is left alone."""
    prefix = f".{name}.fastopt-"
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for entry in names:
        # a pid has at most 10 digits (Linux's limit is 2**22): a longer one is not ours
        m = re.fullmatch(r"(\d{1,10})-[a-z0-9_]+\.tmp", entry[len(prefix):]) \
            if entry.startswith(prefix) else None
        if m is None or _alive(int(m.group(1))):
            continue
        stale = os.path.join(folder, entry)
        try:
            # O_NONBLOCK: a FIFO of that name must not block the save; not a regular file: not ours
            fd = os.open(stale, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(stale)
        except OSError:
            pass                    # locked by a live writer, or already gone
        finally:
            os.close(fd)


def _alive(pid):
    if pid == os.getpid():
        return True                 # perhaps another thread's save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True                 # exists (another user's), or cannot tell: keep the file
    return True


def load(path: PathLike, optimizer: Optimizer[Any],
         scheduler: Optional[LRScheduler] = None) -> None:
    """Restore `optimizer` (and `scheduler`) from a checkpoint written by `save`.

    Everything is checked first, from the zip's directory and the arrays' headers, and every
    member's CRC is verified; on any problem a ValueError says what, and neither the optimizer
    nor the scheduler has changed.  Then the data is streamed into the arenas.
    """
    with optimizer.exclusive("load"):
        _load(os.fspath(path), optimizer, scheduler)


def _load(path, optimizer, scheduler):
    where = f"checkpoint {path!r}"
    layout = optimizer.layout
    shapes = [tuple(s) for s in layout.shapes]
    with _Reader(path, where) as r:
        if "format_version" not in r.members:
            raise ValueError(f"{where}: no format_version; not a fastopt checkpoint")
        version = r.small("format_version", 8)
        if version.shape != () or version.dtype.kind not in "iu":
            raise ValueError(f"{where}: no format_version; not a fastopt checkpoint")
        if int(version) != FORMAT_VERSION:
            raise ValueError(f"{where}: format version {int(version)}, this fastopt reads "
                             f"{FORMAT_VERSION}")
        meta = _read_meta(r, where, _meta_limit(optimizer))
        if meta.get("class") != _kind(optimizer):
            raise ValueError(f"{where} holds a {meta.get('class')!r} optimizer, not a "
                             f"{_kind(optimizer)}")

        saved_shapes = meta.get("shapes")
        if not isinstance(saved_shapes, list) or [tuple(s) for s in saved_shapes
                                                   if isinstance(s, list)] != shapes:
            raise ValueError(f"{where}: parameter shapes {saved_shapes} do not match the "
                             f"optimizer's {[list(s) for s in shapes]}")
        if meta.get("names") != layout.names:
            raise ValueError(f"{where}: parameter names {meta.get('names')} do not match the "
                             f"optimizer's {layout.names}")
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

        # The members this optimizer expects, and their shapes; the state stands in for its
        # arrays with stand-ins that hold no memory (of the dtype and shape each member's
        # header declares), for the optimizer's own checks, which name a state held in
        # another format than this optimizer's.
        expected = {f"param/{i}": (shape, np.dtype(np.float32))
                    for i, shape in enumerate(shapes)}
        state_layout = optimizer.state_layout
        state = {}
        owner = _group_of_each_param(meta.get("param_groups"), where)
        meta_groups = meta.get("param_groups")          # checked list of dicts by now
        for k, keys in state_keys.items():
            if not (isinstance(k, str) and k.isdigit() and int(k) < len(shapes)) or not (
                    isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
                raise ValueError(f"{where}: bad state_keys entry {k!r}: {keys!r}")
            i = int(k)
            entry = {}
            for key in keys:
                name = f"state/{i}/{key}"
                if name not in r.members:
                    raise ValueError(f"{where}: missing member {name!r}")
                # any format's member is at most 4 bytes an element of the param, padded
                got, _, dtype = r.header(name, 4 * (math.prod(shapes[i]) + 2 * QBLOCK))
                entry[key] = np.broadcast_to(np.zeros((), dtype), got)
                base = key[:-len(ABSMAX_SUFFIX)] if key.endswith(ABSMAX_SUFFIX) else key
                want = {m: (tuple(sh), dt) for m, dt, sh in state_layout.members(i, base)} \
                    if base in optimizer.family.buffer_names else {}
                expected[name] = want.get(key, (got, dtype))
            group = meta_groups[owner[i]] if i in owner else {}
            if optimizer.family.has_step or counts_steps(group):
                entry["step"] = steps[owner.get(i, 0)]
            extra = counters.get(k, {})
            if not isinstance(extra, dict) or set(extra) & set(entry):
                raise ValueError(f"{where}: bad counters entry {k!r}: {extra!r}")
            entry.update(extra)
            state[i] = entry
        missing = [name for name in expected if name not in r.members]
        if missing:
            raise ValueError(f"{where}: missing member {missing[0]!r}")
        unexpected = sorted(set(r.members) - set(expected) - {"format_version", "meta"})
        if unexpected:
            raise ValueError(f"{where}: unexpected members {unexpected[:5]}")
        # a state member held in another state format (float32, bfloat16 bits, int8 codes)
        # than this optimizer keeps is named by the optimizer's own check below; the rest,
        # any other dtype among them, now
        formats = {np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.uint8)}
        deferred = set()
        for name in expected:
            if name.startswith("state/"):
                have = state[int(name.split("/")[1])][name.split("/")[2]].dtype
                if have != expected[name][1] and have in formats:
                    deferred.add(name)
        for name, (shape, dtype) in expected.items():
            if name not in deferred:
                r.check_array(name, shape, dtype)
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
        for name in deferred:
            r.check_array(name, *expected[name])

        sched_meta = meta.get("scheduler")
        if (scheduler is None) != (sched_meta is None):
            raise ValueError(f"{where}: " + ("holds no scheduler state" if scheduler is not None
                                             else "holds scheduler state; pass the scheduler"))
        if scheduler is not None:
            if not isinstance(sched_meta, dict) or \
                    sched_meta.get("class") != type(scheduler).__name__:
                raise ValueError(f"{where}: holds a {sched_meta!r} scheduler, not a "
                                 f"{type(scheduler).__name__}")
            _check_scheduler_state(scheduler, sched_meta.get("state"), where)

        r.verify()

        # Everything is checked: now change the live objects, the state first (apply_state
        # allocates every buffer it needs before it writes any: a MemoryError leaves all as
        # it was).
        optimizer.apply_state(new_state, steps, fill=lambda key, k, out, start: r.read_into(
            f"state/{k}/{key}", out, start))
        for i, view in enumerate(layout.params):
            r.read_into(f"param/{i}", view.reshape(-1), 0)
        optimizer.skipped_steps = skipped
        if scheduler is not None:
            scheduler.load_state_dict(sched_meta["state"])


def _kind(optimizer):
    """The optimizer's class name in the file (its declaration's, so a sharded AdamW is stored
    as an AdamW, and a checkpoint moves between sharded, replicated and single-process runs)."""
    return optimizer.spec.name


# ---- reading, with every failure turned into a ValueError that says what -----------------

class _Reader:
    """A checkpoint's zip, open for reading: its members by name (without '.npy'), checked
    from the directory alone; reads that never hold more than _CHUNK bytes of a member."""

    def __init__(self, path, where):
        self.where = where
        self.offsets = {}       # member -> bytes of its .npy header (where its data starts)
        try:
            self.file = open(path, "rb")
        except FileNotFoundError:
            raise
        except OSError as e:
            raise ValueError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None
        try:
            if not stat.S_ISREG(os.fstat(self.file.fileno()).st_mode):
                raise ValueError(f"{where}: not a regular file")
            with self.errors():
                self.zip = zipfile.ZipFile(self.file)
            self.members = self._directory()
        except BaseException:
            self.file.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.close()
        self.file.close()

    @contextlib.contextmanager
    def errors(self):
        try:
            yield
        except zipfile.BadZipFile as e:
            # zipfile checks a member's CRC when a read reaches its end, which may be the
            # read-ahead of a small member's header
            crc = re.fullmatch(r"Bad CRC-32 for file (.*)", str(e))
            if crc is not None:
                raise ValueError(f"{self.where}: member {crc.group(1)} is corrupted (CRC "
                                 "mismatch)") from None
            raise ValueError(f"{self.where}: not a valid .npz checkpoint, truncated or "
                             f"corrupted (BadZipFile: {e})") from None
        except (zlib.error, EOFError, OSError, KeyError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.where}: not a valid .npz checkpoint, truncated or "
                             f"corrupted ({type(e).__name__}: {e})") from None

    def _directory(self):
        where, members, seen = self.where, {}, set()
        for info in self.zip.infolist():
            raw = info.filename
            if raw in seen:
                raise ValueError(f"{where}: member {raw!r} appears twice in the zip")
            seen.add(raw)
            if info.flag_bits & 0x1:
                raise ValueError(f"{where}: member {raw!r} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ValueError(f"{where}: member {raw!r} uses compression method "
                                 f"{info.compress_type}; a checkpoint's members are stored "
                                 "or deflated")
            name = raw[:-4] if raw.endswith(".npy") else raw
            if name in members:
                raise ValueError(f"{where}: member {name!r} appears twice in the zip")
            members[name] = info
        return members

    def header(self, name, most):
        """(shape, fortran_order, dtype) of member `name`'s .npy header, refused unless the
        zip declares at most `most` bytes of array data for it; nothing else is read."""
        where, info = self.where, self.members[name]
        if info.file_size > most + _HEADER_BYTES:
            raise ValueError(f"{where}: member {name} declares {info.file_size} bytes, but "
                             f"may hold at most {most} bytes of data (and a header)")
        with self.errors(), self.zip.open(info) as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f".npy format version {version}")
            except ValueError as e:
                raise ValueError(f"{where}: member {name} is not a readable .npy array "
                                 f"({e})") from None
            self.offsets[name] = f.tell()
        if dtype.hasobject:
            raise ValueError(f"{where}: {name} holds Python objects (a pickle), which are "
                             "never loaded")
        return shape, fortran, dtype

    def check_array(self, name, shape, dtype=np.dtype(np.float32)):
        """Member `name` must be a C-order array of `dtype` (float32 unless told; a state
        member may be uint16 or uint8) and `shape`, and the zip must declare exactly its header
        and data."""
        where = self.where
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        got, fortran, have = self.header(name, nbytes)
        if have != dtype or have.byteorder not in "=|<":
            raise ValueError(f"{where}: {name} has dtype {have}, expected {np.dtype(dtype)}")
        if got != shape:
            raise ValueError(f"{where}: {name} has shape {got}, expected {shape}")
        if fortran and len(shape) > 1:
            raise ValueError(f"{where}: {name} is in Fortran order; checkpoints are C order")
        size = self.members[name].file_size
        if size != self.offsets[name] + nbytes:
            raise ValueError(f"{where}: member {name} declares {size} bytes, its header and "
                             f"shape give {self.offsets[name] + nbytes}")

    def small(self, name, most):
        """Member `name` read whole, after its header says it is at most `most` bytes."""
        shape, _, dtype = self.header(name, most)
        if math.prod(shape) * dtype.itemsize > most:
            raise ValueError(f"{self.where}: member {name} holds {shape} of {dtype}, more "
                             f"than the {most} bytes it may have")
        with self.errors(), self.zip.open(self.members[name]) as f:
            return np.lib.format.read_array(f, allow_pickle=False)

    def verify(self):
        """Read every member through, checking its CRC; nothing is kept.  An int8 state's
        absmax member (float32, its header already checked) must hold values >= 0 or NaN, as
        load_state_dict requires."""
        for name, info in self.members.items():
            with self.errors(), self.zip.open(info) as f:
                if not name.endswith(ABSMAX_SUFFIX) or name not in self.offsets:
                    while f.read(_CHUNK):
                        pass
                    continue
                f.read(self.offsets[name])
                while True:
                    chunk = f.read(_CHUNK)          # a multiple of 4 bytes
                    if not chunk:
                        break
                    a = np.frombuffer(chunk, np.float32)
                    if not np.all((a >= 0) | np.isnan(a)):
                        raise ValueError(f"{self.where}: {name} must hold absmax values >= 0 "
                                         "(NaN or +inf where a block went non-finite)")

    def read_into(self, name, out, start):
        """Elements [start, start + out.size) of member `name`'s data into `out` (1-D,
        contiguous, of the member's dtype)."""
        buf = memoryview(out).cast("B")
        with self.errors(), self.zip.open(self.members[name]) as f:
            f.seek(self.offsets[name] + out.itemsize * start)
            pos = 0
            while pos < len(buf):
                # the first read is small: after a seek, zipfile joins what it had buffered to
                # the bytes it reads next, which copies that whole read once
                got = f.readinto(buf[pos:pos + (_CHUNK if pos else 1 << 16)])
                if not got:
                    raise EOFError(f"member {name} ended early")
                pos += got


def _read_meta(r, where, most_chars):
    if "meta" not in r.members:
        raise ValueError(f"{where}: no meta document")
    m = r.small("meta", 4 * most_chars)
    if m.shape != () or m.dtype.kind != "U":
        raise ValueError(f"{where}: no meta document")
    try:
        meta = json.loads(str(m[()]), parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError(f"{where}: meta is nested too deeply to be a checkpoint's") from None
    except ValueError as e:
        raise ValueError(f"{where}: meta is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: meta is not a JSON object")
    return meta


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
    """The scheduler's own checks of the state, which change nothing (a SequentialLR's or
    ChainedScheduler's schedulers included)."""
    try:
        scheduler.check_state_dict(state)
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

