"""Cases run under `mpiexec -n 2 python tests/mpi_cases.py CASE` by test_distributed.py.

Each rank prints "PASS <case> rank <r>" when its assertions hold, and exits non-zero otherwise.
"""
import os
import sys
import tempfile

import numpy as np
from mpi4py import MPI

import fastopt
from fastopt.distributed import DataParallel, ZeroRedundancyOptimizer

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
SHAPES = [(40, 9), (9,), (33, 5), (5,), (7,)]


def params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def groups(ps):
    return [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.0}]


def grads_of(t, r):
    """Rank r's gradients at step t (every process can compute every rank's)."""
    rng = np.random.default_rng(1000 * t + r)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def averaged(t):
    """What one process steps with: the average of the ranks' gradients, added in rank order
    (with 2 ranks one addition, the same as MPI's sum) and halved exactly."""
    total = grads_of(t, 0)
    for r in range(1, size):
        total = [a + b for a, b in zip(total, grads_of(t, r))]
    return [a * np.float32(1.0 / size) for a in total]


def single_process(steps, clip=None, start=None):
    opt = fastopt.AdamW(groups(params()), amsgrad=True)
    if start is not None:
        opt.load(start)
    for t in range(steps[0], steps[1]):
        for view, g in zip(opt.grads, averaged(t)):
            view[...] = g
        opt.step(max_grad_norm=clip)
    return opt


def feed(opt, t):
    for view, g in zip(opt.grads, grads_of(t, rank)):
        view[...] = g


def same_on_all_ranks(a):
    everyone = comm.allgather(a)
    return all(np.array_equal(x, everyone[0]) for x in everyone)


def bitwise(a, b):
    return np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def case_data_parallel():
    own = params(seed=rank)            # rank 1 starts elsewhere: the broadcast must fix it
    dp = DataParallel(fastopt.AdamW(groups(own), amsgrad=True))
    assert bitwise(dp.flat_params, fastopt.AdamW(groups(params())).flat_params)
    for t in range(12):
        feed(dp, t)
        dp.step(max_grad_norm=5.0 if t % 2 else None)
    assert same_on_all_ranks(dp.flat_params)
    ref = fastopt.AdamW(groups(params()), amsgrad=True)
    for t in range(12):
        for view, g in zip(ref.grads, averaged(t)):
            view[...] = g
        ref.step(max_grad_norm=5.0 if t % 2 else None)
    assert bitwise(dp.flat_params, ref.flat_params), "DataParallel != one process"
    for key in ref._state:
        assert bitwise(dp._state[key], ref._state[key]), key


def case_data_parallel_buckets():
    a = DataParallel(fastopt.SGD(groups(params()), momentum=0.9), bucket_elements=100)
    b = DataParallel(fastopt.SGD(groups(params()), momentum=0.9))
    for t in range(5):
        feed(a, t)
        feed(b, t)
        a.step()
        b.step()
    assert bitwise(a.flat_params, b.flat_params)


def case_zero():
    zero = ZeroRedundancyOptimizer(groups(params(seed=rank)), optimizer_class=fastopt.AdamW,
                                   amsgrad=True)
    for t in range(12):
        feed(zero, t)
        zero.step(zero_grad=True)
        assert not zero.flat_grads.any()
    assert same_on_all_ranks(zero.flat_params)
    ref = single_process((0, 12))
    assert bitwise(zero.flat_params, ref.flat_params), "ZeRO != one process"
    sd, ref_sd = zero.state_dict(), ref.state_dict()
    assert sd["param_groups"] == ref_sd["param_groups"]
    for i, entry in ref_sd["state"].items():
        for key, value in entry.items():
            assert bitwise(sd["state"][i][key], value) if key != "step" else \
                sd["state"][i][key] == value, (i, key)
    full = sum(a.nbytes for a in ref._state.values())
    shares = comm.allgather(zero.state_nbytes)
    assert sum(shares) == full, (shares, full)
    assert max(shares) <= full / size + 3 * 64, (shares, full)


def case_zero_resume():
    folder = comm.bcast(tempfile.mkdtemp() if rank == 0 else None)
    path = os.path.join(folder, "ck.npz")
    zero = ZeroRedundancyOptimizer(groups(params()), optimizer_class=fastopt.AdamW,
                                   amsgrad=True)
    for t in range(6):
        feed(zero, t)
        zero.step()
    zero.save(path)                      # every rank gathers; rank 0 writes
    for t in range(6, 12):
        feed(zero, t)
        zero.step()
    # the checkpoint resumes on one process ...
    one = single_process((6, 12), start=path)
    assert bitwise(one.flat_params, zero.flat_params), "2 ranks -> 1 process"
    # ... and on 2 ranks again
    again = ZeroRedundancyOptimizer(groups(params(seed=9)), optimizer_class=fastopt.AdamW,
                                    amsgrad=True)
    again.load(path)
    for t in range(6, 12):
        feed(again, t)
        again.step()
    assert bitwise(again.flat_params, zero.flat_params), "2 ranks -> 2 ranks"
    # a single-process checkpoint loads into the sharded optimizer
    comm.Barrier()
    if rank == 0:
        single_process((0, 6)).save(path)
    comm.Barrier()
    from_one = ZeroRedundancyOptimizer(groups(params(seed=3)), optimizer_class=fastopt.AdamW,
                                       amsgrad=True)
    from_one.load(path)
    for t in range(6, 12):
        feed(from_one, t)
        from_one.step()
    assert bitwise(from_one.flat_params, zero.flat_params), "1 process -> 2 ranks"


def case_zero_checkpoint_memory():
    """ZeRO's save gathers one state buffer at a time to rank 0: rank 0 holds about one full
    buffer more than its steady state, rank 1 nothing; load streams each rank's shard."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    from checkpoint_memory import peak_of
    folder = comm.bcast(tempfile.mkdtemp() if rank == 0 else None)
    path = os.path.join(folder, "ck.npz")
    n = 12_500_000                       # 48 MB a buffer
    zero = ZeroRedundancyOptimizer([np.full(n // 2, 0.5, np.float32),
                                    np.full(n - n // 2, 0.25, np.float32)],
                                   optimizer_class=fastopt.AdamW)
    zero.flat_grads.fill(1.0)
    zero.step()
    buffer = zero.flat_params.nbytes
    save = peak_of(lambda: zero.save(path)) / buffer
    load = peak_of(lambda: zero.load(path)) / buffer
    print(f"rank {rank}: save {save:.2f} load {load:.2f} buffers", flush=True)
    assert save <= (1.5 if rank == 0 else 0.25), save
    assert load <= 0.25, load
    one = fastopt.AdamW([np.zeros(n // 2, np.float32), np.zeros(n - n // 2, np.float32)])
    one.load(path)
    assert bitwise(one.flat_params, zero.flat_params)
    assert one.step_counts == [1]


def case_zero_save_failure():
    """Rank 0 cannot write (no such folder), or has no room for a full state buffer: it
    raises its error, every other rank a RuntimeError saying so, and no rank is left waiting
    in a gather or the barrier.  The same for DataParallel's save."""
    import fastopt.distributed as D
    zero = ZeroRedundancyOptimizer(groups(params()), optimizer_class=fastopt.AdamW,
                                   amsgrad=True)
    dp = DataParallel(fastopt.AdamW(groups(params())))
    for opt in (zero, dp):
        feed(opt, 0)
        opt.step()
        if rank == 0:
            raises(FileNotFoundError, lambda: opt.save("/nonexistent-folder/ck.npz"))
        else:
            raises(RuntimeError, lambda: opt.save("/nonexistent-folder/ck.npz"),
                   "rank 0: FileNotFoundError")

    class NoRoom:                   # rank 0's numpy, out of memory for a full buffer
        def __getattr__(self, name):
            return getattr(np, name)

        def empty(self, *args, **kw):
            raise MemoryError("no room (test)")
    D.np = NoRoom() if rank == 0 else np
    try:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(comm.bcast(d if rank == 0 else None), "ck.npz")
            if rank == 0:
                raises(MemoryError, lambda: zero.save(path), "no room")
            else:
                raises(RuntimeError, lambda: zero.save(path), "no room for one full state")
            comm.Barrier()
            assert not os.path.exists(path)
    finally:
        D.np = np
    comm.Barrier()


def case_refused_before_reduction():
    """What used to be refused only after the gradients were reduced, or on one rank only,
    is refused on every rank before any collective: a per-step scalar past float32 (lr 3e38:
    lr / (1 - beta1) overflows), and another thread holding one rank's optimizer (step, and
    ZeRO's gathering save and state_dict).  The gradients stay each rank's own, and the next
    step sums them once."""
    import threading
    for opt in (DataParallel(fastopt.Adam(groups(params()))),
                ZeroRedundancyOptimizer(groups(params()), optimizer_class=fastopt.Adam)):
        zero = not isinstance(opt, DataParallel)
        feed(opt, 0)
        own = opt.flat_grads.copy()
        opt.param_groups[0]["lr"] = 3e38
        raises(ValueError, opt.step, "overflows float32")
        assert bitwise(opt.flat_grads, own), "lr 3e38: the gradients were reduced"
        opt.param_groups[0]["lr"] = 1e-3

        holder = opt if zero else opt.optimizer
        inside, release = threading.Event(), threading.Event()

        def hold():
            with holder.exclusive("save"):
                inside.set()
                release.wait(30)
        calls = [("step", opt.step)]
        if zero:
            calls += [("save", lambda: opt.save(os.devnull)), ("state_dict", opt.state_dict)]
        for name, call in calls:
            t = threading.Thread(target=hold) if rank == 0 else None
            if t:
                t.start()
                inside.wait(30)
            comm.Barrier()
            if rank == 0:
                raises(RuntimeError, call, f"{name}(): another thread")
            else:
                raises((ValueError, RuntimeError), call, "another")
            assert bitwise(opt.flat_grads, own), f"{name}: the gradients were reduced"
            if t:
                release.set()
                t.join()
                inside.clear()
                release.clear()
            comm.Barrier()

        opt.step()
        one = fastopt.Adam(groups(params()))
        for view, g in zip(one.grads, averaged(0)):
            view[...] = g
        one.step()
        assert bitwise(opt.flat_params, one.flat_params), \
            f"{type(opt).__name__}: a refused step changed the next one"


def case_layout_mismatch():
    shapes = SHAPES if rank == 0 else SHAPES[:-1]
    ps = [np.zeros(s, np.float32) for s in shapes]
    for make in (lambda: DataParallel(fastopt.Adam(ps)),
                 lambda: ZeroRedundancyOptimizer(ps, optimizer_class=fastopt.Adam)):
        try:
            make()
        except ValueError as e:
            assert "differs from rank 0's" in str(e), e
        else:
            raise AssertionError("a mismatched layout was accepted")


def case_size_one():
    """On a communicator of one rank both wrappers are the plain optimizer."""
    solo = comm.Split(color=rank, key=0)
    dp = DataParallel(fastopt.AdamW(groups(params())), comm=solo)
    zero = ZeroRedundancyOptimizer(groups(params()), optimizer_class=fastopt.AdamW, comm=solo)
    plain = fastopt.AdamW(groups(params()))
    for t in range(5):
        for o in (dp, zero, plain):
            feed(o, t)
            o.step()
    assert bitwise(dp.flat_params, plain.flat_params)
    assert bitwise(zero.flat_params, plain.flat_params)
    assert zero.state_nbytes == sum(a.nbytes for a in plain._state.values())


def case_every_class():
    """Every optimizer class (its configuration with every state buffer, from the test
    tables) under both wrappers equals one process stepping with the average, bit for bit,
    and ZeRO's gathered state dict is the single-process one."""
    from cases import FULL_STATE
    for cls, kw in sorted(FULL_STATE.items()):
        make = getattr(fastopt, cls)
        dp = DataParallel(make(groups(params()), **kw))
        zero = ZeroRedundancyOptimizer(groups(params()), optimizer_class=make, **kw)
        one = make(groups(params()), **kw)
        for t in range(5):
            for o in (dp, zero):
                feed(o, t)
                o.step()
            for view, g in zip(one.grads, averaged(t)):
                view[...] = g
            one.step()
        assert bitwise(dp.flat_params, one.flat_params), f"{cls}: DataParallel != one process"
        assert bitwise(zero.flat_params, one.flat_params), f"{cls}: ZeRO != one process"
        sd, ref = zero.state_dict(), one.state_dict()
        assert sd["state"].keys() == ref["state"].keys(), cls
        for i, entry in ref["state"].items():
            for key, value in entry.items():
                got = sd["state"][i][key]
                assert (bitwise(got, value) if isinstance(value, np.ndarray)
                        else got == value), (cls, i, key)


def raises(kind, call, *words):
    """call() raises `kind` on this rank, with every word in its message."""
    try:
        call()
    except kind as e:
        for w in words:
            assert w in str(e), (w, str(e))
    else:
        raise AssertionError(f"no {kind.__name__} (expected {words})")


def sgd_wrappers():
    """Both wrappers on SGD with momentum (linear in the gradients: a double sum shows)."""
    yield DataParallel(fastopt.SGD(groups(params()), momentum=0.9))
    yield ZeroRedundancyOptimizer(groups(params()), optimizer_class=fastopt.SGD, momentum=0.9)


def stepped_once_by_one_process(steps=1):
    one = fastopt.SGD(groups(params()), momentum=0.9)
    for t in range(steps):
        for view, g in zip(one.grads, averaged(t)):
            view[...] = g
        one.step()
    return one


def case_bad_step_arguments():
    """A bad argument or group hyperparameter raises on every rank before the gradients are
    reduced: the gradients are still this rank's own, and the next step sums them once."""
    for opt in sgd_wrappers():
        zero = not isinstance(opt, DataParallel)
        feed(opt, 0)
        own = opt.flat_grads.copy()
        bad = [(ValueError, dict(max_grad_norm=-1.0), "max_grad_norm"),
               (ValueError, dict(grad_multiplier=-1.0), "grad_multiplier"),
               (TypeError, dict(zero_grad=1), "zero_grad")]
        if not zero:
            bad.append((ValueError, dict(max_grad_norm=1.0, norm_type=0), "norm_type"))
        for kind, kw, word in bad:
            raises(kind, lambda: opt.step(**kw), word)
            assert bitwise(opt.flat_grads, own), f"{kw}: the gradients were reduced"
        if zero:            # each rank would skip on its own shard's norm
            opt.skip_nonfinite = True
            raises(ValueError, opt.step, "skip_nonfinite is not supported")
            opt.skip_nonfinite = False
        opt.param_groups[0]["lr"] = -1.0
        raises(ValueError, opt.step, "param_groups[0].lr")
        assert bitwise(opt.flat_grads, own), "bad lr: the gradients were reduced"
        opt.param_groups[0]["lr"] = 1e-3
        opt.step()
        assert bitwise(opt.flat_params, stepped_once_by_one_process().flat_params), \
            f"{type(opt).__name__}: a failed step changed the next one"


def case_bad_argument_on_one_rank():
    """A bad value (or a closure that raises) on one rank only: that rank raises its error,
    the other a ValueError naming it; no rank waits in a collective, nothing has changed."""
    for opt in sgd_wrappers():
        feed(opt, 0)
        own = opt.flat_grads.copy()

        def boom():
            raise RuntimeError("the closure failed")
        for kw, error, word in [(dict(grad_multiplier=-1.0), ValueError, "grad_multiplier"),
                                (dict(closure=boom), RuntimeError, "the closure failed")]:
            if rank == 1:
                raises(error, lambda: opt.step(**kw), word)
            else:
                raises(ValueError, opt.step, "rank 1", word)
            assert bitwise(opt.flat_grads, own), f"{kw}: the gradients were reduced"
        if rank == 1:
            opt.param_groups[0]["lr"] = -1.0
        raises(ValueError, opt.step, "param_groups[0].lr")
        assert bitwise(opt.flat_grads, own), "bad lr: the gradients were reduced"
        opt.param_groups[0]["lr"] = 1e-3
        opt.step()
        feed(opt, 1)
        opt.step()
        assert bitwise(opt.flat_params, stepped_once_by_one_process(2).flat_params), \
            f"{type(opt).__name__}: a failed step changed the next ones"


def case_settings_differ_at_construction():
    """Ranks built with different hyperparameters or options: a ValueError on every rank that
    names the difference."""
    lr = 1e-2 if rank == 0 else 1e-1
    for make in (lambda: DataParallel(fastopt.AdamW(groups(params()), lr=lr)),
                 lambda: ZeroRedundancyOptimizer(groups(params()), lr=lr)):
        raises(ValueError, make, "param_groups[0].lr is 0.01 on rank 0 but 0.1 on rank(s) [1]")
    ps = groups(params())
    ps[1]["betas"] = [0.9, 0.999] if rank == 0 else (0.8, 0.999)
    raises(ValueError, lambda: DataParallel(fastopt.Adam(ps)), "param_groups[1].betas")
    raises(ValueError, lambda: DataParallel(fastopt.Adam(groups(params()),
                                                         skip_nonfinite=rank == 1)),
           "skip_nonfinite is False on rank 0 but True on rank(s) [1]")
    raises(ValueError, lambda: DataParallel(fastopt.Adam(groups(params())),
                                            bucket_elements=100 + rank),
           "bucket_elements is 100 on rank 0 but 101")
    # equal values of different Python types are one setting
    ps = groups(params())
    ps[1]["lr"] = np.float64(3e-3) if rank == 0 else 3e-3
    ps[1]["betas"] = [0.9, 0.999] if rank == 0 else (0.9, 0.999)
    DataParallel(fastopt.Adam(ps))


def case_hyperparameter_changes_on_one_rank():
    """Rank 1 alone changes an lr before step 3 (then steps with another grad_multiplier or
    max_grad_norm at step 4): every rank raises at that step, naming it, before the gradients
    are reduced; set back, the run equals one process bit for bit."""
    for opt in (DataParallel(fastopt.AdamW(groups(params()), amsgrad=True)),
                ZeroRedundancyOptimizer(groups(params()), optimizer_class=fastopt.AdamW,
                                        amsgrad=True)):
        for t in range(6):
            feed(opt, t)
            if t == 3:
                if rank == 1:
                    opt.param_groups[1]["lr"] = 0.1
                own = opt.flat_grads.copy()
                raises(ValueError, opt.step,
                       "param_groups[1].lr is 0.003 on rank 0 but 0.1 on rank(s) [1]")
                assert bitwise(opt.flat_grads, own), "the gradients were reduced"
                opt.param_groups[1]["lr"] = 3e-3
            if t == 4:              # the step's arguments too
                raises(ValueError, lambda: opt.step(grad_multiplier=1.0 + rank),
                       "grad_multiplier is 1.0 on rank 0 but 2.0 on rank(s) [1]")
                if isinstance(opt, DataParallel):
                    raises(ValueError, lambda: opt.step(max_grad_norm=1.0 + rank),
                           "max_grad_norm is 1.0 on rank 0 but 2.0 on rank(s) [1]")
            opt.step()
        ref = single_process((0, 6))
        assert bitwise(opt.flat_params, ref.flat_params), f"{type(opt).__name__} != one process"


def case_scheduler_on_every_rank():
    """The same lr change on every rank (a scheduler stepping each step) is no error, and the
    run equals one process with the same scheduler, bit for bit."""
    from fastopt.lr_scheduler import ExponentialLR
    one = fastopt.AdamW(groups(params()))
    wrapped = [DataParallel(fastopt.AdamW(groups(params()))),
               ZeroRedundancyOptimizer(groups(params()), optimizer_class=fastopt.AdamW)]
    scheds = [ExponentialLR(o, gamma=0.9) for o in [one] + wrapped]
    for t in range(6):
        for view, g in zip(one.grads, averaged(t)):
            view[...] = g
        for o in wrapped:
            feed(o, t)
        for o, s in zip([one] + wrapped, scheds):
            o.step()
            s.step()
    for o in wrapped:
        assert o.param_groups[0]["lr"] == one.param_groups[0]["lr"] != 1e-3
        assert bitwise(o.flat_params, one.flat_params), f"{type(o).__name__} != one process"


if __name__ == "__main__":
    name = sys.argv[1]
    globals()["case_" + name]()
    print(f"PASS {name} rank {rank}", flush=True)
