"""Threads, the fused zero_grad and grad multiplier: faster paths that must not change a bit."""
import numpy as np
import pytest

import fastopt
import fastopt.functional as F
import fastopt.reference as R
from fastopt import _core
from cases import (ALL_CASES, FULL_STATE, assert_bitwise, config_id, gradients, initial_param,
                   initial_state, kernel_kwargs, run_functional)
from fastopt.families import FAMILIES

needs_openmp = pytest.mark.skipif(not _core.have_openmp(), reason="built without OpenMP")


@needs_openmp
@pytest.mark.parametrize("family,cfg", ALL_CASES[::3], ids=[f"{f}[{config_id(c)}]"
                                                            for f, c in ALL_CASES[::3]])
def test_thread_counts_give_bitwise_identical_results(threads, family, cfg):
    n = 10007
    p0, grads = initial_param(n, 21), gradients(n, 30, 21)[:30]
    results = []
    for nt in (1, 2, 3):
        threads(nt, min_per_thread=100)    # every count really splits the 10,007 elements
        results.append(run_functional(F, family, cfg, p0, grads))
    for p, state in results[1:]:
        assert_bitwise(p, results[0][0], "param across thread counts")
        for k in state:
            assert_bitwise(state[k], results[0][1][k], f"{k} across thread counts")


@needs_openmp
def test_threads_split_across_group_boundaries(threads):
    """Chunks that start and end inside groups with different hyperparameters."""
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in (1000, 37, 2048, 5, 999)]
    groups = [{"params": params[:2], "lr": 0.01}, {"params": params[2:3], "lr": 0.02,
                                                    "amsgrad": True},
              {"params": params[3:], "lr": 0.03, "weight_decay": 0.1}]
    runs = []
    for nt in (1, 2, 5):
        threads(nt, min_per_thread=64)
        opt = fastopt.Adam([dict(g) for g in groups])
        for t in range(5):
            for k, g in enumerate(opt.grads):
                g[...] = np.sin(np.arange(g.size) * (k + 1) + t).reshape(g.shape)
            opt.step()
        runs.append(opt)
    for opt in runs[1:]:
        for a, b in zip(opt.params, runs[0].params):
            assert_bitwise(a, b, "param")
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_bitwise(opt._state[key].data[0], runs[0]._state[key].data[0], key)


def test_thread_count_api():
    n = fastopt.get_num_threads()
    assert n >= 1
    with pytest.raises(ValueError, match="n must be from 1 to 65536"):
        fastopt.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be an int"):
        fastopt.set_num_threads("2")
    fastopt.set_num_threads(1)
    assert fastopt.get_num_threads() == 1
    assert fastopt.build_info()["num_threads"] == 1
    fastopt.set_num_threads(n)


@needs_openmp
def test_threadpoolctl_sees_and_limits_the_threads():
    import threadpoolctl
    before = fastopt.get_num_threads()
    fastopt.set_num_threads(2)
    try:
        apis = {info["user_api"] for info in threadpoolctl.threadpool_info()}
        assert "openmp" in apis
        assert fastopt.get_num_threads() == 2
        with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
            assert fastopt.get_num_threads() == 1
        assert fastopt.get_num_threads() == 2
    finally:
        fastopt.set_num_threads(before)


def test_one_thread_unless_asked():
    """The default is one thread (a busy machine stalls parallel regions); OMP_NUM_THREADS or
    set_num_threads ask for more."""
    code = "import fastopt; print(fastopt.get_num_threads())"
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env, check=True)
    assert out.stdout.strip() == "1"


# ---- zero_grad and grad_multiplier inside the step ---------------------------------------

@pytest.mark.parametrize("module", [F, R], ids=["fastopt", "reference"])
@pytest.mark.parametrize("family,cfg", ALL_CASES[::2], ids=[f"{f}[{config_id(c)}]"
                                                            for f, c in ALL_CASES[::2]])
def test_fused_extras_change_no_bit(module, family, cfg):
    """step(grad_multiplier=c, zero_grad=True) == scale the gradient, step, zero it."""
    n = 1003
    p0, grads = initial_param(n, 9), gradients(n, 8, 9)[:8]
    c = 0.37
    plain = run_functional(module, family, cfg, p0, [g * np.float32(c) for g in grads])
    fn = getattr(module, family + "_")
    p = p0.copy()
    state = initial_state(family, cfg, n)
    kw, _ = kernel_kwargs(family, cfg)
    counters = dict(FAMILIES[family].counter_defaults)
    for t, g in enumerate(grads, start=1):
        g = g.copy()
        out = fn(p, g, *[state.get(k) for k in FAMILIES[family].buffer_names], step=t,
                 grad_multiplier=c, zero_grad=True, **kw, **counters)
        counters.update(out or {})
        assert not g.any(), "the gradient was not zeroed"
    assert_bitwise(p, plain[0], "param")
    for k in state:
        assert_bitwise(state[k], plain[1][k], k)


@pytest.mark.parametrize("module", [fastopt, R], ids=["fastopt", "reference"])
@pytest.mark.parametrize("cls", sorted(FULL_STATE))
def test_step_zero_grad_matches_step_then_zero_grad(module, cls):
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(s).astype(np.float32) for s in ((7, 3), (5,), (40,))]
    kw = FULL_STATE[cls]
    a = getattr(module, cls)(params, **kw)
    b = getattr(module, cls)(params, **kw)
    for t in range(6):
        gs = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        for o in (a, b):
            for view, g in zip(o.grads, gs):
                view[...] = g
        a.step()
        a.zero_grad()
        b.step(zero_grad=True, grad_multiplier=1.0)
        assert not b.flat_grads.any()
    assert_bitwise(a.flat_params, b.flat_params, "params")


def test_step_grad_multiplier_matches_scaled_gradients():
    rng = np.random.default_rng(4)
    params = [rng.standard_normal(50).astype(np.float32)]
    a, b = fastopt.AdamW(params), fastopt.AdamW(params)
    for _ in range(4):
        g = rng.standard_normal(50).astype(np.float32)
        a.grads[0][...] = g * np.float32(0.25)
        b.grads[0][...] = g
        a.step()
        b.step(grad_multiplier=0.25)
        assert_bitwise(b.grads[0], g, "the gradient is left as it was")
    assert_bitwise(a.flat_params, b.flat_params, "params")


@pytest.mark.parametrize("kw,exc,match", [
    (dict(grad_multiplier=-1.0), ValueError, "grad_multiplier must be >= 0"),
    (dict(grad_multiplier=float("nan")), ValueError, "grad_multiplier must be finite"),
    (dict(grad_multiplier="2"), TypeError, "grad_multiplier must be a real number"),
    (dict(zero_grad=1), TypeError, "zero_grad must be a bool"),
    (dict(grad_multiplier=1e39), ValueError, "grad_multiplier must be <= 3.40282"),
    (dict(grad_multiplier=10 ** 400), ValueError, "grad_multiplier must be finite"),
    (dict(max_grad_norm=10 ** 400), ValueError, "max_grad_norm must be finite"),
    (dict(max_grad_norm=1.0, norm_type=10 ** 400), ValueError, "norm_type must be a number"),
])
def test_bad_step_options_change_nothing(kw, exc, match):
    opt = fastopt.Adam([np.ones(5, np.float32)])
    opt.grads[0][...] = 1.0
    opt.step()
    before = (opt.flat_params.copy(), opt.flat_grads.copy(), list(opt._steps))
    with pytest.raises(exc, match=match):
        opt.step(**kw)
    assert_bitwise(opt.flat_params, before[0], "params")
    assert_bitwise(opt.flat_grads, before[1], "grads")
    assert opt._steps == before[2]


def test_functional_zero_grad_needs_a_writeable_gradient():
    g = np.ones(8, np.float32)
    g.flags.writeable = False
    p = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="grad is read-only"):
        F.sgd_(p, g, step=1, zero_grad=True)
    assert (p == 1).all()


def _in_fresh_process(code, **env):
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **env}, check=True)
    return out.stdout.strip()


def test_environment_forces_the_baseline_path():
    code = "import fastopt; print(fastopt.build_info()['isa'])"
    assert _in_fresh_process(code, FASTOPT_ISA="baseline") == "baseline"
    assert _in_fresh_process(code) == _core.available_isas()[-1]


@needs_openmp
def test_omp_num_threads_is_honoured():
    code = "import fastopt; print(fastopt.get_num_threads())"
    assert _in_fresh_process(code, OMP_NUM_THREADS="1") == "1"
    assert _in_fresh_process(code, OMP_NUM_THREADS="3") == "3"
