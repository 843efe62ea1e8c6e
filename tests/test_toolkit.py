"""Clipping, the non-finite guard and checkpoints."""
import copy
import io
import os
import subprocess
import sys
import tempfile
import textwrap
import zipfile

import numpy as np
import pytest

import fastopt
import fastopt.reference as R
from fastopt import _core
from cases import FULL_STATE, TORCH_SKIP_REASON, assert_bitwise, state_bytes, torch

SHAPES = [(30, 7), (7,), (129,), (3, 3, 3)]


def make(cls="AdamW", module=fastopt, seed=0, **kw):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    return getattr(module, cls)([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}],
                                **kw)


def fill_grads(opt, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    for g in opt.grads:
        g[...] = rng.standard_normal(g.shape) * scale


def snapshot(opt):
    return (opt.flat_params.copy(), opt.flat_grads.copy(),
            state_bytes(opt), list(opt._steps),
            copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                           for g in opt.param_groups]), opt.skipped_steps)


def assert_unchanged(opt, snap, grads_too=True, skipped_delta=0):
    p, g, state, steps, groups, skipped = snap
    assert_bitwise(opt.flat_params, p, "params")
    if grads_too:
        assert_bitwise(opt.flat_grads, g, "grads")
    now = state_bytes(opt)
    assert now.keys() == state.keys()
    for k in state:
        assert np.array_equal(now[k], state[k]), k
    assert opt._steps == steps
    assert [{k: v for k, v in gr.items() if k != "params"} for gr in opt.param_groups] == groups
    assert opt.skipped_steps == skipped + skipped_delta


# ---- clipping -------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0, "inf"])
def test_grad_norm_matches_float64(norm_type):
    opt = make()
    fill_grads(opt, 1, scale=10.0)
    expect = np.linalg.norm(np.concatenate([g.reshape(-1) for g in opt.grads]).astype(np.float64),
                            ord=np.inf if norm_type == "inf" else norm_type)
    for module in (fastopt, R):
        flat = opt.flat_grads.copy()
        total = module.clip_grad_norm_(flat, max_norm=1e30, norm_type=norm_type)
        assert total == pytest.approx(expect, rel=1e-12)


def test_norm_is_exact_at_ten_million_elements():
    """Accumulated in double: a float32 running sum would be off by ~1e-3 here."""
    g = np.full(10_000_000, 0.1, np.float32)
    exact = np.sqrt(10_000_000 * float(np.float32(0.1)) ** 2)
    total, bad = _core.grad_norm(g)
    assert not bad
    assert abs(total - exact) / exact < 1e-12


def test_norm_is_the_same_for_every_thread_count_and_isa():
    g = np.random.default_rng(2).standard_normal(300_001).astype(np.float32)
    before = (fastopt.get_num_threads(), _core.get_min_per_thread(), _core.get_isa())
    results = set()
    try:
        for isa in _core.available_isas():
            _core.set_isa(isa)
            for nt in ([1, 2, 3] if _core.have_openmp() else [1]):
                fastopt.set_num_threads(nt)
                _core.set_min_per_thread(1000)
                for p in (2.0, 1.0, np.inf):
                    results.add((p, _core.grad_norm(g, p)[0]))
    finally:
        fastopt.set_num_threads(before[0])
        _core.set_min_per_thread(before[1])
        _core.set_isa(before[2])
    assert len(results) == 3, results


def test_nonfinite_is_reported():
    g = np.ones(100, np.float32)
    assert _core.grad_norm(g) == (10.0, False)
    g[37] = np.inf
    assert _core.grad_norm(g)[1] and _core.grad_norm(g)[0] == np.inf
    g[37] = np.nan
    for p in (2.0, 1.0, np.inf):
        total, bad = _core.grad_norm(g, p)
        assert bad and np.isnan(total)
        assert R.grad_norm(g, p)[1]


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    opt = make()
    fill_grads(opt, 3, scale=2.0)
    tensors = [torch.tensor(g.copy(), requires_grad=True) for g in opt.grads]
    for t, g in zip(tensors, opt.grads):
        t.grad = torch.from_numpy(g.copy())
    t_total = torch.nn.utils.clip_grad_norm_(tensors, max_norm, norm_type=norm_type)
    total = fastopt.clip_grad_norm_(opt, max_norm, norm_type=norm_type)
    assert total == pytest.approx(float(t_total), rel=2e-6)
    for t, g in zip(tensors, opt.grads):
        # the factor comes from a float32 norm in torch, a double one here: an ulp apart
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=3e-7, atol=0)


@pytest.mark.skipif(torch is None, reason=TORCH_SKIP_REASON)
def test_clip_grad_value_matches_torch():
    opt = make()
    fill_grads(opt, 4, scale=3.0)
    opt.grads[0][0, 0] = np.nan
    tensors = [torch.tensor(g.copy(), requires_grad=True) for g in opt.grads]
    for t, g in zip(tensors, opt.grads):
        t.grad = torch.from_numpy(g.copy())
    torch.nn.utils.clip_grad_value_(tensors, 0.7)
    fastopt.clip_grad_value_(opt, 0.7)
    for t, g in zip(tensors, opt.grads):
        assert_bitwise(g, t.grad.numpy(), "clipped gradient")


@pytest.mark.parametrize("module", [fastopt, R], ids=["fastopt", "reference"])
@pytest.mark.parametrize("cls", sorted(FULL_STATE))
def test_step_with_max_grad_norm_is_clip_then_step(module, cls):
    a, b = make(cls, module), make(cls, module)
    for t in range(5):
        fill_grads(a, 10 + t, scale=5.0)
        fill_grads(b, 10 + t, scale=5.0)
        norm = module.clip_grad_norm_(a, 1.0)
        a.step()
        b.step(max_grad_norm=1.0)
        assert b.last_grad_norm == norm
    assert_bitwise(b.flat_params, a.flat_params, "params")


CLIP_ERRORS = [
    (dict(max_norm=-1.0), ValueError, "max_norm must be >= 0"),
    (dict(max_norm=float("nan")), ValueError, "max_norm must be finite"),
    (dict(max_norm="1"), TypeError, "max_norm must be a real number"),
    (dict(max_norm=1.0, norm_type=0.0), ValueError, "norm_type must be > 0"),
    (dict(max_norm=1.0, norm_type=float("nan")), ValueError, "norm_type must be > 0"),
    (dict(max_norm=1.0, norm_type="two"), TypeError, "norm_type must be a number or 'inf'"),
]


@pytest.mark.parametrize("kw,exc,match", CLIP_ERRORS)
def test_clip_errors_change_nothing(kw, exc, match):
    opt = make()
    fill_grads(opt, 5, scale=10.0)
    snap = snapshot(opt)
    with pytest.raises(exc, match=match):
        fastopt.clip_grad_norm_(opt, **kw)
    assert_unchanged(opt, snap)
    with pytest.raises(exc, match=match.replace("max_norm", "max_grad_norm")):
        opt.step(max_grad_norm=kw["max_norm"], norm_type=kw.get("norm_type", 2.0))
    assert_unchanged(opt, snap)


def test_clip_value_and_flat_buffer_errors():
    opt = make()
    with pytest.raises(ValueError, match="clip_value must be >= 0"):
        fastopt.clip_grad_value_(opt, -0.1)
    with pytest.raises(TypeError, match="parameters must have dtype float32"):
        fastopt.clip_grad_norm_(np.ones(4), 1.0)
    with pytest.raises(ValueError, match="parameters must be C-contiguous"):
        fastopt.clip_grad_norm_(np.ones(8, np.float32)[::2], 1.0)


def test_error_if_nonfinite_raises_and_leaves_the_gradients():
    opt = make()
    fill_grads(opt, 6)
    opt.grads[1][2] = np.inf
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match="non-finite"):
        fastopt.clip_grad_norm_(opt, 1.0, error_if_nonfinite=True)
    assert_unchanged(opt, snap)


# ---- the non-finite guard ---------------------------------------------------------------

@pytest.mark.parametrize("module", [fastopt, R], ids=["fastopt", "reference"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("cls", sorted(FULL_STATE))
def test_skip_nonfinite_skips_the_whole_step(module, bad, cls):
    kw = FULL_STATE[cls]
    guarded = make(cls, module, skip_nonfinite=True, **kw)
    clean = make(cls, module, **kw)
    for t in range(6):
        fill_grads(guarded, 20 + t)
        fill_grads(clean, 20 + t)
        if t == 3:
            guarded.grads[2][5] = bad
            snap = snapshot(guarded)
            assert guarded.step(max_grad_norm=10.0 if cls == "Adam" else None) is False
            assert_unchanged(guarded, snap, skipped_delta=1)
            assert guarded.skipped_steps == 1
            continue
        assert guarded.step() is True
        clean.step()
    assert_bitwise(guarded.flat_params, clean.flat_params, "params after a skipped step")


def test_skipped_step_still_zeroes_gradients_when_asked():
    opt = make(skip_nonfinite=True)
    fill_grads(opt, 7)
    opt.grads[0][0, 0] = np.nan
    p = opt.flat_params.copy()
    assert opt.step(zero_grad=True) is False
    assert not opt.flat_grads.any()
    assert_bitwise(opt.flat_params, p, "params")


def test_without_the_guard_nan_propagates_as_in_torch():
    opt = make()
    fill_grads(opt, 8)
    opt.grads[0][0, 0] = np.nan
    assert opt.step() is True
    assert np.isnan(opt.params[0][0, 0])


# ---- checkpoints --------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kw", sorted(FULL_STATE.items()))
def test_save_load_continue_is_bit_identical(tmp_path, cls, kw):
    straight = make(cls, **kw)
    first = make(cls, **kw)
    for t in range(10):
        for o in ([straight, first] if t < 4 else [straight]):
            fill_grads(o, 30 + t)
            o.step()
    path = tmp_path / "ck.npz"
    first.save(path)
    resumed = make(cls, seed=99, **kw)     # other initial params: the checkpoint sets them
    resumed.load(path)
    for t in range(4, 10):
        fill_grads(resumed, 30 + t)
        resumed.step()
    assert_bitwise(resumed.flat_params, straight.flat_params, "params")
    assert resumed._steps == straight._steps


RESUME_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, fastopt
    mode, path, out = sys.argv[1:4]
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((64, 33)).astype(np.float32),
              "b": np.zeros(33, np.float32)}
    opt = fastopt.AdamW([{"params": {"w": params["w"]}},
                         {"params": {"b": params["b"]}, "weight_decay": 0.0}], lr=1e-2)
    start = 0
    if mode == "resume":
        opt.load(path)
        start = 25
    for t in range(start, 50):
        g = np.random.default_rng(100 + t)
        for name, grad in opt.grads.items():
            grad[...] = g.standard_normal(grad.shape)
        opt.step(max_grad_norm=5.0)
        if mode == "first" and t == 24:
            opt.save(path)
            break
    np.save(out, opt.flat_params)
""")


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)
    ck = tmp_path / "ck.npz"

    def run(mode, out):
        subprocess.run([sys.executable, str(script), mode, str(ck), str(out)], check=True,
                       timeout=120, cwd=tmp_path)
        return np.load(out)
    run("first", tmp_path / "a.npy")
    resumed = run("resume", tmp_path / "b.npy")
    straight = run("straight", tmp_path / "c.npy")
    assert_bitwise(resumed, straight, "params after resuming in another process")


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    opt = make()
    fill_grads(opt, 1)
    opt.step()
    path = tmp_path / "ck.npz"
    opt.save(path)
    good = path.read_bytes()
    opt.step()

    def crash(f, array, **kw):
        f.write(b"half an array")
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(np.lib.format, "write_array", crash)
    with pytest.raises(KeyboardInterrupt):
        opt.save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ck.npz"], "the temporary file was left behind"


def _checkpoint_bytes():
    opt = make("Adam", amsgrad=True)
    fill_grads(opt, 2)
    opt.step()
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "ck.npz")
        opt.save(p)
        with open(p, "rb") as f:
            return f.read()


def _rewrite(data, change):
    """Rebuild the .npz with `change(members)` applied (members: name -> ndarray)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        members = {k: z[k] for k in z.files}
    change(members)
    out = io.BytesIO()
    np.savez(out, **members)
    return out.getvalue()


def _flip_inside_member(data):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo("state/0/exp_avg.npy")
    pos = info.header_offset + 30 + len(info.filename) + info.compress_size - 3
    b = bytearray(data)
    b[pos] ^= 0x40
    return bytes(b)


def _meta_edit(edit):
    def change(m):
        import json
        meta = json.loads(str(m["meta"][()]))
        edit(meta)
        m["meta"] = np.array(json.dumps(meta))
    return change


CORRUPT = [
    ("flipped byte in a member", _flip_inside_member, "corrupted \\(CRC mismatch\\)"),
    ("truncated", lambda d: d[: len(d) // 2], "truncated or corrupted"),
    ("empty file", lambda d: b"", "truncated or corrupted"),
    ("a pickle", lambda d: __import__("pickle").dumps({"meta": 1}), "truncated or corrupted"),
    ("object array member", lambda d: _object_member(d), "unreadable|pickle"),
    ("float64 state", lambda d: _rewrite(d, lambda m: m.update(
        {"state/0/exp_avg": m["state/0/exp_avg"].astype(np.float64)})),
     "state/0/exp_avg has dtype float64"),
    ("missing member", lambda d: _rewrite(d, lambda m: m.pop("param/2")),
     "missing member 'param/2'"),
    ("missing state", lambda d: _rewrite(d, lambda m: m.pop("state/1/max_exp_avg_sq")),
     "missing member 'state/1/max_exp_avg_sq'"),
    ("extra member", lambda d: _rewrite(d, lambda m: m.update({"evil": np.zeros(2)})),
     "unexpected members"),
    ("wrong shape", lambda d: _rewrite(d, lambda m: m.update(
        {"param/0": np.zeros((7, 30), np.float32)})), "param/0 has shape \\(7, 30\\)"),
    ("wrong state shape", lambda d: _rewrite(d, lambda m: m.update(
        {"state/2/exp_avg": np.zeros(128, np.float32)})), "has shape \\(128,\\)"),
    ("future version", lambda d: _rewrite(d, lambda m: m.update(
        {"format_version": np.array(99)})), "format version 99"),
    ("no version", lambda d: _rewrite(d, lambda m: m.pop("format_version")),
     "no format_version"),
    ("meta not JSON", lambda d: _rewrite(d, lambda m: m.update({"meta": np.array("{oops")})),
     "meta is not valid JSON"),
    ("NaN in meta", lambda d: _rewrite(d, lambda m: m.update(
        {"meta": np.array(str(m["meta"][()]).replace('"lr": 0.001', '"lr": NaN'))})),
     "non-finite number NaN"),
    ("bad hyperparameter", lambda d: _rewrite(d, _meta_edit(
        lambda meta: meta["param_groups"][0].update(lr=-1.0))), "lr must be >= 0"),
    ("other optimizer", lambda d: _rewrite(d, _meta_edit(lambda meta: meta.update(
        {"class": "SGD"}))), "holds a 'SGD' optimizer"),
    ("bad steps", lambda d: _rewrite(d, _meta_edit(lambda meta: meta.update(
        {"steps": ["1", 1]}))), "bad step counts"),
    ("step count past int64", lambda d: _rewrite(d, _meta_edit(lambda meta: meta.update(
        {"steps": [2 ** 63, 1]}))), "bad step counts"),
]


def _object_member(data):
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        members = {k: z[k] for k in z.files}
    members["param/0"] = np.array([{"evil": 1}], dtype=object)
    out = io.BytesIO()
    np.savez(out, **members)          # NumPy pickles object arrays into the file
    return out.getvalue()


@pytest.mark.parametrize("corrupt,match", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_bad_checkpoints_are_refused_and_change_nothing(tmp_path, corrupt, match):
    path = tmp_path / "bad.npz"
    path.write_bytes(corrupt(_checkpoint_bytes()))
    opt = make("Adam", amsgrad=True, seed=5)
    fill_grads(opt, 9)
    opt.step()
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load(path)
    assert_unchanged(opt, snap)


def test_load_never_unpickles(tmp_path, monkeypatch):
    import pickle
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    path = tmp_path / "bad.npz"
    path.write_bytes(_object_member(_checkpoint_bytes()))
    with pytest.raises(ValueError):
        make("Adam", amsgrad=True).load(path)


def test_checkpoint_of_a_mismatched_model_is_refused(tmp_path):
    opt = make()
    opt.step()
    opt.save(tmp_path / "ck.npz")
    other = fastopt.AdamW([np.zeros(5, np.float32)])
    with pytest.raises(ValueError, match="parameter shapes"):
        other.load(tmp_path / "ck.npz")


def test_checkpoint_with_scheduler_resumes_lr_and_params(tmp_path):
    from fastopt.lr_scheduler import warmup_cosine

    def setup(seed=0):
        opt = make("AdamW", seed=seed)
        return opt, warmup_cosine(opt, warmup_steps=5, total_steps=40, min_lr=1e-5)

    straight, s_sched = setup()
    first, f_sched = setup()
    lrs = []
    for t in range(40):
        for o, s in ([(straight, s_sched), (first, f_sched)] if t < 17 else [(straight, s_sched)]):
            fill_grads(o, 50 + t)
            o.step(max_grad_norm=1.0)
            s.step()
        lrs.append([g["lr"] for g in straight.param_groups])
        if t == 16:
            fastopt.save(tmp_path / "ck.npz", first, f_sched)
    resumed, r_sched = setup(seed=3)
    fastopt.load(tmp_path / "ck.npz", resumed, r_sched)
    for t in range(17, 40):
        fill_grads(resumed, 50 + t)
        resumed.step(max_grad_norm=1.0)
        r_sched.step()
        assert [g["lr"] for g in resumed.param_groups] == lrs[t]
    assert_bitwise(resumed.flat_params, straight.flat_params, "params")


def test_checkpoint_scheduler_mismatches_are_refused(tmp_path):
    from fastopt.lr_scheduler import StepLR, warmup_cosine
    opt = make()
    sched = warmup_cosine(opt, 2, 10)
    opt.step()
    sched.step()
    fastopt.save(tmp_path / "with.npz", opt, sched)
    opt.save(tmp_path / "without.npz")
    other = make(seed=4)
    other_sched = StepLR(other, step_size=3)
    snap = snapshot(other)
    with pytest.raises(ValueError, match="not a StepLR"):
        fastopt.load(tmp_path / "with.npz", other, other_sched)
    with pytest.raises(ValueError, match="pass the scheduler"):
        fastopt.load(tmp_path / "with.npz", other)
    with pytest.raises(ValueError, match="holds no scheduler state"):
        fastopt.load(tmp_path / "without.npz", other, other_sched)
    assert_unchanged(other, snap)
    assert other_sched.last_epoch == 0


def test_bad_scheduler_state_in_a_checkpoint_changes_nothing(tmp_path):
    import json
    from fastopt.lr_scheduler import warmup_cosine
    opt = make()
    sched = warmup_cosine(opt, 2, 10)
    opt.step()
    sched.step()
    path = tmp_path / "ck.npz"
    fastopt.save(path, opt, sched)

    def change(m):
        meta = json.loads(str(m["meta"][()]))
        meta["scheduler"]["state"]["last_epoch"] = "seven"
        m["meta"] = np.array(json.dumps(meta))
    path.write_bytes(_rewrite(path.read_bytes(), change))
    other = make(seed=4)
    other_sched = warmup_cosine(other, 2, 10)
    snap, epoch = snapshot(other), other_sched.last_epoch
    with pytest.raises(ValueError, match="bad scheduler state"):
        fastopt.load(path, other, other_sched)
    assert_unchanged(other, snap)
    assert other_sched.last_epoch == epoch
