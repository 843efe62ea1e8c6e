"""Two OpenMP runtimes in one process: torch ships its own libgomp, and a repaired fastopt
wheel carries another (fastopt.libs/libgomp-<hash>.so, renamed by auditwheel so that the two
do not collide).  Whichever is imported first, fastopt's own thread setting and threadpoolctl
must still control fastopt's threads, and a step must give the same bits as in a process
without torch.

Each case runs in a fresh interpreter, since the import order is the point.  Against the
in-place build both libraries are named libgomp.so.1, so the loader keeps the first one and
the process has one runtime; .ci/run also runs this file against the installed repaired wheel
(FASTOPT_EXPECT_VENDORED=1), where the process has two."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from fastopt import _core

needs_openmp = pytest.mark.skipif(not _core.have_openmp(), reason="built without OpenMP")
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="torch is not installed")

SCRIPT = r"""
import hashlib, json, sys
order = sys.argv[1]
if order == "torch-first":
    import torch
    import fastopt
elif order == "fastopt-first":
    import fastopt
    import torch
else:
    import fastopt
import numpy as np
import threadpoolctl
from fastopt import _core

torch_threads = torch.get_num_threads() if order != "alone" else None
_core.set_min_per_thread(1000)       # 100,003 elements really split over 2 threads
out = {"digests": {}}


def run(nt):
    fastopt.set_num_threads(nt)
    rng = np.random.default_rng(0)
    opt = fastopt.AdamW([rng.standard_normal(100_003).astype(np.float32)], lr=1e-3,
                        weight_decay=0.1)
    for _ in range(5):
        opt.grads[0][...] = rng.standard_normal(100_003).astype(np.float32)
        opt.step()
    return hashlib.sha256(opt.params[0].tobytes()).hexdigest()


for nt in (1, 2):
    out["digests"][nt] = run(nt)
    assert fastopt.get_num_threads() == nt, (nt, fastopt.get_num_threads())

fastopt.set_num_threads(2)
with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
    out["limited"] = fastopt.get_num_threads()
    out["digest_limited"] = run(2) if fastopt.get_num_threads() == 1 else None
    out["limited_after_run"] = fastopt.get_num_threads()
fastopt.set_num_threads(2)
out["restored"] = fastopt.get_num_threads()
if torch_threads is not None:
    out["torch_threads_kept"] = torch.get_num_threads() == torch_threads
out["openmp_libs"] = sorted({info["filepath"] for info in threadpoolctl.threadpool_info()
                             if info["user_api"] == "openmp"})
with open("/proc/self/maps") as f:
    out["gomp_mapped"] = sorted({line.split()[-1] for line in f if "gomp" in line})
out["fastopt"] = fastopt.__file__
print(json.dumps(out))
"""


def run_case(order):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, order], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def alone():
    return run_case("alone")


@needs_openmp
@needs_torch
@pytest.mark.parametrize("order", ["torch-first", "fastopt-first"])
def test_two_openmp_runtimes_keep_threads_and_bits(order, alone):
    with_torch = run_case(order)
    # the step's bits: the same at 1 and 2 threads, with and without torch in the process
    assert alone["digests"]["1"] == alone["digests"]["2"]
    assert with_torch["digests"] == alone["digests"]
    # threadpoolctl's OpenMP limit reaches fastopt's runtime, and is undone on exit
    assert with_torch["limited"] == 1 and with_torch["limited_after_run"] == 1
    assert with_torch["digest_limited"] == alone["digests"]["1"]
    assert with_torch["restored"] == 2
    # fastopt's setting is its own: torch's thread count is not touched by it
    assert with_torch["torch_threads_kept"]
    if os.environ.get("FASTOPT_EXPECT_VENDORED") == "1":
        # the repaired wheel: fastopt's renamed libgomp beside torch's, both seen by
        # threadpoolctl (so its limit above went to both)
        assert "site-packages" in with_torch["fastopt"], with_torch["fastopt"]
        ours = [p for p in with_torch["gomp_mapped"] if "fastopt.libs" in p]
        assert ours, with_torch["gomp_mapped"]
        assert len(with_torch["gomp_mapped"]) >= 2, with_torch["gomp_mapped"]
        assert any("fastopt.libs" in p for p in with_torch["openmp_libs"])
        assert len(with_torch["openmp_libs"]) >= 2, with_torch["openmp_libs"]


@needs_openmp
def test_alone_threads_are_controlled(alone):
    """The same checks without torch (this one runs where torch is absent too)."""
    assert alone["digests"]["1"] == alone["digests"]["2"]
    assert alone["limited"] == 1 and alone["digest_limited"] == alone["digests"]["1"]
    assert alone["restored"] == 2
