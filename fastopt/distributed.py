"""Data-parallel and ZeRO-1 sharded optimizer steps over MPI (mpi4py), built on the arena.

The flat arena is what collectives want: one contiguous gradient buffer is one Allreduce (or
one Reduce_scatter) per step instead of one per tensor, and a contiguous share of the arena is
the natural unit for sharding optimizer state.

    from mpi4py import MPI                  # launched as: mpiexec -n 4 python train.py
    opt = DataParallel(fastopt.AdamW(params, lr=1e-3))
    ...each rank writes the gradients of its part of the batch into opt.grads...
    opt.step()                              # Allreduce bucket by bucket, each bucket
                                            # stepped by the fused kernel as its sum arrives

    opt = ZeroRedundancyOptimizer(params, optimizer_class=fastopt.AdamW, lr=1e-3)
    opt.step()                              # Reduce_scatter, a fused step on this rank's
                                            # shard (state for that shard only), Allgather

What is bit-identical to one process, and why: every rank holds identical params (broadcast
from rank 0 at construction) and adds the same reduced gradients, so the ranks never drift
apart.  Against a single process that steps with the average of the ranks' gradients, the
result is bit-identical when the reduction's order of additions is the single process's: with
2 ranks the sum is one addition, which is commutative, and the average's factor 1/2 is exact,
so `(g0 + g1) * 0.5` on one process and the 2-rank step agree bit for bit (the tests assert
this), with two exceptions: a halved gradient below float32's normal range (under 1.2e-38)
rounds once here where the single process rounds it twice, and the norm of an order other
than 1, 2 and inf (pow does not scale exactly) can differ in its last bits.  With more ranks
MPI may associate the sum differently, which changes the last bits.

mpi4py is imported only when a communicator is needed; it is not a dependency of fastopt's
core (install the `mpi` extra: mpi4py, and MPICH's wheel for machines without an MPI).
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import numbers
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Generic, List, Optional, Type, Union

import numpy as np

from fastopt import _validate as V
from fastopt._arena import ALIGN, StateBuffer, StateLayout, aligned_zeros
from fastopt._formats import FMT_INT8, QBLOCK
from fastopt._optimizer import BufferMembers
from fastopt._optimizer import Optimizer, product_overflows
from fastopt._typing import F32, Params, Views

if TYPE_CHECKING:
    import os

    from fastopt.lr_scheduler import LRScheduler

# `comm` is an mpi4py communicator (MPI.Comm); typed Any: mpi4py is an optional dependency.
Comm = Any


def _world(comm):
    if comm is not None:
        return comm
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError("fastopt.distributed needs mpi4py (pip install 'fastopt[mpi]', or "
                          "mpi4py and an MPI library)") from e
    return MPI.COMM_WORLD


def _mpi():
    from mpi4py import MPI
    return MPI


_abort_comm = None       # the communicator abort_on_uncaught_exception aborts


def abort_on_uncaught_exception(comm: Comm = None) -> None:
    """Make an exception that no code catches, on this rank, end the whole MPI job.

    Without it, a rank that dies of an exception leaves every other rank waiting forever in
    its next collective.  With it, the exception's traceback is printed as usual (by the
    previous sys.excepthook, or threading.excepthook for a thread), then MPI_Abort ends every
    process of `comm` (default MPI.COMM_WORLD) with exit status 1.  DataParallel and
    ZeroRedundancyOptimizer install it (abort_on_error=True, the default) on a communicator of
    more than one rank; installing it twice changes nothing.  A rank that leaves by
    sys.exit() or os._exit() is not an exception and is not covered (`python -m mpi4py
    train.py` aborts on those too)."""
    global _abort_comm
    comm = _world(comm)
    if comm.Get_size() == 1:
        return
    _abort_comm = comm
    if getattr(sys.excepthook, "fastopt_abort", False):
        return
    previous, previous_thread = sys.excepthook, threading.excepthook

    def excepthook(kind, value, tb):
        try:
            previous(kind, value, tb)
        finally:
            _abort(f"an uncaught {kind.__name__}")

    def thread_excepthook(args):
        try:
            previous_thread(args)
        finally:
            if args.exc_type is not SystemExit:
                name = args.thread.name if args.thread is not None else "a thread"
                _abort(f"an uncaught {args.exc_type.__name__} in thread {name!r}")

    excepthook.fastopt_abort = True            # type: ignore[attr-defined]
    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def _abort(why):
    comm = _abort_comm
    try:
        sys.stdout.flush()
        sys.stderr.write(f"fastopt.distributed: rank {comm.Get_rank()} of {comm.Get_size()} "
                         f"ended with {why}; MPI_Abort ends the job so that no rank waits "
                         "for it forever\n")
        sys.stderr.flush()
        # MPICH's launcher tears the job down on MPI_Abort and can drop output still on its
        # way from this rank (seen on a loaded machine): give it a moment to pass it on
        time.sleep(0.5)
    finally:
        _mpi().COMM_WORLD.Abort(1)         # the whole job, whatever communicator it was


def check_same_layout(comm: Comm, opt: Optimizer[Any], what: str, **options: Any) -> None:
    """One small collective (a second one only when they differ): every rank's arena layout,
    hyperparameters (every group's, and skip_nonfinite) and `options` must be rank 0's, or every
    rank raises the same ValueError naming the difference (no rank is left waiting in a later
    collective)."""
    groups = [[list(np.shape(p)) for p in g["params"]] for g in opt.param_groups]
    layout = repr((_kind(opt), opt.flat_params.size, groups, opt.layout.names))
    settings = {**hyperparameters(opt), "skip_nonfinite": opt.skip_nonfinite, **options}
    digest = hashlib.sha256((layout + repr(settings)).encode()).hexdigest()
    digests = comm.allgather(digest)
    if all(d == digests[0] for d in digests):
        return
    everyone = comm.allgather((layout, settings))     # every rank saw the same digests
    differ = [r for r, (lay, _) in enumerate(everyone) if lay != everyone[0][0]]
    if differ:
        raise ValueError(f"{what}: the arena layout (optimizer class, parameter shapes, "
                         f"groups) of rank(s) {differ} differs from rank 0's; every rank must "
                         "build the same model")
    raise ValueError(f"{what}: the ranks' settings differ: "
                     f"{_differences([s for _, s in everyone])}; every rank must build the "
                     "same optimizer, or the replicas drift apart")


def hyperparameters(opt: Optimizer[Any]) -> Dict[str, Any]:
    """{'param_groups[i].key': value} for every group key that steps, as plain Python values
    (a NumPy scalar and the float it holds are one value, a list and a tuple too)."""
    keys = opt.spec.group_keys()
    return {f"param_groups[{i}].{k}": _plain(g[k])
            for i, g in enumerate(opt.param_groups) for k in keys}


def _plain(v):
    t = type(v)
    if t is float or t is bool:                 # the common cases first: the ABC check is slow
        return v
    if t is list or t is tuple:
        return tuple(_plain(x) for x in v)
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return v


def _hashable(v):
    """A str (state_dtype, state_rounding) as an int of its bytes, whose hash() is the same in
    every process (a str's is salted per process)."""
    return int.from_bytes(v.encode(), "little") if type(v) is str else v


def _differences(settings):
    """'key is a on rank 0 but b on rank(s) [..]' for each key where a rank differs from 0."""
    out = []
    for key, ref in settings[0].items():
        others = {}
        for r, s in enumerate(settings[1:], 1):
            value = s.get(key)
            if value != ref:
                others.setdefault(repr(value), []).append(r)
        for value, ranks in others.items():
            out.append(f"{key} is {ref!r} on rank 0 but {value} on rank(s) {ranks}")
    return "; ".join(out) or "(no difference found in the values compared)"


class _StepCheck:
    """Every rank checks a step, and agrees that every other rank accepted it with the same
    settings, before any collective that changes the gradients or the params.

    Each rank runs the closure and its optimizer's `check_step` (the arguments, and the
    hyperparameters of the groups that changed), then one Allgather of two int64 per rank:
    whether the rank accepted the step, and a hash of what decides the update (every group's
    hyperparameters, skip_nonfinite, grad_multiplier, max_grad_norm and norm_type, the step
    counts).  Every rank sees the same gathered values, so every rank takes the same decision:
    all step, or all raise (a rank whose own check failed raises its error, the others a
    ValueError naming it; a difference is named key by key), before anything has changed.
    The Allgather runs on every step, not only on a step where a rank's hyperparameters
    changed: a rank that changed an lr alone would otherwise wait in a collective the others
    never call.  The hyperparameters' digest is recomputed only when `check_step` reports a
    changed group, so a constant step costs the Allgather and one tuple hash.

    The hashes are Python's hash() of tuples of floats, ints and bools (the values check_step
    accepted, as plain Python values; a str option as the int of its bytes), which is the same
    in every process, unlike a str's.
    Two different settings could share a hash only by a deliberate choice of values (floats
    congruent modulo 2**61 - 1); sha256 of their repr would rule that out, at about four times
    the cost on every step where an lr changes (11 us against 3 us, measured on a loaded
    machine, for one AdamW group).
    """

    def __init__(self, comm, opt, what):
        self.comm, self.opt, self.what = comm, opt, what
        self.size = comm.Get_size()
        self.keys = opt.spec.group_keys()
        self.digest = None          # of the hyperparameters this rank's optimizer accepted
        self._mine = np.zeros(2, np.int64)
        self._all = np.zeros((self.size, 2), np.int64)
        self.seconds = 0.0

    def __call__(self, closure, zero_grad, grad_multiplier, max_grad_norm, norm_type):
        """Take the optimizer's lock, run the closure and check the step (step()'s arguments)
        on every rank -> (loss, what apply_step takes), the lock held on every rank (the
        caller releases it); or raise on every rank alike, the lock released.  A rank whose
        optimizer another thread holds is a refusal like any other: every rank raises."""
        opt = self.opt
        if self.size == 1:
            opt.hold("step")
            try:
                loss = closure() if closure is not None else None
                t0 = time.perf_counter()
                checked = opt.check_step(zero_grad, grad_multiplier, max_grad_norm, norm_type)
                self.seconds = time.perf_counter() - t0
                return loss, checked
            except BaseException:
                opt.release()
                raise
        error, loss, held = None, None, False
        try:
            opt.hold("step")
            held = True
            if closure is not None:
                loss = closure()
            t0 = time.perf_counter()
            checked = opt.check_step(zero_grad, grad_multiplier, max_grad_norm, norm_type)
            _, m, max_norm, norm_type, changed = checked
            # what the kernel would refuse only after the gradients are reduced: now
            opt.check_scalars(m, changed)
            if changed is not None or self.digest is None:
                self.digest = hash(tuple(tuple(_hashable(_plain(g[k])) for k in self.keys)
                                         for g in opt.param_groups))
            code = hash((self.digest, opt.skip_nonfinite, m,
                         -1.0 if max_norm is None else max_norm,
                         0.0 if max_norm is None else norm_type, *opt.step_counts))
        except Exception as e:
            error, code, t0 = e, 0, time.perf_counter()
        except BaseException:
            if held:
                opt.release()
            raise
        mine, everyone = self._mine, self._all
        mine[0], mine[1] = error is not None, code
        self.comm.Allgather(mine, everyone)
        if error is not None or everyone.tobytes() != mine.tobytes() * self.size:
            self.digest = None                      # recomputed on the next step
            if held:
                opt.release()
            self._refuse(error, checked if error is None else None)
        self.seconds = time.perf_counter() - t0
        return loss, checked

    def _refuse(self, error, checked):
        """Raise on every rank (a collective: every rank calls it)."""
        failed = [r for r in range(self.size) if self._all[r, 0]]
        if failed:
            errors = self.comm.allgather(None if error is None else
                                         f"{type(error).__name__}: {error}")
            if error is not None:
                raise error
            told = "; ".join(f"rank {r}: {errors[r]}" for r in failed)
            raise ValueError(f"{self.what}.step: refused on another rank ({told}); no rank "
                             "has stepped")
        _, m, max_norm, norm_type, _ = checked
        settings = {**hyperparameters(self.opt), "skip_nonfinite": self.opt.skip_nonfinite,
                    "grad_multiplier": m, "max_grad_norm": max_norm,
                    "norm_type": None if max_norm is None else norm_type,
                    "step counts": self.opt.step_counts}
        everyone = self.comm.allgather(settings)
        raise ValueError(f"{self.what}.step: the ranks step with different settings: "
                         f"{_differences(everyone)}; every rank must step with the same "
                         "hyperparameters and arguments (nothing has stepped)")

    def forget(self):
        """After a step that failed past the check: recompute the digest on the next one."""
        self.digest = None


def _kind(opt):
    return opt.spec.name


def _agree(comm, error, what, why):
    """A collective: raise `error` on the rank that had it and a RuntimeError saying `why` on
    every other rank, if any rank had one; else return on every rank."""
    errors = comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        raise RuntimeError(f"{what}: {why} (" + "; ".join(f"rank {r}: {e}" for r, e in failed)
                           + ")")


# DataParallel's bucket: 2**18 elements (1 MiB of float32), chosen from bench/distributed.py's
# bucket sweep (the README has the numbers): on 2 ranks of one machine, buckets from 2**18 to
# 2**20 made a step of 1e7 params about 1.6x faster than one Allreduce of the whole arena
# (MPICH sums 1 MiB messages faster than one of 40 MB, and a bucket is stepped while in cache),
# within noise of each other; below 2**16 each collective's fixed cost shows.
DEFAULT_BUCKET_ELEMENTS = 1 << 18


def _bucket_arg(bucket_elements):
    if bucket_elements is None:
        return None
    if isinstance(bucket_elements, (bool, np.bool_)) or \
            not isinstance(bucket_elements, numbers.Integral) or bucket_elements < 1:
        raise ValueError(f"bucket_elements must be an int >= 1 or None, got {bucket_elements!r}")
    return int(bucket_elements)


def _granule(opt):
    """The unit a cut of `opt`'s arena keeps whole: a 64-byte line, or an int8 state block
    (QBLOCK elements, a multiple of a line) when some param keeps int8 state, so that no
    block is split between two buckets or shards (int8 params start on whole blocks)."""
    return QBLOCK if opt.state_layout.has_int8 else ALIGN


def _round(n, granule):
    return -(-n // granule) * granule


def _formats_have_int8(formats):
    return any(f == FMT_INT8 for f in formats)


def whole_dtype(kind):
    """The dtype of a storage kind's arena (float32, bfloat16 bits, int8 codes, absmax)."""
    return (np.float32, np.uint16, np.uint8, np.float32)[kind]


def _cut(lo, hi, bucket_elements, granule=ALIGN):
    """[lo, hi) in pieces of bucket_elements rounded up to whole granules (64-byte lines, or
    int8 blocks) (one piece for None)."""
    if bucket_elements is None or hi - lo <= bucket_elements:
        return [(lo, hi)]
    step = _round(bucket_elements, granule)
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)]


def _multiple_threads():
    """Whether MPI lets two threads call it at once (a communication thread needs it)."""
    MPI = _mpi()
    return MPI.Query_thread() >= MPI.THREAD_MULTIPLE


_BUCKET_COMMS: Dict[int, Any] = {}     # a communicator's handle -> (it, its bucket Dup)


def _bucket_comm(comm):
    """The communicator DataParallel's bucket collectives run on: a Dup of `comm`, made once
    per communicator (a collective: the first wrapper on `comm` makes it on every rank) and
    shared by the wrappers on it, so that building many wrappers does not use up MPI's
    communicators.  Its own communicator lets a communication thread be in a bucket's
    collective while the stepping thread runs the step check on `comm`."""
    key = comm.py2f()
    entry = _BUCKET_COMMS.get(key)
    if entry is None or entry[0] != comm:     # a freed handle taken again by another
        entry = _BUCKET_COMMS[key] = (comm, comm.Dup())
    return entry[1]


class _Pipeline:
    """DataParallel's buckets: the gradient arena cut into ranges, summed over the ranks in a
    fixed order (the last bucket first, the order in which a backward pass writes them), each
    stepped as soon as its sum is in.

    With MPI_THREAD_MULTIPLE (mpi4py asks for it) and more than one bucket, a communication
    thread runs the buckets' Allreduces one after the other while the stepping thread steps
    each bucket whose sum is in: bucket j+1 is summed while bucket j is stepped.  grad_ready
    hands a bucket to the thread earlier, during the caller's backward pass, once every
    parameter in it is ready and the buckets before it in the order have been handed over.
    Without the thread, the stepping thread sums each bucket (a blocking Allreduce) just
    before stepping it.  Every rank issues bucket j as its j-th collective on the bucket
    communicator of a step, whichever thread issues it, so the ranks always agree."""

    def __init__(self, comm, layout, grads, bucket_elements, threaded, granule=ALIGN):
        self.comm = comm
        self.grads = grads
        self.threaded = threaded
        self.buckets = _cut(0, grads.size, bucket_elements, granule)[::-1]
        starts = [lo for lo, _ in self.buckets][::-1]        # ascending, for bisect
        nb = len(self.buckets)
        self.of_param = []          # param k -> the buckets (in order) it overlaps
        waiting = [0] * nb
        for k, shape in enumerate(layout.shapes):
            lo, n = layout.offsets[k], int(np.prod(shape))
            if n == 0:
                self.of_param.append([])
                continue
            first = bisect.bisect_right(starts, lo) - 1          # ascending indices
            last = bisect.bisect_right(starts, lo + n - 1) - 1
            mine = [nb - 1 - a for a in range(first, last + 1)]  # in the order's indices
            self.of_param.append(mine)
            for j in mine:
                waiting[j] += 1
        self.waiting0 = waiting
        self.thread = None
        self.cond = threading.Condition()
        self.queue = []
        self.error = None
        self.comm_seconds = 0.0
        self.reset()

    def reset(self):
        """A new step: no parameter ready, nothing handed to the thread (which is idle)."""
        self.waiting = list(self.waiting0)
        self.ready = bytearray(len(self.of_param))
        self.launched = 0           # buckets handed to the thread: a prefix of the order
        self.completed = 0          # of them, summed

    def mark(self, k):
        """Parameter k's gradient is written: hand over every bucket that is now complete."""
        with self.cond:             # grad_ready may be called from several threads
            self.ready[k] = 1
            for j in self.of_param[k]:
                self.waiting[j] -= 1
            n = self.launched
            while n < len(self.buckets) and self.waiting[n] == 0:
                n += 1
            self._launch(n)

    def _launch(self, n):
        """Hand buckets [launched, n) to the communication thread (started on first use)."""
        with self.cond:
            if n <= self.launched:
                return
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="fastopt-allreduce",
                                               daemon=True)
                self.thread.start()
            self.queue.extend(range(self.launched, n))
            self.launched = n
            self.cond.notify_all()

    def stop(self):
        """End the communication thread once it is idle (the wrapper was collected)."""
        with self.cond:
            self.queue.append(None)
            self.cond.notify_all()

    def _serve(self):
        MPI = _mpi()
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                j = self.queue.pop(0)
            if j is None:
                return
            lo, hi = self.buckets[j]
            try:
                self.comm.Allreduce(MPI.IN_PLACE, self.grads[lo:hi], op=MPI.SUM)
            except BaseException as e:      # reported to the stepping thread, at its wait
                with self.cond:
                    self.error = e
                    self.cond.notify_all()
                return
            with self.cond:
                self.completed = j + 1
                self.cond.notify_all()

    def _wait(self, j):
        with self.cond:
            while self.completed <= j and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise RuntimeError("fastopt.distributed: a bucket's Allreduce failed in the "
                                   "communication thread") from self.error

    def drain(self):
        """Wait until every bucket handed to the thread is summed."""
        if self.launched:
            t0 = time.perf_counter()
            self._wait(self.launched - 1)
            self.comm_seconds += time.perf_counter() - t0

    def reconcile(self, comm):
        """After a refused step (a collective: every rank refused): hand over the buckets that
        another rank handed over and this one did not, and wait for them, so that every rank
        has issued the same bucket collectives before the caller goes on."""
        most = comm.allreduce(self.launched, op=_mpi().MAX)
        if most > self.launched:
            self._launch(most)
        self.drain()

    def ranges(self):
        """Each bucket's (lo, hi), yielded once its sum is in, in the fixed order; the time
        spent waiting for sums is added to comm_seconds."""
        MPI = _mpi()
        if self.launched < len(self.buckets) and (self.launched or self.threaded and
                                                  len(self.buckets) > 1):
            self._launch(len(self.buckets))         # the rest go to the thread, in order
        for j, (lo, hi) in enumerate(self.buckets):
            t0 = time.perf_counter()
            if j < self.launched:
                self._wait(j)
            else:
                self.comm.Allreduce(MPI.IN_PLACE, self.grads[lo:hi], op=MPI.SUM)
            self.comm_seconds += time.perf_counter() - t0
            yield lo, hi


class DataParallel(Generic[Views]):
    """Data-parallel training: an optimizer whose step averages the gradients of all ranks.

    DataParallel(opt, comm=None, bucket_elements=DEFAULT_BUCKET_ELEMENTS, abort_on_error=True):
    `comm` defaults to MPI.COMM_WORLD.  Construction checks that every rank has the same arena
    layout, hyperparameters, skip_nonfinite and bucket_elements, and broadcasts rank 0's
    params.  `step()` first checks its arguments and hyperparameters on every rank and agrees
    on them (one Allgather of 16 bytes per rank: see _StepCheck), so that a bad or differing
    value raises on every rank before the gradients are touched; then it sums the gradient
    arena across ranks in place, one Allreduce per bucket of `bucket_elements` (None: one for
    the whole arena; rounded up to 64-byte lines, or to int8 state blocks of 256 elements when
    a param keeps int8 state, so that no block is stepped in two pieces), and steps each bucket as soon as its sum is in, while it is still in
    cache, with the 1/size averaging folded into the fused step's grad_multiplier (no extra
    pass).  The result is bit-identical to one Allreduce and one step.  A step that clips or
    skips non-finite gradients sums every bucket first, then takes the norm and steps.

    `grad_ready(name_or_index)` says that one parameter's gradient is written: a bucket's
    Allreduce then starts, on a communication thread, as soon as every parameter in it is
    ready, so that a backward pass that writes gradients from the last layer to the first
    overlaps the reduction with its own work (torch's DistributedDataParallel does this with
    hooks).  Parameters not marked ready are reduced in `step()`.

    `last_step_seconds` splits the last step into {"check": ..., "comm": ..., "compute": ...,
    "wall": ...}: comm is the time spent in (or waiting for) Allreduce calls inside step(),
    compute the rest of the step after the check, wall the whole step.  Everything else
    (params, grads, param_groups, state_dict, ...) is the wrapped optimizer's.  With a
    communicator of size 1 no collective runs.  abort_on_error: see
    `abort_on_uncaught_exception`.
    """

    if TYPE_CHECKING:    # the wrapped optimizer's, found by __getattr__ at run time
        param_groups: List[Dict[str, Any]]
        skip_nonfinite: bool
        skipped_steps: int
        last_grad_norm: Optional[float]

        @property
        def params(self) -> Views: ...
        @property
        def grads(self) -> Views: ...
        @property
        def flat_params(self) -> F32: ...
        @property
        def flat_grads(self) -> F32: ...
        def state_dict(self) -> Dict[str, Any]: ...

    last_step_seconds: Dict[str, float]

    def __init__(self, opt: Optimizer[Views], comm: Comm = None,
                 bucket_elements: Optional[int] = DEFAULT_BUCKET_ELEMENTS,
                 abort_on_error: bool = True) -> None:
        if not isinstance(opt, Optimizer):
            raise TypeError(f"opt must be a fastopt optimizer, got {type(opt).__name__}")
        bucket_elements = _bucket_arg(bucket_elements)
        abort_on_error = V.flag("abort_on_error", abort_on_error)
        self.comm = comm = _world(comm)
        self.optimizer = opt
        self.bucket_elements = bucket_elements
        self._pipe = None
        self._marks = bytearray(len(opt.layout.shapes))     # grad_ready's, on one rank
        if comm.Get_size() > 1:
            if abort_on_error:          # before the first collective: no rank waits on one
                abort_on_uncaught_exception(comm)           # that died here
            check_same_layout(comm, opt, "DataParallel", bucket_elements=bucket_elements)
            comm.Bcast(opt.flat_params, root=0)
            self._pipe = pipe = _Pipeline(_bucket_comm(comm), opt.layout, opt.flat_grads,
                                          bucket_elements, _multiple_threads(),
                                          _granule(opt))
            weakref.finalize(self, pipe.stop)       # its thread ends with the wrapper
        self._check = _StepCheck(comm, opt, "DataParallel")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def grad_ready(self, param: Union[int, str]) -> None:
        """Parameter `param` (its index in `params`, or its name) has its gradient for this
        step: once every parameter of a bucket is ready, and every bucket after it in the
        arena has started, that bucket's Allreduce starts on a communication thread, while the
        caller goes on with its backward pass.  Do not write a gradient after marking it
        ready, until the step.  Marking a parameter twice before a step is a ValueError.
        Without MPI_THREAD_MULTIPLE (mpi4py asks for it by default) the mark is recorded and
        the reduction waits for step()."""
        k = self._param_index(param)
        pipe = self._pipe
        marks = pipe.ready if pipe is not None else self._marks
        if marks[k]:
            raise ValueError(f"DataParallel.grad_ready: parameter {param!r} is already "
                             "marked ready for this step")
        if pipe is None:            # one rank: nothing to sum; the marks are still checked
            marks[k] = 1
        elif pipe.threaded:
            pipe.mark(k)
        else:
            pipe.ready[k] = 1

    def _param_index(self, param):
        layout = self.optimizer.layout
        if isinstance(param, str):
            if layout.names is None or param not in layout.names:
                raise ValueError(f"DataParallel.grad_ready: no parameter named {param!r}"
                                 + ("" if layout.names is not None else
                                    " (the parameters have no names: give an index)"))
            return layout.names.index(param)
        if isinstance(param, (bool, np.bool_)) or not isinstance(param, (int, np.integer)):
            raise TypeError(f"DataParallel.grad_ready: a parameter's index (int) or name "
                            f"(str), got {type(param).__name__}")
        n = len(layout.shapes)
        if not -n <= param < n:
            raise ValueError(f"DataParallel.grad_ready: parameter index {param} out of range "
                             f"for {n} parameters")
        return int(param) % n

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizer's zero_grad, after any bucket's reduction still running has ended;
        no parameter is marked ready afterwards."""
        if self._pipe is not None:
            self._pipe.drain()
        self.optimizer.zero_grad(set_to_none)
        if self._pipe is not None:
            self._pipe.reset()
        self._marks = bytearray(len(self._marks))

    def allreduce_grads(self) -> None:
        """Sum the gradient arena over the ranks, in place (the buckets that grad_ready
        started are waited for, not summed again), and clear the marks.  For a step of your
        own after it (`opt.optimizer.step(...)`, on the sums); DataParallel.step() would sum
        again."""
        pipe = self._pipe
        if pipe is None:
            return
        for _ in pipe.ranges():
            pass
        pipe.reset()

    def step(self, closure: Optional[Callable[[], Any]] = None, *, zero_grad: bool = False,
             grad_multiplier: float = 1.0, max_grad_norm: Optional[float] = None,
             norm_type: float = 2.0) -> Any:
        """Average the gradients over the ranks, then the wrapped optimizer's step (same
        arguments; `last_grad_norm` and clipping then see the averaged gradients).  Every
        argument and hyperparameter is checked, and agreed on by every rank, before any
        Allreduce that step() starts: on a bad or differing value every rank raises and
        nothing has changed (buckets that grad_ready started are summed already; they are not
        summed again)."""
        t_start = time.perf_counter()
        size, pipe = self.comm.Get_size(), self._pipe
        # the check takes the optimizer's lock on every rank (one thread at a time, as
        # Optimizer.step) or raises on every rank
        try:
            loss, (zero_grad, m, max_grad_norm, norm_type, changed) = self._check(
                closure, zero_grad, grad_multiplier, max_grad_norm, norm_type)
        except Exception:
            if pipe is not None:        # every rank refused: no bucket may be left unmatched
                pipe.reconcile(self.comm)
            raise
        t0 = time.perf_counter()
        try:
            if pipe is not None:
                pipe.comm_seconds = 0.0
                m = float(np.float32(m) * np.float32(1.0 / size)) if m != 1.0 else 1.0 / size
                result = self.optimizer.apply_step(zero_grad, m, max_grad_norm, norm_type,
                                                   changed, ranges=pipe.ranges())
                pipe.reset()
            else:
                result = self.optimizer.apply_step(zero_grad, m, max_grad_norm, norm_type,
                                                   changed)
                self._marks = bytearray(len(self._marks))
        except BaseException:
            self._check.forget()
            raise
        finally:
            self.optimizer.release()
        t1 = time.perf_counter()
        comm = pipe.comm_seconds if pipe is not None else 0.0
        self.last_step_seconds = {"check": self._check.seconds, "comm": comm,
                                  "compute": t1 - t0 - comm, "wall": t1 - t_start}
        return loss if closure is not None else result

    def save(self, path: Union[str, os.PathLike[str]],
             scheduler: Optional[LRScheduler] = None) -> None:
        """Rank 0 writes the checkpoint (the state is replicated); every rank must call it,
        and every rank raises if rank 0 could not write it."""
        error = None
        if self.comm.Get_rank() == 0:
            try:
                self.optimizer.save(path, scheduler)
            except Exception as e:
                error = e
        _agree(self.comm, error, "DataParallel.save", "rank 0 could not write the checkpoint")

    def load(self, path: Union[str, os.PathLike[str]],
             scheduler: Optional[LRScheduler] = None) -> None:
        self.optimizer.load(path, scheduler)


class _Zero:
    """The sharding part of ZeroRedundancyOptimizer, mixed into an optimizer class."""

    def __init__(self, params, comm=None, bucket_elements=None, abort_on_error=True,
                 **defaults):
        self.comm = comm = _world(comm)
        self.bucket_elements = _bucket_arg(bucket_elements)
        abort_on_error = V.flag("abort_on_error", abort_on_error)
        self.writes_checkpoints = comm.Get_rank() == 0
        self._comm_seconds = 0.0
        if comm.Get_size() > 1 and abort_on_error:    # before the first collective
            abort_on_uncaught_exception(comm)
        self._whole_layout = None
        super().__init__(params, **defaults)
        if comm.Get_size() > 1:
            check_same_layout(comm, self, "ZeroRedundancyOptimizer",
                              bucket_elements=self.bucket_elements)
            comm.Bcast(self.flat_params, root=0)
        self._check = _StepCheck(comm, self, "ZeroRedundancyOptimizer")

    def _shard_range(self, arena):
        size, rank = self.comm.Get_size(), self.comm.Get_rank()
        # Shards start on the gradient norm's block boundaries when every rank gets a block:
        # each shard's block sums are then the single process's own, and the global norm made
        # of them is bit-identical to one process's.  A smaller arena is cut in lines, and its
        # norm taken from the whole reduced gradient (gathered: it is small).
        # With int8 state, every cut is on a whole block (QBLOCK elements: int8 params start
        # on one), so no block's absmax is shared by two ranks or two pieces.
        block = self._backend.NORM_BLOCK
        granule = QBLOCK if _formats_have_int8(self._formats) else ALIGN
        self._norm_aligned = arena.total >= block * size
        self._bounds = bounds = arena.shard(size, block if self._norm_aligned else granule)
        lo, hi = bounds[rank], bounds[rank + 1]
        # The pipelined step's pieces: row k holds piece k of every rank's shard, cut in
        # buckets of bucket_elements; row k is reduced, stepped and gathered before row k+1.
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        step = (_round(self.bucket_elements, granule) if self.bucket_elements
                else max(longest, 1))
        rows = max(1, -(-longest // step))
        self._pieces = [[(min(a + k * step, b), min(a + (k + 1) * step, b))
                         for a, b in zip(bounds, bounds[1:])] for k in range(rows)]
        # the reduced gradients of this shard land here (the full gradient arena keeps this
        # rank's own, unreduced gradients); alone, a rank reads its gradients where they are
        self._shard_grads = aligned_zeros(hi - lo) if size > 1 else None
        self._gathered = None       # a small arena's reduced gradients, for its norm
        return lo, hi

    def _kernel_grads(self):
        return self._shard_grads if self._shard_grads is not None else self.flat_grads

    def apply_step(self, zero_grad, grad_multiplier, max_grad_norm, norm_type, changed,
                   ranges=None):
        """Reduce_scatter the gradients (all at once when the step needs their norm first,
        else piece by piece inside the step), then Optimizer.apply_step on this rank's shard:
        the global norm for clipping and skip_nonfinite is combined from every shard's."""
        comm, size = self.comm, self.comm.Get_size()
        t0 = time.perf_counter()
        self._comm_seconds = 0.0
        if size == 1:
            result = super().apply_step(zero_grad, grad_multiplier, max_grad_norm, norm_type,
                                        changed, ranges)
            self.last_step_seconds = {"comm": 0.0, "compute": time.perf_counter() - t0}
            return result
        m = (float(np.float32(grad_multiplier) * np.float32(1.0 / size))
             if grad_multiplier != 1.0 else 1.0 / size)
        self._pipelined = len(self._pieces) > 1 and max_grad_norm is None and \
            not self.skip_nonfinite
        if not self._pipelined:
            t = time.perf_counter()
            MPI = _mpi()
            counts = [b - a for a, b in zip(self._bounds, self._bounds[1:])]
            comm.Reduce_scatter([self.flat_grads, MPI.FLOAT], [self._shard_grads, MPI.FLOAT],
                                recvcounts=counts, op=MPI.SUM)
            self._comm_seconds += time.perf_counter() - t
        result = super().apply_step(zero_grad, m, max_grad_norm, norm_type, changed)
        self.last_step_seconds = {"comm": self._comm_seconds,
                                  "compute": time.perf_counter() - t0 - self._comm_seconds}
        return result

    def _run(self, grad_multiplier, zero_grad):
        comm, size, rank = self.comm, self.comm.Get_size(), self.comm.Get_rank()
        if size == 1:
            super()._run(grad_multiplier, zero_grad)
            return
        MPI = _mpi()
        lo = self._lo
        for row in self._pieces:
            if self._pipelined:
                t = time.perf_counter()
                requests = [comm.Ireduce(self.flat_grads[a:b],
                                         self._shard_grads[a - lo:b - lo] if r == rank else None,
                                         op=MPI.SUM, root=r)
                            for r, (a, b) in enumerate(row) if b > a]
                MPI.Request.Waitall(requests)
                self._comm_seconds += time.perf_counter() - t
            a, b = row[rank]
            self._stepper.run(self._steps, grad_multiplier, False, a - lo, b - lo)
            t = time.perf_counter()
            comm.Allgatherv(MPI.IN_PLACE, [self.flat_params, [b - a for a, b in row],
                                           [a for a, _ in row], MPI.FLOAT])
            self._comm_seconds += time.perf_counter() - t
        if zero_grad:
            self.flat_grads.fill(0.0)

    def _grad_norm(self, norm_type):
        """The norm of the reduced gradients of every shard, the same on every rank and bit for
        bit one process's: each rank's block sums, gathered and combined in order (or, for a
        small arena, the norm of the gathered gradients)."""
        comm, size = self.comm, self.comm.Get_size()
        if size == 1:
            return super()._grad_norm(norm_type)
        MPI, backend, bounds = _mpi(), self._backend, self._bounds
        t = time.perf_counter()
        if self._norm_aligned:
            blocks, bad = backend.grad_norm_blocks(self._shard_grads, norm_type)
            mine = np.append(blocks, 1.0 if bad else 0.0)
            counts = [-(-(b - a) // backend.NORM_BLOCK) + 1 for a, b in zip(bounds, bounds[1:])]
            displs = np.cumsum([0] + counts[:-1]).tolist()
            everyone = np.empty(sum(counts), np.float64)
            comm.Allgatherv(mine, [everyone, counts, displs, MPI.DOUBLE])
            flags = [everyone[d + c - 1] for d, c in zip(displs, counts)]
            keep = np.ones(everyone.size, bool)
            keep[[d + c - 1 for d, c in zip(displs, counts)]] = False
            norm = backend.norm_from_blocks(everyone[keep], norm_type)
            nonfinite = any(f != 0.0 for f in flags)
        else:
            full = self._gathered
            if full is None:
                full = self._gathered = np.empty(self.flat_params.size, np.float32)
            counts = [b - a for a, b in zip(bounds, bounds[1:])]
            comm.Allgatherv(self._shard_grads, [full, counts, bounds[:-1], MPI.FLOAT])
            norm, nonfinite = backend.grad_norm(full, norm_type)
        self._comm_seconds += time.perf_counter() - t
        return norm, nonfinite

    def _product_overflows(self, grad_multiplier):
        if self.comm.Get_size() == 1:
            return super()._product_overflows(grad_multiplier)
        mine = product_overflows(self._shard_grads, grad_multiplier)
        return self.comm.allreduce(mine, op=_mpi().LOR)

    def _full_layout(self):
        """The state layout of the whole arena (this rank's own covers its shard)."""
        if self._whole_layout is None:
            self._whole_layout = StateLayout(self._arena, self._formats)
        return self._whole_layout

    def _kind_cuts(self, layout):
        """Per storage kind (float32, bfloat16, int8 codes, absmax): (MPI datatype, counts,
        displacements) of every rank's piece of the whole state: shards are contiguous in
        every kind's arena, in rank order."""
        MPI = _mpi()
        types = (MPI.FLOAT, MPI.UNSIGNED_SHORT, MPI.UNSIGNED_CHAR, MPI.FLOAT)
        out = []
        for kind in range(4):
            at = [layout.state_index(min(kind, 2), b) for b in self._bounds]
            if kind == 3:                   # absmax: one per block of codes
                at = [a // QBLOCK for a in at]
            out.append((types[kind], [b - a for a, b in zip(at, at[1:])], at[:-1]))
        return out

    def _gather_buffer(self, buf, out, cuts, root):
        """This rank's StateBuffer `buf` into the whole StateBuffer `out`: on every rank
        (root None, Allgatherv) or on rank 0 (root 0, Gatherv; `out` is None elsewhere)."""
        mine = buf.data + [buf.absmax]
        whole = out.data + [out.absmax] if out is not None else [None] * 4
        for kind, (mpi_type, counts, displs) in enumerate(cuts):
            if not sum(counts):
                continue
            send = mine[kind] if mine[kind] is not None else np.empty(0, whole_dtype(kind))
            if root is None:
                self.comm.Allgatherv(send, [whole[kind], counts, displs, mpi_type])
            else:
                self.comm.Gatherv(send, [whole[kind], counts, displs, mpi_type]
                                  if whole[kind] is not None else None, root=root)

    def _full_state(self):
        """(whole layout, {name: StateBuffer}), every state arena gathered to its full
        length, kind by kind (a collective: all ranks call it)."""
        layout = self._full_layout()
        cuts = self._kind_cuts(layout)
        full = {}
        for key in self.family.buffer_names:           # the same keys on every rank
            if key in self._state:
                out = StateBuffer(layout)
                self._gather_buffer(self._state[key], out, cuts, None)
                full[key] = out
        return layout, full

    def state_buffers(self):
        """Each state buffer gathered in turn to rank 0, the rank that writes checkpoints (a
        collective: every rank iterates to the end); the other ranks get None and hold nothing
        beyond their shards."""
        layout = self._full_layout()
        cuts = self._kind_cuts(layout)
        root = self.comm.Get_rank() == 0
        out, error = None, None
        if root and self._state:            # one buffer for every key, if rank 0 has room
            try:
                out = StateBuffer(layout)
            except MemoryError as e:
                error = e
        _agree(self.comm, error, "ZeroRedundancyOptimizer.save",
               "rank 0 has no room for one full state buffer")
        for key in self.family.buffer_names:           # the same keys on every rank
            if key in self._state:
                self._gather_buffer(self._state[key], out, cuts, 0)
                yield key, (BufferMembers(out, layout, key) if root else None)

    @property
    def state(self):
        """Gathered copies (a collective); a shard's state is not a view into one arena."""
        return self._collect_state(copy=True)

    def step(self, closure=None, *, zero_grad=False, grad_multiplier=1.0, max_grad_norm=None,
             norm_type=2.0):
        """Reduce_scatter the gradients, one fused step on this rank's shard, Allgather the
        params (bucket by bucket: see ZeroRedundancyOptimizer).  Every argument and
        hyperparameter is checked, and agreed on by every rank, before the Reduce_scatter (as
        in DataParallel.step).  max_grad_norm and skip_nonfinite act on the norm of all
        shards' reduced gradients, exactly as one process's step on the averaged gradients."""
        t_start = time.perf_counter()
        # the check takes the lock on every rank (one thread at a time, as Optimizer.step)
        # or raises on every rank
        loss, checked = self._check(closure, zero_grad, grad_multiplier, max_grad_norm,
                                    norm_type)
        try:
            result = self.apply_step(*checked)
        except BaseException:
            self._check.forget()
            raise
        finally:
            self.release()
        self.last_step_seconds["check"] = self._check.seconds
        self.last_step_seconds["wall"] = time.perf_counter() - t_start
        return loss if closure is not None else result

    def save(self, path, scheduler=None):
        """Gathers the state one buffer at a time to rank 0 (every rank must call it), which
        writes one single-process checkpoint; it resumes on any number of ranks or on one
        process.  Rank 0 holds one full state buffer at a time, the others nothing more.
        If any rank fails (rank 0 cannot write, say), every rank raises."""
        with self._held_everywhere("save"):
            error = None
            try:
                super().save(path, scheduler)
            except Exception as e:
                error = e
            _agree(self.comm, error, "ZeroRedundancyOptimizer.save",
                   "another rank failed to save")

    def state_dict(self):
        """The single-process state dict, gathered on every rank (a collective)."""
        with self._held_everywhere("state_dict"):
            return super().state_dict()

    @contextlib.contextmanager
    def _held_everywhere(self, what):
        """The lock on every rank, or on none and a RuntimeError on every rank: a rank whose
        optimizer another thread holds must not leave the others waiting in a collective."""
        error = None
        try:
            self.hold(what)
        except RuntimeError as e:
            error = e
        if not self.comm.allreduce(error is None, op=_mpi().LAND):
            if error is None:
                self.release()
            raise error or RuntimeError(
                f"ZeroRedundancyOptimizer.{what}(): another thread holds this optimizer on "
                "another rank; no rank has started")
        try:
            yield
        finally:
            self.release()


_ZERO_CLASSES: Dict[Any, Any] = {}


def ZeroRedundancyOptimizer(params: Params,
                            optimizer_class: Optional[Type[Optimizer[Any]]] = None,
                            comm: Comm = None, bucket_elements: Optional[int] = None,
                            abort_on_error: bool = True, **defaults: Any) -> Optimizer[Any]:
    """ZeRO stage 1 (torch.distributed.optim.ZeroRedundancyOptimizer's name and shape).

    Every rank holds the whole params and grads arenas (`opt.params`, `opt.grads` as in the
    core) but optimizer state only for its shard: the arena cut into `size` contiguous pieces
    (a param group may span two shards; each shard's kernel call covers the groups it
    overlaps).  `step()` sums the gradients into each rank's shard, steps
    the shard with the 1/size average folded into the kernel, and gathers the params: one
    Reduce_scatter, one kernel call, one Allgatherv.  With `bucket_elements` it runs piece by
    piece instead, piece k of every shard reduced (one Reduce per rank), stepped and gathered
    before piece k+1, while each piece is in cache: bit-identical to one piece with 2 ranks
    (with more, MPI may add the ranks in another order for a Reduce than for a
    Reduce_scatter), but slower where measured (MPICH, 2 ranks on one machine: its Reduces of
    pieces cost more than one Reduce_scatter; see the README), hence off by default.
    The shards start on the gradient norm's blocks (8192 elements; the NumPy twin's are
    65536) when the arena has a block for every rank, else on 64-byte lines (on int8 state
    blocks of 256 elements when a param keeps int8 state, as pieces are then too), as even as
    that allows.  Compressed state (state_dtype) is sharded and gathered kind by kind
    (float32, bfloat16 bits, int8 codes and absmax).  `step(max_grad_norm=...)` and `skip_nonfinite=True` use the norm of every
    shard's reduced gradients, combined in a fixed order (or, for an arena smaller than a
    block a rank, taken of the gathered reduced gradients), so every rank takes the same
    decision and the result is one process's (bit for bit with 2 ranks).
    `state_nbytes` is this rank's state; `last_step_seconds` splits the last step into
    {"check": ..., "comm": ..., "compute": ..., "wall": ...}.  `state_dict()` and `save()`
    gather the single-process form, so a run resumes on any number of ranks, or on one
    process.  `optimizer_class` defaults to fastopt.AdamW; `defaults` are its arguments.
    abort_on_error: see `abort_on_uncaught_exception`.
    """
    from fastopt.optim import AdamW
    optimizer_class = optimizer_class or AdamW
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
        raise TypeError(f"optimizer_class must be a fastopt optimizer class, got "
                        f"{optimizer_class!r}")
    cls = _ZERO_CLASSES.get(optimizer_class)
    if cls is None:
        cls = type(f"ZeroRedundancy{optimizer_class.__name__}", (_Zero, optimizer_class),
                   {"__doc__": ZeroRedundancyOptimizer.__doc__})
        _ZERO_CLASSES[optimizer_class] = cls
    return cls(params, comm=comm, bucket_elements=bucket_elements,
               abort_on_error=abort_on_error, **defaults)
