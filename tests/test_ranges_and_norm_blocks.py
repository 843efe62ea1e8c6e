"""The two pieces fastopt.distributed builds its second step on, tested in one process:

* a step taken range by range (Stepper.run(lo, hi), Optimizer.apply_step(ranges=...)), which a
  pipelined step uses to step each bucket as soon as its sum is in, must be bit-identical to
  one pass, for every class and both backends, with the counters advancing once;
* the gradient norm in two halves (grad_norm_blocks, norm_from_blocks), from which ZeRO builds
  the norm of all shards, must equal grad_norm bit for bit when the buffer is cut on blocks.
"""
import numpy as np
import pytest
from cases import CLASS_CONFIGS, FULL_STATE, assert_bitwise

import fastopt
from fastopt import _core
from fastopt import reference as R

BACKENDS = {"fused": (fastopt, _core), "reference": (R, R)}
SHAPES = [(37, 11), (5,), (300,), (1,), (64, 3)]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _grads(opt, t):
    rng = np.random.default_rng(100 + t)
    for g in opt.grads:
        g[...] = rng.standard_normal(g.shape).astype(np.float32)


def _cuts(total, pieces):
    """`pieces` ranges covering [0, total), on 16-element lines, the last first."""
    edges = sorted({0, total} | {total * k // pieces // 16 * 16 for k in range(1, pieces)})
    return [(a, b) for a, b in zip(edges, edges[1:])][::-1]


def _build(module, cls_name, cfg):
    groups = [{"params": _params()[:3]}, {"params": _params()[3:], "lr": 3e-3}]
    return getattr(module, cls_name)(groups, **cfg)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", sorted(CLASS_CONFIGS))
def test_step_in_ranges_is_one_pass(backend, name):
    """Every class, steps in 1, 3 and 7 ranges in a changing order, with zero_grad, an lr
    change and a clipped step: params, state and counters bitwise one pass's."""
    module, _ = BACKENDS[backend]
    cls_name, cfg = CLASS_CONFIGS[name]
    cfg = {**cfg, **FULL_STATE[cls_name]}
    whole, parts = _build(module, cls_name, cfg), _build(module, cls_name, cfg)
    total = whole.flat_params.size
    for t in range(6):
        for opt in (whole, parts):
            _grads(opt, t)
            if t == 3:
                opt.param_groups[0]["lr"] *= 0.5
        kw = dict(zero_grad=t % 2 == 1, max_grad_norm=0.5 if t == 4 else None)
        assert whole.step(**kw) is True
        with parts.exclusive("step"):
            checked = parts.check_step(**kw)
            ranges = iter(_cuts(total, 1 + 2 * t % 7))
            assert parts.apply_step(*checked, ranges=ranges) is True
            assert next(ranges, None) is None, "every range is taken"
        assert_bitwise(parts.flat_params, whole.flat_params, f"{name} params, step {t}")
        assert_bitwise(parts.flat_grads, whole.flat_grads, f"{name} grads, step {t}")
        assert parts.step_counts == whole.step_counts
    a, b = whole.state_dict(), parts.state_dict()
    for k, entry in a["state"].items():
        for key, value in entry.items():
            if isinstance(value, np.ndarray):
                assert_bitwise(b["state"][k][key], value, f"{name} state {k} {key}")
            else:
                assert b["state"][k][key] == value, (name, k, key)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_ranges_skip_nonfinite_takes_every_range_first(backend):
    """With skip_nonfinite the norm needs every gradient: all ranges are taken (a pipelined
    step's reductions all complete) before the step is skipped, and nothing changes."""
    module, _ = BACKENDS[backend]
    opt = module.Adam(_params(), lr=1e-2, skip_nonfinite=True)
    _grads(opt, 0)
    opt.grads[2][7] = np.inf
    before = opt.flat_params.copy()
    taken = []

    def ranges():
        for r in _cuts(opt.flat_params.size, 4):
            taken.append(r)
            yield r
    with opt.exclusive("step"):
        assert opt.apply_step(*opt.check_step(zero_grad=True), ranges=ranges()) is False
    assert len(taken) == 4
    assert_bitwise(opt.flat_params, before, "params")
    assert opt.skipped_steps == 1 and opt.step_counts == [0]
    assert not opt.flat_grads.any(), "zero_grad=True zeroes a skipped step's gradients"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("lo, hi", [(-1, 5), (5, 4), (0, 10 ** 9)])
def test_stepper_range_outside_the_arena(backend, lo, hi):
    module, _ = BACKENDS[backend]
    opt = module.SGD(_params(), lr=0.1)
    before = opt.flat_params.copy()
    with pytest.raises(ValueError, match="outside the arena"):
        with opt.exclusive("step"):
            opt.apply_step(*opt.check_step(), ranges=[(lo, hi)])
    assert_bitwise(opt.flat_params, before, "params")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("norm_type", [2.0, 1.0, np.inf, 3.0, 0.5])
@pytest.mark.parametrize("n", [0, 1, 100, 8192, 8193, 3 * 65536 + 17])
def test_norm_from_blocks_of_shards_is_grad_norm(backend, norm_type, n):
    """Blocks summed shard by shard (shards on block boundaries, some empty) and combined in
    order give grad_norm's value bit for bit; the non-finite flag of any shard is the
    whole's."""
    _, b = BACKENDS[backend]
    g = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 3
    whole, bad = b.grad_norm(g, norm_type)
    nblocks = -(-n // b.NORM_BLOCK)
    for shards in (1, 2, 3, nblocks + 2):
        per = -(-nblocks // shards) * b.NORM_BLOCK
        parts = [b.grad_norm_blocks(g[i * per:(i + 1) * per], norm_type) for i in range(shards)]
        blocks = np.concatenate([p[0] for p in parts])
        assert blocks.dtype == np.float64 and blocks.size == nblocks
        assert b.norm_from_blocks(blocks, norm_type) == whole
        assert not bad and not any(p[1] for p in parts)
    if n:
        g[n // 2] = np.nan
        blocks, bad = b.grad_norm_blocks(g, norm_type)
        assert bad and np.isnan(b.norm_from_blocks(blocks, norm_type))


def test_norm_block_sizes():
    """The block sizes ZeRO aligns its shards to: C's fixed blocks, the twin's."""
    assert _core.NORM_BLOCK == 8192
    assert R.NORM_BLOCK % 16 == 0 and _core.NORM_BLOCK % 16 == 0


def test_norm_blocks_bad_norm_type():
    """The C entry points refuse a norm order C would compute nonsense for (the Python callers
    check it first, with fastopt.clip.norm_type_arg)."""
    with pytest.raises(ValueError, match="norm_type"):
        _core.grad_norm_blocks(np.ones(3, np.float32), 0.0)
    with pytest.raises(ValueError, match="norm_type"):
        _core.norm_from_blocks(np.ones(3), -1.0)
