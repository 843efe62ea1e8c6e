"""Bad input: a TypeError or ValueError that names the argument, and nothing changed.

Two tables drive this file: functional-call errors (run on both backends) and optimizer-class
errors (constructor, step with a bad hyperparameter, load_state_dict).
"""
import copy

import numpy as np
import pytest

import fastopt
import fastopt.reference as R
from fastopt.families import FAMILIES, OPTIMIZERS
from cases import state_bytes

N = 37


def arrays(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(n).astype(np.float32)
            for k in ("param", "grad", "a", "b", "c")}


def adam_call(**over):
    """Arguments of an adam_ call with the named parts replaced."""
    x = arrays()
    args = dict(param=x["param"], grad=x["grad"], exp_avg=x["a"], exp_avg_sq=np.abs(x["b"]),
                max_exp_avg_sq=None)
    kw = dict(step=1)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return "adam_", args, kw


def sgd_call(**over):
    x = arrays()
    args = dict(param=x["param"], grad=x["grad"], momentum_buffer=x["a"])
    kw = dict(step=2, momentum=0.9)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return "sgd_", args, kw


def rmsprop_call(**over):
    x = arrays()
    args = dict(param=x["param"], grad=x["grad"], square_avg=np.abs(x["a"]),
                momentum_buffer=x["b"], grad_avg=x["c"])
    kw = dict(step=1, momentum=0.5, centered=True)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return "rmsprop_", args, kw


def call(family, **over):
    """Arguments of a `<family>_` call (every state buffer given, non-negative, step 1) with
    the named parts replaced: the generic row builder for any family."""
    x = arrays()
    rng = np.random.default_rng(2)
    args = dict(param=x["param"], grad=x["grad"])
    for name in FAMILIES[family].buffer_names:
        args[name] = np.abs(rng.standard_normal(N)).astype(np.float32)
    kw = dict(step=1)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return family + "_", args, kw


_p = np.zeros(2 * N, np.float32)
_alias = np.ones(N, np.float32)
_ro = np.ones(N, np.float32)
_ro.flags.writeable = False

# (id, call, exception, message pattern)
FUNCTIONAL_ERRORS = [
    ("param float64", adam_call(param=np.ones(N)), TypeError, "param must have dtype float32"),
    ("grad int", adam_call(grad=np.ones(N, np.int32)), TypeError, "grad must have dtype float32"),
    ("object array", sgd_call(momentum_buffer=np.array([None] * N)), TypeError,
     "momentum_buffer must have dtype float32"),
    ("list not array", adam_call(exp_avg=[0.0] * N), TypeError, "exp_avg must be a numpy.ndarray"),
    ("big-endian", adam_call(exp_avg_sq=np.ones(N, ">f4")), TypeError,
     "exp_avg_sq must have dtype float32"),
    ("non-contiguous", adam_call(param=np.ones(2 * N, np.float32)[::2]), ValueError,
     "param must be C-contiguous"),
    ("2-D", rmsprop_call(square_avg=np.ones((N, 1), np.float32)), ValueError,
     "square_avg must be 1-D"),
    ("read-only param", sgd_call(param=_ro), ValueError, "param is read-only"),
    ("read-only state", adam_call(exp_avg=_ro), ValueError, "exp_avg is read-only"),
    ("length mismatch", adam_call(exp_avg=np.zeros(N + 1, np.float32)), ValueError,
     "exp_avg has length 38, but param has length 37"),
    ("state aliases param", adam_call(param=_alias, exp_avg=_alias), ValueError,
     "overlap in memory"),
    ("grad aliases param", sgd_call(param=_alias, grad=_alias), ValueError, "overlap in memory"),
    ("overlapping views", rmsprop_call(param=_p[:N], grad_avg=_p[N - 1:2 * N - 1]), ValueError,
     "overlap in memory"),
    ("negative lr", adam_call(lr=-1e-3), ValueError, "lr must be >= 0"),
    ("nan lr", sgd_call(lr=float("nan")), ValueError, "lr must be finite"),
    ("inf weight decay", rmsprop_call(weight_decay=float("inf")), ValueError,
     "weight_decay must be finite"),
    ("string lr", adam_call(lr="0.1"), TypeError, "lr must be a real number"),
    ("beta1 = 1", adam_call(beta1=1.0), ValueError, "beta1 must be < 1"),
    ("beta2 < 0", adam_call(beta2=-0.5), ValueError, "beta2 must be >= 0"),
    ("eps = 0", adam_call(eps=0.0), ValueError, "eps must be > 0"),
    ("eps < 0", rmsprop_call(eps=-1e-8), ValueError, "eps must be > 0"),
    ("alpha > 1", rmsprop_call(alpha=1.5), ValueError, "alpha must be <= 1"),
    ("negative momentum", sgd_call(momentum=-0.9), ValueError, "momentum must be >= 0"),
    ("step 0", adam_call(step=0), ValueError, "step must be >= 1"),
    ("step float", sgd_call(step=1.0), TypeError, "step must be an int"),
    ("nesterov without momentum", sgd_call(nesterov=True, momentum=0.0), ValueError,
     "nesterov requires a momentum > 0"),
    ("nesterov with dampening", sgd_call(nesterov=True, dampening=0.1), ValueError,
     "nesterov requires a momentum > 0 and zero dampening"),
    ("flag not bool", adam_call(amsgrad=1), TypeError, "amsgrad must be a bool"),
    ("momentum without buffer", sgd_call(momentum_buffer=None), ValueError,
     "momentum_buffer is required by the options given \\(momentum != 0\\)"),
    ("amsgrad without buffer", adam_call(amsgrad=True), ValueError,
     "max_exp_avg_sq is required by the options given \\(amsgrad=True\\)"),
    ("centered without grad_avg", rmsprop_call(grad_avg=None), ValueError,
     "grad_avg is required by the options given \\(centered=True\\)"),
    ("rmsprop momentum without buffer", rmsprop_call(momentum_buffer=None), ValueError,
     "momentum_buffer is required"),
    ("adamax beta2 = 1", call("adamax", beta2=1.0), ValueError, "beta2 must be < 1"),
    ("adamax eps = 0", call("adamax", eps=0.0), ValueError, "eps must be > 0"),
    ("adamax exp_inf length", call("adamax", exp_inf=np.zeros(N + 1, np.float32)), ValueError,
     "exp_inf has length 38, but param has length 37"),
    ("adamax state aliased", call("adamax", exp_avg=_alias, exp_inf=_alias), ValueError,
     "overlap in memory"),
    ("adamax without exp_inf", call("adamax", exp_inf=None), ValueError,
     "exp_inf is required"),
    ("adadelta rho > 1", call("adadelta", rho=1.5), ValueError, "rho must be <= 1"),
    ("adadelta rho < 0", call("adadelta", rho=-0.1), ValueError, "rho must be >= 0"),
    ("adadelta acc_delta length", call("adadelta", acc_delta=np.zeros(N - 1, np.float32)),
     ValueError, "acc_delta has length 36, but param has length 37"),
    ("adadelta grad aliases state", call("adadelta", grad=_alias, square_avg=_alias),
     ValueError, "overlap in memory"),
    ("adadelta without acc_delta", call("adadelta", acc_delta=None), ValueError,
     "acc_delta is required"),
    ("nadam negative momentum_decay", call("nadam", momentum_decay=-4e-3), ValueError,
     "momentum_decay must be >= 0"),
    ("nadam nan mu_product", call("nadam", mu_product=float("nan")), ValueError,
     "mu_product must be finite"),
    ("nadam string mu_product", call("nadam", mu_product="1"), TypeError,
     "mu_product must be a real number"),
    ("nadam beta1 = 1", call("nadam", beta1=1.0), ValueError, "beta1 must be < 1"),
    ("nadam length mismatch", call("nadam", exp_avg_sq=np.zeros(N - 1, np.float32)), ValueError,
     "exp_avg_sq has length 36, but param has length 37"),
    ("nadam without exp_avg", call("nadam", exp_avg=None), ValueError, "exp_avg is required"),
    ("radam eps = 0", call("radam", eps=0.0), ValueError, "eps must be > 0"),
    ("radam beta2 = 1", call("radam", beta2=1.0), ValueError, "beta2 must be < 1"),
    ("radam flag not bool", call("radam", decoupled=1), TypeError, "decoupled must be a bool"),
    ("radam state aliases state", call("radam", exp_avg=_alias, exp_avg_sq=_alias), ValueError,
     "overlap in memory"),
    ("radam without exp_avg_sq", call("radam", exp_avg_sq=None), ValueError,
     "exp_avg_sq is required"),
    ("adagrad negative lr_decay", call("adagrad", lr_decay=-0.1), ValueError,
     "lr_decay must be >= 0"),
    ("adagrad negative eps", call("adagrad", eps=-1e-10), ValueError, "eps must be >= 0"),
    ("adagrad inf lr_decay", call("adagrad", lr_decay=float("inf")), ValueError,
     "lr_decay must be finite"),
    ("adagrad sum length", call("adagrad", sum=np.zeros(N - 1, np.float32)), ValueError,
     "sum has length 36, but param has length 37"),
    ("adagrad sum aliases grad", call("adagrad", grad=_alias, sum=_alias), ValueError,
     "overlap in memory"),
    ("adagrad without sum", call("adagrad", sum=None), ValueError,
     "sum is required"),
    ("lion beta1 = 1", call("lion", beta1=1.0), ValueError, "beta1 must be < 1"),
    ("lion nan beta2", call("lion", beta2=float("nan")), ValueError, "beta2 must be finite"),
    ("lion negative weight_decay", call("lion", weight_decay=-0.1), ValueError,
     "weight_decay must be >= 0"),
    ("lion exp_avg length", call("lion", exp_avg=np.zeros(N + 1, np.float32)), ValueError,
     "exp_avg has length 38, but param has length 37"),
    ("lion exp_avg aliases param", call("lion", param=_alias, exp_avg=_alias), ValueError,
     "overlap in memory"),
    ("lion without exp_avg", call("lion", exp_avg=None), ValueError, "exp_avg is required"),
]


def test_every_family_and_class_has_error_rows():
    assert {c[1][0] for c in FUNCTIONAL_ERRORS} == {f + "_" for f in FAMILIES}
    assert {c[1].__name__ for c in STEP_ERRORS} >= set(OPTIMIZERS) - {"AdamW"}


@pytest.mark.parametrize("module", [fastopt.functional, R], ids=["fastopt", "reference"])
@pytest.mark.parametrize("call,exc,match", [c[1:] for c in FUNCTIONAL_ERRORS],
                         ids=[c[0] for c in FUNCTIONAL_ERRORS])
def test_functional_errors_name_the_argument_and_change_nothing(module, call, exc, match):
    fn_name, args, kw = call
    before = {k: (v.copy() if isinstance(v, np.ndarray) else copy.copy(v))
              for k, v in args.items()}
    with pytest.raises(exc, match=match):
        getattr(module, fn_name)(*args.values(), **kw)
    for k, v in args.items():
        if isinstance(v, np.ndarray) and v.dtype != object:
            assert np.array_equal(v, before[k], equal_nan=True), f"{k} was modified"


# ---- optimizer classes --------------------------------------------------------------------

def params():
    rng = np.random.default_rng(1)
    return [rng.standard_normal((4, 3)).astype(np.float32),
            rng.standard_normal(5).astype(np.float32)]


_shared = np.ones(10, np.float32)
CONSTRUCTOR_ERRORS = [
    ("empty list", lambda: fastopt.Adam([]), ValueError, "params is an empty parameter list"),
    ("empty group", lambda: fastopt.SGD([{"params": []}]), ValueError,
     r"param_groups\[0\].params is an empty parameter list"),
    ("float64 param", lambda: fastopt.Adam([np.ones(3)]), TypeError,
     r"params\[0\] must have dtype float32, got float64"),
    ("int param", lambda: fastopt.SGD([np.ones(3, np.int64)]), TypeError,
     "must have dtype float32"),
    ("not an array", lambda: fastopt.SGD([[1.0, 2.0]]), TypeError, "must be a numpy.ndarray"),
    ("single array", lambda: fastopt.SGD(np.ones(3, np.float32)), TypeError, "wrap it in a list"),
    ("same array twice", lambda: fastopt.Adam([_shared, _shared]), ValueError,
     "parameter 0 and parameter 1 overlap in memory"),
    ("overlapping views", lambda: fastopt.Adam([_shared[:6], _shared[5:]]), ValueError,
     "overlap in memory"),
    ("same array in two groups", lambda: fastopt.Adam([{"params": [_shared]},
                                                       {"params": [_shared]}]),
     ValueError, "overlap in memory"),
    ("negative lr", lambda: fastopt.Adam(params(), lr=-1.0), ValueError, "^lr must be >= 0"),
    ("group lr", lambda: fastopt.Adam([{"params": params()[:1]},
                                       {"params": params()[1:], "lr": float("nan")}]),
     ValueError, r"param_groups\[1\].lr must be finite"),
    ("betas", lambda: fastopt.AdamW(params(), betas=(0.9, 1.0)), ValueError,
     r"betas\[1\] must be < 1"),
    ("betas not a pair", lambda: fastopt.AdamW(params(), betas=0.9), TypeError,
     "betas must be a pair"),
    ("eps", lambda: fastopt.RMSprop(params(), eps=0.0), ValueError, "eps must be > 0"),
    ("nesterov", lambda: fastopt.SGD(params(), nesterov=True), ValueError,
     "nesterov requires a momentum > 0"),
    ("nesterov dampening", lambda: fastopt.SGD(params(), momentum=0.9, dampening=0.5,
                                               nesterov=True),
     ValueError, "zero dampening"),
    ("group without params", lambda: fastopt.SGD([{"lr": 0.1}]), ValueError,
     r"param_groups\[0\] has no 'params' entry"),
    ("unknown group key", lambda: fastopt.SGD([{"params": params(), "momentun": 0.9}]),
     ValueError, "the key 'momentun', one edit away from 'momentum'"),
    ("mixed groups", lambda: fastopt.SGD([{"params": params()}, np.ones(2, np.float32)]),
     TypeError, "mixes dicts"),
    ("capturable", lambda: fastopt.Adam(params(), capturable=True), ValueError, "capturable"),
    ("adamax betas", lambda: fastopt.Adamax(params(), betas=(1.0, 0.999)), ValueError,
     r"betas\[0\] must be < 1"),
    ("adamax eps", lambda: fastopt.Adamax(params(), eps=0.0), ValueError, "eps must be > 0"),
    ("adadelta rho", lambda: fastopt.Adadelta(params(), rho=1.01), ValueError,
     "^rho must be <= 1"),
    ("nadam momentum_decay", lambda: fastopt.NAdam(params(), momentum_decay=-1.0), ValueError,
     "^momentum_decay must be >= 0"),
    ("nadam decoupled not bool", lambda: fastopt.NAdam(params(), decoupled_weight_decay=1),
     TypeError, "^decoupled_weight_decay must be a bool"),
    ("radam betas", lambda: fastopt.RAdam(params(), betas=(1.0, 0.999)), ValueError,
     r"^betas\[0\] must be < 1"),
    ("radam differentiable", lambda: fastopt.RAdam(params(), differentiable=True), ValueError,
     "differentiable"),
    ("not iterable", lambda: fastopt.Adam(3.0), TypeError, "params must be an iterable"),
    ("duplicate names", lambda: fastopt.SGD([{"params": {"w": params()[0]}},
                                             {"params": {"w": params()[1]}}]),
     ValueError, "the name 'w' is used for two parameters"),
    ("adagrad initial_accumulator_value",
     lambda: fastopt.Adagrad(params(), initial_accumulator_value=-0.1), ValueError,
     "^initial_accumulator_value must be >= 0"),
    ("adagrad group initial_accumulator_value",
     lambda: fastopt.Adagrad([{"params": params()[:1]},
                              {"params": params()[1:], "initial_accumulator_value": "0.1"}]),
     TypeError, r"param_groups\[1\].initial_accumulator_value must be a real number"),
    ("adagrad lr_decay", lambda: fastopt.Adagrad(params(), lr_decay=-1.0), ValueError,
     "^lr_decay must be >= 0"),
    ("adagrad differentiable", lambda: fastopt.Adagrad(params(), differentiable=True),
     ValueError, "differentiable"),
    ("lion betas", lambda: fastopt.Lion(params(), betas=(1.0, 0.99)), ValueError,
     r"betas\[0\] must be < 1"),
    ("lion weight_decay", lambda: fastopt.Lion(params(), weight_decay=-1e-2), ValueError,
     "^weight_decay must be >= 0"),
    ("lion has no eps", lambda: fastopt.Lion(params(), eps=1e-8), TypeError,
     "unexpected keyword argument 'eps'"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in CONSTRUCTOR_ERRORS],
                         ids=[c[0] for c in CONSTRUCTOR_ERRORS])
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def trained(cls=fastopt.Adam, **kw):
    opt = cls([{"params": params()[:1]}, {"params": params()[1:], "lr": 0.01}], **kw)
    for _ in range(3):
        for g in opt.grads:
            g[...] = 0.3
        opt.step()
    return opt


def snapshot(opt):
    return (opt.flat_params.copy(), state_bytes(opt),
            list(opt._steps), copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                                             for g in opt.param_groups]))


def assert_unchanged(opt, snap):
    p, state, steps, groups = snap
    assert np.array_equal(opt.flat_params, p), "params changed"
    now = state_bytes(opt)
    assert now.keys() == state.keys(), "state buffers were added or removed"
    for k in state:
        assert np.array_equal(now[k], state[k]), f"state {k} changed"
    assert opt._steps == steps, "step counts changed"
    # repr: a group may hold the bad value under test (an array, which == cannot compare)
    assert repr([{k: v for k, v in g.items() if k != "params"}
                 for g in opt.param_groups]) == repr(groups)


STEP_ERRORS = [
    ("negative lr", fastopt.Adam, dict(), 1, "lr", -0.5, ValueError,
     r"param_groups\[1\].lr must be >= 0"),
    ("nan lr", fastopt.SGD, dict(momentum=0.9), 1, "lr", float("nan"), ValueError,
     r"param_groups\[1\].lr must be finite"),
    ("bad betas", fastopt.AdamW, dict(), 1, "betas", (0.9, 1.5), ValueError,
     r"param_groups\[1\].betas\[1\] must be < 1"),
    ("nesterov", fastopt.SGD, dict(momentum=0.9), 1, "nesterov", True, None, None),
    ("nesterov, momentum off", fastopt.SGD, dict(momentum=0.9, nesterov=True), 1, "momentum",
     0.0, ValueError, "nesterov requires a momentum > 0"),
    ("string eps", fastopt.RMSprop, dict(), 1, "eps", "1e-8", TypeError,
     r"param_groups\[1\].eps must be a real number"),
    ("amsgrad flag", fastopt.Adam, dict(), 1, "amsgrad", "yes", TypeError,
     r"param_groups\[1\].amsgrad must be a bool"),
    ("adamax betas", fastopt.Adamax, dict(), 1, "betas", (0.9, -0.1), ValueError,
     r"param_groups\[1\].betas\[1\] must be >= 0"),
    ("adadelta rho", fastopt.Adadelta, dict(), 1, "rho", -0.5, ValueError,
     r"param_groups\[1\].rho must be >= 0"),
    ("nadam momentum_decay", fastopt.NAdam, dict(), 1, "momentum_decay", float("inf"),
     ValueError, r"param_groups\[1\].momentum_decay must be finite"),
    ("nadam betas", fastopt.NAdam, dict(decoupled_weight_decay=True), 1, "betas", (-0.1, 0.9),
     ValueError, r"param_groups\[1\].betas\[0\] must be >= 0"),
    ("radam decoupled flag", fastopt.RAdam, dict(), 1, "decoupled_weight_decay", 1, TypeError,
     r"param_groups\[1\].decoupled_weight_decay must be a bool"),
    ("radam negative weight decay", fastopt.RAdam, dict(), 1, "weight_decay", -0.01,
     ValueError, r"param_groups\[1\].weight_decay must be >= 0"),
    ("adagrad lr_decay", fastopt.Adagrad, dict(), 1, "lr_decay", -0.5, ValueError,
     r"param_groups\[1\].lr_decay must be >= 0"),
    ("adagrad initial_accumulator_value", fastopt.Adagrad, dict(), 1,
     "initial_accumulator_value", float("nan"), ValueError,
     r"param_groups\[1\].initial_accumulator_value must be finite"),
    ("lion betas", fastopt.Lion, dict(), 1, "betas", (0.9, -0.1), ValueError,
     r"param_groups\[1\].betas\[1\] must be >= 0"),
    ("int lr past float", fastopt.SGD, dict(), 1, "lr", 10 ** 400, ValueError,
     r"param_groups\[1\].lr must be finite"),
    ("lr past float32", fastopt.Adam, dict(), 1, "lr", 1e39, ValueError,
     r"param_groups\[1\].lr must be within float32's range"),
    ("array lr", fastopt.Adam, dict(), 1, "lr", np.array([1e-3, 2e-3]), TypeError,
     r"param_groups\[1\].lr must be a real number, got ndarray"),
    ("betas as a dict", fastopt.Adam, dict(), 1, "betas", {0.9: 1, 0.99: 2}, TypeError,
     r"param_groups\[1\].betas must be a pair \(a tuple or list of two\), got dict"),
]


@pytest.mark.parametrize("cls,kw,group,key,value,exc,match", [c[1:] for c in STEP_ERRORS],
                         ids=[c[0] for c in STEP_ERRORS])
def test_bad_hyperparameter_at_step_changes_nothing(cls, kw, group, key, value, exc, match):
    """Group 0 is fine and group 1 is not: neither group may be updated."""
    opt = trained(cls, **kw)
    opt.param_groups[group][key] = value
    snap = snapshot(opt)
    if exc is None:          # a valid change: the step runs
        opt.step()
        return
    with pytest.raises(exc, match=match):
        opt.step()
    assert_unchanged(opt, snap)


def test_check_step_changes_nothing_and_apply_step_is_the_rest_of_step():
    """check_step (what a distributed wrapper runs before any collective) checks and changes
    nothing: called twice it reports the same changed group, and it reports none after a
    step; apply_step with its answer is step(), bit for bit."""
    a, b = trained(fastopt.AdamW), trained(fastopt.AdamW)
    assert a.check_step()[-1] is None, "no group changed since the last step"
    for o in (a, b):
        o.param_groups[1]["lr"] = 0.5
        o.param_groups[1]["betas"] = [0.8, 0.99]
        for g in o.grads:
            g[...] = 0.7
    snap = snapshot(a)
    checked = a.check_step(grad_multiplier=2, max_grad_norm=1, norm_type="inf")
    assert checked[:4] == (False, 2.0, 1.0, float("inf"))
    assert [c[0] for c in checked[-1]] == [1]
    assert [c[0] for c in a.check_step()[-1]] == [1], "check_step marked the group as seen"
    p, state, steps, groups = snap
    groups[1]["betas"] = (0.8, 0.99)        # the only change: a list kept as a tuple
    assert_unchanged(a, (p, state, steps, groups))
    with pytest.raises(ValueError, match="max_grad_norm must be >= 0"):
        a.check_step(max_grad_norm=-1.0)
    assert a.apply_step(*checked) is True
    b.step(grad_multiplier=2, max_grad_norm=1, norm_type="inf")
    assert np.array_equal(a.flat_params.view(np.uint32), b.flat_params.view(np.uint32))
    assert state_bytes(a).keys() == state_bytes(b).keys()
    for k, v in state_bytes(b).items():
        assert np.array_equal(state_bytes(a)[k], v), k
    assert a.check_step()[-1] is None


def _sd_with(edit):
    def make():
        sd = trained().state_dict()
        edit(sd)
        return sd
    return make


def _set(path, value):
    def edit(sd):
        d = sd
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


def _delete(path):
    def edit(sd):
        d = sd
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return edit


LOAD_ERRORS = [
    ("not a dict", lambda: [1, 2], TypeError, "state_dict must be a dict"),
    ("no state", _sd_with(_delete(["state"])), ValueError, "state_dict has no 'state' entry"),
    ("no groups", _sd_with(_delete(["param_groups"])), ValueError, "no 'param_groups' entry"),
    ("wrong group count", _sd_with(lambda sd: sd["param_groups"].pop()), ValueError,
     "state_dict has 1 param groups, this optimizer has 2"),
    ("wrong group length", _sd_with(_set(["param_groups", 1, "params"], [1, 2])), ValueError,
     "has 2 params, this optimizer's group has 1"),
    ("bad lr", _sd_with(_set(["param_groups", 0, "lr"], -1.0)), ValueError,
     r"state_dict\['param_groups'\]\[0\].lr must be >= 0"),
    ("missing hyperparameter", _sd_with(_delete(["param_groups", 0, "eps"])), ValueError,
     "is missing \\['eps'\\]"),
    ("wrong shape", _sd_with(_set(["state", 0, "exp_avg"], np.zeros((3, 4), np.float32))),
     ValueError, "has shape \\(3, 4\\), the param has shape \\(4, 3\\)"),
    ("wrong dtype", _sd_with(_set(["state", 1, "exp_avg_sq"], np.zeros(5))), TypeError,
     "must have dtype float32, got float64"),
    ("object array", _sd_with(_set(["state", 1, "exp_avg_sq"], np.array([None] * 5))),
     TypeError, "must have dtype float32, got object"),
    ("missing buffer", _sd_with(lambda sd: [e.pop("exp_avg") for e in sd["state"].values()]),
     ValueError, "lacks \\['exp_avg'\\]"),
    ("unknown key", _sd_with(_set(["state", 0, "momentum"], np.zeros((4, 3), np.float32))),
     ValueError, "has unknown keys \\['momentum'\\]"),
    ("step 0", _sd_with(_set(["state", 0, "step"], 0)), ValueError,
     "must be a whole number from 1 to"),
    ("step missing", _sd_with(_delete(["state", 0, "step"])), ValueError, "has no 'step'"),
    ("unlisted id", _sd_with(_set(["state", 7], {"step": 1})), ValueError,
     "param id 7, which no param group lists"),
    ("amsgrad without its buffer", _sd_with(_set(["param_groups", 1, "amsgrad"], True)),
     ValueError, "lacks \\['max_exp_avg_sq'\\]"),
    ("a key one edit from eps", _sd_with(_set(["param_groups", 0, "epss"], 1e-8)), ValueError,
     r"the key 'epss', one edit away from 'eps'"),
    ("capturable", _sd_with(_set(["param_groups", 0, "capturable"], True)), ValueError,
     "capturable=True is a CUDA-graph option"),
    ("betas as a set", _sd_with(_set(["param_groups", 0, "betas"], {0.9, 0.99})), TypeError,
     "betas must be a pair"),
    ("step past int64", _sd_with(_set(["state", 0, "step"], 2 ** 63)), ValueError,
     "must be a whole number from 1 to 2\\*\\*63 - 1"),
    ("step an int past float", _sd_with(_set(["state", 0, "step"], 10 ** 400)), ValueError,
     "must be a whole number from 1 to 2\\*\\*63 - 1"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in LOAD_ERRORS],
                         ids=[c[0] for c in LOAD_ERRORS])
def test_bad_state_dict_changes_nothing(make, exc, match):
    opt = trained()
    opt.param_groups[0]["lr"] = 0.5            # differs from what the state dict holds
    snap = snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(make())
    assert_unchanged(opt, snap)


def test_partial_group_state_is_refused():
    opt = fastopt.Adam([{"params": params()}])
    sd = trained().state_dict()
    sd["param_groups"] = [{**sd["param_groups"][0], "params": [0, 1]}]
    del sd["state"][1]
    with pytest.raises(ValueError, match="a group steps as one unit"):
        opt.load_state_dict(sd)


def test_mixed_steps_in_a_group_are_refused():
    opt = fastopt.Adam([{"params": params()}])
    sd = trained().state_dict()
    sd["param_groups"] = [{**sd["param_groups"][0], "params": [0, 1]}]
    sd["state"][1]["step"] = 5
    with pytest.raises(ValueError, match="different step counts"):
        opt.load_state_dict(sd)
