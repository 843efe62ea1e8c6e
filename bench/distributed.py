"""Data-parallel and ZeRO-1 steps over MPI: where the time goes, against MPI's own speed.

    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/distributed.py            # about 1-2 minutes
    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/distributed.py --quick    # a smoke test
    mpiexec -n 1 python bench/distributed.py --quick                      # no collectives

Rank 0 prints the machine and three tables.  Every number is a median over repetitions (with
its spread: interquartile range / median), and within a table the cases are interleaved step
by step, in a new random order each round (the same on every rank), so that a slow patch of
a shared machine hits all of them alike and no case always follows the same neighbour (a
fixed rotation did that, and put ZeRO's one-bucket row ~30% higher in the sweep than in
table 1).  Each rank runs its kernels on one thread (OMP_NUM_THREADS=1 unless set), since the
ranks fill the cores.  Every case refills its gradients and calls Barrier before each timed
step or collective, outside the timed region.  Each table's title says how many cores other
processes kept busy while it ran (/proc/stat less the ranks' own CPU time; Linux, one node),
and "! busy" above 0.2: the ranks need both cores of a 2-core machine, so such a table's
numbers are not clean.

1. Step split.  AdamW at 1e3, 1e6 and 1e7 parameters (one flat tensor), each wrapper built
   with bucket_elements=None ("one": the whole arena reduced, then stepped; ZeRO's default)
   and with buckets of DEFAULT_BUCKET_ELEMENTS (DataParallel's default: the buckets summed
   one after the other by DataParallel's communication thread while the stepping thread
   steps each one whose sum is in, while in cache; ZeRO: pieces reduced, stepped and gathered
   in turn), and the same again with a new lr before every step ("+lr", what a scheduler
   does: the hyperparameters' digest is recomputed).  Columns
   are last_step_seconds: "check" (check_step and the 16-byte Allgather that makes every rank
   agree on the step; as the step's first collective it also holds the wait for the slowest
   rank), "comm" (time in, or waiting for, the reduction and, for ZeRO, the Allgatherv of the
   params), "compute" (the rest after the check: the fused kernel) and "wall" (the whole
   step()).  In the same rounds the bare collectives of the same bytes are timed alone
   ("raw", their GB/s being 4 bytes x params / time): comm.Allreduce(MPI.IN_PLACE) of the
   arena for DataParallel, Reduce_scatter + Allgatherv(IN_PLACE) with ZeRO's shard layout for
   ZeRO-1; and the same in the default buckets (DataParallel's: one Allreduce per bucket, the
   last first; ZeRO's rows: one Ireduce per rank of piece k of every shard, then an
   Allgatherv).  "wall/raw" divides a row's wall by the single collective's time (what the
   step costs over MPI moving the same bytes once); "comm/same raw" divides its comm by the
   raw collectives cut as the row cuts them (what the wrapper adds to MPI's own time);
   "wall/serial" divides its wall by comm + compute of the wrapper's "one" row (the same
   step with nothing pipelined; the numerator also holds the check, which dominates at 1e3).

2. Bucket sweep at 1e7 (--sweep-size): bucket_elements from 2**14 to 2**22 and None, for
   both wrappers, each beside its raw collectives cut the same way; what the defaults are
   chosen from (* marks DataParallel's; ZeRO's is None).

3. grad_ready on bench/train_mlp.py's MLP (64-2048-2048-10, 4.35M params; --mlp-width): one
   data-parallel training step on the digits, each rank taking its --batch samples of a
   global batch, AdamW(lr=1e-3) under DataParallel with the default buckets.  "plain" runs
   train_mlp.backward (every gradient written into opt.grads, the last layer first) and then
   step(); "grad_ready" runs the same arithmetic layer by layer and calls
   opt.grad_ready(name) right after each gradient is written, so that the buckets' Allreduces
   run on DataParallel's communication thread while the backward pass goes on; then step().
   "train step" is forward + loss + backward + step(), "step()" the step alone.  Both models
   start from the same weights, see the same batches, and are checked to hold bitwise
   identical params on every rank after the timed steps.  The raw Allreduces of the model's
   gradient arena are timed in the same rounds.  The "idle" rows are a control: fixed
   gradients and a time.sleep as long as plain's median forward + backward in its place, so
   the cores are free; "idle, grad_ready" marks every gradient ready before the sleep.  With
   as many ranks as cores, the communication thread competes with the backward pass's
   matmuls for a core; the control shows what it does when it has one.
"""
import argparse
import hashlib
import json
import os
import shlex
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import fastopt  # noqa: E402
from fastopt.distributed import (DEFAULT_BUCKET_ELEMENTS, DataParallel,  # noqa: E402
                                 ZeroRedundancyOptimizer)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_mlp import (backward, forward, init_params, layer_sizes,  # noqa: E402
                       load_digits_split, softmax_cross_entropy)

perf = time.perf_counter
WRAPPERS = ("DataParallel", "ZeRO-1")
SWEEP_BUCKETS = (1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, None)
# ZeRO's documented cut (ZeroRedundancyOptimizer's docstring): 8192-element blocks of the arena
# when every rank gets one, else 64-byte lines (16 float32); the arena pads a tensor to a line.
NORM_BLOCK, LINE = 8192, 16


def interleave(cases, reps, warmup=2, main="wall"):
    """cases: {label: fn}, fn() -> {key: seconds}.  Warm up each case, then `reps` rounds of
    every case, in a new random order each round -> {label: {key: median, "spread": the
    interquartile range of `main` over its median}}, and the samples.  Every rank runs the
    same cases in the same order (they call collectives)."""
    labels = list(cases)
    for _ in range(warmup):                 # the first steps allocate state, fault pages in
        for label in labels:
            cases[label]()
    samples = {label: [] for label in labels}
    rng = np.random.default_rng(12345)      # the same orders on every rank
    for _ in range(reps):
        for i in rng.permutation(len(labels)):
            samples[labels[i]].append(cases[labels[i]]())
    medians = {}
    for label, ss in samples.items():
        medians[label] = m = {key: float(np.median([s[key] for s in ss])) for key in ss[0]}
        key = main if main in ss[0] else "wall"
        q1, q3 = np.percentile([s[key] for s in ss], [25, 75])
        m["spread"] = float(q3 - q1) / m[key] if m[key] > 0 else 0.0
    return medians, samples


def make(wrapper, n, bucket_elements, comm):
    params = [np.zeros(n, np.float32)]
    if wrapper == "DataParallel":
        return DataParallel(fastopt.AdamW(params), comm, bucket_elements=bucket_elements)
    return ZeroRedundancyOptimizer(params, optimizer_class=fastopt.AdamW, comm=comm,
                                   bucket_elements=bucket_elements)


def stepping(opt, grads, comm, schedule=False):
    """A case: refill the gradients, Barrier, opt.step() -> its last_step_seconds."""
    t = [0]

    def one():
        opt.grads[0][...] = grads
        if schedule:
            opt.param_groups[0]["lr"] = 1e-3 * 0.999 ** t[0]
            t[0] += 1
        comm.Barrier()
        opt.step()
        return dict(opt.last_step_seconds)
    return one


def timed(fn):
    """A raw case's result: the seconds fn() took, as comm and wall."""
    t0 = perf()
    fn()
    dt = perf() - t0
    return {"check": 0.0, "comm": dt, "compute": 0.0, "wall": dt}


def round_up(n):
    return -(-n // LINE) * LINE


def raw_allreduce(n, grads, comm, bucket_elements=None):
    """A case: what DataParallel's reduction is made of, alone: Allreduce in place of the
    n-float32 arena (padded to a line, as the arena is), whole or in DataParallel's buckets
    (bucket_elements rounded up to a line, the last bucket first).  Refilled before each rep:
    summing in place doubles the values."""
    total = round_up(n)
    buf = np.zeros(total, np.float32)
    step = total if bucket_elements is None else round_up(bucket_elements)
    buckets = [buf[a:a + step] for a in range(0, total, step)][::-1]

    def reduce():
        for b in buckets:
            comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM)

    def one():
        buf[:n] = grads
        comm.Barrier()
        return timed(reduce)
    return one


def zero_bounds(n, size):
    total = round_up(n)
    granule = NORM_BLOCK if total >= NORM_BLOCK * size else LINE
    chunk = -(-(-(-total // size)) // granule) * granule
    bounds = [min(r * chunk, total) for r in range(size + 1)]
    bounds[-1] = total
    return bounds


def raw_zero(n, grads, comm, bucket_elements=None):
    """A case: ZeRO's collectives alone, with its shard layout.  Whole: Reduce_scatter of the
    gradient arena into this rank's shard, then Allgatherv in place of the params arena.  In
    buckets, as ZeroRedundancyOptimizer's docstring describes its pipelined step: piece k of
    every rank's shard reduced to its rank (one Ireduce per rank), then gathered, row by
    row (whole when the shards fit in one row, as ZeRO then does)."""
    size, rank = comm.Get_size(), comm.Get_rank()
    bounds = zero_bounds(n, size)
    counts = [b - a for a, b in zip(bounds, bounds[1:])]
    displs = bounds[:-1]
    full, params = np.zeros(bounds[-1], np.float32), np.zeros(bounds[-1], np.float32)
    lo = bounds[rank]
    shard = np.empty(counts[rank], np.float32)
    step = None if bucket_elements is None else round_up(bucket_elements)
    rows = [] if step is None else [
        [(min(a + k * step, b), min(a + (k + 1) * step, b)) for a, b in zip(bounds, bounds[1:])]
        for k in range(-(-max(counts) // step))]

    def whole():
        comm.Reduce_scatter([full, MPI.FLOAT], [shard, MPI.FLOAT], recvcounts=counts,
                            op=MPI.SUM)
        comm.Allgatherv(MPI.IN_PLACE, [params, counts, displs, MPI.FLOAT])

    def by_rows():
        for row in rows:
            MPI.Request.Waitall([comm.Ireduce(full[a:b], shard[a - lo:b - lo] if r == rank
                                              else None, op=MPI.SUM, root=r)
                                 for r, (a, b) in enumerate(row) if b > a])
            comm.Allgatherv(MPI.IN_PLACE, [params, [b - a for a, b in row],
                                           [a for a, _ in row], MPI.FLOAT])

    def one():
        full[:n] = grads
        comm.Barrier()
        return timed(by_rows if len(rows) > 1 else whole)
    return one


def raw_case(wrapper, n, grads, comm, bucket_elements=None):
    return (raw_allreduce if wrapper == "DataParallel" else raw_zero)(n, grads, comm,
                                                                      bucket_elements)


def buckets_name(b):
    if b is None:
        return "one"
    if isinstance(b, str):
        return b
    k = int(b).bit_length() - 1
    return f"2**{k}" if b == 1 << k else str(b)


def key_name(k):
    """A case's label as a string (JSON keys): ('ZeRO-1', 'raw', None) -> 'ZeRO-1 raw one'."""
    return " ".join(buckets_name(x) for x in k) if isinstance(k, tuple) else str(k)


def fmt(x, scale, width, prec):
    return f"{'n/a':>{width}}" if x is None else f"{x * scale:>{width}.{prec}f}"


# ---- 1. the step split ----------------------------------------------------------------------

CONFIGS = (("one", None, False), ("default", DEFAULT_BUCKET_ELEMENTS, False),
           ("default +lr", DEFAULT_BUCKET_ELEMENTS, True))
RAW_NAMES = {("DataParallel", None): "Allreduce", ("DataParallel", "b"): "Allreduce",
             ("ZeRO-1", None): "RS+AGv", ("ZeRO-1", "b"): "Ireduce+AGv"}


def step_split(sizes, reps, comm):
    """-> one row per (size, wrapper, config) and per raw collective: medians and samples."""
    out = []
    many = comm.Get_size() > 1
    for n in sizes:
        grads = np.random.default_rng(comm.Get_rank()).standard_normal(n).astype(np.float32)
        cases, opts = {}, {}
        for w in WRAPPERS:
            for label, b, schedule in CONFIGS:
                opts[w, label] = opt = make(w, n, b, comm)
                cases[w, label] = stepping(opt, grads, comm, schedule)
            if many:
                for b in (None, DEFAULT_BUCKET_ELEMENTS):
                    cases[w, "raw", b] = raw_case(w, n, grads, comm, b)
        k = reps * (20 if n < 1e5 else 1)          # small steps are cheap and noisy
        medians, samples = interleave(cases, k)
        for w in WRAPPERS:
            raw = {b: medians[w, "raw", b]["wall"] if many else None
                   for b in (None, DEFAULT_BUCKET_ELEMENTS)}
            one = medians[w, "one"]
            for label, b, _ in CONFIGS:
                out.append(dict(wrapper=w, params=n, config=label, buckets=b, reps=k,
                                **medians[w, label], raw=raw[None], raw_same=raw[b],
                                serial=one["comm"] + one["compute"],
                                state_bytes=max(comm.allgather(opts[w, label].state_nbytes)),
                                wall_samples=[x["wall"] for x in samples[w, label]]))
            for b in (None, DEFAULT_BUCKET_ELEMENTS):
                out.append(dict(wrapper=w, params=n, config="raw", buckets=b, reps=k,
                                raw=raw[b],
                                spread=medians[w, "raw", b]["spread"] if many else None,
                                wall_samples=[x["wall"] for x in samples[w, "raw", b]]
                                if many else []))
        del opts, cases
    return out


def print_split(rows, size):
    print(f"{'wrapper':13} {'params':>6} {'buckets':>21} {'check us':>8} {'comm ms':>8} "
          f"{'compute ms':>10} {'wall ms':>8} {'spread':>6} {'wall/raw':>8} "
          f"{'comm/same raw':>13} {'wall/serial':>11} {'state MB/rank':>13}")
    for r in rows:
        n, b = r["params"], r["buckets"]
        if r["config"] == "raw":
            name = "raw " + RAW_NAMES[r["wrapper"], None if b is None else "b"] + (
                "" if b is None else " " + buckets_name(b))
            gbs = "" if r["raw"] is None else f"   ({4 * n / r['raw'] / 1e9:.2f} GB/s)"
            print(f"{'':13} {n:>6.0e} {name:>21} {'':8} {fmt(r['raw'], 1e3, 8, 3)} {'':10} "
                  f"{fmt(r['raw'], 1e3, 8, 3)} {fmt(r['spread'], 100, 5, 0)}%{gbs}")
            continue
        label = r["config"].replace("default", buckets_name(DEFAULT_BUCKET_ELEMENTS))
        wall_raw = None if r["raw"] is None else r["wall"] / r["raw"]
        comm_raw = None if r["raw_same"] is None else r["comm"] / r["raw_same"]
        print(f"{r['wrapper']:13} {n:>6.0e} {label:>21} {r['check'] * 1e6:>8.1f} "
              f"{r['comm'] * 1e3:>8.3f} {r['compute'] * 1e3:>10.3f} {r['wall'] * 1e3:>8.3f} "
              f"{r['spread'] * 100:>5.0f}% {fmt(wall_raw, 1, 8, 2)} {fmt(comm_raw, 1, 13, 2)} "
              f"{r['wall'] / r['serial']:>11.2f} {r['state_bytes'] / 1e6:>13.1f}")
    if size == 1:
        print("(one rank: no collective runs; comm is 0 and the raw columns are n/a)")


# ---- 2. the bucket sweep --------------------------------------------------------------------

def sweep(n, reps, comm):
    many = comm.Get_size() > 1
    grads = np.random.default_rng(comm.Get_rank()).standard_normal(n).astype(np.float32)
    cases = {}
    for w in WRAPPERS:
        for b in SWEEP_BUCKETS:
            cases[w, b] = stepping(make(w, n, b, comm), grads, comm)
            if many:
                cases[w, "raw", b] = raw_case(w, n, grads, comm, b)
    return interleave(cases, reps)


def print_sweep(medians, size):
    def raw(w, b):
        return medians[w, "raw", b]["wall"] if size > 1 else None

    print(f"{'bucket_elements':>15} {'MiB':>6} " + "".join(
        f"  {w + ' wall ms':>18} {'spread':>6} {'comm':>7} {'compute':>7} {'vs one':>6} "
        f"{'raw':>7}" for w in WRAPPERS))
    for b in SWEEP_BUCKETS:
        cells = []
        for w in WRAPPERS:
            m, one = medians[w, b], medians[w, None]
            cells.append(f"  {m['wall'] * 1e3:>18.3f} {m['spread'] * 100:>5.0f}% "
                         f"{m['comm'] * 1e3:>7.3f} {m['compute'] * 1e3:>7.3f} "
                         f"{m['wall'] / one['wall']:>6.2f} {fmt(raw(w, b), 1e3, 7, 3)}")
        mib = "" if b is None else f"{4 * b / 2 ** 20:.2f}"
        mark = " *" if b == DEFAULT_BUCKET_ELEMENTS else "  "   # DataParallel's default
        print(f"{buckets_name(b) + mark:>15} {mib:>6} " + "".join(cells))
    for w in WRAPPERS:
        best = min(SWEEP_BUCKETS, key=lambda b: medians[w, b]["wall"])
        default = DEFAULT_BUCKET_ELEMENTS if w == "DataParallel" else None
        d = medians[w, default]["wall"]
        print(f"{w}: fastest here {buckets_name(best)} "
              f"({medians[w, best]['wall'] * 1e3:.3f} ms); its default "
              f"{buckets_name(default)} {d * 1e3:.3f} ms "
              f"({d / medians[w, best]['wall']:.2f}x the fastest)")


# ---- 3. grad_ready on the MLP ---------------------------------------------------------------

def backward_marking(opt, p, g, acts, dlogits, n_layers):
    """train_mlp.backward's arithmetic, operation for operation, with opt.grad_ready(name)
    called as soon as each gradient is written: the reduction of the last layers' buckets
    then runs while the earlier layers' gradients are computed."""
    d = dlogits
    for i in reversed(range(n_layers)):
        np.matmul(acts[i].T, d, out=g[f"w{i}"])
        opt.grad_ready(f"w{i}")
        np.sum(d, axis=0, out=g[f"b{i}"])
        opt.grad_ready(f"b{i}")
        if i > 0:
            d = d @ p[f"w{i}"].T
            d *= acts[i] > 0


def mlp(width, batch, steps, comm):
    size, rank = comm.Get_size(), comm.Get_rank()
    x_train, y_train, _, _ = load_digits_split()
    sizes = layer_sizes(width, x_train.shape[1], int(y_train.max()) + 1)
    L = len(sizes) - 1
    if size * batch > len(x_train):
        raise SystemExit(f"--batch {batch} x {size} ranks is more than the {len(x_train)} "
                         "training samples")
    init = init_params(sizes, np.random.default_rng(0))
    n_params = sum(a.size for a in init.values())
    # the same global batches on every rank (same seed); rank r takes its slice of each
    order = np.random.default_rng(1)
    warmup = 2
    batches = [order.choice(len(x_train), size * batch, replace=False)[rank * batch:
                                                                       (rank + 1) * batch]
               for _ in range(warmup + steps)]
    models = {v: DataParallel(fastopt.AdamW(init, lr=1e-3), comm) for v in ("plain", "grad_ready")}
    t_of = {v: 0 for v in models}
    losses = {v: [] for v in models}

    def variant(v):
        opt = models[v]
        p, g = opt.params, opt.grads

        def one():
            idx = batches[t_of[v]]
            t_of[v] += 1
            x, y = x_train[idx], y_train[idx]
            comm.Barrier()
            t0 = perf()
            acts = forward(p, x, L)
            loss, dlogits = softmax_cross_entropy(acts[-1], y)
            if v == "plain":
                backward(p, g, acts, dlogits, L)
            else:
                backward_marking(opt, p, g, acts, dlogits, L)
            t1 = perf()
            opt.step()
            t2 = perf()
            losses[v].append(loss)
            s = opt.last_step_seconds
            return {"train step": t2 - t0, "fwd+bwd": t1 - t0, "step()": t2 - t1,
                    "comm": s["comm"], "compute": s["compute"], "check": s["check"]}
        return one

    cases = {v: variant(v) for v in models}
    n_arena = models["plain"].flat_grads.size
    if size > 1:
        grads = np.random.default_rng(rank).standard_normal(n_arena).astype(np.float32)
        for b in (None, DEFAULT_BUCKET_ELEMENTS):
            cases["raw", b] = raw_allreduce(n_arena, grads, comm, b)
    medians, _ = interleave(cases, steps, warmup, main="train step")
    a, b = models["plain"].flat_params, models["grad_ready"].flat_params
    same = bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))
    digest = hashlib.sha256(a.tobytes()).hexdigest()
    everyone = comm.allgather((same, digest))
    # raised on every rank alike (every rank has everyone's answers), not under `python -O`'s
    # stripped asserts
    differ = [r for r, (s, _) in enumerate(everyone) if not s]
    if differ:
        raise RuntimeError(f"plain and grad_ready params differ on rank(s) {differ}")
    if any(d != everyone[0][1] for _, d in everyone):
        raise RuntimeError("the ranks' params differ")
    if comm.allreduce(losses["plain"] != losses["grad_ready"], op=MPI.LOR):
        raise RuntimeError("plain and grad_ready losses differ")
    if size > 1:
        idle = comm.bcast(medians["plain"]["fwd+bwd"], root=0)
        medians.update(idle_control(init, idle, steps, comm))
    return dict(width=width, layers=sizes, params=n_params, arena=n_arena, batch=batch,
                steps=steps, medians=medians, loss_first=losses["plain"][0],
                loss_last=losses["plain"][-1])


def idle_control(init, seconds, steps, comm):
    """The control: the same DataParallel(AdamW) over the MLP's layout, fixed gradients, and
    a time.sleep(seconds) where the backward pass was, the cores left idle; "grad_ready"
    marks every gradient ready before the sleep.  It shows what the communication thread
    does when a core is free for it (a machine with more cores than ranks, or a backward pass
    that waits on an accelerator)."""
    opt = DataParallel(fastopt.AdamW(init, lr=1e-3), comm)
    names = list(init)[::-1]
    grads = np.random.default_rng(comm.Get_rank()).standard_normal(
        opt.flat_grads.size).astype(np.float32)

    def case(mark):
        def one():
            opt.flat_grads[...] = grads
            comm.Barrier()
            t0 = perf()
            if mark:
                for name in names:
                    opt.grad_ready(name)
            time.sleep(seconds)
            t1 = perf()
            opt.step()
            t2 = perf()
            s = opt.last_step_seconds
            return {"train step": t2 - t0, "fwd+bwd": t1 - t0, "step()": t2 - t1,
                    "comm": s["comm"], "compute": s["compute"], "check": s["check"]}
        return one
    medians, _ = interleave({"idle, plain": case(False), "idle, grad_ready": case(True)},
                            steps, main="train step")
    return medians


def print_mlp(r, size):
    m = r["medians"]

    def row(v):
        s = m[v]
        print(f"{v:19} {s['train step'] * 1e3:>13.3f} {s['spread'] * 100:>5.0f}% "
              f"{s['fwd+bwd'] * 1e3:>10.3f} {s['step()'] * 1e3:>9.3f} "
              f"{s['comm'] * 1e3:>8.3f} {s['compute'] * 1e3:>10.3f} {s['check'] * 1e6:>8.1f}")
    print(f"{'variant':19} {'train step ms':>13} {'spread':>6} {'fwd+bwd ms':>10} "
          f"{'step() ms':>9} {'comm ms':>8} {'compute ms':>10} {'check us':>8}")
    for v in ("plain", "grad_ready"):
        row(v)
    if size > 1:
        for b in (None, DEFAULT_BUCKET_ELEMENTS):
            raw = m["raw", b]["wall"]
            name = "raw Allreduce" + ("" if b is None else " " + buckets_name(b))
            print(f"{name:19} {'':>13} {'':>6} {'':>10} {'':>9} {raw * 1e3:>8.3f}"
                  f"   ({r['arena']:.3g} float32, {4 * r['arena'] / raw / 1e9:.2f} GB/s)")
        for v in ("idle, plain", "idle, grad_ready"):
            row(v)
    p, o = m["plain"], m["grad_ready"]
    print(f"grad_ready / plain: train step {o['train step'] / p['train step']:.2f}x, "
          f"fwd+bwd {o['fwd+bwd'] / p['fwd+bwd']:.2f}x, step() {o['step()'] / p['step()']:.2f}x; "
          f"params after the timed steps bitwise identical on every rank (asserted); "
          f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")


# ---- main -----------------------------------------------------------------------------------

BUSY = 0.2          # cores used by other processes above which a section is marked "! busy"


def cpu_sample(comm):
    """(time, busy core-seconds of the whole machine, core-seconds of every rank), or None
    off Linux: a collective.  The ranks' own time is summed, so what is left of the machine's
    is other processes' (meaningful when every rank runs on this machine, as with mpiexec on
    one node)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        # user nice system idle iowait irq softirq steal: steal is the hypervisor's
        busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = None
    t = os.times()
    ours = comm.allreduce(t.user + t.system)
    return None if busy is None else (perf(), busy, ours)


def others_busy(before, after):
    """Cores other processes kept busy between two cpu_sample()s (None if unknown)."""
    if before is None or after is None:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def busy_note(before, after):
    others = others_busy(before, after)
    if others is None:
        return ""
    return (f"; other processes kept {others:.1f} cores busy meanwhile"
            + (" ! busy: these numbers are not clean" if others > BUSY else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e3,1e6,1e7", help="parameters of the step split")
    ap.add_argument("--reps", type=int, default=31,
                    help="repetitions per case (x20 under 1e5 params)")
    ap.add_argument("--sweep-size", default="1e7", help="parameters of the bucket sweep")
    ap.add_argument("--sweep-reps", type=int, default=31)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--mlp-width", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64, help="MLP samples per rank per step")
    ap.add_argument("--mlp-steps", type=int, default=60, help="timed MLP steps per variant")
    ap.add_argument("--no-mlp", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test: 1e3 and 1e5 params, the sweep at 1e6, a 256-wide MLP, "
                         "few repetitions")
    ap.add_argument("--json", help="also write every median to this file (rank 0)")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.reps, args.sweep_size, args.sweep_reps = "1e3,1e5", 5, "1e6", 5
        args.mlp_width, args.mlp_steps = 256, 5
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    root = rank == 0

    def say(*lines):
        if root:
            print(*lines, sep="\n", flush=True)

    info = fastopt.build_info()
    load0 = os.getloadavg()
    say(f"fastopt {info['version']}, isa {info['isa']}, {fastopt.get_num_threads()} thread(s) "
        f"per rank (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), {size} rank(s) on "
        f"{os.cpu_count()} cpu(s); {info['python']}, numpy {np.__version__}",
        f"MPI: {MPI.Get_library_version().splitlines()[0].strip()}; mpi4py "
        f"{__import__('mpi4py').__version__}, thread level "
        f"{'MULTIPLE' if MPI.Query_thread() >= MPI.THREAD_MULTIPLE else MPI.Query_thread()}",
        f"command: mpiexec -n {size} python {shlex.join(sys.argv)}",
        f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
        f"default bucket_elements = {buckets_name(DEFAULT_BUCKET_ELEMENTS)} = "
        f"{DEFAULT_BUCKET_ELEMENTS} ({4 * DEFAULT_BUCKET_ELEMENTS / 2 ** 20:g} MiB of float32)")
    results = {"size": size, "argv": sys.argv, "build_info": info,
               "mpi": MPI.Get_library_version().splitlines()[0].strip()}
    t_start = perf()

    sizes = [int(float(s)) for s in args.sizes.split(",")]
    c0 = cpu_sample(comm)
    rows = step_split(sizes, args.reps, comm)
    c1 = cpu_sample(comm)
    results["split"] = rows
    results["split_others_busy"] = others_busy(c0, c1)
    say("", f"## 1. AdamW step split, median of {args.reps} steps (x20 under 1e5 params), cases "
        "interleaved; buckets 'one' = bucket_elements=None, +lr = a new lr every step"
        + busy_note(c0, c1))
    if root:
        print_split(rows, size)

    if not args.no_sweep:
        n = int(float(args.sweep_size))
        c0 = cpu_sample(comm)
        medians, samples = sweep(n, args.sweep_reps, comm)
        c1 = cpu_sample(comm)
        results["sweep"] = {"params": n, "others_busy": others_busy(c0, c1),
                            "medians": {key_name(k): m for k, m in medians.items()},
                            "wall_samples": {key_name(k): [x["wall"] for x in ss]
                                             for k, ss in samples.items()}}
        say("", f"## 2. bucket_elements sweep, AdamW at {n:.0e} params, median of "
            f"{args.sweep_reps} steps, interleaved (* the default; 'vs one': wall / wall of "
            "bucket_elements=None)" + busy_note(c0, c1))
        if root:
            print_sweep(medians, size)

    if not args.no_mlp:
        c0 = cpu_sample(comm)
        r = mlp(args.mlp_width, args.batch, args.mlp_steps, comm)
        c1 = cpu_sample(comm)
        results["mlp"] = {**r, "others_busy": others_busy(c0, c1),
                          "medians": {key_name(k): v for k, v in r["medians"].items()}}
        say("", f"## 3. grad_ready: one training step of the {'-'.join(map(str, r['layers']))} "
            f"MLP ({r['params'] / 1e6:.2f}M params), {r['batch']} samples per rank, "
            f"DataParallel(AdamW), default buckets, median of {r['steps']} steps, interleaved"
            + busy_note(c0, c1))
        if root:
            print_mlp(r, size)

    load1 = os.getloadavg()
    say("", f"{perf() - t_start:.0f} s; load average at the end: "
        f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    if root and args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
