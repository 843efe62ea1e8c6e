"""Data-parallel and ZeRO-1 steps over MPI: where the time goes, and the memory per rank.

    mpiexec -n 1 python bench/distributed.py
    mpiexec -n 2 python bench/distributed.py        # then compare the two tables

For AdamW at 1e3, 1e6 and 1e7 parameters (one flat tensor) and each wrapper, rank 0 prints
the median step time split into the step check (check_step and the 16-byte Allgather that
makes every rank agree on the hyperparameters and arguments), communication (Allreduce; or
Reduce_scatter + Allgather) and compute (the fused kernel), and the optimizer-state bytes each
rank holds; a second row per wrapper sets a new lr before every step (what a scheduler does),
which recomputes the hyperparameters' digest.  The check's Allgather is the step's first
collective, so "check" also holds the wait for the slowest rank (which the Allreduce held
before): its cost is the 1e3 rows, where there is little to wait for.  Each rank runs its
kernels on one thread (OMP_NUM_THREADS=1 unless set), since the ranks fill the cores.
"""
import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import fastopt  # noqa: E402
from fastopt.distributed import DataParallel, ZeroRedundancyOptimizer  # noqa: E402


def run(make, n, steps, comm, schedule):
    rng = np.random.default_rng(comm.Get_rank())
    opt = make([np.zeros(n, np.float32)])
    grads = rng.standard_normal(n).astype(np.float32)
    samples = []
    for t in range(steps + 2):
        opt.grads[0][...] = grads
        if schedule:
            opt.param_groups[0]["lr"] = 1e-3 * 0.999 ** t
        comm.Barrier()
        opt.step()
        if t >= 2:                      # the first steps allocate state
            samples.append(dict(opt.last_step_seconds))
    medians = [float(np.median([s[k] for s in samples])) for k in ("check", "comm", "compute")]
    state = opt.state_nbytes          # (DataParallel passes it on from its optimizer)
    return (*medians, comm.allgather(state))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e3,1e6,1e7")
    ap.add_argument("--steps", type=int, default=15,
                    help="steps per row (rows under 1e5 parameters take 20x as many)")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    wrappers = {
        "DataParallel": lambda ps: DataParallel(fastopt.AdamW(ps)),
        "ZeRO-1": lambda ps: ZeroRedundancyOptimizer(ps, optimizer_class=fastopt.AdamW),
    }
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        steps = args.steps * (20 if n < 1e5 else 1)
        for name, make in wrappers.items():
            for schedule in (False, True):
                rows.append((name + (" +lr" if schedule else ""), n)
                            + run(make, n, steps, comm, schedule))
    if comm.Get_rank() == 0:
        print(f"AdamW over MPI, {size} rank(s), {fastopt.build_info()['isa']}, "
              f"{fastopt.get_num_threads()} thread(s) per rank, median of {args.steps} steps "
              "(x20 under 1e5 params); +lr: a new lr before every step")
        print(f"{'wrapper':16} {'params':>7} {'check us':>9} {'comm ms':>9} {'compute ms':>11} "
              f"{'total ms':>9} {'state MB/rank':>14}")
        for name, n, ch, c, k, states in rows:
            print(f"{name:16} {n:>7.0e} {ch * 1e6:>9.1f} {c * 1e3:>9.3f} {k * 1e3:>11.3f} "
                  f"{(ch + c + k) * 1e3:>9.3f} {max(states) / 1e6:>14.1f}")


if __name__ == "__main__":
    main()
