"""The arena optimizers: layout, torch.optim parity with param groups, state dicts, resume."""
import numpy as np
import pytest

import fastopt
import fastopt.functional as F
import fastopt.reference as R
from cases import (CLASS_CONFIGS, CONFIGS, FORMULAS, FULL_STATE, TOLERANCES, TORCH_SKIP_REASON,
                   TORCH_TAIL, assert_bitwise, assert_ulps, family_of, scaled_ulps, tolerance,
                   torch)
from fastopt import _core
from fastopt.families import FAMILIES, OPTIMIZERS
from fastopt._formats import STATE_DEFAULTS

SHAPES = [(8, 5), (5,), (5, 3), (3,), (), (2, 3, 4)]


def test_every_public_optimizer_is_in_the_table():
    public = {name for name in fastopt.__all__
              if isinstance(getattr(fastopt, name), type)
              and issubclass(getattr(fastopt, name), fastopt.Optimizer)
              and name != "Optimizer"}
    assert public == {cls for cls, _ in CLASS_CONFIGS.values()} == set(OPTIMIZERS)
    assert set(FULL_STATE) == set(OPTIMIZERS)


def test_every_family_is_in_the_tables_and_the_build():
    assert set(CONFIGS) == set(FAMILIES) == set(_core.family_names())
    for fam in FAMILIES.values():
        against = {"fused": ("reference", "torch_tail"), "single": ("reference", "torch"),
                   None: ("reference",)}[fam.torch]
        for which in against:
            assert (fam.name, which) in TOLERANCES, (fam.name, which)
        if fam.torch is None:
            assert fam.name in FORMULAS, f"{fam.name} has no torch peer and no formula test"


def make_params(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s), np.float32) for s in shapes]


def two_groups(params, kwargs):
    """Two groups with different lr and weight decay (the torch test model's layout)."""
    lr = kwargs.get("lr", 0.01)
    return [{"params": params[:3], "lr": lr, "weight_decay": 0.0},
            {"params": params[3:], "lr": 3 * lr, "weight_decay": 0.05}]


def class_fields(cls, kwargs):
    """The kernel fields of a class configuration (for the tolerance table)."""
    spec = OPTIMIZERS[cls]
    group = {k: v for k, v in spec.defaults.items() if k in spec.group_keys()}
    group.update(STATE_DEFAULTS)
    group.update(spec.fixed)
    group.update(kwargs)
    return spec.fields_of(group)


def grad_sequence(steps, seed=1, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [[np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1, s), np.float32)
             for s in shapes] for _ in range(steps)]


def run_fastopt(module, cls, kwargs, params, grads, mid_run=None):
    opt = getattr(module, cls)(two_groups(params, kwargs), **kwargs)
    for t, gs in enumerate(grads):
        if mid_run and t == len(grads) // 2:
            mid_run(opt.param_groups)
        for view, g in zip(opt.grads, gs):
            view[...] = g
        opt.step()
    return opt


def run_torch_classes(cls, kwargs, params, grads, mid_run=None):
    tps = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    kw = dict(kwargs)
    if FAMILIES[family_of(cls)].torch == "fused":
        kw["fused"] = True
    else:
        kw["foreach"] = False
    opt = getattr(torch.optim, cls)(two_groups(tps, kwargs), **kw)
    for t, gs in enumerate(grads):
        if mid_run and t == len(grads) // 2:
            mid_run(opt.param_groups)
        for p, g in zip(tps, gs):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
    return opt, tps


def change_hyperparameters(groups):
    """What schedulers do between steps: lr in every group, and momentum or betas."""
    for g in groups:
        g["lr"] = g["lr"] * 0.3
        if "betas" in g:
            g["betas"] = (0.85, g["betas"][1])
        if g.get("momentum"):
            g["momentum"] = 0.8


WITH_TORCH = sorted(k for k, (cls, _) in CLASS_CONFIGS.items()
                    if FAMILIES[family_of(cls)].torch is not None)


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
@pytest.mark.parametrize("name", WITH_TORCH)
def test_classes_match_torch_with_groups_and_a_mid_run_change(name):
    cls, kwargs = CLASS_CONFIGS[name]
    family = FAMILIES[family_of(cls)]
    fields = class_fields(cls, kwargs)
    params, grads = make_params(), grad_sequence(60)
    opt = run_fastopt(fastopt, cls, kwargs, params, grads, change_hyperparameters)
    topt, tps = run_torch_classes(cls, kwargs, params, grads, change_hyperparameters)
    assert not np.array_equal(opt.params[0], params[0])
    for k, (p, tp) in enumerate(zip(opt.params, tps)):
        tstate = {key: v for key, v in topt.state[tp].items() if v is not None}
        state = opt.state.get(k, {})
        assert {key for key in family.buffer_names if key in tstate} == \
            {key for key in state if key in family.buffer_names}
        pairs = [("param", p, tp.detach().numpy())]
        pairs += [(key, state[key], tstate[key].numpy())
                  for key in family.buffer_names if key in tstate]
        for what, a, b in pairs:
            a, b = a.reshape(-1), b.reshape(-1)
            if family.torch == "single":
                assert_ulps(a, b, tolerance(family.name, fields, "torch"), f"param {k} {what}")
                continue
            body = a.size - a.size % TORCH_TAIL
            assert_bitwise(a[:body], b[:body], f"param {k} {what}")
            assert_ulps(a[body:], b[body:], tolerance(family.name, fields, "torch_tail"),
                        f"param {k} {what} (torch's scalar tail)")
        if "step" in tstate:
            assert state["step"] == int(tstate["step"])
        for name in family.counter_defaults:     # torch keeps them as float32 tensors
            assert state[name] == float(tstate[name])


@pytest.mark.parametrize("name", sorted(CLASS_CONFIGS))
def test_classes_match_the_reference_classes(name):
    cls, kwargs = CLASS_CONFIGS[name]
    params, grads = make_params(2), grad_sequence(60, 3)
    fast = run_fastopt(fastopt, cls, kwargs, params, grads, change_hyperparameters)
    ref = run_fastopt(R, cls, kwargs, params, grads, change_hyperparameters)
    bound = max(512, tolerance(family_of(cls), class_fields(cls, kwargs), "reference"))
    assert_ulps(fast.flat_params, ref.flat_params, bound, "params")
    for key in fast.family.buffer_names:
        if key in fast._state:
            assert_ulps(fast._state[key].data[0], ref._state[key].data[0], bound, key)


@pytest.mark.parametrize("name", sorted(CLASS_CONFIGS))
def test_each_param_steps_as_the_functional_kernel_would(name):
    """The arena adds nothing: a param's trajectory is the functional kernel's, bit for bit."""
    cls, kwargs = CLASS_CONFIGS[name]
    params, grads = make_params(4), grad_sequence(12, 5)
    opt = getattr(fastopt, cls)(params, **kwargs)
    for gs in grads:
        for view, g in zip(opt.grads, gs):
            view[...] = g
        opt.step()
    fam = opt.family
    fields = opt.spec.fields_of(opt.param_groups[0])
    kw = {f.name: fields[f.name] for f in fam.user_fields}
    fn = getattr(F, fam.name + "_")
    for k, p0 in enumerate(params):
        p = p0.reshape(-1).copy()
        bufs = {b.name: np.full(p.size, b.initial(fields), np.float32) for b in fam.buffers}
        counters = dict(fam.counter_defaults)
        for t, gs in enumerate(grads, start=1):
            out = fn(p, gs[k].reshape(-1), *[bufs[b] for b in fam.buffer_names], step=t, **kw,
                     **counters)
            counters.update(out or {})
        assert_bitwise(opt.params[k].reshape(-1), p, f"param {k}")


# ---- layout ------------------------------------------------------------------------------

def test_arena_layout_is_aligned_contiguous_and_shared():
    params = make_params()
    opt = fastopt.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}])
    base = opt.flat_params.ctypes.data
    assert base % 64 == 0 and opt.flat_grads.ctypes.data % 64 == 0
    assert opt.flat_params.ndim == 1 and opt.flat_params.dtype == np.float32
    for p0, p, g in zip(params, opt.params, opt.grads):
        assert p.shape == p0.shape == g.shape
        assert (p.ctypes.data - base) % 64 == 0
        assert np.shares_memory(p, opt.flat_params) and np.shares_memory(g, opt.flat_grads)
        assert_bitwise(p, p0, "copied in")
        assert p.ctypes.data != p0.ctypes.data
    # each group is one contiguous range: its params' offsets are increasing and the groups
    # follow one another
    offsets = [(p.ctypes.data - base) // 4 for p in opt.params]
    assert offsets == sorted(offsets)
    assert opt.param_groups[0]["params"][0] is opt.params[0] or \
        np.shares_memory(opt.param_groups[0]["params"][0], opt.params[0])
    # the padding is zero, so norms over the flat buffers are the params' norms
    total = sum(float(np.sum(p.astype(np.float64) ** 2)) for p in params)
    assert np.isclose(float(np.sum(opt.flat_params.astype(np.float64) ** 2)), total)


def test_given_arrays_are_copied_not_aliased():
    params = make_params()
    opt = fastopt.SGD(params, lr=0.1)
    keep = [p.copy() for p in params]
    for g in opt.grads:
        g[...] = 1.0
    opt.step()
    for p, k in zip(params, keep):
        assert_bitwise(p, k, "the caller's array")
    params[0][...] = 99.0
    assert not (opt.params[0] == 99.0).any()


def test_named_params_give_dicts():
    params = make_params()
    named = {f"layer{i}": p for i, p in enumerate(params)}
    opt = fastopt.AdamW(named, lr=0.1)
    assert list(opt.params) == list(named) and list(opt.grads) == list(named)
    for k in named:
        assert opt.params[k].shape == named[k].shape
    pairs = fastopt.SGD(list(named.items()), lr=0.1)       # like model.named_parameters()
    assert list(pairs.params) == list(named)
    grouped = fastopt.SGD([{"params": {"a": params[0]}}, {"params": {"b": params[1]},
                                                           "lr": 0.5}], lr=0.1)
    assert list(grouped.params) == ["a", "b"]


def test_zero_grad_is_one_fill_of_the_arena():
    opt = fastopt.Adam(make_params())
    opt.flat_grads[...] = 3.0
    opt.zero_grad()
    assert not opt.flat_grads.any()
    assert all(not g.any() for g in opt.grads)


def test_step_with_closure_returns_its_loss():
    opt = fastopt.SGD(make_params(), lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        for g in opt.grads:
            g[...] = 1.0
        return 1.25
    before = opt.flat_params.copy()
    assert opt.step(closure) == 1.25 and calls == [1]
    assert not np.array_equal(before, opt.flat_params)


def test_state_is_created_on_the_first_step():
    opt = fastopt.Adam(make_params())
    assert opt.state_dict()["state"] == {}
    opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(len(SHAPES)))
    assert sd["state"][0]["step"] == 1 and set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["param_groups"][0]["params"] == list(range(len(SHAPES)))


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
def test_momentum_raised_from_zero_mid_run_starts_like_torch():
    params, grads = make_params(6), grad_sequence(10, 6)
    opt = fastopt.SGD(params, lr=0.05)
    tps = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    topt = torch.optim.SGD(tps, lr=0.05, fused=True)
    for t, gs in enumerate(grads):
        if t == 4:
            opt.param_groups[0]["momentum"] = 0.9
            topt.param_groups[0]["momentum"] = 0.9
        for view, tp, g in zip(opt.grads, tps, gs):
            view[...] = g
            tp.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    for p, tp in zip(opt.params, tps):
        body = p.size - p.size % TORCH_TAIL
        assert_bitwise(p.reshape(-1)[:body], tp.detach().numpy().reshape(-1)[:body], "param")


# ---- state dicts and exact resume -------------------------------------------------------

@pytest.mark.parametrize("module", [fastopt, R], ids=["fastopt", "reference"])
@pytest.mark.parametrize("name", sorted(CLASS_CONFIGS))
def test_stop_save_load_continue_is_bit_identical(module, name):
    cls, kwargs = CLASS_CONFIGS[name]
    params, grads = make_params(8), grad_sequence(30, 9)

    def feed(opt, gs):
        for view, g in zip(opt.grads, gs):
            view[...] = g
        opt.step()

    straight = getattr(module, cls)(two_groups(params, kwargs), **kwargs)
    for gs in grads:
        feed(straight, gs)

    first = getattr(module, cls)(two_groups(params, kwargs), **kwargs)
    for gs in grads[:13]:
        feed(first, gs)
    saved_params = [p.copy() for p in first.params]
    sd = first.state_dict()
    del first
    resumed = getattr(module, cls)(two_groups(saved_params, kwargs), **kwargs)
    resumed.load_state_dict(sd)
    for gs in grads[13:]:
        feed(resumed, gs)
    assert_bitwise(resumed.flat_params, straight.flat_params, "params after resume")
    assert resumed.state_dict()["state"].keys() == straight.state_dict()["state"].keys()


def test_state_dict_arrays_are_copies():
    opt = fastopt.Adam(make_params())
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"][...] = 123.0
    sd["param_groups"][0]["lr"] = 5.0
    assert not (opt.state[0]["exp_avg"] == 123.0).any()
    assert opt.param_groups[0]["lr"] == 1e-3


def test_load_state_dict_restores_hyperparameters_and_round_trips():
    opt = fastopt.RMSprop(make_params(), momentum=0.5, centered=True)
    for _ in range(3):
        opt.flat_grads[...] = 0.5
        opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.123
    other = fastopt.RMSprop(make_params(1), momentum=0.5, centered=True)
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 0.123
    assert other.param_groups[0]["params"][0] is not None
    back = other.state_dict()
    for k, entry in sd["state"].items():
        assert back["state"][k]["step"] == entry["step"] == 3
        for key, a in entry.items():
            if key != "step":
                assert_bitwise(back["state"][k][key], a, key)


def test_loading_a_fresh_state_dict_resets_the_state():
    params = make_params()
    fresh = fastopt.Adam(params).state_dict()
    opt = fastopt.Adam(params)
    for g in opt.grads:
        g[...] = 1.0
    opt.step()
    opt.load_state_dict(fresh)
    assert opt.state_dict()["state"] == {}
    ref = fastopt.Adam([p.copy() for p in opt.params])
    for o in (opt, ref):
        for g in o.grads:
            g[...] = 0.25
        o.step()
    for a, b in zip(opt.params, ref.params):
        assert_bitwise(a, b, "first step after loading a fresh state")


def test_torch_like_extras_are_accepted():
    p = make_params()
    fastopt.Adam(p, foreach=True, fused=True)
    fastopt.SGD(p, foreach=False, fused=None)
    fastopt.RMSprop(p, foreach=None)
    assert fastopt.AdamW(p).defaults["weight_decay"] == 1e-2
    assert fastopt.SGD(p).defaults["lr"] == 1e-3
    assert fastopt.RMSprop(p).defaults["lr"] == 1e-2
    assert "AdamW" in repr(fastopt.AdamW(p))


def test_scaled_ulps_is_measured_on_max_abs_one():
    assert scaled_ulps(np.float32([1e-30]), np.float32([0.0]))[0] < 1e-20
    assert scaled_ulps(np.float32([2.0 + 2 ** -22]), np.float32([2.0]))[0] == pytest.approx(1.0)
    assert scaled_ulps(np.float32([np.nan]), np.float32([1.0]))[0] == np.inf
