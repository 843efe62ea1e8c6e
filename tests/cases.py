"""The tables that drive the tests: optimizer configurations, and how to run each on every
implementation (fastopt's C kernels, fastopt.reference, torch.optim)."""
import functools
import itertools
import os

import numpy as np

# torch's CPU kernels pick their vector width at import; pin the AVX2 path the parity
# statements are about (its scalar tail is the last numel % 8 elements).
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
try:
    import torch
except ImportError:  # torch is a test peer, never a dependency
    torch = None
TORCH_SKIP_REASON = "torch is not installed (pip install torch==2.13.0 for the parity tests)"
TORCH_TAIL = 8   # torch's fused kernels run numel % 8 trailing elements in scalar code

FLOAT32_EPS = 2.0 ** -23

# Every option combination of each family, as keyword arguments of the functional kernels.
# Values are chosen to reach every branch: beta1 = 0.3 and alpha = 0.3 take torch's other lerp
# formula (weight >= 0.5).
SGD_CONFIGS = [
    dict(lr=0.01, momentum=m, dampening=d, nesterov=ns, weight_decay=wd, maximize=mx)
    for (m, d, ns), wd, mx in itertools.product(
        [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False), (0.9, 0.0, True)],
        [0.0, 0.05], [False, True])
]
ADAM_CONFIGS = [
    dict(lr=0.01, beta1=b1, beta2=0.999, eps=1e-8, weight_decay=wd, decoupled=dec,
         amsgrad=ams, maximize=mx)
    for (wd, dec), ams, mx, b1 in itertools.product(
        [(0.0, False), (0.05, False), (0.05, True)], [False, True], [False, True], [0.9, 0.3])
]
RMSPROP_CONFIGS = [
    dict(lr=0.01, alpha=a, eps=1e-8, weight_decay=wd, momentum=m, centered=c, maximize=mx)
    for c, m, wd, mx, a in itertools.product(
        [False, True], [0.0, 0.9], [0.0, 0.05], [False, True], [0.99, 0.3])
]


def config_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items() if k != "lr")


# What each family keeps, and which buffers a configuration uses.
STATE = {
    "sgd": lambda c: ["momentum_buffer"] if c["momentum"] else [],
    "adam": lambda c: ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if c["amsgrad"] else []),
    "rmsprop": lambda c: (["square_avg"] + (["momentum_buffer"] if c["momentum"] else [])
                          + (["grad_avg"] if c["centered"] else [])),
}
CONFIGS = {"sgd": SGD_CONFIGS, "adam": ADAM_CONFIGS, "rmsprop": RMSPROP_CONFIGS}
ALL_CASES = [(fam, cfg) for fam, cfgs in CONFIGS.items() for cfg in cfgs]


@functools.lru_cache(maxsize=2)
def gradients(n, steps, seed):
    """Random gradients over several orders of magnitude (1e-5 .. 1e2), 1% exact zeros.

    Cached (the big lengths are shared by every configuration) and read-only, so a kernel that
    wrote into its gradient would fail loudly.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        g = rng.standard_normal(n) * 10.0 ** rng.uniform(-5.0, 2.0, n)
        g[rng.random(n) < 0.01] = 0.0
        g = g.astype(np.float32)
        g.flags.writeable = False
        out.append(g)
    return tuple(out)


def initial_param(n, seed):
    return np.random.default_rng(seed + 1).standard_normal(n).astype(np.float32)


def run_functional(module, family, cfg, p0, grads):
    """Run `module`'s (fastopt.functional or fastopt.reference) kernel; -> (param, state dict)."""
    p = p0.copy()
    state = {name: np.zeros_like(p) for name in STATE[family](cfg)}
    fn = getattr(module, family + "_")
    for t, g in enumerate(grads, start=1):
        fn(p, g, *[state.get(name) for name in POSITIONAL[family]], step=t, **cfg)
    return p, state


# The optional positional buffers of each functional kernel, in order.
POSITIONAL = {"sgd": ["momentum_buffer"],
              "adam": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
              "rmsprop": ["square_avg", "momentum_buffer", "grad_avg"]}


def torch_optimizer(family, cfg, params, fused=True):
    """The torch.optim optimizer matching a functional config (fused where torch has it)."""
    c = dict(cfg)
    if family == "sgd":
        return torch.optim.SGD(params, fused=fused, **c)
    if family == "adam":
        b1, b2, dec = c.pop("beta1"), c.pop("beta2"), c.pop("decoupled")
        cls = torch.optim.AdamW if dec else torch.optim.Adam
        return cls(params, betas=(b1, b2), fused=fused, **c)
    return torch.optim.RMSprop(params, foreach=False, **c)


def run_torch(family, cfg, p0, grads):
    tp = torch.tensor(p0.copy(), requires_grad=True)
    opt = torch_optimizer(family, cfg, [tp])
    for g in grads:
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
    st = opt.state[tp]
    return tp.detach().numpy().copy(), {k: st[k].numpy().copy() for k in STATE[family](cfg)}


def scaled_ulps(a, b):
    """|a - b| in float32 ulps of max(|b|, 1), elementwise; NaN == NaN and inf == inf count 0."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    with np.errstate(invalid="ignore"):
        d = np.abs(a - b) / (np.maximum(np.abs(b), 1.0) * FLOAT32_EPS)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    d[same] = 0.0
    d[np.isnan(d)] = np.inf
    return d


def bitwise_equal(a, b):
    """Element-wise identity, with every NaN equal to every NaN (payloads differ by path)."""
    a = np.asarray(a)
    b = np.asarray(b)
    same = a.view(np.uint32) == b.view(np.uint32)
    return same | (np.isnan(a) & np.isnan(b))


# How far apart implementations may end up after the 300-step runs, in scaled ulps (see
# scaled_ulps), and why.  Every bound is a few times what was measured on 100,003 elements
# (in brackets; this file's seeds, 300 steps), so a real change of formula (a misplaced eps,
# a missing bias correction, a dropped term) lands orders of magnitude outside it.
TOLERANCES = {
    # torch's scalar tail regroups one FMA per step (v in Adam, buf in SGD): a 1-ulp
    # difference in that state each step, passed on to the param through the update. [18]
    "torch_tail": 64,
    # The reference rounds lr*buf before adding it (the kernel fuses it): with gradients up
    # to 1e2 the momentum buffer reaches ~1e3, so each step's rounding is up to ~8 ulps of a
    # unit-size param, and 300 of them random-walk. [124]
    "reference_sgd": 512,
    # One or two extra roundings per step in the lerp, v update and the final division;
    # Adam's normalized update keeps them from growing. [61]
    "reference_adam": 256,
    # RMSprop against the reference, and against torch's RMSprop (whose sqrt is a vectorized
    # approximation): as Adam's, but with momentum the buffer accumulates g/avg, which is as
    # large as 1/eps allows, and the param takes lr times it. [193 and 36]
    "rmsprop": 512,
    # Centered RMSprop with alpha < 0.5: sa - ga*ga cancels (sa is mostly the last g*g and
    # ga mostly the last g), so rounding one of them differently moves avg, and the step, by
    # a relative amount far above one ulp. [772 and 640]
    "rmsprop_centered_low_alpha": 4096,
}


def tolerance(family, cfg, against):
    """The bound for comparing `family` under `cfg` with `against` ('reference' or 'torch')."""
    if family == "rmsprop":
        if cfg["centered"] and cfg["alpha"] < 0.5:
            return TOLERANCES["rmsprop_centered_low_alpha"]
        return TOLERANCES["rmsprop"]
    if against == "torch":
        return TOLERANCES["torch_tail"]
    return TOLERANCES["reference_" + family]


def assert_ulps(actual, expected, bound, what):
    """Every element within `bound` scaled ulps, NaN where the other is NaN."""
    d = scaled_ulps(actual, expected)
    if d.size and d.max() > bound:
        i = int(d.argmax())
        raise AssertionError(f"{what}: {int((d > bound).sum())} elements beyond {bound} ulps; "
                             f"worst at [{i}]: {actual.flat[i]!r} vs {expected.flat[i]!r} "
                             f"({d.flat[i]:.1f} ulps)")


def assert_bitwise(actual, expected, what):
    same = bitwise_equal(actual, expected)
    if not same.all():
        i = int(np.flatnonzero(~same)[0])
        raise AssertionError(f"{what}: {int((~same).sum())} of {same.size} elements differ; "
                             f"first at [{i}]: {actual.flat[i]!r} vs {expected.flat[i]!r}")
