"""LR schedulers: torch parity (when torch is installed), closed forms, each class against its
pure function, state_dict round trips, and the bad-argument tables.

One table, SCHEDULES, drives the parity, pure-function and round-trip tests; each entry builds
its scheduler from a module argument, so the same code builds torch's and ours.
"""
import copy
import functools
import gc
import json
import math
import warnings
from collections import Counter, namedtuple

import numpy as np
import pytest

import fastopt
from fastopt import lr_scheduler as S
from cases import TORCH_SKIP_REASON, torch

STEPS = 1000
LRS = (0.1, 0.003)          # two param groups with different base lrs
# torch's closed forms and its chainable forms agree to 1.5e-14 over these runs (the chainable
# forms compound one rounding per step), and CosineAnnealingLR's recursion is reproduced
# operation for operation, so 1e-12 relative is far outside what arithmetic explains and far
# inside what a wrong formula or an off-by-one step would give.
RTOL = 1e-12


def fastopt_optimizer(family):
    groups = [{"params": [np.zeros(3, np.float32)], "lr": lr} for lr in LRS]
    if family == "sgd":
        return fastopt.SGD(groups, momentum=0.9)
    return fastopt.Adam(groups)


def torch_optimizer(family):
    groups = [{"params": [torch.zeros(3, requires_grad=True)], "lr": lr} for lr in LRS]
    if family == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    return torch.optim.Adam(groups)


def record(opt):
    """(lr, momentum or beta1) of each group."""
    return [(g["lr"], g["momentum"] if "momentum" in g else g["betas"][0])
            for g in opt.param_groups]


def run(module, opt, make, steps=STEPS):
    """Values at construction and after each of `steps` (opt.step(), sched.step()) pairs."""
    return run_and_keep(module, opt, make, steps)[0]


def run_and_keep(module, opt, make, steps=STEPS):
    """run's values, and the scheduler."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # torch's order/deprecation hints
        sched = make(module, opt)
        out = [record(opt)]
        for _ in range(steps):
            opt.step()
            sched.step()
            out.append(record(opt))
    return np.array(out), sched             # (steps + 1, groups, 2)


def assert_rel(actual, expected, rtol, what):
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    bad = np.abs(actual - expected) > rtol * np.abs(expected)
    if bad.any():
        i = np.argwhere(bad)[0]
        raise AssertionError(f"{what}: {int(bad.sum())} values beyond {rtol} relative; first at "
                             f"{tuple(i)}: {actual[tuple(i)]!r} vs {expected[tuple(i)]!r}")


def _seq(m, f, g):
    """The pure twin of SequentialLR([a, b], [m]) from a's and b's pure functions f and g."""
    return lambda t, i: f(t, i) if t < m else g(t - m, i)


Case = namedtuple("Case", "id family make pure exact momentum torch_make", defaults=(None, None))
# make(module, optimizer) -> scheduler; pure(step, group) -> lr; exact: the class's lr is its
# function's bit for bit (not so where torch's recursion is reproduced); momentum(step, group)
# -> momentum/beta1 (OneCycleLR); torch_make: torch's equivalent where torch has no such class.
_b = LRS.__getitem__
SCHEDULES = [
    Case("LambdaLR", "sgd",
         lambda m, o: m.LambdaLR(o, [lambda e: 0.5 ** (e // 50), lambda e: 1 / (1 + e)]),
         lambda t, i: S.lambda_lr(t, _b(i), [lambda e: 0.5 ** (e // 50),
                                             lambda e: 1 / (1 + e)][i]), True),
    Case("StepLR", "sgd", lambda m, o: m.StepLR(o, 7, 0.7),
         lambda t, i: S.step_lr(t, _b(i), 7, 0.7), True),
    Case("MultiStepLR", "adam", lambda m, o: m.MultiStepLR(o, [10, 200, 500, 900], 0.5),
         lambda t, i: S.multi_step_lr(t, _b(i), [10, 200, 500, 900], 0.5), True),
    Case("MultiStepLR repeated milestones", "sgd",
         lambda m, o: m.MultiStepLR(o, [3, 3, 40, 40, 40, 700], 0.5),
         lambda t, i: S.multi_step_lr(t, _b(i), [3, 3, 40, 40, 40, 700], 0.5), True),
    Case("ExponentialLR", "sgd", lambda m, o: m.ExponentialLR(o, 0.99),
         lambda t, i: S.exponential_lr(t, _b(i), 0.99), True),
    Case("LinearLR warmup", "adam", lambda m, o: m.LinearLR(o, 0.1, 1.0, 700),
         lambda t, i: S.linear_lr(t, _b(i), 0.1, 1.0, 700), True),
    Case("LinearLR decay", "sgd", lambda m, o: m.LinearLR(o, 1.0, 0.05, 300),
         lambda t, i: S.linear_lr(t, _b(i), 1.0, 0.05, 300), True),
    Case("LinearLR as linear_warmup_lr", "sgd", lambda m, o: m.LinearLR(o, 1 / 50, 1.0, 49),
         lambda t, i: S.linear_warmup_lr(t, _b(i), 50), False),
    Case("ConstantLR", "sgd", lambda m, o: m.ConstantLR(o, 0.3, 100),
         lambda t, i: S.constant_lr(t, _b(i), 0.3, 100), True),
    Case("CosineAnnealingLR", "sgd", lambda m, o: m.CosineAnnealingLR(o, 1000),
         lambda t, i: S.cosine_annealing_lr(t, _b(i), 1000), False),
    Case("CosineAnnealingLR periodic", "adam", lambda m, o: m.CosineAnnealingLR(o, 7, 1e-4),
         lambda t, i: S.cosine_annealing_lr(t, _b(i), 7, 1e-4), False),
    Case("OneCycleLR sgd", "sgd", lambda m, o: m.OneCycleLR(o, [1.0, 0.05], total_steps=1000),
         lambda t, i: S.one_cycle_lr(t, [1.0, 0.05][i], 1000), True,
         lambda t, i: S.one_cycle_momentum(t, 1000)),
    Case("OneCycleLR adam three-phase linear", "adam",
         lambda m, o: m.OneCycleLR(o, [1.0, 0.05], epochs=7, steps_per_epoch=143,
                                   anneal_strategy="linear", three_phase=True, pct_start=0.25,
                                   base_momentum=[0.8, 0.7], max_momentum=0.9,
                                   div_factor=10.0, final_div_factor=100.0),
         lambda t, i: S.one_cycle_lr(t, [1.0, 0.05][i], 1001, 0.25, "linear", 10.0, 100.0, True),
         True,
         lambda t, i: S.one_cycle_momentum(t, 1001, 0.25, "linear", [0.8, 0.7][i], 0.9, True)),
    Case("SequentialLR", "sgd",
         lambda m, o: m.SequentialLR(o, [m.LinearLR(o, 0.1, total_iters=100),
                                         m.CosineAnnealingLR(o, 900, 1e-4)], [100]),
         _seq(100, lambda t, i: S.linear_lr(t, _b(i), 0.1, 1.0, 100),
              lambda t, i: S.cosine_annealing_lr(t, _b(i), 900, 1e-4)), False),
    Case("SequentialLR of three", "adam",
         lambda m, o: m.SequentialLR(o, [m.ConstantLR(o, 0.5, 20), m.ExponentialLR(o, 0.99),
                                         m.StepLR(o, 30, 0.5)], [50, 300]),
         lambda t, i: (S.constant_lr(t, _b(i), 0.5, 20) if t < 50 else
                       S.exponential_lr(t - 50, _b(i), 0.99) if t < 300 else
                       S.step_lr(t - 300, _b(i), 30, 0.5)), True),
    Case("ChainedScheduler", "sgd",
         lambda m, o: m.ChainedScheduler([m.ConstantLR(o, 0.1, 20), m.ExponentialLR(o, 0.995),
                                          m.MultiStepLR(o, [300, 600, 600], 0.5)]),
         lambda t, i: (S.constant_lr(t, _b(i), 0.1, 20) * S.exponential_lr(t, 1.0, 0.995)
                       * S.multi_step_lr(t, 1.0, [300, 600, 600], 0.5)), False),
    Case("ChainedScheduler of a warm-up and a cosine, optimizer given", "adam",
         lambda m, o: m.ChainedScheduler([m.LinearLR(o, 0.01, 1.0, 50),
                                          m.CosineAnnealingLR(o, 1000)], o),
         lambda t, i: S.linear_lr(t, 1.0, 0.01, 1.0, 50) * S.cosine_annealing_lr(t, _b(i), 1000),
         False),
    Case("WarmupCosineLR", "adam", lambda m, o: m.warmup_cosine(o, 100, 1000, 1e-4),
         lambda t, i: S.warmup_cosine_lr(t, _b(i), 100, 1000, 1e-4), True, None,
         lambda m, o: m.SequentialLR(o, [m.LinearLR(o, 1 / 100, 1.0, 99),
                                         m.CosineAnnealingLR(o, 900, 1e-4)], [100])),
    Case("WarmupCosineLR to zero", "sgd", lambda m, o: m.WarmupCosineLR(o, 50, 1000),
         lambda t, i: S.warmup_cosine_lr(t, _b(i), 50, 1000), True, None,
         lambda m, o: m.SequentialLR(o, [m.LinearLR(o, 1 / 50, 1.0, 49),
                                         m.CosineAnnealingLR(o, 950)], [50])),
]
IDS = [c.id for c in SCHEDULES]


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
@pytest.mark.parametrize("case", SCHEDULES, ids=IDS)
def test_matches_torch(case):
    """lr (and momentum / beta1) of both groups, at construction and after each of 1000 steps."""
    ours = run(S, fastopt_optimizer(case.family), case.make)
    theirs = run(torch.optim.lr_scheduler, torch_optimizer(case.family),
                 case.torch_make or case.make)
    assert_rel(ours, theirs, RTOL, case.id)


@pytest.mark.parametrize("case", SCHEDULES, ids=IDS)
def test_class_follows_its_pure_function(case):
    seq = run(S, fastopt_optimizer(case.family), case.make)
    lrs = [[case.pure(t, i) for i in range(len(LRS))] for t in range(STEPS + 1)]
    if case.exact:
        assert seq[:, :, 0].tolist() == lrs
    else:   # torch's cosine recursion, or LinearLR's factor arithmetic: rounding apart
        assert_rel(seq[:, :, 0], lrs, RTOL, case.id)
    if case.momentum:
        ms = [[case.momentum(t, i) for i in range(len(LRS))] for t in range(STEPS + 1)]
        assert seq[:, :, 1].tolist() == ms


@pytest.mark.parametrize("case", SCHEDULES, ids=IDS)
def test_state_dict_round_trip_resumes_the_same_sequence(case):
    k = 337
    opt = fastopt_optimizer(case.family)
    sched = case.make(S, opt)
    for _ in range(k):
        opt.step()
        sched.step()
    sd = sched.state_dict()
    text = json.dumps(sd, allow_nan=False)      # plain values only: no pickle needed
    opt_sd = opt.state_dict()

    opt2 = fastopt_optimizer(case.family)
    sched2 = case.make(S, opt2)
    opt2.load_state_dict(opt_sd)
    sched2.load_state_dict(json.loads(text))
    assert sched2.state_dict() == sd
    assert sched2.get_last_lr() == sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
    if isinstance(sched, S.ChainedScheduler):   # which has no last_epoch, as torch's
        assert all(s.last_epoch == k for s in sched2._schedulers + sched._schedulers)
    else:
        assert sched2.last_epoch == sched.last_epoch == k
    for _ in range(STEPS - k):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert record(opt2) == record(opt)
    np.testing.assert_array_equal(opt2.flat_params, opt.flat_params)


# ---- several schedulers on one optimizer ---------------------------------------------------------
# torch's schedulers scale the group's current lr, so that their effects multiply; ours follow
# their closed forms while alone and torch's chainable forms once another scheduler has changed
# the lr.  Closed and chainable forms differ by rounding, compounded over the steps: 1e-12.

def run_together(module, opt, make, steps):
    """Values at construction and after each step of `opt` and then of each scheduler that
    make(module, opt) returns, in its order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheds = make(module, opt)
        out = [record(opt)]
        for _ in range(steps):
            opt.step()
            for s in scheds:
                s.step()
            out.append(record(opt))
    return np.array(out), scheds


# (id, family, make(module, optimizer) -> the schedulers, built and stepped in that order, steps)
COMPOSED = [
    ("ExponentialLR + MultiStepLR", "sgd",
     lambda m, o: [m.ExponentialLR(o, 0.99), m.MultiStepLR(o, [100, 250, 250, 400], 0.1)], 500),
    ("MultiStepLR + ExponentialLR", "adam",
     lambda m, o: [m.MultiStepLR(o, [0, 100, 250, 250, 400], 0.1), m.ExponentialLR(o, 0.99)],
     500),
    ("StepLR + LinearLR", "sgd", lambda m, o: [m.StepLR(o, 30, 0.5), m.LinearLR(o, 0.1, 1.0, 80)],
     500),
    ("LinearLR + StepLR", "adam", lambda m, o: [m.LinearLR(o, 0.1, 1.0, 80), m.StepLR(o, 30, 0.5)],
     500),
    ("ConstantLR + ExponentialLR + CosineAnnealingLR", "sgd",
     lambda m, o: [m.ConstantLR(o, 0.5, 40), m.ExponentialLR(o, 0.999),
                   m.CosineAnnealingLR(o, 1000, 1e-5)], 1000),
    ("LinearLR decay to 0 + ExponentialLR", "sgd",
     lambda m, o: [m.LinearLR(o, 1 / 3, 0.0, 5), m.ExponentialLR(o, 0.9)], 12),
    ("SequentialLR + ExponentialLR", "adam",
     lambda m, o: [m.SequentialLR(o, [m.LinearLR(o, 0.1, 1.0, 50), m.StepLR(o, 100, 0.5)], [50]),
                   m.ExponentialLR(o, 0.999)], 1000),
    ("ChainedScheduler + StepLR", "sgd",
     lambda m, o: [m.ChainedScheduler([m.ExponentialLR(o, 0.995), m.MultiStepLR(o, [60], 0.2)]),
                   m.StepLR(o, 45, 0.5)], 500),
]


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
@pytest.mark.parametrize("id_,family,make,steps", COMPOSED, ids=[c[0] for c in COMPOSED])
def test_schedulers_on_one_optimizer_compose_as_torch(id_, family, make, steps):
    ours, _ = run_together(S, fastopt_optimizer(family), make, steps)
    theirs, _ = run_together(torch.optim.lr_scheduler, torch_optimizer(family), make, steps)
    assert (ours[:, :, 0] >= 0).all()           # fastopt's optimizers refuse a negative lr
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=1e-17, err_msg=id_)


@pytest.mark.parametrize("id_,family,make,steps", COMPOSED, ids=[c[0] for c in COMPOSED])
def test_composed_state_dicts_round_trip(id_, family, make, steps):
    """Each scheduler's state dict (its _chained flag included) resumes the composed
    sequence exactly."""
    k = steps // 3
    straight, _ = run_together(S, fastopt_optimizer(family), make, steps)
    opt = fastopt_optimizer(family)
    _, scheds = run_together(S, opt, make, k)
    sds = json.loads(json.dumps([s.state_dict() for s in scheds], allow_nan=False))
    opt2 = fastopt_optimizer(family)
    resumed, _ = run_together(S, opt2, lambda m, o: _loaded(make(m, o), o, opt, sds), steps - k)
    assert resumed.tolist() == straight[k:].tolist()


def _loaded(scheds, opt, trained, sds):
    opt.load_state_dict(trained.state_dict())
    for s, sd in zip(scheds, sds):
        s.load_state_dict(sd)
    return scheds


def test_checkpoint_of_a_chained_scheduler_resumes_it(tmp_path):
    def make(o):
        return S.ChainedScheduler([S.LinearLR(o, 0.2, 1.0, 10), S.StepLR(o, 7, 0.5)])

    straight, _ = run_together(S, fastopt_optimizer("adam"), lambda m, o: [make(o)], 40)
    opt = fastopt_optimizer("adam")
    _, (sched,) = run_together(S, opt, lambda m, o: [make(o)], 15)
    opt.save(tmp_path / "ck.npz", sched)
    opt2 = fastopt_optimizer("adam")
    sched2 = make(opt2)
    opt2.load(tmp_path / "ck.npz", sched2)
    resumed, _ = run_together(S, opt2, lambda m, o: [sched2], 25)
    assert resumed.tolist() == straight[15:].tolist()


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
def test_an_lr_set_by_hand_is_scaled_as_torch_does():
    def run_with_edit(module, opt):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = module.ExponentialLR(opt, 0.9)
            out = []
            for t in range(30):
                if t == 10:
                    opt.param_groups[0]["lr"] = 0.5
                opt.step()
                sched.step()
                out.append([g["lr"] for g in opt.param_groups])
        return out

    ours = run_with_edit(S, fastopt_optimizer("sgd"))
    theirs = run_with_edit(torch.optim.lr_scheduler, torch_optimizer("sgd"))
    assert ours[10][0] == 0.5 * 0.9
    np.testing.assert_allclose(ours, theirs, rtol=RTOL)


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
def test_a_scheduler_built_after_another_is_gone_scales_the_lr_it_finds():
    """ExponentialLR steps 5 times and is dropped; a LinearLR built then scales the lr the
    first one left, as torch's (it used to start over from the base lr: 0.875 for 0.5167)."""
    def run(module, opt):
        a = module.ExponentialLR(opt, 0.9)
        for _ in range(5):
            opt.step()
            a.step()
        del a
        gc.collect()
        c = module.LinearLR(opt, 0.5, 1.0, 4)
        out = [[g["lr"] for g in opt.param_groups]]
        for _ in range(6):
            opt.step()
            c.step()
            out.append([g["lr"] for g in opt.param_groups])
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = run(S, fastopt_optimizer("sgd"))
        theirs = run(torch.optim.lr_scheduler, torch_optimizer("sgd"))
    np.testing.assert_allclose(ours, theirs, rtol=RTOL)


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
def test_a_scheduler_built_beside_a_live_one_chains_when_the_last_writer_is_gone():
    """The last scheduler to write the lr was collected, an older one is alive: a new one
    scales the lr that one left, as torch's (it used to start over from the base lr)."""
    def run_with_dropped(module, opt):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = module.ExponentialLR(opt, 0.9)
            for _ in range(5):
                opt.step()
                a.step()
            b = module.StepLR(opt, 100)         # built, then dropped before anything steps
            del b
            gc.collect()
            c = module.LinearLR(opt, 0.5, 1.0, 4)
            out = [[g["lr"] for g in opt.param_groups]]
            for _ in range(10):
                opt.step()
                a.step()
                c.step()
                out.append([g["lr"] for g in opt.param_groups])
        return out

    ours = run_with_dropped(S, fastopt_optimizer("sgd"))
    theirs = run_with_dropped(torch.optim.lr_scheduler, torch_optimizer("sgd"))
    assert ours[0][0] == 0.1 * 0.9 ** 5 * 0.5
    np.testing.assert_allclose(ours, theirs, rtol=RTOL)


# Resuming torch's documented way: the optimizer's lrs and 'initial_lr' restored, each scheduler
# rebuilt with last_epoch=k.  torch's construction then takes one chainable step, to k+1, from
# the group's lr (StepLR, MultiStepLR and ConstantLR apply their change at k+1; ExponentialLR,
# LinearLR and CosineAnnealingLR keep the lr), and its schedulers follow the group's lr after.
# (id, make(module, optimizer, last_epoch) -> the schedulers, built and stepped in that order)
RESUMED = [
    ("StepLR", lambda m, o, k: [m.StepLR(o, 3, 0.5, last_epoch=k)]),
    ("MultiStepLR", lambda m, o, k: [m.MultiStepLR(o, [2, 5, 5, 9], 0.5, last_epoch=k)]),
    ("ExponentialLR", lambda m, o, k: [m.ExponentialLR(o, 0.9, last_epoch=k)]),
    ("LinearLR", lambda m, o, k: [m.LinearLR(o, 0.25, 1.0, 8, last_epoch=k)]),
    ("LinearLR decay to 0", lambda m, o, k: [m.LinearLR(o, 1 / 3, 0.0, 15, last_epoch=k)]),
    ("ConstantLR", lambda m, o, k: [m.ConstantLR(o, 0.5, 6, last_epoch=k)]),
    ("CosineAnnealingLR", lambda m, o, k: [m.CosineAnnealingLR(o, 10, 1e-3, last_epoch=k)]),
    ("ExponentialLR + StepLR", lambda m, o, k: [m.ExponentialLR(o, 0.9, last_epoch=k),
                                                m.StepLR(o, 3, 0.5, last_epoch=k)]),
    ("ConstantLR + CosineAnnealingLR", lambda m, o, k: [
        m.ConstantLR(o, 0.5, 6, last_epoch=k), m.CosineAnnealingLR(o, 10, 1e-3, last_epoch=k)]),
    ("LinearLR + MultiStepLR", lambda m, o, k: [
        m.LinearLR(o, 0.25, 1.0, 8, last_epoch=k), m.MultiStepLR(o, [2, 5, 9], 0.5, last_epoch=k)]),
]


def trained_then_resumed(module, new_opt, make, trained, k, steps):
    """`trained` steps from scratch, then the lrs and initial_lrs copied into a new optimizer
    (as its load_state_dict would) and the schedulers rebuilt there with last_epoch=k: the
    lrs at that construction and after each of `steps` further steps."""
    opt = new_opt()
    run_together(module, opt, lambda m, o: make(m, o, -1), trained)
    opt2 = new_opt()
    for g2, g in zip(opt2.param_groups, opt.param_groups):
        g2["lr"], g2["initial_lr"] = g["lr"], g["initial_lr"]
    return run_together(module, opt2, lambda m, o: make(m, o, k), steps)[0]


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
@pytest.mark.parametrize("id_,make", RESUMED, ids=[c[0] for c in RESUMED])
def test_resuming_with_last_epoch_follows_torch(id_, make):
    """k = trained - 1 (which ExponentialLR, LinearLR and CosineAnnealingLR expect) and
    k = trained (which StepLR, MultiStepLR and ConstantLR expect), and every other k: fastopt
    gives torch's lrs, quirks included (it used to set each scheduler's own closed form at
    k + 1, so the second scheduler built erased the first one's factor)."""
    trained = 12
    for k in range(trained + 2):
        ours = trained_then_resumed(S, lambda: fastopt_optimizer("sgd"), make, trained, k, 20)
        theirs = trained_then_resumed(torch.optim.lr_scheduler, lambda: torch_optimizer("sgd"),
                                      make, trained, k, 20)
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=1e-17, err_msg=f"{id_}, k={k}")


def _lambda_and_exponential(o):
    return [S.LambdaLR(o, lambda e: 0.5 ** e), S.ExponentialLR(o, 0.9)]


def _step_and_one_cycle(o):
    return [S.StepLR(o, 5, 0.5), S.OneCycleLR(o, 1.0, total_steps=100)]


def _warmup_cosine_edited_by_hand(o):
    sched = S.warmup_cosine(o, 5, 100)

    class Edit:
        def step(self):
            o.param_groups[1]["lr"] = 0.25
    return [sched, Edit()]


def _constant_factor_0_and_exponential(o):
    return [S.ExponentialLR(o, 0.9), S.ConstantLR(o, 0.0, 4)]


# (id, make(optimizer) -> schedulers stepped in that order, the step that fails (1-based),
#  index of the scheduler that refuses, message)
CANNOT_COMPOSE = [
    ("LambdaLR + ExponentialLR", _lambda_and_exponential, 2, 0,
     r"LambdaLR: optimizer.param_groups\[0\]\['lr'\] is 0\.045000000000000005, not the 0\.05 "
     r"this scheduler wrote last: another scheduler \(or a hand edit\) changed it"),
    ("StepLR + OneCycleLR", _step_and_one_cycle, 5, 1,
     r"OneCycleLR: optimizer.param_groups\[0\]\['lr'\] .* cannot compose"),
    ("WarmupCosineLR edited by hand", _warmup_cosine_edited_by_hand, 2, 0,
     r"WarmupCosineLR: optimizer.param_groups\[1\]\['lr'\] is 0\.25"),
    ("ConstantLR factor 0 + ExponentialLR", _constant_factor_0_and_exponential, 4, 1,
     "ConstantLR with factor=0 cannot end its factor at step total_iters=4"),
    ("ChainedScheduler whose last member fails", lambda o: [
        S.ChainedScheduler(_constant_factor_0_and_exponential(o))], 4, 0,
     "ConstantLR with factor=0 cannot end its factor at step total_iters=4"),
]


@pytest.mark.parametrize("make,fails_at,who,match", [c[1:] for c in CANNOT_COMPOSE],
                         ids=[c[0] for c in CANNOT_COMPOSE])
def test_what_cannot_compose_is_refused_at_the_step_and_changes_nothing(make, fails_at, who,
                                                                         match):
    """Where torch's would overwrite another scheduler's effect without a word (or divide by
    zero), ours raise a ValueError naming the problem, having changed nothing."""
    opt = fastopt_optimizer("sgd")
    scheds = make(opt)
    for t in range(1, fails_at):
        for s in scheds:
            s.step()
    for s in scheds[:who]:
        s.step()
    _assert_step_error_changes_nothing(opt, scheds[who], ValueError, match)


# ---- closed forms, by hand --------------------------------------------------------------------

_c = math.cos
CLOSED_FORMS = [
    ("lambda_lr", lambda: S.lambda_lr(3, 2.0, lambda e: e / 4), 1.5),
    ("step_lr before the first decay", lambda: S.step_lr(2, 0.1, 3, 0.5), 0.1),
    ("step_lr", lambda: S.step_lr(7, 0.1, 3, 0.5), 0.025),
    ("step_lr default gamma", lambda: S.step_lr(3, 1.0, 3), 0.1),
    ("multi_step_lr at a milestone", lambda: S.multi_step_lr(5, 1.0, [5, 8], 0.5), 0.5),
    ("multi_step_lr", lambda: S.multi_step_lr(9, 1.0, [5, 8], 0.5), 0.25),
    ("multi_step_lr before", lambda: S.multi_step_lr(4, 1.0, [5, 8], 0.5), 1.0),
    ("multi_step_lr repeated milestone", lambda: S.multi_step_lr(2, 1.0, [2, 2, 5], 0.5), 0.25),
    ("exponential_lr", lambda: S.exponential_lr(3, 2.0, 0.5), 0.25),
    ("linear_lr start", lambda: S.linear_lr(0, 1.0, 0.25, 1.0, 4), 0.25),
    ("linear_lr middle", lambda: S.linear_lr(2, 1.0, 0.25, 1.0, 4), 0.625),
    ("linear_lr after", lambda: S.linear_lr(9, 2.0, 0.25, 1.0, 4), 2.0),
    ("linear_lr decay to 0", lambda: S.linear_lr(5, 0.3, 1 / 3, 0.0, 5), 0.0),
    ("constant_lr", lambda: S.constant_lr(4, 0.3, 0.5, 5), 0.15),
    ("constant_lr after", lambda: S.constant_lr(5, 0.3, 0.5, 5), 0.3),
    ("constant_lr factor 0", lambda: S.constant_lr(1, 0.3, 0.0, 5), 0.0),
    ("cosine_annealing_lr start", lambda: S.cosine_annealing_lr(0, 1.0, 10), 1.0),
    ("cosine_annealing_lr middle", lambda: S.cosine_annealing_lr(5, 1.0, 10, 0.2), 0.6),
    ("cosine_annealing_lr quarter", lambda: S.cosine_annealing_lr(1, 1.0, 4),
     (1 + _c(math.pi / 4)) / 2),
    ("cosine_annealing_lr end", lambda: S.cosine_annealing_lr(10, 1.0, 10, 0.2), 0.2),
    ("cosine_annealing_lr periodic", lambda: S.cosine_annealing_lr(20, 1.0, 10), 1.0),
    ("one_cycle_lr start", lambda: S.one_cycle_lr(0, 1.0, 100), 0.04),
    ("one_cycle_lr peak", lambda: S.one_cycle_lr(29, 1.0, 100), 1.0),
    ("one_cycle_lr end", lambda: S.one_cycle_lr(99, 1.0, 100), 4e-6),
    ("one_cycle_lr linear", lambda: S.one_cycle_lr(64, 1.0, 100, anneal_strategy="linear"),
     1.0 + (4e-6 - 1.0) * 35 / 70),
    ("one_cycle_lr three-phase back at initial", lambda: S.one_cycle_lr(
        58, 1.0, 100, three_phase=True), 0.04),
    ("one_cycle_momentum start", lambda: S.one_cycle_momentum(0, 100), 0.95),
    ("one_cycle_momentum at the lr peak", lambda: S.one_cycle_momentum(29, 100), 0.85),
    ("one_cycle_momentum end", lambda: S.one_cycle_momentum(99, 100), 0.95),
    ("linear_warmup_lr first", lambda: S.linear_warmup_lr(0, 1.0, 4), 0.25),
    ("linear_warmup_lr last", lambda: S.linear_warmup_lr(3, 0.3, 4), 0.3),
    ("linear_warmup_lr after", lambda: S.linear_warmup_lr(10, 0.3, 4), 0.3),
    ("warmup_cosine_lr first", lambda: S.warmup_cosine_lr(0, 1.0, 10, 110), 0.1),
    ("warmup_cosine_lr end of warm-up", lambda: S.warmup_cosine_lr(9, 1.0, 10, 110), 1.0),
    ("warmup_cosine_lr cosine start", lambda: S.warmup_cosine_lr(10, 1.0, 10, 110, 0.2), 1.0),
    ("warmup_cosine_lr half way", lambda: S.warmup_cosine_lr(60, 1.0, 10, 110, 0.2), 0.6),
    ("warmup_cosine_lr at total_steps", lambda: S.warmup_cosine_lr(110, 1.0, 10, 110, 0.2), 0.2),
    ("warmup_cosine_lr after", lambda: S.warmup_cosine_lr(500, 1.0, 10, 110, 0.2), 0.2),
    ("warmup_cosine_lr no warm-up", lambda: S.warmup_cosine_lr(0, 1.0, 0, 10), 1.0),
]


@pytest.mark.parametrize("fn,expected", [c[1:] for c in CLOSED_FORMS],
                         ids=[c[0] for c in CLOSED_FORMS])
def test_closed_forms(fn, expected):
    assert fn() == pytest.approx(expected, rel=1e-14, abs=1e-300)


# ---- behaviour ----------------------------------------------------------------------------------

def test_construction_records_initial_lr_and_sets_step_0():
    """A group whose lr is not its initial_lr (set by hand here; an earlier scheduler leaves
    the same) keeps the lr it has, and the schedule scales it, as torch's: StepLR gives
    [0.1, 0.003] then [0.05, 0.0015] in torch 2.13 (it used to restart group 1 from 0.5)."""
    opt = fastopt_optimizer("sgd")
    opt.param_groups[1]["initial_lr"] = 0.5        # kept, as torch's setdefault
    sched = S.StepLR(opt, 2, 0.5)
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.5]
    assert sched.base_lrs == [0.1, 0.5] and sched.last_epoch == 0
    assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr() == [0.1, LRS[1]]
    for _ in range(2):
        sched.step()
    assert sched.get_last_lr() == [0.05, LRS[1] * 0.5]
    del sched
    opt.param_groups[1]["lr"] = 0.5
    ws = S.warmup_cosine(opt, 4, 10)
    assert ws.get_last_lr() == [0.1 / 4, 0.5 / 4]


def test_one_cycle_writes_beta1_and_keeps_beta2():
    opt = fastopt.Adam([{"params": [np.zeros(2, np.float32)]}], betas=(0.9, 0.98))
    sched = S.OneCycleLR(opt, 0.1, total_steps=10)
    g = opt.param_groups[0]
    assert g["betas"] == (0.95, 0.98) and "momentum" not in g
    assert (g["initial_lr"], g["max_lr"], g["min_lr"]) == (0.1 / 25, 0.1, 0.1 / 25 / 1e4)
    for _ in range(3):
        opt.step()
        sched.step()
    assert g["betas"] == (S.one_cycle_momentum(3, 10), 0.98)
    rms = fastopt.RMSprop([np.zeros(2, np.float32)])
    S.OneCycleLR(rms, 0.1, total_steps=10, max_momentum=0.9)
    assert rms.param_groups[0]["momentum"] == 0.9


def test_one_cycle_without_cycle_momentum_leaves_momentum():
    opt = fastopt_optimizer("sgd")
    S.OneCycleLR(opt, 0.1, total_steps=10, cycle_momentum=False)
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]
    assert "max_momentum" not in opt.param_groups[0]


def test_linear_decay_to_zero_ends_at_exactly_zero():
    """torch's chainable form leaves a residue there (negative with these arguments), which
    fastopt's optimizers would refuse at the next step as a negative lr."""
    opt = fastopt_optimizer("sgd")
    seq = run(S, opt, lambda m, o: m.LinearLR(o, 1 / 3, 0.0, 5), steps=8)
    assert (seq[5:, :, 0] == 0.0).all() and (seq[:, :, 0] >= 0).all()
    if torch is not None:
        theirs = run(torch.optim.lr_scheduler, torch_optimizer("sgd"),
                     lambda m, o: m.LinearLR(o, 1 / 3, 0.0, 5), steps=8)
        np.testing.assert_allclose(seq, theirs, rtol=1e-12, atol=1e-16)


def test_step_with_epoch_jumps_to_the_closed_form():
    opt = fastopt_optimizer("sgd")
    sched = S.CosineAnnealingLR(opt, 100, 0.01)
    sched.step(40)
    assert sched.last_epoch == 40
    assert sched.get_last_lr() == [S.cosine_annealing_lr(40, b, 100, 0.01) for b in LRS]
    sched.step()
    assert_rel(sched.get_last_lr(), [S.cosine_annealing_lr(41, b, 100, 0.01) for b in LRS],
               RTOL, "after the jump")


def test_sequential_lr_nests():
    """torch cannot restart a SequentialLR at a milestone (it has no get_lr); here it can."""
    opt = fastopt_optimizer("sgd")
    inner = S.SequentialLR(opt, [S.ConstantLR(opt, 0.5, 4), S.ExponentialLR(opt, 0.9)], [10])
    outer = S.SequentialLR(opt, [S.StepLR(opt, 5, 0.5), inner], [30])
    seq = run(S, opt, lambda m, o: outer, steps=60)[:, :, 0]
    for t in range(61):
        expected = [S.step_lr(t, b, 5, 0.5) if t < 30 else
                    S.constant_lr(t - 30, b, 0.5, 4) if t < 40 else
                    S.exponential_lr(t - 40, b, 0.9) for b in LRS]
        assert seq[t].tolist() == expected, t


def test_last_epoch_resumes_at_the_next_step():
    """As torch's, last_epoch=9 takes the step to 10 from the group's lr, which ExponentialLR
    keeps (the lr restored after 10 steps), and the next step scales it.  (This test used to
    expect the closed form at step 10 from the base lr whatever the group's lr, which departed
    from torch; test_resuming_with_last_epoch_follows_torch compares every class.)"""
    opt = fastopt_optimizer("sgd")
    S.ExponentialLR(opt, 0.9)                       # records initial_lr
    for g in opt.param_groups:
        g["lr"] = S.exponential_lr(10, g["initial_lr"], 0.9)
    sched = S.ExponentialLR(opt, 0.9, last_epoch=9)
    assert sched.last_epoch == 10
    assert sched.get_last_lr() == [S.exponential_lr(10, b, 0.9) for b in LRS]
    opt.step()
    sched.step()
    assert sched.get_last_lr() == [S.exponential_lr(10, b, 0.9) * 0.9 for b in LRS]


def test_lambda_state_keeps_callable_objects_attributes():
    class Decay:
        def __init__(self):
            self.rate = 0.5

        def __call__(self, e):
            return self.rate ** e

    opt = fastopt_optimizer("sgd")
    sched = S.LambdaLR(opt, [Decay(), lambda e: 1.0])
    sched.lr_lambdas[0].rate = 0.25
    sd = json.loads(json.dumps(sched.state_dict()))
    assert sd["lr_lambdas"] == [{"rate": 0.25}, None]
    opt2 = fastopt_optimizer("sgd")
    sched2 = S.LambdaLR(opt2, [Decay(), lambda e: 1.0])
    sched2.load_state_dict(sd)
    opt2.step()
    sched2.step()
    assert sched2.get_last_lr() == [0.1 * 0.25, LRS[1]]


def _assert_step_error_changes_nothing(opt, sched, exc, match):
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                            for g in opt.param_groups])
    sd = sched.state_dict()
    with pytest.raises(exc, match=match):
        sched.step()
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert sched.state_dict() == sd


def test_step_past_total_steps_changes_nothing():
    opt = fastopt_optimizer("sgd")
    sched = S.OneCycleLR(opt, 1.0, total_steps=3)
    for _ in range(3):
        sched.step()
    _assert_step_error_changes_nothing(opt, sched, ValueError, "step 4 is past total_steps=3")


def test_bad_lambda_value_at_a_step_changes_nothing():
    opt = fastopt_optimizer("sgd")
    seq = S.SequentialLR(opt, [S.StepLR(opt, 2), S.LambdaLR(opt, lambda e: 1 - e)], [3])
    for _ in range(4):
        seq.step()
    _assert_step_error_changes_nothing(opt, seq, ValueError, r"lr_lambda\[0\]\(2\) must be >= 0")


# ---- bad constructor arguments ----------------------------------------------------------------

class _Stub:
    """Another kind of optimizer over the same param groups (which the test checks): only
    `defaults` differs, which is what OneCycleLR reads to choose momentum or betas."""

    def __init__(self, groups, **defaults):
        self.param_groups = groups
        self.defaults = {"lr": 0.1, **defaults}


P = functools.partial


def _with_initial_lr(opt):
    """opt with every group's 'initial_lr' recorded, as a resume with last_epoch needs."""
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


_nan, _inf = float("nan"), float("inf")
# (id: the class first, make(optimizer) -> the failing call, exception, message pattern);
# make runs before the snapshot, so schedulers that a call takes are built there.
CONSTRUCTOR_ERRORS = [
    ("LRScheduler not an optimizer", lambda o: P(S.StepLR, [0.1], 3), TypeError,
     "optimizer must be an optimizer with param_groups"),
    ("LRScheduler last_epoch -2", lambda o: P(S.StepLR, o, 3, last_epoch=-2), ValueError,
     "last_epoch must be >= -1"),
    ("LRScheduler last_epoch float", lambda o: P(S.ExponentialLR, o, 0.5, last_epoch=0.0),
     TypeError, "last_epoch must be an int"),
    ("LRScheduler resume without initial_lr", lambda o: P(S.StepLR, o, 3, last_epoch=5),
     ValueError, r"param_groups\[0\] has no 'initial_lr'"),
    ("ConstantLR factor 0 resumed at total_iters - 1",
     lambda o: P(S.ConstantLR, _with_initial_lr(o), 0.0, 4, last_epoch=3), ValueError,
     "ConstantLR with factor=0 cannot end its factor at step total_iters=4"),
    ("LambdaLR not callable", lambda o: P(S.LambdaLR, o, 0.5), TypeError,
     r"lr_lambda\[0\] must be callable"),
    ("LambdaLR wrong count", lambda o: P(S.LambdaLR, o, [abs]), ValueError,
     "lr_lambda has 1 functions, the optimizer has 2 param groups"),
    ("LambdaLR nan at step 0", lambda o: P(S.LambdaLR, o, lambda e: _nan), ValueError,
     r"lr_lambda\[0\]\(0\) must be finite"),
    ("LambdaLR not a number", lambda o: P(S.LambdaLR, o, lambda e: "1"), TypeError,
     r"lr_lambda\[0\]\(0\) must be a real number"),
    ("StepLR step_size 0", lambda o: P(S.StepLR, o, 0), ValueError, "step_size must be >= 1"),
    ("StepLR step_size float", lambda o: P(S.StepLR, o, 2.5), TypeError,
     "step_size must be an int"),
    ("StepLR gamma 0", lambda o: P(S.StepLR, o, 3, 0.0), ValueError, "gamma must be > 0"),
    ("StepLR gamma nan", lambda o: P(S.StepLR, o, 3, _nan), ValueError, "gamma must be finite"),
    ("StepLR gamma str", lambda o: P(S.StepLR, o, 3, "0.1"), TypeError,
     "gamma must be a real number"),
    ("MultiStepLR decreasing", lambda o: P(S.MultiStepLR, o, [5, 3]), ValueError,
     r"milestones must be non-decreasing, got \[5, 3\]"),
    ("MultiStepLR Counter with a zero count", lambda o: P(S.MultiStepLR, o, Counter({5: 0})),
     ValueError, r"milestones\[5\] must be >= 1"),
    ("MultiStepLR Counter with a str key", lambda o: P(S.MultiStepLR, o, {"5": 1}),
     TypeError, r"milestones key '5' must be an int"),
    ("MultiStepLR negative", lambda o: P(S.MultiStepLR, o, [-1, 3]), ValueError,
     r"milestones\[0\] must be >= 0"),
    ("MultiStepLR float", lambda o: P(S.MultiStepLR, o, [1.5]), TypeError,
     r"milestones\[0\] must be an int"),
    ("MultiStepLR not a list", lambda o: P(S.MultiStepLR, o, 5), TypeError,
     "milestones must be a list of ints"),
    ("MultiStepLR gamma -1", lambda o: P(S.MultiStepLR, o, [5], -1.0), ValueError,
     "gamma must be > 0"),
    ("ExponentialLR gamma inf", lambda o: P(S.ExponentialLR, o, _inf), ValueError,
     "gamma must be finite"),
    ("LinearLR start_factor 0", lambda o: P(S.LinearLR, o, 0.0), ValueError,
     "start_factor must be > 0"),
    ("LinearLR start_factor 1.5", lambda o: P(S.LinearLR, o, 1.5), ValueError,
     "start_factor must be <= 1"),
    ("LinearLR end_factor -0.1", lambda o: P(S.LinearLR, o, 0.5, -0.1), ValueError,
     "end_factor must be >= 0"),
    ("LinearLR end_factor 1.1", lambda o: P(S.LinearLR, o, 0.5, 1.1), ValueError,
     "end_factor must be <= 1"),
    ("LinearLR total_iters 0", lambda o: P(S.LinearLR, o, total_iters=0), ValueError,
     "total_iters must be >= 1"),
    ("ConstantLR factor 1.5", lambda o: P(S.ConstantLR, o, 1.5), ValueError,
     "factor must be <= 1"),
    ("ConstantLR factor nan", lambda o: P(S.ConstantLR, o, _nan), ValueError,
     "factor must be finite"),
    ("ConstantLR total_iters 0", lambda o: P(S.ConstantLR, o, 0.5, 0), ValueError,
     "total_iters must be >= 1"),
    ("CosineAnnealingLR T_max 0", lambda o: P(S.CosineAnnealingLR, o, 0), ValueError,
     "T_max must be >= 1"),
    ("CosineAnnealingLR T_max float", lambda o: P(S.CosineAnnealingLR, o, 10.0), TypeError,
     "T_max must be an int"),
    ("CosineAnnealingLR eta_min < 0", lambda o: P(S.CosineAnnealingLR, o, 10, -1e-3),
     ValueError, "eta_min must be >= 0"),
    ("CosineAnnealingLR eta_min nan", lambda o: P(S.CosineAnnealingLR, o, 10, _nan),
     ValueError, "eta_min must be finite"),
    ("OneCycleLR no length", lambda o: P(S.OneCycleLR, o, 0.1), ValueError,
     "total_steps is required, or epochs and steps_per_epoch"),
    ("OneCycleLR epochs alone", lambda o: P(S.OneCycleLR, o, 0.1, epochs=3), ValueError,
     "epochs and steps_per_epoch must be given together"),
    ("OneCycleLR inconsistent", lambda o: P(S.OneCycleLR, o, 0.1, 100, 3, 10), ValueError,
     "total_steps=100 disagrees with epochs \\* steps_per_epoch = 30"),
    ("OneCycleLR total_steps 0", lambda o: P(S.OneCycleLR, o, 0.1, 0), ValueError,
     "total_steps must be >= 1"),
    ("OneCycleLR steps_per_epoch 0", lambda o: P(S.OneCycleLR, o, 0.1, epochs=3,
                                                 steps_per_epoch=0), ValueError,
     "steps_per_epoch must be >= 1"),
    ("OneCycleLR pct_start 1.5", lambda o: P(S.OneCycleLR, o, 0.1, 100, pct_start=1.5),
     ValueError, "pct_start must be <= 1"),
    ("OneCycleLR pct_start < 0", lambda o: P(S.OneCycleLR, o, 0.1, 100, pct_start=-0.1),
     ValueError, "pct_start must be >= 0"),
    ("OneCycleLR pct_start nan", lambda o: P(S.OneCycleLR, o, 0.1, 100, pct_start=_nan),
     ValueError, "pct_start must be finite"),
    ("OneCycleLR first phase empty", lambda o: P(S.OneCycleLR, o, 0.1, 10, pct_start=0.1),
     ValueError, "pct_start \\* total_steps is 1"),
    ("OneCycleLR last phase empty", lambda o: P(S.OneCycleLR, o, 0.1, 10, pct_start=1.0),
     ValueError, "leaves the last phase of the cycle zero steps long"),
    ("OneCycleLR anneal_strategy", lambda o: P(S.OneCycleLR, o, 0.1, 100,
                                               anneal_strategy="exp"),
     ValueError, "anneal_strategy must be 'cos' or 'linear'"),
    ("OneCycleLR max_lr count", lambda o: P(S.OneCycleLR, o, [0.1, 0.2, 0.3], 100), ValueError,
     "max_lr has 3 values, the optimizer has 2 param groups"),
    ("OneCycleLR max_lr nan", lambda o: P(S.OneCycleLR, o, [0.1, _nan], 100), ValueError,
     r"max_lr\[1\] must be finite"),
    ("OneCycleLR div_factor 0", lambda o: P(S.OneCycleLR, o, 0.1, 100, div_factor=0.0),
     ValueError, "div_factor must be > 0"),
    ("OneCycleLR final_div_factor inf", lambda o: P(S.OneCycleLR, o, 0.1, 100,
                                                    final_div_factor=_inf),
     ValueError, "final_div_factor must be finite"),
    ("OneCycleLR three_phase not bool", lambda o: P(S.OneCycleLR, o, 0.1, 100, three_phase=1),
     TypeError, "three_phase must be a bool"),
    ("OneCycleLR base_momentum < 0", lambda o: P(S.OneCycleLR, o, 0.1, 100,
                                                 base_momentum=-0.1),
     ValueError, "base_momentum must be >= 0"),
    ("OneCycleLR beta1 = 1", lambda o: P(S.OneCycleLR, _Stub(o.param_groups, betas=(0.9, 0.99)),
                                         0.1, 100, max_momentum=1.0),
     ValueError, "max_momentum must be < 1"),
    ("OneCycleLR no momentum", lambda o: P(S.OneCycleLR, _Stub(o.param_groups), 0.1, 100),
     ValueError, "cycle_momentum=True needs an optimizer with 'momentum' or 'betas'"),
    ("SequentialLR milestone count", lambda o: P(S.SequentialLR, o, [S.StepLR(o, 3),
                                                                     S.StepLR(o, 5)], [4, 8]),
     ValueError, "milestones must have len\\(schedulers\\) - 1 = 1 entries, got 2"),
    ("SequentialLR other optimizer", lambda o: P(S.SequentialLR, o, [
        S.StepLR(o, 3), S.StepLR(fastopt_optimizer("sgd"), 3)], [5]),
     ValueError, r"schedulers\[1\] \(StepLR\) is bound to a different optimizer"),
    ("SequentialLR not a scheduler", lambda o: P(S.SequentialLR, o, [S.StepLR(o, 3), 7], [5]),
     TypeError, r"schedulers\[1\] must be a fastopt.lr_scheduler scheduler"),
    ("SequentialLR milestones decreasing", lambda o: P(S.SequentialLR, o, [
        S.StepLR(o, 3), S.StepLR(o, 3), S.StepLR(o, 3)], [8, 4]),
     ValueError, "milestones must be strictly increasing"),
    ("SequentialLR milestone 0", lambda o: P(S.SequentialLR, o, [S.StepLR(o, 3),
                                                                 S.StepLR(o, 5)], [0]),
     ValueError, r"milestones\[0\] must be >= 1"),
    ("SequentialLR empty", lambda o: P(S.SequentialLR, o, [], []), ValueError,
     "schedulers is empty"),
    ("SequentialLR resumed by last_epoch", lambda o: P(S.SequentialLR, o, [
        S.StepLR(o, 3), S.StepLR(o, 5)], [4], last_epoch=6),
     ValueError, r"SequentialLR\(last_epoch=6\): resuming by last_epoch restarts"),
    ("SequentialLR one scheduler, not a list", lambda o: P(S.SequentialLR, o, S.StepLR(o, 3),
                                                           []),
     TypeError, "schedulers must be a list of schedulers"),
    ("ChainedScheduler empty", lambda o: P(S.ChainedScheduler, []), ValueError,
     "schedulers is empty"),
    ("ChainedScheduler one scheduler, not a list", lambda o: P(S.ChainedScheduler, S.StepLR(o, 3)),
     TypeError, "schedulers must be a list of schedulers"),
    ("ChainedScheduler not a scheduler", lambda o: P(S.ChainedScheduler, [S.StepLR(o, 3), 7]),
     TypeError, r"schedulers\[1\] must be a fastopt.lr_scheduler scheduler"),
    ("ChainedScheduler other optimizer", lambda o: P(S.ChainedScheduler, [
        S.StepLR(o, 3), S.StepLR(fastopt_optimizer("sgd"), 3)]),
     ValueError, r"schedulers\[1\] \(StepLR\) is bound to a different optimizer"),
    ("ChainedScheduler optimizer given", lambda o: P(S.ChainedScheduler, [S.StepLR(o, 3)],
                                                     fastopt_optimizer("sgd")),
     ValueError, r"schedulers\[0\] \(StepLR\) is bound to a different optimizer than the "
     "optimizer given"),
    ("ChainedScheduler listed twice", lambda o: P(S.ChainedScheduler, [S.StepLR(o, 3)] * 2),
     ValueError, r"schedulers\[1\] is listed twice"),
    ("ChainedScheduler not chainable", lambda o: P(S.ChainedScheduler, [
        S.OneCycleLR(o, 0.1, 100), S.StepLR(o, 3)]),
     ValueError, r"schedulers\[0\] \(OneCycleLR\) is not chainable"),
    ("ChainedScheduler of a SequentialLR of a LambdaLR", lambda o: P(S.ChainedScheduler, [
        S.StepLR(o, 3), S.SequentialLR(o, [S.StepLR(o, 3), S.LambdaLR(o, abs)], [5])]),
     ValueError, r"schedulers\[1\] \(SequentialLR\) is not chainable"),
    ("SequentialLR of a ChainedScheduler", lambda o: P(S.SequentialLR, o, [
        S.StepLR(o, 3), S.ChainedScheduler([S.StepLR(o, 5)])], [4]),
     TypeError, r"schedulers\[1\] is a ChainedScheduler"),
    ("WarmupCosineLR warmup > total", lambda o: P(S.warmup_cosine, o, 11, 10), ValueError,
     "warmup_steps must be <= total_steps, got 11 > 10"),
    ("WarmupCosineLR min_lr < 0", lambda o: P(S.warmup_cosine, o, 1, 10, -1e-5), ValueError,
     "min_lr must be >= 0"),
    ("WarmupCosineLR min_lr nan", lambda o: P(S.WarmupCosineLR, o, 1, 10, _nan), ValueError,
     "min_lr must be finite"),
    ("WarmupCosineLR total_steps 0", lambda o: P(S.warmup_cosine, o, 0, 0), ValueError,
     "total_steps must be >= 1"),
    ("WarmupCosineLR warmup_steps < 0", lambda o: P(S.warmup_cosine, o, -1, 10), ValueError,
     "warmup_steps must be >= 0"),
]


def _groups(opt):
    return copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                          for g in opt.param_groups])


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in CONSTRUCTOR_ERRORS],
                         ids=[c[0] for c in CONSTRUCTOR_ERRORS])
def test_constructor_errors_name_the_argument_and_change_nothing(make, exc, match):
    opt = fastopt_optimizer("sgd")
    call = make(opt)
    before = _groups(opt)
    with pytest.raises(exc, match=match):
        call()
    assert _groups(opt) == before


FUNCTION_ERRORS = [
    ("negative step", lambda: S.step_lr(-1, 0.1, 3), ValueError, "step must be >= 0"),
    ("float step", lambda: S.exponential_lr(1.0, 0.1, 0.5), TypeError, "step must be an int"),
    ("negative base_lr", lambda: S.cosine_annealing_lr(0, -0.1, 10), ValueError,
     "base_lr must be >= 0"),
    ("T_max 0", lambda: S.cosine_annealing_lr(0, 0.1, 0), ValueError, "T_max must be >= 1"),
    ("past total_steps", lambda: S.one_cycle_lr(101, 1.0, 100), ValueError,
     "step 101 is past total_steps=100"),
    ("momentum past total_steps", lambda: S.one_cycle_momentum(11, 10), ValueError,
     "past total_steps"),
    ("warmup_steps 0", lambda: S.linear_warmup_lr(0, 0.1, 0), ValueError,
     "warmup_steps must be >= 1"),
    ("warmup > total", lambda: S.warmup_cosine_lr(0, 0.1, 5, 4), ValueError,
     "warmup_steps must be <= total_steps"),
    ("milestones", lambda: S.multi_step_lr(0, 0.1, [3, 2]), ValueError, "non-decreasing"),
    ("lambda negative", lambda: S.lambda_lr(2, 0.1, lambda e: -e), ValueError,
     r"lr_lambda\(2\) must be >= 0"),
]


@pytest.mark.parametrize("fn,exc,match", [c[1:] for c in FUNCTION_ERRORS],
                         ids=[c[0] for c in FUNCTION_ERRORS])
def test_function_errors(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


# ---- bad state dicts ----------------------------------------------------------------------------

def _step_sched(opt):
    return S.StepLR(opt, 3, 0.5)


def _seq_sched(opt):
    return S.SequentialLR(opt, [S.LinearLR(opt, 0.5, total_iters=4),
                                S.CosineAnnealingLR(opt, 10)], [4])


def _chain_sched(opt):
    return S.ChainedScheduler([S.LinearLR(opt, 0.5, total_iters=4), S.ExponentialLR(opt, 0.9)])


def _edit(fn):
    def make(sd):
        sd = copy.deepcopy(sd)
        fn(sd)
        return sd
    return make


# (id, scheduler factory, edit(state dict) -> bad state dict, exception, message)
LOAD_ERRORS = [
    ("not a dict", _step_sched, lambda sd: [1], TypeError, "state_dict must be a dict"),
    ("missing key", _step_sched, _edit(lambda sd: sd.pop("gamma")), ValueError,
     r"state_dict is missing \['gamma'\]"),
    ("unknown key", _step_sched, _edit(lambda sd: sd.update(momentum=0.9)), ValueError,
     r"state_dict has unknown keys \['momentum'\]"),
    ("last_epoch float", _step_sched, _edit(lambda sd: sd.update(last_epoch=3.0)), TypeError,
     r"state_dict\['last_epoch'\] must be an int"),
    ("base_lrs length", _step_sched, _edit(lambda sd: sd.update(base_lrs=[0.1])), ValueError,
     r"state_dict\['base_lrs'\] has 1 values, the optimizer has 2 param groups"),
    ("base_lrs nan", _step_sched, _edit(lambda sd: sd["base_lrs"].__setitem__(1, _nan)),
     ValueError, r"state_dict\['base_lrs'\]\[1\] must be finite"),
    ("_last_lr str", _step_sched, _edit(lambda sd: sd.update(_last_lr="0.1")), TypeError,
     r"state_dict\['_last_lr'\] must be a list"),
    ("bad hyperparameter", _step_sched, _edit(lambda sd: sd.update(gamma=-1.0)), ValueError,
     r"state_dict\['gamma'\] must be > 0"),
    ("torch's key, bad value", _step_sched, _edit(lambda sd: sd.update(_is_initial="no")),
     TypeError, r"state_dict\['_is_initial'\] must be a bool"),
    ("torch's keys and an unknown one", _step_sched,
     _edit(lambda sd: sd.update(_step_count=3, _is_initial=False, _last_lrs=[0.1, 0.1])),
     ValueError, r"state_dict has unknown keys \['_last_lrs'\]"),
    ("MultiStepLR Counter with a negative milestone", lambda o: S.MultiStepLR(o, [2]),
     _edit(lambda sd: sd.update(milestones=Counter({-2: 1}))), ValueError,
     r"state_dict\['milestones'\] key -2 must be >= 0"),
    ("SequentialLR inner last_epoch -2", _seq_sched,
     _edit(lambda sd: sd["_schedulers"][1].update(last_epoch=-2)), ValueError,
     r"state_dict\['_schedulers'\]\[1\]\['last_epoch'\] must be >= -1"),
    ("SequentialLR milestones", _seq_sched, _edit(lambda sd: sd.update(_milestones=[4, 6])),
     ValueError, r"state_dict\['_milestones'\] has 2 entries"),
    ("SequentialLR inner", _seq_sched,
     _edit(lambda sd: sd["_schedulers"][1].update(T_max=0)), ValueError,
     r"state_dict\['_schedulers'\]\[1\]\['T_max'\] must be >= 1"),
    ("SequentialLR inner missing", _seq_sched,
     _edit(lambda sd: sd["_schedulers"][0].pop("end_factor")), ValueError,
     r"state_dict\['_schedulers'\]\[0\] is missing \['end_factor'\]"),
    ("_chained not a bool", _step_sched, _edit(lambda sd: sd.update(_chained=1)), TypeError,
     r"state_dict\['_chained'\] must be a bool"),
    ("_chained on a scheduler that is not chainable", lambda o: S.LambdaLR(o, lambda e: 1.0),
     _edit(lambda sd: sd.update(_chained=True)), ValueError,
     r"state_dict\['_chained'\] is True, but LambdaLR is not chainable"),
    ("ChainedScheduler inner", _chain_sched,
     _edit(lambda sd: sd["_schedulers"][1].update(gamma=0.0)), ValueError,
     r"state_dict\['_schedulers'\]\[1\]\['gamma'\] must be > 0"),
    ("ChainedScheduler count", _chain_sched, _edit(lambda sd: sd["_schedulers"].pop()),
     ValueError, r"state_dict\['_schedulers'\] has 1 entries, this ChainedScheduler has 2"),
    ("ChainedScheduler unknown key", _chain_sched, _edit(lambda sd: sd.update(last_epoch=5)),
     ValueError, r"state_dict has unknown keys \['last_epoch'\]"),
    ("LambdaLR state for a plain function", lambda o: S.LambdaLR(o, lambda e: 1.0),
     _edit(lambda sd: sd.update(lr_lambdas=[{"a": 1}, None])), ValueError,
     r"lr_lambdas'\]\[0\] holds attributes, but lr_lambda\[0\] is a plain function"),
    ("LambdaLR without lr_lambdas", lambda o: S.LambdaLR(o, lambda e: 1.0),
     _edit(lambda sd: sd.pop("lr_lambdas")), ValueError, r"missing \['lr_lambdas'\]"),
    ("OneCycleLR momentum >= 1 on Adam", lambda o: S.OneCycleLR(o, 0.1, 100),
     _edit(lambda sd: sd.update(max_momentum=[0.9, 1.0])), ValueError,
     r"state_dict\['max_momentum'\]\[1\] must be < 1"),
]


@pytest.mark.parametrize("make,edit,exc,match", [c[1:] for c in LOAD_ERRORS],
                         ids=[c[0] for c in LOAD_ERRORS])
def test_bad_state_dict_changes_nothing(make, edit, exc, match):
    opt = fastopt_optimizer("adam")
    sched = make(opt)
    for _ in range(5):
        sched.step()
    sd = sched.state_dict()
    bad = edit(sd)
    # the state to refuse differs from the scheduler's, so a partial load would show
    for _ in range(2):
        sched.step()
    before, groups = sched.state_dict(), _groups(opt)
    with pytest.raises(exc, match=match):
        sched.load_state_dict(bad)
    assert sched.state_dict() == before
    assert _groups(opt) == groups


# ---- torch's state dicts ------------------------------------------------------------------------

TORCH_STATE = [c for c in SCHEDULES if c.torch_make is None]


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
@pytest.mark.parametrize("case", TORCH_STATE, ids=[c.id for c in TORCH_STATE])
def test_loads_torch_state_dict_and_continues_as_torch(case):
    """torch's state_dict() (with its _step_count, _is_initial, ..., a Counter of milestones
    and, in SequentialLR, a later scheduler at last_epoch -1) loads, and the sequence goes on
    as torch's."""
    k = 337
    t_opt = torch_optimizer(case.family)
    theirs, t_sched = run_and_keep(torch.optim.lr_scheduler, t_opt, case.make, steps=k)
    opt = fastopt_optimizer(case.family)
    sched = case.make(S, opt)
    sched.load_state_dict(t_sched.state_dict())
    for g, tg in zip(opt.param_groups, t_opt.param_groups):      # the optimizer's state
        g.update({k: tg[k] for k in ("lr", "momentum") if k in g})
        if "betas" in g:
            g["betas"] = tuple(tg["betas"])
    assert getattr(sched, "last_epoch", k) == k             # ChainedScheduler has none
    assert sched.get_last_lr() == theirs[-1, :, 0].tolist()
    ours = run(S, opt, lambda m, o: sched, steps=STEPS - k)
    rest = run(torch.optim.lr_scheduler, t_opt, lambda m, o: t_sched, steps=STEPS - k)
    assert_rel(ours, rest, RTOL, case.id)


TORCH_LOADS = [c for c in TORCH_STATE
               if not c.id.startswith(("MultiStepLR", "SequentialLR", "OneCycleLR"))
               and c.id != "ChainedScheduler"]      # it holds a MultiStepLR


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
@pytest.mark.parametrize("case", TORCH_LOADS, ids=[c.id for c in TORCH_LOADS])
def test_torch_loads_our_state_dict_and_continues_as_ours(case):
    """The other way: torch's load_state_dict takes ours (MultiStepLR's milestones are a list
    here, a Counter there, so torch cannot take that one; SequentialLR's inner schedulers'
    last_epoch differ by torch's "undo")."""
    k = 337
    opt = fastopt_optimizer(case.family)
    _, sched = run_and_keep(S, opt, case.make, steps=k)
    t_opt = torch_optimizer(case.family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_sched = case.make(torch.optim.lr_scheduler, t_opt)
    t_sched.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    for g, tg in zip(opt.param_groups, t_opt.param_groups):
        tg["lr"] = g["lr"]
    theirs = run(torch.optim.lr_scheduler, t_opt, lambda m, o: t_sched, steps=STEPS - k)
    ours = run(S, opt, lambda m, o: sched, steps=STEPS - k)
    assert_rel(theirs, ours, RTOL, case.id)


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
def test_torch_one_cycle_state_of_another_cycle_is_refused():
    t_opt = torch_optimizer("sgd")
    t_sd = torch.optim.lr_scheduler.OneCycleLR(t_opt, 1.0, total_steps=50).state_dict()
    opt = fastopt_optimizer("sgd")
    sched = S.OneCycleLR(opt, 1.0, total_steps=100)
    before = sched.state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['total_steps'\] is 50, this "
                                         "OneCycleLR's is 100"):
        sched.load_state_dict(t_sd)
    t_sd = torch.optim.lr_scheduler.OneCycleLR(t_opt, 1.0, total_steps=100,
                                               pct_start=0.4).state_dict()
    with pytest.raises(ValueError, match=r"end steps'\] is \[39.0, 99\], this OneCycleLR's "
                                         r"is \[29.0, 99\]"):
        sched.load_state_dict(t_sd)
    assert sched.state_dict() == before


# ---- coverage of the tables ---------------------------------------------------------------------

def test_every_public_schedule_is_in_the_tables():
    public = [getattr(S, n) for n in S.__all__]
    classes = {c.__name__ for c in public
               if isinstance(c, type) and issubclass(c, S.LRScheduler) and c is not S.LRScheduler}
    functions = {f.__name__ for f in public if not isinstance(f, type)} - {"warmup_cosine"}
    built = {type(c.make(S, fastopt_optimizer(c.family))).__name__ for c in SCHEDULES}
    inner = {type(s).__name__ for c in SCHEDULES if c.id.startswith("SequentialLR")
             for s in c.make(S, fastopt_optimizer(c.family))._schedulers}
    assert classes <= built, f"not in SCHEDULES: {classes - built}"
    assert classes <= {c[0].split()[0] for c in CONSTRUCTOR_ERRORS}, "not in CONSTRUCTOR_ERRORS"
    assert functions <= {c[0].split()[0] for c in CLOSED_FORMS}, "not in CLOSED_FORMS"
    assert inner                                        # SequentialLR is tested with members
