"""The arena optimizers: layout, torch.optim parity with param groups, state dicts, resume."""
import numpy as np
import pytest

import fastopt
import fastopt.functional as F
import fastopt.reference as R
from cases import (TORCH_SKIP_REASON, TORCH_TAIL, assert_bitwise, assert_ulps, scaled_ulps,
                   torch)

SHAPES = [(8, 5), (5,), (5, 3), (3,), (), (2, 3, 4)]

# name -> (class name, constructor kwargs); every public optimizer appears here.
CLASS_CONFIGS = {
    "sgd": ("SGD", dict(lr=0.05)),
    "sgd_momentum_dampening": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2)),
    "sgd_nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adam": ("Adam", dict(lr=0.01, weight_decay=0.01)),
    "adam_amsgrad_maximize": ("Adam", dict(lr=0.01, amsgrad=True, maximize=True)),
    "adamw": ("AdamW", dict(lr=0.01)),
    "adamw_amsgrad": ("AdamW", dict(lr=0.01, amsgrad=True, betas=(0.8, 0.99))),
    "rmsprop": ("RMSprop", dict(lr=0.01)),
    "rmsprop_centered_momentum": ("RMSprop", dict(lr=0.01, centered=True, momentum=0.9,
                                                  weight_decay=0.01)),
}
STATE_KEYS = {"SGD": ["momentum_buffer"],
              "Adam": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
              "AdamW": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
              "RMSprop": ["square_avg", "momentum_buffer", "grad_avg"]}


def test_every_public_optimizer_is_in_the_table():
    public = {name for name in fastopt.__all__
              if isinstance(getattr(fastopt, name), type)
              and issubclass(getattr(fastopt, name), fastopt.Optimizer)
              and name != "Optimizer"}
    assert public == {cls for cls, _ in CLASS_CONFIGS.values()}


def make_params(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s), np.float32) for s in shapes]


def two_groups(params, cls):
    """Two groups with different lr and weight decay (the torch test model's layout)."""
    lr = {"SGD": 0.05, "Adam": 0.01, "AdamW": 0.01, "RMSprop": 0.01}[cls]
    return [{"params": params[:3], "lr": lr, "weight_decay": 0.0},
            {"params": params[3:], "lr": 3 * lr, "weight_decay": 0.05}]


def grad_sequence(steps, seed=1, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [[np.asarray(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1, s), np.float32)
             for s in shapes] for _ in range(steps)]


def run_fastopt(module, cls, kwargs, params, grads, mid_run=None):
    opt = getattr(module, cls)(two_groups(params, cls), **kwargs)
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
    if cls != "RMSprop":
        kw["fused"] = True
    opt = getattr(torch.optim, cls)(two_groups(tps, cls), **kw)
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


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
@pytest.mark.parametrize("name", sorted(CLASS_CONFIGS))
def test_classes_match_torch_with_groups_and_a_mid_run_change(name):
    cls, kwargs = CLASS_CONFIGS[name]
    params, grads = make_params(), grad_sequence(60)
    opt = run_fastopt(fastopt, cls, kwargs, params, grads, change_hyperparameters)
    topt, tps = run_torch_classes(cls, kwargs, params, grads, change_hyperparameters)
    assert not np.array_equal(opt.params[0], params[0])
    for k, (p, tp) in enumerate(zip(opt.params, tps)):
        tstate = {key: v for key, v in topt.state[tp].items() if v is not None}
        state = opt.state.get(k, {})
        assert {key for key in STATE_KEYS[cls] if key in tstate} == \
            {key for key in state if key != "step"}
        pairs = [("param", p, tp.detach().numpy())]
        pairs += [(key, state[key], tstate[key].numpy())
                  for key in STATE_KEYS[cls] if key in tstate]
        for what, a, b in pairs:
            a, b = a.reshape(-1), b.reshape(-1)
            if cls == "RMSprop":
                assert_ulps(a, b, 512, f"param {k} {what}")
                continue
            body = a.size - a.size % TORCH_TAIL
            assert_bitwise(a[:body], b[:body], f"param {k} {what}")
            assert_ulps(a[body:], b[body:], 64, f"param {k} {what} (torch's scalar tail)")
        if "step" in tstate:
            assert state["step"] == int(tstate["step"])


@pytest.mark.parametrize("name", sorted(CLASS_CONFIGS))
def test_classes_match_the_reference_classes(name):
    cls, kwargs = CLASS_CONFIGS[name]
    params, grads = make_params(2), grad_sequence(60, 3)
    fast = run_fastopt(fastopt, cls, kwargs, params, grads, change_hyperparameters)
    ref = run_fastopt(R, cls, kwargs, params, grads, change_hyperparameters)
    assert_ulps(fast.flat_params, ref.flat_params, 512, "params")
    for key in STATE_KEYS[cls]:
        if key in fast._state:
            assert_ulps(fast._state[key], ref._state[key], 512, key)


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
    hp = opt.param_groups[0]
    for k, p0 in enumerate(params):
        p = p0.reshape(-1).copy()
        n = p.size
        bufs = {key: np.zeros(n, np.float32) for key in STATE_KEYS[cls]}
        for t, gs in enumerate(grads, start=1):
            g = gs[k].reshape(-1)
            if cls == "SGD":
                F.sgd_(p, g, bufs["momentum_buffer"], step=t, lr=hp["lr"],
                       momentum=hp["momentum"], dampening=hp["dampening"],
                       weight_decay=hp["weight_decay"], nesterov=hp["nesterov"],
                       maximize=hp["maximize"])
            elif cls in ("Adam", "AdamW"):
                F.adam_(p, g, bufs["exp_avg"], bufs["exp_avg_sq"], bufs["max_exp_avg_sq"],
                        step=t, lr=hp["lr"], beta1=hp["betas"][0], beta2=hp["betas"][1],
                        eps=hp["eps"], weight_decay=hp["weight_decay"],
                        decoupled=hp["decoupled_weight_decay"], amsgrad=hp["amsgrad"],
                        maximize=hp["maximize"])
            else:
                F.rmsprop_(p, g, bufs["square_avg"], bufs["momentum_buffer"], bufs["grad_avg"],
                           step=t, lr=hp["lr"], alpha=hp["alpha"], eps=hp["eps"],
                           weight_decay=hp["weight_decay"], momentum=hp["momentum"],
                           centered=hp["centered"], maximize=hp["maximize"])
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

    straight = getattr(module, cls)(two_groups(params, cls), **kwargs)
    for gs in grads:
        feed(straight, gs)

    first = getattr(module, cls)(two_groups(params, cls), **kwargs)
    for gs in grads[:13]:
        feed(first, gs)
    saved_params = [p.copy() for p in first.params]
    sd = first.state_dict()
    del first
    resumed = getattr(module, cls)(two_groups(saved_params, cls), **kwargs)
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
