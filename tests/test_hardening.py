"""Misuse a demanding user can fall into: threads, overflow, aliasing and hostile numbers.

Every test here failed before the fix it guards (the hardening issue lists each).
"""
import sys
import threading

import numpy as np
import pytest

import fastopt
import fastopt.reference as R

MODULES = [fastopt, R]


@pytest.fixture
def fast_switching():
    """Let threads switch every microsecond, so that races show up in a few hundred trials."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _adamw(module, n=4096, lr=1e-2):
    rng = np.random.default_rng(0)
    opt = module.AdamW([rng.standard_normal(n).astype(np.float32),
                        rng.standard_normal(7).astype(np.float32)], lr=lr, weight_decay=0.1)
    for g in opt.grads:
        g[...] = rng.standard_normal(g.shape).astype(np.float32)
    return opt


# ---- one thread at a time -------------------------------------------------------------------

def _public_calls(opt, tmp_path):
    sd = opt.state_dict()
    path = tmp_path / "held.npz"
    opt.save(path)
    return {"step": opt.step, "zero_grad": opt.zero_grad, "state_dict": opt.state_dict,
            "load_state_dict": lambda: opt.load_state_dict(sd),
            "save": lambda: opt.save(tmp_path / "other.npz"), "load": lambda: opt.load(path)}


@pytest.mark.parametrize("module", MODULES, ids=["fastopt", "reference"])
@pytest.mark.parametrize("holder", ["step", "exclusive"])
def test_every_public_call_refuses_to_overlap_another_thread(module, holder, tmp_path):
    opt = _adamw(module)
    opt.step()
    calls = _public_calls(opt, tmp_path)
    before = (opt.flat_params.copy(), opt.step_counts)
    inside, release = threading.Event(), threading.Event()

    def hold():
        if holder == "step":
            opt.step(closure=lambda: (inside.set(), release.wait(10), 0.0)[-1])
        else:
            with opt.exclusive("save"):
                inside.set()
                release.wait(10)
    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(10)
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match=f"{name}\\(\\): another thread is in a "
                                                   "call on this optimizer"):
                call()
        assert np.array_equal(opt.flat_params, before[0]) and opt.step_counts == before[1]
    finally:
        release.set()
        t.join()
    for call in calls.values():          # free again: every call works
        call()


@pytest.mark.parametrize("module", MODULES, ids=["fastopt", "reference"])
def test_a_closure_may_call_the_optimizer_from_the_same_thread(module):
    opt = _adamw(module)
    loss = opt.step(closure=lambda: (opt.state_dict(), opt.zero_grad(), 1.5)[-1])
    assert loss == 1.5 and opt.step_counts == [1] and not opt.flat_grads.any()


def test_threads_racing_to_step_never_mix_state(fast_switching):
    """Two threads step one optimizer (fresh each trial, so the first step also allocates
    the state); a refused call is retried.  Every trial must end exactly where the same
    number of sequential steps ends, with state_dict attached to the buffers the kernel
    updates.  Before the lock: mixed params, a lost step, or a use-after-free."""
    expected = _adamw(fastopt, n=50_000)
    for _ in range(4):
        expected.step()
    refused = 0
    for trial in range(60):
        opt = _adamw(fastopt, n=50_000)

        def worker():
            nonlocal refused
            done = 0
            while done < 2:
                try:
                    opt.step()
                    done += 1
                except RuntimeError:
                    refused += 1
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert opt.step_counts == [4]
        assert np.array_equal(opt.flat_params, expected.flat_params), f"trial {trial}"
        sd, want = opt.state_dict()["state"], expected.state_dict()["state"]
        for k in want:
            for key in ("exp_avg", "exp_avg_sq"):
                assert np.array_equal(sd[k][key], want[k][key]), (trial, k, key)
            assert sd[k]["step"] == 4
        opt.step()                            # the state the kernel updates is state_dict's
        assert not np.array_equal(opt.state_dict()["state"][0]["exp_avg"], sd[0]["exp_avg"])
    assert refused > 0, "the threads never overlapped: the test proves nothing"
