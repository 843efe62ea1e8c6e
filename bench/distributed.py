"""Data-parallel and ZeRO-1 steps over MPI: where the time goes, and the memory per rank.

    mpiexec -n 1 python bench/distributed.py
    mpiexec -n 2 python bench/distributed.py        # then compare the two tables

For AdamW at 1e6 and 1e7 parameters (one flat tensor) and each wrapper, rank 0 prints the
median step time split into communication (Allreduce; or Reduce_scatter + Allgather) and
compute (the fused kernel), and the optimizer-state bytes each rank holds.  Each rank runs
its kernels on one thread (OMP_NUM_THREADS=1 unless set), since the ranks fill the cores.
"""
import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import fastopt  # noqa: E402
from fastopt.distributed import DataParallel, ZeroRedundancyOptimizer  # noqa: E402


def run(make, n, steps, comm):
    rng = np.random.default_rng(comm.Get_rank())
    opt = make([np.zeros(n, np.float32)])
    grads = rng.standard_normal(n).astype(np.float32)
    samples = []
    for t in range(steps + 2):
        opt.grads[0][...] = grads
        comm.Barrier()
        opt.step()
        if t >= 2:                      # the first steps allocate state
            samples.append(dict(opt.last_step_seconds))
    comm_s = float(np.median([s["comm"] for s in samples]))
    compute_s = float(np.median([s["compute"] for s in samples]))
    state = opt.state_nbytes          # (DataParallel passes it on from its optimizer)
    return comm_s, compute_s, comm.allgather(state)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e6,1e7")
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    wrappers = {
        "DataParallel": lambda ps: DataParallel(fastopt.AdamW(ps)),
        "ZeRO-1": lambda ps: ZeroRedundancyOptimizer(ps, optimizer_class=fastopt.AdamW),
    }
    rows = []
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        for name, make in wrappers.items():
            rows.append((name, n) + run(make, n, args.steps, comm))
    if comm.Get_rank() == 0:
        print(f"AdamW over MPI, {size} rank(s), {fastopt.build_info()['isa']}, "
              f"{fastopt.get_num_threads()} thread(s) per rank, median of {args.steps} steps")
        print(f"{'wrapper':13} {'params':>7} {'comm ms':>9} {'compute ms':>11} {'total ms':>9} "
              f"{'state MB/rank':>14}")
        for name, n, c, k, states in rows:
            print(f"{name:13} {n:>7.0e} {c * 1e3:>9.2f} {k * 1e3:>11.2f} {(c + k) * 1e3:>9.2f} "
                  f"{max(states) / 1e6:>14.1f}")


if __name__ == "__main__":
    main()
