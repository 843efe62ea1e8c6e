"""Misuse a demanding user can fall into: threads, overflow, aliasing and hostile numbers.

Every test here failed before the fix it guards (the hardening issue lists each).
"""
import os
import sys
import threading

import numpy as np
import pytest

import fastopt
import fastopt.reference as R
from fastopt.families import OPTIMIZERS

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


# ---- step counts at the int64 limit ---------------------------------------------------------

@pytest.mark.parametrize("module", MODULES, ids=["fastopt", "reference"])
def test_step_count_reaches_the_int64_limit_and_stops_there(module):
    """A count may reach 2**63 - 1 (C's int64), no step goes past it, and the optimizer's own
    state_dict at the limit loads.  Before: a loaded 2**63 - 1 overflowed C's counter on the
    next step (every param NaN) and the state_dict after it was refused by its own loader."""
    opt = _adamw(module)
    opt.step()
    sd = opt.state_dict()
    for bad in (2 ** 63, 10 ** 400, 1e300):
        for entry in sd["state"].values():
            entry["step"] = bad
        with pytest.raises(ValueError, match="from 1 to 2\\*\\*63 - 1"):
            opt.load_state_dict(sd)
    for entry in sd["state"].values():
        entry["step"] = 2 ** 63 - 2
    opt.load_state_dict(sd)
    opt.step()
    assert opt.step_counts == [2 ** 63 - 1] and np.isfinite(opt.flat_params).all()
    at_limit = opt.flat_params.copy()
    with pytest.raises(ValueError, match="below 2\\*\\*63 - 1"):
        opt.step()
    assert np.array_equal(opt.flat_params, at_limit) and opt.step_counts == [2 ** 63 - 1]
    opt.load_state_dict(opt.state_dict())          # its own state dict, at the limit
    assert opt.step_counts == [2 ** 63 - 1]


# ---- loading the optimizer's own live views -------------------------------------------------

@pytest.mark.parametrize("module", MODULES, ids=["fastopt", "reference"])
def test_loading_its_own_live_state_views_keeps_the_values(module):
    """opt.state holds views of the arenas; loading them (even crosswise: param 0's state
    into param 1 and back) must read every value before any is overwritten, as torch does."""
    rng = np.random.default_rng(1)
    opt = module.Adam([np.ones(5, np.float32), np.ones(5, np.float32)], lr=0.1)
    for _ in range(3):
        for g in opt.grads:
            g[...] = rng.standard_normal(5).astype(np.float32)
        opt.step()
    want = opt.state_dict()
    opt.load_state_dict({"state": opt.state, "param_groups": want["param_groups"]})
    swapped = {0: opt.state[1], 1: opt.state[0]}
    opt.load_state_dict({"state": swapped, "param_groups": want["param_groups"]})
    got = opt.state_dict()["state"]
    for k, other in ((0, 1), (1, 0)):
        for key in ("exp_avg", "exp_avg_sq"):
            assert np.array_equal(got[k][key], want["state"][other][key]), (k, key)


# ---- numbers past float32 or float, keys deleted or mistyped --------------------------------

def _float_keys(spec):
    """The class's group keys that set float kernel fields (a pair counts once)."""
    fam = spec.family
    f8 = {f.name for f in fam.user_fields if f.ctype == "f8"}
    for key in spec.group_keys():
        target = spec.keys.get(key, key)
        targets = target if isinstance(target, tuple) else (target,)
        if any(t in f8 for t in targets):
            yield key, isinstance(target, tuple)


FLOAT_KEYS = [(name, key, pair) for name, spec in OPTIMIZERS.items()
              for key, pair in _float_keys(spec)]


@pytest.mark.parametrize("name,key,pair", FLOAT_KEYS, ids=[f"{n}.{k}" for n, k, _ in FLOAT_KEYS])
@pytest.mark.parametrize("value,match", [(10 ** 400, "must be finite"),
                                         (1e39, "must be (within float32's range|<)")],
                         ids=["int past float", "past float32"])
def test_every_float_hyperparameter_refuses_what_float32_cannot_hold(name, key, pair, value,
                                                                     match):
    """Before: 10**400 raised OverflowError, and 1e39 became an infinity in the kernels'
    float32 scalars (every param NaN)."""
    spec = OPTIMIZERS[name]
    x = (value, spec.defaults[key][1]) if pair else value
    with pytest.raises(ValueError, match=f"^{key}(\\[0\\])? {match}"):
        getattr(fastopt, name)([np.ones(3, np.float32)], **{key: x})


@pytest.mark.parametrize("module", MODULES, ids=["fastopt", "reference"])
def test_a_deleted_group_key_is_named_and_changes_nothing(module):
    opt = _adamw(module)
    opt.step()
    before = opt.flat_params.copy()
    lr = opt.param_groups[0].pop("lr")
    with pytest.raises(ValueError, match="param_groups\\[0\\] has no 'lr'"):
        opt.step()
    assert np.array_equal(opt.flat_params, before) and opt.step_counts == [1]
    opt.param_groups[0]["lr"] = lr
    opt.step()
    assert opt.step_counts == [2]


def test_thread_counts_that_cannot_be_honoured(tmp_path):
    """An OMP_NUM_THREADS past int's range made `import fastopt` fail; now it is a warning
    and one thread.  set_num_threads refuses such a count with a ValueError."""
    import subprocess
    code = ("import warnings, fastopt\n"
            "print(fastopt.get_num_threads())\n")
    for raw in ("3000000000", "-2", "many"):
        env = dict(__import__("os").environ, OMP_NUM_THREADS=raw)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "1"
        assert f"OMP_NUM_THREADS={raw!r} is not a thread count" in out.stderr
    with pytest.raises(ValueError, match="n must be from 1 to 65536"):
        fastopt.set_num_threads(3_000_000_000)


# ---- param group keys torch allows ---------------------------------------------------------

@pytest.mark.parametrize("module", MODULES, ids=["fastopt", "reference"])
def test_extra_group_keys_are_kept_and_torch_keys_are_stated(module):
    """{'params': ..., 'name': 'encoder'} is common in real code: kept in the group and in
    state_dict, and loaded back (before: refused).  torch's own options are in every group,
    saying what fastopt does (fused, no foreach)."""
    opt = module.AdamW([{"params": [np.ones(4, np.float32)], "name": "encoder"},
                        {"params": [np.ones(2, np.float32)], "lr": 0.1, "tags": ["head"]}],
                       foreach=True)
    assert opt.param_groups[0]["name"] == "encoder" and opt.param_groups[1]["tags"] == ["head"]
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        assert (g["fused"], g["foreach"], g["capturable"], g["differentiable"]) == \
            (True, None, False, False)
    assert sd["param_groups"][0]["name"] == "encoder"
    sd["param_groups"][0]["name"] = "decoder"
    sd["param_groups"][1]["fused"] = None             # as torch's loop would save it
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["name"] == "decoder" and opt.param_groups[1]["fused"] is True
    with pytest.raises(ValueError, match="the key 'lrr', one edit away from 'lr'"):
        module.AdamW([{"params": [np.ones(4, np.float32)], "lrr": 0.1}])


def test_torch_loading_fastopts_state_dict_stays_fused():
    torch = pytest.importorskip("torch")
    opt = fastopt.AdamW([{"params": [np.ones(16, np.float32)], "name": "w"}], lr=0.01)
    opt.grads[0][...] = 1.0
    opt.step()
    sd = opt.state_dict()
    t = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.ones(16))], "name": "w"}],
                          lr=0.01, fused=True)
    t.load_state_dict({"state": {k: {key: torch.as_tensor(v) for key, v in e.items()}
                                 for k, e in sd["state"].items()},
                       "param_groups": sd["param_groups"]})
    g = t.param_groups[0]
    assert g["fused"] is True and not g["foreach"] and g["name"] == "w"


# ---- overflow inside the step -------------------------------------------------------------

@pytest.mark.parametrize("module", MODULES, ids=["fastopt", "reference"])
@pytest.mark.parametrize("grad,multiplier,skipped", [
    (1e30, 1e10, True),                      # the case
    (2.0 ** 127, 2.0, True),                 # exactly 2**128: infinite in float32
    (2.0 ** 127, 1.9999, False),             # just below: finite, the step runs
    (3e38, 1.0, False),                      # large but representable
], ids=["1e30 x 1e10", "2**127 x 2", "2**127 x 1.9999", "3e38 x 1"])
def test_skip_nonfinite_sees_gradients_the_multiplier_makes_infinite(module, grad, multiplier,
                                                                     skipped):
    """Before: the non-finite test ran on the gradients before the float32 multiplier, so
    1e30 * 1e10 stepped every param to NaN and step() returned True."""
    opt = module.SGD([np.ones(6, np.float32)], lr=0.0, skip_nonfinite=True)
    opt.grads[0][...] = np.float32(grad)
    opt.grads[0][3] = -np.float32(grad)              # the largest magnitude may be negative
    before = opt.flat_params.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        result = opt.step(grad_multiplier=multiplier)
    assert result is (not skipped)
    assert opt.skipped_steps == int(skipped) and opt.step_counts == [int(not skipped)]
    assert np.array_equal(opt.flat_params, before)   # lr 0: a step that ran changes nothing


@pytest.mark.parametrize("cls,kw", [
    (fastopt.AdamW, dict(lr=3e38)),                              # lr / (1 - beta1) at step 1
    (fastopt.AdamW, dict(lr=1e20, weight_decay=1e20)),            # 1 - lr * weight_decay
    (fastopt.Adam, dict(lr=1e37, betas=(0.999, 0.999))),          # lr / (1 - 0.999)
    (fastopt.RMSprop, dict(lr=1e30, alpha=0.5, weight_decay=0.0)),
], ids=["AdamW lr", "AdamW lr*wd", "Adam bias correction", "RMSprop ok"])
def test_scalars_past_float32_are_refused_before_the_kernel_runs(cls, kw):
    """Hyperparameters each within float32 whose per-step scalars (computed in double,
    rounded to float32) are not: a ValueError, nothing changed.  Before: every param NaN
    or infinite.  (RMSprop's scalars stay finite: that step runs.)"""
    opt = cls([np.ones(5, np.float32)], **kw)
    opt.grads[0][...] = 1.0
    if cls is fastopt.RMSprop:
        assert opt.step() is True
        return
    with pytest.raises(ValueError, match="overflows float32; nothing was changed"):
        opt.step()
    assert np.array_equal(opt.params[0], np.ones(5, np.float32))
    assert opt.step_counts == [0] and opt.state == {}


# ---- running out of memory while loading -----------------------------------------------------

@pytest.mark.parametrize("how", ["load_state_dict", "checkpoint"])
def test_no_room_for_the_state_while_loading_changes_nothing(how, tmp_path, monkeypatch):
    """A fresh optimizer has no state arenas yet: loading allocates them, and running out of
    memory on the second one must leave params, state and step counts as they were (before:
    the params, or a first group's state, were already written)."""
    saved = _adamw(fastopt)
    saved.step()
    path = tmp_path / "ck.npz"
    saved.save(path)
    opt = fastopt.AdamW([np.full(4096, 5.0, np.float32), np.full(7, 5.0, np.float32)])
    made = []
    real = opt._new_state_arena

    def second_fails(key):
        if made:
            raise MemoryError("no room (test)")
        made.append(key)
        real(key)
    monkeypatch.setattr(opt, "_new_state_arena", second_fails)
    with pytest.raises(MemoryError):
        if how == "checkpoint":
            opt.load(path)
        else:
            opt.load_state_dict(saved.state_dict())
    assert np.all(opt.flat_params[:4096] == 5.0) and opt.step_counts == [0]
    assert opt.state == {}


def test_save_refuses_what_load_would_refuse(tmp_path):
    """A key of the user's own in a param group can be large; a checkpoint whose JSON part
    load would refuse as oversized is refused by save, before anything is written."""
    opt = fastopt.SGD([{"params": [np.ones(3, np.float32)], "notes": "x" * 1_200_000}])
    with pytest.raises(ValueError, match="more than the .* a checkpoint of this optimizer"):
        opt.save(tmp_path / "ck.npz")
    assert os.listdir(tmp_path) == []


def test_a_stray_file_with_a_huge_pid_does_not_stop_saves(tmp_path):
    opt = fastopt.SGD([np.ones(3, np.float32)])
    (tmp_path / ".ck.npz.fastopt-99999999999999999999-abc.tmp").write_bytes(b"")
    # a FIFO named as a dead writer's temporary (past Linux's largest pid): opening it to
    # check its lock must not block, and it is not ours to remove
    fifo = tmp_path / ".ck.npz.fastopt-4194305-fifo.tmp"
    os.mkfifo(fifo)
    opt.save(tmp_path / "ck.npz")
    opt.load(tmp_path / "ck.npz")
    assert fifo.exists()
