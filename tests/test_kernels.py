"""The functional kernels against the NumPy reference and torch.optim, element by element."""
import numpy as np
import pytest

import fastopt
import fastopt.functional as F
import fastopt.reference as R
from fastopt import _core
from cases import (ALL_CASES, CONFIGS, FORMULAS, NAN_POSITIONS_MAY_DIFFER, TORCH_SKIP_REASON,
                   TORCH_TAIL, assert_bitwise, assert_ulps, config_id, gradients,
                   initial_param, initial_state, kernel_kwargs, run_functional, run_torch,
                   state_names, tolerance, torch)
from fastopt.families import FAMILIES

LENGTHS = [0, 1, 7, 33, 1000, 100003]
STEPS = 300


def _ids(cases):
    return [f"{fam}[{config_id(cfg)}]" for fam, cfg in cases]


@pytest.mark.parametrize("family,cfg", ALL_CASES, ids=_ids(ALL_CASES))
@pytest.mark.parametrize("n", LENGTHS)    # outermost: the cached gradients serve every config
def test_against_reference_and_torch(family, cfg, n):
    p0, grads = initial_param(n, 7), gradients(n, STEPS, 7)
    p, state = run_functional(F, family, cfg, p0, grads)
    pr, state_r = run_functional(R, family, cfg, p0, grads)
    if n:
        assert not np.array_equal(p, p0), "the kernel did not move the params"

    bound = tolerance(family, cfg, "reference")
    assert_ulps(p, pr, bound, "param vs reference")
    for name in state_names(family, cfg):
        assert_ulps(state[name], state_r[name], bound, f"{name} vs reference")

    how = FAMILIES[family].torch
    if torch is None or how is None:      # (no torch peer: test_against_the_formula)
        return
    pt, state_t = run_torch(family, cfg, p0, grads)
    pairs = [("param", p, pt)] + [(k, state[k], state_t[k]) for k in state_names(family, cfg)]
    if how == "single":
        for name, a, b in pairs:
            assert_ulps(a, b, tolerance(family, cfg, "torch"), f"{name} vs torch")
        return
    body = n - n % TORCH_TAIL
    for name, a, b in pairs:
        assert_bitwise(a[:body], b[:body], f"{name} vs torch fused (vector body)")
        assert_ulps(a[body:], b[body:], tolerance(family, cfg, "torch_tail"),
                    f"{name} vs torch fused (scalar tail)")


FORMULA_CASES = [(fam, cfg) for fam in FORMULAS for cfg in CONFIGS[fam]]


@pytest.mark.parametrize("family,cfg", FORMULA_CASES, ids=_ids(FORMULA_CASES))
def test_against_the_formula(family, cfg):
    """Families torch does not have: the kernel against its paper's formula, in float64."""
    formula, bound, _, _ = FORMULAS[family]
    n, steps = 1003, 50
    p0, grads = initial_param(n, 13), gradients(n, steps, 13)
    p, state = run_functional(F, family, cfg, p0, grads)
    pf = p0.astype(np.float64)
    sf = {k: v.astype(np.float64) for k, v in initial_state(family, cfg, n).items()}
    kw, _ = kernel_kwargs(family, cfg)
    for t, g in enumerate(grads, start=1):
        formula(pf, g.astype(np.float64), sf, t, kw)
    assert not np.array_equal(p, p0)
    assert_ulps(p, pf, bound, "param vs formula")
    for k in state:
        assert_ulps(state[k], sf[k], bound, f"{k} vs formula")


@pytest.mark.skipif(len(_core.available_isas()) < 2, reason="only one ISA path on this CPU")
@pytest.mark.parametrize("family,cfg", ALL_CASES, ids=_ids(ALL_CASES))
def test_isa_paths_are_bitwise_identical(family, cfg):
    n = 1000 + 3   # a vector body and a remainder on every path
    p0, grads = initial_param(n, 3), gradients(n, 50, 3)
    results = {}
    before = _core.get_isa()
    try:
        for isa in _core.available_isas():
            _core.set_isa(isa)
            results[isa] = run_functional(F, family, cfg, p0, grads[:50])
    finally:
        _core.set_isa(before)
    (base_p, base_s), *others = results.values()
    for p, s in others:
        assert_bitwise(p, base_p, "param across ISA paths")
        for name in s:
            assert_bitwise(s[name], base_s[name], f"{name} across ISA paths")


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="isa must be one of"):
        _core.set_isa("avx9000")


def test_build_info_reports_the_running_path():
    info = fastopt.build_info()
    assert info["isa"] in info["available_isas"]
    assert "baseline" in info["available_isas"]


SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-42, 3e38, -3e38,
                     1.0, -1.0, 1e-30], np.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # NumPy's overflow notes, in the reference
@pytest.mark.parametrize("family,cfg", ALL_CASES, ids=_ids(ALL_CASES))
def test_nan_inf_and_denormal_gradients(family, cfg):
    """Non-finite and subnormal gradients give torch's IEEE results, not flushed or dropped."""
    n = 64 + 5
    rng = np.random.default_rng(11)
    p0 = initial_param(n, 11)
    grads = []
    for _ in range(5):
        g = rng.standard_normal(n).astype(np.float32)
        g[rng.integers(0, n, 12)] = SPECIALS
        g.flags.writeable = False
        grads.append(g)
    p, state = run_functional(F, family, cfg, p0, grads)
    pr, _ = run_functional(R, family, cfg, p0, grads)
    fed_nan = np.isnan(np.stack(grads)).any(axis=0)
    assert np.isnan(p[fed_nan]).all() and np.isnan(pr[fed_nan]).all(), \
        "a NaN gradient must reach the param, as in torch"
    if family not in NAN_POSITIONS_MAY_DIFFER:
        assert np.array_equal(np.isnan(p), np.isnan(pr)), "NaN positions differ from reference"
    if torch is None or FAMILIES[family].torch != "fused":
        return
    pt, state_t = run_torch(family, cfg, p0, grads)
    body = n - n % TORCH_TAIL
    assert_bitwise(p[:body], pt[:body], "param vs torch fused")
    for name in state:
        assert_bitwise(state[name][:body], state_t[name][:body], f"{name} vs torch fused")


def test_subnormals_are_not_flushed():
    p = np.zeros(16, np.float32)
    g = np.full(16, 1e-41, np.float32)        # subnormal
    F.sgd_(p, g, step=1, lr=1.0)
    assert (p == -g).all()


@pytest.mark.parametrize("family,cfg", ALL_CASES[::5], ids=_ids(ALL_CASES[::5]))
def test_unaligned_views_give_the_same_result(family, cfg):
    """Views at an odd element offset (not 32-byte aligned) compute what aligned arrays do."""
    n = 101
    p0, grads = initial_param(n, 5), gradients(n, 20, 5)
    p_aligned, s_aligned = run_functional(F, family, cfg, p0, grads)
    big = np.zeros(n + 3, np.float32)
    view = big[3:]                           # 12 bytes past the start of the buffer
    view[...] = p0
    names = state_names(family, cfg)
    bufs = {}
    for k, a in initial_state(family, cfg, n).items():
        bufs[k] = np.zeros(n + 1, np.float32)[1:]
        bufs[k][...] = a
    kw, _ = kernel_kwargs(family, cfg)
    counters = dict(FAMILIES[family].counter_defaults)
    fn = getattr(F, family + "_")
    for t, g in enumerate(grads, start=1):
        out = fn(view, np.concatenate([[0], g]).astype(np.float32)[1:],
                 *[bufs.get(k) for k in FAMILIES[family].buffer_names], step=t, **kw,
                 **counters)
        counters.update(out or {})
    assert_bitwise(view, p_aligned, "param through unaligned views")
    for k in names:
        assert_bitwise(bufs[k], s_aligned[k], f"{k} through unaligned views")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_length_is_a_noop(family):
    e = np.zeros(0, np.float32)
    fam = FAMILIES[family]
    getattr(F, family + "_")(e, e.copy(), *[e.copy() for _ in fam.buffer_names], step=1)
    getattr(R, family + "_")(e, e.copy(), *[e.copy() for _ in fam.buffer_names], step=1)


def test_sgd_first_step_sets_the_buffer_to_the_gradient():
    p = np.ones(9, np.float32)
    g = np.arange(9, dtype=np.float32)
    buf = np.full(9, 123.0, np.float32)      # whatever it held
    F.sgd_(p, g, buf, step=1, lr=0.5, momentum=0.9, dampening=0.5)
    assert (buf == g).all()                  # undamped, as torch's first step
    F.sgd_(p, g, buf, step=2, lr=0.5, momentum=0.9, dampening=0.5)
    expected = np.float32(0.9) * g + np.float32(0.5) * g
    np.testing.assert_allclose(buf, expected, rtol=1e-6)


def test_adam_first_step_is_sign_times_lr():
    """On step 1 the bias corrections make Adam's update lr * g / (|g| + eps)."""
    g = np.array([3.0, -0.5, 1e-3, -20.0], np.float32)
    p = np.zeros(4, np.float32)
    F.adam_(p, g, np.zeros(4, np.float32), np.zeros(4, np.float32), step=1, lr=0.1, eps=1e-12)
    np.testing.assert_allclose(p, -0.1 * np.sign(g), rtol=1e-6)


def test_kernels_do_not_write_the_gradient():
    g = np.linspace(-1, 1, 50, dtype=np.float32)
    g.flags.writeable = False                # a write would raise
    F.adam_(np.ones(50, np.float32), g, np.zeros(50, np.float32), np.zeros(50, np.float32),
            step=1, maximize=True, weight_decay=0.1)
    F.sgd_(np.ones(50, np.float32), g, np.zeros(50, np.float32), step=1, momentum=0.9,
           nesterov=True, maximize=True)


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
def test_torch_is_pinned_to_its_avx2_path():
    assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT")
