"""Hypothesis property tests: random lengths, shapes and hyperparameters."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopt
import fastopt.functional as F
import fastopt.reference as R
from cases import (FULL_STATE, TORCH_TAIL, assert_bitwise, assert_ulps, run_functional,
                   run_torch, torch)
from fastopt.families import FAMILIES

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

unit = st.floats(0.0, 0.999)
lr = st.floats(1e-5, 1.0)
wd = st.one_of(st.just(0.0), st.floats(1e-6, 0.5))
flag = st.booleans()


@st.composite
def sgd_cfg(draw):
    momentum = draw(st.one_of(st.just(0.0), st.floats(0.01, 0.99)))
    nesterov = momentum > 0 and draw(flag)
    dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), st.floats(0.0, 1.0)))
    return dict(lr=draw(lr), momentum=momentum, dampening=dampening, nesterov=nesterov,
                weight_decay=draw(wd), maximize=draw(flag))


@st.composite
def adam_cfg(draw):
    return dict(lr=draw(lr), beta1=draw(unit), beta2=draw(unit),
                eps=draw(st.floats(1e-12, 1e-3)), weight_decay=draw(wd),
                decoupled=draw(flag), amsgrad=draw(flag), maximize=draw(flag))


@st.composite
def rmsprop_cfg(draw):
    return dict(lr=draw(lr), alpha=draw(st.floats(0.5, 0.999)),
                eps=draw(st.floats(1e-10, 1e-3)), weight_decay=draw(wd),
                momentum=draw(st.one_of(st.just(0.0), st.floats(0.01, 0.99))),
                centered=draw(flag), maximize=draw(flag))


@st.composite
def adamax_cfg(draw):
    return dict(lr=draw(lr), beta1=draw(unit), beta2=draw(unit),
                eps=draw(st.floats(1e-12, 1e-3)), weight_decay=draw(wd), maximize=draw(flag))


@st.composite
def adadelta_cfg(draw):
    return dict(lr=draw(lr), rho=draw(st.floats(0.0, 1.0)), eps=draw(st.floats(1e-10, 1e-3)),
                weight_decay=draw(wd), maximize=draw(flag))


@st.composite
def nadam_cfg(draw):
    return dict(lr=draw(lr), beta1=draw(unit), beta2=draw(unit),
                eps=draw(st.floats(1e-12, 1e-3)), weight_decay=draw(wd),
                momentum_decay=draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.5))),
                decoupled=draw(flag), maximize=draw(flag))


@st.composite
def radam_cfg(draw):
    # up to 6 steps: step 6 is the first rectified one for beta2 >= 0.85 (later below it,
    # never below 2/3), so half the draws are there
    beta2 = draw(st.one_of(st.floats(0.85, 0.999), unit))
    return dict(lr=draw(lr), beta1=draw(unit), beta2=beta2,
                eps=draw(st.floats(1e-12, 1e-3)), weight_decay=draw(wd),
                decoupled=draw(flag), maximize=draw(flag))


@st.composite
def adagrad_cfg(draw):
    return dict(lr=draw(lr), lr_decay=draw(st.one_of(st.just(0.0), st.floats(1e-4, 1.0))),
                weight_decay=draw(wd), eps=draw(st.one_of(st.just(0.0), st.floats(1e-12, 1e-3))),
                maximize=draw(flag),
                initial_accumulator_value=draw(st.one_of(st.just(0.0), st.floats(1e-3, 1.0))))


@st.composite
def lion_cfg(draw):
    return dict(lr=draw(lr), beta1=draw(unit), beta2=draw(unit), weight_decay=draw(wd),
                maximize=draw(flag))


# One strategy a family: random hyperparameters of its functional kernel.
# One strategy a family: random hyperparameters of its functional kernel.
CFG = {"sgd": sgd_cfg(), "adam": adam_cfg(), "rmsprop": rmsprop_cfg(), "adamax": adamax_cfg(),
       "adadelta": adadelta_cfg(), "nadam": nadam_cfg(), "radam": radam_cfg(),
       "adagrad": adagrad_cfg(), "lion": lion_cfg()}


def test_every_family_has_a_strategy():
    assert set(CFG) == set(FAMILIES)


def trajectory(data, n, steps):
    seed = data.draw(st.integers(0, 2 ** 32 - 1))
    scale = data.draw(st.floats(-4, 2))
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [(rng.standard_normal(n) * 10.0 ** scale).astype(np.float32) for _ in range(steps)]
    return p0, grads


@pytest.mark.parametrize("family", sorted(CFG))
@SETTINGS
@given(data=st.data(), n=st.integers(0, 300), steps=st.integers(1, 6))
def test_fused_matches_reference_and_torch(family, data, n, steps):
    cfg = data.draw(CFG[family])
    p0, grads = trajectory(data, n, steps)
    p, state = run_functional(F, family, cfg, p0, grads)
    pr, state_r = run_functional(R, family, cfg, p0, grads)
    # few steps, so far tighter than the 300-step table: a handful of roundings per step, on
    # the scale of the largest term of the update (lr*|buf| can reach 1e2*lr/(1-momentum))
    bound = 64 * steps * max(1.0, cfg["lr"] * 10.0 ** 2 / (1.0 - cfg.get("momentum", 0.0)))
    assert_ulps(p, pr, bound, "param vs reference")
    for k in state:
        assert_ulps(state[k], state_r[k], bound, f"{k} vs reference")
    if torch is not None and FAMILIES[family].torch == "fused":
        pt, state_t = run_torch(family, cfg, p0, grads)
        body = n - n % TORCH_TAIL
        assert_bitwise(p[:body], pt[:body], "param vs torch fused")
        for k in state:
            assert_bitwise(state[k][:body], state_t[k][:body], f"{k} vs torch fused")


shapes = st.lists(st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple),
                  min_size=1, max_size=6)


@SETTINGS
@given(data=st.data(), shape_list=shapes, split=st.integers(0, 6))
def test_arena_steps_each_param_like_the_functional_kernel(data, shape_list, split):
    """Any shapes, any split into two groups: the arena changes nothing about the math."""
    cfg = data.draw(adam_cfg())
    rng = np.random.default_rng(0)
    params = [np.asarray(rng.standard_normal(s), np.float32) for s in shape_list]
    split = min(split, len(params) - 1) if len(params) > 1 else len(params)
    groups = [{"params": params[:split]}, {"params": params[split:], "lr": cfg["lr"] / 2}]
    groups = [g for g in groups if g["params"]]
    opt = fastopt.Adam(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                       eps=cfg["eps"], weight_decay=cfg["weight_decay"], amsgrad=cfg["amsgrad"],
                       maximize=cfg["maximize"], decoupled_weight_decay=cfg["decoupled"])
    grads = [[np.asarray(rng.standard_normal(s), np.float32) for s in shape_list]
             for _ in range(3)]
    for gs in grads:
        for view, g in zip(opt.grads, gs):
            view[...] = g
        opt.step()
    k = 0
    for gi, group in enumerate(opt.param_groups):
        for _ in group["params"]:
            c = dict(cfg, lr=group["lr"])
            p, _ = run_functional(F, "adam", c, params[k].reshape(-1),
                                  [gs[k].reshape(-1) for gs in grads])
            assert_bitwise(opt.params[k].reshape(-1), p, f"param {k}")
            k += 1


@SETTINGS
@given(data=st.data())
def test_state_dict_round_trip_is_exact(data):
    family = data.draw(st.sampled_from(sorted(FULL_STATE)))
    n_steps = data.draw(st.integers(1, 4))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    params = [rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]
    kw = FULL_STATE
    a = getattr(fastopt, family)(params, **kw[family])
    for _ in range(n_steps):
        for g in a.grads:
            g[...] = rng.standard_normal(g.shape)
        a.step()
    b = getattr(fastopt, family)([p.copy() for p in a.params], **kw[family])
    b.load_state_dict(a.state_dict())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for key, v in sa["state"][i].items():
            if not isinstance(v, np.ndarray):      # step and counters
                assert v == sb["state"][i][key]
            else:
                assert_bitwise(v, sb["state"][i][key], key)


def test_functional_signatures_take_the_buffers_in_the_family_order():
    import inspect
    for name, fam in FAMILIES.items():
        sig = list(inspect.signature(getattr(F, name + "_")).parameters)
        assert sig[:2 + len(fam.buffer_names)] == ["param", "grad", *fam.buffer_names]
        assert sig == list(inspect.signature(getattr(R, name + "_")).parameters)
