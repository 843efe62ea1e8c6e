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
import hashlib
import time

import numpy as np

from fastopt._arena import aligned_zeros
from fastopt._optimizer import Optimizer


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


def check_same_layout(comm, opt, what):
    """One small collective: every rank's arena layout must be rank 0's, or every rank raises
    the same ValueError (no rank is left waiting in a later collective)."""
    groups = [[list(np.shape(p)) for p in g["params"]] for g in opt.param_groups]
    desc = repr((_kind(opt), opt.flat_params.size, groups, opt.layout.names))
    digest = hashlib.sha256(desc.encode()).hexdigest()
    digests = comm.allgather(digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(f"{what}: the arena layout (optimizer class, parameter shapes, "
                         f"groups) of rank(s) {differ} differs from rank 0's; every rank must "
                         "build the same model")


def _kind(opt):
    return opt.spec.name


class DataParallel:
    """Data-parallel training: an optimizer whose step averages the gradients of all ranks.

    DataParallel(opt, comm=None, bucket_elements=None): `comm` defaults to MPI.COMM_WORLD.
    Construction checks that every rank has the same arena layout and broadcasts rank 0's
    params.  `step()` first checks its arguments and hyperparameters (the wrapped optimizer's
    check_step), so that a bad value raises before the gradients are touched; then it sums the
    gradient arena across ranks in place with one Allreduce (or one per bucket of
    `bucket_elements`, to overlap less memory with MPI's internal buffers), and runs the fused
    step (apply_step) with the 1/size averaging folded into its grad_multiplier (no extra
    pass).  `last_step_seconds` splits the last step into {"comm": ..., "compute": ...}.
    Everything else (params, grads, param_groups, zero_grad, state_dict, ...) is the wrapped
    optimizer's.  With a communicator of size 1 no collective runs.
    """

    def __init__(self, opt, comm=None, bucket_elements=None):
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
            check_same_layout(comm, opt, "DataParallel")
            comm.Bcast(opt.flat_params, root=0)

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def allreduce_grads(self):
        """Sum the gradient arena over the ranks, in place."""
        if self.comm.Get_size() == 1:
            return
        MPI = _mpi()
        g = self.optimizer.flat_grads
        step = self.bucket_elements or g.size
        for lo in range(0, g.size, step):
            self.comm.Allreduce(MPI.IN_PLACE, g[lo:lo + step], op=MPI.SUM)

    def step(self, closure=None, *, zero_grad=False, grad_multiplier=1.0, max_grad_norm=None,
             norm_type=2.0):
        """Average the gradients over the ranks, then the wrapped optimizer's step (same
        arguments; `last_grad_norm` and clipping then see the averaged gradients).  Every
        argument and hyperparameter is checked before the Allreduce: on a bad value (the same
        on every rank) every rank raises and nothing has changed."""
        loss = closure() if closure is not None else None
        zero_grad, m, max_grad_norm, norm_type, changed = self.optimizer.check_step(
            zero_grad, grad_multiplier, max_grad_norm, norm_type)
        size = self.comm.Get_size()
        t0 = time.perf_counter()
        self.allreduce_grads()
        t1 = time.perf_counter()
        if size > 1:
            m = float(np.float32(m) * np.float32(1.0 / size)) if m != 1.0 else 1.0 / size
        result = self.optimizer.apply_step(zero_grad, m, max_grad_norm, norm_type, changed)
        self.last_step_seconds = {"comm": t1 - t0, "compute": time.perf_counter() - t1}
        return loss if closure is not None else result

    def save(self, path, scheduler=None):
        """Rank 0 writes the checkpoint (the state is replicated); every rank must call it."""
        if self.comm.Get_rank() == 0:
            self.optimizer.save(path, scheduler)
        self.comm.Barrier()

    def load(self, path, scheduler=None):
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

    @property
    def state(self):
        """Gathered copies (a collective); a shard's state is not a view into one arena."""
        return self._collect_state(copy=True)

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
        """Gathers the state (every rank must call it); rank 0 writes one single-process
        checkpoint, which resumes on any number of ranks or on one process."""
        super().save(path, scheduler)
        self.comm.Barrier()


_ZERO_CLASSES = {}


def ZeroRedundancyOptimizer(params, optimizer_class=None, comm=None, **defaults):
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
