"""Compressed optimizer state (fastopt._formats): the dynamic maps against bitsandbytes', the
codecs' rules at their edges, the kernels against their NumPy twins bit for bit (every class
configuration x format, every ISA path and thread count), state bytes, resume, and bad input.

The bitwise twin of a compressed step is fastopt.reference's Stepper (the formats' NumPy
codecs, block by block as C does) around the C float32 kernel on the baseline path: the
family's float32 arithmetic is then the same code on both sides, and any difference is the
formats' (the NumPy family twins differ from the kernels by float32 rounding, which
tests/test_optim.py bounds; an int8 code may flip on such a difference).
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopt
import fastopt.reference as R
from fastopt import _core, _formats as FM
from fastopt.families import FAMILIES, OPTIMIZERS
from cases import CLASS_CONFIGS, FULL_STATE, assert_bitwise, state_bytes

# bitsandbytes 0.50.2's create_dynamic_map(signed=True) and (signed=False), as float32 bit
# patterns (8 hex digits an entry, in code order), copied from its output.
BNB_SIGNED_MAP_BITS = (
    "bf7e3333bf7a999abf770000bf736666bf6fcccdbf6c3333bf68999abf650000bf616666bf5dcccdbf5a3333"
    "bf56999abf530000bf4f6666bf4bcccdbf483333bf44999abf410000bf3d6666bf39cccdbf363334bf32999a"
    "bf2f0000bf2b6666bf27cccdbf243334bf20999abf1d0000bf196666bf15cccdbf123334bf0e999abf0b0000"
    "bf076666bf03ccccbf003333bef93332bef20000beeaccccbee3999abedc6666bed53333bece0000bec6cccc"
    "bebf999abeb86666beb13333beaa0000bea2ccccbe9b999abe946666be8d3334be860000be7d9999be6f3333"
    "be60cccdbe526666be440000be35999abe273333be18cccdbe0a6666bdf80000bddb3334bdc9eb85bdc428f7"
    "bdbe6667bdb8a3d7bdb2e148bdad1eb8bda75c2abda1999abd9bd70abd96147bbd9051ebbd8a8f5dbd84cccd"
    "bd7e147bbd728f5dbd670a3dbd5b851fbd500000bd447ae1bd38f5c3bd2d70a3bd21eb85bd166667bd0ae148"
    "bcfeb852bce7ae15bcd0a3d7bcb9999abca28f5dbc8b851fbc68f5c3bc3ae148bc1f3b64bc160418bc0ccccd"
    "bc039581bbf4bc6abbe24dd3bbcfdf3bbbbd70a4bbab020dbb989374bb8624ddbb676c8abb428f5cbb1db22d"
    "baf1a9fcbaa7ef9dba7765ffba59e83eba3c6a80ba1eecc1ba016f01b9c7e283b98ce705b923d70bb8ba1f4b"
    "b88aefb3b8378034b7b24206b70205ffb65a1a94b513a3b7000000003513a3b7365a1a94370205ff37b24206"
    "38378034388aefb338ba1f4b3923d70b398ce70539c7e2833a016f013a1eecc13a3c6a803a59e83e3a7765ff"
    "3aa7ef9d3af1a9fc3b1db22d3b428f5c3b676c8a3b8624dd3b9893743bab020d3bbd70a43bcfdf3b3be24dd3"
    "3bf4bc6a3c0395813c0ccccd3c1604183c1f3b643c3ae1483c68f5c33c8b851f3ca28f5d3cb9999a3cd0a3d7"
    "3ce7ae153cfeb8523d0ae1483d1666673d21eb853d2d70a33d38f5c33d447ae13d5000003d5b851f3d670a3d"
    "3d728f5d3d7e147b3d84cccd3d8a8f5d3d9051eb3d96147b3d9bd70a3da1999a3da75c2a3dad1eb83db2e148"
    "3db8a3d73dbe66673dc428f73dc9eb853ddb33343df800003e0a66663e18cccd3e2733333e35999a3e440000"
    "3e5266663e60cccd3e6f33333e7d99993e8600003e8d33343e9466663e9b999a3ea2cccc3eaa00003eb13333"
    "3eb866663ebf999a3ec6cccc3ece00003ed533333edc66663ee3999a3eeacccc3ef200003ef933323f003333"
    "3f03cccc3f0766663f0b00003f0e999a3f1233343f15cccd3f1966663f1d00003f20999a3f2433343f27cccd"
    "3f2b66663f2f00003f32999a3f3633343f39cccd3f3d66663f4100003f44999a3f4833333f4bcccd3f4f6666"
    "3f5300003f56999a3f5a33333f5dcccd3f6166663f6500003f68999a3f6c33333f6fcccd3f7366663f770000"
    "3f7a999a3f7e33333f800000"
)
BNB_UNSIGNED_MAP_BITS = (
    "0000000034ae7baa35500998360e9b383692ccf636de4c513714e5d53783126e37e171a0381fe868384f1800"
    "387e479a3896bb9938ae536438c5eb313906594b394154ca397c5049399ba5e439b923a239d6a16339f41f22"
    "3a08ce713a178d503a264c303a350b103a43c9ef3a5288d03a6147af3a70068e3a7ec56e3a9581063aba5e35"
    "3adf3b643b020c4a3b147ae13b26e9783b3958103b4bc6a73b5e35403b70a3d73b8189373b8ac0823b93f7cf"
    "3b9d2f1a3ba666663baf9db23bb8d4fd3bc20c4a3bcb43953bd47ae13bddb22e3be6e9783bf020c53bf9580f"
    "3c0147ae3c05e3543c0a7ef93c0f1aa03c13b6453c1851eb3c1ced923c2189373c2f5c2a3c4666673c5d70a3"
    "3c747ae23c85c28f3c9147af3c9ccccd3ca851eb3cb3d70b3cbf5c293ccae1473cd666673ce1eb873ced70a3"
    "3cf8f5c33d023d703d0800003d0dc28f3d13851f3d1947af3d1f0a3d3d24cccd3d2a8f5c3d3051eb3d36147b"
    "3d3bd70a3d41999a3d475c283d4d1eb83d52e1473d58a3d73d5e66673d6428f73d69eb873d6fae153d7570a3"
    "3d7b33333d807ae23d835c2a3d863d713d891eb83d8c00003d8ee1483d91c2903d94a3d73d97851f3d9a6667"
    "3d9d47af3da028f63da30a3e3da5eb853da8cccd3dabae153dae8f5c3db170a43db451eb3db733333dba147b"
    "3dbcf5c33dbfd70b3dc2b8523dc5999a3dc87ae23dcb5c293dd400003de266663df0cccd3dff33333e06cccc"
    "3e0e00003e1533343e1c66663e23999a3e2acccc3e3200003e3933343e4066663e47999a3e4ecccc3e560000"
    "3e5d33343e6466663e6b999a3e72cccc3e7a00003e8099993e8433333e87cccd3e8b66663e8f00003e92999a"
    "3e9633333e99cccc3e9d66663ea100003ea4999a3ea833333eabcccc3eaf66663eb300003eb6999a3eba3333"
    "3ebdcccc3ec166663ec500003ec8999a3ecc33333ecfcccc3ed366663ed700003eda999a3ede33333ee1cccc"
    "3ee566663ee900003eec999a3ef033333ef3cccc3ef766663efb00003efe99993f01199a3f02e6663f04b333"
    "3f0680003f084ccc3f0a199a3f0be6663f0db3343f0f80003f114ccd3f13199a3f14e6663f16b3343f188000"
    "3f1a4ccd3f1c199a3f1de6663f1fb3343f2180003f234ccd3f25199a3f26e6663f28b3343f2a80003f2c4ccd"
    "3f2e199a3f2fe6663f31b3343f3380003f354ccd3f37199a3f38e6663f3ab3343f3c80003f3e4ccd3f40199a"
    "3f41e6663f43b3343f4580003f474ccc3f49199a3f4ae6663f4cb3343f4e80003f504ccc3f52199a3f53e666"
    "3f55b3343f5780003f594ccc3f5b199a3f5ce6663f5eb3343f6080003f624ccc3f64199a3f65e6663f67b334"
    "3f6980003f6b4ccc3f6d199a3f6ee6663f70b3343f7280003f744ccc3f76199a3f77e6663f79b3343f7b8000"
    "3f7d4ccc3f7f199a3f800000"
)


def sbytes(opt):
    """{buffer: its storage's bytes} (cases.state_bytes as bytes, for == and bool)."""
    return {k: v.tobytes() for k, v in state_bytes(opt).items()}


def _map_from_bits(text):
    words = "".join(text)
    return np.array([int(words[i:i + 8], 16) for i in range(0, len(words), 8)],
                    np.uint32).view(np.float32)


# ---- the maps --------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_dynamic_maps_are_bitsandbytes(signed):
    want = _map_from_bits(BNB_SIGNED_MAP_BITS if signed else BNB_UNSIGNED_MAP_BITS)
    got = FM.dynamic_map(signed)
    assert got.dtype == np.float32 and got.shape == (256,)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.all(np.diff(want) > 0) and want[-1] == 1.0
    # the tables C reads are these maps
    maps, _ = _core_tables()
    assert np.array_equal(maps[int(signed)].view(np.uint32), want.view(np.uint32))


def _core_tables():
    return FM.tables()


# ---- the codecs' rules (the NumPy twins) ------------------------------------------------------

def _nearest_codes(x, absmax, qmap):
    """Brute force: the code whose map entry is nearest to x / absmax (in float64)."""
    n = (x.astype(np.float32) / absmax).astype(np.float64)
    return np.abs(n[:, None] - qmap.astype(np.float64)[None, :]).argmin(axis=1)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_int8_codes_are_the_nearest_map_entry(signed):
    rng = np.random.default_rng(5)
    qmap = FM.dynamic_map(signed)
    x = (rng.standard_normal(256 * 64) * 10.0 ** rng.uniform(-6, 3, 256 * 64)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    codes, absmax = FM.quantize_int8(x, signed)
    assert codes.dtype == np.uint8 and absmax.dtype == np.float32
    assert np.array_equal(absmax, np.abs(x).reshape(-1, 256).max(axis=1))
    for b in range(64):
        xs = x[b * 256:(b + 1) * 256]
        c = codes[b * 256:(b + 1) * 256]
        near = _nearest_codes(xs, absmax[b], qmap)
        n = xs / absmax[b]
        # where x / absmax is not within an ulp of a decision point, the code is the nearest
        t = FM.thresholds(qmap)
        clear = np.abs(n[:, None] - t[None, :]).min(axis=1) > 2 * np.spacing(np.abs(n) + 1e-30)
        assert np.array_equal(c[clear], near[clear])
        assert np.all(np.abs(c.astype(int) - near) <= 1)
    # a positive element that is the absmax reads back exactly (map entry 1.0); a negative
    # one as the map's most negative entry times absmax
    back = FM.dequantize_int8(codes, absmax, signed).reshape(-1, 256)
    top = np.abs(x).reshape(-1, 256).argmax(axis=1)
    xt, bt = x.reshape(-1, 256)[np.arange(64), top], back[np.arange(64), top]
    assert np.array_equal(bt[xt > 0], absmax[xt > 0])
    assert np.array_equal(bt[xt < 0], (qmap[0] * absmax[xt < 0]).astype(np.float32))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_an_int8_tie_takes_the_smaller_magnitude(signed):
    qmap = FM.dynamic_map(signed)
    t = FM.thresholds(qmap)
    x = np.zeros(256, np.float32)
    x[0] = 1.0                                  # absmax 1: x / absmax is x
    picks = np.arange(1, 255, 2)[:127]
    x[1:1 + picks.size] = t[picks]              # exactly on a decision point
    if signed:
        x[1 + picks.size:1 + 2 * picks.size - 1] = -t[picks[:-1]][::-1][:picks.size - 1]
    codes, absmax = FM.quantize_int8(x, signed)
    assert absmax[0] == 1.0
    back = FM.dequantize_int8(codes, absmax, signed)
    on = x != 0
    lower = qmap[np.searchsorted(qmap, x[on]) - 1]   # the two entries around each tie
    upper = qmap[np.searchsorted(qmap, x[on])]
    smaller = np.where(np.abs(lower) < np.abs(upper), lower, upper)
    smaller[x[on] == 1.0] = 1.0
    assert np.array_equal(back[on], smaller)


def test_int8_blocks_at_the_edges():
    big = np.float32(3.0e38)
    tiny = np.float32(1e-42)                     # a denormal
    blocks = {
        "zeros": np.zeros(256, np.float32),
        "one huge value": np.where(np.arange(256) == 9, big, 0).astype(np.float32),
        "nan": np.where(np.arange(256) == 3, np.nan, 1).astype(np.float32),
        "inf": np.where(np.arange(256) == 3, np.inf, 1).astype(np.float32),
        "-inf": np.where(np.arange(256) == 3, -np.inf, 1).astype(np.float32),
        "denormals": (np.arange(256) % 7 * tiny).astype(np.float32),
    }
    for signed in (True, False):
        zero = FM.SIGNED_ZERO_CODE if signed else FM.UNSIGNED_ZERO_CODE
        assert FM.dynamic_map(signed)[zero] == 0.0
        for name, x in blocks.items():
            codes, absmax = FM.quantize_int8(x, signed)
            back = FM.dequantize_int8(codes, absmax, signed)
            if name == "zeros":
                assert absmax[0] == 0 and np.all(codes == zero) and np.all(back == 0)
            elif name == "one huge value":
                assert absmax[0] == big and back[9] == big and np.all(np.delete(back, 9) == 0)
            elif name in ("nan", "inf", "-inf"):
                # a non-finite block keeps its absmax (NaN, or +inf) and reads back as NaN
                assert np.all(codes == zero), name
                assert (np.isnan(absmax[0]) if name == "nan" else absmax[0] == np.inf), name
                assert np.all(np.isnan(back)), name
            else:
                assert absmax[0] == x.max() and 0 < absmax[0] < np.finfo(np.float32).tiny
            if name in ("zeros", "one huge value", "denormals"):
                gap = np.diff(FM.dynamic_map(signed)).max()
                assert np.all(np.abs(back - x) <= absmax[0] * gap / 2 + 0)


def test_bfloat16_rounds_to_nearest_even_and_keeps_nan_and_inf():
    one = 0x3F800000
    cases = {one: 0x3F80, one + 0x8000: 0x3F80,            # a tie: to even (down)
             one + 0x18000: 0x3F82,                         # a tie: to even (up)
             one + 0x8001: 0x3F81, one + 0x7FFF: 0x3F80,
             0x7F7FFFFF: 0x7F80,                            # the largest float32 -> inf
             0x7F800000: 0x7F80, 0xFF800000: 0xFF80,        # +-inf stay
             0x00000001: 0x0000, 0x80000001: 0x8000}        # a denormal: to a signed zero
    bits = np.array(list(cases), np.uint32)
    got = FM.f32_to_bf16(bits.view(np.float32))
    assert got.tolist() == list(cases.values())
    nan = np.array([0x7F800001, 0xFFC00000, 0x7FFFFFFF], np.uint32).view(np.float32)
    out = FM.bf16_to_f32(FM.f32_to_bf16(nan))
    assert np.all(np.isnan(out)) and np.signbit(out).tolist() == [False, True, False]
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    assert np.array_equal(FM.bf16_to_f32(FM.f32_to_bf16(FM.bf16_to_f32(FM.f32_to_bf16(x)))),
                          FM.bf16_to_f32(FM.f32_to_bf16(x)))


def test_stochastic_rounding_is_unbiased_and_keyed():
    n = 1 << 16
    x = np.full(n, np.float32(1 + 2 ** -9))         # a quarter of the way to the next bf16
    idx = np.arange(n, dtype=np.uint64)
    up = FM.f32_to_bf16(x, FM.random_bits(5, 1, 0, idx)) == 0x3F81
    assert abs(up.mean() - 0.25) < 0.01             # 6 standard deviations
    again = FM.f32_to_bf16(x, FM.random_bits(5, 1, 0, idx)) == 0x3F81
    assert np.array_equal(up, again)                # a counter-based stream: the same draw
    for other in [(6, 1, 0), (5, 2, 0), (5, 1, 1)]:  # another seed, step or buffer
        assert not np.array_equal(up, FM.f32_to_bf16(x, FM.random_bits(*other, idx)) == 0x3F81)
    # an index past 2**32 draws from another key, not the same bits again
    far = FM.random_bits(5, 1, 0, idx + np.uint64(1 << 32))
    assert not np.array_equal(far, FM.random_bits(5, 1, 0, idx))
    exact = FM.f32_to_bf16(np.float32([1.5, -2.0, 0.0]), FM.random_bits(5, 1, 0, idx[:3]))
    assert exact.tolist() == [0x3FC0, 0xC000, 0x0000]   # representable values never move


# ---- the C codecs, read through a first step that stores the gradient ---------------------------

EDGE_BLOCKS = np.concatenate([
    np.zeros(256),
    np.where(np.arange(256) == 9, 3.0e38, 0),
    np.where(np.arange(256) == 3, np.nan, 1),
    np.where(np.arange(256) == 3, np.inf, -1),
    np.where(np.arange(256) == 3, -np.inf, 1),
    np.arange(256) % 7 * 1e-42,
    np.random.default_rng(3).standard_normal(256) * 1e-30,
    np.random.default_rng(4).standard_normal(1024) * 10.0 ** np.linspace(-30, 30, 1024),
    np.linspace(-1, 1, 256),
]).astype(np.float32)


@pytest.mark.parametrize("isa", _core.available_isas())
@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_c_codecs_store_what_the_twins_store(isa, state_dtype):
    """SGD's first momentum step stores the gradient, and Adagrad's first sum its square:
    C's int8 (signed and unsigned) and bfloat16 codecs on every path against the twins, on
    blocks of zeros, one huge value, NaN, +-inf, denormals, tiny and wide-ranging values."""
    g = EDGE_BLOCKS
    n = g.size
    before = _core.get_isa()
    _core.set_isa(isa)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            square = g * g
        for cls, kw, signed, value in [("SGD", dict(momentum=0.9), True, g),
                                       ("Adagrad", dict(), False, square)]:
            opt = getattr(fastopt, cls)([np.zeros(n, np.float32)], lr=0.0,
                                        state_dtype=state_dtype, min_8bit_size=256, **kw)
            opt.grads[0][...] = g
            with np.errstate(over="ignore", invalid="ignore"):
                opt.step()
                value = value.astype(np.float32)
            key = "momentum_buffer" if cls == "SGD" else "sum"
            entry = opt.state[0]
            if state_dtype == "int8":
                codes, absmax = FM.quantize_int8(value, signed)
                assert np.array_equal(entry[key].reshape(-1), codes), cls
                assert np.array_equal(entry[key + "_absmax"].view(np.uint32),
                                      absmax.view(np.uint32)), cls
                want = FM.dequantize_int8(codes, absmax, signed)
            else:
                bits = FM.f32_to_bf16(value)
                assert np.array_equal(FM.as_bf16_bits(entry[key]), bits), cls
                want = FM.bf16_to_f32(bits)
            got = opt.state_values()[0][key]
            assert_bitwise(got, want, f"{cls} state_values")
    finally:
        _core.set_isa(before)


# ---- kernels against twins, every class configuration x format ----------------------------------

FORMAT_OPTIONS = {
    "bf16": dict(state_dtype="bfloat16"),
    "bf16_stochastic": dict(state_dtype="bfloat16", state_rounding="stochastic",
                            state_seed=2 ** 40 + 12345),
    "int8": dict(state_dtype="int8", min_8bit_size=1024),
}
# sizes 2560, 1000, 7, 4500: with min_8bit_size 1024, int8 state for the first and last (the
# last ends in a partial block), float32 for the two small ones
SHAPES = [(40, 64), (1000,), (7,), (3, 5, 300)]


@pytest.fixture
def twin(monkeypatch):
    """fastopt.reference's classes with the C float32 kernel (baseline path) as the family's
    arithmetic: its formats are the NumPy twins'."""
    def c_kernel(family, param, grad, state, start, stop, step, fields, grad_multiplier=1.0,
                 zero_grad=False):
        before = _core.get_isa()
        _core.set_isa("baseline")
        try:
            _core.kernel(family, param, grad, state, start, stop, step, fields,
                         grad_multiplier, zero_grad)
        finally:
            _core.set_isa(before)
    monkeypatch.setattr(R, "kernel", c_kernel)
    return R


def make(module, cls, kwargs, shapes=SHAPES, seed=0, group1=None):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    lr = kwargs.get("lr", OPTIMIZERS[cls].defaults["lr"])
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": lr * 0.5, **(group1 or {})}]
    return getattr(module, cls)(groups, **kwargs)


def feed(opt, t, seed=0, hostile=False):
    rng = np.random.default_rng(1000 * seed + t)
    for g in opt.grads:
        x = rng.standard_normal(g.shape) * 10.0 ** rng.uniform(-3, 1, g.shape)
        x.reshape(-1)[::17] = 0.0
        if hostile and g.size >= 1000:
            x.reshape(-1)[5] = np.nan if t % 2 else np.inf
            x.reshape(-1)[300:556] = 0.0
        g[...] = x


def steps(opt, n, seed=0, hostile=False, start=0):
    for t in range(start, start + n):
        feed(opt, t, seed, hostile)
        with np.errstate(all="ignore"):
            opt.step()
    return opt


def same_run(a, b, what, raw=True):
    """Params and state bit for bit: every byte of the state arenas (raw), or what `state`
    shows (the state between params, which no param reads, may differ after a load: it is
    not in a state dict; an int8 block's is, in its codes)."""
    assert_bitwise(a.flat_params, b.flat_params, f"{what}: params")
    if raw:
        sa, sb = sbytes(a), sbytes(b)
        assert sa.keys() == sb.keys(), what
        for key in sa:
            assert sa[key] == sb[key], f"{what}: state {key!r} differs"
        return
    sa, sb = a.state, b.state
    assert sa.keys() == sb.keys(), what
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), what
        for key, x in sa[k].items():
            y = sb[k][key]
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), \
                    f"{what}: state[{k}][{key!r}] differs"
            else:
                assert x == y, f"{what}: state[{k}][{key!r}] is {x!r}, not {y!r}"


CLASS_CASES = [(name, fmt) for name in CLASS_CONFIGS for fmt in FORMAT_OPTIONS]
# every buffer of every class in use; centered RMSprop keeps float32 state (refused below)
FORMAT_FULL_STATE = {**FULL_STATE, "RMSprop": dict(momentum=0.5)}


def every_path(threads):
    """Each ISA path here with 1 and then 2 threads, set in turn as (isa, threads) is yielded;
    the ISA is restored after (the fixture restores the threads)."""
    before = _core.get_isa()
    try:
        for isa in _core.available_isas():
            _core.set_isa(isa)
            for nt in (1, 2):
                threads(nt, min_per_thread=1)
                yield isa, nt
    finally:
        _core.set_isa(before)


@pytest.mark.parametrize("name,fmt", CLASS_CASES, ids=[f"{n}-{f}" for n, f in CLASS_CASES])
def test_kernels_match_their_twins_bitwise(twin, threads, name, fmt):
    cls, kwargs = CLASS_CONFIGS[name]
    kwargs = {**kwargs, **FORMAT_OPTIONS[fmt]}
    if kwargs.get("centered"):
        with pytest.raises(ValueError, match=r"state_dtype is .* centered RMSprop .*\(NaN\)"):
            make(fastopt, cls, kwargs)
        return
    want = steps(make(twin, cls, kwargs), 6)
    held = sbytes(want)
    assert not held or any(any(b) for b in held.values())
    for isa, nt in every_path(threads):
        got = steps(make(fastopt, cls, kwargs), 6)
        same_run(got, want, f"{isa}, {nt} threads")


@pytest.mark.parametrize("fmt", [FM.FMT_BF16, FM.FMT_BF16_SR])
def test_a_range_across_a_multiple_of_2_32_matches_its_twin(twin, threads, fmt):
    """Stochastic rounding draws from a key of the element's arena index's high 32 bits: an
    arena (a ZeRO shard, say) that starts 300 elements below 2**32 is stepped in two parts,
    each with its keys, on every path and with 1 and 2 threads.  Adam's two buffers draw from
    two streams; nearest rounding is the control."""
    n, base = 1000, 2 ** 32 - 300
    fields = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=1,
                  amsgrad=0, maximize=0)
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(n).astype(np.float32)
    g0 = rng.standard_normal(n).astype(np.float32)

    def run(module):
        param, grad = p0.copy(), g0.copy()
        rec = np.zeros(1, FAMILIES["adam"].dtype)
        stepper = module.Stepper("adam", param, grad, [(0, n)], rec,
                                 segments=[(0, 0, n, fmt, 0)], index_base=base)
        stepper.set_fields(0, fields)
        stepper.set_seed(0, 99)
        bufs = {k: np.zeros(n, np.uint16) for k in ("exp_avg", "exp_avg_sq")}
        for k, b in bufs.items():
            stepper.set_buffer(k, b, fmt)
        for t in range(3):
            stepper.run([t])
        return param, bufs

    want_p, want = run(twin)
    assert not np.array_equal(want["exp_avg"], want["exp_avg_sq"])
    for isa, nt in every_path(threads):
        got_p, got = run(_core)
        assert_bitwise(got_p, want_p, f"param, {isa}, {nt} threads")
        for k in want:
            assert np.array_equal(got[k], want[k]), (k, isa, nt)
    if fmt == FM.FMT_BF16_SR:       # the keys do change at 2**32: one key would differ
        one_key = FM.random_bits(99, 1, 0, np.arange(n, dtype=np.uint64) + np.uint64(base))
        other = FM.random_bits(99, 1, 0, (np.arange(n, dtype=np.uint64) + np.uint64(base))
                               % np.uint64(2 ** 32))
        assert np.array_equal(one_key[:300], other[:300])
        assert not np.array_equal(one_key[300:], other[300:])


@pytest.mark.parametrize("fmt", list(FORMAT_OPTIONS))
@pytest.mark.parametrize("cls", ["Adam", "RMSprop", "SGD"])
@pytest.mark.parametrize("skip", [False, True], ids=["", "skip_nonfinite"])
def test_nonfinite_gradients_match_their_twins(twin, cls, fmt, skip):
    """NaN and inf in the gradients: without skip_nonfinite the blocks they reach go NaN on
    both sides alike; with it the step is skipped and nothing changes."""
    kwargs = {**FORMAT_FULL_STATE[cls], **FORMAT_OPTIONS[fmt], "skip_nonfinite": skip}
    want = steps(make(twin, cls, kwargs), 2)
    got = steps(make(fastopt, cls, kwargs), 2)
    same_run(got, want, "clean steps")
    snap = (got.flat_params.copy(), sbytes(got))
    steps(want, 3, hostile=True, start=2)
    steps(got, 3, hostile=True, start=2)
    same_run(got, want, "non-finite steps")
    if skip:
        assert got.skipped_steps == 3
        assert_bitwise(got.flat_params, snap[0], "skipped: params")
        assert sbytes(got) == snap[1]
    else:
        assert np.isnan(got.flat_params).any()


def test_groups_may_keep_different_formats(twin):
    kwargs = dict(lr=0.01, state_dtype="int8", min_8bit_size=256)
    group1 = dict(state_dtype="bfloat16", state_rounding="stochastic", state_seed=3)
    want = steps(make(twin, "AdamW", kwargs, group1=group1), 5)
    got = steps(make(fastopt, "AdamW", kwargs, group1=group1), 5)
    same_run(got, want, "int8 and bfloat16 groups")
    st = got.state
    assert st[0]["exp_avg"].dtype == np.uint8 and st[3]["exp_avg"].itemsize == 2


def test_state_rounding_may_change_between_steps(twin):
    kwargs = dict(lr=0.01, state_dtype="bfloat16")
    want, got = make(twin, "Adam", kwargs), make(fastopt, "Adam", kwargs)
    for opt in (want, got):
        steps(opt, 2)
        opt.param_groups[1]["state_rounding"] = "stochastic"
        opt.param_groups[1]["state_seed"] = 99
        steps(opt, 2, start=2)
    same_run(got, want, "rounding changed mid-run")
    plain = steps(make(fastopt, "Adam", kwargs), 4)
    assert not np.array_equal(plain.flat_params, got.flat_params)


# ---- layout, state and its bytes --------------------------------------------------------------

def test_int8_params_start_on_whole_blocks_and_small_ones_keep_float32():
    opt = make(fastopt, "Adam", dict(state_dtype="int8", min_8bit_size=1024))
    layout = opt.layout
    steps(opt, 1)
    for k, shape in enumerate(SHAPES):
        size = int(np.prod(shape))
        entry = opt.state[k]
        if size >= 1024:
            assert layout.offsets[k] % FM.QBLOCK == 0
            nb = -(-size // FM.QBLOCK)
            assert entry["exp_avg"].dtype == np.uint8 and entry["exp_avg"].shape == (nb, 256)
            assert entry["exp_avg_absmax"].dtype == np.float32
            assert entry["exp_avg_absmax"].shape == (nb,)
        else:
            assert entry["exp_avg"].dtype == np.float32 and entry["exp_avg"].shape == shape
            assert "exp_avg_absmax" not in entry
    sd = opt.state_dict()
    assert sd["param_groups"][0]["state_dtype"] == "int8"
    assert sd["state"][0]["exp_avg"].dtype == np.uint8


@pytest.mark.parametrize("cls,buffers", [("Adam", 2), ("AdamW", 3), ("RMSprop", 2)])
def test_state_bytes_per_param(cls, buffers):
    """8 / 4 / 2.03 bytes a parameter for Adam's two buffers (float32 / bfloat16 / int8)."""
    kw = dict(amsgrad=True) if cls == "AdamW" else (
        dict(momentum=0.9) if cls == "RMSprop" else {})
    n = 256 * 64
    per = {}
    for dtype in ("float32", "bfloat16", "int8"):
        opt = getattr(fastopt, cls)([np.ones(n, np.float32)], state_dtype=dtype, **kw)
        assert opt.state_nbytes == 0
        opt.grads[0][...] = 1.0
        opt.step()
        per[dtype] = opt.state_nbytes / n
    assert per == {"float32": 4.0 * buffers, "bfloat16": 2.0 * buffers,
                   "int8": (1 + 4 / 256) * buffers}
    if cls == "Adam":
        assert (per["float32"], per["bfloat16"], round(per["int8"], 2)) == (8, 4, 2.03)


@pytest.mark.parametrize("fmt", list(FORMAT_OPTIONS))
def test_state_values_are_the_float32_values(fmt):
    opt = steps(make(fastopt, "AdamW", {**FULL_STATE["AdamW"], **FORMAT_OPTIONS[fmt]}), 3)
    values = opt.state_values()
    for k, entry in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            v = values[k][key]
            assert v.dtype == np.float32 and v.shape == opt.layout.shapes[k]
            if entry[key].dtype == np.uint8:
                signed = key == "exp_avg"
                want = FM.dequantize_int8(entry[key], entry[key + "_absmax"], signed)
                assert_bitwise(v.reshape(-1), want[:v.size], key)
            elif entry[key].dtype == np.float32:
                assert_bitwise(v, entry[key], key)
            else:
                assert_bitwise(v, FM.bf16_to_f32(FM.as_bf16_bits(entry[key])), key)


# ---- resume --------------------------------------------------------------------------------------

RESUME_CASES = [(cls, fmt) for cls in FORMAT_FULL_STATE for fmt in FORMAT_OPTIONS]


@pytest.mark.parametrize("cls,fmt", RESUME_CASES, ids=[f"{c}-{f}" for c, f in RESUME_CASES])
def test_resume_from_a_state_dict_is_bit_exact(cls, fmt):
    kwargs = {**FORMAT_FULL_STATE[cls], **FORMAT_OPTIONS[fmt]}
    straight = steps(make(fastopt, cls, kwargs), 6)
    first = steps(make(fastopt, cls, kwargs), 3)
    sd = first.state_dict()
    params = [p.copy() for p in first.params]
    resumed = make(fastopt, cls, kwargs, seed=1)
    for p, q in zip(resumed.params, params):
        p[...] = q
    resumed.load_state_dict(sd)
    same_run(resumed, first, "loaded", raw=False)
    steps(resumed, 3, start=3)
    same_run(resumed, straight, "resumed", raw=False)


@pytest.mark.parametrize("fmt", list(FORMAT_OPTIONS))
def test_resume_from_a_checkpoint_is_bit_exact(tmp_path, fmt):
    kwargs = {**FULL_STATE["AdamW"], **FORMAT_OPTIONS[fmt]}
    straight = steps(make(fastopt, "AdamW", kwargs), 6)
    first = steps(make(fastopt, "AdamW", kwargs), 3)
    first.save(tmp_path / "ck.npz")
    with np.load(tmp_path / "ck.npz") as z:
        member = z["state/0/exp_avg"]
        assert member.dtype == (np.uint8 if fmt == "int8" else np.uint16)
        assert ("state/0/exp_avg_absmax" in z.files) == (fmt == "int8")
    resumed = make(fastopt, "AdamW", kwargs, seed=1)
    resumed.load(tmp_path / "ck.npz")
    same_run(resumed, first, "loaded", raw=False)
    steps(resumed, 3, start=3)
    same_run(resumed, straight, "resumed", raw=False)


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,exc,match", [
    (dict(state_dtype="float16"), ValueError, r"state_dtype must be one of \['float32'"),
    (dict(state_dtype=8), TypeError, "state_dtype must be a str"),
    (dict(state_rounding="up"), ValueError, "state_rounding must be one of"),
    (dict(min_8bit_size=-1), ValueError, "min_8bit_size must be from 0"),
    (dict(min_8bit_size=True), TypeError, "min_8bit_size must be an int"),
    (dict(state_seed=-3), ValueError, "state_seed must be from 0"),
    (dict(state_seed=2 ** 64), ValueError, "state_seed must be from 0"),
    (dict(state_seed=1.5), TypeError, "state_seed must be an int"),
])
def test_bad_state_options_are_refused_by_name(kw, exc, match):
    with pytest.raises(exc, match=match):
        fastopt.Adam([np.ones(4, np.float32)], **kw)
    with pytest.raises(exc, match=r"param_groups\[1\]\." + match):
        fastopt.Adam([{"params": [np.ones(4, np.float32)]},
                      {"params": [np.ones(4, np.float32)], **kw}])


@pytest.mark.parametrize("key,value", [("state_dtype", "int8"), ("state_dtype", "bfloat16"),
                                       ("min_8bit_size", 1)])
def test_a_layout_option_cannot_change_after_construction(key, value):
    opt = steps(make(fastopt, "Adam", dict(min_8bit_size=1024)), 2)
    snap = (opt.flat_params.copy(), sbytes(opt))
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\.{key} is .* cannot change"):
        steps(opt, 1, start=2)
    assert_bitwise(opt.flat_params, snap[0], "params")
    assert sbytes(opt) == snap[1]


@pytest.mark.parametrize("saved,loaded", [("int8", "float32"), ("float32", "int8"),
                                          ("bfloat16", "int8"), ("int8", "bfloat16"),
                                          ("float32", "bfloat16")])
def test_a_state_dict_of_another_format_is_refused(saved, loaded):
    big = [(64, 64), (300,), (5000,)]
    src = steps(make(fastopt, "Adam", dict(state_dtype=saved), shapes=big), 2)
    dst = steps(make(fastopt, "Adam", dict(state_dtype=loaded), shapes=big, seed=1), 1)
    snap = (dst.flat_params.copy(), sbytes(dst), dst.param_groups[0]["lr"])
    sd = src.state_dict()
    for g in sd["param_groups"]:
        g["state_dtype"] = loaded            # only the buffers say what they hold
    with pytest.raises(ValueError, match=f"holds {saved} state, this optimizer keeps "
                                         f"{loaded} state"):
        dst.load_state_dict(sd)
    assert_bitwise(dst.flat_params, snap[0], "params")
    assert sbytes(dst) == snap[1] and dst.param_groups[0]["lr"] == snap[2]
    sd = src.state_dict()                    # as saved: the layout key differs
    with pytest.raises(ValueError, match="state_dtype"):
        dst.load_state_dict(sd)
    assert sbytes(dst) == snap[1]


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    big = [(64, 64), (300,), (5000,)]
    src = steps(make(fastopt, "AdamW", dict(state_dtype="int8"), shapes=big), 2)
    src.save(tmp_path / "ck.npz")
    dst = steps(make(fastopt, "AdamW", dict(), shapes=big, seed=1), 1)
    snap = (dst.flat_params.copy(), sbytes(dst))
    with pytest.raises(ValueError, match="state_dtype"):
        dst.load(tmp_path / "ck.npz")
    assert_bitwise(dst.flat_params, snap[0], "params")
    assert sbytes(dst) == snap[1]


@pytest.mark.parametrize("edit,match", [
    (lambda e: e.update(exp_avg=e["exp_avg"][:-1]), r"has shape \(15, 256\), expected \(16, 256\)"),
    (lambda e: e.update(exp_avg=e["exp_avg"].astype(np.int16)), "dtype int16"),
    (lambda e: e.pop("exp_avg_absmax"), "no 'exp_avg_absmax'"),
    (lambda e: e.update(exp_avg_absmax=-e["exp_avg_absmax"] - 1), "absmax values >= 0"),
    (lambda e: e.update(exp_avg_absmax=e["exp_avg_absmax"][:3]), r"has shape \(3,\)"),
])
def test_bad_int8_members_are_refused(edit, match):
    opt = steps(make(fastopt, "Adam", dict(state_dtype="int8"), shapes=[(64, 64), (10,), (4096,)]), 2)
    sd = opt.state_dict()
    edit(sd["state"][0])
    snap = sbytes(opt)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(sd)
    assert sbytes(opt) == snap


def test_ml_dtypes_bfloat16_views_when_installed():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    opt = steps(make(fastopt, "Adam", dict(state_dtype="bfloat16")), 1)
    a = opt.state[0]["exp_avg"]
    assert a.dtype == ml_dtypes.bfloat16
    assert np.array_equal(a.astype(np.float32), opt.state_values()[0]["exp_avg"])


def _rewritten(path, change):
    with np.load(path, allow_pickle=False) as z:
        members = {k: z[k] for k in z.files}
    change(members)
    np.savez(path, **members)


@pytest.mark.parametrize("change,match", [
    (lambda m: m.update({"state/0/exp_avg_absmax": -m["state/0/exp_avg_absmax"] - 1}),
     "state/0/exp_avg_absmax must hold absmax values >= 0"),
    (lambda m: m.pop("state/0/exp_avg_absmax"), "exp_avg_absmax"),
    (lambda m: m.update({"state/0/exp_avg": m["state/0/exp_avg"][:-1]}),
     r"state/0/exp_avg has shape \(15, 256\), expected \(16, 256\)"),
    (lambda m: m.update({"state/0/exp_avg": m["state/0/exp_avg"].astype(np.uint16)}),
     r"\[.exp_avg.\] has dtype uint16, expected uint8"),
    (lambda m: m.update({"state/0/exp_avg_sq": m["state/0/exp_avg_sq"].astype(np.float64)}),
     "state/0/exp_avg_sq has dtype float64"),
], ids=["negative absmax", "no absmax", "short codes", "bf16 bits for codes", "float64"])
def test_hostile_int8_checkpoints_are_refused_and_change_nothing(tmp_path, change, match):
    shapes = [(64, 64), (10,), (4096,)]
    opt = steps(make(fastopt, "Adam", dict(state_dtype="int8"), shapes=shapes), 2)
    path = tmp_path / "ck.npz"
    opt.save(path)
    _rewritten(path, change)
    other = steps(make(fastopt, "Adam", dict(state_dtype="int8"), shapes=shapes, seed=3), 1)
    snap = (other.flat_params.copy(), sbytes(other))
    with pytest.raises(ValueError, match=match):
        other.load(path)
    assert_bitwise(other.flat_params, snap[0], "params")
    assert sbytes(other) == snap[1]


# any float32 bit patterns (NaN payloads, infinities, denormals, signed zeros), in 1-3 blocks,
# with a scale that keeps some blocks in one binade and spreads others over all of them
_BITS = st.lists(st.integers(0, 2 ** 32 - 1), min_size=256, max_size=768).map(
    lambda xs: np.array(xs[:len(xs) // 256 * 256], np.uint32))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=_BITS, narrow=st.booleans())
def test_c_codecs_match_the_twins_on_any_bits(bits, narrow):
    """The C codecs (through SGD's first momentum step, which stores the gradient) against
    the twins on arbitrary float32 bit patterns, int8 and bfloat16 (nearest and stochastic)."""
    g = bits.view(np.float32).copy()
    if narrow:                                  # every |element| in [1, 3): one block, many ties
        with np.errstate(invalid="ignore"):
            g = (np.abs(g) % np.float32(2) + np.float32(1)) * np.sign(g)
        g[~np.isfinite(g)] = 1.5
    n = g.size
    for kw in (dict(state_dtype="int8", min_8bit_size=256), dict(state_dtype="bfloat16"),
               dict(state_dtype="bfloat16", state_rounding="stochastic", state_seed=7)):
        opt = fastopt.SGD([np.zeros(n, np.float32)], lr=0.0, momentum=0.5, **kw)
        opt.grads[0][...] = g
        with np.errstate(all="ignore"):
            opt.step()
        entry = opt.state[0]
        if kw["state_dtype"] == "int8":
            codes, absmax = FM.quantize_int8(g, True)
            assert np.array_equal(entry["momentum_buffer"].reshape(-1), codes)
            assert_bitwise(entry["momentum_buffer_absmax"], absmax, "absmax")
        else:
            random16 = (FM.random_bits(7, 1, 0, np.arange(n, dtype=np.uint64))
                        if "state_rounding" in kw else None)
            want = FM.f32_to_bf16(g, random16)
            got = FM.as_bf16_bits(entry["momentum_buffer"])
            assert np.array_equal(got, want), np.flatnonzero(got != want)[:5]
