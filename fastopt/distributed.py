"""Data-parallel and ZeRO-1 sharded optimizer steps over MPI (mpi4py), built on the arena.

The flat arena is what collectives want: one contiguous gradient buffer is one Allreduce (or
one Reduce_scatter) per step instead of one per tensor, and a contiguous share of the arena is
the natural unit for sharding optimizer state.

    from mpi4py import MPI                  # launched as: mpiexec -n 4 python train.py
    opt = DataParallel(fastopt.AdamW(params, lr=1e-3))
    ...each rank writes the gradients of its part of the batch into opt.grads...
    opt.step()                              # one Allreduce, then one fused step

    opt = ZeroRedundancyOptimizer(params, optimizer_class=fastopt.AdamW, lr=1e-3)
    opt.step()                              # Reduce_scatter, a fused step on this rank's
                                            # shard (state for that shard only), Allgather

What is bit-identical to one process, and why: every rank holds identical params (broadcast
from rank 0 at construction) and adds the same reduced gradients, so the ranks never drift
apart.  Against a single process that steps with the average of the ranks' gradients, the
result is bit-identical when the reduction's order of additions is the single process's: with
2 ranks the sum is one addition, which is commutative, and the average's factor 1/2 is exact,
so `(g0 + g1) * 0.5` on one process and the 2-rank step agree bit for bit (the tests assert
this).  With more ranks MPI may associate the sum differently, which changes the last bits.

mpi4py is imported only when a communicator is needed; it is not a dependency of fastopt's
core (install the `mpi` extra: mpi4py, and MPICH's wheel for machines without an MPI).
"""
from __future__ import annotations

import contextlib
import hashlib
import numbers
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Generic, List, Optional, Type, Union

import numpy as np

from fastopt._arena import aligned_zeros
from fastopt._optimizer import Optimizer
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
    accepted, as plain Python values), which is the same in every process, unlike a str's.
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
                return loss, opt.check_step(zero_grad, grad_multiplier, max_grad_norm,
                                            norm_type)
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
                self.digest = hash(tuple(tuple(_plain(g[k]) for k in self.keys)
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


class DataParallel(Generic[Views]):
    """Data-parallel training: an optimizer whose step averages the gradients of all ranks.

    DataParallel(opt, comm=None, bucket_elements=None): `comm` defaults to MPI.COMM_WORLD.
    Construction checks that every rank has the same arena layout, hyperparameters,
    skip_nonfinite and bucket_elements, and broadcasts rank 0's params.  `step()` first checks
    its arguments and hyperparameters on every rank and agrees on them (one Allgather of 16
    bytes per rank: see _StepCheck), so that a bad or differing value raises on every rank
    before the gradients are touched; then it sums the gradient arena across ranks in place
    with one Allreduce (or one per bucket of `bucket_elements`, to overlap less memory with
    MPI's internal buffers), and runs the fused step with the 1/size averaging folded into its
    grad_multiplier (no extra pass).  `last_step_seconds` splits the last step into
    {"check": ..., "comm": ..., "compute": ...}.  Everything else (params, grads, param_groups,
    zero_grad, state_dict, ...) is the wrapped optimizer's.  With a communicator of size 1 no
    collective runs.
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
        def zero_grad(self, set_to_none: bool = True) -> None: ...
        def state_dict(self) -> Dict[str, Any]: ...

    last_step_seconds: Dict[str, float]

    def __init__(self, opt: Optimizer[Views], comm: Comm = None,
                 bucket_elements: Optional[int] = None) -> None:
        if not isinstance(opt, Optimizer):
            raise TypeError(f"opt must be a fastopt optimizer, got {type(opt).__name__}")
        if bucket_elements is not None and (isinstance(bucket_elements, bool) or
                                            not isinstance(bucket_elements, int) or
                                            bucket_elements < 1):
            raise ValueError(f"bucket_elements must be an int >= 1, got {bucket_elements!r}")
        self.comm = comm = _world(comm)
        self.optimizer = opt
        self.bucket_elements = bucket_elements
        if comm.Get_size() > 1:
            check_same_layout(comm, opt, "DataParallel", bucket_elements=bucket_elements)
            comm.Bcast(opt.flat_params, root=0)
        self._check = _StepCheck(comm, opt, "DataParallel")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def allreduce_grads(self) -> None:
        """Sum the gradient arena over the ranks, in place."""
        if self.comm.Get_size() == 1:
            return
        MPI = _mpi()
        g = self.optimizer.flat_grads
        step = self.bucket_elements or g.size
        for lo in range(0, g.size, step):
            self.comm.Allreduce(MPI.IN_PLACE, g[lo:lo + step], op=MPI.SUM)

    def step(self, closure: Optional[Callable[[], Any]] = None, *, zero_grad: bool = False,
             grad_multiplier: float = 1.0, max_grad_norm: Optional[float] = None,
             norm_type: float = 2.0) -> Any:
        """Average the gradients over the ranks, then the wrapped optimizer's step (same
        arguments; `last_grad_norm` and clipping then see the averaged gradients).  Every
        argument and hyperparameter is checked, and agreed on by every rank, before the
        Allreduce: on a bad or differing value every rank raises and nothing has changed."""
        # the check takes the optimizer's lock on every rank (one thread at a time, as
        # Optimizer.step) or raises on every rank
        loss, (zero_grad, m, max_grad_norm, norm_type, changed) = self._check(
            closure, zero_grad, grad_multiplier, max_grad_norm, norm_type)
        size = self.comm.Get_size()
        t0 = time.perf_counter()
        try:
            self.allreduce_grads()
            t1 = time.perf_counter()
            if size > 1:
                m = float(np.float32(m) * np.float32(1.0 / size)) if m != 1.0 else 1.0 / size
            result = self.optimizer.apply_step(zero_grad, m, max_grad_norm, norm_type, changed)
        except BaseException:
            self._check.forget()
            raise
        finally:
            self.optimizer.release()
        self.last_step_seconds = {"check": self._check.seconds, "comm": t1 - t0,
                                  "compute": time.perf_counter() - t1}
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

    def __init__(self, params, comm=None, **defaults):
        self.comm = comm = _world(comm)
        self.writes_checkpoints = comm.Get_rank() == 0
        super().__init__(params, **defaults)
        if comm.Get_size() > 1:
            check_same_layout(comm, self, "ZeroRedundancyOptimizer")
            comm.Bcast(self.flat_params, root=0)
        self._check = _StepCheck(comm, self, "ZeroRedundancyOptimizer")

    def _shard_range(self, arena):
        size, rank = self.comm.Get_size(), self.comm.Get_rank()
        self._bounds = bounds = arena.shard(size, rank)
        lo, hi = bounds[rank], bounds[rank + 1]
        # the reduced gradients of this shard land here (the full gradient arena keeps this
        # rank's own, unreduced gradients); alone, a rank reads its gradients where they are
        self._shard_grads = aligned_zeros(hi - lo) if size > 1 else None
        return lo, hi

    def _kernel_grads(self):
        return self._shard_grads if self._shard_grads is not None else self.flat_grads

    def _run(self, grad_multiplier, zero_grad):
        comm, size = self.comm, self.comm.Get_size()
        MPI = _mpi()
        counts = [b - a for a, b in zip(self._bounds, self._bounds[1:])]
        displs = self._bounds[:-1]
        t0 = time.perf_counter()
        if size > 1:
            comm.Reduce_scatter([self.flat_grads, MPI.FLOAT], [self._shard_grads, MPI.FLOAT],
                                recvcounts=counts, op=MPI.SUM)
            m = (float(np.float32(grad_multiplier) * np.float32(1.0 / size))
                 if grad_multiplier != 1.0 else 1.0 / size)
        else:
            m = grad_multiplier
        t1 = time.perf_counter()
        super()._run(m, zero_grad and size == 1)
        if zero_grad and size > 1:
            self.flat_grads.fill(0.0)
        t2 = time.perf_counter()
        if size > 1:
            comm.Allgatherv(MPI.IN_PLACE, [self.flat_params, counts, displs, MPI.FLOAT])
        self.last_step_seconds = {"comm": (t1 - t0) + (time.perf_counter() - t2),
                                  "compute": t2 - t1}

    def _full_state(self):
        """Every state arena gathered to its full length (a collective: all ranks call it)."""
        MPI = _mpi()
        counts = [b - a for a, b in zip(self._bounds, self._bounds[1:])]
        displs = self._bounds[:-1]
        full = {}
        for key in self.family.buffer_names:           # the same keys on every rank
            if key in self._state:
                out = np.zeros(self.flat_params.size, np.float32)
                self.comm.Allgatherv(self._state[key], [out, counts, displs, MPI.FLOAT])
                full[key] = out
        return full

    def state_buffers(self):
        """Each state buffer gathered in turn to rank 0, the rank that writes checkpoints (a
        collective: every rank iterates to the end); the other ranks get None and hold nothing
        beyond their shards."""
        MPI = _mpi()
        counts = [b - a for a, b in zip(self._bounds, self._bounds[1:])]
        displs = self._bounds[:-1]
        root = self.comm.Get_rank() == 0
        out, error = None, None
        if root and self._state:            # one buffer for every key, if rank 0 has room
            try:
                out = np.empty(self.flat_params.size, np.float32)
            except MemoryError as e:
                error = e
        _agree(self.comm, error, "ZeroRedundancyOptimizer.save",
               "rank 0 has no room for one full state buffer")
        for key in self.family.buffer_names:           # the same keys on every rank
            if key in self._state:
                self.comm.Gatherv(self._state[key],
                                  [out, counts, displs, MPI.FLOAT] if root else None, root=0)
                yield key, out

    @property
    def state(self):
        """Gathered copies (a collective); a shard's state is not a view into one arena."""
        return self._collect_state(copy=True)

    def step(self, closure=None, *, zero_grad=False, grad_multiplier=1.0, max_grad_norm=None,
             norm_type=2.0):
        """Reduce_scatter the gradients, one fused step on this rank's shard, Allgather the
        params.  Every argument and hyperparameter is checked, and agreed on by every rank,
        before the Reduce_scatter (as in DataParallel.step)."""
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
        return loss if closure is not None else result

    def check_step(self, zero_grad=False, grad_multiplier=1.0, max_grad_norm=None,
                   norm_type=2.0):
        """Optimizer.check_step, which runs before the Reduce_scatter.  Clipping and
        skip_nonfinite need the norm of all shards and are not offered here: clip with
        DataParallel, or before the step."""
        if max_grad_norm is not None:
            raise ValueError("max_grad_norm is not supported by ZeroRedundancyOptimizer; "
                             "use DataParallel for clipping inside the step")
        if self.skip_nonfinite:
            raise ValueError("skip_nonfinite is not supported by ZeroRedundancyOptimizer: "
                             "each rank sees only its own shard's reduced gradients")
        return super().check_step(zero_grad, grad_multiplier, max_grad_norm, norm_type)

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


def ZeroRedundancyOptimizer(params: Params, optimizer_class: Optional[Type[Optimizer[Any]]] = None,
                            comm: Comm = None, **defaults: Any) -> Optimizer[Any]:
    """ZeRO stage 1 (torch.distributed.optim.ZeroRedundancyOptimizer's name and shape).

    Every rank holds the whole params and grads arenas (`opt.params`, `opt.grads` as in the
    core) but optimizer state only for its shard: the arena cut into `size` contiguous,
    64-byte-aligned pieces (a param group may span two shards; each shard's kernel call covers
    the groups it overlaps).  `step()` Reduce_scatters the gradient sums into this rank's
    shard, steps that shard with the 1/size average folded into the kernel, and Allgathers
    the params.  `state_nbytes` is this rank's state; `last_step_seconds` splits the last
    step into {"comm": ..., "compute": ...}.  `state_dict()` and `save()` gather the
    single-process form, so a run resumes on any number of ranks, or on one process.
    `optimizer_class` defaults to fastopt.AdamW; `defaults` are its arguments.
    """
    from fastopt.optim import AdamW
    optimizer_class = optimizer_class or AdamW
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
        raise TypeError(f"optimizer_class must be a fastopt optimizer class, got "
                        f"{optimizer_class!r}")
    if defaults.get("skip_nonfinite"):
        raise ValueError("skip_nonfinite is not supported by ZeroRedundancyOptimizer")
    cls = _ZERO_CLASSES.get(optimizer_class)
    if cls is None:
        cls = type(f"ZeroRedundancy{optimizer_class.__name__}", (_Zero, optimizer_class),
                   {"__doc__": ZeroRedundancyOptimizer.__doc__})
        _ZERO_CLASSES[optimizer_class] = cls
    return cls(params, comm=comm, **defaults)
