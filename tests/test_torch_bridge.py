"""fastopt.torch: fastopt's optimizers as torch.optim.Optimizer subclasses over the arena.

What this file pins down:
- Training a real torch.nn model (convolutions, BatchNorm/GroupNorm/LayerNorm, linear layers)
  on scikit-learn's digits for 200 steps gives torch's fused optimizers' numbers: bitwise
  (params, every state buffer, every step's loss) on a model whose tensors all have a
  multiple of 8 elements; on one whose tensors do not, bitwise outside torch's scalar tail
  (the last numel % 8 elements of each tensor) and within a measured bound inside it.
- So do a torch lr_scheduler (StepLR, OneCycleLR cycling the momentum), a loop that zeroes
  with model.zero_grad() (set_to_none) instead, torch.nn.utils.clip_grad_norm_, and a state
  dict saved with torch.save and loaded by the other side (fastopt -> torch.optim and back).
- torch's surface works unchanged: isinstance, named parameters, param groups, hooks; and
  fastopt's extras (step(zero_grad=, grad_multiplier=, max_grad_norm=), skip_nonfinite).
- Bad input is refused with the right exception, naming the parameter, having changed nothing.
- Every class in the registry exists here, steps, and round-trips its state dict.
- `import fastopt` never imports torch.
"""
import copy
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from cases import (FULL_STATE, TORCH_SKIP_REASON, TORCH_TAIL, assert_bitwise, assert_ulps,
                   scaled_ulps)

torch = pytest.importorskip("torch", reason=TORCH_SKIP_REASON)

import fastopt  # noqa: E402
import fastopt.torch as ftorch  # noqa: E402
from fastopt.families import OPTIMIZERS  # noqa: E402
from fastopt._formats import STATE_DEFAULTS  # noqa: E402

try:
    from sklearn.datasets import load_digits
except ImportError:     # the digits tests skip, saying so; the rest of the file runs
    load_digits = None

nn = torch.nn
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 200
BATCH = 64

# The optimizer configurations the issue names, as (class, keyword arguments) for both
# fastopt.torch and torch.optim (which gets fused=True besides).  Weight decay is on in each
# (AdamW's is decoupled, SGD's and Adagrad's are L2), and Adagrad starts its sum at a nonzero
# value and decays its lr, so that every term of each update is exercised.
CONFIGS = {
    "adamw": ("AdamW", dict(lr=2e-3, weight_decay=0.05)),
    "sgd_nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    "adam_amsgrad": ("Adam", dict(lr=2e-3, amsgrad=True)),
    "adagrad": ("Adagrad", dict(lr=0.05, lr_decay=1e-3, weight_decay=1e-4,
                                initial_accumulator_value=0.1)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch on one thread: its forward and backward then give the same bits on every call
    (and this file runs fast on a small shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- data, models and the training loop ------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits as (images (1797, 1, 8, 8) float32 in [0, 1], labels, a fixed
    permutation that orders the minibatches)."""
    if load_digits is None:
        pytest.skip("scikit-learn is not installed (pip install scikit-learn): the training "
                    "tests use its digits data set")
    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    return x, y, perm


def batch(digits, i):
    """Minibatch i (of 64), cycling through the fixed permutation."""
    x, y, perm = digits
    per_epoch = len(perm) // BATCH
    j = perm[(i % per_epoch) * BATCH:(i % per_epoch + 1) * BATCH]
    return x[j], y[j]


def model_a():
    """Every parameter's numel a multiple of 8: torch's fused kernels have no scalar tail on
    it, so training with fastopt.torch is bitwise equal to torch's whole run."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),      # weight 72, bias 8
        nn.BatchNorm2d(8),                  # 8, 8 (and running statistics)
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),     # 1152, 16
        nn.GroupNorm(4, 16),                # 16, 16
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 32),                 # 8192, 32
        nn.ReLU(),
        nn.Linear(32, 10, bias=False))      # 320


def model_b():
    """Sizes that are not multiples of 8 (54, 6, 20, 10) beside some that are (1920, 200)."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),      # weight 54, bias 6
        nn.GroupNorm(2, 6),                 # 6, 6
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(96, 20),                  # 1920, 20
        nn.LayerNorm(20),                   # 20, 20
        nn.ReLU(),
        nn.Linear(20, 10))                  # 200, 10


def loss_of(model, digits, i):
    x, y = batch(digits, i)
    return nn.functional.cross_entropy(model(x), y)


def train(model, opt, digits, start, stop, *, zero="opt", scheduler=None, clip=None,
          norms=None, after_step=None):
    """Steps start..stop-1 of the usual loop; -> the losses.  zero="opt" zeroes with
    opt.zero_grad(), "model" with model.zero_grad() (set_to_none=True), None not at all (the
    step zeroes); clip=m calls torch.nn.utils.clip_grad_norm_(model.parameters(), m), and the
    norms it returns are appended to `norms`."""
    losses = []
    for i in range(start, stop):
        if zero == "opt":
            opt.zero_grad()
        elif zero == "model":
            model.zero_grad()
        loss = loss_of(model, digits, i)
        loss.backward()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if norms is not None:
                norms.append(float(norm))
        if zero is None:
            opt.step(zero_grad=True)
        else:
            opt.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step(i)
        losses.append(loss.item())
    return losses


def make_pair(config, make_model=model_a):
    """Two identical models, one with fastopt.torch's optimizer and one with torch's fused."""
    cls, kw = CONFIGS[config]
    fm, tm = make_model(), make_model()
    fopt = getattr(ftorch, cls)(fm.parameters(), **kw)
    topt = getattr(torch.optim, cls)(tm.parameters(), **kw, fused=True)
    return fm, fopt, tm, topt


def numpy_state(opt):
    """{param index: {key: ndarray copy}} from state_dict() (torch's format either side)."""
    return {k: {key: v.detach().numpy().copy() for key, v in entry.items()}
            for k, entry in opt.state_dict()["state"].items()}


def assert_same_model(fm, tm, what):
    """Every parameter and buffer (BatchNorm's running statistics) bitwise equal."""
    fsd, tsd = fm.state_dict(), tm.state_dict()
    assert fsd.keys() == tsd.keys()
    for name, a in fsd.items():
        if a.is_floating_point():
            assert_bitwise(a.numpy(), tsd[name].numpy(), f"{what}: {name}")
        else:                               # BatchNorm's num_batches_tracked
            assert torch.equal(a, tsd[name]), (what, name)


def assert_same_state(fopt, topt, what):
    """The same entries, keys and dtypes, every value bitwise equal ('step' included)."""
    fs, ts = fopt.state_dict()["state"], topt.state_dict()["state"]
    assert fs.keys() == ts.keys(), what
    for k in ts:
        assert fs[k].keys() == ts[k].keys(), (what, k)
        for key in ts[k]:
            a, b = fs[k][key], ts[k][key]
            assert a.dtype == b.dtype and a.shape == b.shape, (what, k, key)
            assert_bitwise(a.numpy(), b.numpy(), f"{what}: state[{k}][{key!r}]")


def arena_holds(opt, t):
    """Whether tensor t's storage lies in opt's gradient arena (t is a bound view)."""
    flat = opt.core.flat_grads
    lo = flat.ctypes.data
    return lo <= t.data_ptr() < lo + flat.nbytes


@pytest.fixture(scope="module")
def torch_runs(digits):
    """torch's fused optimizer on model A, STEPS steps, for each configuration (computed once,
    on first use): {config: (losses, model, optimizer)}."""
    runs = {}

    def get(config):
        if config not in runs:
            cls, kw = CONFIGS[config]
            tm = model_a()
            topt = getattr(torch.optim, cls)(tm.parameters(), **kw, fused=True)
            runs[config] = (train(tm, topt, digits, 0, STEPS), tm, topt)
        return runs[config]
    return get


def test_the_models_have_the_sizes_the_tests_rely_on():
    sizes_a = [p.numel() for p in model_a().parameters()]
    sizes_b = [p.numel() for p in model_b().parameters()]
    assert all(n % TORCH_TAIL == 0 for n in sizes_a), sizes_a
    assert any(n % TORCH_TAIL for n in sizes_b) and any(n % TORCH_TAIL == 0 for n in sizes_b)
    for a, b in zip(model_a().parameters(), model_a().parameters()):
        assert torch.equal(a, b)    # model_a() is the same model on every call


# ---- training on digits: parity with torch's fused kernels -----------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_training_is_bitwise_torch_fused(config, digits, torch_runs):
    """200 steps of model A: every loss, parameter, running statistic and state buffer equal
    to torch's fused run, bit for bit; and the model learned (the comparison is not of two
    runs that went nowhere)."""
    t_losses, tm, topt = torch_runs(config)
    fm = model_a()
    fopt = getattr(ftorch, CONFIGS[config][0])(fm.parameters(), **CONFIGS[config][1])
    assert isinstance(fopt, torch.optim.Optimizer)
    f_losses = train(fm, fopt, digits, 0, STEPS)
    assert f_losses == t_losses
    assert_same_model(fm, tm, config)
    assert_same_state(fopt, topt, config)
    assert fopt.step_counts == [STEPS]
    assert t_losses[-1] < 0.25 * t_losses[0], t_losses[::20]


# Tail bounds for model B, in scaled ulps (cases.scaled_ulps: ulps of max(|value|, 1)) over
# the params and every state buffer after 200 teacher-forced steps; the body outside the tails
# is held bitwise.  Measured here (torch 2.13.0, AVX2 path, CONFIGS as above): AdamW 0.99
# (param; exp_avg_sq 0.04, exp_avg bitwise), SGD 0.92 (param; momentum_buffer 0.13), Adam
# 0.25 (param; exp_avg_sq and max_exp_avg_sq 0.05, exp_avg bitwise), the params differing in
# 11 to 25 of their 38 tail elements; with torch on 2 threads (other gradients, as another
# BLAS would give) 0.79, 1.5 and 0.78.  torch's scalar tail groups one FMA differently (SGD's
# momentum update, Adam's v update): one rounding a step in a value the update carries on, so
# the params end a few ulps apart relative to their own size (2.7e-6 relative at most), below
# two ulps of a unit-size value.  8 leaves room for other machines' gradients and is far below
# what a real fault does: each tail param moves at least 3,400 of these ulps over the run
# (median 6e5), so one left unstepped, or stepped with another formula, lands far outside.
# Adagrad's tail is bitwise (cases.TOLERANCES: GCC contracts torch's scalar tail to its vector
# body's FMAs).
TAIL_ULPS = {"adamw": 8, "sgd_nesterov": 8, "adam_amsgrad": 8, "adagrad": 0}


@pytest.mark.parametrize("config", CONFIGS)
def test_training_with_tails_is_torch_fused_outside_the_tails(config, digits):
    """Model B, whose sizes are not all multiples of 8, with the same gradients fed to both
    optimizers each step (computed on a third, teacher copy and copied into both), so that
    each element's trajectory depends on its own gradient history only: the elements outside
    each tensor's last numel % 8 stay bitwise equal to torch's for 200 steps (params and every
    state buffer), the tail elements within TAIL_ULPS."""
    cls, kw = CONFIGS[config]
    teacher = model_b()
    t_opt = getattr(torch.optim, cls)(teacher.parameters(), **kw, fused=True)
    fm, fopt, tm, topt = make_pair(config, model_b)
    fopt.zero_grad()                            # binds the arena's views as the .grad
    for i in range(STEPS):
        t_opt.zero_grad()
        loss_of(teacher, digits, i).backward()
        for pt, pf, pp in zip(teacher.parameters(), fm.parameters(), tm.parameters()):
            pf.grad.copy_(pt.grad)              # into the arena, in place
            pp.grad = pt.grad.clone()
        t_opt.step()
        fopt.step()
        topt.step()
    fs, ts = numpy_state(fopt), numpy_state(topt)
    worst = 0.0
    for k, (pf, pp) in enumerate(zip(fm.parameters(), tm.parameters())):
        pairs = [("param", pf.detach().numpy(), pp.detach().numpy())]
        pairs += [(key, fs[k][key], ts[k][key]) for key in ts[k] if key != "step"]
        if "step" in ts[k]:                 # (SGD keeps none, in torch and here)
            assert fs[k]["step"] == ts[k]["step"] == STEPS
        for key, a, b in pairs:
            a, b = a.reshape(-1), b.reshape(-1)
            body = a.size - a.size % TORCH_TAIL
            what = f"{config} param {k} ({a.size} elements) {key}"
            assert_bitwise(a[:body], b[:body], what)
            assert_ulps(a[body:], b[body:], TAIL_ULPS[config], what + " (torch's scalar tail)")
            if body < a.size:
                worst = max(worst, scaled_ulps(a[body:], b[body:]).max())
    if TAIL_ULPS[config] == 0:
        assert worst == 0


@pytest.mark.parametrize("config,scheduler", [
    ("adamw", "StepLR"), ("adamw", "OneCycleLR"),
    ("sgd_nesterov", "StepLR"), ("sgd_nesterov", "OneCycleLR")])
def test_torch_lr_schedulers_drive_it_as_torch(config, scheduler, digits):
    """torch's own StepLR and OneCycleLR on both optimizers: the same lr each step, and
    OneCycleLR's cycled momentum (AdamW's betas[0], SGD's momentum) reaches the kernel, so the
    run stays bitwise equal to torch's fused one."""
    fm, fopt, tm, topt = make_pair(config)

    def schedule(opt):
        if scheduler == "StepLR":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=10 * CONFIGS[config][1]["lr"],
                                                   total_steps=STEPS)
    key = "betas" if "betas" in fopt.defaults else "momentum"
    seen = {"fastopt": [], "torch": []}

    def run(model, opt, who):
        sched = schedule(opt)
        return train(model, opt, digits, 0, STEPS, scheduler=sched, after_step=lambda i: seen[
            who].append((sched.get_last_lr(), opt.param_groups[0]["lr"],
                         opt.param_groups[0][key])))
    assert run(fm, fopt, "fastopt") == run(tm, topt, "torch")
    assert seen["fastopt"] == seen["torch"]
    assert_same_model(fm, tm, scheduler)
    assert_same_state(fopt, topt, scheduler)
    assert len({lr for _, lr, _ in seen["fastopt"]}) > 4            # the lr did change
    if scheduler == "OneCycleLR":
        assert len({m for _, _, m in seen["fastopt"]}) > 4          # and so did the momentum
    for k in topt.param_groups[0]:
        if k != "params":
            assert fopt.param_groups[0][k] == topt.param_groups[0][k], k


def test_model_zero_grad_in_the_loop(digits, torch_runs):
    """model.zero_grad() (set_to_none=True) instead of opt.zero_grad(): backward then makes
    new gradient tensors, which step() copies into the arena and binds again; the run stays
    bitwise equal to torch's."""
    t_losses, tm, topt = torch_runs("adamw")
    fm = model_a()
    fopt = ftorch.AdamW(fm.parameters(), **CONFIGS["adamw"][1])
    seen = []

    def check(i):
        seen.append(all(p.grad is g for p, g in zip(fm.parameters(), fopt._grads)))
        seen.append(all(arena_holds(fopt, p.grad) for p in fm.parameters()))
    fm.zero_grad()
    assert all(p.grad is None for p in fm.parameters())
    fm.eval()                                   # (leaves BatchNorm's running statistics alone)
    loss_of(fm, digits, 0).backward()
    fm.train()
    assert not any(arena_holds(fopt, p.grad) for p in fm.parameters())  # autograd's own
    fm.zero_grad()
    f_losses = train(fm, fopt, digits, 0, STEPS, zero="model", after_step=check)
    assert all(seen)
    assert f_losses == t_losses
    assert_same_model(fm, tm, "model.zero_grad()")
    assert_same_state(fopt, topt, "model.zero_grad()")


def test_opt_zero_grad_binds_the_gradients_again():
    """After model.zero_grad() (every .grad None) or a gradient replaced by assignment,
    opt.zero_grad() zeroes the arena and binds every .grad to its view again."""
    model = model_b()
    opt = ftorch.Adam(model.parameters())
    opt.zero_grad()
    sum(p.sum() for p in model.parameters()).backward()
    assert opt.core.flat_grads.any()
    model.zero_grad()
    params = list(model.parameters())
    params[3].grad = torch.ones_like(params[3])
    opt.zero_grad()
    assert all(p.grad is g for p, g in zip(params, opt._grads))
    assert all(arena_holds(opt, p.grad) for p in params)
    assert not opt.core.flat_grads.any()
    sum(p.sum() for p in model.parameters()).backward()   # accumulates into the arena
    assert (opt.core.flat_grads == 1).sum() == sum(p.numel() for p in params)


def test_step_zero_grad_in_the_loop(digits, torch_runs):
    """step(zero_grad=True) and no zero_grad() call: the same run as torch's, and the
    gradients are zero (and still bound) after each step."""
    t_losses, tm, topt = torch_runs("sgd_nesterov")
    fm = model_a()
    fopt = ftorch.SGD(fm.parameters(), **CONFIGS["sgd_nesterov"][1])
    zeroed = []
    train(fm, fopt, digits, 0, 1, zero=None,
          after_step=lambda i: zeroed.append(all(
              p.grad is g and not g.any() for p, g in zip(fm.parameters(), fopt._grads))))
    assert zeroed == [True]
    assert not fopt.core.flat_grads.any()
    f_losses = train(fm, fopt, digits, 1, STEPS, zero=None)
    assert f_losses == t_losses[1:]
    assert_same_model(fm, tm, "step(zero_grad=True)")
    assert_same_state(fopt, topt, "step(zero_grad=True)")


def test_clip_grad_norm_on_model_parameters(digits):
    """torch.nn.utils.clip_grad_norm_(model.parameters(), ...) scales the arena's gradients in
    place (they are what .grad holds), so a clipped run is bitwise torch's clipped run; the
    clip engages (the norm is above max_norm) on most steps."""
    fm, fopt, tm, topt = make_pair("adamw")
    norms = []
    clipped = []

    def after(i):       # what the step read: the clipped gradients, in the arena
        clipped.append(float(torch.linalg.vector_norm(torch.from_numpy(fopt.core.flat_grads))))
    f_losses = train(fm, fopt, digits, 0, 60, clip=0.5, norms=norms, after_step=after)
    t_losses = train(tm, topt, digits, 0, 60, clip=0.5)
    assert f_losses == t_losses
    assert sum(n > 0.5 for n in norms) > 40
    assert max(clipped) == pytest.approx(0.5, rel=1e-5)
    assert_same_model(fm, tm, "clip_grad_norm_")
    assert_same_state(fopt, topt, "clip_grad_norm_")


def test_step_max_grad_norm_is_clip_then_step(digits):
    """step(max_grad_norm=m) is fastopt.clip_grad_norm_(opt.core, m) then step(), bit for bit,
    and last_grad_norm is the norm before clipping (torch's clip_grad_norm_ computes it in
    float32: within a few ulps)."""
    a, b = model_a(), model_a()
    oa = ftorch.AdamW(a.parameters(), **CONFIGS["adamw"][1])
    ob = ftorch.AdamW(b.parameters(), **CONFIGS["adamw"][1])
    clipped = 0
    for i in range(30):
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            loss_of(model, digits, i).backward()
        t_norm = float(torch.nn.utils.get_total_norm([p.grad for p in a.parameters()]))
        norm = fastopt.clip_grad_norm_(oa.core, 0.5)
        oa.step()
        ob.step(max_grad_norm=0.5)
        assert ob.last_grad_norm == norm
        assert norm == pytest.approx(t_norm, rel=1e-6)
        clipped += norm > 0.5
    assert clipped > 15
    assert_same_model(a, b, "max_grad_norm")
    assert_same_state(oa, ob, "max_grad_norm")


def test_grad_multiplier_is_scaling_the_gradients(digits):
    """step(grad_multiplier=c) equals torch's fused step on gradients multiplied by c (in
    float32, as p.grad.mul_(c)), bitwise, over 30 steps."""
    fm, fopt, tm, topt = make_pair("adam_amsgrad")
    c = 1.0 / 3.0
    for i in range(30):
        fopt.zero_grad()
        topt.zero_grad()
        loss_of(fm, digits, i).backward()
        loss_of(tm, digits, i).backward()
        for p in tm.parameters():
            p.grad.mul_(c)
        fopt.step(grad_multiplier=c)
        topt.step()
    assert_same_model(fm, tm, "grad_multiplier")
    assert_same_state(fopt, topt, "grad_multiplier")


def test_per_group_lr_and_named_parameters(digits):
    """Param groups given as (name, tensor) pairs with a per-group lr, and an lr changed
    between steps, as torch's fused optimizer with the same groups: bitwise; the state dict
    carries the names as torch's does."""
    def groups(model):
        named = list(model.named_parameters())
        return [{"params": named[:4], "lr": 1e-2}, {"params": named[4:]}]
    fm, tm = model_a(), model_a()
    fopt = ftorch.AdamW(groups(fm), lr=1e-3)
    topt = torch.optim.AdamW(groups(tm), lr=1e-3, fused=True)
    train(fm, fopt, digits, 0, 20)
    train(tm, topt, digits, 0, 20)
    for opt in (fopt, topt):
        opt.param_groups[1]["lr"] = 3e-3
    train(fm, fopt, digits, 20, 40)
    train(tm, topt, digits, 20, 40)
    assert_same_model(fm, tm, "param groups")
    assert_same_state(fopt, topt, "param groups")
    fsd, tsd = fopt.state_dict(), topt.state_dict()
    assert [g["param_names"] for g in fsd["param_groups"]] == \
        [g["param_names"] for g in tsd["param_groups"]] == \
        [[n for n, _ in fm.named_parameters()][:4], [n for n, _ in fm.named_parameters()][4:]]
    assert [g["lr"] for g in fsd["param_groups"]] == [1e-2, 3e-3]
    assert fopt.step_counts == [40, 40]


# ---- state dicts through torch.save / torch.load, both directions ---------------------------

@pytest.mark.parametrize("config,torch_kw", [
    *[(c, dict(fused=True)) for c in CONFIGS], ("adamw", {})],
    ids=[*CONFIGS, "adamw-torch-defaults"])
def test_fastopt_state_dict_continues_in_torch(config, torch_kw, digits, torch_runs,
                                               tmp_path):
    """fastopt.torch trains 100 steps; its state dict and the model's go through torch.save
    and torch.load (weights_only, torch's default); torch.optim's class loads it and trains on
    a fresh copy of the model: the last 100 steps are bitwise those of a torch run that never
    stopped.  Constructed with torch's defaults (fused=None), torch takes fused=True from the
    state dict's param groups and so stays on the kernel fastopt matches."""
    t_losses, tm, topt = torch_runs(config)
    cls, kw = CONFIGS[config]
    fm = model_a()
    fopt = getattr(ftorch, cls)(fm.parameters(), **kw)
    f_losses = train(fm, fopt, digits, 0, STEPS // 2)
    torch.save(fopt.state_dict(), tmp_path / "opt.pt")
    torch.save(fm.state_dict(), tmp_path / "model.pt")
    resumed = model_a()
    resumed.load_state_dict(torch.load(tmp_path / "model.pt"))
    ropt = getattr(torch.optim, cls)(resumed.parameters(), **kw, **torch_kw)
    ropt.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert ropt.param_groups[0]["fused"] is True
    assert ropt.param_groups[0]["foreach"] is None
    f_losses += train(resumed, ropt, digits, STEPS // 2, STEPS)
    assert f_losses == t_losses
    assert_same_model(resumed, tm, "fastopt -> torch")
    assert_same_state(ropt, topt, "fastopt -> torch")


@pytest.mark.parametrize("config", CONFIGS)
def test_torch_state_dict_continues_in_fastopt(config, digits, torch_runs, tmp_path):
    """The reverse: torch's fused optimizer trains 100 steps, its state dict goes through
    torch.save/torch.load into fastopt.torch's class on a fresh copy of the model, which
    continues bitwise as torch's uninterrupted run."""
    t_losses, tm, topt = torch_runs(config)
    cls, kw = CONFIGS[config]
    first = model_a()
    fopt = getattr(torch.optim, cls)(first.parameters(), **kw, fused=True)
    losses = train(first, fopt, digits, 0, STEPS // 2)
    torch.save(fopt.state_dict(), tmp_path / "opt.pt")
    torch.save(first.state_dict(), tmp_path / "model.pt")
    resumed = model_a()
    resumed.load_state_dict(torch.load(tmp_path / "model.pt"))
    ropt = getattr(ftorch, cls)(resumed.parameters(), **kw)
    ropt.load_state_dict(torch.load(tmp_path / "opt.pt"))
    # SGD's state keeps no step (torch's neither): loaded, a group counts one step taken,
    # which is all its momentum update tells apart
    assert ropt.step_counts == [STEPS // 2 if OPTIMIZERS[cls].family.has_step else 1]
    losses += train(resumed, ropt, digits, STEPS // 2, STEPS)
    assert losses == t_losses
    assert_same_model(resumed, tm, "torch -> fastopt")
    assert_same_state(ropt, topt, "torch -> fastopt")


def test_state_dict_is_torchs_format():
    """Torch tensors, 'step' a float32 0-dim tensor, the param-group keys torch's class has
    (foreach, fused, capturable, differentiable, ...), with the values that keep torch on the
    path fastopt matches."""
    model = model_b()
    opt = ftorch.Adam(model.parameters(), amsgrad=True)
    ref = torch.optim.Adam(model_b().parameters(), amsgrad=True)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    sd = opt.state_dict()
    group = sd["param_groups"][0]
    # torch's keys, and fastopt's state-format keys (which torch's load_state_dict carries)
    assert set(group) == set(ref.state_dict()["param_groups"][0]) | set(STATE_DEFAULTS)
    assert {k: group[k] for k in STATE_DEFAULTS} == STATE_DEFAULTS
    assert (group["fused"], group["foreach"], group["capturable"], group["differentiable"]) \
        == (True, None, False, False)
    assert group["params"] == list(range(len(list(model.parameters()))))
    for k, p in enumerate(model.parameters()):
        entry = sd["state"][k]
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert entry["step"].dtype == torch.float32 and entry["step"].dim() == 0
        assert float(entry["step"]) == 1.0
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert isinstance(entry[key], torch.Tensor)
            assert entry[key].dtype == torch.float32 and entry[key].shape == p.shape
    # opt.state is torch's: keyed by the parameter tensors, live buffers
    state = opt.state
    assert set(map(id, state)) == set(map(id, model.parameters()))
    w = next(iter(model.parameters()))
    state[w]["exp_avg"].fill_(0.25)
    assert (opt.state_dict()["state"][0]["exp_avg"] == 0.25).all()


# ---- torch's surface: hooks --------------------------------------------------------------------

def test_torch_hooks_run():
    """Step pre/post hooks (with step's fastopt keywords passed through), state_dict pre/post
    hooks and load_state_dict pre/post hooks run as in torch; a pre hook's returned state dict
    is what is loaded; removed hooks stop running."""
    model = model_b()
    opt = ftorch.AdamW(model.parameters(), lr=1e-2)
    calls = []
    handles = [
        opt.register_step_pre_hook(lambda o, args, kw: calls.append(("pre", o, args, kw))),
        opt.register_step_post_hook(lambda o, args, kw: calls.append(("post", o, args, kw))),
        opt.register_state_dict_pre_hook(lambda o: calls.append(("sd pre", o))),
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": "kept"}),
    ]

    def load_pre(o, sd):
        calls.append(("load pre", o))
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.125
        return sd
    handles.append(opt.register_load_state_dict_pre_hook(load_pre))
    handles.append(opt.register_load_state_dict_post_hook(
        lambda o: calls.append(("load post", o, o.param_groups[0]["lr"]))))

    sum(p.sum() for p in model.parameters()).backward()
    opt.step(zero_grad=True)
    # torch passes step's positional arguments to the hooks with the optimizer first
    assert calls == [("pre", opt, (opt,), {"zero_grad": True}),
                     ("post", opt, (opt,), {"zero_grad": True})]
    assert not opt.core.flat_grads.any() and opt.step_counts == [1]
    calls.clear()
    sd = opt.state_dict()
    assert calls == [("sd pre", opt)] and sd["extra"] == "kept"
    calls.clear()
    opt.load_state_dict(sd)
    assert calls == [("load pre", opt), ("load post", opt, 0.125)]
    assert opt.param_groups[0]["lr"] == 0.125
    for h in handles:
        h.remove()
    calls.clear()
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == [] and "extra" not in opt.state_dict()

    # torch's global step hooks, which every torch.optim.Optimizer runs, run too
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)
    handles = [register_optimizer_step_pre_hook(lambda o, a, kw: calls.append(("pre", o))),
               register_optimizer_step_post_hook(lambda o, a, kw: calls.append(("post", o)))]
    try:
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert calls == [("pre", opt), ("post", opt)] and opt.step_counts == [3]


def test_a_profiler_sees_step_and_zero_grad():
    """step() leaves torch's wrapper out when no hook is registered and no profiler runs (it
    costs more than the arena's step on a small model); under torch's profiler both calls
    still record the ranges torch.optim's optimizers record, and step."""
    model = model_b()
    opt = ftorch.AdamW(model.parameters(), lr=1e-2)
    sum(p.sum() for p in model.parameters()).backward()
    with torch.autograd.profiler.profile() as prof:
        opt.step()
        opt.zero_grad()
    names = {e.name for e in prof.function_events}
    assert {"Optimizer.step#AdamW.step", "Optimizer.zero_grad#AdamW.zero_grad"} <= names
    assert opt.step_counts == [1] and not opt.core.flat_grads.any()
    opt.step()                  # and without the profiler, no range and the same step
    assert opt.step_counts == [2]


def test_step_pre_hook_can_replace_the_arguments():
    """A step pre hook returning (args, kwargs) changes what step() gets, as in torch: here it
    turns a plain step into one with zero_grad=True; a closure's loss is returned."""
    model = model_b()
    opt = ftorch.SGD(model.parameters(), lr=0.1)
    opt.register_step_pre_hook(lambda o, args, kw: (args, {**kw, "zero_grad": True}))

    def closure():
        loss = sum(p.square().sum() for p in model.parameters())
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert opt.step_counts == [1] and not opt.core.flat_grads.any()


# ---- fastopt's extras --------------------------------------------------------------------------

def snapshot(model, opt):
    """Everything a refused or skipped step must leave alone."""
    return ([p.detach().clone() for p in model.parameters()],
            [p.data_ptr() for p in model.parameters()],
            copy.deepcopy(numpy_state(opt)), opt.step_counts, opt.skipped_steps,
            copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                           for g in opt.param_groups]))


def assert_unchanged(model, opt, snap, skipped=0):
    values, ptrs, state, counts, skips, groups = snap
    for p, v in zip(model.parameters(), values):
        assert_bitwise(p.detach().numpy(), v.numpy(), "param")
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    now = numpy_state(opt)
    assert now.keys() == state.keys()
    for k in state:
        assert now[k].keys() == state[k].keys()
        for key in state[k]:
            assert_bitwise(now[k][key], state[k][key], f"state[{k}][{key}]")
    assert opt.step_counts == counts
    assert opt.skipped_steps == skips + skipped
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups


def test_skip_nonfinite_skips_an_infinite_gradient():
    """skip_nonfinite=True: a step whose gradients hold an inf changes nothing (params, state,
    step counts) and is counted in skipped_steps; the next finite step goes ahead."""
    model = model_b()
    opt = ftorch.Adam(model.parameters(), lr=1e-2, skip_nonfinite=True)
    assert opt.skip_nonfinite

    def backward():
        opt.zero_grad()
        sum(p.square().sum() for p in model.parameters()).backward()
    backward()
    opt.step()
    backward()
    next(model.parameters()).grad[0, 0, 0, 1] = float("inf")
    snap = snapshot(model, opt)
    opt.step()
    assert_unchanged(model, opt, snap, skipped=1)
    assert opt.last_grad_norm == float("inf")
    backward()
    opt.step()
    assert opt.step_counts == [2] and opt.skipped_steps == 1
    assert not torch.equal(next(model.parameters()), snap[0][0])
    assert opt.state_nbytes == 2 * opt.core.flat_params.nbytes   # exp_avg, exp_avg_sq


# ---- errors: the exception, a message naming the parameter, and nothing changed -------------

def _lin():
    torch.manual_seed(3)
    return nn.Linear(3, 2)


def _float64():
    lin = _lin()
    bad = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    return (lambda: ftorch.Adam([lin.weight, bad])), [lin.weight, bad]


def _frozen():
    lin = _lin()
    lin.bias.requires_grad_(False)
    return (lambda: ftorch.Adam(lin.named_parameters())), list(lin.parameters())


def _non_leaf():
    lin = _lin()
    doubled = lin.weight * 2
    return (lambda: ftorch.SGD([lin.bias, doubled])), [lin.bias, doubled]


def _twice():
    lin = _lin()
    return (lambda: ftorch.SGD([{"params": [lin.weight, lin.bias]}, {"params": [lin.weight]}],
                               lr=0.1)), list(lin.parameters())


def _bad_lr():
    lin = _lin()
    return (lambda: ftorch.AdamW(lin.parameters(), lr=-1.0)), list(lin.parameters())


def _sparse_grad_at_construction():
    lin = _lin()
    lin.weight.grad = torch.zeros(2, 3).to_sparse()
    return (lambda: ftorch.Adagrad(lin.named_parameters())), list(lin.parameters())


def _set_of_params():
    lin = _lin()
    return (lambda: ftorch.Adam([{"params": set(lin.parameters())}])), list(lin.parameters())


def _float64_grad_dtype():
    lin = _lin()
    lin.bias.grad_dtype = torch.float64         # torch then takes float64 gradients only
    lin.bias.grad = torch.ones(2, dtype=torch.float64)
    return (lambda: ftorch.Adam(lin.named_parameters())), list(lin.parameters())


CONSTRUCTOR_ERRORS = [
    ("float64 param", _float64, TypeError,
     r"param_groups\[0\]\.params\[1\] is torch\.float64 \(3,\) on cpu"),
    ("requires_grad=False", _frozen, ValueError,
     r"params\[1\] \('bias'\) does not require grad"),
    ("non-leaf", _non_leaf, ValueError, r"params\[1\]: can't optimize a non-leaf Tensor"),
    ("the same tensor twice", _twice, ValueError,
     r"param_groups\[1\]\.params\[0\] is the same tensor as param_groups\[0\]\.params\[0\]"),
    ("lr=-1", _bad_lr, ValueError, r"^lr must be >= 0"),
    ("a sparse gradient already there", _sparse_grad_at_construction, TypeError,
     r"params\[0\] \('weight'\) already has a gradient of .*sparse_coo"),
    ("grad_dtype float64", _float64_grad_dtype, TypeError,
     r"params\[1\] \('bias'\) has grad_dtype torch\.float64"),
    ("a group's params as a set", _set_of_params, TypeError,
     r"param_groups\[0\]\.params is a set, whose order changes between runs"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in CONSTRUCTOR_ERRORS],
                         ids=[c[0] for c in CONSTRUCTOR_ERRORS])
def test_constructor_errors_name_the_parameter_and_touch_nothing(make, exc, match):
    """Refused before any parameter is moved: every tensor keeps its storage, values and
    gradient (the same object, or None)."""
    construct, tensors = make()

    def grad(t):
        return t.grad if t.is_leaf else None     # (a non-leaf's .grad warns)
    before = [(t.data_ptr(), t.detach().clone(), grad(t)) for t in tensors]
    with pytest.raises(exc, match=match):
        construct()
    for t, (ptr, value, g) in zip(tensors, before):
        assert t.data_ptr() == ptr
        assert torch.equal(t.detach(), value)
        assert grad(t) is g


def trained_b(cls="Adam", **kw):
    """Model B and fastopt.torch's optimizer after two steps, gradients written."""
    model = model_b()
    opt = getattr(ftorch, cls)(model.named_parameters(), **kw)
    for _ in range(2):
        opt.zero_grad()
        sum((p * p).sum() for p in model.parameters()).backward()
        opt.step()
    opt.zero_grad()
    sum((p * p).sum() for p in model.parameters()).backward()
    return model, opt


def _none_grad(model, opt):
    model.zero_grad()                               # every .grad None
    list(model.parameters())[0].grad = torch.ones(6, 1, 3, 3)
    return opt.step


def _float64_grad(model, opt):
    p = list(model.parameters())[2]
    p.grad = None
    p.grad_dtype = None                             # torch then lets any dtype be assigned
    p.grad = torch.ones(6, dtype=torch.float64)
    return opt.step


def _sparse_grad(model, opt):
    list(model.parameters())[9].grad = torch.ones(10).to_sparse()
    return opt.step


def _wrong_shape_state(model, opt):
    sd = opt.state_dict()
    sd["state"][4] = {**sd["state"][4], "exp_avg": torch.zeros(5, 96)}
    return lambda: opt.load_state_dict(sd)


def _wrong_class_state(model, opt):
    other = torch.optim.SGD(model_b().parameters(), lr=0.1, momentum=0.9)
    sum(p.sum() for p in other.param_groups[0]["params"]).backward()
    other.step()
    sd = other.state_dict()
    return lambda: opt.load_state_dict(sd)


def _grad_dtype_at_zero_grad(model, opt):
    p = list(model.parameters())[2]
    p.grad = None
    p.grad_dtype = torch.float64                    # the arena's float32 view cannot be bound
    return opt.zero_grad


def _torch_state_before_its_first_step(model, opt):
    other = torch.optim.Adagrad(model_b().parameters())     # state (step 0) from the start
    sd = other.state_dict()
    sd["param_groups"][0].update(opt.state_dict()["param_groups"][0])
    return lambda: opt.load_state_dict(sd)


def _add_param_group(model, opt):
    return lambda: opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)]})


RUNTIME_ERRORS = [
    ("a None gradient at step", _none_grad, ValueError,
     r"the gradient of param_groups\[0\]\.params\[1\] \('0\.bias'\), param_groups\[0\]\."
     r"params\[2\] \('1\.weight'\), .* and 6 more is None"),
    ("a float64 gradient at step", _float64_grad, ValueError,
     r"params\[2\] \('1\.weight'\) has a gradient of torch\.float64 \(6,\) on cpu, the "
     r"parameter is torch\.float32 \(6,\) on cpu; nothing was changed"),
    ("a sparse gradient at step", _sparse_grad, ValueError,
     r"params\[9\] \('8\.bias'\) has a gradient of .*sparse_coo"),
    ("a state dict with a wrong shape", _wrong_shape_state, ValueError,
     r"state_dict\['state'\]\[4\]\['exp_avg'\] has shape \(5, 96\), the param has shape "
     r"\(20, 96\)"),
    ("another optimizer's state dict", _wrong_class_state, ValueError,
     r"param_groups'\]\[0\] is missing \['betas', 'eps'"),
    ("zero_grad with a grad_dtype that is not float32", _grad_dtype_at_zero_grad, ValueError,
     r"zero_grad\(\): param_groups\[0\]\.params\[2\] \('1\.weight'\) has grad_dtype "
     r"torch\.float64.*nothing was changed"),
    ("torch's Adagrad state from before its first step", _torch_state_before_its_first_step,
     ValueError, r"state_dict\['state'\]\[0\]\['step'\] is 0: a state from before the "
     r"first step"),
    ("add_param_group", _add_param_group, RuntimeError, "add_param_group: the arena is laid out"),
    ("pickle", lambda m, o: (lambda: pickle.dumps(o)), TypeError,
     "fastopt.torch.Adam cannot be pickled"),
    ("deepcopy", lambda m, o: (lambda: copy.deepcopy(o)), TypeError,
     "fastopt.torch.Adam cannot be pickled or copied"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in RUNTIME_ERRORS],
                         ids=[c[0] for c in RUNTIME_ERRORS])
def test_runtime_errors_name_the_parameter_and_change_nothing(make, exc, match):
    """On a trained optimizer: refused, and params (values and storage), state, step counts,
    skipped steps, param groups, the gradient arena and each .grad are what they were."""
    model, opt = trained_b()
    call = make(model, opt)
    snap = snapshot(model, opt)
    grads = [p.grad for p in model.parameters()]
    arena = opt.core.flat_grads.copy()
    with pytest.raises(exc, match=match):
        call()
    assert_unchanged(model, opt, snap)
    assert_bitwise(opt.core.flat_grads, arena, "the gradient arena")   # nothing copied in
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))


def test_a_refused_none_gradient_can_be_repaired():
    """After the refusal, giving every parameter its gradient (or opt.zero_grad()) lets the
    next step go ahead; the replaced gradients are copied in and bound."""
    model, opt = trained_b()
    model.zero_grad()
    with pytest.raises(ValueError):
        opt.step()
    sum((p * p).sum() for p in model.parameters()).backward()
    expect = [2 * p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.step_counts == [3]
    for p, g, e in zip(model.parameters(), opt._grads, expect):
        assert p.grad is g and torch.equal(g, e)


# ---- every class in the registry ---------------------------------------------------------------

def small_model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 2))


def small_steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(7, 5, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_class_is_a_torch_optimizer(name):
    """Every class of fastopt.families.OPTIMIZERS is in fastopt.torch, a torch.optim.Optimizer
    with fastopt's signature; it steps with its defaults; its state dict (with every buffer the
    class has) goes through torch.save/torch.load into a fresh instance bitwise, which then
    steps as the original does; and where torch has the class, torch's loads it and steps."""
    cls = getattr(ftorch, name)
    assert issubclass(cls, torch.optim.Optimizer) and issubclass(cls, ftorch.Optimizer)
    assert name in ftorch.__all__
    assert cls.__signature__ == getattr(fastopt, name).__signature__

    model = small_model()
    opt = cls(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    small_steps(model, opt, 2, 0)
    assert opt.step_counts == [2]
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    model = small_model()
    opt = cls(model.parameters(), **FULL_STATE[name])
    small_steps(model, opt, 3, 1)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    twin = small_model()
    twin.load_state_dict(model.state_dict())
    fresh = cls(twin.parameters(), **FULL_STATE[name])
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    has_step = OPTIMIZERS[name].family.has_step     # SGD keeps none (nor does torch's)
    assert opt.step_counts == [3] and fresh.step_counts == [3 if has_step else 1]
    state = numpy_state(opt)
    assert numpy_state(fresh).keys() == state.keys()
    for k, entry in numpy_state(fresh).items():
        assert entry.keys() == state[k].keys()
        assert set(OPTIMIZERS[name].family.buffer_names) <= set(entry)   # all, by FULL_STATE
        for key in entry:
            assert_bitwise(entry[key], state[k][key], f"{name} state[{k}][{key}]")
    small_steps(model, opt, 2, 2)
    small_steps(twin, fresh, 2, 2)
    assert_same_model(twin, model, name)

    if hasattr(torch.optim, name):
        tm = small_model()
        tm.load_state_dict(model.state_dict())
        topt = getattr(torch.optim, name)(tm.parameters(), **FULL_STATE[name])
        topt.load_state_dict(opt.state_dict())
        state = numpy_state(opt)
        assert numpy_state(topt).keys() == state.keys()
        for k, entry in numpy_state(topt).items():
            assert entry.keys() == state[k].keys()
            for key in entry:
                assert_bitwise(entry[key], state[k][key], f"torch {name} state[{k}][{key}]")
        small_steps(tm, topt, 1, 3)
        if has_step:
            assert float(topt.state_dict()["state"][0]["step"]) == 6.0
    else:
        assert name == "Lion"


def test_the_base_class_is_not_an_optimizer():
    with pytest.raises(TypeError, match="base class"):
        ftorch.Optimizer(small_model().parameters())


def run_python(script):
    """-> stdout of `script` in a fresh interpreter that imports this checkout's fastopt."""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_fastopt_does_not_import_torch():
    """`import fastopt` (and its other modules) leaves torch unimported; fastopt.torch imports
    it."""
    script = ("import sys, fastopt, fastopt.optim, fastopt.functional, fastopt.lr_scheduler, "
              "fastopt.checkpoint, fastopt.clip, fastopt.reference\n"
              "assert 'torch' not in sys.modules, 'torch imported'\n"
              "import fastopt.torch\n"
              "assert 'torch' in sys.modules\n"
              "print(fastopt.__file__)")
    assert run_python(script).strip() == os.path.join(ROOT, "fastopt", "__init__.py")


def test_without_torch_fastopt_torch_says_how_to_install_it():
    """With torch unimportable, `import fastopt` works and `import fastopt.torch` raises an
    ImportError that gives the install commands."""
    script = ("import sys\n"
              "sys.modules['torch'] = None          # what an absent torch looks like\n"
              "import fastopt\n"
              "try:\n"
              "    import fastopt.torch\n"
              "except ImportError as e:\n"
              "    print(e)\n"
              "else:\n"
              "    raise SystemExit('imported')\n")
    out = run_python(script)
    assert "fastopt.torch needs PyTorch" in out and "pip install 'fastopt[torch]'" in out


# ---- what must not step silently -------------------------------------------------------------

def test_a_step_before_any_backward_is_refused():
    """A parameter that had no gradient keeps None after construction, as in torch: a step
    before any backward refuses (torch's would do nothing) instead of stepping on zeros (AdamW
    would decay the weights); after a backward, the first step copies autograd's gradients in
    and binds the views."""
    model = model_b()
    opt = ftorch.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"step\(\): the gradient of .* is None"):
        opt.step()
    assert opt.step_counts == [0]
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    sum((p * p).sum() for p in model.parameters()).backward()
    opt.step()
    assert opt.step_counts == [1]
    assert all(arena_holds(opt, p.grad) for p in model.parameters())


def test_a_parameter_frozen_after_construction():
    """requires_grad_(False) after construction: torch would leave the parameter's .grad None
    and skip it; zero_grad() refuses, naming it, rather than keep a zero gradient bound that
    step() would apply (weight decay, momentum); step() alone applies what is bound, as torch
    under zero_grad(set_to_none=False)."""
    model, opt = trained_b("AdamW", lr=1e-2)
    snap = snapshot(model, opt)
    frozen = list(model.parameters())[0]
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match=r"zero_grad\(\): param_groups\[0\]\.params\[0\] "
                       r"\('0\.weight'\) no longer requires grad"):
        opt.zero_grad()
    assert_unchanged(model, opt, snap)
    frozen.requires_grad_(True)
    opt.zero_grad()
    assert not opt.core.flat_grads.any()


def _vector_to_parameters(model, opt):
    v = torch.nn.utils.parameters_to_vector(model.parameters())
    torch.nn.utils.vector_to_parameters(v, model.parameters())     # p.data = a slice of v


def _share_memory(model, opt):
    model.share_memory()                                           # storages moved


def _grad_data(model, opt):
    p = list(model.parameters())[5]
    p.grad.data = torch.zeros_like(p)                              # same tensor, new storage


@pytest.mark.parametrize("swap", [_vector_to_parameters, _share_memory, _grad_data],
                         ids=["vector_to_parameters", "share_memory", "grad.data"])
def test_a_replaced_storage_is_refused(swap):
    """The same tensor objects on a storage that is no longer the arena's would pass the
    .grad identity check while the steps no longer reach the model: step(), zero_grad() and
    state_dict() see it (model B has 10 parameters: each call checks them all) and refuse,
    having changed nothing in the optimizer."""
    model, opt = trained_b()
    core_params = opt.core.flat_params.copy()
    steps = opt.step_counts
    swap(model, opt)
    for call in (opt.step, opt.zero_grad, opt.state_dict):
        with pytest.raises(RuntimeError, match=r"no longer lives in the arena"):
            call()
    assert_bitwise(opt.core.flat_params, core_params, "the arena")
    assert opt.step_counts == steps


def test_every_parameter_is_checked_in_rotation():
    """With more parameters than one step checks, a replaced storage is found within
    ceil(n / per step) steps."""
    params = [nn.Parameter(torch.ones(3)) for _ in range(100)]
    opt = ftorch.SGD(params, lr=0.1)
    opt.zero_grad()
    params[77].data = torch.ones(3)
    per = ftorch._STORAGE_CHECKS_PER_STEP
    with pytest.raises(RuntimeError, match=r"params\[77\] no longer lives in the arena"):
        for _ in range(-(-100 // per)):
            opt.step()


def test_a_second_optimizer_over_the_same_parameters_supersedes_the_first():
    """The second moves the parameters into its own arena; the first, whose steps would no
    longer reach the model, refuses to step and says why."""
    model, first = trained_b()
    second = ftorch.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"another fastopt\.torch optimizer was built over"):
        first.step()
    second.zero_grad()
    sum((p * p).sum() for p in model.parameters()).backward()
    second.step()
    assert all(arena_holds(second, p.grad) for p in model.parameters())


def test_a_subclass_step_runs_the_hooks_once():
    """torch wraps a subclass's own step() in its hooks; calling super().step() from it does
    not run them again."""
    class Logged(ftorch.SGD):
        def step(self, closure=None, **kw):
            return super().step(closure, **kw)

    model = model_b()
    opt = Logged(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    opt.zero_grad()
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    assert calls == ["pre", "post"] and opt.step_counts == [1]


def test_a_state_dict_is_a_snapshot():
    """state_dict()'s tensors are copies: one held across a step still holds the state of its
    step count (live buffers beside a 'step' number would fall out of step); opt.state's
    entries are live and read-only."""
    model, opt = trained_b()
    sd = opt.state_dict()
    held = {k: v.clone() for k, v in sd["state"][0].items()}
    opt.step()
    assert all(torch.equal(sd["state"][0][k], v) for k, v in held.items())
    p0 = list(model.parameters())[0]
    live = opt.state[p0]
    assert np.shares_memory(live["exp_avg"].numpy(), opt.core.state[0]["exp_avg"])
    with pytest.raises(TypeError):
        live["exp_avg"] = torch.zeros_like(p0)


def test_torch_state_dicts_torch_itself_loads():
    """What torch's own load accepts: a state dict from a torch without a newer flag (its
    __setstate__ fills in the default), a tensor lr, a None momentum buffer."""
    model = model_a()
    topt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.01), fused=True)
    sum(p.sum() for p in model.parameters()).backward()
    topt.step()
    sd = topt.state_dict()
    for g in sd["param_groups"]:
        del g["decoupled_weight_decay"], g["maximize"]
    fopt = ftorch.AdamW(model_a().parameters())
    fopt.load_state_dict(sd)
    g = fopt.param_groups[0]
    assert g["lr"] == pytest.approx(0.01) and type(g["lr"]) is float
    assert g["decoupled_weight_decay"] is True and g["maximize"] is False
    assert fopt.step_counts == [1]

    sgd = ftorch.SGD(model_b().parameters(), lr=0.1)
    sd = sgd.state_dict()
    sd["state"] = {pid: {"momentum_buffer": None} for pid in sd["param_groups"][0]["params"]}
    sgd.load_state_dict(sd)
    assert sgd.state_dict()["state"] == {}


def test_swapped_gradients_are_copied_in_as_they_are():
    """Two gradients swapped (each now the other's arena view) are both read before either is
    written."""
    params = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))]
    opt = ftorch.SGD(params, lr=1.0)
    opt.zero_grad()
    params[0].grad.fill_(1.0)
    params[1].grad.fill_(2.0)
    params[0].grad, params[1].grad = params[1].grad, params[0].grad
    opt.step()
    assert torch.equal(params[0].detach(), torch.full((4,), -2.0))
    assert torch.equal(params[1].detach(), torch.full((4,), -1.0))


def test_a_refused_step_keeps_the_gradients_where_they_were():
    """A bad argument is refused before replaced gradients are copied in or bound."""
    model, opt = trained_b()
    model.zero_grad()
    sum((p * p).sum() for p in model.parameters()).backward()
    grads = [p.grad for p in model.parameters()]
    arena = opt.core.flat_grads.copy()
    with pytest.raises(ValueError, match="grad_multiplier"):
        opt.step(grad_multiplier=float("nan"))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert_bitwise(opt.core.flat_grads, arena, "the gradient arena")


def test_a_lazy_parameter_is_refused_by_name():
    lazy = nn.LazyLinear(3)
    with pytest.raises(ValueError, match=r"params\[0\] is an uninitialized parameter"):
        ftorch.SGD(lazy.parameters(), lr=0.1)


@pytest.mark.parametrize("kw", [dict(state_dtype="int8", min_8bit_size=256),
                                dict(state_dtype="bfloat16", state_rounding="stochastic")],
                         ids=["int8", "bfloat16_stochastic"])
def test_compressed_state_through_the_bridge(kw, digits):
    """state_dtype and its options pass through to the core: the bridge shows the compressed
    buffers as torch tensors (uint8 codes and a float32 absmax, or bfloat16 bits), holds less
    than float32's 8 bytes a parameter, and its state_dict resumes bit for bit in a fresh
    bridge."""
    model, straight = model_b(), model_b()
    opt = ftorch.AdamW(model.parameters(), lr=1e-2, **kw)
    ref = ftorch.AdamW(straight.parameters(), lr=1e-2, **kw)
    train(model, opt, digits, 0, 3)
    train(straight, ref, digits, 0, 6)
    core = opt.core
    weight = model[5].weight                                  # 1920 elements
    entry = opt.state[weight]
    if kw["state_dtype"] == "int8":
        assert entry["exp_avg"].dtype == torch.uint8 and entry["exp_avg"].shape == (8, 256)
        assert entry["exp_avg_absmax"].dtype == torch.float32
    else:
        assert entry["exp_avg"].dtype == torch.bfloat16        # the stored bits
        k = [p is weight for p in model.parameters()].index(True)
        assert torch.equal(entry["exp_avg"].float(),
                           torch.from_numpy(core.state_values()[k]["exp_avg"]))
    assert core.state_nbytes < 8 * sum(p.numel() for p in model.parameters())
    sd = opt.state_dict()
    resumed = model_b()
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), model.parameters()):
            p.copy_(q)
    again = ftorch.AdamW(resumed.parameters(), lr=1e-2, **kw)
    again.load_state_dict(sd)
    train(resumed, again, digits, 3, 6)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)
