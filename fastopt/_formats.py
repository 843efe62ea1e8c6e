"""Compressed optimizer state: the formats, their rounding rules and their NumPy twins.

A param group's `state_dtype` chooses how its state buffers are stored; the kernels widen it
to float32, run the family's unchanged float32 update and round it back, in the same pass:
bfloat16 in registers, as the family's loop loads and stores it (csrc/internal.h), int8 a
block of 256 at a time through float32 tiles in L1 (csrc/formats.c).  The formats:

float32   as before: 4 bytes an element.
bfloat16  2 bytes: the float32's top half (uint16 bit patterns; `ml_dtypes.bfloat16` views
          when ml-dtypes is installed).  Widening is exact (bits << 16).  Rounding back:
          "nearest": to nearest, ties to even; "stochastic": up with probability equal to the
          dropped fraction (add 16 random bits below the kept ones, then truncate), unbiased.
          The random bits come from a counter-based hash of (state_seed, step, buffer,
          element index) (`random_bits`), so they do not depend on threads, ISA or how the
          arena is cut, and a resumed run draws the same ones.  A NaN stays a NaN (quieted);
          +-inf stay infinite.
int8      1 byte an element plus a float32 absmax per block of 256: the blockwise dynamic
          quantization of Dettmers et al., "8-bit Optimizers via Block-wise Quantization"
          (bitsandbytes' format).  A block stores absmax = max |x| and, per element, the code
          of the entry of a 256-entry dynamic map (`dynamic_map`: signed for buffers that take
          both signs, unsigned for the non-negative ones) nearest to x / absmax (IEEE float32
          division); an exact tie (x / absmax on a float32 threshold, `thresholds`) takes the
          entry of smaller magnitude.  It reads back as map[code] * absmax (one float32
          multiply).  A block whose absmax is 0 stores the code of 0.0 everywhere; a block
          holding a NaN or an infinity stores that absmax (NaN, or +inf) and the code of 0.0,
          so that the whole block reads back as NaN.  Tensors smaller than the group's
          `min_8bit_size` (4096 elements by default, as bitsandbytes) keep float32 state.

Everything here is the reference the C kernels are tested against, bit for bit.
"""
from typing import Optional

import numpy as np

FORMATS = ("float32", "bfloat16", "int8")
ROUNDINGS = ("nearest", "stochastic")
QBLOCK = 256                 # elements per int8 block (one absmax each)
MIN_8BIT_SIZE = 4096

# The C side's codes for the formats (fo_group.format in csrc/fastopt.h).
FMT_F32, FMT_BF16, FMT_BF16_SR, FMT_INT8 = 0, 1, 2, 3


def format_code(state_dtype, rounding):
    if state_dtype == "float32":
        return FMT_F32
    if state_dtype == "bfloat16":
        return FMT_BF16_SR if rounding == "stochastic" else FMT_BF16
    return FMT_INT8


# ---- the dynamic map ------------------------------------------------------------------------

def _linspace_f32(lo, hi, n):
    """torch.linspace(lo, hi, n) in float32, bit for bit: with step = f32((hi - lo) / (n - 1)),
    element i is fma(i, step, lo) for i < n/2 and fma(-(n-1-i), step, hi) above (ATen's
    two-sided linspace), each rounded once."""
    lo, hi = np.float32(lo), np.float32(hi)
    step = np.float32((hi - lo) / np.float32(n - 1))
    i = np.arange(n)
    low = np.float64(lo) + i * np.float64(step)       # exact products and sums, rounded once
    high = np.float64(hi) - (n - 1 - i) * np.float64(step)
    return np.where(i < n // 2, low, high).astype(np.float32)


def dynamic_map(signed):
    """The 256-entry dynamic quantization map, ascending, float32, as bitsandbytes'
    `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)` builds it: for
    e = 0 .. 6, the means of neighbouring points of linspace(0.1, 1, 2**e + 1) (signed; 2**(e+1)
    + 1 unsigned), times 10**(e - 6), with their negatives when signed; then 0 and 1.
    (Signed: 127 negative values, 0, 127 positive values and 1.0; unsigned: 0, 254 positive
    values and 1.0.)"""
    values = []
    for e in range(7):
        b = _linspace_f32(0.1, 1.0, (2 ** e if signed else 2 ** (e + 1)) + 1)
        means = ((b[:-1] + b[1:]) / np.float32(2)).astype(np.float32)
        scaled = (np.float32(10.0 ** (e - 6)) * means).astype(np.float32)
        values.append(scaled)
        if signed:
            values.append(-scaled)
    values.append(np.float32([0.0, 1.0]))
    out = np.sort(np.concatenate(values)).astype(np.float32)
    assert out.size == 256 and np.all(np.diff(out) > 0)
    return out


def thresholds(qmap):
    """The 255 decision points between neighbouring map entries, in float32:
    f32(qmap[j] + qmap[j+1]) * 0.5."""
    return ((qmap[:-1] + qmap[1:]).astype(np.float32) * np.float32(0.5)).astype(np.float32)


SIGNED_MAP = dynamic_map(True)
UNSIGNED_MAP = dynamic_map(False)
SIGNED_ZERO_CODE = int(np.flatnonzero(SIGNED_MAP == 0)[0])     # 127
UNSIGNED_ZERO_CODE = 0

# ---- the kernels' lookup table --------------------------------------------------------------
#
# The kernels find a code without searching: |x / absmax| (in [0, 1]) is cut into cells by the
# top 16 bits of its float32 pattern (sign, exponent, 7 mantissa bits) from 2**-CELL_EXP0 up;
# no cell holds two thresholds, so a cell's entry (the count of thresholds below it, and the
# low 16 bits of the one threshold inside it, or 0x10000 for none) gives the code with one
# integer compare.  Built here from the thresholds, checked against searching them in the tests.
CELL_EXP0 = 27
CELL_BASE = (127 - CELL_EXP0) << 7           # the top 16 bits of 2**-27
NCELLS = (CELL_EXP0 + 1) << 7                # up to and including [1, 2)


def _cells(pos_thresholds):
    """The cell table for ascending positive thresholds (uint32: count << 17 | low bits)."""
    t_bits = pos_thresholds.view(np.uint32)
    cell_of = (t_bits >> 16).astype(np.int64) - CELL_BASE
    assert cell_of.min() > 0 and cell_of.max() < NCELLS - 1
    assert np.all(np.diff(cell_of) > 0), "two thresholds share a cell"
    lows = (np.arange(NCELLS, dtype=np.uint32) + np.uint32(CELL_BASE)) << np.uint32(16)
    below = np.searchsorted(t_bits, lows, side="left")   # thresholds < the cell's low end
    t17 = np.full(NCELLS, 0x10000, np.uint32)
    t17[cell_of] = t_bits & np.uint32(0xFFFF)
    return (below.astype(np.uint32) << np.uint32(17)) | t17


# signed: the magnitude's count of the thresholds above 0 (128 of them); unsigned: all 255
SIGNED_CELLS = _cells(thresholds(SIGNED_MAP)[SIGNED_ZERO_CODE:])
UNSIGNED_CELLS = _cells(thresholds(UNSIGNED_MAP))


def tables():
    """What the C stepper is handed: (maps, cells) as contiguous arrays, [unsigned, signed]."""
    maps = np.ascontiguousarray(np.stack([UNSIGNED_MAP, SIGNED_MAP]))
    cells = np.ascontiguousarray(np.stack([UNSIGNED_CELLS, SIGNED_CELLS]))
    return maps, cells


# ---- int8 blockwise ----------------------------------------------------------------------------

def quantize_int8(x, signed):
    """float32 values (a multiple of QBLOCK of them) -> (codes uint8, absmax float32 per
    block), by the rule in the module docstring."""
    x = np.asarray(x, np.float32).reshape(-1, QBLOCK)
    qmap = SIGNED_MAP if signed else UNSIGNED_MAP
    zero = SIGNED_ZERO_CODE if signed else UNSIGNED_ZERO_CODE
    ax = np.abs(x)
    nonfinite = ~np.isfinite(x).all(axis=1)
    with np.errstate(invalid="ignore"):
        absmax = ax.max(axis=1)
    absmax = np.where(np.isnan(x).any(axis=1), np.float32(np.nan), absmax).astype(np.float32)
    ok = (absmax > 0) & ~nonfinite
    safe = np.where(ok, absmax, np.float32(1))[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        n = (x / safe).astype(np.float32)
    t = thresholds(qmap)
    codes = np.searchsorted(t, n, side="left")             # count of thresholds < n
    if signed:
        neg = n < 0                                        # ties toward zero: count <=
        codes = np.where(neg, np.searchsorted(t, n, side="right"), codes)
    codes = np.where(ok[:, None], codes, zero).astype(np.uint8)
    return codes.reshape(-1), absmax


def dequantize_int8(codes, absmax, signed):
    """(codes, absmax) -> float32 values: map[code] * absmax."""
    qmap = SIGNED_MAP if signed else UNSIGNED_MAP
    c = np.asarray(codes, np.uint8).reshape(-1, QBLOCK)
    with np.errstate(invalid="ignore", over="ignore"):
        out = (qmap[c] * np.asarray(absmax, np.float32)[:, None]).astype(np.float32)
    return out.reshape(-1)


# ---- bfloat16 --------------------------------------------------------------------------------

def bf16_to_f32(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x, random16=None):
    """float32 -> bfloat16 bits (uint16): to nearest even, or stochastically when random16
    (uint32 values below 2**16, one per element) is given.  NaN -> a quiet NaN of its sign."""
    u = np.asarray(x, np.float32).view(np.uint32)
    if random16 is None:
        r = np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))
    else:
        r = random16.astype(np.uint32)
    out = ((u + r) >> 16).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((u >> 16) | np.uint32(0x40)).astype(np.uint16), out)


def _mix32(x):
    """lowbias32 (Chris Wellons' integer hash), on uint32 arrays or scalars."""
    x = np.uint32(x) if np.isscalar(x) else x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = (x * np.uint32(0x7FEB352D)).astype(np.uint32)
        x = x ^ (x >> np.uint32(15))
        x = (x * np.uint32(0x846CA68B)).astype(np.uint32)
        x = x ^ (x >> np.uint32(16))
    return x


def stream_key(seed, step, buffer, index_hi):
    """The per-(seed, step, buffer, high half of the index) key of `random_bits`."""
    h = np.uint32(0)
    for word in (seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF, step >> 32, buffer,
                 index_hi):
        h = _mix32(np.uint32(h) ^ np.uint32(word))
    return h


def random_bits(seed, step, buffer, index):
    """16 random bits (uint32 below 2**16) per element index (uint64 array): the high half of
    mix32(stream_key(seed, step, buffer, index >> 32) ^ (index & 0xFFFFFFFF))."""
    index = np.asarray(index, np.uint64)
    out = np.empty(index.shape, np.uint32)
    hi = (index >> np.uint64(32)).astype(np.uint32)
    for h in np.unique(hi):
        sel = hi == h
        key = stream_key(seed, step, buffer, int(h))
        out[sel] = _mix32(np.uint32(key) ^ (index[sel] & np.uint64(0xFFFFFFFF))
                          .astype(np.uint32)) >> np.uint32(16)
    return out


# ---- one segment of a state buffer, either way ------------------------------------------------

def widen(fmt, data, absmax, signed):
    """A segment's stored state -> float32 values."""
    if fmt == FMT_F32:
        return np.array(data, np.float32)
    if fmt in (FMT_BF16, FMT_BF16_SR):
        return bf16_to_f32(data)
    return dequantize_int8(data, absmax, signed)


def narrow(fmt, values, data, absmax, signed, seed=0, step=0, buffer=0, index0=0):
    """Store float32 values into a segment's state (data, absmax written in place); index0 is
    the arena index of the first element (for stochastic rounding)."""
    if fmt == FMT_F32:
        data[...] = values
    elif fmt == FMT_BF16:
        data[...] = f32_to_bf16(values)
    elif fmt == FMT_BF16_SR:
        idx = np.uint64(index0) + np.arange(values.size, dtype=np.uint64)
        data[...] = f32_to_bf16(values, random_bits(seed, step, buffer, idx))
    else:
        codes, am = quantize_int8(values, signed)
        data[...] = codes
        absmax[...] = am


# ---- the group options -------------------------------------------------------------------------

# A param group's state options (fastopt-only keys beside torch's hyperparameters) and their
# defaults.  state_dtype and min_8bit_size decide the arena's layout, so they are fixed at
# construction; state_rounding and state_seed may change between steps.
STATE_DEFAULTS = {"state_dtype": "float32", "state_rounding": "nearest",
                  "min_8bit_size": MIN_8BIT_SIZE, "state_seed": 0}
LAYOUT_KEYS = ("state_dtype", "min_8bit_size")


def check_option(name, x, label=None):
    """A state option, checked -> its normalized value (messages name it `label`)."""
    key, name = name, label or name
    if key in ("state_dtype", "state_rounding"):
        allowed = FORMATS if key == "state_dtype" else ROUNDINGS
        if not isinstance(x, str):
            raise TypeError(f"{name} must be a str, one of {list(allowed)}, got "
                            f"{type(x).__name__}")
        if x not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {x!r}")
        return x
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    x = int(x)
    top = 2 ** 64 - 1 if key == "state_seed" else 2 ** 62
    if not 0 <= x <= top:
        raise ValueError(f"{name} must be from 0 to {top}, got {x}")
    return x


# Where each format's state lives: 0 float32 arenas, 1 bfloat16 (uint16) arenas, 2 int8 codes
# with their absmax.
KIND = {FMT_F32: 0, FMT_BF16: 1, FMT_BF16_SR: 1, FMT_INT8: 2}
KIND_DTYPE = (np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.uint8))
ABSMAX_SUFFIX = "_absmax"


def param_format(group, size):
    """The format of a param of `size` elements in a group with these options: int8 groups
    keep float32 state for tensors smaller than min_8bit_size."""
    fmt = format_code(group["state_dtype"], group["state_rounding"])
    if fmt == FMT_INT8 and size < group["min_8bit_size"]:
        return FMT_F32
    return fmt


def counts_steps(group):
    """Whether a group's state must record its step count even in a family that keeps none
    (SGD): stochastic rounding draws its bits by step, so a resumed run needs the count."""
    return group.get("state_dtype") == "bfloat16" and group.get("state_rounding") == "stochastic"


def format_name(fmt):
    return ("float32", "bfloat16", "bfloat16", "int8")[fmt]


BFLOAT16: Optional[np.dtype] = None    # NumPy's bfloat16, when ml-dtypes is installed
try:
    import ml_dtypes as _ml_dtypes  # type: ignore[import-not-found,unused-ignore]
    BFLOAT16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:                     # pragma: no cover - depends on the environment
    pass


def as_bf16_bits(a):
    """A bfloat16 state array as its uint16 bit patterns (ml_dtypes.bfloat16 or uint16)."""
    if BFLOAT16 is not None and a.dtype == BFLOAT16:
        return a.view(np.uint16)
    return a


def bf16_view(bits):
    """uint16 bit patterns as ml_dtypes.bfloat16 when ml-dtypes is installed (else as they
    are): what `opt.state` and `state_dict()` show for bfloat16 state."""
    return bits.view(BFLOAT16) if BFLOAT16 is not None else bits
