"""fastopt.distributed under `mpiexec -n 2` and `-n 3` (each case is a function in
mpi_cases.py, run as a subprocess with a timeout so that a hang fails the test instead of the
suite)."""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import UNDER_ASAN

HERE = os.path.dirname(os.path.abspath(__file__))
# the mpich wheel puts mpiexec beside the interpreter, which may not be on PATH
MPIEXEC = shutil.which("mpiexec") or shutil.which(
    "mpiexec", path=os.path.dirname(sys.executable))
try:
    import mpi4py  # noqa: F401
    MISSING = None if MPIEXEC else "mpiexec is not on PATH (pip install mpich)"
except ImportError:
    MISSING = "mpi4py is not installed (pip install mpich mpi4py, or the [test] extra)"

pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

CASES = {
    "compressed_state": "ZeRO and DataParallel with int8 and stochastic bfloat16 state, with "
                        "and without buckets, equal one process bit for bit (gathered state "
                        "and state_values too); a ZeRO checkpoint resumes on one process",
    "data_parallel": "params after 12 DataParallel steps on 2 ranks, with clipping on every "
                     "other step, equal bit for bit one process stepping with the average",
    "data_parallel_buckets": "bucketed Allreduce gives the same params as one Allreduce",
    "zero": "ZeRO-1 on 2 ranks equals one process bit for bit; its gathered state_dict is the "
            "single-process one; each rank holds half the state",
    "zero_resume": "a 2-rank checkpoint resumes on 1 process and on 2 ranks, and a 1-process "
                   "checkpoint on 2 ranks, all bit-identical",
    "zero_checkpoint_memory": "ZeRO's save holds about one full state buffer extra on rank 0 "
                              "and none on rank 1; load none on either",
    "zero_save_failure": "rank 0 failing to write a checkpoint (no folder, no room for a "
                         "buffer) raises there, a RuntimeError on the other rank, no hang",
    "refused_before_reduction": "a per-step scalar past float32, or another thread holding "
                                "one rank's optimizer: every rank raises before any "
                                "collective, the gradients stay unreduced",
    "layout_mismatch": "different models on the ranks: a ValueError on every rank, no hang",
    "size_one": "a communicator of size 1: both wrappers are the plain optimizer",
    "every_class": "every optimizer class (with all its state buffers) under DataParallel and "
                   "ZeRO-1 on 2 ranks equals one process bit for bit, gathered state included",
    "bad_step_arguments": "a bad step argument or group lr raises on both ranks before the "
                          "gradients are reduced; the next step sums them once",
    "bad_argument_on_one_rank": "a bad value or a raising closure on one rank: both ranks "
                                "raise (the other names it), no hang, nothing changed",
    "settings_differ_at_construction": "different lr, betas, skip_nonfinite or bucket_elements "
                                       "on the ranks: a ValueError on both naming it",
    "hyperparameter_changes_on_one_rank": "rank 1 alone changes an lr: both ranks raise at "
                                          "that step, before the reduction; set back, the run "
                                          "equals one process",
    "scheduler_on_every_rank": "an lr scheduler on every rank: no error, equal to one process",
    "zero_clip_and_skip": "every class under ZeRO, shards on norm blocks or lines (an empty "
                          "one too): max_grad_norm in the 2-, 1- and inf-norm and "
                          "skip_nonfinite (NaN, inf, an overflowing product on one rank) equal "
                          "one process bit for bit, last_grad_norm and skipped_steps included",
    "data_parallel_pipeline": "DataParallel with buckets of 16 to DEFAULT_BUCKET_ELEMENTS "
                              "elements equals one bucket and one process bit for bit, with "
                              "zero_grad, clipping, a NaN skipped and an lr changing each step",
    "zero_pipeline": "ZeRO stepping bucket by bucket equals one bucket and one process bit for "
                     "bit; each rank's state is its shard, cut as documented",
    "grad_ready": "grad_ready starts the sums before step() on a thread, in any marking order; "
                  "bad marks raise; zero_grad, a refused step and allreduce_grads leave every "
                  "bucket summed once; equal to a plain step and one process bit for bit",
    "abort_on_error": "abort_on_error=False or one rank installs no excepthook; the default "
                      "installs it once",
    "refused_mid_backward": "a closure that marks gradients ready and raises half-way on one "
                            "rank: every rank refuses, every rank has issued the same bucket "
                            "collectives, and the run goes on equal to one process",
    "allreduce_grads_each_step": "allreduce_grads() then the wrapped optimizer's step, step "
                                 "after step, sums every step's gradients once",
    "many_wrappers": "2100 wrappers on one communicator: no communicator or thread runs out",
}

# Cases that hold with any number of ranks, run on 3 as well: MPI may add 3 ranks' gradients
# in another order, so these use gradients whose sum is exact in any order, and compare with
# one process stepping the sum with grad_multiplier 1/3.
CASES3 = {
    "compressed_state": "ZeRO and DataParallel with int8 and stochastic bfloat16 state on 3 "
                        "ranks (shards and buckets on whole blocks) equal one process",
    "zero_clip_and_skip": "clipping and skip_nonfinite under ZeRO on 3 ranks (one with an "
                          "empty shard) equal one process bit for bit",
    "data_parallel_pipeline": "DataParallel's buckets on 3 ranks equal one bucket and one "
                              "process bit for bit",
    "zero_pipeline": "ZeRO's pieces on 3 ranks equal one bucket and one process bit for bit",
    "grad_ready": "grad_ready's sums on 3 ranks, each bucket summed once",
    "refused_mid_backward": "a step refused half-way through a marking backward pass on 3 "
                            "ranks: no rank left in a collective, the run goes on",
}

# Rank 1 raises an exception that nothing catches while rank 0 waits in a collective: the
# installed excepthook prints the traceback and MPI_Abort ends the job.
ABORTS = {
    "abort_in_step": "rank 0 waits in DataParallel.step()",
    "abort_with_reductions_started": "rank 0's communication thread is in a bucket's "
                                     "Allreduce (grad_ready), its main thread in step()",
    "abort_in_zero_step": "rank 0 waits in ZeroRedundancyOptimizer.step()",
    "abort_in_thread": "rank 1's exception is in a thread, its main thread alive",
    "abort_before_wrapper": "the hook installed first: rank 1 dies before building its "
                            "wrapper, rank 0 waits in the construction's collective",
}


def run(case, ranks, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")   # the ranks already fill the cores
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable,
                           os.path.join(HERE, "mpi_cases.py"), case],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_passed(case, ranks):
    proc = run(case, ranks)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for rank in range(ranks):
        assert f"PASS {case} rank {rank}" in out, out[-3000:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_under_mpiexec(case):
    if case == "zero_checkpoint_memory" and UNDER_ASAN:
        pytest.skip("resident memory under AddressSanitizer is its allocator's, not fastopt's")
    assert_passed(case, 2)


@pytest.mark.parametrize("case", sorted(CASES3))
def test_under_mpiexec_three_ranks(case):
    assert_passed(case, 3)


@pytest.mark.parametrize("case", sorted(ABORTS))
def test_uncaught_exception_ends_the_job(case):
    """No hung job: rank 1's traceback is printed, then MPI_Abort ends every rank within
    seconds (a hang would reach the 120 s timeout)."""
    start = time.monotonic()
    proc = run(case, 2, timeout=120)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert elapsed < 30, (elapsed, out[-3000:])
    in_thread = " in thread 'worker'" if case == "abort_in_thread" else ""
    for words in ("Traceback", "RuntimeError: boom on rank 1",
                  "fastopt.distributed: rank 1 of 2 ended with an uncaught RuntimeError"
                  + in_thread + "; MPI_Abort ends the job"):
        assert words in out, (words, out[-3000:])
    assert "PASS" not in out, out[-3000:]


def test_every_case_is_in_a_table():
    """Every case function in mpi_cases.py is run by a test, and every table entry exists."""
    with open(os.path.join(HERE, "mpi_cases.py")) as f:
        defined = set(re.findall(r"^def case_(\w+)\(", f.read(), re.M))
    assert defined == set(CASES) | set(ABORTS), defined ^ (set(CASES) | set(ABORTS))
    assert set(CASES3) <= set(CASES)


def test_missing_mpi4py_is_a_clear_error(monkeypatch):
    import builtins

    import numpy as np

    import fastopt
    from fastopt import distributed
    real_import = builtins.__import__

    def no_mpi(name, *args, **kw):
        if name.startswith("mpi4py"):
            raise ImportError("no mpi4py here")
        return real_import(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_mpi)
    with pytest.raises(ImportError, match="fastopt.distributed needs mpi4py"):
        distributed.DataParallel(fastopt.SGD([np.ones(3, np.float32)]))


def test_readme_example_trains_under_mpiexec(tmp_path):
    import re
    with open(os.path.join(HERE, "..", "README.md")) as f:
        code = [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S)
                if "DataParallel" in b][0]
    script = tmp_path / "train.py"
    script.write_text(code)
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script)], capture_output=True,
                          text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    loss = float(proc.stdout.split()[-1])
    assert loss < 1e-3


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "64", np.float32(8)])
def test_bad_bucket_elements_is_a_clear_error(bad):
    """A bucket size that is not an int >= 1 (or None) is refused by name, by both wrappers,
    before any collective; a NumPy integer is an int."""
    from mpi4py import MPI

    import fastopt
    from fastopt.distributed import DataParallel, ZeroRedundancyOptimizer
    opt = fastopt.SGD([np.ones(40, np.float32)], lr=0.1)
    with pytest.raises(ValueError, match="bucket_elements must be an int >= 1 or None"):
        DataParallel(opt, comm=MPI.COMM_SELF, bucket_elements=bad)
    with pytest.raises(ValueError, match="bucket_elements must be an int >= 1 or None"):
        ZeroRedundancyOptimizer([np.ones(40, np.float32)], optimizer_class=fastopt.SGD,
                                comm=MPI.COMM_SELF, bucket_elements=bad, lr=0.1)
    dp = DataParallel(opt, comm=MPI.COMM_SELF, bucket_elements=np.int64(64))
    assert dp.bucket_elements == 64 and type(dp.bucket_elements) is int
